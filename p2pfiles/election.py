"""
Who leads: the live node with the smallest id, in a numbered epoch.

L{ElectionState} is the whole decision.  It is fed events (a control link
came up or went down, a heartbeat or a stale-epoch notice arrived, time
passed) and answers with the actions the node must carry out.  It knows
nothing of sockets or files, so every start order, failure and rejoin can be
played against it with a L{twisted.internet.task.Clock}.

The rules:
  - A member is live while its control link is up and it has been heard from
    within C{leaderTimeout}; this node is always live to itself.
  - Every heartbeat carries the sender's epoch and the leader it follows.  A
    higher epoch is adopted at once, with its leader; a leadership claim with
    a lower epoch is answered with a L{Stale} notice naming the current one.
  - A node claims leadership, with an epoch one above the highest it has
    seen, when it is the smallest live id and it is I{ready}: it has heard a
    heartbeat from every peer it knows of, or C{leaderTimeout} has passed
    since it started.  Being ready first is what makes a returning smaller id
    learn the current epoch and members before it takes over, so it claims
    once, with a fresh epoch, and nobody flaps.
  - A follower whose leader's link drops, or whose leader stays silent past
    C{leaderTimeout}, forgets it; the smallest live id then claims.
"""

from typing import Dict, Iterable, List, Optional, Set

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

LEADER = "leader"
FOLLOWER = "follower"
CANDIDATE = "candidate"


class Stale:
    """
    Action: tell member C{to} that its leadership claim is from an old epoch.
    """

    def __init__(self, to: int, epoch: int, leader: Optional[int]) -> None:
        self.to = to
        self.epoch = epoch
        self.leader = leader

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stale) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Stale(to={self.to}, epoch={self.epoch}, leader={self.leader})"


