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
    node follows a leader only on that leader's own word (the sender is the
    leader it names), and only when the claim agrees with the rule as this
    node sees it: no live id smaller than the claimant is known here that
    itself claims to lead (this node counts when it leads and is ready).  Such a claim
    with a higher epoch is adopted at once; a leadership claim with a lower
    epoch is answered with a L{Stale} notice naming the current one.  Any
    other claim (a member naming another leader that is not live here, or a
    larger id while a smaller live one leads) is answered with a L{Stale} notice, logged once
    per sender and epoch, and not adopted (a node that does not lead just
    waits, silently, when the leader named is a member it knows of: just
    started, it hears a follower before its leader); a leader that sees one with a
    higher epoch moves above it and claims again, so epochs only go up and
    a bad member cannot move the leadership.
  - A node claims leadership, with an epoch one above the highest it has
    seen, when it is the smallest live id and it is I{ready}: it has heard a
    heartbeat from every peer it knows of, or C{startGrace} has passed
    since it started (C{leaderTimeout} since it resumed from a suspension,
    and never before the start grace ends).
    Being ready first is what makes a returning smaller id learn the
    current epoch and members before it takes over, so it claims once, with
    a fresh epoch, and nobody flaps; and the grace, longer than the leader
    timeout, is what keeps nodes started together (a cluster's boot, many
    processes on few cores) from each leading in turn while the smaller ids
    are still starting: a peer that is not listening yet and a dead one look
    alike, so only time tells them apart.
  - A follower whose leader's link drops, or whose leader stays silent past
    C{leaderTimeout}, forgets it; the smallest live id then claims.
"""

from typing import Dict, Iterable, List, Optional, Set, Tuple

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
        startGrace: Optional[float] = None,
    ) -> None:
        self.me = me
        self.clock = clock
        self.leaderTimeout = leaderTimeout
        # Never shorter than the leader timeout; by default equal to it.
        self.startGrace = leaderTimeout if startGrace is None else max(leaderTimeout, startGrace)
        self.epoch = epoch
        self.role = CANDIDATE
        self.leader: Optional[int] = None
        self._leaderSince = 0.0
        self._startedAt = clock.seconds()
        # Ready by then even without hearing from every known peer.
        self._readyAt = self._startedAt + self.startGrace
        # Members whose control link is up -> when last heard from (None:
        # link up, no heartbeat yet).
        self._links: Dict[int, Optional[float]] = {}
        self._known: Set[int] = set(knownPeers) - {me}
        self._heard: Set[int] = set()
        # Each member's leader, as its latest heartbeat named it.
        self._says: Dict[int, Optional[int]] = {}
        # (sender, epoch) of claims refused, so each is logged once.
        self._refused: Set[Tuple[int, int]] = set()

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
        if self.clock.seconds() >= self._readyAt:
            return True
        return self._known <= self._heard

    def unheard(self) -> List[int]:
        """
        The peers this node knows of and has not heard a heartbeat from
        since it started (or resumed), sorted.
        """
        return sorted(self._known - self._heard)

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
        self._says.pop(member, None)
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
        self._says[sender] = leader
        actions: List[object] = []
        if leader is not None and (epoch > self.epoch or (epoch == self.epoch and leader != self.leader)):
            if sender != leader and (self.isLive(leader) or (self.role != LEADER and leader in self._known)):
                # A member reporting whom it follows: wait for that
                # leader's own heartbeat (a node just started hears a
                # follower before its leader).  A leader answers a report
                # naming a member not live here, and moves above it.
                return self._evaluate()
            refusal = self._refusal(sender, epoch, leader)
            if refusal is not None:
                return [refusal] + self._evaluate()
        if epoch > self.epoch:
            if leader is not None:
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

    def _refusal(self, sender: int, epoch: int, leader: int) -> Optional[Stale]:
        """
        If C{sender}'s claim that C{leader} leads C{epoch} is not one to
        follow (see the module's rules), log it once and return the
        L{Stale} answer; a leader seeing it with a higher epoch moves its
        own epoch above it and claims again.  None if the claim is sound.
        """
        why = None
        if sender != leader:
            why = f"node {sender} names {leader} as leader, not on {leader}'s own word"
        else:
            for member in self.liveMembers():
                if member >= leader:
                    break
                # This node defers unless it leads, is ready and holds an
                # epoch no older than the claim: otherwise it learns the
                # newer epoch, and claims above it at once if it should.
                if member == self.me:
                    leads = self.role == LEADER and self.isReady() and epoch <= self.epoch
                else:
                    leads = self._says.get(member) == member
                if leads:
                    why = f"node {member} is live and leads, and is smaller than {leader}"
                    break
        if why is None:
            return None
        if (sender, epoch) not in self._refused:
            self._refused.add((sender, epoch))
            self.log.warn(
                "refused the claim of {sender} that {leader} leads epoch {epoch}: {why}",
                sender=sender,
                leader=leader,
                epoch=epoch,
                why=why,
            )
        if self.role == LEADER and epoch > self.epoch:
            self.epoch = epoch
            self._loseLeader(f"a claim of epoch {epoch} to move above")
        return Stale(sender, self.epoch, self.leader)

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
            # Pointed at a newer epoch: its leader is followed on its own
            # word only; a leader moves above any other.
            if sender == leader and self._refusal(sender, epoch, leader) is None:
                self._adopt(epoch, leader, f"stale notice from {sender}")
            elif self.role == LEADER:
                self.epoch = epoch
                self._loseLeader(f"stale notice from {sender}: epoch {epoch}")
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
        # Hear from every peer again, or wait the leader timeout; a node
        # still in its start grace (a start slow enough to look like a
        # suspension) waits at least until the grace ends.
        self._startedAt = now
        self._readyAt = max(self._readyAt, now + self.leaderTimeout)
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
        unheard = self.unheard()
        if unheard:
            self.log.info(
                "claimed without hearing from {unheard}: waited {wait:g}s for them",
                unheard=", ".join(str(m) for m in unheard),
                wait=round(self.clock.seconds() - self._startedAt, 3),
            )
        return [Claimed(self.epoch)]
