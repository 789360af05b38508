"""
Tests for L{p2pfiles.election}: who leads, in which epoch, after every start
order, failure, suspension, split and rejoin.

The election is a pure decision object, so whole clusters run here in memory:
L{FakeCluster} wires several L{ElectionState}s together the way
L{p2pfiles.node.Node} does, with fake links and one L{Clock}.
"""

import random
from collections import deque
from itertools import combinations
from typing import Any, Deque, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet.task import Clock, LoopingCall
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.election import CANDIDATE, FOLLOWER, LEADER, Claimed, ElectionState, Stale

HEARTBEAT = 0.25
LEADER_TIMEOUT = 1.0


class FakeCluster:
    """
    Nodes as L{p2pfiles.node.Node} drives them, minus the sockets.

    Every C{HEARTBEAT} seconds a running node ticks its election (calling
    C{resumed()} first when the tick is late, as a suspended process's is) and
    sends a heartbeat to every member it has a link to.  A link is up while
    both ends run and it is not cut; coming up it tells both elections and
    sends a heartbeat each way; going down it tells the survivors.  Messages
    travel in order after C{latency} seconds and die with their link.  A hung
    node keeps its links but runs nothing: what reaches it waits until it is
    resumed.  A killed node's epoch is kept for its restart, as on disk.
    """

    def __init__(self, ids: Iterable[int], latency: float = 0.0, startGrace: Optional[float] = None) -> None:
        self.clock = Clock()
        self.startGrace = startGrace
        self.ids = sorted(ids)
        self.latency = latency
        self.nodes: Dict[int, ElectionState] = {}  # started and not killed
        self.inbox: Dict[int, List[Tuple[Any, ...]]] = {}  # hung -> what waits
        self.saved = dict.fromkeys(self.ids, 0)
        self.cuts: Set[FrozenSet[int]] = set()
        self.links: Dict[FrozenSet[int], int] = {}  # up -> generation
        self.generation = 0
        self.queue: Deque[Tuple[Any, ...]] = deque()
        self.pumping = False
        self.loops: Dict[int, LoopingCall] = {}
        self.lastTick: Dict[int, Optional[float]] = {}
        self.claims: List[Tuple[float, int, int]] = []  # (when, who, epoch)
        self.stales: List[Tuple[int, Stale]] = []  # (sender, notice)
        self.changes: Dict[int, List[Tuple[Any, ...]]] = {i: [] for i in self.ids}
        self.ticks: List[Tuple[Any, ...]] = []  # (when, who, role, leader, epoch)
        self.failures: List[Failure] = []  # raised inside a heartbeat timer

    # What the tests do.

    def start(self, n: int) -> None:
        peers = [m for m in self.ids if m != n]
        self.nodes[n] = ElectionState(
            n, self.clock, LEADER_TIMEOUT, epoch=self.saved[n], knownPeers=peers, startGrace=self.startGrace
        )
        self.lastTick[n] = None
        self._apply(n, [])
        self.loops[n] = loop = LoopingCall(self._timer, n)
        loop.clock = self.clock
        loop.start(HEARTBEAT, now=True).addErrback(self.failures.append)
        self._update()

    def kill(self, n: int) -> None:
        self.loops.pop(n).stop()
        del self.nodes[n]
        self.inbox.pop(n, None)
        self._update()

    def hang(self, n: int) -> None:
        self.inbox[n] = []

    def resume(self, n: int) -> None:
        waiting = self.inbox.pop(n)
        self._tick(n)  # the reactor runs late timers before reading sockets
        for event in waiting:
            self._deliver(n, event)
        self._update()

    def cut(self, a: int, b: int) -> None:
        self.cuts.add(frozenset((a, b)))
        self._update()

    def heal(self, a: int, b: int) -> None:
        self.cuts.discard(frozenset((a, b)))
        self._update()

    def healAll(self) -> None:
        self.cuts.clear()
        self._update()

    def run(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(min(due) - self.clock.seconds())
        self.clock.advance(end - self.clock.seconds())

    def views(self) -> Dict[int, Tuple[str, Optional[int], int]]:
        return {n: (e.role, e.leader, e.epoch) for n, e in self.nodes.items()}

    # What the nodes do.

    def _timer(self, n: int) -> None:
        self._tick(n)
        self._pump()

    def _tick(self, n: int) -> None:
        if n in self.inbox:
            return
        e, now, last = self.nodes[n], self.clock.seconds(), self.lastTick[n]
        if last is not None and now - last > LEADER_TIMEOUT + HEARTBEAT:
            self._apply(n, e.resumed())
        self.lastTick[n] = now
        self._apply(n, e.tick())
        self.ticks.append((now, n, e.role, e.leader, e.epoch))
        self._broadcast(n)

    def _apply(self, n: int, actions: List[object]) -> None:
        e = self.nodes[n]
        self.saved[n] = max(self.saved[n], e.epoch)
        for action in actions:
            if isinstance(action, Stale):
                self.stales.append((n, action))
                self._send(n, action.to, ("stale", n, action.epoch, action.leader))
            elif isinstance(action, Claimed):
                self.claims.append((self.clock.seconds(), n, action.epoch))
                self._broadcast(n)
            else:
                raise AssertionError(f"unexpected action {action!r}")
        state = (e.role, e.leader, e.epoch)
        if not self.changes[n] or self.changes[n][-1][1:] != state:
            self.changes[n].append((self.clock.seconds(),) + state)

    def _heartbeat(self, n: int) -> Tuple[Any, ...]:
        return ("heartbeat", n, self.nodes[n].epoch, self.nodes[n].leader)

    def _broadcast(self, n: int) -> None:
        for m in self.ids:
            self._send(n, m, self._heartbeat(n))

    def _send(self, src: int, dst: int, event: Tuple[Any, ...]) -> None:
        link = frozenset((src, dst))
        if link not in self.links:
            return
        if self.latency:
            self.clock.callLater(self.latency, self._arrive, dst, link, self.links[link], event)
        else:
            self.queue.append((dst, link, self.links[link], event))

    def _arrive(self, dst: int, link: FrozenSet[int], generation: int, event: Tuple[Any, ...]) -> None:
        if self.links.get(link) == generation:
            self._deliver(dst, event)

    def _deliver(self, n: int, event: Tuple[Any, ...]) -> None:
        if n not in self.nodes:
            return
        if n in self.inbox:
            self.inbox[n].append(event)
            return
        kind, peer, *rest = event
        e = self.nodes[n]
        if kind == "heartbeat":
            self._apply(n, e.heartbeatReceived(peer, *rest))
        elif kind == "stale":
            self._apply(n, e.staleReceived(peer, *rest))
        else:
            self._apply(n, e.memberDown(peer))

    def _pump(self) -> None:
        if self.pumping:
            return
        self.pumping = True
        try:
            while self.queue:
                self._arrive(*self.queue.popleft())
        finally:
            self.pumping = False

    def _update(self) -> None:
        gone = [p for p in self.links if p in self.cuts or not all(n in self.nodes for n in p)]
        for link in gone:
            del self.links[link]
        for a, b in (sorted(p) for p in gone):
            self._deliver(a, ("down", b))
            self._deliver(b, ("down", a))
        running = [n for n in self.ids if n in self.nodes and n not in self.inbox]
        for a, b in combinations(running, 2):
            link = frozenset((a, b))
            if link in self.links or link in self.cuts:
                continue
            self.generation += 1
            self.links[link] = self.generation
            self._apply(a, self.nodes[a].memberUp(b))
            self._apply(b, self.nodes[b].memberUp(a))
            self._send(a, b, self._heartbeat(a))
            self._send(b, a, self._heartbeat(b))
        self._pump()


class ElectionTestsMixin:
    """
    Checks shared by the cluster tests.
    """

    def assertLeads(self, cluster: FakeCluster, leader: int, besides: Iterable[int] = ()) -> int:
        """
        Every live node (but those C{besides}) follows C{leader}, which leads,
        in one epoch; return that epoch.
        """
        self.assertEqual(cluster.failures, [])
        views = {n: v for n, v in cluster.views().items() if n not in besides}
        expected = {n: (LEADER if n == leader else FOLLOWER, leader) for n in views}
        self.assertEqual({n: v[:2] for n, v in views.items()}, expected, views)
        epochs = {v[2] for v in views.values()}
        self.assertEqual(len(epochs), 1, views)
        return epochs.pop()

    def assertEpochsIncrease(self, cluster: FakeCluster) -> None:
        """
        Every claim in the cluster's history had a new, higher epoch.
        """
        epochs = [epoch for (when, who, epoch) in cluster.claims]
        self.assertEqual(epochs, sorted(set(epochs)), cluster.claims)

    def assertSteady(self, cluster: FakeCluster, seconds: float) -> None:
        """
        For C{seconds}, nobody claims and every tick reports the same leader
        and epoch.
        """
        since, claims = cluster.clock.seconds(), len(cluster.claims)
        cluster.run(seconds)
        seen = {(leader, epoch) for (when, who, role, leader, epoch) in cluster.ticks if when > since}
        self.assertEqual(len(seen), 1, seen)
        self.assertEqual(cluster.claims[claims:], [])


def startedCluster(ids: Iterable[int] = (1, 2, 3)) -> FakeCluster:
    """
    A cluster whose nodes all started at once and settled.
    """
    cluster = FakeCluster(ids)
    for n in cluster.ids:
        cluster.start(n)
    cluster.run(2)
    return cluster


class StartTests(ElectionTestsMixin, SynchronousTestCase):
    """
    Whatever the start order, the smallest id leads and all agree.
    """

    def startAt(self, times: Dict[int, float], startGrace: Optional[float] = None) -> FakeCluster:
        cluster = FakeCluster(times, startGrace=startGrace)
        for n, when in times.items():
            cluster.clock.callLater(when, cluster.start, n)
        cluster.run(max(times.values()) + 2)
        return cluster

    def test_inOrder(self) -> None:
        """
        Nodes 1, 2, 3 started one after the other at once: node 1 leads epoch
        1, the first and only claim.
        """
        cluster = FakeCluster([1, 2, 3])
        for n in (1, 2, 3):
            cluster.start(n)
        self.assertEqual(self.assertLeads(cluster, 1), 1)
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(1, 1)])
        self.assertSteady(cluster, 5)

    def test_reversed(self) -> None:
        """
        Nodes 3, 2, 1 started in that order: node 1 leads epoch 1 once it has
        heard from both; nobody else claimed first.
        """
        cluster = FakeCluster([1, 2, 3])
        for n in (3, 2, 1):
            cluster.start(n)
        self.assertEqual(self.assertLeads(cluster, 1), 1)
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(1, 1)])
        self.assertSteady(cluster, 5)

    def test_staggered(self) -> None:
        """
        Starts spread over less than the leader timeout, in either order,
        still end with node 1 leading one epoch.
        """
        for times in ({1: 0.0, 2: 0.3, 3: 0.7}, {3: 0.0, 2: 0.3, 1: 0.7}):
            cluster = self.startAt(times)
            self.assertLeads(cluster, 1)
            self.assertEpochsIncrease(cluster)
            self.assertSteady(cluster, 5)

    def test_smallestLate(self) -> None:
        """
        Node 1 starting 5 s after the others: node 2 leads meanwhile, then
        node 1 takes over with a higher epoch and everyone follows it.
        """
        cluster = self.startAt({1: 5.0, 2: 0.0, 3: 0.0})
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(2, 1), (1, 2)])
        self.assertEqual(self.assertLeads(cluster, 1), 2)
        self.assertSteady(cluster, 5)

    def test_slowStartersWithinTheGrace(self) -> None:
        """
        Ten nodes started together, the four smallest taking 3 s to come up
        (longer than the leader timeout, within a 5 s start grace): nobody
        claims before node 1, which leads the one and only epoch.  Without
        the grace the first ones up lead in turn.
        """
        times = {n: (3.0 if n <= 4 else 0.0) for n in range(1, 11)}
        cluster = self.startAt(times, startGrace=5.0)
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(1, 1)])
        self.assertEqual(self.assertLeads(cluster, 1), 1)
        self.assertSteady(cluster, 5)
        hasty = self.startAt(times)
        self.assertEqual(hasty.claims[0][1:], (5, 1))
        self.assertEqual(self.assertLeads(hasty, 1), 2)

    def test_graceEndsWithoutADeadPeer(self) -> None:
        """
        A configured peer that never starts delays the first claim by the
        start grace, no longer: node 2 leads once 5 s have passed.
        """
        cluster = FakeCluster([1, 2, 3], startGrace=5.0)
        for n in (2, 3):
            cluster.start(n)
        cluster.run(4.5)
        self.assertEqual(cluster.claims, [])
        self.assertEqual(cluster.nodes[2].unheard(), [1])
        cluster.run(1.0)
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(2, 1)])
        self.assertEqual(self.assertLeads(cluster, 2), 1)

    def test_graceNeverShorterThanTheLeaderTimeout(self) -> None:
        """
        A start grace below the leader timeout counts as the leader timeout.
        """
        self.assertEqual(ElectionState(1, Clock(), LEADER_TIMEOUT, startGrace=0.1).startGrace, LEADER_TIMEOUT)
        self.assertEqual(ElectionState(1, Clock(), LEADER_TIMEOUT).startGrace, LEADER_TIMEOUT)

    def test_largestLate(self) -> None:
        """
        Node 3 starting 5 s after the others just follows node 1.
        """
        cluster = self.startAt({1: 0.0, 2: 0.0, 3: 5.0})
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims], [(1, 1)])
        self.assertEqual(self.assertLeads(cluster, 1), 1)

    def test_nodeZero(self) -> None:
        """
        Node id 0 is a leader like any other: it leads and stays leader, is
        replaced when it leaves or falls silent, and takes over again when it
        returns.
        """
        cluster = startedCluster([0, 1, 2])
        self.assertEqual(self.assertLeads(cluster, 0), 1)
        self.assertSteady(cluster, 5)
        cluster.kill(0)
        self.assertEqual(self.assertLeads(cluster, 1), 2)
        cluster.start(0)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 0), 3)
        self.assertSteady(cluster, 5)
        cluster.hang(0)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 1, besides=[0]), 4)
        cluster.resume(0)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 0), 5)
        self.assertEpochsIncrease(cluster)

    def test_single(self) -> None:
        """
        A node with no peers is ready at once and leads epoch 1 as it starts,
        without any time passing.
        """
        cluster = FakeCluster([7])
        cluster.start(7)
        self.assertEqual(cluster.views(), {7: (LEADER, 7, 1)})
        self.assertEqual(cluster.claims, [(0.0, 7, 1)])

    def test_manyNodes(self) -> None:
        """
        32 nodes started in random orders within 1 s converge on node 0 and
        one epoch within 3 s of the last start, and stay there.
        """
        for seed in range(3):
            rng = random.Random(seed)
            ids = list(range(32))
            rng.shuffle(ids)
            times = {n: rng.uniform(0, 1) for n in ids}
            cluster = FakeCluster(ids)
            for n in ids:
                cluster.clock.callLater(times[n], cluster.start, n)
            cluster.run(max(times.values()) + 3)
            self.assertLeads(cluster, 0)
            self.assertEpochsIncrease(cluster)
            self.assertSteady(cluster, 2)