class Claimed:
    """
    Action: this node has just become leader of C{epoch}.  The node must
    persist the epoch and announce it to every member at once.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Claimed) and self.epoch == other.epoch

    def __repr__(self) -> str:
        return f"Claimed({self.epoch})"


class ElectionState:
    """
    The election as seen from node C{me}.

    @ivar role: L{LEADER}, L{FOLLOWER} or L{CANDIDATE} (no leader known).
    @ivar leader: the id of the leader this node follows, or L{None}.
    @ivar epoch: the highest epoch this node has seen.
    """

    log = Logger()

    def __init__(
        self,
        me: int,
        clock: IReactorTime,
        leaderTimeout: float,
        epoch: int = 0,
        knownPeers: Iterable[int] = (),
    ) -> None:
        self.me = me
        self.clock = clock
        self.leaderTimeout = leaderTimeout
        self.epoch = epoch
        self.role = CANDIDATE
        self.leader: Optional[int] = None
        self._leaderSince = 0.0
        self._startedAt = clock.seconds()
        # Members whose control link is up -> when last heard from (None:
        # link up, no heartbeat yet).
        self._links: Dict[int, Optional[float]] = {}
        self._known: Set[int] = set(knownPeers) - {me}
        self._heard: Set[int] = set()

    # What the node asks.

    def isLive(self, member: int) -> bool:
        if member == self.me:
            return True
        last = self._links.get(member)
        return last is not None and self.clock.seconds() - last <= self.leaderTimeout

    def liveMembers(self) -> List[int]:
        """
        Every live id, this node's included, sorted.
        """
        return sorted([self.me] + [m for m in self._links if self.isLive(m)])

    def isReady(self) -> bool:
        if self.clock.seconds() - self._startedAt >= self.leaderTimeout:
            return True
        return self._known <= self._heard

    # Events.

    def peerKnown(self, member: int) -> List[object]:
        """
        A peer was configured or learned from a heartbeat.
        """
        if member != self.me:
            self._known.add(member)
        return []

    def memberUp(self, member: int) -> List[object]:
        """
        An authenticated control link to C{member} is up.
        """
        self._known.add(member)
        self._links.setdefault(member, None)
        return []

    def memberDown(self, member: int) -> List[object]:
        """
        The last control link to C{member} closed.
        """
        self._links.pop(member, None)
        if member == self.leader:
            self._loseLeader(f"link to leader {member} closed")
        return self._evaluate()

    def heartbeatReceived(self, sender: int, epoch: int, leader: Optional[int]) -> List[object]:
        """
        C{sender} says it is in C{epoch} following C{leader}.
        """
        now = self.clock.seconds()
        self._links[sender] = now
        self._known.add(sender)
        self._heard.add(sender)
        actions: List[object] = []
        if epoch > self.epoch:
            self._adopt(epoch, leader, f"heartbeat from {sender}")
        elif epoch == self.epoch and leader is not None and leader != self.leader:
            if self.leader == self.me:
                # Two leaders in one epoch (a healed split).  The smaller id
                # wins; if that is us, we claim a new epoch below so that the
                # leadership is unambiguous.
                self._loseLeader(f"node {leader} also leads epoch {epoch}")
                if leader < self.me:
                    self._follow(leader)
            elif self.leader is None or leader < self.leader:
                self._follow(leader)
        elif leader is not None and leader == sender:
            stale = self.staleFrom(sender, epoch)
            if stale is not None:
                actions.append(stale)
        return actions + self._evaluate()

    def staleFrom(self, sender: int, epoch: int) -> Optional[Stale]:
        """
        If C{epoch} is older than ours, log it and return the L{Stale} notice
        for C{sender}: whatever it sent must not be acted on.
        """
        if epoch >= self.epoch:
            return None
        self.log.info(
            "rejected message from {sender}: stale epoch {old} < {current}",
            sender=sender,
            old=epoch,
            current=self.epoch,
        )
        return Stale(sender, self.epoch, self.leader)

    def staleReceived(self, sender: int, epoch: int, leader: Optional[int]) -> List[object]:
        """
        C{sender} told us our epoch is old.
        """
        if epoch > self.epoch:
            self._adopt(epoch, leader, f"stale notice from {sender}")
        return self._evaluate()

    def tick(self) -> List[object]:
        """
        Time passed: forget a silent leader, claim if it is our turn.
        """
        if self.leader is not None and self.leader != self.me:
            last = self._links.get(self.leader)
            heard = max(last or 0.0, self._leaderSince)
            if self.clock.seconds() - heard > self.leaderTimeout:
                self._loseLeader(f"leader {self.leader} silent for over {self.leaderTimeout:g}s")
        return self._evaluate()

    def resumed(self) -> List[object]:
        """
        This process was suspended (its timers ran late by more than the
        leader timeout).  Silence seen across the gap is ours, not our peers':
        give every member a fresh start, and hear from them again before
        claiming anything.
        """
        now = self.clock.seconds()
        for member in self._links:
            self._links[member] = now
        self._leaderSince = now
        self._startedAt = now
        self._heard = set()
        return []

    # Transitions.

    def _adopt(self, epoch: int, leader: Optional[int], why: str) -> None:
        self.epoch = epoch
        if leader is None:
            self._loseLeader(f"epoch {epoch} has no leader yet ({why})")
        else:
            self._follow(leader)

    def _follow(self, leader: int) -> None:
        if leader == self.me:
            # Our own claim echoed back in an epoch we did not hold: claim
            # afresh rather than trust it.
            self._loseLeader("our own old claim came back")
            return
        self.leader = leader
        self.role = FOLLOWER
        self._leaderSince = self.clock.seconds()
        self.log.info("following {leader} in epoch {epoch}", leader=leader, epoch=self.epoch)

    def _loseLeader(self, why: str) -> None:
        if self.leader is not None or self.role != CANDIDATE:
            self.log.info("no leader: {why}", why=why)
        self.leader = None
        self.role = CANDIDATE

    def _evaluate(self) -> List[object]:
        if self.role == LEADER:
            return []
        if not self.isReady() or self.liveMembers()[0] != self.me:
            return []
        self.epoch += 1
        self.role = LEADER
        self.leader = self.me
        self._leaderSince = self.clock.seconds()
        self.log.info(
            "node {me} leads epoch {epoch} (members {members})",
            me=self.me,
            epoch=self.epoch,
            members=", ".join(str(m) for m in self.liveMembers()),
        )
        return [Claimed(self.epoch)]
