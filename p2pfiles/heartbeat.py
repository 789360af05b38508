"""
The built-in coordinator: leadership decided by the nodes themselves, by
heartbeats on the control links.

L{HeartbeatCoordinator} drives the pure decision object
L{p2pfiles.election.ElectionState}: it feeds it link events, heartbeats,
stale notices and the passing of time, carries out its answers (announce a
claim, tell a stale leader), persists every new epoch off the reactor
thread, and tells its subscribers whenever the leader, the epoch or the live
members change.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from p2pfiles.atomic import atomicWrite
from p2pfiles.coordinator import INodeCoordinator, MemberInfo
from p2pfiles.election import LEADER, Claimed, ElectionState, Stale
from p2pfiles.wire import Message


class EpochStore:
    """
    The highest epoch this node has seen, kept in C{epoch} in the state
    directory so that a restart never reuses one.
    """

    def __init__(self, state: FilePath) -> None:
        self.path = state.child("epoch")

    def load(self) -> int:
        """
        Return the stored epoch (0 if none).  A file that is not a number is
        an error: starting from 0 could reuse an epoch.
        """
        if not self.path.exists():
            return 0
        text = self.path.getContent().strip()
        if not text.isdigit():
            raise ValueError(f"{self.path.path} does not hold an epoch number; remove it to start from 0")
        return int(text)

    def save(self, epoch: int) -> None:
        """
        Blocking (write, fsync, rename, fsync): run it in a thread.
        """
        atomicWrite(self.path, b"%d\n" % (epoch,))


@implementer(INodeCoordinator)
class HeartbeatCoordinator:
    """
    Leadership by heartbeats: the live node with the smallest id leads.

    @ivar election: the L{ElectionState} it drives.
    @ivar learn: called with C{(id, address)} for every member a heartbeat
        lists; returns True if that member was new to this node.
    @ivar fingerprintOf: the certificate fingerprint a member presented, or
        L{None}, for L{members}.
    """

    log = Logger()
    name = "builtin"

    def __init__(
        self,
        me: int,
        reactor: Any,
        epochs: EpochStore,
        runInThread: Callable[..., Deferred],
        send: Callable[[int, Message], bool],
        broadcast: Callable[[Message], None],
        addressOf: Callable[[int], Optional[str]],
        heartbeat: float,
        leaderTimeout: float,
        knownPeers: Any = (),
        learn: Callable[[int, str], bool] = lambda member, address: False,
        fingerprintOf: Callable[[int], Optional[str]] = lambda member: None,
        startGrace: Optional[float] = None,
    ) -> None:
        self.me = me
        self.reactor = reactor
        self.epochs = epochs
        self.runInThread = runInThread
        self.send = send
        self.broadcast = broadcast
        self.addressOf = addressOf
        self.learn = learn
        self.fingerprintOf = fingerprintOf
        self.heartbeat = heartbeat
        self.leaderTimeout = leaderTimeout
        self.election = ElectionState(
            me, reactor, leaderTimeout, epoch=0, knownPeers=knownPeers, startGrace=startGrace
        )
        self.configured = frozenset(knownPeers)
        self.stopping = False
        self._subscribers: List[Callable[[], None]] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._lastTick: Optional[float] = None
        self._view: Optional[Tuple[Any, ...]] = None
        self._savedEpoch = 0
        self._saving: Optional[Deferred] = None

    # ICoordinator

    def start(self) -> Deferred:
        self._savedEpoch = self.election.epoch = self.epochs.load()
        self._loop.start(self.heartbeat, now=True)
        return succeed(None)

    def stop(self) -> Deferred:
        """
        Stop for good: no tick, no claim, nothing persisted from now on.
        """
        self.stopping = True
        if self._loop.running:
            self._loop.stop()
        saving = self._saving
        return saving if saving is not None else succeed(None)

    def leader(self) -> Optional[int]:
        return self.election.leader

    def epoch(self) -> int:
        return self.election.epoch

    def isLeader(self) -> bool:
        return self.election.role == LEADER

    def role(self) -> str:
        return self.election.role

    def isLive(self, member: int) -> bool:
        return self.election.isLive(member)

    def members(self) -> Dict[int, MemberInfo]:
        """
        The live members whose addresses are known, this node included.
        """
        live = {}
        for member in self.election.liveMembers():
            address = self.addressOf(member)
            if address is not None:
                live[member] = MemberInfo(member, address, self.fingerprintOf(member))
        return live

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    # Events from the links.

    def linkUp(self, member: int) -> None:
        if self.stopping:
            return
        self._apply(self.election.memberUp(member))
        self.send(member, self.heartbeatMessage())
        self._notify()

    def linkDown(self, member: int) -> None:
        if self.stopping:
            return
        self._apply(self.election.memberDown(member))
        self._notify()

    def heartbeatReceived(self, sender: int, message: Message) -> None:
        """
        Let the election hear it; then, if C{sender} is the leader this
        node follows, learn the members it lists.  No other member's list
        is taken: a bad member cannot make this node link to made-up ids.
        Until it follows, a node knows its configured peers and the nodes
        that link to it, each on its own word, plus one id per configured
        peer: the leader that peer names, so that a node given any one
        member of a cluster finds its leader (and then follows it only on
        the leader's own heartbeat).
        """
        if self.stopping:
            return
        self._apply(self.election.heartbeatReceived(sender, message.epoch, message.leader))
        if self.election.leader == sender:
            learnable = message.members
        elif self.election.leader is None and sender in self.configured:
            learnable = [(member, address) for member, address in message.members if member == message.leader]
        else:
            learnable = []
        for member, address in learnable:
            if self.learn(member, address):
                self.election.peerKnown(member)
        self._notify()

    def staleReceived(self, sender: int, message: Message) -> None:
        if self.stopping:
            return
        self._apply(self.election.staleReceived(sender, message.epoch, message.leader))
        self._notify()

    def rejectStale(self, sender: int, epoch: int) -> bool:
        """
        If C{epoch} is older than ours, tell C{sender} and return True: the
        message that carried it must not be acted on.
        """
        stale = self.election.staleFrom(sender, epoch)
        if stale is None:
            return False
        self._apply([stale])
        return True

    # Heartbeats.

    def heartbeatMessage(self) -> Message:
        members = [(member, info.address) for member, info in sorted(self.members().items())]
        return Message(
            "heartbeat",
            node=self.me,
            epoch=self.election.epoch,
            leader=self.election.leader,
            members=members,
        )

    def _tick(self) -> None:
        # The heartbeat loop must outlive any bug in one tick: a LoopingCall
        # whose function raises stops for good, and the node would go silent.
        try:
            self._tickOnce()
        except Exception:
            self.log.failure("error in the heartbeat tick")

    def _tickOnce(self) -> None:
        now = self.reactor.seconds()
        if self._lastTick is not None and now - self._lastTick > self.leaderTimeout + self.heartbeat:
            self.log.warn(
                "timers ran {late:.1f}s late (process suspended?): hearing from members afresh",
                late=now - self._lastTick - self.heartbeat,
            )
            self._apply(self.election.resumed())
        self._lastTick = now
        self._apply(self.election.tick())
        self.broadcast(self.heartbeatMessage())
        self._notify()

    # The election's answers.

    def _apply(self, actions: List[object]) -> None:
        if self.stopping:
            # A node on its way out claims nothing and persists nothing.
            return
        if self.election.epoch > self._savedEpoch:
            self._saveEpoch()
        for action in actions:
            if isinstance(action, Stale):
                self.send(action.to, Message("stale", epoch=action.epoch, leader=action.leader))
            elif isinstance(action, Claimed):
                self.broadcast(self.heartbeatMessage())

    def _saveEpoch(self) -> None:
        """
        Persist the current epoch in a thread: an fsync on the reactor
        thread would hold up heartbeats.  One write at a time; the newest
        epoch is written once the running write ends.
        """
        if self._saving is not None:
            return
        epoch = self.election.epoch
        self._saving = self.runInThread(self.epochs.save, epoch)

        def saved(result: object) -> None:
            self._saving = None
            if isinstance(result, Failure):
                self.log.error(
                    "cannot save epoch {epoch}: {reason}", epoch=epoch, reason=result.getErrorMessage()
                )
            else:
                self._savedEpoch = max(self._savedEpoch, epoch)
            if not self.stopping and self.election.epoch > self._savedEpoch and not isinstance(result, Failure):
                self._saveEpoch()

        self._saving.addBoth(saved)

    def _notify(self) -> None:
        """
        Tell subscribers if role, leader, epoch or the live members changed.
        """
        election = self.election
        view = (election.role, election.leader, election.epoch, tuple(election.liveMembers()))
        if view == self._view:
            return
        self._view = view
        for callback in list(self._subscribers):
            callback()