class FailoverTests(ElectionTestsMixin, SynchronousTestCase):
    """
    The leader goes away, comes back, or is cut off.
    """

    def test_leaderDisconnects(self) -> None:
        """
        When the leader's links close, node 2 claims epoch 2 on that very
        event, and node 3 follows it, with no time passing.
        """
        cluster = startedCluster()
        self.assertEqual(self.assertLeads(cluster, 1), 1)
        now = cluster.clock.seconds()
        cluster.kill(1)
        self.assertEqual(self.assertLeads(cluster, 2), 2)
        self.assertEqual(cluster.claims[-1], (now, 2, 2))
        self.assertEpochsIncrease(cluster)

    def test_leaderSilent(self) -> None:
        """
        A leader that hangs with its links up is dropped after the leader
        timeout: node 2 claims epoch 2 between 1.0 and 1.5 s later.
        """
        cluster = startedCluster()
        hungAt = cluster.clock.seconds()
        cluster.hang(1)
        cluster.run(0.95)
        self.assertEqual(len(cluster.claims), 1)
        cluster.run(1)
        self.assertEqual(self.assertLeads(cluster, 2, besides=[1]), 2)
        when, who, epoch = cluster.claims[-1]
        self.assertTrue(1.0 <= when - hungAt <= 1.5, when - hungAt)
        self.assertEpochsIncrease(cluster)

    def test_rejoin(self) -> None:
        """
        Node 1 restarting with its old epoch while node 2 leads first follows
        node 2 and learns its epoch, then claims once with a higher one; then
        nothing changes for 10 s.
        """
        cluster = startedCluster()
        cluster.kill(1)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 2), 2)
        self.assertEqual(cluster.saved[1], 1)
        before = len(cluster.claims)
        cluster.start(1)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 1), 3)
        self.assertEqual([(who, epoch) for (when, who, epoch) in cluster.claims[before:]], [(1, 3)])
        restarted = [c[1:] for c in cluster.changes[1][-3:]]
        self.assertEqual(restarted, [(CANDIDATE, None, 1), (FOLLOWER, 2, 2), (LEADER, 1, 3)])
        self.assertSteady(cluster, 10)
        self.assertEpochsIncrease(cluster)

    def test_resumedLeader(self) -> None:
        """
        An old leader resumed after a suspension claims its old epoch; that
        is refused with a stale notice and logged, the old leader learns the
        current epoch, then takes over with a higher one and keeps it.
        """
        cluster = startedCluster()
        cluster.hang(1)
        cluster.run(3)
        self.assertEqual(cluster.views()[2], (LEADER, 2, 2))
        self.assertEqual(cluster.views()[1], (LEADER, 1, 1))
        with capturedLogs() as events:
            cluster.resume(1)
            cluster.run(2)
        self.assertIn((2, Stale(1, 2, 2)), cluster.stales)
        self.assertIn("rejected message from 1: stale epoch 1 < 2", [formatEvent(e) for e in events])
        # It may learn and take over within one message, so read its log.
        own = [formatEvent(e) for e in events if e.get("log_source") is cluster.nodes[1]]
        self.assertEqual(own[:1], ["following 2 in epoch 2"])
        self.assertEqual([line for line in own if "leads" in line], ["node 1 leads epoch 3 (members 1, 2, 3)"])
        self.assertEqual(self.assertLeads(cluster, 1), 3)
        self.assertSteady(cluster, 10)
        self.assertEpochsIncrease(cluster)

    def test_resumedWaitsOnlyTheLeaderTimeout(self) -> None:
        """
        After a suspension a node waits the leader timeout to hear from
        its peers again, not the start grace: the grace is for starting.
        """
        clock = Clock()
        state = ElectionState(2, clock, LEADER_TIMEOUT, knownPeers=[1], startGrace=30.0)
        clock.advance(31)
        self.assertTrue(state.isReady())
        state.resumed()
        self.assertFalse(state.isReady())
        clock.advance(LEADER_TIMEOUT)
        self.assertTrue(state.isReady())

    def test_resumedDuringTheStartGrace(self) -> None:
        """
        A start slow enough to look like a suspension does not cut the
        start grace short: the node still waits for the grace to end (or
        to hear from everyone).
        """
        clock = Clock()
        state = ElectionState(2, clock, LEADER_TIMEOUT, knownPeers=[1], startGrace=5.0)
        clock.advance(2)
        state.resumed()
        clock.advance(LEADER_TIMEOUT)
        self.assertFalse(state.isReady())
        clock.advance(2)
        self.assertTrue(state.isReady())

    def test_resumedFollower(self) -> None:
        """
        A follower resumed after a suspension does not take the silence it
        slept through for its leader's: it claims nothing and keeps following.
        """
        cluster = startedCluster()
        cluster.hang(2)
        cluster.run(3)
        cluster.resume(2)
        self.assertEqual(self.assertLeads(cluster, 1), 1)
        self.assertSteady(cluster, 5)
        self.assertEqual(len(cluster.claims), 1)

    def test_split(self) -> None:
        """
        Split {1, 2} | {3}, each side has its own leader in its own epoch;
        healed, node 1 leads with an epoch above both.
        """
        cluster = startedCluster()
        cluster.cut(1, 3)
        cluster.cut(2, 3)
        cluster.run(2)
        views = cluster.views()
        self.assertEqual(views, {1: (LEADER, 1, 1), 2: (FOLLOWER, 1, 1), 3: (LEADER, 3, 2)})
        cluster.heal(1, 3)
        cluster.heal(2, 3)
        cluster.run(2)
        self.assertEqual(self.assertLeads(cluster, 1), 3)
        self.assertSteady(cluster, 5)
        self.assertEpochsIncrease(cluster)

    def test_epochsAcrossChanges(self) -> None:
        """
        Through kill, restart, hang, resume, split and heal in a row, every
        claim in the cluster has a new epoch above all earlier ones.
        """
        cluster = startedCluster([1, 2, 3, 4])
        for step in [
            lambda: cluster.kill(1),
            lambda: cluster.start(1),
            lambda: cluster.hang(1),
            lambda: cluster.resume(1),
            lambda: cluster.cut(1, 2),
            lambda: (cluster.cut(1, 3), cluster.cut(1, 4)),
            cluster.healAll,
            lambda: cluster.kill(2),
        ]:
            step()
            cluster.run(3)
        self.assertLeads(cluster, 1)
        self.assertGreater(len(cluster.claims), 5)
        self.assertEpochsIncrease(cluster)


