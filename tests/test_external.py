"""
Tests for L{p2pfiles.external}: L{ExternalCoordinator}, the node's view of a
coordinator that decides elsewhere (etcd), over an in-memory
L{ICoordinator}.
"""

from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from p2pfiles.coordinator import CoordinatorError, ICoordinator, INodeCoordinator, MemberInfo
from p2pfiles import external
from p2pfiles.etcd import EtcdClient
from p2pfiles.external import ExternalCoordinator, etcdCoordinator
from p2pfiles.wire import Message


@implementer(ICoordinator)
class FakeCoordinator:
    """
    An L{ICoordinator} whose answers the test sets, recording what it is
    asked to do.

    @ivar started: the Deferred C{start} returned (the test fires it, unless
        C{at once}).
    @ivar stopped: the Deferred C{stop} returned (likewise).
    """

    name = "fake"

    def __init__(self, me: int, atOnce: bool = False) -> None:
        self.me = me
        self.atOnce = atOnce
        self.leaderId: Optional[int] = None
        self.epochNumber = 0
        self.memberInfos: Dict[int, MemberInfo] = {me: MemberInfo(me, f"127.0.0.1:{9000 + me}")}
        self.subscribers: List[Callable[[], None]] = []
        self.calls: List[str] = []
        self.started: Optional[Deferred] = None
        self.stopped: Optional[Deferred] = None

    def start(self) -> Deferred:
        self.calls.append("start")
        self.started = succeed(None) if self.atOnce else Deferred()
        return self.started

    def stop(self) -> Deferred:
        self.calls.append("stop")
        self.stopped = succeed(None) if self.atOnce else Deferred()
        return self.stopped

    def leader(self) -> Optional[int]:
        return self.leaderId

    def epoch(self) -> int:
        return self.epochNumber

    def isLeader(self) -> bool:
        return self.leaderId == self.me

    def members(self) -> Dict[int, MemberInfo]:
        return dict(self.memberInfos)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback) if callback in self.subscribers else None

    def set(self, leader: Optional[int], epoch: int, *members: int) -> None:
        """
        Change the answers and tell the subscribers, as a coordinator does.
        """
        self.leaderId = leader
        self.epochNumber = epoch
        self.memberInfos = {m: MemberInfo(m, f"127.0.0.1:{9000 + m}") for m in (self.me,) + members}
        for callback in list(self.subscribers):
            callback()


class ExternalCase(SynchronousTestCase):
    """
    An L{ExternalCoordinator} for node 2 around a L{FakeCoordinator}.
    """

    def setUp(self) -> None:
        self.inner = FakeCoordinator(2)
        self.made = 0
        self.learned: List[Tuple[int, str]] = []
        self.closed: List[Deferred] = []
        self.events: List[dict] = []
        self.patch(ExternalCoordinator, "log", Logger(observer=self.events.append))
        self.coordinator = ExternalCoordinator("etcd", 2, self.make, self.learn, self.close)

    def make(self) -> ICoordinator:
        self.made += 1
        return self.inner

    def learn(self, member: int, address: str) -> bool:
        self.learned.append((member, address))
        return True

    def close(self) -> Deferred:
        self.inner.calls.append("close")
        d: Deferred = Deferred()
        self.closed.append(d)
        return d

    def started(self) -> ExternalCoordinator:
        """
        The coordinator, started and admitted.
        """
        d = self.coordinator.start()
        assert self.inner.started is not None
        self.inner.started.callback(None)
        self.successResultOf(d)
        return self.coordinator

    def lines(self) -> List[str]:
        return [formatEvent(e) for e in self.events]


class InterfaceTests(ExternalCase):
    """
    What the node gets: L{INodeCoordinator}, named after what decides.
    """

    def test_provides(self) -> None:
        """
        The adapter provides L{INodeCoordinator} (and so L{ICoordinator})
        and carries the name it was given.
        """
        self.assertTrue(verifyObject(INodeCoordinator, self.coordinator))
        self.assertTrue(verifyObject(ICoordinator, self.coordinator))
        self.assertEqual(self.coordinator.name, "etcd")

    def test_beforeStart(self) -> None:
        """
        Before it starts nothing is made: no leader, epoch 0, no members,
        a candidate; only this node counts as live.
        """
        coordinator = self.coordinator
        self.assertEqual(self.made, 0)
        self.assertEqual(
            (coordinator.leader(), coordinator.epoch(), coordinator.isLeader(), coordinator.members(), coordinator.role()),
            (None, 0, False, {}, "candidate"),
        )
        self.assertTrue(coordinator.isLive(2))
        self.assertFalse(coordinator.isLive(1))


