"""
Tests for L{p2pfiles.fetcher}: downloads into this node's own share, one per
name, with the leader's answer and the download itself replaced by
Deferreds the test fires.
"""

import hashlib
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import fetcher
from p2pfiles.errors import P2PError
from p2pfiles.fetcher import Fetcher
from p2pfiles.partfile import PartialFile
from p2pfiles.protocol import LocalIdentity
from p2pfiles.wire import FileEntry, Message

ME = 2
LEADER = "127.0.0.1:9001"
DATA = b"the file's bytes"
SHA = hashlib.sha256(DATA).hexdigest()


def inline(f: Any, *args: Any) -> Deferred:
    return maybeDeferred(f, *args)


class FakeConnection:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Download:
    """
    One call of the (fake) download: its arguments and the Deferred the
    test fires.
    """

    def __init__(self, name: str, sink: Any, addresses: List[str], kwargs: Dict[str, Any]) -> None:
        self.name = name
        self.sink = sink
        self.addresses = addresses
        self.kwargs = kwargs
        self.cancelled = False
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True

    def succeed(self, size: int = len(DATA), sha256: str = SHA) -> None:
        self.deferred.callback(
            {"name": self.name, "size": size, "sha256": sha256, "seconds": 0.5, "via": [1, 3]}
        )


class FetcherCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Clock()
        self.share = FilePath(self.mktemp())
        self.share.makedirs()
        self.leader: Optional[str] = LEADER
        self.others = ["127.0.0.1:9003", LEADER, "127.0.0.1:9004"]
        self.local: Dict[str, FileEntry] = {}
        self.rescans = 0
        self.asked: List[Tuple[str, Message]] = []
        self.connections: List[FakeConnection] = []
        self.found: Dict[str, Message] = {}
        self.downloads: List[Download] = []
        self.patch(fetcher, "askLeader", self.askLeader)
        self.patch(fetcher, "download", self.download)
        self.fetcher = Fetcher(
            ME,
            self.share,
            self.reactor,
            b"secret",
            LocalIdentity("node", ME, "127.0.0.1:9002", b"secret", "request"),
            inline,
            lambda: self.leader,
            lambda: list(self.others),
            self.local.get,
            self.rescan,
        )

    def askLeader(self, reactor: Any, address: str, secret: bytes, message: Message, timeout: float, identity: Any) -> Deferred:
        self.asked.append((address, message))
        found = self.found.get(message.name)
        if found is None:
            return maybeDeferred(lambda: (_ for _ in ()).throw(P2PError(f"not found: {message.name}", "not-found")))
        connection = FakeConnection()
        self.connections.append(connection)
        return succeed((connection, found))

    def download(self, reactor: Any, name: str, sink: Any, addresses: List[str], secret: bytes, runInThread: Any, identity: Any = None, **kwargs: Any) -> Deferred:
        record = Download(name, sink, addresses, kwargs)
        self.downloads.append(record)
        return record.deferred

    def rescan(self) -> Deferred:
        self.rescans += 1
        return succeed(None)

    def onCluster(self, name: str = "a.txt", sha256: str = SHA, size: int = len(DATA)) -> None:
        self.found[name] = Message("found", name=name, size=size, sha256=sha256, holders=[1, 3])


