"""
Tests for L{p2pfiles.protocol}: framing, the authenticated handshake, raw
mode, and dropping connections on bad input.
"""

import random
from struct import pack
from typing import Any, List, Optional, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import auth
from p2pfiles.admission import ConnectionLimits
from p2pfiles.protocol import (
    CONTROL_READ_SIZE,
    HANDSHAKE_TIMEOUT,
    IConnectionHandler,
    LocalIdentity,
    P2PFactory,
    P2PProtocol,
    ProtocolViolation,
    RAW_READ_SIZE,
)
from p2pfiles.wire import PROTOCOL_VERSION, Message, encode
from tests.channels import PLAIN_FINGERPRINT, PlainSecurity, plainIdentity
from tests.frames import frame, hello, parseFrames, proofFor, rawFrame

SECRET = b"the cluster secret"

LISTENER_ADDRESS = IPv4Address("TCP", "127.0.0.11", 7000)
CONNECTOR_ADDRESS = IPv4Address("TCP", "127.0.0.12", 50000)

LISTENER = plainIdentity("node", 1, "127.0.0.11:7000", SECRET, "request")
CONNECTOR = plainIdentity("node", 2, "127.0.0.12:7000", SECRET, "control")


def errorsTo(pair) -> list:
    """
    The (code, reason) of every error frame the connector's handler got:
    after the handshake, a drop's reason arrives as an error message.
    """
    return [(m.code, m.reason) for m in pair.connectorHandler.messages if m.type == "error"]


