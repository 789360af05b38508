"""
Downloads that cannot be corrupted, against real nodes on 127.0.0.1 in this
process.  Each test is named after what it proves, and each reproduces a
failure of an earlier version:

  1. concurrent downloads of one destination wrote one file together and
     reported it verified;
  2. a planted C{.NAME.part} symlink was written through;
  3. names of 250-255 bytes were listed but could never be downloaded;
  5. a shared file swapped for a symlink was served through the symlink;
  6. parts of abandoned downloads stayed forever, and C{fetch} replaced a
     same-named entry that was not shared.
(4, index updates larger than a frame, is pinned in tests/test_wire.py.)
"""

import hashlib
import os
import random
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from p2pfiles.client import connect, fetchInto, request
from p2pfiles.errors import P2PError
from p2pfiles.names import partName
from p2pfiles.partfile import PartialFile
from p2pfiles.transfer import download
from p2pfiles.wire import Message

from tests.support import agreed, startCluster, waitFor


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def noise(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


async def get(cluster, via, name, into, **kwargs):
    sink = PartialFile(into, name)
    addresses = [cluster[via].address] + [c.address for n, c in sorted(cluster.items()) if n != via]
    return await download(reactor, name, sink, addresses, b"", deferToThread, **kwargs)


async def fetch(address, name, overwrite=False):
    connection = await connect(reactor, address, b"")
    try:
        return await fetchInto(reactor, connection, name, overwrite, 60.0)
    finally:
        connection.close()


class ConcurrentDownloadTests(TestCase):
    """
    One writer per destination, whoever asks.
    """

    async def test_concurrentFetchesAndGetsOfOneNameLeaveOneVerifiedCopy(self):
        """
        Three C{fetch}es of a file into the leader's share and three gets
        whose destination is that same path, all at once: every one of them
        ends with the file, the bytes under the name are exactly the file's,
        and what the leader then serves and lists is the true content.
        """
        data = noise(8 * 1024 * 1024 + 123)
        cluster = startCluster(self, [1, 2, 3], files={2: {"big.bin": data}})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 1, "the index")
        leaderShare = cluster[1].share
        jobs = [Deferred.fromCoroutine(fetch(cluster[1].address, "big.bin")) for _ in range(3)]
        jobs += [Deferred.fromCoroutine(get(cluster, 3, "big.bin", leaderShare)) for _ in range(3)]
        results = await gatherResults(jobs, consumeErrors=True)
        for fetched in results[:3]:
            self.assertEqual((fetched.name, fetched.size, fetched.sha256), ("big.bin", len(data), sha(data)))
        for summary in results[3:]:
            self.assertEqual((summary["size"], summary["sha256"]), (len(data), sha(data)))
        self.assertEqual(leaderShare.child("big.bin").getContent(), data)
        self.assertFalse(leaderShare.child(partName("big.bin")).exists())
        await waitFor(
            lambda: [h[0] for h in cluster[1].node.keeper.index.holders("big.bin", sha(data))] == [1, 2],
            "the leader listed as a holder of the true content",
        )
        self.assertEqual([h[0] for h in cluster[1].node.keeper.index.holders("big.bin")], [1, 2])
        again = await get(cluster, 3, "big.bin", FilePath(self.mktemp()))
        self.assertEqual(again["sha256"], sha(data))


class PlantedPartTests(TestCase):
    """
    A part is only ever a regular file this download created or resumed.
    """

    async def test_plantedPartSymlinkIsRefusedAndItsTargetUntouched(self):
        """
        With C{out/.big.bin.part} a symlink to another file, a get into
        C{out/} fails with one line naming the part, the link's target keeps
        its bytes, and C{out/big.bin} does not appear (let alone as a link).
        """
        cluster = startCluster(self, [1, 2], files={2: {"big.bin": noise(300_000)}})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 1, "the index")
        base = FilePath(self.mktemp())
        out = base.child("out")
        out.makedirs()
        important = base.child("important.conf")
        important.setContent(b"keep me\n")
        os.symlink(important.path, out.child(partName("big.bin")).path)
        with self.assertRaises(P2PError) as caught:
            await get(cluster, 1, "big.bin", out)
        self.assertEqual(caught.exception.code, "io")
        self.assertIn(partName("big.bin"), str(caught.exception))
        self.assertEqual(important.getContent(), b"keep me\n")
        self.assertFalse(os.path.lexists(out.child("big.bin").path))