class StaleTests(SynchronousTestCase):
    """
    Messages from an old epoch.
    """

    def test_staleClaimRejected(self) -> None:
        """
        A leadership claim with an older epoch is answered with a L{Stale}
        naming the current epoch and leader, and changes nothing; an old
        heartbeat from a mere follower is not answered.
        """
        election = ElectionState(3, Clock(), LEADER_TIMEOUT, epoch=4, knownPeers=[1, 2])
        election.memberUp(2)
        self.assertEqual(election.heartbeatReceived(2, 5, 2), [])
        self.assertEqual((election.role, election.leader, election.epoch), (FOLLOWER, 2, 5))
        election.memberUp(1)
        with capturedLogs() as events:
            self.assertEqual(election.heartbeatReceived(1, 4, 1), [Stale(1, 5, 2)])
        self.assertEqual([formatEvent(e) for e in events], ["rejected message from 1: stale epoch 4 < 5"])
        self.assertEqual((election.role, election.leader, election.epoch), (FOLLOWER, 2, 5))
        self.assertEqual(election.heartbeatReceived(1, 4, 2), [])


node = st.integers(0, 5)
step = st.one_of(
    st.tuples(st.sampled_from(["start", "kill", "hang", "resume"]), node),
    st.tuples(st.sampled_from(["cut", "heal"]), node, node),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.25, 0.6, 1.1, 1.6, 3.0])),
)


