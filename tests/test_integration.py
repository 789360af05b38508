"""
Integration tests: real nodes talking TCP on 127.0.0.1, in this process.
"""

import hashlib
import os
import random
import socket
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from p2pfiles.client import askLeader, connect, fetchInto, receiveListing, request
from p2pfiles.errors import P2PError
from p2pfiles.index import parseLog
from p2pfiles.partfile import PartialFile
from p2pfiles.transfer import download
from p2pfiles.wire import Message, encode

from tests.support import agreed, startCluster, waitFor, waitForAsync


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pngLike(size: int) -> bytes:
    """
    Bytes shaped like the original demo's PNG: a PNG signature, then noise.
    """
    rng = random.Random(size)
    return b"\x89PNG\r\n\x1a\n" + rng.randbytes(size - 8)


class ClusterTests(TestCase):
    """
    Three nodes find each other, elect the smallest id and keep the index.
    """

    async def test_threeNodesSeeEachOtherAndElectSmallest(self):
        """
        Three nodes started together all see three live members and follow
        node 1 in one epoch; the status a client reads says the same.
        """
        cluster = startCluster(self, [1, 2, 3])
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        connection = await connect(reactor, cluster[3].address, b"")
        reply = await request(connection, Message("status", watch=False))
        connection.close()
        status = reply.status
        self.assertEqual((status["id"], status["role"], status["leader"]), (3, "follower", 1))
        self.assertEqual([(m["id"], m["alive"]) for m in status["members"]], [(1, True), (2, True), (3, True)])
        self.assertEqual(cluster[1].node.status()["role"], "leader")

    async def test_nodeZeroLeads(self):
        """
        Node id 0 is a real id: it leads a cluster it is the smallest of.
        """
        cluster = startCluster(self, [0, 5])
        await waitFor(lambda: agreed(cluster, 0), "nodes to agree on leader 0")

    async def test_transitiveMembership(self):
        """
        A node that knows only one follower learns the leader that follower
        names, then the other members from the leader's own heartbeats,
        links to them and agrees with all of them (and they, linked to by
        it, know it).
        """

        def peersOf(node, addresses):
            if node == 4:
                return {3: addresses[3]}
            return {p: a for p, a in addresses.items() if p not in (node, 4)}

        cluster = startCluster(self, [1, 2, 3, 4], peersOf=peersOf)
        await waitFor(lambda: agreed(cluster, 1, 4), "four nodes to agree on leader 1")
        self.assertEqual(sorted(cluster[4].node.membership.members), [1, 2, 3])
        self.assertIn(4, cluster[3].node.membership.members)

    async def test_wrongSecretIsKeptOut(self):
        """
        A client with the wrong secret is refused with an authentication
        error, and the cluster carries on.
        """
        cluster = startCluster(self, [1, 2], secret=b"right")
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        with self.assertRaises(P2PError) as caught:
            await connect(reactor, cluster[1].address, b"wrong")
        self.assertEqual(caught.exception.code, "auth")
        connection = await connect(reactor, cluster[1].address, b"right")
        reply = await request(connection, Message("status", watch=False))
        connection.close()
        self.assertEqual(reply.status["leader"], 1)

    async def test_badInputDoesNotHurtTheNode(self):
        """
        120 connections of garbage, oversize frames, frames before
        authentication, HTTP requests and invalid messages are each dropped;
        the node still answers status afterwards and the cluster keeps its
        leader.
        """
        cluster = startCluster(self, [1, 2])
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        host, port = cluster[1].address.split(":")
        rng = random.Random(4)
        inputs = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\xff\xff\xff\xff",
            struct.pack("!I", 5) + b"Cnull",
            struct.pack("!I", 3) + b"C{}",
            struct.pack("!I", 2) + b"X1",
        ]
        inputs.append(encode(Message("status", watch=False)))  # unframed
        frame = encode(Message("status", watch=False))
        inputs.append(struct.pack("!I", len(frame)) + frame)  # before hello
        while len(inputs) < 120:
            inputs.append(rng.randbytes(rng.randrange(1, 200)))

        def blast():
            # How each connection ended: "closed" when the node closed it
            # (or reset it), "open" if it still had not after the wait.
            endings = []
            for data in inputs:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    try:
                        while s.recv(4096):
                            pass
                        endings.append("closed")
                    except socket.timeout:
                        endings.append("open")
                    except ConnectionResetError:
                        endings.append("closed")
            return endings

        endings = await deferToThread(blast)
        self.assertEqual(endings, ["closed"] * len(inputs))
        connection = await connect(reactor, cluster[1].address, b"")
        reply = await request(connection, Message("status", watch=False))
        connection.close()
        self.assertEqual(reply.status["leader"], 1)
        self.assertTrue(agreed(cluster, 1))


