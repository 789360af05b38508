"""
Clusters of real C{twistd -n p2pfiles --coordinator etcd://...} processes
against a real etcd: who leads after kills, stops, restarts and etcd's own
outages, and a duplicate id refused at start.  Also a file fetched through
an etcd-coordinated cluster of in-process nodes.

Each node's status is watched from this process (the C{status --watch}
request, over the real client code), and every change is stamped with
C{time.monotonic()} as it arrives: times are measured from the signal to the
last node's report.  They are compared with the limits the design gives,
plus L{SLACK} for a loaded two-core machine; the figures themselves belong
to C{bench/failover.py --coordinator etcd}.
"""

import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from p2pfiles.client import connect, request
from p2pfiles.demo import freePorts
from p2pfiles.errors import P2PError
from p2pfiles.partfile import PartialFile
from p2pfiles.transfer import download
from p2pfiles.wire import Message
from tests.etcdserver import SKIP_REASON, EtcdCluster, etcdPath, startEtcd
from tests.support import DEADLINE, NodeProcess, startCluster, waitFor

# The nodes' lease TTL, seconds (the default).
TTL = 2.0

# Added to every time limit: the machine running the tests may be loaded.
SLACK = 1.0


class StatusWatch:
    """
    C{status --watch} on one node: every status it reports, stamped with
    C{time.monotonic()} on arrival, until the connection ends.
    """

    def __init__(self, node: int, address: str) -> None:
        self.node = node
        self.address = address
        self.reports: List[Tuple[float, Dict[str, Any]]] = []
        self.connection: Any = None
        self.done: Optional[Deferred] = None
        self.ended: Optional[float] = None

    async def start(self) -> None:
        self.connection = await connect(reactor, self.address, b"", 10.0)
        reply = await request(self.connection, Message("status", watch=True))
        self.reports.append((time.monotonic(), reply.status))
        self.done = Deferred.fromCoroutine(self._follow())

    async def _follow(self) -> None:
        try:
            while True:
                reply = await self.connection.receive()
                self.reports.append((time.monotonic(), reply.status))
        except P2PError:
            # The node went away, or the test closed the watch.
            self.ended = time.monotonic()

    @property
    def latest(self) -> Dict[str, Any]:
        return self.reports[-1][1]

    def firstSince(self, since: float, condition: Callable[[Dict[str, Any]], bool]) -> Optional[float]:
        """
        When the first report at or after C{since} that satisfies
        C{condition} arrived, or L{None}.
        """
        for arrived, status in self.reports:
            if arrived >= since and condition(status):
                return arrived
        return None

    def since(self, since: float) -> List[Dict[str, Any]]:
        return [status for arrived, status in self.reports if arrived >= since]

    def close(self) -> Deferred:
        if self.connection is not None:
            self.connection.close()
        return self.done if self.done is not None else Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


def leads(leader: Optional[int], after: int = 0) -> Callable[[Dict[str, Any]], bool]:
    """
    A status condition: C{leader} leads, in an epoch above C{after}.
    """
    return lambda status: status["leader"] == leader and status["epoch"] > after