class JoinTests(FetcherCase):
    """
    Concurrent fetches of one name share one download.
    """

    def test_twoFetchesOneDownload(self) -> None:
        """
        A second fetch of a name being fetched joins the download in flight:
        one download, and both get its C{fetched} reply.
        """
        self.onCluster()
        first = self.fetcher.fetch("a.txt", False)
        second = self.fetcher.fetch("a.txt", False)
        (download,) = self.downloads
        self.assertIsInstance(download.sink, PartialFile)
        self.assertEqual(download.sink.final, self.share.child("a.txt"))
        self.assertNoResult(first)
        self.assertNoResult(second)
        download.succeed()
        for d in (first, second):
            reply = self.successResultOf(d)
            self.assertEqual(
                (reply.type, reply.name, reply.size, reply.sha256, reply.already),
                ("fetched", "a.txt", len(DATA), SHA, False),
            )
        self.assertEqual(len(self.asked), 1)
        self.assertEqual(self.rescans, 1, "the share is rescanned once the file is in")

    def test_afterItEndsANewFetchDownloadsAgain(self) -> None:
        """
        Once a download has ended, a new fetch of the name starts afresh.
        """
        self.onCluster()
        d = self.fetcher.fetch("a.txt", False)
        self.downloads[0].succeed()
        self.successResultOf(d)
        self.fetcher.fetch("a.txt", False)
        self.assertEqual(len(self.downloads), 2)

    def test_otherNamesIndependent(self) -> None:
        """
        Fetches of different names are different downloads.
        """
        self.onCluster("a.txt")
        self.onCluster("b.txt")
        self.fetcher.fetch("a.txt", False)
        self.fetcher.fetch("b.txt", False)
        self.assertEqual([d.name for d in self.downloads], ["a.txt", "b.txt"])

    def test_failureFailsEveryone(self) -> None:
        """
        A download that fails fails every fetch that joined it, with its
        error, and is not logged as a bug.
        """
        self.onCluster()
        first = self.fetcher.fetch("a.txt", False)
        second = self.fetcher.fetch("a.txt", False)
        self.downloads[0].deferred.errback(P2PError("bytes do not match", "verify"))
        for d in (first, second):
            self.assertEqual(self.failureResultOf(d, P2PError).value.code, "verify")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancelOneWaiter(self) -> None:
        """
        Cancelling one fetch stops that waiter only: the download goes on
        and the other fetch gets its result.
        """
        self.onCluster()
        first = self.fetcher.fetch("a.txt", False)
        second = self.fetcher.fetch("a.txt", False)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        (download,) = self.downloads
        self.assertFalse(download.cancelled)
        download.succeed()
        self.assertEqual(self.successResultOf(second).type, "fetched")

    def test_cancelEveryWaiterKeepsDownload(self) -> None:
        """
        Even with every waiter gone the download runs to its end (others
        may join it, and a finished file is worth having).
        """
        self.onCluster()
        d = self.fetcher.fetch("a.txt", False)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertFalse(self.downloads[0].cancelled)
        later = self.fetcher.fetch("a.txt", False)
        self.assertEqual(len(self.downloads), 1)
        self.downloads[0].succeed()
        self.assertEqual(self.successResultOf(later).type, "fetched")

    def test_unexpectedFailureWithNobodyWaitingLogged(self) -> None:
        """
        A download that fails with something unexpected while nobody waits
        for it any more is logged, so that the bug is not lost.
        """
        self.onCluster()
        waiter = self.fetcher.fetch("a.txt", False)
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        self.downloads[0].deferred.errback(ZeroDivisionError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_addressesLeaderFirst(self) -> None:
        """
        The download asks the leader first and then every other live member
        (each once), where it resumes if the leader goes away; its progress
        is reported through L{Fetcher.progress} while it runs.
        """
        self.onCluster()
        self.fetcher.fetch("a.txt", False)
        (download,) = self.downloads
        self.assertEqual(download.addresses, [LEADER, "127.0.0.1:9003", "127.0.0.1:9004"])
        self.assertEqual(self.fetcher.progress("a.txt"), (0, 0))
        download.kwargs["onProgress"](5, 16)
        self.assertEqual(self.fetcher.progress("a.txt"), (5, 16))
        download.succeed()
        self.assertEqual(self.fetcher.progress("a.txt"), (0, 0))


class StopTests(FetcherCase):
    """
    L{Fetcher.stop}.
    """

    def test_stopCancelsDownloads(self) -> None:
        """
        C{stop} cancels every download in flight, fails their waiters, and
        fires once they have all ended, logging nothing.
        """
        self.onCluster("a.txt")
        self.onCluster("b.txt")
        a = self.fetcher.fetch("a.txt", False)
        b = self.fetcher.fetch("b.txt", False)
        stopped = self.fetcher.stop()
        self.assertEqual([d.cancelled for d in self.downloads], [True, True])
        self.successResultOf(stopped)
        for d in (a, b):
            self.assertIsNotNone(self.failureResultOf(d))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stopFailsWaitersWithP2PError(self) -> None:
        """
        The waiters of a download that C{stop} cancels fail with a
        L{P2PError} (C{unavailable}: the node is stopping), as C{fetch}
        promises, not with a bare L{CancelledError} that a request session
        would log as a bug and report as C{internal}.
        """
        self.onCluster()
        d = self.fetcher.fetch("a.txt", False)
        self.successResultOf(self.fetcher.stop())
        self.assertEqual(self.failureResultOf(d, P2PError).value.code, "unavailable")


    def test_stopWithNothingInFlight(self) -> None:
        """
        Stopping with no download fires at once.
        """
        self.successResultOf(self.fetcher.stop())

    def test_fetchAfterStopFails(self) -> None:
        """
        A fetch asked of a stopped fetcher fails its Deferred with
        C{unavailable}, as the interface promises (a raise would reach the
        request session as an internal error).
        """
        self.successResultOf(self.fetcher.stop())
        d = self.fetcher.fetch("a.txt", False)
        self.assertEqual(self.failureResultOf(d, P2PError).value.code, "unavailable")



class ExistingFileTests(FetcherCase):
    """
    What is already in the share under the name.
    """

    def test_alreadyThere(self) -> None:
        """
        If this node already shares the very content, the answer is
        C{already=True} and nothing is downloaded.
        """
        self.onCluster()
        self.share.child("a.txt").setContent(DATA)
        self.local["a.txt"] = FileEntry("a.txt", len(DATA), 1.0, SHA)
        reply = self.successResultOf(self.fetcher.fetch("a.txt", False))
        self.assertEqual((reply.type, reply.size, reply.sha256, reply.already), ("fetched", len(DATA), SHA, True))
        self.assertEqual(self.downloads, [])
        self.assertTrue(self.connections[0].closed)

    def test_notYetIndexedSameContent(self) -> None:
        """
        A regular file the index does not know yet is looked at again (a
        rescan) before it is called a conflict; if it is the same content,
        the answer is C{already=True}.
        """
        self.onCluster()
        self.share.child("a.txt").setContent(DATA)

        def rescan() -> Deferred:
            self.rescans += 1
            self.local["a.txt"] = FileEntry("a.txt", len(DATA), 1.0, SHA)
            return succeed(None)

        self.fetcher.rescan = rescan
        reply = self.successResultOf(self.fetcher.fetch("a.txt", False))
        self.assertTrue(reply.already)
        self.assertEqual(self.rescans, 1)
        self.assertEqual(self.downloads, [])

    def test_unsharedFileIsConflict(self) -> None:
        """
        A regular file that is not shared (the index leaves it out even
        after a rescan) is not replaced without overwrite: C{conflict}.
        """
        self.onCluster()
        self.share.child("a.txt").setContent(b"my own notes")
        error = self.failureResultOf(self.fetcher.fetch("a.txt", False), P2PError).value
        self.assertEqual(error.code, "conflict")
        self.assertIn("not shared", str(error))
        self.assertEqual(self.downloads, [])
        self.assertEqual(self.share.child("a.txt").getContent(), b"my own notes")

    def test_otherContentIsConflict(self) -> None:
        """
        A shared file with other content is not replaced without overwrite.
        """
        self.onCluster()
        self.share.child("a.txt").setContent(b"older")
        self.local["a.txt"] = FileEntry("a.txt", 5, 1.0, "b" * 64)
        error = self.failureResultOf(self.fetcher.fetch("a.txt", False), P2PError).value
        self.assertEqual(error.code, "conflict")
        self.assertIn("other content", str(error))
        self.assertEqual(self.downloads, [])

    def test_overwriteReplacesFile(self) -> None:
        """
        With overwrite, an existing regular file (shared with other content,
        or not shared) is downloaded over.
        """
        self.onCluster()
        self.share.child("a.txt").setContent(b"older")
        self.local["a.txt"] = FileEntry("a.txt", 5, 1.0, "b" * 64)
        d = self.fetcher.fetch("a.txt", True)
        self.downloads[0].succeed()
        self.assertFalse(self.successResultOf(d).already)

    def test_directoryNeverReplaced(self) -> None:
        """
        A directory of that name is a conflict even with overwrite.
        """
        self.onCluster()
        self.share.child("a.txt").makedirs()
        for overwrite in (False, True):
            error = self.failureResultOf(self.fetcher.fetch("a.txt", overwrite), P2PError).value
            self.assertEqual(error.code, "conflict")
            self.assertIn("directory", str(error))
        self.assertEqual(self.downloads, [])
        self.assertTrue(self.share.child("a.txt").isdir())

    def test_noLeader(self) -> None:
        """
        With no leader there is nobody to ask: C{no-leader}.
        """
        self.leader = None
        error = self.failureResultOf(self.fetcher.fetch("a.txt", False), P2PError).value
        self.assertEqual(error.code, "no-leader")
        self.assertEqual(self.asked, [])

    def test_notOnCluster(self) -> None:
        """
        A name the leader does not know fails with the leader's
        C{not-found}, and nothing is downloaded.
        """
        error = self.failureResultOf(self.fetcher.fetch("a.txt", False), P2PError).value
        self.assertEqual(error.code, "not-found")
        self.assertEqual([(a, m.type, m.name) for a, m in self.asked], [(LEADER, "lookup", "a.txt")])
        self.assertEqual(self.downloads, [])
