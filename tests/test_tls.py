"""
Tests for TLS on p2pfiles connections (L{p2pfiles.tls}), the proofs bound to
the channel (L{p2pfiles.auth}), pins, and node identities
(L{p2pfiles.identity}): real TLS, joined in memory with
L{twisted.test.iosim}.
"""

import os
import stat
from typing import Any, List, Optional

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import auth
from p2pfiles.channel import ChannelError
from p2pfiles.identity import (
    IdentityError,
    NodeCertificate,
    Pins,
    parseFingerprint,
    stateIdentity,
)
from p2pfiles.protocol import HANDSHAKE_TIMEOUT, LocalIdentity, P2PFactory, P2PProtocol
from p2pfiles.tap import Options, parsePeer, readCluster
from p2pfiles.tls import (
    ACCEPTED_BUFFER,
    FIRST_RECORD_LIMIT,
    GATHER_LIMIT,
    RECEIVE_BATCH,
    RECORD_OVERHEAD,
    TLS,
    TLSBinding,
)
from p2pfiles.wire import Message
from tests.channels import PLAIN_FINGERPRINT, PlainSecurity, certificate, plainIdentity, tlsConnect
from tests.test_protocol import RecordingHandler, linesFrom

SECRET = b"cluster secret"


def nodeIdentity(node: int, secret: bytes = SECRET, purpose: str = "control", pins: Any = None) -> LocalIdentity:
    return LocalIdentity("node", node, f"127.0.0.1:{9000 + node}", secret, purpose, TLS(certificate(node)), pins)


def clientIdentity(secret: bytes = SECRET, pins: Any = None) -> LocalIdentity:
    return LocalIdentity("client", None, None, secret, "request", TLS(), pins)


class RecordingFactory(P2PFactory):
    """
    Keeps the last protocol it built (the TLS layer lets go of it when the
    connection closes).
    """

    built: Optional[P2PProtocol] = None

    def buildProtocol(self, addr: Any) -> P2PProtocol:
        self.built = super().buildProtocol(addr)
        return self.built


class End:
    """
    One end of a TLS connection: its handler, its factory, and (once
    connected) its P2PProtocol inside the TLS layer.
    """

    def __init__(self, identity: LocalIdentity, clock: Clock, listening: bool, expectedNode: Optional[int] = None):
        self.identity = identity
        self.handler = RecordingHandler()
        self.factory = RecordingFactory(identity, self.handler, clock, listening=listening, expectedNode=expectedNode)
        security = identity.security
        self.tls = security.serverFactory(self.factory, clock) if listening else security.clientFactory(self.factory, clock)
        self.protocol: Optional[P2PProtocol] = None


def tlsPair(listener: LocalIdentity, connector: LocalIdentity, expectedNode: Optional[int] = None):
    """
    A listening and a connecting P2PProtocol over real TLS, in memory, run
    until quiet.
    """
    clock = Clock()
    server = End(listener, clock, True)
    client = End(connector, clock, False, expectedNode)
    serverTLS, clientTLS, pump = tlsConnect(server.tls, client.tls, clock)
    server.protocol = server.factory.built
    client.protocol = client.factory.built
    return server, client, pump, clock


def captureLogs(case: SynchronousTestCase) -> List[dict]:
    events: List[dict] = []
    case.patch(P2PProtocol, "log", Logger(observer=events.append))
    return events