class EtcdProcessCase(TestCase):
    """
    A real etcd and C{twistd} nodes coordinated by it, all stopped in the
    cleanup.
    """

    if etcdPath() is None:
        skip = SKIP_REASON

    etcd: EtcdCluster

    def setUp(self) -> None:
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.nodes: Dict[int, NodeProcess] = {}
        self.watches: List[StatusWatch] = []

    def startEtcd(self, size: int = 1) -> EtcdCluster:
        self.etcd = startEtcd(self, size, fast=size > 1)
        return self.etcd

    def nodeProcess(self, node: int, endpoints: Sequence[str], where: Optional[FilePath] = None) -> NodeProcess:
        """
        Node C{node} on a free port, knowing no peer: etcd tells it the
        members.  Started, and stopped in the cleanup.
        """
        (port,) = freePorts(1)
        extra = ["--coordinator", "etcd://" + ",".join(endpoints), "--lease-ttl", f"{TTL:g}"]
        process = NodeProcess(where or self.base, node, port, {}, extra)
        self.addCleanup(process.stop)
        process.start()
        return process

    def startNodes(self, ids: Sequence[int], endpoints: Optional[Sequence[str]] = None) -> Dict[int, NodeProcess]:
        for node in ids:
            self.nodes[node] = self.nodeProcess(node, endpoints or self.etcd.endpoints)
        return self.nodes

    async def watch(self, *ids: int) -> Dict[int, StatusWatch]:
        """
        Watch the status of C{ids} (every node if none), once each answers.
        """
        watches = {}
        for node in ids or sorted(self.nodes):
            watch = StatusWatch(node, self.nodes[node].address)
            deadline = time.monotonic() + DEADLINE
            while True:
                try:
                    await watch.start()
                    break
                except P2PError:
                    if time.monotonic() > deadline:
                        raise
                    await deferLater(reactor, 0.1)
            self.addCleanup(watch.close)
            self.watches.append(watch)
            watches[node] = watch
        return watches

    async def agreed(self, watches: Dict[int, StatusWatch], leader: Optional[int], after: int = 0, what: str = "") -> int:
        """
        Wait until every watched node reports C{leader} (in an epoch above
        C{after}), all in one epoch, and sees exactly the watched nodes
        alive; return the epoch.
        """

        def agreement() -> Optional[int]:
            statuses = [w.latest for w in watches.values()]
            epochs = {s["epoch"] for s in statuses}
            if len(epochs) == 1 and all(leads(leader, after)(s) for s in statuses):
                if all({m["id"] for m in s["members"] if m["alive"]} == set(watches) for s in statuses):
                    return epochs.pop()
            return None

        return await waitFor(agreement, what or f"every node to report leader {leader}")

    async def reportedBy(
        self, watches: Dict[int, StatusWatch], since: float, condition: Callable[[Dict[str, Any]], bool], what: str
    ) -> float:
        """
        Wait until every watch has reported a status satisfying C{condition}
        since C{since}; return the seconds from C{since} to the last of
        those reports.
        """
        seen: Dict[int, float] = {}

        def all_() -> bool:
            for node, watch in watches.items():
                if node not in seen:
                    arrived = watch.firstSince(since, condition)
                    if arrived is not None:
                        seen[node] = arrived
            return len(seen) == len(watches)

        await waitFor(all_, what)
        return max(seen.values()) - since

    def assertAtMostOneLeader(self) -> None:
        """
        Over every report of every watch so far, no two nodes said they led
        at the same moment (a node's word counts until its watch ends).
        """
        timeline = [(arrived, watch.node, status["role"]) for watch in self.watches for arrived, status in watch.reports]
        timeline += [(watch.ended, watch.node, "gone") for watch in self.watches if watch.ended is not None]
        timeline.sort()
        leading: Dict[int, bool] = {}
        for arrived, node, role in timeline:
            leading[node] = role == "leader"
            self.assertLessEqual(sum(leading.values()), 1, f"two leaders at {arrived}: {leading}")


