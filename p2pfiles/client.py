"""
Talking to a node as a client: connect, authenticate, send requests, read
replies.  Used by the command-line client and by a node that fetches a file
from the leader.
"""

from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred, DeferredQueue, QueueUnderflow, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from p2pfiles.address import parseAddress
from p2pfiles.protocol import LocalIdentity, P2PFactory, P2PProtocol
from p2pfiles.wire import Message

# Exit codes of the command-line client; also how a ClientError is classed.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_TIMEOUT = 5
EXIT_NOT_FOUND = 6
EXIT_NO_LEADER = 7
EXIT_VERIFY = 8
EXIT_REFUSED = 9
EXIT_LOCAL = 10

# A node's refusal codes -> exit codes.
_REFUSALS = {
    "auth": EXIT_AUTH,
    "version": EXIT_REFUSED,
    "not-found": EXIT_NOT_FOUND,
    "no-leader": EXIT_NO_LEADER,
    "bad-name": EXIT_REFUSED,
    "bad-offset": EXIT_REFUSED,
    "conflict": EXIT_REFUSED,
    "timeout": EXIT_TIMEOUT,
    "verify": EXIT_VERIFY,
    "unavailable": EXIT_UNREACHABLE,
    "io": EXIT_LOCAL,
}


# Exit codes -> the refusal code a node sends for them.
_EXIT_REFUSALS = {
    EXIT_AUTH: "auth",
    EXIT_NOT_FOUND: "not-found",
    EXIT_NO_LEADER: "no-leader",
    EXIT_REFUSED: "conflict",
    EXIT_TIMEOUT: "timeout",
    EXIT_VERIFY: "verify",
    EXIT_UNREACHABLE: "unavailable",
    EXIT_LOCAL: "io",
}


def refusalFor(exitCode: int) -> str:
    """
    The refusal code a node sends for a failure with C{exitCode}, so that a
    client of a node that fetches sees the error it would have seen
    fetching itself.
    """
    return _EXIT_REFUSALS.get(exitCode, "transfer")


class ClientError(Exception):
    """
    An expected failure, with a one-line message and an exit code.
    """

    def __init__(self, message: str, code: int = EXIT_ERROR, refusal: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.refusal = refusal

    @classmethod
    def fromRefusal(cls, code: str, reason: str) -> "ClientError":
        """
        The error for a node's refusal with C{code}.
        """
        return cls(reason, _REFUSALS.get(code, EXIT_REFUSED), code)


class ClientConnection:
    """
    The handler of one client connection: a queue of received messages and a
    sink for raw bytes.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.protocol: Optional[P2PProtocol] = None
        self.ready: Deferred = Deferred()
        self._messages: DeferredQueue = DeferredQueue()
        self._waiters: List[Deferred] = []
        self.closedReason: Optional[ClientError] = None
        self.rawSink: Optional[Callable[[bytes], None]] = None
        self.rawDone: Optional[Callable[[], None]] = None
        self.onClose: Optional[Callable[[ClientError], None]] = None

    # IConnectionHandler

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.protocol = connection
        self.ready.callback(self)

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        self._messages.put(message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        assert self.rawSink is not None
        self.rawSink(data)

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        if self.rawDone is not None:
            self.rawDone()

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        if connection.refusal is not None:
            error = ClientError.fromRefusal(*connection.refusal)
        elif connection.peer is None:
            error = ClientError(
                f"{self.address} closed the connection during the handshake", EXIT_UNREACHABLE
            )
        else:
            error = ClientError(f"connection to {self.address} lost", EXIT_UNREACHABLE)
        self.closedReason = error
        if not self.ready.called:
            self.ready.errback(error)
        while self._messages.waiting:
            self._messages.waiting.pop(0).errback(error)
        if self.onClose is not None:
            self.onClose(error)

    # Use.

    def send(self, message: Message) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(message)

    def receive(self) -> Deferred:
        """
        The next message; fails with L{ClientError} if the connection closes
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
                return fail(ClientError("too many readers"))
        return d.addCallback(_raiseErrors)

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()


def _raiseErrors(message: Message) -> Message:
    if message.type == "error":
        raise ClientError.fromRefusal(message.code, message.reason)
    return message


def connect(
    reactor: Any, address: str, secret: bytes, timeout: float = 10.0, identity: Optional[LocalIdentity] = None
) -> Deferred:
    """
    Connect to the node at C{address} and authenticate; fire with a
    L{ClientConnection}, or fail with a L{ClientError}.
    """
    try:
        host, port = parseAddress(address)
    except ValueError as e:
        return fail(ClientError(str(e), EXIT_USAGE))
    endpointType = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = endpointType(reactor, host, port, timeout=timeout)
    handler = ClientConnection(address)
    if identity is None:
        identity = LocalIdentity("client", None, None, secret, "request")
    factory = P2PFactory(identity, handler, reactor, listening=False)

    def failedToConnect(reason: Failure) -> Failure:
        if reason.check(ClientError):
            return reason
        if reason.check(TimeoutError):
            raise ClientError(f"cannot connect to {address}: timed out", EXIT_TIMEOUT)
        if reason.check(ConnectError):
            detail = str(reason.value).rstrip(".")
            raise ClientError(f"cannot connect to {address}: {detail}", EXIT_UNREACHABLE)
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
    Fail C{d} with a L{ClientError} if it has not fired within C{timeout}.
    """

    def timedOut(reason: Failure) -> Failure:
        if reason.check(DeferredTimeout):
            raise ClientError(f"no answer from {address} within {timeout:g}s", EXIT_TIMEOUT)
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
        except ClientError as e:
            connection.close()
            if e.code != EXIT_NO_LEADER or reactor.seconds() >= deadline:
                raise
            await deferLater(reactor, 0.25)
            continue
        if reply.type != "redirect":
            return connection, reply
        connection.close()
        redirects += 1
        if redirects > MAX_REDIRECTS:
            raise ClientError("too many redirects looking for the leader", EXIT_NO_LEADER)
        address = reply.address


async def receiveListing(reactor: Any, connection: ClientConnection, first: Message, timeout: float, address: str) -> List[dict]:
    """
    Collect a listing sent in several frames, starting from C{first}.
    """
    files: List[dict] = []
    reply = first
    while True:
        if reply.type != "listing":
            raise ClientError(f"unexpected {reply.type} reply to ls")
        files.extend(reply.files)
        if reply.last:
            return files
        reply = await bounded(reactor, connection.receive(), timeout, address)
