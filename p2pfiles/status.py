"""
What a node shows of itself: L{StatusBoard}.

The board builds the status object (C{p2pfiles status --json}, C{GET
/api/status}), notices when it changes, and tells everyone who watches: the
log, C{status --watch} connections, the web view's live stream, the event
timeline and the metrics.  It also keeps the transfers in flight.  It is
handed callables to read the node's parts; it never sees the node.
"""

from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.events import EventLog, Subscribers
from p2pfiles.metrics import NodeMetrics
from p2pfiles.web import IStatusSource


# Over how long the longest timer delay is reported.
TIMER_DELAY_WINDOW = 60.0


class Transfer:
    """
    One transfer in flight on this node.
    """

    def __init__(self, key: Any, direction: str, name: str, peer: str, size: int, started: float, progress: Callable[[], int]) -> None:
        self.key = key
        self.direction = direction
        self.name = name
        self.peer = peer
        self.size = size
        self.started = started
        self.progress = progress

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "direction": self.direction,
            "peer": self.peer,
            "bytes": self.progress(),
            "size": self.size,
            "started": self.started,
        }


def _replacedLostLeader(previous: Tuple[Any, ...], leader: int, members: Tuple[Tuple[int, bool], ...]) -> bool:
    """
    Whether a direct change from the leader in the snapshot C{previous} to
    C{leader} replaced a leader that was lost, rather than one that stepped
    aside for a returning smaller id.  It was lost if this node now counts
    it as down, or if C{leader} is a larger id: the smallest live id leads,
    so a larger one leads only when the smaller is gone.  A node that led
    itself has not lost itself.
    """
    role, before = previous[0], previous[1]
    if role == "leader":
        return False
    return not dict(members).get(before, True) or leader > before


