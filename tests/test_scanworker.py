"""
Tests for L{p2pfiles.scanworker}: what L{observe} finds for one name, the
child's request loop, and (with real child processes) L{ProcessObserver}
and a scan that hashes through it.
"""

import hashlib
import io
import os
import pickle
import sys
from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import scanworker
from p2pfiles.scanworker import GONE, UNSTABLE, ProcessObserver, WorkerFailed, hashOpened, observe, serve
from p2pfiles.sharescan import EMPTY, ShareScanner


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ShareMixin:
    def makeShare(self) -> FilePath:
        share = FilePath(self.mktemp())  # type: ignore[attr-defined]
        share.makedirs()
        self.share = share
        self.sharePath = os.fsencode(share.path)
        self.shareReal = os.path.realpath(self.sharePath)
        return share

    def signature(self, name: str) -> Tuple[int, int, int]:
        st = os.stat(self.share.child(name).path)
        return (st.st_size, st.st_mtime_ns, st.st_ino)


class ObserveTests(ShareMixin, SynchronousTestCase):
    """
    L{observe} on real files of a temporary share.
    """

    def setUp(self) -> None:
        self.makeShare()

    def test_hashed(self) -> None:
        """
        A regular file is hashed: its signature, mtime and SHA-256.
        """
        self.share.child("a").setContent(b"hello")
        st = os.stat(self.share.child("a").path)
        self.assertEqual(
            observe(self.sharePath, self.shareReal, "a", None),
            ("file", 5, st.st_mtime_ns, st.st_ino, st.st_mtime, sha(b"hello")),
        )

    def test_cachedHashHolds(self) -> None:
        """
        A file whose signature is the cached one is not read: no SHA-256
        comes back; one whose signature differs is read.
        """
        self.share.child("a").setContent(b"hello")
        reads: List[str] = []

        def hasher(path: str, size: int) -> Any:
            reads.append(path)
            return hashOpened(path, size)

        seen = observe(self.sharePath, self.shareReal, "a", self.signature("a"), hasher)
        self.assertEqual((seen[0], seen[-1], reads), ("file", None, []))
        stale = (5, 0, self.signature("a")[2])
        self.assertEqual(observe(self.sharePath, self.shareReal, "a", stale, hasher)[-1], sha(b"hello"))
        self.assertEqual(len(reads), 1)

    def test_notShared(self) -> None:
        """
        A directory, and a name that is not there, are silently not shared.
        """
        self.share.child("d").makedirs()
        self.assertEqual(observe(self.sharePath, self.shareReal, "d", None), GONE)
        self.assertEqual(observe(self.sharePath, self.shareReal, "missing", None), GONE)

    def test_symlinks(self) -> None:
        """
        A symlink to a visible file in the share is hashed as that file; one
        that leads out of the share is a problem, named as such.
        """
        self.share.child("target").setContent(b"data")
        os.symlink("target", self.share.child("inside").path)
        outside = FilePath(self.mktemp())
        outside.setContent(b"secret")
        os.symlink(outside.path, self.share.child("outside").path)
        self.assertEqual(observe(self.sharePath, self.shareReal, "inside", None)[-1], sha(b"data"))
        seen = observe(self.sharePath, self.shareReal, "outside", None)
        self.assertEqual(seen[:2], ("problem", "symlink does not lead to a visible file in the share"))
        self.assertFalse(seen[3])

    def test_refused(self) -> None:
        """
        A file the system refuses to open is a problem with the system's
        reason.
        """
        self.share.child("locked").setContent(b"x")

        def hasher(path: str, size: int) -> Any:
            raise PermissionError(13, "Permission denied", path)

        seen = observe(self.sharePath, self.shareReal, "locked", None, hasher)
        self.assertEqual((seen[0], seen[1], seen[3]), ("problem", "Permission denied", True))

    def test_unstable(self) -> None:
        """
        A file that changes every time it is read is given up on after
        L{scanworker.HASH_TRIES} reads.
        """
        path = self.share.child("moving")
        path.setContent(b"0")
        reads: List[int] = []

        def hasher(name: str, size: int) -> Any:
            reads.append(size)
            with open(name, "ab") as f:
                f.write(b"1")  # grows between the look and the read
            return hashOpened(name, size)

        self.assertEqual(observe(self.sharePath, self.shareReal, "moving", None, hasher), UNSTABLE)
        self.assertEqual(len(reads), scanworker.HASH_TRIES)


class ServeTests(ShareMixin, SynchronousTestCase):
    """
    The child's request loop, over in-memory streams.
    """

    def test_answersEachRequest(self) -> None:
        """
        Each request gets one answer, an observation per name in order; the
        loop ends at the end of its input, even in the middle of a frame.
        """
        self.makeShare()
        self.share.child("a").setContent(b"A")
        self.share.child("b").setContent(b"BB")
        requests = io.BytesIO()
        for items in ([("a", None), ("b", None)], [("missing", None)]):
            scanworker._writeFrame(requests, pickle.dumps((self.sharePath, self.shareReal, items)))
        requests.write(b"\0\0\0\x10trunc")
        requests.seek(0)
        answers = io.BytesIO()
        serve(requests, answers)
        answers.seek(0)
        first = pickle.loads(scanworker._readFrame(answers) or b"")
        second = pickle.loads(scanworker._readFrame(answers) or b"")
        self.assertEqual([seen[-1] for seen in first], [sha(b"A"), sha(b"BB")])
        self.assertEqual(second, [GONE])
        self.assertIsNone(scanworker._readFrame(answers))


