"""
Talking to a node as a client: connect, authenticate, send requests, read
replies, receive file bytes.  Used by the command-line client, by a node that
fetches a file from the leader, and by the leader relaying from a holder.

Every failure is a L{P2PError}; what exit code it becomes is decided in
L{p2pfiles.cli} alone.
"""

from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredQueue, QueueUnderflow, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.address import clientEndpoint
from p2pfiles.errors import P2PError
from p2pfiles.identity import Pins
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PFactory, P2PProtocol, ProtocolViolation
from p2pfiles.tls import TLS
from p2pfiles.wire import Message


@implementer(IConnectionHandler)
class ClientConnection:
    """
    The handler of one client connection: a queue of received messages, and
    the receiving end of a raw section.

    A C{file} header switches the protocol to raw mode at once, inside
    L{messageReceived}, and pauses reading until the user of the connection
    says where the bytes go (L{receiveRaw}); the few bytes that arrived with
    the header wait here meanwhile.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.protocol: Optional[P2PProtocol] = None
        self.ready: Deferred = Deferred()
        self._messages: DeferredQueue = DeferredQueue()
        self.closedReason: Optional[P2PError] = None
        self._rawSink: Optional[Callable[[bytes], None]] = None
        self._rawDone: Optional[Callable[[], None]] = None
        self._held: List[bytes] = []
        self._heldDone = False
        self._paused = False
        self.onClose: Optional[Callable[[P2PError], None]] = None

    # IConnectionHandler

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.protocol = connection
        self.ready.callback(self)

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        if message.type == "file":
            if message.offset > message.size:
                raise ProtocolViolation(f"file header offset {message.offset} is beyond its size {message.size}")
            self._rawSink = self._rawDone = None
            self._held = []
            self._heldDone = False
            connection.expectRaw(message.size - message.offset)
            if not self._heldDone:
                connection.transport.pauseProducing()
                self._paused = True
        self._messages.put(message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        if self._rawSink is None:
            self._held.append(data)
        else:
            self._rawSink(data)

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        if self._rawDone is None:
            self._heldDone = True
        else:
            done, self._rawSink, self._rawDone = self._rawDone, None, None
            done()

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        if connection.refusal is not None:
            error = P2PError(connection.refusal[1], connection.refusal[0])
        elif connection.peer is None and connection.dropReason is not None:
            error = P2PError(f"connection to {self.address} failed: {connection.dropReason}", "unreachable")
        elif connection.peer is None:
            error = P2PError(f"{self.address} closed the connection during the handshake", "unreachable")
        else:
            error = P2PError(f"connection to {self.address} lost", "unreachable")
        self.closedReason = error
        if not self.ready.called:
            self.ready.errback(error)
        while self._messages.waiting:
            self._messages.waiting.pop(0).errback(error)
        onClose, self.onClose = self.onClose, None
        if onClose is not None:
            onClose(error)

    # Use.

    def send(self, message: Message) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(message)

    def receive(self) -> Deferred:
        """
        The next message; fails with L{P2PError} if the connection closes
        first, or if the node answers with an error.
        """
        if self._messages.pending:
            d = self._messages.get()
        elif self.closedReason is not None:
            return fail(self.closedReason)
        else:
            try:
                d = self._messages.get()
            except QueueUnderflow:
                return fail(P2PError("too many readers", "internal"))
        return d.addCallback(_raiseErrors)

    def receiveRaw(self, sink: Callable[[bytes], None], done: Callable[[], None]) -> None:
        """
        Send the raw section announced by the last C{file} header to
        C{sink}, then call C{done}.  Bytes that came before this call are
        delivered first, then reading resumes.
        """
        held, self._held = self._held, []
        for data in held:
            sink(data)
        if self._heldDone:
            self._heldDone = False
            done()
        else:
            self._rawSink = sink
            self._rawDone = done
        self.resumeReading()

    @property
    def transport(self) -> Any:
        return self.protocol.transport if self.protocol is not None else None

    def pauseReading(self) -> None:
        if self.protocol is not None and not self._paused and not self.protocol.closed:
            self._paused = True
            self.protocol.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._paused and self.protocol is not None and not self.protocol.closed:
            self._paused = False
            self.protocol.transport.resumeProducing()

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.close()

    def abort(self) -> None:
        if self.protocol is not None:
            self.protocol.abort()


def _raiseErrors(message: Message) -> Message:
    if message.type == "error":
        raise P2PError(message.reason, message.code)
    return message


def clientIdentity(secret: bytes, pins: Optional[Pins] = None) -> LocalIdentity:
    """
    Who the command-line client is: a client with C{secret}, over TLS
    without a certificate of its own, pinning C{pins}.
    """
    return LocalIdentity("client", None, None, secret, "request", TLS(), pins)


def connect(
    reactor: Any, address: str, secret: bytes, timeout: float = 10.0, identity: Optional[LocalIdentity] = None
) -> Deferred:
    """
    Connect to the node at C{address} over TLS and authenticate; fire with a
    L{ClientConnection}, or fail with a L{P2PError}.  Without C{identity}
    this end is a client with C{secret}, no certificate and no pins.
    """
    if identity is None:
        identity = clientIdentity(secret)
    try:
        endpoint = clientEndpoint(reactor, address, timeout, identity.security)
    except ValueError as e:
        return fail(P2PError(str(e), "usage"))
    handler = ClientConnection(address)
    factory = P2PFactory(identity, handler, reactor, listening=False)

    def failedToConnect(reason: Failure) -> Failure:
        if reason.check(P2PError):
            return reason
        if reason.check(TimeoutError):
            raise P2PError(f"cannot connect to {address}: timed out", "timeout")
        if reason.check(ConnectError):
            detail = str(reason.value).rstrip(".")
            raise P2PError(f"cannot connect to {address}: {detail}", "unreachable")
        return reason

    d = endpoint.connect(factory)
    d.addCallback(lambda protocol: handler.ready)
    d.addErrback(failedToConnect)
    return d


def request(connection: ClientConnection, message: Message) -> Deferred:
    """
    Send C{message} and fire with the reply.
    """
    connection.send(message)
    return connection.receive()


# How long to wait for an election to finish before giving up.
NO_LEADER_WAIT = 5.0
MAX_REDIRECTS = 3


def bounded(reactor: Any, d: Deferred, timeout: float, address: str) -> Deferred:
    """
    Fail C{d} with a L{P2PError} if it has not fired within C{timeout}.
    """

    def timedOut(reason: Failure) -> Failure:
        if reason.check(DeferredTimeout):
            raise P2PError(f"no answer from {address} within {timeout:g}s", "timeout")
        return reason

    return d.addTimeout(timeout, reactor).addErrback(timedOut)


async def askLeader(
    reactor: Any,
    address: str,
    secret: bytes,
    message: Message,
    timeout: float = 10.0,
    identity: Optional[LocalIdentity] = None,
    noLeaderWait: float = NO_LEADER_WAIT,
) -> Tuple[ClientConnection, Message]:
    """
    Send C{message} to the leader, starting from the node at C{address}:
    follow redirects, and wait up to C{noLeaderWait} if an election is under
    way.  Return the open connection and the reply.
    """
    deadline = reactor.seconds() + noLeaderWait
    redirects = 0
    while True:
        connection = await connect(reactor, address, secret, timeout, identity)
        try:
            reply = await bounded(reactor, request(connection, message), timeout, address)
        except P2PError as e:
            connection.close()
            if e.code != "no-leader" or reactor.seconds() >= deadline:
                raise
            await deferLater(reactor, 0.25)
            continue
        if reply.type != "redirect":
            return connection, reply
        connection.close()
        redirects += 1
        if redirects > MAX_REDIRECTS:
            raise P2PError("too many redirects looking for the leader", "no-leader")
        address = reply.address


async def receiveListing(reactor: Any, connection: ClientConnection, first: Message, timeout: float, address: str) -> List[dict]:
    """
    Collect a listing sent in several frames, starting from C{first}.
    """
    files: List[dict] = []
    reply = first
    while True:
        if reply.type != "listing":
            raise P2PError(f"unexpected {reply.type} reply to ls", "protocol")
        files.extend(reply.files)
        if reply.last:
            return files
        reply = await bounded(reactor, connection.receive(), timeout, address)


async def fetchInto(reactor: Any, connection: ClientConnection, name: str, overwrite: bool, timeout: float) -> Message:
    """
    Ask the node at the other end of C{connection} to fetch C{name} into its
    share; return its C{fetched} reply.  The node may take as long as the
    file takes, and says every second that it is at work: a node silent for
    C{timeout} seconds is given up on.
    """
    connection.send(Message("fetch", name=name, overwrite=overwrite))
    while True:
        reply = await bounded(reactor, connection.receive(), timeout, connection.address)
        if reply.type == "fetched":
            return reply
        if reply.type != "progress":
            raise P2PError(f"unexpected {reply.type} reply to fetch", "protocol")


async def askListing(reactor: Any, address: str, secret: bytes, timeout: float, identity: Optional[LocalIdentity] = None) -> List[dict]:
    """
    What C{ls --json} prints: the leader's listing, asked through the node
    at C{address}.
    """
    connection, reply = await askLeader(reactor, address, secret, Message("ls"), timeout, identity)
    try:
        return await receiveListing(reactor, connection, reply, timeout, address)
    finally:
        connection.close()
