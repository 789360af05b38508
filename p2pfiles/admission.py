"""
Who may open a connection to this node: caps on incoming connections, in
all and from one host, checked when a connection arrives, before any byte
of it is read.  A member that holds the secret is no more trusted here
than a stranger: no one peer may use up the node's memory or descriptors.

When the node is full, a newcomer is not always refused: one from a host
that holds few connections takes the place of a connection that has not
authenticated yet from the host that holds the most (see
L{ConnectionLimits.admit}).  A flood from a few hosts therefore cannot keep
an operator's C{status} out, and flooding hosts do not displace each other.

This module imports nothing else of the package.
"""

from collections import Counter
from typing import Any, Iterable, Optional, Sequence, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class ConnectionLimits:
    """
    Caps on the connections a listening port keeps open at once.

    @ivar total: most connections open at once, or None for no cap.
    @ivar perAddress: most open at once from one host, or None.
    @ivar refused: connections refused so far.
    @ivar evicted: unauthenticated connections closed so far to make room.
    """

    log = Logger()

    # At most one "refused a connection" (and one "made room") line per
    # this many seconds, so a flood of connections cannot flood the log.
    LOG_INTERVAL = 10.0

    def __init__(self, clock: IReactorTime, total: Optional[int], perAddress: Optional[int]) -> None:
        self.clock = clock
        self.total = total
        self.perAddress = perAddress
        self.refused = 0
        self.evicted = 0
        self._refusedLine = _RateLimitedLine(clock, self.LOG_INTERVAL)
        self._evictedLine = _RateLimitedLine(clock, self.LOG_INTERVAL)

    def admit(self, addr: Any, openHosts: Iterable[Optional[str]]) -> bool:
        """
        May a new connection from C{addr} be accepted, given the hosts of
        the connections open now (None for one with no IP address)?  If
        not, count it and say why (at most one line per L{LOG_INTERVAL}).
        Nothing is evicted: every open connection counts as authenticated.
        """
        admitted, _ = self.admitOrEvict(addr, [_Open(host) for host in openHosts])
        return admitted

    def admitOrEvict(self, addr: Any, open: Sequence[Any]) -> Tuple[bool, Any]:
        """
        May a new connection from C{addr} be accepted, given the
        connections open now (objects with C{host}, None for one with no IP
        address, C{authenticated} and C{openedAt})?  Returns C{(admitted,
        evict)}: C{evict} is the open connection to close to make room for
        the new one, or None.

        A newcomer is refused if its host holds L{perAddress} connections.
        When L{total} are open, it takes the place of the oldest
        connection that has not authenticated from the host that holds the
        most connections, if that host holds more than one more than the
        newcomer's; otherwise it is refused.
        """
        host = getattr(addr, "host", None)
        counts = Counter(c.host for c in open)
        mine = counts[host] if host is not None else 0
        if self.perAddress is not None and host is not None and mine >= self.perAddress:
            self._refuse(addr, f"{mine} connections from {host} are open, the most allowed from one address")
            return False, None
        if self.total is None or len(open) < self.total:
            return True, None
        victim = None
        most = mine + 1
        for c in open:
            if c.authenticated or c.host is None or c.host == host:
                continue
            n = counts[c.host]
            if n > most or (victim is not None and n == most and c.host == victim.host and c.openedAt < victim.openedAt):
                victim, most = c, n
        if victim is None:
            self._refuse(addr, f"{len(open)} connections are open, the most allowed")
            return False, None
        self.evicted += 1
        self._evictedLine.emit(
            self.log.warn,
            "closed an unauthenticated connection from {victim} ({count} open from there) to make room for one "
            "from {where} ({since} such since the last such line)",
            victim=victim.host,
            count=most,
            where=_where(addr),
        )
        return True, victim

    def _refuse(self, addr: Any, why: str) -> None:
        self.refused += 1
        self._refusedLine.emit(
            self.log.warn,
            "refused a connection from {where}: {why} ({since} refused since the last such line)",
            where=_where(addr),
            why=why,
        )


class _RateLimitedLine:
    """
    One kind of log line, at most once per C{interval} seconds, with the
    number of events it stands for.
    """

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.since = 0
        self.last: Optional[float] = None

    def emit(self, method: Any, format: str, **fields: Any) -> None:
        self.since += 1
        now = self.clock.seconds()
        if self.last is None or now - self.last >= self.interval:
            method(format, since=self.since, **fields)
            self.last = now
            self.since = 0


class _Open:
    """
    An open connection known only by its host, counted as authenticated.
    """

    authenticated = True
    openedAt = 0.0

    def __init__(self, host: Optional[str]) -> None:
        self.host = host


def _where(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return f"{host}:{getattr(addr, 'port', '?')}" if host is not None else str(addr)
