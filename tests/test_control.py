"""
Tests for L{p2pfiles.control}: the handler of one control link between two
nodes.
"""

from typing import Any, List, Tuple

from zope.interface.verify import verifyObject

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import auth
from p2pfiles.control import ControlSession
from p2pfiles.protocol import IConnectionHandler, P2PProtocol, PeerInfo, ProtocolViolation
from p2pfiles.wire import Message
from tests.channels import plainIdentity
from tests.frames import frame, hello, parseFrames, proofFor


class FakeConnection:
    """
    Just what a control session reads of its connection: who is at the
    other end.
    """

    def __init__(self, node: int = 2) -> None:
        self.peer = PeerInfo("node", node, f"127.0.0.1:{9000 + node}", "control")


def heartbeat(node: int) -> Message:
    return Message("heartbeat", node=node, epoch=1, leader=1, members=[])


class Recorder:
    """
    A dispatch table whose every entry records (type, sender, message), and
    the ready/closed callbacks of a session.
    """

    def __init__(self, accept: bool = True) -> None:
        self.calls: List[Tuple[str, int, Message]] = []
        self.accept = accept
        self.readied: List[Any] = []
        self.closed: List[Any] = []

    def table(self, *types: str) -> dict:
        return {t: (lambda sender, message, t=t: self.calls.append((t, sender, message))) for t in types}

    def ready(self, connection: Any) -> bool:
        self.readied.append(connection)
        return self.accept

    def close(self, connection: Any) -> None:
        self.closed.append(connection)

    def session(self, *types: str) -> ControlSession:
        return ControlSession(self.table(*types), self.ready, self.close)


class ControlSessionTests(SynchronousTestCase):
    """
    L{ControlSession} called directly.
    """

    def test_providesIConnectionHandler(self) -> None:
        """
        L{ControlSession} provides L{IConnectionHandler}.
        """
        self.assertTrue(verifyObject(IConnectionHandler, Recorder().session()))

    def test_dispatchByTable(self) -> None:
        """
        Each message goes to the function its type names in the table, with
        the sender's id from the handshake; no other entry is called.
        """
        recorder = Recorder()
        session = recorder.session("heartbeat", "stale", "index-changed")
        connection = FakeConnection(2)
        session.connectionReady(connection)
        stale = Message("stale", epoch=3, leader=1)
        session.messageReceived(connection, heartbeat(2))
        session.messageReceived(connection, stale)
        self.assertEqual([(t, s) for t, s, _ in recorder.calls], [("heartbeat", 2), ("stale", 2)])
        self.assertIs(recorder.calls[1][2], stale)

    def test_unknownTypeIsViolation(self) -> None:
        """
        A type the table does not name (a request, on a control link) is a
        protocol violation, and nothing is called.
        """
        recorder = Recorder()
        session = recorder.session("heartbeat")
        connection = FakeConnection(2)
        session.connectionReady(connection)
        self.assertRaises(ProtocolViolation, session.messageReceived, connection, Message("ls"))
        self.assertEqual(recorder.calls, [])

    def test_heartbeatForAnotherNodeIsViolation(self) -> None:
        """
        A heartbeat that names another node than the one that proved itself
        on this link is a violation: a node cannot speak for another.
        """
        recorder = Recorder()
        session = recorder.session("heartbeat")
        connection = FakeConnection(2)
        session.connectionReady(connection)
        self.assertRaises(ProtocolViolation, session.messageReceived, connection, heartbeat(3))
        self.assertEqual(recorder.calls, [])

    def test_ignoredUntilAccepted(self) -> None:
        """
        Before the link is accepted, or when its acceptance was refused,
        messages are ignored: not dispatched, and not violations either
        (the refusal is already closing the link).
        """
        recorder = Recorder(accept=False)
        session = recorder.session("heartbeat")
        connection = FakeConnection(2)
        session.messageReceived(connection, heartbeat(2))
        session.connectionReady(connection)
        self.assertEqual(recorder.readied, [connection])
        session.messageReceived(connection, heartbeat(2))
        session.messageReceived(connection, Message("ls"))
        self.assertEqual(recorder.calls, [])

    def test_closedOnlyIfAccepted(self) -> None:
        """
        C{closed} is called once for a link that was accepted, and never for
        one that was refused or never got ready.
        """
        for accept, readied, expected in ((True, True, 1), (False, True, 0), (True, False, 0)):
            recorder = Recorder(accept=accept)
            session = recorder.session()
            connection = FakeConnection(2)
            if readied:
                session.connectionReady(connection)
            session.connectionClosed(connection, Failure(ConnectionDone()))
            self.assertEqual(len(recorder.closed), expected, (accept, readied))

    def test_rawDataIsViolation(self) -> None:
        """
        Control links never carry raw sections.
        """
        session = Recorder().session()
        self.assertRaises(ProtocolViolation, session.rawDataReceived, FakeConnection(), b"x")


class ControlOverProtocolTests(SynchronousTestCase):
    """
    A L{ControlSession} behind a real listening L{P2PProtocol}, on a plain
    test channel.
    """

    def open(self, recorder: Recorder, *types: str) -> Tuple[P2PProtocol, StringTransport]:
        """
        A listening node 1 whose control session C{recorder} dispatches
        C{types}, taken through the handshake by hand as node 2.
        """
        clock = Clock()
        protocol = P2PProtocol(
            plainIdentity("node", 1, "127.0.0.1:9001", b"", "control"),
            recorder.session(*types),
            clock,
            listening=True,
        )
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40002))
        protocol.makeConnection(transport)
        mine = hello(plainIdentity("node", 2, "127.0.0.1:9002", b"", "control"), auth.makeNonce())
        protocol.dataReceived(frame(mine))
        (answer, listenerAuth) = parseFrames(transport.value())
        self.assertEqual(listenerAuth.proof, proofFor(b"", auth.LISTENER, mine, answer))
        transport.clear()
        protocol.dataReceived(frame(Message("auth", proof=proofFor(b"", auth.CONNECTOR, mine, answer))))
        self.assertEqual([m.type for m in parseFrames(transport.value())], ["ready"])
        transport.clear()
        self.addCleanup(lambda: protocol.closed or protocol.connectionLost(Failure(ConnectionDone())))
        return protocol, transport

    def test_violationDropsTheLink(self) -> None:
        """
        A violation on a control link is told to the other end as a
        C{protocol} error and the link is closed; C{closed} is called once
        when it is gone.
        """
        recorder = Recorder()
        protocol, transport = self.open(recorder, "heartbeat")
        self.assertEqual(recorder.readied, [protocol])
        protocol.dataReceived(frame(heartbeat(3)))
        (error,) = parseFrames(transport.value())
        self.assertEqual((error.type, error.code), ("error", "protocol"))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.closed, [protocol])

    def test_dispatchedWithSender(self) -> None:
        """
        Over a real protocol, a heartbeat reaches the table's function with
        the id the other end proved in the handshake.
        """
        recorder = Recorder()
        protocol, transport = self.open(recorder, "heartbeat")
        protocol.dataReceived(frame(heartbeat(2)))
        self.assertEqual([(t, s) for t, s, _ in recorder.calls], [("heartbeat", 2)])
        self.assertEqual(transport.value(), b"")