class TLSHandshakeTests(SynchronousTestCase):
    """
    The p2pfiles handshake over real TLS.
    """

    def test_rightSecret(self) -> None:
        """
        Two nodes with the same secret authenticate over TLS 1.3: each end's
        peer carries the fingerprint of the certificate the other presented,
        and both ends bound their proofs to the same exporter value.
        """
        server, client, pump, clock = tlsPair(nodeIdentity(1), nodeIdentity(2))
        self.assertTrue(server.protocol.isReady())
        self.assertTrue(client.protocol.isReady())
        self.assertEqual(server.protocol.peer.fingerprint, certificate(2).fingerprint)
        self.assertEqual(client.protocol.peer.fingerprint, certificate(1).fingerprint)
        self.assertEqual(server.protocol.channel.exporter(), client.protocol.channel.exporter())
        self.assertEqual(len(server.protocol.channel.exporter()), 32)
        self.assertEqual(server.protocol.channel.version, "TLSv1.3")
        client.protocol.sendMessage(Message("status", watch=False))
        pump.flush()
        self.assertEqual(server.handler.messages, [Message("status", watch=False)])

    def test_clientWithoutCertificate(self) -> None:
        """
        A client presents no certificate: the node still accepts it, and
        sees no fingerprint for it.
        """
        server, client, pump, clock = tlsPair(nodeIdentity(1), clientIdentity())
        self.assertTrue(server.protocol.isReady())
        self.assertIsNone(server.protocol.peer.fingerprint)
        self.assertEqual(client.protocol.peer.fingerprint, certificate(1).fingerprint)

    def test_wrongSecret(self) -> None:
        """
        A wrong secret over TLS: neither end opens, the connector records an
        C{auth} refusal, the listener logs one line.
        """
        events = captureLogs(self)
        server, client, pump, clock = tlsPair(nodeIdentity(1), nodeIdentity(2, secret=b"other"))
        self.assertFalse(server.protocol.isReady())
        self.assertFalse(client.protocol.isReady())
        self.assertEqual(client.protocol.refusal[0], "auth")
        (line,) = linesFrom(events, server.protocol)
        self.assertIn("authentication failed", line)

    def test_nothingBeforeTLS(self) -> None:
        """
        The connector says nothing until TLS is up: before its handshake
        completes its protocol has no channel and has written no byte of
        p2pfiles protocol (the first bytes on the wire are a TLS record).
        """
        clock = Clock()
        client = End(nodeIdentity(2), clock, False)
        tlsProtocol = client.tls.buildProtocol(None)
        transport = FakeTransport(tlsProtocol, isServer=False)
        tlsProtocol.makeConnection(transport)
        inner = tlsProtocol.wrappedProtocol
        self.assertIsNone(inner.channel)
        written = b"".join(transport.stream)
        self.assertEqual(written[:1], b"\x16")  # a TLS handshake record
        self.assertNotIn(b"hello", written)
        inner.transport.abortConnection()

    def test_notTLS(self) -> None:
        """
        A protocol whose connection is not TLS cannot be bound: the TLS
        security refuses to give a binding, and the protocol drops the
        connection rather than speak in the clear.
        """
        self.assertRaises(ChannelError, TLSBinding, FakeTransport(Protocol(), isServer=True))
        events = captureLogs(self)
        clock = Clock()
        protocol = P2PProtocol(nodeIdentity(1), RecordingHandler(), clock, listening=True)
        transport = FakeTransport(protocol, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.9", 4))
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.channel)
        self.assertEqual(transport.stream, [])
        (line,) = linesFrom(events, protocol)
        self.assertIn("not TLS", line)


class Collector(Protocol):
    """
    Records each delivery of bytes, and the end of the connection.
    """

    def __init__(self) -> None:
        self.deliveries: List[bytes] = []
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.deliveries.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


def bulkPair():
    """
    Two TLS layers joined in memory, with L{Collector}s above them.
    """
    clock = Clock()
    serverFactory = TLS(certificate(1)).serverFactory(Factory.forProtocol(Collector), clock)
    clientFactory = TLS(certificate(2)).clientFactory(Factory.forProtocol(Collector), clock)
    server = serverFactory.buildProtocol(None)
    client = clientFactory.buildProtocol(None)
    serverTransport = FakeTransport(server, isServer=True)
    clientTransport = FakeTransport(client, isServer=False)
    pump = connect(server, serverTransport, client, clientTransport, greet=True, clock=clock)
    return server, client, clientTransport, pump, clock