class StartStopTests(ExternalCase):
    """
    Starting makes and starts the coordinator; stopping stops it, then
    closes what it used.
    """

    def test_startMakesAndWaits(self) -> None:
        """
        C{start} makes the coordinator once and fires when its C{start}
        does, not before.
        """
        d = self.coordinator.start()
        self.assertEqual((self.made, self.inner.calls), (1, ["start"]))
        self.assertNoResult(d)
        assert self.inner.started is not None
        self.inner.started.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertIs(self.coordinator.coordinator, self.inner)

    def test_startFailurePassesThrough(self) -> None:
        """
        A refusal (an id already held) fails C{start} with the same
        L{CoordinatorError}.
        """
        d = self.coordinator.start()
        assert self.inner.started is not None
        self.inner.started.errback(CoordinatorError("conflict", "node id 2 is already registered in etcd by X"))
        error = self.failureResultOf(d, CoordinatorError).value
        self.assertEqual((error.code, str(error)), ("conflict", "node id 2 is already registered in etcd by X"))

    def test_startsOnce(self) -> None:
        """
        A second start, or a start after stop, is a programming error.
        """
        self.started()
        self.assertRaises(RuntimeError, self.coordinator.start)
        other = ExternalCoordinator("etcd", 2, self.make, self.learn)
        self.successResultOf(other.stop())
        self.assertRaises(RuntimeError, other.start)

    def test_stopThenClose(self) -> None:
        """
        C{stop} stops the coordinator and, only once it has stopped (its
        lease revoked), closes what it used; it fires after both, and any
        number of calls share the one stop.
        """
        self.started()
        first = self.coordinator.stop()
        second = self.coordinator.stop()
        self.assertTrue(self.coordinator.stopping)
        self.assertEqual(self.inner.calls, ["start", "stop"])
        assert self.inner.stopped is not None
        self.inner.stopped.callback(None)
        self.assertEqual(self.inner.calls, ["start", "stop", "close"])
        self.assertNoResult(first)
        self.closed[0].callback(None)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(self.inner.subscribers, [])

    def test_stopBeforeStart(self) -> None:
        """
        Stopping a coordinator that never started makes nothing, and still
        closes what was opened for it.
        """
        d = self.coordinator.stop()
        self.assertEqual((self.made, self.inner.calls), (0, ["close"]))
        self.closed[0].callback(None)
        self.successResultOf(d)

    def test_stopNeverFails(self) -> None:
        """
        A coordinator whose stop fails, and a close that fails, are logged;
        C{stop} still fires, and the close still happens.
        """
        self.started()
        d = self.coordinator.stop()
        assert self.inner.stopped is not None
        self.inner.stopped.errback(RuntimeError("stop broke"))
        self.closed[0].errback(RuntimeError("close broke"))
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)
        self.assertEqual(
            self.lines(), ["error stopping the etcd coordinator", "error closing the etcd coordinator's connections"]
        )

    def test_notLeaderOnceStopping(self) -> None:
        """
        From the moment C{stop} is called this node does not lead, whatever
        the coordinator still says, and subscribers are told so before
        C{stop} returns.
        """
        self.started()
        self.inner.set(2, 7, 3)
        self.assertTrue(self.coordinator.isLeader())
        views: List[bool] = []
        self.coordinator.subscribe(lambda: views.append(self.coordinator.isLeader()))
        self.coordinator.stop()
        self.assertEqual(views, [False])
        self.assertFalse(self.coordinator.isLeader())
        self.assertEqual(self.coordinator.role(), "follower")


class AnswersTests(ExternalCase):
    """
    Leader, epoch, members, role and liveness are the coordinator's.
    """

    def test_roles(self) -> None:
        """
        The role follows the coordinator: C{candidate} with no leader,
        C{follower} of another id, C{leader} when it says this node leads.
        """
        coordinator = self.started()
        self.assertEqual((coordinator.role(), coordinator.leader(), coordinator.epoch()), ("candidate", None, 0))
        self.inner.set(1, 5, 1, 3)
        self.assertEqual((coordinator.role(), coordinator.leader(), coordinator.epoch()), ("follower", 1, 5))
        self.inner.set(2, 9, 3)
        self.assertEqual((coordinator.role(), coordinator.leader(), coordinator.epoch()), ("leader", 2, 9))
        self.assertTrue(coordinator.isLeader())

    def test_liveIsMember(self) -> None:
        """
        A member is live exactly while the coordinator lists it.
        """
        coordinator = self.started()
        self.inner.set(1, 5, 1, 3)
        self.assertEqual([m for m in range(5) if coordinator.isLive(m)], [1, 2, 3])
        self.inner.set(2, 6, 3)
        self.assertEqual([m for m in range(5) if coordinator.isLive(m)], [2, 3])
        self.assertEqual(sorted(coordinator.members()), [2, 3])

    def test_learnsMembersThenTells(self) -> None:
        """
        Each change teaches C{learn} every other member with its address,
        before the subscribers hear of it (so that they find the member's
        address known).
        """
        coordinator = self.started()
        order: List[object] = []
        self.patch(self, "learned", order)
        coordinator.subscribe(lambda: order.append("told"))
        self.inner.set(1, 5, 1, 3)
        self.assertEqual(order, [(1, "127.0.0.1:9001"), (3, "127.0.0.1:9003"), "told"])

    def test_nothingLearnedWhileStopping(self) -> None:
        """
        Changes reported while stopping still reach the subscribers (this
        node stopped leading), but teach no member.
        """
        coordinator = self.started()
        told: List[None] = []
        coordinator.subscribe(lambda: told.append(None))
        coordinator.stop()
        self.inner.set(1, 5, 1)
        self.assertEqual((self.learned, len(told)), ([], 1))

    def test_unsubscribe(self) -> None:
        """
        The callable C{subscribe} returns stops the calls; calling it twice
        is harmless.
        """
        coordinator = self.started()
        told: List[None] = []
        unsubscribe = coordinator.subscribe(lambda: told.append(None))
        unsubscribe()
        unsubscribe()
        self.inner.set(1, 5, 1)
        self.assertEqual(told, [])