class LongNameTests(TestCase):
    """
    Every name the cluster lists can be downloaded.
    """

    async def test_nameOf255BytesCanBeDownloadedAndResumed(self):
        """
        A shared file whose name is 255 UTF-8 bytes (two-byte characters)
        is fetched through the leader, and its part (whose plain name would
        be too long) is found again by a resume.
        """
        name = "é" * 127 + "x"
        self.assertEqual(len(name.encode("utf-8")), 255)
        data = noise(2_000_000, seed=3)
        share = FilePath(self.mktemp()).child("files")
        share.makedirs()
        with open(share.child(name).path, "wb") as f:
            f.write(data)
        cluster = startCluster(self, [1, 2], shares={2: share})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 1, "the index")
        out = FilePath(self.mktemp())
        out.makedirs()
        part = out.child(partName(name))
        self.assertLessEqual(len(part.basename().encode("utf-8")), 255)
        # (FilePath.setContent's temporary name would be too long here.)
        with open(part.path, "wb") as f:
            f.write(data[:700_000])
        summary = await get(cluster, 1, name, out)
        self.assertEqual(summary["resumed_from"], 700_000)
        self.assertEqual(out.child(name).getContent(), data)
        self.assertFalse(os.path.lexists(part.path))


class SwappedFileTests(TestCase):
    """
    A node serves only the file it indexed.
    """

    async def test_sharedFileSwappedForSymlinkIsNotServed(self):
        """
        A shared file replaced by a symlink to a file outside the share
        after it was indexed is never served: the get fails, and no byte of
        the outside file reaches the client.
        """
        secret = b"outside the share " * 1000
        cluster = startCluster(self, [1], files={1: {"a.bin": noise(len(secret), seed=5)}})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 1, "the index")
        outside = FilePath(self.mktemp())
        outside.setContent(secret)
        path = cluster[1].share.child("a.bin")
        # Swap it faster than any scan: the index still names the old file.
        await cluster[1].node.localIndex.stop()
        os.unlink(path.path)
        os.symlink(outside.path, path.path)
        out = FilePath(self.mktemp())
        with self.assertRaises(P2PError):
            await get(cluster, 1, "a.bin", out, resumeFor=1.0)
        self.assertFalse(out.child("a.bin").exists())
        leftover = out.child(partName("a.bin"))
        if leftover.exists():
            self.assertNotIn(secret[:64], leftover.getContent())


