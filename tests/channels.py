"""
Securing test connections: a plain stand-in for TLS so that unit tests can
drive the protocol over L{StringTransport} and L{twisted.test.iosim}, node
certificates made once per test run, and real TLS joined in memory.

The package itself has no connection without TLS: L{PlainSecurity} lives
here, in the tests, and only here.
"""

from typing import Any, Dict, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from p2pfiles.channel import IChannelBinding, IConnectionSecurity
from p2pfiles.identity import NodeCertificate
from p2pfiles.protocol import LocalIdentity

# What every plain test connection presents and exports.
PLAIN_FINGERPRINT = "sha256:" + "5a" * 32
PLAIN_EXPORTER = b"plain test channel, not secret!!"


@implementer(IChannelBinding)
class PlainBinding:
    """
    A fixed channel binding.
    """

    def __init__(self, exporter: bytes, peer: Optional[str]) -> None:
        self._exporter = exporter
        self._peer = peer
        self.bulkSize: Optional[int] = None

    def exporter(self) -> bytes:
        return self._exporter

    def peerFingerprint(self) -> Optional[str]:
        return self._peer

    def carryBulk(self, size: int) -> None:
        self.bulkSize = size


@implementer(IConnectionSecurity)
class PlainSecurity:
    """
    Test connections that count as secured the moment they are made, each
    end presenting C{fingerprint} and seeing C{peer} at the other end, both
    exporting C{exporter}.  By default every end presents the same
    fingerprint, so that any two plain ends accept each other.
    """

    def __init__(
        self,
        fingerprint: Optional[str] = PLAIN_FINGERPRINT,
        peer: Optional[str] = PLAIN_FINGERPRINT,
        exporter: bytes = PLAIN_EXPORTER,
    ) -> None:
        self.fingerprint = fingerprint
        self.peer = peer
        self.exporter = exporter
        self.bindings = []

    def wrapClient(self, endpoint: Any, clock: Any) -> Any:
        return endpoint

    def wrapServer(self, endpoint: Any, clock: Any) -> Any:
        return endpoint

    def connected(self, protocol: Any) -> None:
        protocol.handshakeCompleted()

    def binding(self, transport: Any) -> PlainBinding:
        binding = PlainBinding(self.exporter, self.peer)
        self.bindings.append(binding)
        return binding


PLAIN = PlainSecurity()


def plainIdentity(
    role: str,
    node: Optional[int],
    address: Optional[str],
    secret: bytes,
    purpose: str = "request",
    security: Optional[PlainSecurity] = None,
    pins: Any = None,
) -> LocalIdentity:
    """
    A L{LocalIdentity} whose connections use L{PlainSecurity}.
    """
    return LocalIdentity(role, node, address, secret, purpose, security or PLAIN, pins)


_certificates: Dict[Any, NodeCertificate] = {}


def certificate(name: Any) -> NodeCertificate:
    """
    A node certificate for C{name}, made once per test run (the same name
    gives the same certificate).
    """
    if name not in _certificates:
        _certificates[name] = NodeCertificate.generate()
    return _certificates[name]


def tlsConnect(
    serverFactory: Any,
    clientFactory: Any,
    clock: Any,
    serverAddress: IPv4Address = IPv4Address("TCP", "127.0.0.1", 9001),
    clientAddress: IPv4Address = IPv4Address("TCP", "127.0.0.1", 50001),
) -> Tuple[Any, Any, IOPump]:
    """
    Join a protocol of C{serverFactory} and one of C{clientFactory} (TLS
    factories, from L{p2pfiles.tls.TLS.serverFactory} and C{clientFactory})
    in memory and run them until quiet.  Return the server's TLS protocol,
    the client's, and the pump.
    """
    server = serverFactory.buildProtocol(clientAddress)
    client = clientFactory.buildProtocol(serverAddress)
    serverTransport = FakeTransport(server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress)
    clientTransport = FakeTransport(client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress)
    pump = connect(server, serverTransport, client, clientTransport, greet=True, clock=clock)
    return server, client, pump
