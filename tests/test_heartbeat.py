"""
Tests for L{p2pfiles.heartbeat}: the stored epoch (L{EpochStore}) and the
built-in coordinator (L{HeartbeatCoordinator}) that drives the election,
persists epochs off the reactor thread and tells its subscribers of changes.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from p2pfiles.coordinator import ICoordinator, INodeCoordinator, MemberInfo
from p2pfiles.election import ElectionState
from p2pfiles.heartbeat import EpochStore, HeartbeatCoordinator
from p2pfiles.wire import Message

HEARTBEAT = 0.25
LEADER_TIMEOUT = 1.0


def address(node: int) -> str:
    return f"127.0.0.1:{9000 + node}"


class EpochStoreTests(SynchronousTestCase):
    """
    L{EpochStore}: the highest epoch seen, kept across restarts.
    """

    def setUp(self) -> None:
        self.state = FilePath(self.mktemp())
        self.state.makedirs()
        self.store = EpochStore(self.state)

    def test_missingIsZero(self) -> None:
        """
        With no epoch file, the stored epoch is 0.
        """
        self.assertEqual(self.store.load(), 0)

    def test_saveThenLoad(self) -> None:
        """
        A saved epoch is what the next load returns, written as a decimal
        line in C{epoch}, with no temporary file left beside it.
        """
        self.store.save(17)
        self.assertEqual(self.store.load(), 17)
        self.assertEqual(self.state.child("epoch").getContent(), b"17\n")
        self.store.save(18)
        self.assertEqual(EpochStore(self.state).load(), 18)
        self.assertEqual(self.state.listdir(), ["epoch"])

    def test_corruptRefused(self) -> None:
        """
        A file that does not hold a number is an error naming the file
        (starting again from 0 could reuse an epoch), not a silent 0.
        """
        for content in (b"", b"x\n", b"-3\n", b"1.5\n"):
            self.state.child("epoch").setContent(content)
            error = self.assertRaises(ValueError, self.store.load)
            self.assertIn(self.state.child("epoch").path, str(error))


class ThreadCalls:
    """
    A C{runInThread} that runs nothing until the test says so.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self, index: int = 0) -> None:
        """
        Run call C{index} now, as its thread would, and fire its Deferred.
        """
        f, args, d = self.calls[index]
        try:
            result = f(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)

    def failWith(self, index: int, error: Exception) -> None:
        self.calls[index][2].errback(error)

    def savedEpochs(self) -> List[int]:
        return [args[0] for _, args, _ in self.calls]


