"""
One control link between two nodes: L{ControlSession}.

Control links carry heartbeats, stale notices and the index messages.  The
session checks that a message may travel on this link, and hands it, with the
sender's id, to the function its node's dispatch table names for its type.
"""

from typing import Callable, Dict

from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.protocol import IConnectionHandler, P2PProtocol, ProtocolViolation
from p2pfiles.wire import Message

ControlHandler = Callable[[int, Message], None]


@implementer(IConnectionHandler)
class ControlSession:
    """
    The handler of one authenticated control connection.

    @param handlers: message type -> function of (sender, message).
    @param ready: called with the connection once it is up; returns False
        if the link is refused.
    @param closed: called with the connection once it is gone.
    """

    def __init__(
        self,
        handlers: Dict[str, ControlHandler],
        ready: Callable[[P2PProtocol], bool],
        closed: Callable[[P2PProtocol], None],
    ) -> None:
        self.handlers = handlers
        self.ready = ready
        self.closed = closed
        self.accepted = False

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.accepted = self.ready(connection)

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        if not self.accepted:
            return
        handler = self.handlers.get(message.type)
        if handler is None:
            raise ProtocolViolation(f"{message.type} is not accepted on a control link")
        assert connection.peer is not None and connection.peer.node is not None
        sender = connection.peer.node
        if message.type == "heartbeat" and message.node != sender:
            raise ProtocolViolation(f"heartbeat names node {message.node} on node {sender}'s link")
        handler(sender, message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise ProtocolViolation("unexpected raw data on a control link")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        pass

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        if self.accepted:
            self.closed(connection)