@implementer(IStatusSource)
class StatusBoard:
    """
    The status of one node, and everyone who watches it.

    @param describe: returns the status object.
    @param view: returns C{(role, leader, epoch, ((member, alive), ...))},
        the part of the status whose changes are reported.
    @param listing: returns a Deferred firing with what C{ls --json} prints
        when asked of this node.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        describe: Callable[[], Dict[str, Any]],
        view: Callable[[], Tuple[Any, ...]],
        listing: Callable[[], Deferred],
        metrics: Optional[NodeMetrics] = None,
    ) -> None:
        self.clock = clock
        self.describe = describe
        self.view = view
        self._listing = listing
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.eventLog = EventLog(clock)
        self.transfersInFlight: Dict[Any, Transfer] = {}
        self._watchers = Subscribers()
        self._lastTick: Optional[float] = None
        self._delays: Deque[Tuple[float, float]] = deque()
        self._snapshot: Optional[Tuple[Any, ...]] = None
        # The last leader known, through spells without one.
        self._lastLeader: Optional[int] = None

    # IStatusSource

    def status(self) -> Dict[str, Any]:
        return self.describe()

    def listing(self) -> Deferred:
        return self._listing()

    def transfers(self) -> List[Dict[str, Any]]:
        return [t.describe() for t in self.transfersInFlight.values()]

    def events(self) -> List[Dict[str, Any]]:
        return self.eventLog.recent()

    def subscribe(self, callback: Callable[[str, Dict[str, Any]], None]) -> Callable[[], None]:
        stopStatus = self._watchers.subscribe(lambda status: callback("status", status))
        stopEvents = self.eventLog.subscribe(lambda event: callback("event", event))

        def unsubscribe() -> None:
            stopStatus()
            stopEvents()

        return unsubscribe

    # Watching the status alone (status --watch).

    @property
    def watching(self) -> int:
        return len(self._watchers)

    def watchStatus(self, callback: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        return self._watchers.subscribe(callback)

    # The reactor's health and the node's connections.

    def ticked(self, interval: float) -> None:
        """
        A periodic timer of C{interval} seconds ran: how late it ran is the
        reactor's longest stretch of work, as timers feel it.  Kept for a
        minute for C{status} (C{"max_timer_delay"}) and the metrics.
        """
        now = self.clock.seconds()
        if self._lastTick is not None:
            late = max(0.0, now - self._lastTick - interval)
            self._delays.append((now, late))
            self.metrics.timerDelay(late)
        self._lastTick = now
        while self._delays and self._delays[0][0] < now - TIMER_DELAY_WINDOW:
            self._delays.popleft()

    def maxTimerDelay(self) -> float:
        """
        The longest a tick ran late in the last minute, in seconds.
        """
        now = self.clock.seconds()
        return max((late for when, late in self._delays if when >= now - TIMER_DELAY_WINDOW), default=0.0)

    def countConnections(self, protocols: Iterable[Any]) -> None:
        """
        Count open connections by purpose (C{handshake} until known).
        """
        counts = {"control": 0, "request": 0, "handshake": 0}
        for protocol in protocols:
            purpose = protocol.peer.purpose if protocol.peer is not None else "handshake"
            counts[purpose] = counts.get(purpose, 0) + 1
        for purpose, count in counts.items():
            self.metrics.connections(purpose, count)

    # Changes.

    def changed(self) -> None:
        """
        Look at the status again; if role, leader, epoch or membership
        changed, log it, record events and metrics, and tell watchers.
        """
        snapshot = self.view()
        if snapshot == self._snapshot:
            return
        previous = self._snapshot
        self._snapshot = snapshot
        role, leader, epoch, members = snapshot
        metrics = self.metrics
        metrics.leadership(role == "leader", epoch)
        metrics.members(1 + sum(1 for _, alive in members if alive), sum(1 for _, alive in members if not alive))
        now = self.clock.seconds()
        if previous is None or (previous[1], previous[2]) != (leader, epoch):
            before = None if previous is None else previous[1]
            if leader is None:
                # Knowing none at start is not losing one.
                if before is not None:
                    metrics.leaderLost(now)
            else:
                if before is not None and before != leader and _replacedLostLeader(previous, leader, members):
                    # The next leader was known the moment the last was
                    # lost (this node claimed at once, or adopted the new
                    # epoch first): a failover too short to see here.
                    metrics.leaderLost(now)
                if self._lastLeader is not None and leader != self._lastLeader:
                    metrics.leaderChanged()
                self._lastLeader = leader
                metrics.leaderKnown(now)
                self.eventLog.add("leader", leader=leader, epoch=epoch)
        if previous is not None:
            before = dict(previous[3])
            for member, alive in members:
                # A newly learned member is only worth a line once it is up.
                if before.get(member, False) != alive:
                    self.log.info("member {id} is {state}", id=member, state="alive" if alive else "down")
                    self.eventLog.add("member-up" if alive else "member-down", member=member)
        if len(self._watchers):
            self._watchers.notify(self.describe())

    def rejected(self, reason: str, code: str, peer: str) -> None:
        """
        A connection or message was refused.
        """
        self.metrics.rejected(code)
        self.eventLog.add("rejected", reason=reason, code=code, peer=peer)

    # Transfers.

    def transferStarted(
        self, key: Any, direction: str, name: str, peer: str, size: int, progress: Callable[[], int]
    ) -> Callable[[Any], None]:
        """
        Record a transfer; return the callable to report its end with the
        number of bytes moved or a L{Failure}.
        """
        record = Transfer(key, direction, name, peer, size, self.clock.seconds(), progress)
        self.transfersInFlight[key] = record
        what = {"serve": "sending", "relay": "relay of", "receive": "receiving"}.get(direction, direction)

        def ended(result: Any) -> None:
            if self.transfersInFlight.get(key) is record:
                del self.transfersInFlight[key]
            seconds = self.clock.seconds() - record.started
            moved = record.progress()
            if direction in ("serve", "relay"):
                self.metrics.sent(direction, moved)
            else:
                self.metrics.received(moved)
            if isinstance(result, Failure):
                self.metrics.transferEnded("failed", seconds)
                self.eventLog.add(
                    "transfer-failed", name=name, direction=direction, peer=peer, reason=result.getErrorMessage()
                )
                self.log.warn(
                    "{what} {name} to {peer} failed: {reason}",
                    what=what,
                    name=name,
                    peer=peer,
                    reason=result.getErrorMessage(),
                )
            else:
                self.metrics.transferEnded("done", seconds)
                self.eventLog.add(
                    "transfer-done", name=name, direction=direction, peer=peer, bytes=moved, seconds=round(seconds, 3)
                )
                self.log.info(
                    "{what} {name} to {peer}: {bytes} bytes in {s:.2f}s",
                    what=what,
                    name=name,
                    peer=peer,
                    bytes=result,
                    s=seconds,
                )

        return ended