@implementer(IConnectionHandler)
class RecordingHandler:
    """
    An L{IConnectionHandler} that records every event, in order, in
    C{events}; C{onMessage}, if set, is called for each message (to call
    C{expectRaw} or raise).
    """

    def __init__(self) -> None:
        self.events: List[Tuple[Any, ...]] = []
        self.onMessage: Any = None

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.events.append(("ready", connection))

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        self.events.append(("message", message))
        if self.onMessage is not None:
            self.onMessage(connection, message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        self.events.append(("raw", data))

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        self.events.append(("rawFinished",))

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        self.events.append(("closed", reason))

    def of(self, kind: str) -> List[Tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]

    @property
    def ready(self) -> int:
        return len(self.of("ready"))

    @property
    def messages(self) -> List[Message]:
        return [e[1] for e in self.of("message")]

    @property
    def raw(self) -> bytes:
        return b"".join(e[1] for e in self.of("raw"))

    @property
    def closed(self) -> int:
        return len(self.of("closed"))


def captureLogs(case: SynchronousTestCase) -> List[dict]:
    """
    Send every event that protocols log to a list for the rest of the test.
    """
    events: List[dict] = []
    case.patch(P2PProtocol, "log", Logger(observer=events.append))
    return events


def linesFrom(events: List[dict], source: object) -> List[str]:
    """
    The warnings and errors C{source} logged (debug chatter left out).
    """
    return [
        formatEvent(e)
        for e in events
        if e.get("log_source") is source and e["log_level"] in (LogLevel.warn, LogLevel.error, LogLevel.critical)
    ]


class Pair:
    """
    A listening and a connecting L{P2PProtocol} joined in memory by
    L{twisted.test.iosim}, sharing one L{Clock}.
    """

    def __init__(self, listenerIdentity: LocalIdentity, connectorIdentity: LocalIdentity) -> None:
        self.clock = Clock()
        self.listenerHandler = RecordingHandler()
        self.connectorHandler = RecordingHandler()
        self.listener = P2PProtocol(listenerIdentity, self.listenerHandler, self.clock, listening=True)
        self.connector = P2PProtocol(connectorIdentity, self.connectorHandler, self.clock, listening=False)
        self.listenerTransport = FakeTransport(
            self.listener, isServer=True, hostAddress=LISTENER_ADDRESS, peerAddress=CONNECTOR_ADDRESS
        )
        self.connectorTransport = FakeTransport(
            self.connector, isServer=False, hostAddress=CONNECTOR_ADDRESS, peerAddress=LISTENER_ADDRESS
        )
        self.pump: IOPump = connect(
            self.listener,
            self.listenerTransport,
            self.connector,
            self.connectorTransport,
            greet=True,
            clock=self.clock,
        )

    def flush(self) -> None:
        self.pump.flush()


def connectedPair(
    listenerSecret: bytes = SECRET, connectorSecret: bytes = SECRET, connector: LocalIdentity = CONNECTOR
) -> Pair:
    return Pair(
        plainIdentity(LISTENER.role, LISTENER.node, LISTENER.address, listenerSecret, LISTENER.purpose),
        plainIdentity(
            connector.role, connector.node, connector.address, connectorSecret, connector.purpose, connector.security
        ),
    )


class Listener:
    """
    A listening L{P2PProtocol} over a L{StringTransport}, driven by hand as a
    connector would drive it.
    """

    def __init__(
        self, secret: bytes = SECRET, transport: Optional[StringTransport] = None, security: Any = None, pins: Any = None
    ) -> None:
        self.clock = Clock()
        self.handler = RecordingHandler()
        identity = plainIdentity(LISTENER.role, LISTENER.node, LISTENER.address, secret, LISTENER.purpose, security, pins)
        self.protocol = P2PProtocol(identity, self.handler, self.clock, listening=True)
        if transport is None:
            transport = StringTransport(hostAddress=LISTENER_ADDRESS, peerAddress=CONNECTOR_ADDRESS)
        self.transport = transport
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.nonce = auth.makeNonce()

    def sent(self) -> List[Message]:
        return parseFrames(self.transport.value())

    def sendHello(self, **overrides: Any) -> Message:
        """
        Send a connector's hello; return the listener's hello in answer
        (its C{auth}, which follows, is kept as C{listenerAuth}).
        """
        self.connectorHello = hello(CONNECTOR, self.nonce, **overrides)
        self.protocol.dataReceived(frame(self.connectorHello))
        (answer, self.listenerAuth) = self.sent()
        self.transport.clear()
        return answer

    def authenticate(self, secret: bytes = SECRET) -> None:
        """
        Run the connector's half of the handshake with C{secret}.
        """
        answer = self.sendHello()
        self.protocol.dataReceived(
            frame(Message("auth", proof=proofFor(secret, auth.CONNECTOR, self.connectorHello, answer)))
        )


class Connector:
    """
    A connecting L{P2PProtocol} over a L{StringTransport}, driven by hand as a
    listener would drive it.
    """

    def __init__(self, secret: bytes = SECRET, security: Any = None, pins: Any = None, expectedNode: Any = None) -> None:
        self.clock = Clock()
        self.handler = RecordingHandler()
        identity = plainIdentity(CONNECTOR.role, CONNECTOR.node, CONNECTOR.address, secret, CONNECTOR.purpose, security, pins)
        self.protocol = P2PProtocol(identity, self.handler, self.clock, listening=False, expectedNode=expectedNode)
        self.transport = StringTransport(hostAddress=CONNECTOR_ADDRESS, peerAddress=LISTENER_ADDRESS)
        self.protocol.makeConnection(self.transport)
        (self.hello,) = parseFrames(self.transport.value())
        self.transport.clear()
        self.nonce = auth.makeNonce()

    def answer(self, secret: bytes = SECRET, **overrides: Any) -> None:
        """
        Answer as the listener: its hello, then its proof with C{secret}.
        """
        listenerHello = hello(LISTENER, self.nonce, **overrides)
        self.protocol.dataReceived(frame(listenerHello))
        if not self.protocol.closed and not self.transport.disconnecting:
            proof = proofFor(secret, auth.LISTENER, self.hello, listenerHello)
            self.protocol.dataReceived(frame(Message("auth", proof=proof)))


class HandshakeTests(SynchronousTestCase):
    """
    The handshake between a listening and a connecting protocol.
    """

    def test_handlerProvidesInterface(self) -> None:
        """
        The recording handler these tests use really provides
        L{IConnectionHandler}, so the tests exercise the real contract.
        """
        self.assertTrue(verifyObject(IConnectionHandler, RecordingHandler()))

    def test_rightSecret(self) -> None:
        """
        With the same secret both ends become ready, each handler is told
        once, and each end's C{peer} describes the other: role, node id,
        listening address and purpose.  The purpose is the connector's: the
        listener echoes it, so both ends agree what the link is for.
        """
        pair = connectedPair()
        self.assertTrue(pair.listener.isReady())
        self.assertTrue(pair.connector.isReady())
        self.assertEqual(pair.listenerHandler.events, [("ready", pair.listener)])
        self.assertEqual(pair.connectorHandler.events, [("ready", pair.connector)])
        peer = pair.listener.peer
        self.assertEqual(
            (peer.role, peer.node, peer.address, peer.purpose), ("node", 2, "127.0.0.12:7000", "control")
        )
        peer = pair.connector.peer
        self.assertEqual(
            (peer.role, peer.node, peer.address, peer.purpose), ("node", 1, "127.0.0.11:7000", "control")
        )
        self.assertIsNone(pair.listener.refusal)
        self.assertIsNone(pair.connector.refusal)

    def test_messagesAfterReady(self) -> None:
        """
        Messages sent once the handshake is done arrive, in order, at the
        other end's handler, in both directions.
        """
        pair = connectedPair()
        pair.connector.sendMessage(Message("status", watch=True))
        pair.connector.sendMessage(Message("ls"))
        pair.listener.sendMessage(Message("stale", epoch=3, leader=None))
        pair.flush()
        self.assertEqual(pair.listenerHandler.messages, [Message("status", watch=True), Message("ls")])
        self.assertEqual(pair.connectorHandler.messages, [Message("stale", epoch=3, leader=None)])

    def test_client(self) -> None:
        """
        A client (no node id, no address) can connect; the listener sees a
        client peer.
        """
        pair = connectedPair(connector=plainIdentity("client", None, None, SECRET, "request"))
        self.assertTrue(pair.listener.isReady())
        peer = pair.listener.peer
        self.assertEqual((peer.role, peer.node, peer.address, peer.purpose), ("client", None, None, "request"))

    def test_noSecret(self) -> None:
        """
        Without a secret on either end (C{b""}) the handshake still runs and
        succeeds.
        """
        pair = connectedPair(b"", b"")
        self.assertTrue(pair.listener.isReady())
        self.assertTrue(pair.connector.isReady())
        self.assertEqual(pair.listenerHandler.ready, 1)
        self.assertEqual(pair.connectorHandler.ready, 1)

    def test_timeoutCancelledWhenReady(self) -> None:
        """
        A finished handshake cancels the handshake timeout: the connection
        survives well past C{HANDSHAKE_TIMEOUT}.
        """
        pair = connectedPair()
        self.assertEqual(pair.clock.getDelayedCalls(), [])
        pair.clock.advance(HANDSHAKE_TIMEOUT * 10)
        pair.flush()
        self.assertTrue(pair.listener.isReady())
        self.assertEqual(pair.listenerHandler.closed, 0)
        self.assertEqual(pair.connectorHandler.closed, 0)

    def assertRefused(self, pair: Pair, events: List[dict]) -> None:
        self.assertFalse(pair.listener.isReady())
        self.assertFalse(pair.connector.isReady())
        self.assertIsNone(pair.listener.peer)
        self.assertIsNone(pair.connector.peer)
        self.assertEqual(pair.listenerHandler.ready, 0)
        self.assertEqual(pair.connectorHandler.ready, 0)
        self.assertEqual(pair.listenerHandler.messages, [])
        self.assertEqual(pair.connectorHandler.messages, [])
        self.assertEqual(pair.listenerHandler.closed, 1)
        self.assertEqual(pair.connectorHandler.closed, 1)
        self.assertEqual(pair.connector.refusal[0], "auth")
        (line,) = linesFrom(events, pair.listener)
        self.assertIn("127.0.0.12:50000", line)
        self.assertIn("authentication failed", line)

    def test_wrongSecret(self) -> None:
        """
        With different secrets neither handler is told the connection is
        ready, the connector records an C{auth} refusal, the listener logs one
        line naming the peer and the reason, and both connections close.
        """
        events = captureLogs(self)
        pair = connectedPair(b"secret one", b"secret two")
        self.assertRefused(pair, events)

    def test_onlyConnectorHasSecret(self) -> None:
        """
        A connector with a secret refuses a listener without one.
        """
        events = captureLogs(self)
        pair = connectedPair(b"", SECRET)
        self.assertRefused(pair, events)

    def test_onlyListenerHasSecret(self) -> None:
        """
        A listener with a secret is refused by a connector without one.
        """
        events = captureLogs(self)
        pair = connectedPair(SECRET, b"")
        self.assertRefused(pair, events)

    def test_listenerChecksProof(self) -> None:
        """
        A connector that ignores the listener's proof and sends a proof made
        with the wrong secret is dropped by the listener with an C{auth}
        error, logged, and never reaches the handler.
        """
        events = captureLogs(self)
        listener = Listener()
        listener.authenticate(secret=b"guess")
        self.assertFalse(listener.protocol.isReady())
        self.assertTrue(listener.transport.disconnecting)
        (error,) = listener.sent()
        self.assertEqual((error.type, error.code), ("error", "auth"))
        self.assertEqual(listener.handler.events, [])
        (line,) = linesFrom(events, listener.protocol)
        self.assertIn("authentication failed", line)

    def test_listenerAcceptsRightProof(self) -> None:
        """
        The hand-driven connector used by these tests succeeds with the
        right secret: the listener answers C{ready} and tells its handler.
        """
        listener = Listener()
        listener.authenticate()
        self.assertTrue(listener.protocol.isReady())
        self.assertEqual(listener.sent(), [Message("ready", node=1)])
        self.assertEqual(listener.handler.ready, 1)

    def test_reflectedProof(self) -> None:
        """
        A connector that sends the listener's own proof back as its C{auth}
        is refused: proofs name their side and cannot be reflected.
        """
        listener = Listener()
        listener.sendHello()
        listener.protocol.dataReceived(frame(Message("auth", proof=listener.listenerAuth.proof)))
        self.assertFalse(listener.protocol.isReady())
        self.assertTrue(listener.transport.disconnecting)
        self.assertEqual([m.code for m in listener.sent()], ["auth"])

    def test_connectorRefusesMissingProof(self) -> None:
        """
        A connector refuses a listener that follows its hello with anything
        but its proof, and sends no C{auth} of its own.
        """
        connector = Connector()
        connector.protocol.dataReceived(frame(hello(LISTENER, connector.nonce)))
        connector.protocol.dataReceived(frame(Message("ready", node=1)))
        self.assertTrue(connector.transport.disconnecting)
        self.assertEqual([m.code for m in parseFrames(connector.transport.value())], ["protocol"])
        self.assertEqual(connector.handler.events, [])

    def test_connectorChecksProof(self) -> None:
        """
        A connector refuses a listener whose proof was made with another
        secret: it records an C{auth} refusal, sends an C{auth} error and
        never its own proof, and does not tell its handler.
        """
        connector = Connector()
        connector.answer(secret=b"another secret")
        self.assertTrue(connector.transport.disconnecting)
        self.assertEqual([m.code for m in parseFrames(connector.transport.value())], ["auth"])
        self.assertEqual(connector.protocol.refusal[0], "auth")
        self.assertEqual(connector.handler.events, [])

    def test_connectorWaitsForReady(self) -> None:
        """
        A connector whose listener proved itself sends its C{auth} but is not
        ready, and does not tell its handler, until the listener's C{ready}.
        """
        connector = Connector()
        connector.answer()
        (sent,) = parseFrames(connector.transport.value())
        self.assertEqual(sent.type, "auth")
        self.assertFalse(connector.protocol.isReady())
        self.assertEqual(connector.handler.events, [])
        connector.protocol.dataReceived(frame(Message("ready", node=1)))
        self.assertTrue(connector.protocol.isReady())
        self.assertEqual(connector.handler.ready, 1)


class TimeoutTests(SynchronousTestCase):
    """
    A handshake that does not finish within C{HANDSHAKE_TIMEOUT} is dropped.
    """

    def test_listenerWithSilentPeer(self) -> None:
        """
        A listener whose peer sends nothing is dropped, with a C{timeout}
        error and a log line, once C{HANDSHAKE_TIMEOUT} has passed and not
        before.
        """
        events = captureLogs(self)
        listener = Listener(transport=StringTransportWithDisconnection())
        listener.clock.advance(HANDSHAKE_TIMEOUT - 0.01)
        self.assertEqual(listener.handler.closed, 0)
        listener.clock.advance(0.01)
        self.assertEqual(listener.handler.closed, 1)
        self.assertEqual([m.code for m in listener.sent()], ["timeout"])
        self.assertEqual(listener.handler.ready, 0)
        (line,) = linesFrom(events, listener.protocol)
        self.assertIn("handshake", line)
        self.assertEqual(listener.clock.getDelayedCalls(), [])

    def test_listenerWithPeerStuckAfterHello(self) -> None:
        """
        A peer that sends its hello but never its C{auth} is dropped at the
        same deadline.
        """
        listener = Listener()
        listener.sendHello()
        listener.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(listener.transport.disconnecting)
        self.assertFalse(listener.protocol.isReady())

    def test_connectorWithSilentListener(self) -> None:
        """
        A connector whose listener never answers its hello is dropped once
        C{HANDSHAKE_TIMEOUT} has passed.
        """
        connector = Connector()
        connector.clock.advance(HANDSHAKE_TIMEOUT - 0.01)
        self.assertFalse(connector.transport.disconnecting)
        connector.clock.advance(0.01)
        self.assertTrue(connector.transport.disconnecting)
        self.assertEqual([m.code for m in parseFrames(connector.transport.value())], ["timeout"])
        self.assertEqual(connector.handler.ready, 0)


class VersionTests(SynchronousTestCase):
    """
    Peers speaking another protocol version are refused.
    """

    def test_listenerRefusesOtherVersion(self) -> None:
        """
        A hello with version 1 (before TLS) makes the listener send a
        C{version} error mentioning both versions, and drop the connection
        without answering with its own hello.
        """
        listener = Listener()
        listener.protocol.dataReceived(frame(hello(CONNECTOR, listener.nonce, version=1)))
        (error,) = listener.sent()
        self.assertEqual((error.type, error.code), ("error", "version"))
        self.assertIn("1", error.reason)
        self.assertIn(str(PROTOCOL_VERSION), error.reason)
        self.assertTrue(listener.transport.disconnecting)
        self.assertEqual(listener.handler.events, [])

    def test_connectorRefusesOtherVersion(self) -> None:
        """
        A connector that receives a hello with another version drops the
        connection with a C{version} error.
        """
        connector = Connector()
        connector.answer(version=PROTOCOL_VERSION + 1)
        self.assertTrue(connector.transport.disconnecting)
        self.assertEqual([m.code for m in parseFrames(connector.transport.value())], ["version"])
        self.assertFalse(connector.protocol.isReady())

    def assertHelloRefusedAsProtocolError(self, **overrides: Any) -> None:
        listener = Listener()
        nonce = overrides.pop("nonce", listener.nonce)
        listener.protocol.dataReceived(frame(hello(CONNECTOR, nonce, **overrides)))
        self.assertTrue(listener.transport.disconnecting, overrides)
        self.assertEqual([m.code for m in listener.sent()], ["protocol"], overrides)
        self.assertEqual(listener.handler.events, [])

    def test_otherHelloProblemsAreProtocolErrors(self) -> None:
        """
        A hello with a bad nonce, an unknown role or purpose, or from a node
        without id, address or certificate, is refused with a C{protocol}
        error.
        """
        for overrides in (
            dict(nonce="short"),
            dict(nonce="Z" * 64),
            dict(role="admin"),
            dict(purpose="everything"),
            dict(node=None),
            dict(address=None),
            dict(fingerprint=None),
        ):
            self.assertHelloRefusedAsProtocolError(**overrides)

    def test_peerTextDoesNotPickErrorCode(self) -> None:
        """
        The error code is chosen by what is wrong, not by the words in the
        peer's own text: an unknown role or purpose that happens to contain
        "version" is still a C{protocol} error, not a C{version} one.
        """
        self.assertHelloRefusedAsProtocolError(role="version")
        self.assertHelloRefusedAsProtocolError(purpose="version-2")


class BadInputTests(SynchronousTestCase):
    """
    Malformed or unexpected input drops the one connection, with a logged
    reason, and never reaches the handler.
    """

    def assertDropped(self, listener: Listener, events: List[dict], reasonPart: str) -> None:
        self.assertTrue(listener.transport.disconnecting)
        self.assertEqual(listener.handler.messages, [])
        (line,) = linesFrom(events, listener.protocol)
        self.assertIn("127.0.0.12:50000", line)
        self.assertIn(reasonPart, line)

    def test_requestBeforeHello(self) -> None:
        """
        A request or heartbeat sent right after connecting, before any hello,
        is dropped with a reason naming it.
        """
        for message in (
            Message("status", watch=False),
            Message("heartbeat", node=2, epoch=1, leader=2, members=[]),
            Message("ready", node=2),
            Message("auth", proof="00"),
        ):
            events = captureLogs(self)
            listener = Listener()
            listener.protocol.dataReceived(frame(message))
            self.assertDropped(listener, events, f"unexpected {message.type}")
            self.assertEqual([m.code for m in listener.sent()], ["protocol"])
            self.assertEqual(listener.handler.events, [])

    def test_requestInsteadOfAuth(self) -> None:
        """
        A connector that sends its hello and then a request, skipping
        C{auth}, is dropped; the request never reaches the handler.
        """
        events = captureLogs(self)
        listener = Listener()
        listener.sendHello()
        listener.protocol.dataReceived(frame(Message("ls")))
        self.assertDropped(listener, events, "unexpected ls")
        self.assertFalse(listener.protocol.isReady())

    def test_connectorGetsRequestInsteadOfHello(self) -> None:
        """
        A connector that receives anything but a hello first drops the
        connection.
        """
        connector = Connector()
        connector.protocol.dataReceived(frame(Message("ready", node=1)))
        self.assertTrue(connector.transport.disconnecting)
        self.assertFalse(connector.protocol.isReady())
        self.assertEqual(connector.handler.events, [])

    def test_maxLength(self) -> None:
        """
        C{MAX_LENGTH} is 1 MiB, not the 99999 bytes of L{Int32StringReceiver}.
        """
        self.assertEqual(P2PProtocol.MAX_LENGTH, 1024 * 1024)

    def test_overLengthBeforeAuth(self) -> None:
        """
        A length prefix of 0xFFFFFFFF drops the connection at once (without
        waiting for the body), logged, with no message delivered.
        """
        events = captureLogs(self)
        listener = Listener()
        listener.protocol.dataReceived(b"\xff\xff\xff\xff")
        self.assertDropped(listener, events, "exceeds the limit")
        self.assertEqual([m.code for m in listener.sent()], ["protocol"])

    def test_preauthLimit(self) -> None:
        """
        Before authentication a frame longer than C{PREAUTH_MAX_LENGTH}
        (8 KiB) is refused as soon as its length prefix arrives, so half-sent
        1 MiB frames buffer nothing: one log line, a C{protocol} error,
        the connection dropped.  A frame of exactly the limit is read (and
        refused for what it is, not its length).
        """
        limit = P2PProtocol.PREAUTH_MAX_LENGTH
        self.assertEqual(limit, 8 * 1024)
        events = captureLogs(self)
        listener = Listener()
        listener.protocol.dataReceived(pack("!I", limit + 1) + b"C{")
        self.assertDropped(listener, events, f"exceeds the limit of {limit} before authentication")
        self.assertEqual([m.code for m in listener.sent()], ["protocol"])

        events = captureLogs(self)
        listener = Listener()
        listener.protocol.dataReceived(pack("!I", 1024 * 1024) + b"C" + b" " * 60000)
        self.assertDropped(listener, events, "before authentication")

        events = captureLogs(self)
        listener = Listener()
        listener.protocol.dataReceived(pack("!I", limit) + b"C" + b" " * (limit - 1))
        self.assertDropped(listener, events, "malformed frame")

    def test_preauthLimitAfterHello(self) -> None:
        """
        The limit holds through the whole handshake: after a valid hello, an
        over-long C{auth} frame is dropped the same way.
        """
        events = captureLogs(self)
        listener = Listener()
        listener.sendHello()
        listener.protocol.dataReceived(pack("!I", P2PProtocol.PREAUTH_MAX_LENGTH + 1))
        self.assertDropped(listener, events, "before authentication")

    def test_overLengthAfterAuth(self) -> None:
        """
        An authenticated peer is dropped too for a frame one byte longer than
        C{MAX_LENGTH}, while a frame of exactly C{MAX_LENGTH} is accepted.
        """
        limit = P2PProtocol.MAX_LENGTH
        listener = Listener()
        listener.authenticate()
        payload = encode(Message("status", watch=True))
        padded = payload + b" " * (limit - len(payload))
        listener.protocol.dataReceived(rawFrame(padded))
        self.assertEqual(listener.handler.messages, [Message("status", watch=True)])
        self.assertFalse(listener.transport.disconnecting)

        events = captureLogs(self)
        listener.protocol.dataReceived(rawFrame(padded + b" "))
        self.assertTrue(listener.transport.disconnecting)
        self.assertEqual(listener.handler.messages, [Message("status", watch=True)])
        (line,) = linesFrom(events, listener.protocol)
        self.assertIn("exceeds the limit", line)

    def test_badFramesAfterAuth(self) -> None:
        """
        After the handshake, a frame with an unknown type byte, invalid JSON,
        a field of the wrong type or an unknown message type drops that
        connection with a logged reason and a C{protocol} error to the peer.
        """
        for payload, reasonPart in (
            (b"X" + encode(Message("ls"))[1:], "unknown frame type"),
            (b'C{"type":', "invalid JSON"),
            (b'C{"type":"status","watch":1}', "wrong type"),
            (b'C{"type":"stale","epoch":true,"leader":null}', "wrong type"),
            (b'C{"type":"shutdown"}', "unknown message type"),
            (b"", "empty"),
        ):
            events = captureLogs(self)
            pair = connectedPair()
            pair.listener.dataReceived(rawFrame(payload))
            pair.flush()
            self.assertEqual(pair.listenerHandler.messages, [])
            self.assertEqual(pair.listenerHandler.closed, 1)
            self.assertEqual(pair.connectorHandler.closed, 1)
            (line,) = linesFrom(events, pair.listener)
            self.assertIn("malformed frame", line)
            self.assertIn(reasonPart, line)
            self.assertEqual(errorsTo(pair)[0][0], "protocol")
            self.assertIn(reasonPart, errorsTo(pair)[0][1])

    def test_nothingAfterDrop(self) -> None:
        """
        Once a connection is dropped, frames that arrived in the same read
        are not handed to the handler.
        """
        listener = Listener()
        listener.authenticate()
        listener.protocol.dataReceived(
            rawFrame(b"C{bad") + frame(Message("ls")) + frame(Message("status", watch=True))
        )
        self.assertTrue(listener.transport.disconnecting)
        self.assertEqual(listener.handler.messages, [])

    def test_httpRequest(self) -> None:
        """
        An HTTP request (a browser pointed at a node) is dropped and never
        makes the connection ready.
        """
        listener = Listener()
        listener.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(listener.transport.disconnecting)
        self.assertFalse(listener.protocol.isReady())


def validHandshakeFrames() -> List[bytes]:
    """
    Frames a fuzzer may replay: well-formed messages of the handshake and
    after it, which must still not authenticate anyone.
    """
    nonce = auth.makeNonce()
    return [
        frame(hello(CONNECTOR, nonce)),
        frame(hello(CONNECTOR, nonce, fingerprint=None)),
        frame(Message("auth", proof=proofFor(SECRET, auth.CONNECTOR, hello(CONNECTOR, nonce), hello(LISTENER, nonce)))),
        frame(Message("auth", proof="")),
        frame(Message("ready", node=1)),
        frame(Message("status", watch=True)),
        frame(Message("heartbeat", node=2, epoch=1, leader=None, members=[(2, "h:2")])),
        frame(Message("error", code="auth", reason="no")),
    ]


REPLAYS = validHandshakeFrames()

badInputs = st.one_of(
    st.binary(max_size=64),
    st.just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    st.integers(min_value=P2PProtocol.MAX_LENGTH + 1, max_value=2**32 - 1).map(lambda n: pack("!I", n)),
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: pack("!I", n)),
    st.tuples(st.sampled_from(REPLAYS), st.integers(min_value=1, max_value=200)).map(lambda t: t[0][: t[1]]),
    st.sampled_from(REPLAYS),
    st.binary(max_size=40).map(rawFrame),
    st.binary(max_size=40).map(lambda b: rawFrame(b"C" + b)),
)