class IndexTests(TestCase):
    """
    The leader's index and peer_files.log follow the files.
    """

    async def _listing(self, address):
        connection, reply = await askLeader(reactor, address, b"", Message("ls"))
        try:
            return await receiveListing(reactor, connection, reply, 10, address)
        finally:
            connection.close()

    async def test_logListsEveryLiveNodesFiles(self):
        """
        peer_files.log in the leader's state directory lists the leader's own
        files and each member's, with the right sizes and hashes, one JSON
        object a line; names that could break a line are escaped.
        """
        files = {
            1: {"own.txt": b"leader's own"},
            2: {"12241300.png": pngLike(30000), "a\nb.txt": b"newline"},
            3: {"c.bin": b"\x00" * 4096},
        }
        cluster = startCluster(self, [1, 2, 3], files=files)
        log = cluster[1].node.config.state.child("peer_files.log")

        def complete():
            if not log.exists():
                return None
            header, rows = parseLog(log.getContent())
            return (header, rows) if len(rows) == 4 else None

        header, rows = await waitFor(complete, "peer_files.log with 4 files")
        self.assertEqual((header["leader"], header["nodes"], header["files"]), (1, 3, 4))
        found = {(r["node"], r["name"]): (r["size"], r["sha256"]) for r in rows}
        for node, named in files.items():
            for name, data in named.items():
                self.assertEqual(found[(node, name)], (len(data), sha(data)))
        self.assertEqual([r["name"] for r in rows], sorted(r["name"] for r in rows))
        lines = log.getContent().decode("utf-8").split("\n")
        self.assertEqual(len([l for l in lines if l and not l.startswith("#")]), 4)

    async def test_lsFollowsChanges(self):
        """
        A file added, changed or removed on a follower shows in ls (asked of
        another follower) within the deadline.
        """
        cluster = startCluster(self, [1, 2, 3], files={2: {"x.txt": b"one"}})
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")

        async def check(predicate, what):
            async def files():
                return {f["name"]: f for f in await self._listing(cluster[3].address)}

            await waitForAsync(files, predicate, f"ls to show {what}")

        await check(lambda f: "x.txt" in f, "x.txt")
        cluster[3].share.child("new.txt").setContent(b"fresh")
        await check(lambda f: f.get("new.txt", {}).get("holders") == [3], "new.txt on node 3")
        cluster[2].share.child("x.txt").setContent(b"changed content")
        await check(lambda f: f["x.txt"]["sha256"] == sha(b"changed content"), "x.txt's new hash")
        cluster[2].share.child("x.txt").remove()
        await check(lambda f: "x.txt" not in f, "x.txt gone")

    async def test_deadNodesFilesLeaveTheIndex(self):
        """
        When the leader dies, the new leader's log lists the survivors' files
        and not the dead leader's.
        """
        files = {1: {"one.txt": b"1"}, 2: {"two.txt": b"2"}, 3: {"three.txt": b"3"}}
        cluster = startCluster(self, [1, 2, 3], files=files)
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        await cluster[1].stop()
        await waitFor(lambda: agreed(cluster, 2), "survivors to agree on leader 2")
        log = cluster[2].node.config.state.child("peer_files.log")

        def names():
            if not log.exists():
                return None
            header, rows = parseLog(log.getContent())
            got = sorted(r["name"] for r in rows)
            return got if header["leader"] == 2 and got == ["three.txt", "two.txt"] else None

        await waitFor(names, "node 2's log without node 1's files")