class ConvergenceTests(ElectionTestsMixin, SynchronousTestCase):
    """
    Whatever happened, a healed cluster ends with the smallest live id
    leading one epoch.
    """

    @settings(max_examples=150, deadline=None)
    @given(
        st.integers(2, 6).flatmap(lambda size: st.permutations(range(size))),
        st.lists(step, min_size=1, max_size=12),
        st.sampled_from([0.0, 0.01, 0.1]),
    )
    def test_anyHistory(self, first: List[int], steps: List[Tuple[Any, ...]], latency: float) -> None:
        """
        After every node starts, in the order C{first}, and any short history
        of starts, kills, hangs, resumes, cuts, heals and waits, healing every
        link, resuming every node (starting node 0 if none is up) and waiting
        5 s leaves every live node following the smallest live id in one
        epoch, no lower than any epoch a live node held before, and nothing
        changes after; no node's epoch ever went down.
        """
        size = len(first)
        cluster = FakeCluster(first, latency)
        for op, *args in [("start", n) for n in first] + steps:
            if op == "advance":
                cluster.run(args[0])
                continue
            n = args[0] % size
            if op == "start" and n not in cluster.nodes:
                cluster.start(n)
            elif op in ("kill", "hang") and n in cluster.nodes and n not in cluster.inbox:
                getattr(cluster, op)(n)
            elif op == "resume" and n in cluster.inbox:
                cluster.resume(n)
            elif op in ("cut", "heal") and args[1] % size != n:
                getattr(cluster, op)(n, args[1] % size)
        highest = max([e.epoch for e in cluster.nodes.values()], default=0)
        cluster.healAll()
        for n in list(cluster.inbox):
            cluster.resume(n)
        if not cluster.nodes:
            cluster.start(0)
        cluster.run(5)
        epoch = self.assertLeads(cluster, min(cluster.nodes))
        self.assertGreaterEqual(epoch, highest)
        self.assertSteady(cluster, 2)
        for n, changes in cluster.changes.items():
            epochs = [c[3] for c in changes]
            self.assertEqual(epochs, sorted(epochs), (n, changes))