@st.composite
def splitStream(draw: st.DrawFn, pieces: st.SearchStrategy) -> List[bytes]:
    """
    A stream of bad inputs, cut into reads at arbitrary points.
    """
    stream = b"".join(draw(st.lists(pieces, min_size=1, max_size=6)))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=5)))
    reads, start = [], 0
    for cut in cuts + [len(stream)]:
        reads.append(stream[start:cut])
        start = cut
    return reads


class RobustnessTests(SynchronousTestCase):
    """
    No input makes a protocol raise, or become ready without a valid
    handshake.
    """

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(splitStream(badInputs))
    def test_badInputBeforeAuth(self, reads: List[bytes]) -> None:
        """
        Random bytes, HTTP requests, huge length prefixes, truncated frames
        and replayed valid frames, in reads cut anywhere, never raise out of
        C{dataReceived}; the listener ends either disconnected or still
        waiting for its handshake, never ready, and its handler sees nothing.
        """
        self.patch(P2PProtocol, "log", Logger(observer=lambda event: None))
        listener = Listener()
        for data in reads:
            listener.protocol.dataReceived(data)
        self.assertFalse(listener.protocol.isReady())
        self.assertIsNone(listener.protocol.peer)
        self.assertEqual(listener.handler.events, [])
        if not listener.transport.disconnecting:
            # Still waiting: the handshake deadline is what ends it.
            listener.clock.advance(HANDSHAKE_TIMEOUT)
            self.assertTrue(listener.transport.disconnecting)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(splitStream(badInputs))
    def test_garbageAfterAuth(self, reads: List[bytes]) -> None:
        """
        The same inputs after a successful handshake never raise out of
        C{dataReceived}; every message the handler sees is a decoded
        L{Message}, and the connection is either still ready or dropped.
        """
        self.patch(P2PProtocol, "log", Logger(observer=lambda event: None))
        listener = Listener()
        listener.authenticate()
        for data in reads:
            listener.protocol.dataReceived(data)
        for message in listener.handler.messages:
            self.assertIsInstance(message, Message)
        # Dropped (closing, and no longer ready) or still ready: never a
        # connection that closes but still says it is ready.
        self.assertEqual(listener.protocol.isReady(), not listener.transport.disconnecting)

    def test_seededRandomBytes(self) -> None:
        """
        200 fresh listeners, each fed a seeded-random mix of bad inputs in
        random-sized reads, none raising and none becoming ready.
        """
        self.patch(P2PProtocol, "log", Logger(observer=lambda event: None))
        rng = random.Random(20240601)
        disconnected = 0
        for _ in range(200):
            listener = Listener()
            stream = b"".join(
                rng.choice(
                    [
                        bytes(rng.randrange(256) for _ in range(rng.randrange(40))),
                        rng.choice(REPLAYS)[: rng.randrange(1, 120)],
                        pack("!I", rng.randrange(P2PProtocol.MAX_LENGTH + 1, 2**32)),
                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    ]
                )
                for _ in range(rng.randrange(1, 5))
            )
            while stream:
                size = rng.randrange(1, 20)
                listener.protocol.dataReceived(stream[:size])
                stream = stream[size:]
            self.assertFalse(listener.protocol.isReady())
            self.assertEqual(listener.handler.events, [])
            disconnected += bool(listener.transport.disconnecting)
        # Most of these inputs are fatal; a few (a partial length prefix) wait.
        self.assertGreater(disconnected, 150)


