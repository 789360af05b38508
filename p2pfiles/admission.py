"""
Who may open a connection to this node: caps on incoming connections, in
all and from one host, checked when a connection arrives, before any byte
of it is read.  A member that holds the secret is no more trusted here
than a stranger: no one peer may use up the node's memory or descriptors.

This module imports nothing else of the package.
"""

from typing import Any, Iterable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class ConnectionLimits:
    """
    Caps on the connections a listening port keeps open at once.

    @ivar total: most connections open at once, or None for no cap.
    @ivar perAddress: most open at once from one host, or None.
    """

    log = Logger()

    # At most one "refused a connection" line per this many seconds, so a
    # flood of connections cannot flood the log.
    LOG_INTERVAL = 10.0

    def __init__(self, clock: IReactorTime, total: Optional[int], perAddress: Optional[int]) -> None:
        self.clock = clock
        self.total = total
        self.perAddress = perAddress
        self.refused = 0
        self._sinceLogged = 0
        self._lastLogged: Optional[float] = None

    def admit(self, addr: Any, openHosts: Iterable[Optional[str]]) -> bool:
        """
        May a new connection from C{addr} be accepted, given the hosts of
        the connections open now (None for one with no IP address)?  If not, count it and say why (at most one
        line per L{LOG_INTERVAL}).
        """
        hosts = list(openHosts)
        host = getattr(addr, "host", None)
        why = None
        if self.total is not None and len(hosts) >= self.total:
            why = f"{len(hosts)} connections are open, the most allowed"
        elif self.perAddress is not None and host is not None:
            count = sum(1 for h in hosts if h == host)
            if count >= self.perAddress:
                why = f"{count} connections from {host} are open, the most allowed from one address"
        if why is None:
            return True
        self.refused += 1
        self._sinceLogged += 1
        now = self.clock.seconds()
        if self._lastLogged is None or now - self._lastLogged >= self.LOG_INTERVAL:
            where = f"{host}:{getattr(addr, 'port', '?')}" if host is not None else str(addr)
            self.log.warn(
                "refused a connection from {where}: {why} ({count} refused since the last such line)",
                where=where,
                why=why,
                count=self._sinceLogged,
            )
            self._lastLogged = now
            self._sinceLogged = 0
        return False
