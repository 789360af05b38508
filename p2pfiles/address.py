"""
Node addresses as written on the command line and on the wire: C{HOST:PORT},
or C{[V6HOST]:PORT}; and the endpoints that reach them.
"""

from typing import Any, Tuple

from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint


def formatAddress(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parseAddress(text: str) -> Tuple[str, int]:
    """
    Split C{HOST:PORT} (or C{[V6HOST]:PORT}) into host and port; raise
    L{ValueError} with a one-line reason if it is not one.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} has no valid port")
    return host, int(port)


def clientEndpoint(reactor: Any, address: str, timeout: float, security: Any) -> Any:
    """
    The endpoint that connects to C{address} (C{HOST:PORT}), secured by
    C{security} (an L{p2pfiles.channel.IConnectionSecurity}: TLS); raises
    L{ValueError} if the address is not one.  HostnameEndpoint handles
    IPv4, IPv6 and names alike.

    This and L{serverEndpoint} are the one place where endpoints are made,
    so that no connection goes without TLS.
    """
    host, port = parseAddress(address)
    return security.wrapClient(HostnameEndpoint(reactor, host, port, timeout=timeout), reactor)


def serverEndpoint(reactor: Any, interface: str, port: int, security: Any) -> Any:
    """
    The endpoint that listens on C{interface} and C{port}, every accepted
    connection secured by C{security}.
    """
    if ":" in interface:
        return security.wrapServer(TCP6ServerEndpoint(reactor, port, interface=interface), reactor)
    return security.wrapServer(TCP4ServerEndpoint(reactor, port, interface=interface), reactor)