class LeadershipTests(EtcdProcessCase):
    """
    Three nodes, one etcd: the smallest live id leads, and the next one
    takes over as fast as the way its predecessor left allows.
    """

    async def test_smallestLeads(self) -> None:
        """
        Three nodes started with etcd and no peers agree that node 1, the
        smallest id, leads; each status names the etcd coordinator and
        lists all three members alive.
        """
        self.startEtcd()
        self.startNodes([1, 2, 3])
        watches = await self.watch()
        await self.agreed(watches, 1)
        for watch in watches.values():
            self.assertEqual(watch.latest["coordinator"], "etcd")
            self.assertEqual([m["id"] for m in watch.latest["members"]], [1, 2, 3])
        self.assertEqual([w.latest["role"] for w in watches.values()], ["leader", "follower", "follower"])

    async def test_killedLeaderReplacedThenReturns(self) -> None:
        """
        SIGKILL of the leader: its lease lapses, and both survivors report
        node 2 leading within the TTL plus one second (plus slack).  Node 1
        started again leads again, in a higher epoch; at no moment did two
        nodes say they led.
        """
        self.startEtcd()
        self.startNodes([1, 2, 3])
        watches = await self.watch()
        first = await self.agreed(watches, 1)
        killed = time.monotonic()
        self.nodes[1].kill()
        survivors = {n: watches[n] for n in (2, 3)}
        seconds = await self.reportedBy(survivors, killed, leads(2, first), "node 2 to lead after the kill")
        self.assertLess(seconds, TTL + 1.0 + SLACK)
        second = await self.agreed(survivors, 2, first)
        self.nodes[1].start()
        watches.update(await self.watch(1))
        third = await self.agreed(watches, 1, second, "node 1 to lead again")
        self.assertGreater(third, second)
        self.assertAtMostOneLeader()

    async def test_stoppedLeaderReplacedAtOnce(self) -> None:
        """
        SIGTERM of the leader: it revokes its lease as it stops, and both
        survivors report node 2 leading within half a second (plus slack,
        still well under the TTL a lapse would take).
        """
        self.startEtcd()
        self.startNodes([1, 2, 3])
        watches = await self.watch()
        first = await self.agreed(watches, 1)
        stopped = time.monotonic()
        self.nodes[1].signal(signal.SIGTERM)
        survivors = {n: watches[n] for n in (2, 3)}
        seconds = await self.reportedBy(survivors, stopped, leads(2, first), "node 2 to lead after SIGTERM")
        self.assertLess(seconds, 0.5 + SLACK)
        self.assertLess(0.5 + SLACK, TTL)
        await deferToThread(self.nodes[1].process.wait, DEADLINE)
        self.assertEqual(self.nodes[1].process.returncode, -signal.SIGTERM)
        self.assertAtMostOneLeader()

    async def test_etcdPaused(self) -> None:
        """
        etcd stopped (SIGSTOP): within the TTL every node reports no leader,
        and while etcd stays stopped none says it leads.  etcd resumed
        (SIGCONT): the nodes agree on one leader again.
        """
        self.startEtcd()
        self.startNodes([1, 2, 3])
        watches = await self.watch()
        await self.agreed(watches, 1)
        paused = time.monotonic()
        self.etcd.pause()
        seconds = await self.reportedBy(
            watches, paused, lambda s: s["leader"] is None and s["role"] != "leader", "every node to report no leader"
        )
        self.assertLess(seconds, TTL + SLACK)
        # Keep etcd stopped for a whole TTL more: nobody claims meanwhile.
        await deferLater(reactor, TTL)
        for watch in watches.values():
            noLeader = watch.firstSince(paused, lambda s: s["leader"] is None)
            assert noLeader is not None
            self.assertEqual(
                [(s["leader"], s["role"]) for s in watch.since(noLeader) if (s["leader"], s["role"]) != (None, "candidate")],
                [],
                f"node {watch.node} while etcd is stopped",
            )
        self.etcd.resume()

        def oneLeader() -> Optional[int]:
            views = {(w.latest["leader"], w.latest["epoch"]) for w in watches.values()}
            return views.pop()[0] if len(views) == 1 else None

        self.assertEqual(await waitFor(oneLeader, "one leader again after SIGCONT"), 1)
        self.assertAtMostOneLeader()

    async def test_duplicateIdRefused(self) -> None:
        """
        A second node with an id already registered in etcd (at another
        address) exits with status 1 after one line saying so, and no
        traceback; the cluster does not notice.
        """
        self.startEtcd()
        self.startNodes([1, 2])
        watches = await self.watch()
        epoch = await self.agreed(watches, 1)
        where = self.base.child("duplicate")
        where.makedirs()
        started = time.monotonic()
        duplicate = self.nodeProcess(2, self.etcd.endpoints, where)
        code = await deferToThread(duplicate.process.wait, DEADLINE)
        self.assertEqual(code, 1)
        log = duplicate.dir.child("twistd.log").getContent().decode("utf-8")
        lines = [line for line in log.splitlines() if "already registered" in line]
        self.assertEqual(len(lines), 1, log)
        self.assertIn("node 2 cannot start: node id 2 is already registered in etcd by 127.0.0.1:", lines[0])
        self.assertIn("#critical]", lines[0])
        self.assertNotIn("Traceback", log)
        for watch in watches.values():
            self.assertEqual(watch.since(started), [], f"node {watch.node} reported a change")
            self.assertEqual((watch.latest["leader"], watch.latest["epoch"]), (1, epoch))

    async def test_unreachableEtcdRefused(self) -> None:
        """
        A node whose etcd does not answer at start exits with status 1
        after one line saying so, and no traceback.
        """
        (nobody,) = freePorts(1)
        node = self.nodeProcess(1, [f"127.0.0.1:{nobody}"])
        code = await deferToThread(node.process.wait, DEADLINE)
        self.assertEqual(code, 1)
        log = node.dir.child("twistd.log").getContent().decode("utf-8")
        lines = [line for line in log.splitlines() if "cannot start" in line]
        self.assertEqual(len(lines), 1, log)
        self.assertIn(f"no etcd endpoint answered /v3/lease/grant (127.0.0.1:{nobody}", lines[0])
        self.assertNotIn("Traceback", log)