class HostileClaimTests(SynchronousTestCase):
    """
    A member that holds the secret cannot move the leadership: a node
    follows a leader only on its own word and only when the claim agrees
    with the smallest-live-id rule as this node sees it.
    """

    def follower(self) -> ElectionState:
        """
        Node 2 of 1, 2, 3, following 1 in epoch 1, with 3 live too.
        """
        self.clock = Clock()
        state = ElectionState(2, self.clock, 1.0, knownPeers=[1, 3])
        state.memberUp(1)
        state.memberUp(3)
        state.heartbeatReceived(3, 1, 1)
        state.heartbeatReceived(1, 1, 1)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))
        return state

    def test_namedStranger(self) -> None:
        """
        A heartbeat from 3 with an epoch 100 higher naming leader 999 is
        not adopted: answered with a stale notice, logged once per sender
        and epoch.
        """
        state = self.follower()
        with capturedLogs() as events:
            actions = state.heartbeatReceived(3, 101, 999)
            again = state.heartbeatReceived(3, 101, 999)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))
        self.assertEqual(actions, [Stale(3, 1, 1)])
        self.assertEqual(again, [Stale(3, 1, 1)])
        lines = [formatEvent(e) for e in events if "refused" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn("not on 999's own word", lines[0])

    def test_largerIdClaimsItself(self) -> None:
        """
        Node 3 claiming a higher epoch for itself while the smaller live 1
        leads is refused: node 2 keeps following 1 in its epoch.
        """
        state = self.follower()
        actions = state.heartbeatReceived(3, 50, 3)
        self.assertEqual(actions, [Stale(3, 1, 1)])
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))
        # The true leader's next heartbeat keeps it so.
        state.heartbeatReceived(1, 1, 1)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))

    def test_relayedClaimWaitsForLeader(self) -> None:
        """
        A member naming another live member as leader of a newer epoch is
        not followed until that leader says so itself.
        """
        state = self.follower()
        self.assertEqual(state.heartbeatReceived(3, 2, 1), [])
        self.assertEqual(state.epoch, 1)
        state.heartbeatReceived(1, 2, 1)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 2))

    def test_reportNamingAKnownMemberWaits(self) -> None:
        """
        A node just started that hears a follower name a known member as
        leader before it hears that leader itself waits for the leader's
        own word, without a warning or a stale notice; then follows it.
        """
        clock = Clock()
        state = ElectionState(3, clock, LEADER_TIMEOUT, knownPeers=[1, 2])
        state.memberUp(2)
        with capturedLogs() as events:
            self.assertEqual(state.heartbeatReceived(2, 1, 1), [])
        self.assertEqual([formatEvent(e) for e in events if "refused" in formatEvent(e)], [])
        self.assertEqual((state.role, state.leader, state.epoch), (CANDIDATE, None, 0))
        state.memberUp(1)
        state.heartbeatReceived(1, 1, 1)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))

    def test_leaderMovesAbove(self) -> None:
        """
        A leader told by a larger id that it leads epoch 101 keeps leading:
        it claims epoch 102, so epochs only go up.
        """
        clock = Clock()
        state = ElectionState(1, clock, 1.0, knownPeers=[3])
        state.memberUp(3)
        state.heartbeatReceived(3, 0, None)
        self.assertEqual((state.role, state.epoch), (LEADER, 1))
        actions = state.heartbeatReceived(3, 101, 3)
        self.assertEqual((state.role, state.leader, state.epoch), (LEADER, 1, 102))
        self.assertIn(Claimed(102), actions)

    def test_staleNoticeNamingAnother(self) -> None:
        """
        A stale notice from 3 naming 999 as leader of a newer epoch does not
        make a follower follow 999.
        """
        state = self.follower()
        state.staleReceived(3, 200, 999)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 1))

    def test_smallerClaimFollowed(self) -> None:
        """
        A sound claim (node 1 itself, smallest live) of a newer epoch is
        adopted at once.
        """
        state = self.follower()
        state.heartbeatReceived(1, 5, 1)
        self.assertEqual((state.role, state.leader, state.epoch), (FOLLOWER, 1, 5))