class RawModeTests(SynchronousTestCase):
    """
    Raw sections: after C{expectRaw(n)} the next C{n} bytes go to the
    handler unframed, then framing resumes.
    """

    RAW = b"\xff\xff\xff\xff\x00\x00\x00\x05C{}x"[:10]

    def readyListener(self) -> Listener:
        listener = Listener()
        listener.authenticate()
        listener.handler.events.clear()
        return listener

    def assertRawThenMessage(self, listener: Listener) -> None:
        events = listener.handler.events
        self.assertEqual(listener.handler.raw, self.RAW)
        rawEvents = [e[0] for e in events if e[0] != "raw"]
        self.assertEqual(rawEvents, ["rawFinished", "message"])
        self.assertEqual(events[-1], ("message", Message("status", watch=True)))
        self.assertEqual(events[-2], ("rawFinished",))
        self.assertFalse(listener.transport.disconnecting)

    def test_oneRead(self) -> None:
        """
        Ten raw bytes (which look like an over-length frame prefix) and a
        frame in one read: the handler gets exactly those ten bytes, one
        C{rawDataFinished}, then the message.
        """
        self.assertEqual(len(self.RAW), 10)
        listener = self.readyListener()
        listener.protocol.expectRaw(10)
        listener.protocol.dataReceived(self.RAW + frame(Message("status", watch=True)))
        self.assertRawThenMessage(listener)
        self.assertEqual(listener.handler.of("raw"), [("raw", self.RAW)])

    def test_bulkSizesOnlyForLargeSections(self) -> None:
        """
        A raw section larger than L{RAW_READ_SIZE} asks the channel to carry
        bulk bytes (larger reads); a small one leaves the connection's sizes
        alone, so that small connections stay cheap.
        """
        listener = self.readyListener()
        before = listener.protocol.channel.bulkSize
        listener.protocol.expectRaw(10)
        self.assertEqual(listener.protocol.channel.bulkSize, before)
        listener.protocol.dataReceived(self.RAW)
        listener.protocol.expectRaw(RAW_READ_SIZE + 1)
        self.assertEqual(listener.protocol.channel.bulkSize, RAW_READ_SIZE)

    def test_controlLinksReadMore(self) -> None:
        """
        An authenticated control link asks its channel for reads of
        L{CONTROL_READ_SIZE} (index frames are large); a request connection
        keeps the small sizes of an accepted connection.
        """
        for purpose, size in (("control", CONTROL_READ_SIZE), ("request", None)):
            listener = Listener()
            answer = listener.sendHello(purpose=purpose)
            self.assertIsNone(listener.protocol.channel.bulkSize)
            listener.protocol.dataReceived(
                frame(Message("auth", proof=proofFor(SECRET, auth.CONNECTOR, listener.connectorHello, answer)))
            )
            self.assertTrue(listener.protocol.authenticated)
            self.assertEqual(listener.protocol.channel.bulkSize, size, purpose)

    def test_byteByByte(self) -> None:
        """
        The same stream one byte per read gives the same events.
        """
        listener = self.readyListener()
        listener.protocol.expectRaw(10)
        for byte in self.RAW + frame(Message("status", watch=True)):
            listener.protocol.dataReceived(bytes([byte]))
        self.assertRawThenMessage(listener)

    def test_everySplit(self) -> None:
        """
        The same stream cut into two reads at every possible point gives
        the same events.
        """
        stream = self.RAW + frame(Message("status", watch=True))
        for cut in range(len(stream) + 1):
            listener = self.readyListener()
            listener.protocol.expectRaw(10)
            listener.protocol.dataReceived(stream[:cut])
            listener.protocol.dataReceived(stream[cut:])
            self.assertRawThenMessage(listener)

    def test_fromMessageReceived(self) -> None:
        """
        A handler that calls C{expectRaw} while handling a header gets the
        bytes that follow the header in the same read as raw data, and the
        frame after them as a message.
        """
        listener = self.readyListener()

        def onMessage(connection: P2PProtocol, message: Message) -> None:
            if message.type == "fetched":
                connection.expectRaw(message.size)

        listener.handler.onMessage = onMessage
        header = Message("fetched", name="a", size=10, sha256="0" * 64, already=False)
        for reads in ([frame(header) + self.RAW + frame(Message("status", watch=True))],
                      [frame(header)[:7], frame(header)[7:] + self.RAW[:3], self.RAW[3:],
                       frame(Message("status", watch=True))]):
            listener.handler.events.clear()
            for data in reads:
                listener.protocol.dataReceived(data)
            self.assertEqual(listener.handler.events.pop(0), ("message", header))
            self.assertRawThenMessage(listener)

    def test_expectRawZero(self) -> None:
        """
        C{expectRaw(0)} finishes the (empty) raw section at once, with no
        raw data, and frames keep being parsed.
        """
        listener = self.readyListener()
        listener.protocol.expectRaw(0)
        self.assertEqual(listener.handler.events, [("rawFinished",)])
        listener.protocol.dataReceived(frame(Message("ls")))
        self.assertEqual(listener.handler.events, [("rawFinished",), ("message", Message("ls"))])