class EtcdClusterTests(EtcdProcessCase):
    """
    Three nodes on a cluster of three etcd members.
    """

    async def test_etcdMemberKilled(self) -> None:
        """
        Killing the etcd member every node talks to first (not etcd's raft
        leader) changes nothing the nodes report: they fail over to the
        other members, and node 1 keeps leading in the same epoch.
        """
        etcd = self.startEtcd(3)
        raftLeader = await waitFor(etcd.raftLeader, "etcd to elect a raft leader")
        victim = next(m for m in etcd.members if m is not raftLeader)
        endpoints = [victim.address] + [m.address for m in etcd.members if m is not victim]
        self.startNodes([1, 2, 3], endpoints)
        watches = await self.watch()
        epoch = await self.agreed(watches, 1)
        killed = time.monotonic()
        victim.kill()
        # Keepalives come every TTL/3: several rounds of them must fail over.
        await deferLater(reactor, 3 * TTL)
        for watch in watches.values():
            self.assertEqual(watch.since(killed), [], f"node {watch.node} reported a change")
            self.assertEqual((watch.latest["leader"], watch.latest["epoch"]), (1, epoch))


class InProcessTests(TestCase):
    """
    Nodes in this process, coordinated by a real etcd: the index and the
    transfers work as with the built-in election.
    """

    if etcdPath() is None:
        skip = SKIP_REASON

    async def test_getThroughEtcdCluster(self) -> None:
        """
        Three nodes that know each other only through etcd agree on node 1,
        gather every node's files, and a file held by node 3 is fetched
        through the leader, byte for byte.
        """
        etcd = startEtcd(self)
        files = {1: {"one.txt": b"1"}, 2: {"two.txt": b"2" * 5000}, 3: {"three.bin": os.urandom(200_000)}}
        cluster = startCluster(self, [1, 2, 3], files=files, etcd=etcd.endpoints)

        def agreed() -> bool:
            views = {(c.node.coordinator.leader(), c.node.coordinator.epoch()) for c in cluster.values()}
            return len(views) == 1 and views.pop()[0] == 1 and all(len(c.node.coordinator.members()) == 3 for c in cluster.values())

        await waitFor(agreed, "the nodes to agree on node 1 through etcd")
        self.assertEqual([c.node.config.peers for c in cluster.values()], [{}, {}, {}])
        await waitFor(lambda: cluster[1].node.keeper.index.fileCount() == 3, "the leader to index 3 files")
        target = FilePath(self.mktemp())
        target.makedirs()
        sink = PartialFile(target, "three.bin")
        summary = await download(reactor, "three.bin", sink, [cluster[2].address], b"", deferToThread)
        self.assertEqual(target.child("three.bin").getContent(), files[3]["three.bin"])
        self.assertEqual(summary["via"], [1, 3])
        self.assertEqual(cluster[2].node.status()["coordinator"], "etcd")