class ProcessObserverTests(ShareMixin, SynchronousTestCase):
    """
    L{ProcessObserver} with real child processes.
    """

    def setUp(self) -> None:
        self.makeShare()

    def observer(self, **kwargs: Any) -> ProcessObserver:
        observer = ProcessObserver(**kwargs)
        self.addCleanup(observer.close)
        return observer

    def test_sameAsInThread(self) -> None:
        """
        The child finds what L{observe} finds here, name by name, over more
        names than one batch holds, and keeps running for the next scan.
        """
        names = [f"f{k:03d}" for k in range(50)]
        for k, name in enumerate(names):
            self.share.child(name).setContent(os.urandom(k))
        items = [(name, self.signature(name) if k % 3 == 0 else None) for k, name in enumerate(names)]
        items.append(("missing", None))
        observer = self.observer(batch=7, workers=3)
        here = [observe(self.sharePath, self.shareReal, name, cached) for name, cached in items]
        self.assertEqual(list(observer.observeAll(self.sharePath, self.shareReal, items)), here)
        pids = observer.pids()
        self.assertEqual(len(pids), 3)
        self.assertEqual(list(observer.observeAll(self.sharePath, self.shareReal, items[:3])), here[:3])
        self.assertEqual(observer.pids(), pids)
        self.assertEqual(list(observer.observeAll(self.sharePath, self.shareReal, [])), [])

    def test_lowerPriority(self) -> None:
        """
        Each child runs at the niceness it was given above the parent's, as
        a batch task (never preempting on wake-up).
        """
        self.share.child("a").setContent(b"A")
        observer = self.observer(nice=7, batch=1, workers=2)
        # One batch each: both children have answered, so both are set up.
        list(observer.observeAll(self.sharePath, self.shareReal, [("a", None), ("a", None)]))
        own = os.getpriority(os.PRIO_PROCESS, 0)
        pids = observer.pids()
        self.assertEqual(len(pids), 2)
        for pid in pids:
            self.assertEqual(os.getpriority(os.PRIO_PROCESS, pid), min(19, own + 7))
            self.assertEqual(os.sched_getscheduler(pid), os.SCHED_BATCH)

    def test_start(self) -> None:
        """
        L{ProcessObserver.start} starts the children before any request,
        once: the next requests use them.
        """
        self.share.child("a").setContent(b"A")
        observer = self.observer(workers=2)
        self.assertEqual(observer.pids(), [])
        observer.start()
        pids = observer.pids()
        self.assertEqual(len(pids), 2)
        observer.start()
        self.assertEqual(list(observer.observeAll(self.sharePath, self.shareReal, [("a", None)]))[0][-1], sha(b"A"))
        self.assertEqual(observer.pids(), pids)

    def test_closeEndsChild(self) -> None:
        """
        L{ProcessObserver.close} ends the child; a closed observer refuses
        to start another.
        """
        self.share.child("a").setContent(b"A")
        observer = self.observer()
        list(observer.observeAll(self.sharePath, self.shareReal, [("a", None)]))
        pids = observer.pids()
        self.assertTrue(pids)
        observer.close()
        self.assertEqual(observer.pids(), [])
        for pid in pids:
            # Reaped: no such process any more.
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        with self.assertRaises(WorkerFailed):
            list(observer.observeAll(self.sharePath, self.shareReal, [("a", None)]))

    def test_deadChild(self) -> None:
        """
        A child that exits without answering is L{WorkerFailed}; one that
        cannot be started too.
        """
        observer = self.observer(command=[sys.executable, "-c", "pass"])
        with self.assertRaises(WorkerFailed):
            list(observer.observeAll(self.sharePath, self.shareReal, [("a", None)]))
        missing = self.observer(command=[self.mktemp()])
        with self.assertRaises(WorkerFailed):
            list(missing.observeAll(self.sharePath, self.shareReal, [("a", None)]))

    def test_scanThroughChild(self) -> None:
        """
        A scan that hashes through the child builds the state a scan in the
        thread builds, cache included.
        """
        for k in range(20):
            self.share.child(f"f{k}").setContent(os.urandom(k + 1))
        self.share.child(".hidden").setContent(b"h")
        state = FilePath(self.mktemp())
        here = ShareScanner(self.share, state.child("one.json")).scan(EMPTY)
        there = ShareScanner(self.share, state.child("two.json"), observer=self.observer(batch=4)).scan(EMPTY)
        self.assertEqual(there.state.entries, here.state.entries)
        self.assertEqual(list(there.state.entries), list(here.state.entries))
        self.assertEqual(there.state.cache, here.state.cache)
        self.assertIsNone(there.workerProblem)

    def test_scanInsideSettle(self) -> None:
        """
        Each scan runs inside the scanner's C{settle(first)}, once.
        """
        self.share.child("a").setContent(b"A")
        entered: List[str] = []

        @contextmanager
        def settle(first: bool) -> Iterator[None]:
            entered.append("in")
            yield
            entered.append("out")

        scanner = ShareScanner(self.share, FilePath(self.mktemp()).child("c.json"), settle=settle)
        result = scanner.scan(EMPTY)
        self.assertEqual((entered, list(result.state.entries)), (["in", "out"], ["a"]))

    def test_scanFallsBack(self) -> None:
        """
        When the child fails, the scan hashes in its own thread and says
        why.
        """
        for k in range(5):
            self.share.child(f"f{k}").setContent(os.urandom(k + 1))
        state = FilePath(self.mktemp())
        broken = self.observer(command=[sys.executable, "-c", "pass"])
        result = ShareScanner(self.share, state.child("c.json"), observer=broken).scan(EMPTY)
        self.assertEqual(sorted(result.state.entries), [f"f{k}" for k in range(5)])
        self.assertIn("the scan worker stopped", result.workerProblem or "")