class CoordinatorCase(SynchronousTestCase):
    """
    A coordinator for node C{me} on a L{Clock}, with links and messages
    recorded.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = FilePath(self.mktemp())
        self.state.makedirs()
        self.store = EpochStore(self.state)
        self.threads = ThreadCalls()
        self.sent: List[Tuple[int, Message]] = []
        self.broadcasts: List[Message] = []
        self.events: List[dict] = []
        self.patch(HeartbeatCoordinator, "log", Logger(observer=self.events.append))
        self.patch(ElectionState, "log", Logger(observer=lambda e: None))
        self.addresses: Dict[int, str] = {}
        self.fingerprints: Dict[int, str] = {}
        self.learned: List[Tuple[int, str]] = []

    def learn(self, member: int, address: str) -> bool:
        """
        As the membership's C{learn}: True for a member not known before.
        """
        self.learned.append((member, address))
        if member in self.addresses:
            return False
        self.addresses[member] = address
        return True

    def coordinator(self, me: int, knownPeers: Any = ()) -> HeartbeatCoordinator:
        self.addresses = {me: address(me)}
        self.addresses.update({p: address(p) for p in knownPeers})
        coordinator = HeartbeatCoordinator(
            me,
            self.clock,
            self.store,
            self.threads,
            self.send,
            self.broadcasts.append,
            self.addresses.get,
            HEARTBEAT,
            LEADER_TIMEOUT,
            knownPeers=knownPeers,
            learn=self.learn,
            fingerprintOf=self.fingerprints.get,
        )
        self.addCleanup(lambda: coordinator.stop())
        return coordinator

    def send(self, member: int, message: Message) -> bool:
        self.sent.append((member, message))
        return True

    def lines(self) -> List[str]:
        return [formatEvent(e) for e in self.events]

    def follower(self, epoch: int = 3) -> HeartbeatCoordinator:
        """
        Node 2, following node 1 in C{epoch}, every save done.
        """
        coordinator = self.coordinator(2, knownPeers=[1])
        coordinator.start()
        coordinator.linkUp(1)
        coordinator.heartbeatReceived(1, Message("heartbeat", node=1, epoch=epoch, leader=1, members=[]))
        self.assertEqual((coordinator.role(), coordinator.leader(), coordinator.epoch()), ("follower", 1, epoch))
        for i in range(len(self.threads.calls)):
            if not self.threads.calls[i][2].called:
                self.threads.run(i)
        self.sent.clear()
        self.broadcasts.clear()
        return coordinator


class EpochPersistenceTests(CoordinatorCase):
    """
    Every new epoch is saved, in a thread, one write at a time.
    """

    def test_startLoadsEpoch(self) -> None:
        """
        C{start} reads the stored epoch: the first claim is one above it.
        """
        self.store.save(5)
        coordinator = self.coordinator(1)
        self.successResultOf(coordinator.start())
        self.assertEqual((coordinator.role(), coordinator.epoch()), ("leader", 6))

    def test_claimSavedInThread(self) -> None:
        """
        A claim hands the save of its epoch to C{runInThread} rather than
        writing on the reactor thread; the file changes only when the
        thread runs.  The claim is announced with a heartbeat meanwhile.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        self.assertTrue(coordinator.isLeader())
        ((f, args, d),) = self.threads.calls
        self.assertEqual((f, args), (self.store.save, (1,)))
        self.assertFalse(self.state.child("epoch").exists())
        self.assertIn(1, [m.epoch for m in self.broadcasts if m.leader == 1])
        self.threads.run(0)
        self.assertEqual(self.store.load(), 1)
        self.clock.advance(HEARTBEAT * 4)
        self.assertEqual(len(self.threads.calls), 1, "an epoch already saved is not saved again")

    def test_oneSaveInFlightNewestAfter(self) -> None:
        """
        While one save runs, newer epochs do not start another write; when
        it ends, the newest epoch is saved, once.
        """
        coordinator = self.coordinator(2, knownPeers=[1])
        coordinator.start()
        self.clock.advance(LEADER_TIMEOUT)
        self.assertEqual((coordinator.role(), coordinator.epoch()), ("leader", 1))
        self.assertEqual(self.threads.savedEpochs(), [1])
        coordinator.linkUp(1)
        coordinator.heartbeatReceived(1, Message("heartbeat", node=1, epoch=4, leader=1, members=[]))
        coordinator.staleReceived(1, Message("stale", epoch=7, leader=1))
        self.assertEqual(coordinator.epoch(), 7)
        self.clock.advance(HEARTBEAT)
        self.assertEqual(self.threads.savedEpochs(), [1])
        self.threads.run(0)
        self.assertEqual(self.threads.savedEpochs(), [1, 7])
        self.threads.run(1)
        self.assertEqual(self.store.load(), 7)
        self.clock.advance(HEARTBEAT)
        self.assertEqual(self.threads.savedEpochs(), [1, 7])

    def test_failedSaveLoggedAndRetried(self) -> None:
        """
        A save that fails is logged as an error and not retried in a loop;
        the next event the coordinator handles saves the epoch again.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        self.threads.failWith(0, OSError(28, "No space left on device"))
        (line,) = [formatEvent(e) for e in self.events if e["log_level"].name == "error"]
        self.assertIn("cannot save epoch 1", line)
        self.assertIn("No space left on device", line)
        self.assertEqual(len(self.threads.calls), 1)
        self.clock.advance(HEARTBEAT)
        self.assertEqual(self.threads.savedEpochs(), [1, 1])
        self.threads.run(1)
        self.assertEqual(self.store.load(), 1)
        self.assertEqual(coordinator.epoch(), 1)

    def test_stopWaitsForSave(self) -> None:
        """
        C{stop} fires once the save in flight has ended, and starts no
        other.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        stopped = coordinator.stop()
        self.assertNoResult(stopped)
        self.threads.run(0)
        self.successResultOf(stopped)
        self.assertEqual(len(self.threads.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTests(CoordinatorCase):
    """
    A stopping node claims, sends and saves nothing.
    """

    def test_stoppedFollowerNeverClaims(self) -> None:
        """
        A follower stopped cleanly, whose links then close as the node shuts
        down, does not claim leadership on its way out: it sends nothing,
        saves nothing, and does not report itself leader.
        """
        coordinator = self.follower(epoch=3)
        saves = len(self.threads.calls)
        self.successResultOf(coordinator.stop())
        coordinator.linkDown(1)
        self.clock.advance(10 * LEADER_TIMEOUT)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.broadcasts, [])
        self.assertEqual(len(self.threads.calls), saves)
        self.assertFalse(coordinator.isLeader())
        self.assertEqual(coordinator.epoch(), 3)


    def test_stoppedFollowerAnnouncesNoClaim(self) -> None:
        """
        After C{stop}, a link that comes up (a connection finishing its
        handshake during shutdown) is not told that the stopping node leads:
        nothing at all is sent.
        """
        coordinator = self.follower(epoch=3)
        self.successResultOf(coordinator.stop())
        coordinator.linkDown(1)
        coordinator.linkUp(1)
        self.assertEqual(self.sent, [])


    def test_stoppedFollowerBroadcastsAndSavesNothing(self) -> None:
        """
        After C{stop}, links going down and messages arriving make the
        coordinator broadcast nothing, send no stale notice, save nothing,
        and its heartbeat loop has stopped.
        """
        coordinator = self.follower(epoch=3)
        saves = len(self.threads.calls)
        self.successResultOf(coordinator.stop())
        coordinator.linkDown(1)
        coordinator.heartbeatReceived(1, Message("heartbeat", node=1, epoch=2, leader=1, members=[]))
        coordinator.staleReceived(1, Message("stale", epoch=9, leader=1))
        self.assertTrue(coordinator.rejectStale(5, 0), "still not to be acted on, though nobody is told")
        self.clock.advance(10 * LEADER_TIMEOUT)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.broadcasts, [])
        self.assertEqual(len(self.threads.calls), saves)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stoppedLeaderClaimsNothingNew(self) -> None:
        """
        A stopped leader's heartbeat loop stops: time passing announces and
        saves nothing more.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        self.threads.run(0)
        coordinator.stop()
        self.broadcasts.clear()
        self.clock.advance(10 * HEARTBEAT)
        self.assertEqual(self.broadcasts, [])
        self.assertEqual(len(self.threads.calls), 1)


class SubscriberTests(CoordinatorCase):
    """
    Subscribers hear of every change of role, leader, epoch or live members,
    and only of changes.
    """

    def test_notifiedOnChangesOnly(self) -> None:
        """
        A subscriber is called when the node claims, when a member becomes
        live and when a higher epoch is adopted; ticks that change nothing
        do not call it.
        """
        coordinator = self.coordinator(2, knownPeers=[1, 3])
        views: List[Tuple[str, Optional[int], int, Tuple[int, ...]]] = []

        def changed() -> None:
            views.append(
                (coordinator.role(), coordinator.leader(), coordinator.epoch(), tuple(sorted(coordinator.members())))
            )

        coordinator.subscribe(changed)
        coordinator.start()
        self.assertEqual(views, [("candidate", None, 0, (2,))])
        self.clock.advance(HEARTBEAT)
        self.clock.advance(HEARTBEAT)
        self.assertEqual(len(views), 1)
        coordinator.linkUp(3)
        self.assertEqual(len(views), 1, "a link up is not yet a live member")
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=0, leader=None, members=[]))
        self.assertEqual(views[-1], ("candidate", None, 0, (2, 3)))
        self.clock.advance(LEADER_TIMEOUT)
        self.assertEqual(views[-1], ("leader", 2, 1, (2, 3)))
        count = len(views)
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=1, leader=2, members=[]))
        self.clock.advance(HEARTBEAT)
        self.assertEqual(len(views), count)
        coordinator.linkUp(1)
        coordinator.heartbeatReceived(1, Message("heartbeat", node=1, epoch=5, leader=1, members=[]))
        self.assertEqual(views[-1], ("follower", 1, 5, (1, 2, 3)))
        coordinator.linkDown(3)
        self.assertEqual(views[-1], ("follower", 1, 5, (1, 2)))

    def test_unsubscribe(self) -> None:
        """
        The callable C{subscribe} returns stops the calls; calling it twice
        is harmless.
        """
        coordinator = self.coordinator(1)
        calls: List[None] = []
        stop = coordinator.subscribe(lambda: calls.append(None))
        stop()
        stop()
        coordinator.start()
        self.assertEqual(calls, [])


class StaleTests(CoordinatorCase):
    """
    C{rejectStale}: a message from an older epoch is answered, once, and not
    acted on.
    """

    def test_rejectStaleSendsOneNotice(self) -> None:
        """
        An epoch older than ours is rejected: the sender gets one C{stale}
        notice naming our epoch and leader, and the rejection is logged
        once.
        """
        coordinator = self.follower(epoch=3)
        electionEvents: List[dict] = []
        self.patch(ElectionState, "log", Logger(observer=electionEvents.append))
        self.assertTrue(coordinator.rejectStale(4, 2))
        self.assertEqual([(m, msg.type, msg.epoch, msg.leader) for m, msg in self.sent], [(4, "stale", 3, 1)])
        self.assertEqual(
            [formatEvent(e) for e in electionEvents], ["rejected message from 4: stale epoch 2 < 3"]
        )

    def test_currentEpochAccepted(self) -> None:
        """
        A message of our epoch, or a newer one, is not rejected and sends
        nothing.
        """
        coordinator = self.follower(epoch=3)
        self.assertFalse(coordinator.rejectStale(1, 3))
        self.assertFalse(coordinator.rejectStale(1, 4))
        self.assertEqual(self.sent, [])


class MembersTests(CoordinatorCase):
    """
    What the coordinator says about the cluster.
    """

    def test_provides(self) -> None:
        """
        The built-in coordinator provides L{ICoordinator} and what the node
        asks beyond it, L{INodeCoordinator}, and is named "builtin".
        """
        coordinator = self.coordinator(1)
        self.assertTrue(verifyObject(ICoordinator, coordinator))
        self.assertTrue(verifyObject(INodeCoordinator, coordinator))
        self.assertEqual(coordinator.name, "builtin")

    def test_membersAreLiveWithAddresses(self) -> None:
        """
        C{members} maps every live member (this node included) to a
        L{MemberInfo} with its address and the fingerprint its links
        presented, if any; a member linked but not heard from, or whose
        address is unknown, is left out.
        """
        coordinator = self.coordinator(1, knownPeers=[2, 3, 4])
        self.fingerprints[2] = "sha256:" + "ab" * 32
        coordinator.start()
        self.assertEqual(coordinator.members(), {1: MemberInfo(1, address(1))})
        for peer in (2, 3, 4):
            coordinator.linkUp(peer)
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=0, leader=None, members=[]))
        del self.addresses[4]
        coordinator.heartbeatReceived(4, Message("heartbeat", node=4, epoch=0, leader=None, members=[]))
        self.assertEqual(
            coordinator.members(),
            {1: MemberInfo(1, address(1)), 2: MemberInfo(2, address(2), "sha256:" + "ab" * 32)},
        )
        self.assertTrue(coordinator.isLive(4))
        self.assertFalse(coordinator.isLive(3))

    def test_heartbeatTeachesMembers(self) -> None:
        """
        Every member the leader's heartbeat lists is passed to C{learn}.
        """
        coordinator = self.coordinator(3, knownPeers=[2])
        coordinator.start()
        coordinator.linkUp(2)
        listed = [(2, address(2)), (4, address(4))]
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=1, leader=2, members=listed))
        self.assertEqual(coordinator.leader(), 2)
        self.assertEqual(self.learned, listed)

    def test_onlyLeaderTeachesMembers(self) -> None:
        """
        While this node follows a leader, a member that is not that leader
        teaches nothing: twenty made-up ids in its list are not learned.
        """
        coordinator = self.coordinator(3, knownPeers=[1, 2])
        coordinator.start()
        coordinator.linkUp(1)
        coordinator.linkUp(2)
        coordinator.heartbeatReceived(1, Message("heartbeat", node=1, epoch=1, leader=1, members=[]))
        self.assertEqual(coordinator.leader(), 1)
        listed = [(100 + i, address(100 + i)) for i in range(20)]
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=1, leader=1, members=listed))
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=5, leader=2, members=listed))
        self.assertEqual(self.learned, [])

    def test_leaderlessLearnsFromNoList(self) -> None:
        """
        A node that follows no leader yet learns nothing from a member's
        list: not from a member that follows none either, nor from one
        naming a leader other than itself; only once it follows a leader,
        from that leader's own heartbeat.
        """
        coordinator = self.coordinator(5, knownPeers=[3])
        coordinator.start()
        coordinator.linkUp(3)
        listed = [(100 + i, address(100 + i)) for i in range(20)]
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=0, leader=None, members=listed))
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=4, leader=1, members=listed))
        self.assertIsNone(coordinator.leader())
        self.assertEqual(self.learned, [])
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=4, leader=3, members=[(7, address(7))]))
        self.assertEqual(coordinator.leader(), 3)
        self.assertEqual(self.learned, [(7, address(7))])

    def test_leaderlessLearnsTheLeaderAConfiguredPeerNames(self) -> None:
        """
        A node that follows no leader yet learns, from a configured peer's
        heartbeat, the one leader that peer names (so that a node given any
        one member finds the leader) and none of the other ids listed; a
        member that is not configured teaches nothing, not even its leader.
        """
        coordinator = self.coordinator(5, knownPeers=[3])
        coordinator.start()
        coordinator.linkUp(3)
        coordinator.linkUp(8)
        madeUp = [(100 + i, address(100 + i)) for i in range(20)]
        coordinator.heartbeatReceived(8, Message("heartbeat", node=8, epoch=4, leader=9, members=[(9, address(9))] + madeUp))
        self.assertEqual(self.learned, [])
        coordinator.heartbeatReceived(3, Message("heartbeat", node=3, epoch=4, leader=1, members=[(1, address(1))] + madeUp))
        self.assertIsNone(coordinator.leader())
        self.assertEqual(self.learned, [(1, address(1))])

    def test_heartbeatOfKnownMembersClaims(self) -> None:
        """
        The counterpart of L{test_heartbeatTeachesMembers}: when the members
        a heartbeat lists are all known, the node has heard from everyone
        and claims on its next tick.
        """
        coordinator = self.coordinator(1, knownPeers=[2])
        coordinator.start()
        coordinator.linkUp(2)
        members = [(2, address(2))]
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=0, leader=None, members=members))
        self.clock.advance(HEARTBEAT)
        self.assertEqual(coordinator.role(), "leader")

    def test_nothingLearnedWhileStopping(self) -> None:
        """
        A stopping node learns no member from a heartbeat.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        self.threads.run(0)
        self.successResultOf(coordinator.stop())
        members = [(3, address(3))]
        coordinator.heartbeatReceived(2, Message("heartbeat", node=2, epoch=0, leader=None, members=members))
        self.assertEqual(self.learned, [])

    def test_linkUpAnsweredWithHeartbeat(self) -> None:
        """
        A member whose link comes up gets our heartbeat at once, naming our
        epoch, leader and live members.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        coordinator.linkUp(2)
        ((member, message),) = self.sent
        self.assertEqual(member, 2)
        self.assertEqual(
            (message.type, message.node, message.epoch, message.leader, message.members),
            ("heartbeat", 1, 1, 1, [(1, address(1))]),
        )

    def test_tickBroadcastsHeartbeat(self) -> None:
        """
        Every heartbeat interval one heartbeat is broadcast.
        """
        coordinator = self.coordinator(1)
        coordinator.start()
        self.broadcasts.clear()
        self.clock.advance(HEARTBEAT)
        self.clock.advance(HEARTBEAT)
        self.assertEqual([m.type for m in self.broadcasts], ["heartbeat", "heartbeat"])