class LinkInputTests(ExternalCase):
    """
    What the control links see changes nothing: the coordinator decides.
    """

    def test_linkAndHeartbeatInputsIgnored(self) -> None:
        """
        Links up and down, heartbeats (even one naming a leader in a higher
        epoch, or listing members) and stale notices change no answer and
        teach no member.
        """
        coordinator = self.started()
        self.inner.set(1, 5, 1)
        self.learned.clear()
        told: List[None] = []
        coordinator.subscribe(lambda: told.append(None))
        coordinator.linkUp(3)
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=99, leader=3, members=[(4, "127.0.0.1:9004")]))
        coordinator.staleReceived(3, Message("stale", epoch=99, leader=3))
        coordinator.linkDown(1)
        self.assertEqual(
            (coordinator.leader(), coordinator.epoch(), coordinator.isLive(1), coordinator.isLive(3), coordinator.isLive(4)),
            (1, 5, True, False, False),
        )
        self.assertEqual((self.learned, told), ([], []))

    def test_rejectStale(self) -> None:
        """
        A message of an older epoch is refused, and logged once per sender
        and epoch however often it comes; the current epoch and newer ones
        are accepted.
        """
        coordinator = self.started()
        self.inner.set(1, 5, 1, 3)
        self.assertFalse(coordinator.rejectStale(1, 5))
        self.assertFalse(coordinator.rejectStale(1, 6))
        for _ in range(3):
            self.assertTrue(coordinator.rejectStale(3, 4))
        self.assertTrue(coordinator.rejectStale(3, 2))
        self.assertTrue(coordinator.rejectStale(1, 4))
        self.assertEqual(
            self.lines(),
            [
                "rejected message from 3: stale epoch 4 < 5",
                "rejected message from 3: stale epoch 2 < 5",
                "rejected message from 1: stale epoch 4 < 5",
            ],
        )


class EtcdCoordinatorTests(SynchronousTestCase):
    """
    L{etcdCoordinator}: an L{ExternalCoordinator} around an
    L{EtcdCoordinator}, made when it starts.
    """

    def test_madeAtStart(self) -> None:
        """
        Nothing is made, nor is the fingerprint asked for, until the
        coordinator starts; then an L{EtcdCoordinator} is made for this
        node's id, address and fingerprint, the prefix and the TTL, on a
        client for the given endpoints, which is closed after it stops.
        """
        asked: List[int] = []

        def fingerprint() -> str:
            asked.append(1)
            return "sha256:" + "cd" * 32

        made: List[Tuple[object, ...]] = []

        def record(*args: object) -> FakeCoordinator:
            made.append(args)
            return FakeCoordinator(4)

        self.patch(external, "EtcdCoordinator", record)
        clock = Clock()
        coordinator = etcdCoordinator(
            clock, ["127.0.0.1:2379", "127.0.0.1:2380"], "/p2pfiles/test", 3.0, 4, "127.0.0.1:9004", fingerprint, lambda m, a: True
        )
        self.assertEqual((coordinator.name, coordinator.me, asked, made), ("etcd", 4, [], []))
        coordinator.start()
        ((reactor, client, me, prefix, ttl),) = made
        self.assertIs(reactor, clock)
        self.assertIsInstance(client, EtcdClient)
        self.assertEqual(client.endpoints, ["127.0.0.1:2379", "127.0.0.1:2380"])
        self.assertEqual((me, prefix, ttl), (MemberInfo(4, "127.0.0.1:9004", "sha256:" + "cd" * 32), "/p2pfiles/test", 3.0))
        self.assertEqual(coordinator.close, client.close)
        stopped = coordinator.stop()
        assert isinstance(coordinator.coordinator, FakeCoordinator) and coordinator.coordinator.stopped is not None
        coordinator.coordinator.stopped.callback(None)
        self.successResultOf(stopped)