class LeftoverTests(TestCase):
    """
    Abandoned parts go; entries that are not shared are not replaced.
    """

    async def test_partsOlderThanTheLimitAreRemovedAtStart(self):
        """
        At start a node removes parts in its share older than its
        C{partMaxAge}, and keeps fresh ones and everything else.
        """
        base = FilePath(self.mktemp())
        share = base.child("node1").child("files")
        share.makedirs()
        old, fresh = share.child(".old.bin.part"), share.child(".new.bin.part")
        old.setContent(b"abandoned")
        fresh.setContent(b"in progress")
        share.child("kept.bin").setContent(b"shared")
        eightDaysAgo = time.time() - 8 * 86400
        os.utime(old.path, (eightDaysAgo, eightDaysAgo))
        os.utime(share.child("kept.bin").path, (eightDaysAgo, eightDaysAgo))
        cluster = startCluster(self, [1], shares={1: share})
        await waitFor(lambda: not os.path.lexists(old.path), "the old part to go")
        self.assertTrue(os.path.exists(fresh.path))
        self.assertEqual(share.child("kept.bin").getContent(), b"shared")
        self.assertEqual(cluster[1].node.config.partMaxAge, 7 * 86400)

    async def test_fetchDoesNotReplaceAnEntryThatIsNotShared(self):
        """
        A node asked to fetch a name under which its share holds something
        it does not share (a link out of the share) refuses without
        C{overwrite} and leaves it; a directory is refused even with it.
        """
        cluster = startCluster(self, [1, 2], files={1: {"p.png": b"cluster copy", "d": b"file"}})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 2, "the index")
        outside = FilePath(self.mktemp())
        outside.setContent(b"not shared")
        link = cluster[2].share.child("p.png")
        os.symlink(outside.path, link.path)
        cluster[2].share.child("d").makedirs()
        with self.assertRaises(P2PError) as caught:
            await fetch(cluster[2].address, "p.png")
        self.assertEqual(caught.exception.code, "conflict")
        self.assertIn("--overwrite", str(caught.exception))
        self.assertTrue(os.path.islink(link.path))
        self.assertEqual(outside.getContent(), b"not shared")
        with self.assertRaises(P2PError) as caught:
            await fetch(cluster[2].address, "d", overwrite=True)
        self.assertIn("directory", str(caught.exception))
        self.assertTrue(cluster[2].share.child("d").isdir())
        fetched = await fetch(cluster[2].address, "p.png", overwrite=True)
        self.assertEqual(fetched.sha256, sha(b"cluster copy"))
        self.assertFalse(os.path.islink(link.path))
        self.assertEqual(outside.getContent(), b"not shared")


class StopTests(TestCase):
    """
    Stopping a node lets go of everything it owns.
    """

    async def test_stopClosesEveryConnectionAndCancelsEveryTransfer(self):
        """
        With a control link, a status watch, an idle request connection, a
        file being served, a file being relayed and a fetch (in flight, or
        just done), the
        node's C{stopService} alone (and its port's C{stopListening}) closes
        every one of them, incoming ones included, and leaves no transfer,
        timer or socket behind (trial fails the test on a dirty reactor).
        """
        size = 32 * 1024 * 1024
        cluster = startCluster(self, [1, 2], files={1: {"own.bin": noise(size, 1)}, 2: {"far.bin": noise(size, 2)}})
        await waitFor(lambda: agreed(cluster, 1) and cluster[1].node.keeper.index.fileCount() == 2, "the index")
        address = cluster[1].address
        watch = await connect(reactor, address, b"")
        await request(watch, Message("status", watch=True))
        idle = await connect(reactor, address, b"")
        served = await connect(reactor, address, b"")
        header = await request(served, Message("get", name="own.bin", offset=0, sha256=None))
        self.assertEqual(header.type, "file")
        relayed = await connect(reactor, address, b"")
        header = await request(relayed, Message("get", name="far.bin", offset=0, sha256=None))
        self.assertEqual((header.type, header.holder), ("file", 2))
        # Neither reader takes its bytes: both transfers stay in flight.
        fetching = await connect(reactor, cluster[2].address, b"")
        fetchReply = Deferred.fromCoroutine(fetchInto(reactor, fetching, "own.bin", False, 60.0))
        fetchReply.addErrback(lambda reason: reason.trap(P2PError))
        node = cluster[1].node
        # The serve and the relay stay in flight (their readers take
        # nothing); node 2's fetch may already be done on a fast machine.
        await waitFor(
            lambda: {t.direction for t in node.transfers.values()} >= {"serve", "relay"},
            "a serve and a relay in flight on node 1",
        )
        cluster[1].running = False
        await gatherResults([node.stopService(), cluster[1].port.stopListening()])
        self.assertEqual(node.transfers, {})
        self.assertEqual([f.protocols for f in node.factories], [set()])
        # The readers were paused: let them read again to see the close.
        for connection in (served, relayed):
            connection.receiveRaw(lambda data: None, lambda: None)
        for connection in (watch, idle, served, relayed):
            await connection.protocol.whenClosed()
        self.assertFalse(any(link for member in node.membership.members.values() for link in member.links))
        # Node 2's own download now waits for a leader; node 2's stop (in
        # the cleanup) cancels it.
        fetching.close()
        await fetchReply