class HandlerErrorTests(SynchronousTestCase):
    """
    Errors raised by the handler drop the connection, never escape.
    """

    def test_protocolViolation(self) -> None:
        """
        A handler raising L{ProtocolViolation} drops the connection with that
        reason, logged and sent to the peer as a C{protocol} error.
        """
        events = captureLogs(self)
        pair = connectedPair()

        def onMessage(connection: P2PProtocol, message: Message) -> None:
            raise ProtocolViolation("ls is not allowed here")

        pair.listenerHandler.onMessage = onMessage
        pair.connector.sendMessage(Message("ls"))
        pair.flush()
        self.assertEqual(pair.listenerHandler.closed, 1)
        self.assertEqual(errorsTo(pair), [("protocol", "ls is not allowed here")])
        (line,) = linesFrom(events, pair.listener)
        self.assertIn("ls is not allowed here", line)

    def test_otherException(self) -> None:
        """
        A handler raising any other exception drops the connection with an
        C{internal} error, logs the failure with its traceback, and nothing
        escapes C{dataReceived}.
        """
        events = captureLogs(self)
        pair = connectedPair()

        def onMessage(connection: P2PProtocol, message: Message) -> None:
            raise ZeroDivisionError("oops")

        pair.listenerHandler.onMessage = onMessage
        pair.connector.sendMessage(Message("ls"))
        pair.flush()
        self.assertEqual(pair.listenerHandler.closed, 1)
        [(code, reason)] = errorsTo(pair)
        self.assertEqual(code, "internal")
        self.assertIn("internal error", reason)
        failures = [e["log_failure"] for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(ZeroDivisionError))
        self.assertTrue(any("internal error" in line for line in linesFrom(events, pair.listener)))

    def test_nextMessageNotDelivered(self) -> None:
        """
        After a handler error, later frames from the same read are not
        delivered.
        """
        listener = Listener()
        listener.authenticate()
        self.patch(P2PProtocol, "log", Logger(observer=lambda event: None))

        def onMessage(connection: P2PProtocol, message: Message) -> None:
            raise ProtocolViolation("no")

        listener.handler.onMessage = onMessage
        listener.protocol.dataReceived(frame(Message("ls")) + frame(Message("ls")))
        self.assertEqual(listener.handler.messages, [Message("ls")])
        self.assertTrue(listener.transport.disconnecting)