class BulkTLSTests(SynchronousTestCase):
    """
    The TLS layer moves file bytes in large pieces: a large write leaves as
    one TCP write, and what one TCP read completes goes up in one piece.
    """

    def pair(self):
        return bulkPair()

    def test_cipher(self) -> None:
        """
        AES-128-GCM under TLS 1.3 is negotiated, between nodes and with a
        client: the fastest of the suites where the CPU has AES instructions.
        """
        for connector in (nodeIdentity(2), clientIdentity()):
            server, client, pump, clock = tlsPair(nodeIdentity(1), connector)
            self.assertEqual(server.protocol.channel.cipher, "TLS_AES_128_GCM_SHA256")
            self.assertEqual(client.protocol.channel.cipher, "TLS_AES_128_GCM_SHA256")

    def test_largeWrite(self) -> None:
        """
        A 1 MiB write becomes one write to TCP (its 64 records together),
        and the receiver gets the 1 MiB intact, in pieces of
        L{RECEIVE_BATCH} (not one per 16 KiB record).
        """
        server, client, clientTransport, pump, clock = self.pair()
        data = os.urandom(1024 * 1024)
        client.write(data)
        self.assertEqual(len(clientTransport.stream), 1)
        self.assertGreater(len(clientTransport.stream[0]), len(data))
        pump.flush()
        deliveries = server.wrappedProtocol.deliveries
        self.assertEqual([len(piece) for piece in deliveries], [RECEIVE_BATCH] * (len(data) // RECEIVE_BATCH))
        self.assertEqual(b"".join(deliveries), data)

    def test_oneCallPerWrite(self) -> None:
        """
        A 1 MiB write is one call into OpenSSL, not one per 16 KiB record:
        partial writes are off in p2pfiles' contexts.
        """
        server, client, clientTransport, pump, clock = self.pair()
        calls = []
        send = SSL.Connection.send

        def counting(connection: Any, data: Any, *args: Any) -> int:
            calls.append(len(data))
            return send(connection, data, *args)

        self.patch(SSL.Connection, "send", counting)
        client.write(os.urandom(1024 * 1024))
        self.assertEqual(calls, [1024 * 1024])

    def test_smallWritesGathered(self) -> None:
        """
        Small writes still wait for the next turn of the clock and leave as
        one record.
        """
        server, client, clientTransport, pump, clock = self.pair()
        client.write(b"one")
        client.write(b"two")
        self.assertEqual(clientTransport.stream, [])
        clock.advance(0)
        self.assertEqual(len(clientTransport.stream), 1)
        pump.flush()
        self.assertEqual(server.wrappedProtocol.deliveries, [b"onetwo"])

    def test_tcpSizesForBulkOnly(self) -> None:
        """
        A TLS connection keeps TCP's small defaults (64 KiB reads and pause
        threshold, 128 KiB per send), so that one nobody reads costs little;
        once it carries file bytes (C{carryBulk}), TCP reads, sends and
        buffers a whole chunk's records, and a larger size is never lowered.
        """
        chunk = 256 * 1024 + 16 * RECORD_OVERHEAD
        for before, after in [((64 * 1024, 128 * 1024), None), ((4 * chunk, 4 * chunk), (4 * chunk, 4 * chunk))]:
            server, client, clientTransport, pump, clock = self.pair()
            clientTransport.bufferSize, clientTransport.SEND_LIMIT = before
            binding = TLSBinding(client)
            self.assertEqual((clientTransport.bufferSize, clientTransport.SEND_LIMIT), before)
            binding.carryBulk(256 * 1024)
            if after is None:
                self.assertGreaterEqual(clientTransport.bufferSize, chunk)
                self.assertEqual(clientTransport.SEND_LIMIT, clientTransport.bufferSize)
            else:
                self.assertEqual((clientTransport.bufferSize, clientTransport.SEND_LIMIT), after)

    def test_bytesBeforeClose(self) -> None:
        """
        Bytes followed by a TLS close reach the receiver whole, before its
        connection ends cleanly.
        """
        server, client, clientTransport, pump, clock = self.pair()
        received = server.wrappedProtocol
        data = os.urandom(300 * 1024)
        client.write(data)
        client.loseConnection()
        pump.flush()
        self.assertEqual(b"".join(received.deliveries), data)
        self.assertIsNotNone(received.lost)
        self.assertTrue(received.lost.check(ConnectionDone))


class RelayTests(SynchronousTestCase):
    """
    A man in the middle that holds no secret cannot pass a handshake on,
    whatever it relays.
    """

    def relay(self, connector: LocalIdentity, listener: LocalIdentity, rewrite=None):
        """
        Connector -> relay -> listener, each leg real TLS; the relay, with a
        certificate of its own and no secret, passes every byte of p2pfiles
        protocol from one leg to the other (through C{rewrite}, if given).
        """
        clock = Clock()
        relayTLS = TLS(certificate("relay"))
        legs: dict = {}

        class Leg(Protocol):
            def __init__(self, name: str) -> None:
                self.name = name
                self.seen: List[bytes] = []

            def dataReceived(self, data: bytes) -> None:
                self.seen.append(data)
                other = legs["toListener" if self.name == "fromConnector" else "fromConnector"]
                other.transport.write(rewrite(self.name, data) if rewrite else data)

        def leg(name: str) -> Factory:
            def build() -> Leg:
                legs[name] = Leg(name)
                return legs[name]

            return Factory.forProtocol(build)

        server = End(listener, clock, True)
        client = End(connector, clock, False)
        # The relay's leg towards the real listener connects first.
        serverTLS, relayOut, pumpOut = tlsConnect(server.tls, relayTLS.clientFactory(leg("toListener"), clock), clock)
        relayIn, clientTLS, pumpIn = tlsConnect(relayTLS.serverFactory(leg("fromConnector"), clock), client.tls, clock)
        for _ in range(20):
            pumpIn.flush()
            pumpOut.flush()
        server.protocol = server.factory.built
        client.protocol = client.factory.built
        return server, client, legs

    def assertRelayRefused(self, server: End, client: End, legs: dict) -> None:
        self.assertFalse(server.protocol.isReady())
        self.assertFalse(client.protocol.isReady())
        self.assertEqual(server.handler.ready, 0)
        self.assertEqual(client.handler.ready, 0)
        self.assertEqual(server.handler.messages, [])
        self.assertEqual(client.handler.messages, [])
        # The relay did carry the handshake: it is the proofs that failed.
        self.assertIn(b'"type":"hello"', b"".join(legs["fromConnector"].seen))

    def test_relayedHandshakeIsRefused(self) -> None:
        """
        The attack that bound a down peer's port: the leader's link
        (node 1, with the secret) reaches a relay that forwards every
        message to node 3 unchanged, with its own certificate on both legs.
        Node 3 refuses it (the hello names node 1's certificate, the
        connection presented the relay's), node 1 never opens, nothing is
        served.
        """
        events = captureLogs(self)
        server, client, legs = self.relay(nodeIdentity(1), nodeIdentity(3))
        self.assertRelayRefused(server, client, legs)
        (line,) = linesFrom(events, server.protocol)
        self.assertIn(certificate("relay").fingerprint, line)

    def test_relayRewritingHellosIsRefused(self) -> None:
        """
        A relay that rewrites the fingerprints in both hellos to its own
        certificate's, and the node id to 77, gets past the fingerprint
        check, and still fails: each end's proof covers its own exporter
        value and the hellos it saw, which the relay cannot make agree.
        """
        relay = certificate("relay").fingerprint.encode()
        node1 = certificate(1).fingerprint.encode()
        node3 = certificate(3).fingerprint.encode()

        def rewrite(leg: str, data: bytes) -> bytes:
            data = data.replace(node1, relay).replace(node3, relay)
            # Same length, so the frame's prefix stays right.
            return data.replace(b'"node":1,', b'"node":7,')

        events = captureLogs(self)
        server, client, legs = self.relay(nodeIdentity(1), nodeIdentity(3), rewrite)
        self.assertRelayRefused(server, client, legs)
        lines = linesFrom(events, server.protocol) + linesFrom(events, client.protocol)
        self.assertTrue(any("authentication failed" in line for line in lines), lines)

    def test_relayedClientIsRefused(self) -> None:
        """
        A client (no certificate) relayed to a node by a relay that shows no
        certificate to the node either: the node's checks of the client's
        hello pass, but the client sees the relay's certificate where the
        node's hello names the node's, and refuses before proving anything.
        """
        clock = Clock()
        server, client, legs = self.relay(clientIdentity(), nodeIdentity(3))
        self.assertRelayRefused(server, client, legs)
        self.assertEqual(client.protocol.refusal[0], "auth")
        sent = b"".join(legs["toListener"].seen) + b"".join(legs["fromConnector"].seen)
        self.assertNotIn(b'"type":"ready"', sent)


class ExporterBindingTests(SynchronousTestCase):
    """
    The proofs cover the channel's exporter value: on a plain test channel
    whose two ends export different values (as two TLS connections do), a
    handshake with the right secret and identical hellos fails.
    """

    def test_differentExportersRefused(self) -> None:
        """
        Same secret, same fingerprints, different exporters: refused.
        """
        from tests.test_protocol import Pair

        pair = Pair(
            plainIdentity("node", 1, "h:1", SECRET, security=PlainSecurity(exporter=b"a" * 32)),
            plainIdentity("node", 2, "h:2", SECRET, "control", PlainSecurity(exporter=b"b" * 32)),
        )
        self.assertFalse(pair.listener.isReady())
        self.assertFalse(pair.connector.isReady())
        self.assertEqual(pair.connector.refusal[0], "auth")

    def test_proofInputs(self) -> None:
        """
        A proof changes with each of its inputs: secret, side, exporter and
        either hello.
        """
        base = (SECRET, auth.LISTENER, b"e" * 32, b"hello C", b"hello L")
        proof = auth.proof(*base)
        for i, other in enumerate((b"x", auth.CONNECTOR, b"f" * 32, b"hello D", b"hello M")):
            changed = list(base)
            changed[i] = other
            self.assertNotEqual(auth.proof(*changed), proof, i)
        self.assertTrue(auth.verify(*base, proof))
        # Parts are length-prefixed: moving a byte between hellos matters.
        self.assertNotEqual(
            auth.proof(SECRET, auth.LISTENER, b"e", b"ab", b"c"), auth.proof(SECRET, auth.LISTENER, b"e", b"a", b"bc")
        )


class PinTests(SynchronousTestCase):
    """
    Pinned fingerprints are checked before any proof is exchanged.
    """

    def test_pinMatches(self) -> None:
        """
        A connector pinning the listener's real fingerprint, and a listener
        pinning the connector's, authenticate.
        """
        server, client, pump, clock = tlsPair(
            nodeIdentity(1, pins=Pins({2: certificate(2).fingerprint}, closed=True)),
            nodeIdentity(2, pins=Pins({1: certificate(1).fingerprint})),
            expectedNode=1,
        )
        self.assertTrue(server.protocol.isReady())
        self.assertTrue(client.protocol.isReady())

    def test_connectorPinMismatch(self) -> None:
        """
        A link to node 1 whose pin is another certificate is refused as soon
        as TLS is up: the connector sends no hello and no proof, records an
        C{auth} refusal, and logs one line naming both fingerprints.
        """
        events = captureLogs(self)
        wrong = certificate("not node 1").fingerprint
        server, client, pump, clock = tlsPair(
            nodeIdentity(1), nodeIdentity(2, pins=Pins({1: wrong})), expectedNode=1
        )
        self.assertFalse(client.protocol.isReady())
        self.assertEqual(server.handler.messages, [])
        self.assertIsNone(server.protocol.peer)
        self.assertEqual(client.protocol.refusal[0], "auth")
        (line,) = linesFrom(events, client.protocol)
        self.assertIn(wrong, line)
        self.assertIn(certificate(1).fingerprint, line)
        # The listener saw no hello: only an error frame came its way.
        self.assertEqual(server.protocol.refusal[0], "auth")

    def test_listenerPinMismatch(self) -> None:
        """
        A listener that pins node 2 to another certificate refuses a
        connector claiming to be node 2 before it sends its own hello or
        proof, with one line naming both fingerprints.
        """
        events = captureLogs(self)
        wrong = certificate("not node 2").fingerprint
        server, client, pump, clock = tlsPair(nodeIdentity(1, pins=Pins({2: wrong})), nodeIdentity(2))
        self.assertFalse(server.protocol.isReady())
        self.assertEqual(client.handler.messages, [])
        self.assertEqual(client.protocol.refusal[0], "auth")
        self.assertIn(wrong, client.protocol.refusal[1])
        (line,) = linesFrom(events, server.protocol)
        self.assertIn(wrong, line)
        self.assertIn(certificate(2).fingerprint, line)

    def test_closedMembership(self) -> None:
        """
        With every member pinned, a node of another id is refused even with
        the secret; a client (no certificate) is still admitted by the
        secret alone.
        """
        pins = Pins({2: certificate(2).fingerprint}, closed=True)
        server, client, pump, clock = tlsPair(nodeIdentity(1, pins=pins), nodeIdentity(77))
        self.assertFalse(server.protocol.isReady())
        self.assertIn("not a pinned member", client.protocol.refusal[1])
        server, client, pump, clock = tlsPair(nodeIdentity(1, pins=pins), clientIdentity())
        self.assertTrue(server.protocol.isReady())

    def test_clientPins(self) -> None:
        """
        The command line's C{--pin}: a node whose certificate is among the
        pins is accepted, another is refused before the client proves
        anything.
        """
        server, client, pump, clock = tlsPair(
            nodeIdentity(1), clientIdentity(pins=Pins(anyOf=[certificate(1).fingerprint, PLAIN_FINGERPRINT]))
        )
        self.assertTrue(client.protocol.isReady())
        server, client, pump, clock = tlsPair(nodeIdentity(1), clientIdentity(pins=Pins(anyOf=[PLAIN_FINGERPRINT])))
        self.assertFalse(client.protocol.isReady())
        self.assertEqual(client.protocol.refusal[0], "auth")

    def test_pinsDecide(self) -> None:
        """
        L{Pins.problem}: clients always pass; a pinned id must match; with
        C{closed}, an unpinned id fails; C{anyOf} admits only its members.
        """
        a, b = "sha256:" + "aa" * 32, "sha256:" + "bb" * 32
        pins = Pins({1: a})
        self.assertIsNone(pins.problem(None, None))
        self.assertIsNone(pins.problem(1, a))
        self.assertIn(b, pins.problem(1, b))
        self.assertIsNone(pins.problem(2, b))
        self.assertIn("not a pinned member", Pins({1: a}, closed=True).problem(2, b))
        self.assertIn("no certificate", pins.problem(1, None))
        self.assertIsNone(Pins(anyOf=[a]).problem(5, a))
        self.assertIsNotNone(Pins(anyOf=[a]).problem(5, b))


class PlaintextTests(SynchronousTestCase):
    """
    A plaintext or garbage client on a TLS port.
    """

    def listener(self, events: List[dict]):
        clock = Clock()
        server = End(nodeIdentity(1), clock, True)
        tlsProtocol = server.tls.buildProtocol(None)
        transport = FakeTransport(
            tlsProtocol, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.9", 4444)
        )
        tlsProtocol.makeConnection(transport)
        server.protocol = server.factory.built
        return tlsProtocol, transport, server, clock

    def test_garbageDropped(self) -> None:
        """
        A p2pfiles frame sent in the clear (a version 1 client) is not TLS:
        the connection is closed at once, the handler never hears of it,
        and the node logs one line.
        """
        from tests.frames import frame, hello

        events = captureLogs(self)
        tlsProtocol, transport, server, clock = self.listener(events)
        tlsProtocol.dataReceived(frame(hello(nodeIdentity(2), "ab" * 32)))
        self.assertTrue(transport.disconnecting)
        tlsProtocol.connectionLost(transport.disconnectReason)
        self.assertEqual(server.handler.events[-1][0], "closed")
        self.assertEqual(server.handler.ready, 0)
        (line,) = linesFrom(events, server.protocol)
        self.assertIn("127.0.0.9:4444", line)
        self.assertIn("before the connection was secured", line)

    def test_silentClientDropped(self) -> None:
        """
        A client that connects and says nothing is dropped at the handshake
        timeout, with one log line.
        """
        events = captureLogs(self)
        tlsProtocol, transport, server, clock = self.listener(events)
        clock.advance(HANDSHAKE_TIMEOUT - 0.01)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.01)
        self.assertTrue(transport.disconnecting)
        tlsProtocol.connectionLost(transport.disconnectReason)
        (line,) = linesFrom(events, server.protocol)
        self.assertIn("handshake not finished", line)
        self.assertEqual(clock.getDelayedCalls(), [])


class AcceptedConnectionTests(SynchronousTestCase):
    """
    An accepted connection costs no TLS state until the client's first
    record (its hello) is whole, and keeps small buffers.
    """

    def accepted(self, bufferSize: int = 64 * 1024):
        clock = Clock()
        factory = TLS(certificate(1)).serverFactory(Factory.forProtocol(Collector), clock)
        server = factory.buildProtocol(None)
        transport = StringTransport()
        transport.bufferSize = bufferSize  # as TCP's
        server.makeConnection(transport)
        return server, transport, clock

    def clientHello(self) -> bytes:
        client = TLS().clientFactory(Factory.forProtocol(Collector), Clock()).buildProtocol(None)
        transport = StringTransport()
        client.makeConnection(transport)
        hello = transport.value()
        self.assertLessEqual(len(hello), FIRST_RECORD_LIMIT)
        return hello

    def test_noOpenSSLBeforeTheHello(self) -> None:
        """
        Until the client's first record is whole there is no OpenSSL
        connection and nothing is sent; once it is, the handshake goes on
        as usual (the server answers).
        """
        server, transport, clock = self.accepted()
        self.assertNotIsInstance(server.getHandle(), SSL.Connection)
        hello = self.clientHello()
        for i in range(len(hello) - 1):
            server.dataReceived(hello[i : i + 1])
        self.assertNotIsInstance(server.getHandle(), SSL.Connection)
        self.assertEqual(transport.value(), b"")
        server.dataReceived(hello[-1:])
        self.assertIsInstance(server.getHandle(), SSL.Connection)
        self.assertEqual(transport.value()[:1], b"\x16")
        self.assertFalse(transport.disconnecting)

    def test_silentCloses(self) -> None:
        """
        A connection that sent nothing closes cleanly, and its protocol
        hears of it.
        """
        server, transport, clock = self.accepted()
        inner = server.wrappedProtocol
        server.abortConnection()
        server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transport.disconnecting)
        self.assertIsNotNone(inner.lost)

    def test_oversizedHelloNotRead(self) -> None:
        """
        A first record announcing more than L{FIRST_RECORD_LIMIT} bytes is
        not read any further (TCP is paused, what comes is dropped); the
        connection is left to the handshake deadline.
        """
        server, transport, clock = self.accepted()
        server.dataReceived(bytes([22, 3, 1]) + (FIRST_RECORD_LIMIT + 1).to_bytes(2, "big"))
        self.assertEqual(transport.producerState, "paused")
        server.dataReceived(os.urandom(FIRST_RECORD_LIMIT * 2))
        self.assertNotIsInstance(server.getHandle(), SSL.Connection)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_notTLSClosedAtOnce(self) -> None:
        """
        A first byte that cannot begin a TLS handshake record, or a record
        without a TLS version, closes the connection at once.
        """
        for start in (b"G", bytes([22, 2])):
            server, transport, clock = self.accepted()
            inner = server.wrappedProtocol
            server.dataReceived(start)
            self.assertTrue(transport.disconnecting, start)
            server.connectionLost(Failure(ConnectionDone()))
            self.assertIn("not TLS", str(inner.lost.value))

    def test_acceptedBufferSmall(self) -> None:
        """
        An accepted connection reads and pauses at L{ACCEPTED_BUFFER}
        (never raising a smaller size); a connecting one keeps TCP's sizes.
        """
        for before, after in [(64 * 1024, ACCEPTED_BUFFER), (1024, 1024)]:
            server, transport, clock = self.accepted(before)
            self.assertEqual(transport.bufferSize, after)
        client = TLS().clientFactory(Factory.forProtocol(Collector), Clock()).buildProtocol(None)
        transport = StringTransport()
        transport.bufferSize = 64 * 1024
        client.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 64 * 1024)

    def test_gatheringBounded(self) -> None:
        """
        Small writes are gathered until the next turn of the clock, but no
        more than L{GATHER_LIMIT} bytes: past that they go at once.
        """
        server, client, clientTransport, pump, clock = bulkPair()
        client.write(b"x" * (GATHER_LIMIT // 2))
        self.assertEqual(clientTransport.stream, [])
        client.write(b"x" * (GATHER_LIMIT // 2 + 1))
        self.assertEqual(len(clientTransport.stream), 1)


class IdentityTests(SynchronousTestCase):
    """
    A node's key and certificate in its state directory.
    """

    def test_createdOnceAndReused(self) -> None:
        """
        The first call makes C{node.key} (mode 0600) and C{node.crt}; later
        calls load the same identity and write nothing.
        """
        state = FilePath(self.mktemp())
        first = stateIdentity(state)
        key, crt = state.child("node.key"), state.child("node.crt")
        self.assertEqual(stat.S_IMODE(os.stat(key.path).st_mode), 0o600)
        self.assertTrue(crt.exists())
        before = (key.getContent(), crt.getContent(), os.stat(key.path).st_mtime_ns)
        again = stateIdentity(state)
        self.assertEqual(again.fingerprint, first.fingerprint)
        self.assertEqual((key.getContent(), crt.getContent(), os.stat(key.path).st_mtime_ns), before)
        self.assertEqual(sorted(state.listdir()), ["node.crt", "node.key"])
        self.assertRegex(first.fingerprint, r"^sha256:[0-9a-f]{64}$")

    def test_absentWithoutCreate(self) -> None:
        """
        Without C{create}, a state directory without an identity gives None
        and is left as it was (not even created).
        """
        state = FilePath(self.mktemp())
        self.assertIsNone(stateIdentity(state, create=False))
        self.assertFalse(state.exists())

    def test_corruptKey(self) -> None:
        """
        A corrupt key file is an L{IdentityError} of one line naming the
        file, and is left as it was.
        """
        state = FilePath(self.mktemp())
        stateIdentity(state)
        state.child("node.key").setContent(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n")
        error = self.assertRaises(IdentityError, stateIdentity, state)
        self.assertEqual(len(str(error).splitlines()), 1)
        self.assertIn("node.key", str(error))
        self.assertEqual(state.child("node.key").getContent(), b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n")

    def test_certificateWithoutKey(self) -> None:
        """
        A certificate whose key is gone is an error, not a new identity.
        """
        state = FilePath(self.mktemp())
        stateIdentity(state)
        state.child("node.key").remove()
        self.assertRaises(IdentityError, stateIdentity, state)
        self.assertFalse(state.child("node.key").exists())

    def test_keyWithoutCertificate(self) -> None:
        """
        A key without its certificate (a start that stopped between the two
        writes) gets a certificate made for that key; the key is kept.
        """
        state = FilePath(self.mktemp())
        stateIdentity(state)
        key = state.child("node.key").getContent()
        state.child("node.crt").remove()
        identity = stateIdentity(state)
        self.assertEqual(state.child("node.key").getContent(), key)
        self.assertEqual(stateIdentity(state).fingerprint, identity.fingerprint)

    def test_keyOfAnotherCertificate(self) -> None:
        """
        A key that does not belong to the certificate is refused.
        """
        state = FilePath(self.mktemp())
        stateIdentity(state)
        state.child("node.key").setContent(NodeCertificate.generate().keyPEM())
        error = self.assertRaises(IdentityError, stateIdentity, state)
        self.assertIn("does not belong", str(error))

    def test_fingerprints(self) -> None:
        """
        Fingerprints are read in either case, with colons or not, and
        written in one normal form; anything else is refused.
        """
        normal = "sha256:" + "ab" * 32
        self.assertEqual(parseFingerprint("SHA256:" + "AB" * 32), normal)
        self.assertEqual(parseFingerprint("sha256:" + ":".join(["ab"] * 32)), normal)
        for bad in ("ab" * 32, "sha256:" + "ab" * 31, "sha1:" + "ab" * 20, "sha256:" + "zz" * 32):
            self.assertRaises(ValueError, parseFingerprint, bad)


class OptionTests(SynchronousTestCase):
    """
    TLS and pins on the node's command line.
    """

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--state", self.state.path, "--share", self.mktemp(), *args])
        return options

    def setUp(self) -> None:
        self.state = FilePath(self.mktemp())

    def test_parsingWritesNothing(self) -> None:
        """
        Parsing the options of a new node writes no identity: it is made
        when the node starts.
        """
        options = self.parse("--id", "1")
        self.assertIsNone(options["certificate"])
        self.assertFalse(self.state.child("node.key").exists())

    def test_corruptKeyIsOneLine(self) -> None:
        """
        A corrupt key in the state directory stops the start with a one-line
        usage error.
        """
        stateIdentity(self.state)
        self.state.child("node.key").setContent(b"garbage")
        error = self.assertRaises(usage.UsageError, self.parse, "--id", "1")
        self.assertEqual(len(str(error).splitlines()), 1)
        self.assertIn("node.key", str(error))

    def test_operatorCertificate(self) -> None:
        """
        C{--tls-cert} and C{--tls-key} give the node its identity; one
        without the other is refused.
        """
        identity = certificate("operator")
        cert, key = FilePath(self.mktemp()), FilePath(self.mktemp())
        cert.setContent(identity.certificatePEM())
        key.setContent(identity.keyPEM())
        options = self.parse("--id", "1", "--tls-cert", cert.path, "--tls-key", key.path)
        self.assertEqual(options.nodeConfig().certificate.fingerprint, identity.fingerprint)
        self.assertRaises(usage.UsageError, self.parse, "--id", "1", "--tls-cert", cert.path)

    def test_clusterPins(self) -> None:
        """
        A cluster file's third column pins a node; lines without one pin
        nothing; a bad fingerprint is a usage error naming the line.  With
        every other member pinned the membership is closed.
        """
        a, b = "sha256:" + "aa" * 32, "sha256:" + "bb" * 32
        cluster = FilePath(self.mktemp())
        cluster.setContent(f"1 127.0.0.1:9001\n2 127.0.0.1:9002 {a}\n3 127.0.0.1:9003 {b.upper()}\n".encode())
        self.assertEqual(readCluster(cluster.path)[1], {2: a, 3: b})
        pins = self.parse("--id", "1", "--cluster", cluster.path).nodeConfig().pins
        self.assertEqual((pins.byNode, pins.closed), ({2: a, 3: b}, True))
        cluster.setContent(f"1 127.0.0.1:9001\n2 127.0.0.1:9002 {a}\n3 127.0.0.1:9003\n".encode())
        self.assertFalse(self.parse("--id", "1", "--cluster", cluster.path).nodeConfig().pins.closed)
        cluster.setContent(b"1 127.0.0.1:9001\n2 127.0.0.1:9002 sha256:beef\n")
        error = self.assertRaises(usage.UsageError, self.parse, "--id", "1", "--cluster", cluster.path)
        self.assertIn(":2:", str(error))

    def test_ownPin(self) -> None:
        """
        A node pinned (by its own cluster line) to a certificate other than
        its own refuses to start; pinned to its own, it starts.
        """
        own = stateIdentity(self.state).fingerprint
        cluster = FilePath(self.mktemp())
        cluster.setContent(f"1 127.0.0.1:9001 {own}\n".encode())
        self.parse("--id", "1", "--cluster", cluster.path)
        cluster.setContent(("1 127.0.0.1:9001 sha256:" + "cc" * 32 + "\n").encode())
        error = self.assertRaises(usage.UsageError, self.parse, "--id", "1", "--cluster", cluster.path)
        self.assertIn(own, str(error))

    def test_peerPins(self) -> None:
        """
        C{--peer ID@HOST:PORT=FINGERPRINT} pins that peer.
        """
        a = "sha256:" + "aa" * 32
        self.assertEqual(parsePeer(f"2@127.0.0.1:9002={a}"), (2, "127.0.0.1:9002", a))
        self.assertEqual(parsePeer("2@[::1]:9002"), (2, "[::1]:9002", None))
        self.assertRaises(usage.UsageError, parsePeer, "2@127.0.0.1:9002=sha256:12")
        pins = self.parse("--id", "1", "--peer", f"2@127.0.0.1:9002={a}").nodeConfig().pins
        self.assertEqual(pins.byNode, {2: a})