class TransferTests(TestCase):
    """
    Files travel through the leader, verified, byte for byte.
    """

    async def _get(self, cluster, via, name, into):
        sink = PartialFile(into, name)
        addresses = [cluster[via].address] + [c.address for n, c in sorted(cluster.items()) if n != via]
        return await download(reactor, name, sink, addresses, b"", deferToThread)

    async def test_originalCasesDoneRight(self):
        """
        The original system's failures: a PNG of about 3 MB, a text file,
        sizes that are multiples of 4096, a binary file and an empty file, on
        the leader and on followers, fetched via the leader and via a
        follower, all arrive byte-identical.
        """
        files = {
            1: {"leader.bin": os.urandom(8192 * 3)},
            2: {
                "12241300.png": pngLike(3_000_001),
                "story.txt": ("All work and no play.\n" * 400).encode(),
                "page.bin": os.urandom(4096 * 5),
            },
            3: {"empty": b"", "big.bin": os.urandom(300_000)},
        }
        cluster = startCluster(self, [1, 2, 3], files=files)
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 6, "the leader to index 6 files")
        out = FilePath(self.mktemp())
        out.makedirs()
        for node, named in files.items():
            for via in (1, 3):
                for name, data in named.items():
                    target = out.child(f"via{via}")
                    summary = await self._get(cluster, via, name, target)
                    self.assertEqual(target.child(name).getContent(), data, f"{name} via {via}")
                    self.assertEqual(summary["sha256"], sha(data))
                    self.assertEqual(summary["via"], [1, node])
                    self.assertFalse(target.child("." + name + ".part").exists())

    async def test_unknownAndBadNames(self):
        """
        An unknown name is 'not found'; traversal names are refused by the
        node itself; neither leaves a file behind.
        """
        cluster = startCluster(self, [1, 2], files={2: {"a.png": b"a"}, 1: {"aa.png": b"aa"}})
        await waitFor(lambda: agreed(cluster, 1), "nodes to agree on leader 1")
        out = FilePath(self.mktemp())
        with self.assertRaises(P2PError) as caught:
            await self._get(cluster, 2, "b.png", out)
        self.assertEqual(caught.exception.code, "not-found")
        self.assertFalse(out.child("b.png").exists())
        for name in ["../secret", "/etc/passwd", "a/../../x", ".hidden", "", "nul\0byte"]:
            connection = await connect(reactor, cluster[1].address, b"")
            with self.assertRaises(P2PError) as caught:
                await request(connection, Message("get", name=name, offset=0, sha256=None))
            self.assertEqual(caught.exception.code, "bad-name", name)
            # The connection is kept for the next request.
            reply = await request(connection, Message("status", watch=False))
            self.assertEqual(reply.type, "state")
            connection.close()

    async def test_offsetBeyondSizeIsRefused(self):
        """
        A request from beyond the end of the file is refused with a reason
        and the connection stays usable.
        """
        cluster = startCluster(self, [1], files={1: {"f": b"12345"}})
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 1, "the index")
        connection = await connect(reactor, cluster[1].address, b"")
        with self.assertRaises(P2PError) as caught:
            await request(connection, Message("get", name="f", offset=6, sha256=None))
        self.assertIn("beyond", str(caught.exception))
        reply = await request(connection, Message("status", watch=False))
        self.assertEqual(reply.type, "state")
        connection.close()

    async def test_resumeFromPart(self):
        """
        A .part left by an interrupted download is resumed: the result is
        identical and the summary says where it resumed from.
        """
        data = os.urandom(200_000)
        cluster = startCluster(self, [1, 2], files={2: {"r.bin": data}})
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 1, "the index")
        out = FilePath(self.mktemp())
        out.makedirs()
        out.child(".r.bin.part").setContent(data[:70_000])
        summary = await self._get(cluster, 1, "r.bin", out)
        self.assertEqual(summary["resumed_from"], 70_000)
        self.assertEqual(out.child("r.bin").getContent(), data)

    async def test_concurrentGets(self):
        """
        Eight gets of different files at once all complete, identical.
        """
        files = {2: {f"f{i}.bin": os.urandom(150_000 + i) for i in range(4)}, 3: {f"g{i}.bin": os.urandom(90_000 + i) for i in range(4)}}
        cluster = startCluster(self, [1, 2, 3], files=files)
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 8, "the index of 8 files")
        out = FilePath(self.mktemp())
        out.makedirs()
        names = {name: data for named in files.values() for name, data in named.items()}
        await gatherResults(
            [Deferred.fromCoroutine(self._get(cluster, 1, name, out)) for name in names]
        )
        for name, data in names.items():
            self.assertEqual(out.child(name).getContent(), data)

    async def test_fetchIntoShare(self):
        """
        fetch makes a node get a file into its share through the leader; the
        index then lists that node as a holder; asking again says it is
        already there; other content under the same name is refused unless
        overwrite is asked for.
        """
        data = pngLike(100_000)
        cluster = startCluster(self, [1, 2, 3], files={2: {"p.png": data}, 3: {"q.png": b"mine"}})
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 2, "the index")
        connection = await connect(reactor, cluster[3].address, b"")
        reply = await fetchInto(reactor, connection, "p.png", False, 30.0)
        self.assertEqual((reply.type, reply.already, reply.sha256), ("fetched", False, sha(data)))
        self.assertEqual(cluster[3].share.child("p.png").getContent(), data)
        reply = await fetchInto(reactor, connection, "p.png", False, 30.0)
        self.assertTrue(reply.already)
        connection.close()
        await waitFor(
            lambda: [h[0] for h in cluster[1].node.keeper.index.holders("p.png")] == [2, 3],
            "node 3 listed as a holder",
        )
        # Node 2's q.png, the lowest id's copy, names the content; node 3's
        # differs.
        cluster[2].share.child("q.png").setContent(b"theirs")
        await waitFor(lambda: len(cluster[1].node.keeper.index.holders("q.png")) == 2, "both q.png")
        connection = await connect(reactor, cluster[3].address, b"")
        with self.assertRaises(P2PError) as caught:
            await fetchInto(reactor, connection, "q.png", False, 30.0)
        self.assertIn("--overwrite", str(caught.exception))
        self.assertEqual(cluster[3].share.child("q.png").getContent(), b"mine")
        reply = await fetchInto(reactor, connection, "q.png", True, 30.0)
        self.assertEqual(reply.sha256, sha(b"theirs"))
        connection.close()
        self.assertEqual(cluster[3].share.child("q.png").getContent(), b"theirs")