class RefusalTests(SynchronousTestCase):
    """
    An error frame from the other end.
    """

    def test_errorFrameAfterReady(self) -> None:
        """
        After the handshake an error frame answers a request: it goes to the
        handler like any message.  A refusal (C{refuse}) still closes the
        connection.
        """
        pair = connectedPair()
        pair.listener.refuse("conflict", "node id 2 is already in use")
        pair.flush()
        self.assertIsNone(pair.connector.refusal)
        self.assertEqual(
            pair.connectorHandler.messages,
            [Message("error", code="conflict", reason="node id 2 is already in use")],
        )
        self.assertEqual(pair.connectorHandler.closed, 1)
        self.assertEqual(pair.listenerHandler.closed, 1)

    def test_errorFrameDuringHandshake(self) -> None:
        """
        An error frame in place of the listener's hello is a refusal too.
        """
        connector = Connector()
        connector.protocol.dataReceived(frame(Message("error", code="version", reason="too old")))
        self.assertEqual(connector.protocol.refusal, ("version", "too old"))
        self.assertTrue(connector.transport.disconnecting)
        self.assertEqual(connector.handler.events, [])

    def test_sendAfterClose(self) -> None:
        """
        Sending on a closed connection is a no-op, not an error.
        """
        listener = Listener(transport=StringTransportWithDisconnection())
        listener.protocol.connectionLost(Failure(Exception("gone")))
        listener.transport.clear()
        listener.protocol.sendMessage(Message("ls"))
        self.assertEqual(listener.transport.value(), b"")


class FactoryTests(SynchronousTestCase):
    """
    Tests for L{P2PFactory}.
    """

    def test_buildProtocol(self) -> None:
        """
        The factory builds protocols with its identity, handler, clock and
        side, and a reference back to itself.
        """
        handler = RecordingHandler()
        clock = Clock()
        factory = P2PFactory(LISTENER, handler, clock, listening=True)
        protocol = factory.buildProtocol(CONNECTOR_ADDRESS)
        self.assertIsInstance(protocol, P2PProtocol)
        self.assertIs(protocol.identity, LISTENER)
        self.assertIs(protocol.handler, handler)
        self.assertIs(protocol.clock, clock)
        self.assertTrue(protocol.incoming)
        self.assertIs(protocol.factory, factory)
        self.assertFalse(factory.noisy)


class ConnectionLimitTests(SynchronousTestCase):
    """
    A listening L{P2PFactory} with L{ConnectionLimits} refuses, at connect
    time, connections over its total and per-address caps, and says so in a
    rate-limited log line.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: List[dict] = []
        self.patch(ConnectionLimits, "log", Logger(observer=self.events.append))
        self.factory = P2PFactory(LISTENER, lambda: RecordingHandler(), self.clock, listening=True, perConnection=True)

    def connect(self, host: str, port: int) -> Optional[P2PProtocol]:
        address = IPv4Address("TCP", host, port)
        protocol = self.factory.buildProtocol(address)
        if protocol is not None:
            protocol.makeConnection(StringTransport(hostAddress=LISTENER_ADDRESS, peerAddress=address))
        return protocol

    def lines(self) -> List[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]

    def test_perAddress(self) -> None:
        """
        With a cap of 2 per address, a third connection from one host is
        refused while another host still connects; once one closes, the
        first host may connect again.
        """
        self.factory.limits = ConnectionLimits(self.clock, None, 2)
        first = self.connect("10.0.0.1", 1)
        self.assertIsNotNone(self.connect("10.0.0.1", 2))
        self.assertIsNone(self.connect("10.0.0.1", 3))
        self.assertIsNotNone(self.connect("10.0.0.2", 1))
        (line,) = self.lines()
        self.assertIn("10.0.0.1:3", line)
        self.assertIn("from one address", line)
        assert first is not None
        first.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.connect("10.0.0.1", 4))

    def test_total(self) -> None:
        """
        With a total cap of 3, the fourth connection is refused whatever its
        host.
        """
        self.factory.limits = ConnectionLimits(self.clock, 3, None)
        for i in range(3):
            self.assertIsNotNone(self.connect(f"10.0.0.{i}", 1))
        self.assertIsNone(self.connect("10.0.0.9", 1))
        (line,) = self.lines()
        self.assertIn("3 connections are open", line)

    def test_logRateLimited(self) -> None:
        """
        A flood of refused connections logs one line per C{LOG_INTERVAL},
        counting those refused in between.
        """
        self.factory.limits = limits = ConnectionLimits(self.clock, 1, None)
        first = self.connect("10.0.0.1", 1)
        for i in range(100):
            self.assertIsNone(self.connect("10.0.0.2", i))
        self.assertEqual(len(self.lines()), 1)
        self.clock.advance(ConnectionLimits.LOG_INTERVAL)
        # The first one timed out meanwhile: another takes its place.
        assert first is not None
        first.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.connect("10.0.0.1", 2))
        self.assertIsNone(self.connect("10.0.0.2", 999))
        lines = self.lines()
        self.assertEqual(len(lines), 2)
        self.assertIn("100 refused", lines[1])
        self.assertEqual(limits.refused, 101)

    def authenticate(self, protocol: P2PProtocol) -> None:
        """
        Run a connector's half of the handshake on C{protocol}.
        """
        transport = protocol.transport
        nonce = auth.makeNonce()
        connectorHello = hello(CONNECTOR, nonce)
        protocol.dataReceived(frame(connectorHello))
        (answer, _) = parseFrames(transport.value())
        protocol.dataReceived(frame(Message("auth", proof=proofFor(SECRET, auth.CONNECTOR, connectorHello, answer))))
        self.assertTrue(protocol.authenticated)

    def test_fullEvictsFromBusiestHost(self) -> None:
        """
        When the node is full, a newcomer from a host with few connections
        takes the place of the oldest unauthenticated connection from the
        host that holds the most: that one is closed at once (without a log
        line of its own), the eviction is counted and logged once.
        """
        self.factory.limits = limits = ConnectionLimits(self.clock, 4, None)
        flood = []
        for port in range(3):
            flood.append(self.connect("10.0.0.1", port))
            self.clock.advance(0.1)
        other = self.connect("10.0.0.2", 1)
        self.assertIsNotNone(self.connect("10.0.0.9", 1))
        self.assertTrue(flood[0].transport.disconnecting)
        self.assertFalse(any(p.transport.disconnecting for p in flood[1:] + [other]))
        self.assertEqual((limits.evicted, limits.refused), (1, 0))
        (line,) = self.lines()
        self.assertIn("to make room for one from 10.0.0.9:1", line)
        self.assertIn("10.0.0.1", line)

    def test_fullAmongEqualsRefuses(self) -> None:
        """
        Hosts that hold as many connections as each other do not displace
        one another: a newcomer from a host that is as busy as the busiest
        (or one less) is refused, as with no eviction.
        """
        self.factory.limits = limits = ConnectionLimits(self.clock, 5, None)
        for host in ("10.0.0.1", "10.0.0.2"):
            for port in range(2):
                self.connect(host, port)
        self.connect("10.0.0.3", 1)
        self.assertIsNone(self.connect("10.0.0.1", 9))
        self.assertIsNone(self.connect("10.0.0.2", 9))
        self.assertIsNone(self.connect("10.0.0.3", 9))
        self.assertEqual((limits.evicted, limits.refused), (0, 3))

    def test_authenticatedNotEvicted(self) -> None:
        """
        Authenticated connections are never closed to make room: a full
        node of authenticated connections refuses the newcomer.
        """
        self.factory.limits = limits = ConnectionLimits(self.clock, 3, None)
        protocols = [self.connect("10.0.0.1", port) for port in range(3)]
        for protocol in protocols:
            self.authenticate(protocol)
        self.assertIsNone(self.connect("10.0.0.9", 1))
        self.assertFalse(any(p.transport.disconnecting for p in protocols))
        self.assertEqual((limits.evicted, limits.refused), (0, 1))

    def test_evictedNotCounted(self) -> None:
        """
        A connection closed to make room no longer counts while it closes:
        the next newcomer finds room for itself by evicting another.
        """
        self.factory.limits = limits = ConnectionLimits(self.clock, 3, None)
        flood = [self.connect("10.0.0.1", port) for port in range(3)]
        self.assertIsNotNone(self.connect("10.0.0.8", 1))
        self.assertIsNotNone(self.connect("10.0.0.9", 1))
        self.assertEqual(sum(p.transport.disconnecting for p in flood), 2)
        self.assertEqual(limits.evicted, 2)

    def test_outgoingNotLimited(self) -> None:
        """
        A connecting (not listening) factory is never capped.
        """
        factory = P2PFactory(CONNECTOR, RecordingHandler(), self.clock, listening=False)
        factory.limits = ConnectionLimits(self.clock, 0, 0)
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)))
