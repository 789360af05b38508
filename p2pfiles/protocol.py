"""
The p2pfiles connection protocol: length-prefixed frames, an authenticated
handshake bound to the connection's TLS channel, then typed messages handed
to a handler.

The protocol is deliberately thin.  It frames and decodes, runs the
handshake, and passes every message to its handler (the node, a transfer, or
the command-line client); it holds no cluster state of its own.  Anything
malformed drops this one connection with a logged reason.

Raw mode: a handler that has just been given a C{file} header calls
L{P2PProtocol.expectRaw} from inside its C{messageReceived}, and the next
C{length} bytes of the stream go to the handler's C{rawDataReceived}
unframed, so file bytes are neither copied into frames nor encoded.  The
switch happens before the protocol looks at another byte, so no timing of
Deferreds can ever parse file bytes as frames.

Security: every connection is secured by its identity's
L{IConnectionSecurity} (TLS in the package, L{p2pfiles.tls}).  Nothing is
sent before the security layer says the channel is up
(L{P2PProtocol.handshakeCompleted}, Twisted's L{IHandshakeListener}); the
hellos then name both ends, pins are checked, and each end proves the
cluster secret over the channel's binding and both hellos
(L{p2pfiles.auth}).
"""

from struct import pack, unpack
from typing import Any, Callable, Optional, Set, Tuple

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from p2pfiles import auth
from p2pfiles.admission import ConnectionLimits
from p2pfiles.channel import ChannelError, IChannelBinding, IConnectionSecurity, closeReason
from p2pfiles.waiting import Once
from p2pfiles.wire import MAX_FRAME, PROTOCOL_VERSION, Message, WireError, decode, encode

# How long a connection may take to finish the handshake before it is dropped.
HANDSHAKE_TIMEOUT = 5.0

# How much a connection reads at once while receiving a raw section.
RAW_READ_SIZE = 256 * 1024

# How much a control link reads at once: index frames are up to 1 MiB.
CONTROL_READ_SIZE = 64 * 1024

ROLES = ("node", "client")
PURPOSES = ("control", "request")


class ProtocolViolation(Exception):
    """
    Raised by a handler for a message that is well formed but not allowed
    here; the connection is dropped with this reason.
    """


class IConnectionHandler(Interface):
    """
    What a protocol hands its events to.
    """

    def connectionReady(connection):
        """
        The handshake succeeded; C{connection.peer} describes the other end.
        """

    def messageReceived(connection, message):
        """
        A control message arrived on an authenticated connection.  Raise
        L{ProtocolViolation} to drop the connection.
        """

    def rawDataReceived(connection, data):
        """
        Bytes of a raw section announced with L{P2PProtocol.expectRaw}.
        """

    def rawDataFinished(connection):
        """
        The last byte of a raw section has been delivered.
        """

    def connectionClosed(connection, reason):
        """
        The connection is gone (after C{connectionReady} or not).
        """


class LocalIdentity:
    """
    Who this end of a connection is: its role (C{"node"} or C{"client"}), its
    node id and listening address (nodes only), why it connects
    (C{"control"} link or C{"request"}), the cluster secret (C{b""} for
    none), how it secures its connections (an L{IConnectionSecurity}: TLS,
    with the node's certificate), and the fingerprints it pins (a
    L{p2pfiles.identity.Pins}, or None).
    """

    def __init__(
        self,
        role: str,
        node: Optional[int],
        address: Optional[str],
        secret: bytes,
        purpose: str = "request",
        security: Optional[IConnectionSecurity] = None,
        pins: Any = None,
    ) -> None:
        self.role = role
        self.node = node
        self.address = address
        self.secret = secret
        self.purpose = purpose
        self.security = security
        self.pins = pins

    @property
    def fingerprint(self) -> Optional[str]:
        """
        This end's certificate fingerprint, or None.
        """
        return self.security.fingerprint if self.security is not None else None

    def withPurpose(self, purpose: str) -> "LocalIdentity":
        return LocalIdentity(self.role, self.node, self.address, self.secret, purpose, self.security, self.pins)


class PeerInfo:
    """
    What the other end proved about itself in the handshake, and the
    fingerprint of the certificate it presented (None for a client).
    """

    def __init__(
        self,
        role: str,
        node: Optional[int],
        address: Optional[str],
        purpose: str,
        fingerprint: Optional[str] = None,
    ) -> None:
        self.role = role
        self.node = node
        self.address = address
        self.purpose = purpose
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        who = f"node {self.node}" if self.role == "node" else "client"
        return f"<{who} {self.purpose}>"


@implementer(IHandshakeListener)
class P2PProtocol(Int32StringReceiver):
    """
    One p2pfiles connection, either side.

    @ivar channel: the connection's L{IChannelBinding} once its security
        layer is up, else L{None}.
    @ivar peer: a L{PeerInfo} once the handshake has finished, else L{None}.
    @ivar refusal: C{(code, reason)} if the other end refused us.
    @ivar incoming: True if the other end connected to us (read only).
    @ivar expectedNode: for an outgoing connection to a known node, its id:
        a listener that says it is another node is refused in the handshake.
    """

    log = Logger()

    # Only control messages travel in frames, and the codec never builds one
    # larger than MAX_FRAME (1 MiB); file bytes use raw mode.  A longer
    # frame is a broken or hostile peer.
    MAX_LENGTH = MAX_FRAME

    # Before authentication only hello/auth/ready/error are legal, each < 1 KiB.
    PREAUTH_MAX_LENGTH = 8 * 1024

    peer: Optional[PeerInfo] = None
    channel: Optional[IChannelBinding] = None
    refusal = None
    # What the listener's limits weigh: the other end's IP address, when the
    # connection was made, whether it finished the handshake.
    host: Optional[str] = None
    openedAt = 0.0
    authenticated = False

    def __init__(
        self,
        identity: LocalIdentity,
        handler: Any,
        clock: IReactorTime,
        listening: bool,
        expectedNode: Optional[int] = None,
    ) -> None:
        self.identity = identity
        self.handler = handler
        self.clock = clock
        self.incoming = listening
        self.expectedNode = expectedNode
        self._nonce = auth.makeNonce()
        self._pendingPeer: Optional[PeerInfo] = None
        # Both hellos as the codec encodes them, which the proofs cover.
        self._connectorHello = b""
        self._listenerHello = b""
        # What the handshake waits for next: first the security layer.
        self._expecting = "secure"
        self._buffer = b""
        self._rawRemaining = 0
        self._timeout: Any = None
        self._dropReason: Optional[str] = None
        self._closed = Once()

    # Description for log lines.

    def describePeer(self) -> str:
        address = self.transport.getPeer() if self.transport else None
        where = f"{address.host}:{address.port}" if hasattr(address, "host") else "?"
        if self.peer is not None and self.peer.role == "node":
            return f"node {self.peer.node} ({where})"
        if self.peer is not None:
            return f"client {where}"
        return where

    # Connection lifetime.

    def setHandler(self, handler: Any) -> None:
        """
        Hand this connection's events to C{handler} from now on.  A listener
        routes each authenticated connection to the part that serves its
        purpose this way.
        """
        self.handler = handler

    def connectionMade(self) -> None:
        self.openedAt = self.clock.seconds()
        self.host = getattr(self.transport.getPeer(), "host", None)
        if self.factory is not None:
            self.factory.protocols.add(self)
        self._timeout = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshakeTimedOut)
        security = self.identity.security
        if security is None:
            self.drop("this end has no security layer for its connections")
            return
        security.connected(self)

    def handshakeCompleted(self) -> None:
        """
        The security layer is up (L{IHandshakeListener}: TLS calls this
        once its handshake is done).  Bind the connection to its channel and
        start the p2pfiles handshake: the connector checks the certificate
        of the node it expects, before anything is sent, then says hello.
        """
        if self._closed.happened or self._dropReason is not None or self.channel is not None:
            return
        assert self.identity.security is not None
        try:
            self.channel = self.identity.security.binding(self.transport)
        except ChannelError as e:
            self.drop(str(e))
            return
        self._expecting = "hello"
        if self.incoming:
            return
        if self.expectedNode is not None and self._refusedByPins(self.expectedNode):
            return
        self._connectorHello = self._sendHello(self.identity.purpose)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._closed.happened:
            return
        if self.channel is None and self._dropReason is None:
            # The security layer never came up: a plaintext or garbage
            # client, a failed TLS handshake, or a peer that hung up.
            self._dropReason = f"closed before the connection was secured ({closeReason(reason)})"
            if self.incoming:
                self.log.warn("dropped {peer}: {reason}", peer=self.describePeer(), reason=self._dropReason)
        self._cancelTimeout()
        if self.factory is not None:
            self.factory.protocols.discard(self)
        try:
            self.handler.connectionClosed(self, reason)
        finally:
            self._closed.fire(None)

    def whenClosed(self) -> Deferred:
        """
        A Deferred that fires once this connection is closed.
        """
        return self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closed.happened

    @property
    def dropReason(self) -> Optional[str]:
        """
        Why this end dropped the connection (or why it closed before it
        was secured), or None.
        """
        return self._dropReason

    def isReady(self) -> bool:
        """
        True once the handshake has finished and until the connection is
        closing or closed.
        """
        return (
            self.peer is not None
            and self._expecting == "open"
            and self._dropReason is None
            and not self._closed.happened
        )

    def _cancelTimeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _handshakeTimedOut(self) -> None:
        self._timeout = None
        self.drop(f"handshake not finished within {HANDSHAKE_TIMEOUT:g}s", code="timeout")

    # Sending.

    def sendMessage(self, message: Message) -> None:
        self.sendEncoded(encode(message))

    def sendEncoded(self, payload: bytes) -> None:
        """
        Send a frame payload already made by L{encode}: one encoding can go
        to many connections.
        """
        if self._closed.happened or self.transport is None:
            return
        self.sendString(payload)

    def sendError(self, code: str, reason: str) -> None:
        self.sendMessage(Message("error", code=code, reason=reason))

    def drop(self, reason: str, code: Optional[str] = None, tell: bool = True, quiet: bool = False) -> None:
        """
        Log why (unless C{quiet}), optionally tell the other end, and close.
        """
        if self._closed.happened or self._dropReason is not None:
            return
        self._dropReason = reason
        if not quiet:
            self.log.warn("dropped {peer}: {reason}", peer=self.describePeer(), reason=reason)
        onRejected = getattr(self.factory, "onRejected", None)
        if onRejected is not None:
            onRejected(reason, code or "protocol", self.describePeer())
        self._cancelTimeout()
        if self.channel is None:
            # Nothing can be said on a channel that is not up.
            self.transport.abortConnection()
            return
        if tell and code is not None and self._rawRemaining == 0:
            self.sendError(code, reason)
        self.transport.loseConnection()

    def refuse(self, code: str, reason: str) -> None:
        """
        Refuse an authenticated peer (for instance an id conflict): tell it why
        and close.
        """
        self.drop(reason, code=code)

    def close(self) -> None:
        """
        Close this connection once what was written has been sent.
        """
        if self.transport is not None and not self._closed.happened:
            self.transport.loseConnection()

    def abort(self) -> None:
        """
        Close this connection at once, dropping anything unsent.
        """
        if self.transport is not None and not self._closed.happened:
            self.transport.abortConnection()

    # Receiving: frames and raw sections.

    def expectRaw(self, length: int) -> None:
        """
        Switch to raw mode: the next C{length} bytes of the stream are file
        bytes, handed to the handler's C{rawDataReceived} as they arrive,
        followed by one C{rawDataFinished}; then framing resumes.

        Call it from the handler's C{messageReceived} for the message that
        announces the section: bytes after that message are not parsed until
        the switch is made.
        """
        if length < 0:
            raise ValueError("a raw section cannot be negative")
        if length > RAW_READ_SIZE and self.channel is not None:
            # Fewer, larger reads for bulk bytes: per-read overhead is a
            # good share of a receiver's CPU at Twisted's default 64 KiB.
            self.channel.carryBulk(RAW_READ_SIZE)
        if length == 0:
            self._toHandler(self.handler.rawDataFinished)
        else:
            self._rawRemaining = length

    def dataReceived(self, data: bytes) -> None:
        # Int32StringReceiver's loop, with raw sections: file bytes go to the
        # handler as they arrive, with no copy when a read is all raw.
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        offset = 0
        end = len(data)
        while offset < end and self._dropReason is None and not self._closed.happened:
            if self._rawRemaining:
                n = min(self._rawRemaining, end - offset)
                chunk = data if (offset == 0 and n == end) else data[offset : offset + n]
                offset += n
                self._rawRemaining -= n
                self._toHandler(self.handler.rawDataReceived, chunk)
                if self._rawRemaining == 0:
                    self._toHandler(self.handler.rawDataFinished)
                continue
            if end - offset < 4:
                break
            (length,) = unpack("!I", data[offset : offset + 4])
            if length > (self.MAX_LENGTH if self._expecting == "open" else self.PREAUTH_MAX_LENGTH):
                self.lengthLimitExceeded(length)
                return
            frameEnd = offset + 4 + length
            if frameEnd > end:
                break
            frame = data[offset + 4 : frameEnd]
            offset = frameEnd
            self.stringReceived(frame)
        if offset < end and self._dropReason is None:
            self._buffer = data[offset:]

    def lengthLimitExceeded(self, length: int) -> None:
        if self._expecting == "open":
            limit, when = self.MAX_LENGTH, ""
        else:
            limit, when = self.PREAUTH_MAX_LENGTH, " before authentication"
        self.drop(f"frame of {length} bytes exceeds the limit of {limit}{when}", code="protocol")

    def sendString(self, string: bytes) -> None:
        self.transport.write(pack("!I", len(string)) + string)

    def stringReceived(self, frame: bytes) -> None:
        try:
            message = decode(frame)
        except WireError as e:
            self.drop(f"malformed frame: {e}", code="protocol")
            return
        if message.type == "error" and self._expecting != "open":
            # Refused during the handshake.  After it, an error answers a
            # request and goes to the handler like any reply.
            self.refusal = (message.code, message.reason)
            self.log.warn(
                "{peer} refused: {reason}", peer=self.describePeer(), reason=message.reason
            )
            self._dropReason = message.reason
            self.transport.loseConnection()
            return
        if self._expecting != "open":
            self._handshakeMessage(message)
            return
        self._toHandler(self.handler.messageReceived, message, what=message.type)

    def _toHandler(self, method: Callable[..., None], *args: Any, what: str = "an event") -> None:
        """
        Call the handler; whatever it raises drops this connection only.
        """
        try:
            method(self, *args)
        except ProtocolViolation as e:
            self.drop(str(e), code="protocol")
        except Exception:
            self.log.failure("error handling {what} from {peer}", what=what, peer=self.describePeer())
            self.drop(f"internal error handling {what}", code="internal")

    # The handshake.

    def _handshakeMessage(self, message: Message) -> None:
        expected = self._expecting
        if message.type != expected:
            self.drop(f"unexpected {message.type} frame before authentication", code="protocol")
            return
        if expected == "hello":
            self._helloReceived(message)
        elif expected == "auth":
            self._authReceived(message)
        elif expected == "ready":
            self._readyReceived(message)

    def _sendHello(self, purpose: str) -> bytes:
        """
        Send this end's hello; return it as encoded, which the proofs cover.
        """
        payload = encode(
            Message(
                "hello",
                version=PROTOCOL_VERSION,
                role=self.identity.role,
                node=self.identity.node,
                nonce=self._nonce,
                address=self.identity.address,
                purpose=purpose,
                fingerprint=self.identity.fingerprint,
            )
        )
        self.sendEncoded(payload)
        return payload

    def _checkHello(self, hello: Message) -> Optional[Tuple[str, str]]:
        """
        Return C{(code, reason)} if C{hello} is unacceptable.
        """
        assert self.channel is not None
        if hello.version != PROTOCOL_VERSION:
            return (
                "version",
                f"protocol version {hello.version} is not supported "
                f"(this end speaks version {PROTOCOL_VERSION})",
            )
        if not auth.validNonce(hello.nonce):
            return ("protocol", "hello carries an invalid nonce")
        if hello.role not in ROLES:
            return ("protocol", f"unknown role {hello.role!r}")
        if hello.purpose not in PURPOSES:
            return ("protocol", f"unknown purpose {hello.purpose!r}")
        if hello.role == "node" and (hello.node is None or hello.address is None):
            return ("protocol", "a node must give its id and address")
        if hello.role == "node" and hello.fingerprint is None:
            return ("protocol", "a node must present a certificate")
        presented = self.channel.peerFingerprint()
        if hello.fingerprint != presented:
            # A relay shows its own certificate, not the one the hello names.
            return (
                "auth",
                f"the hello names certificate {hello.fingerprint or 'none'}, "
                f"but the connection presented {presented or 'none'}",
            )
        return None

    def _refusedByPins(self, node: Optional[int]) -> bool:
        """
        Check the certificate of the peer that is (or says it is) C{node}
        against the pins, before any proof is exchanged; refuse it and
        return True if it does not match.
        """
        pins = self.identity.pins
        assert self.channel is not None
        problem = pins.problem(node, self.channel.peerFingerprint()) if pins is not None else None
        if problem is None:
            return False
        if not self.incoming:
            self.refusal = ("auth", problem)
        self.drop(f"refused before authentication: {problem}", code="auth")
        return True

    def _helloReceived(self, hello: Message) -> None:
        problem = self._checkHello(hello)
        if problem is not None:
            code, reason = problem
            if not self.incoming:
                # What we connected to will not do: say so to our owner.
                self.refusal = problem
            self.drop(reason, code=code)
            return
        if not self.incoming:
            if hello.role != "node":
                self.refusal = ("protocol", "the listening end is not a node")
                self.drop("the listening end is not a node", code="protocol")
                return
            if self.expectedNode is not None and hello.node != self.expectedNode:
                reason = f"expected node {self.expectedNode} at this address, found node {hello.node}"
                self.refusal = ("conflict", reason)
                self.drop(reason, code="conflict")
                return
        if self._refusedByPins(hello.node if hello.role == "node" else None):
            return
        self._pendingPeer = PeerInfo(hello.role, hello.node, hello.address, hello.purpose, hello.fingerprint)
        self._expecting = "auth"
        if not self.incoming:
            # We connected: the listener proves first, after its hello.
            self._listenerHello = encode(hello)
            return
        # The listener answers for the connector's purpose, and proves first.
        self._connectorHello = encode(hello)
        self._listenerHello = self._sendHello(hello.purpose)
        self.sendMessage(Message("auth", proof=self._proof(auth.LISTENER)))

    def _proof(self, side: bytes) -> str:
        assert self.channel is not None
        return auth.proof(
            self.identity.secret, side, self.channel.exporter(), self._connectorHello, self._listenerHello
        )

    def _verify(self, side: bytes, claimed: str) -> bool:
        assert self.channel is not None
        return auth.verify(
            self.identity.secret, side, self.channel.exporter(), self._connectorHello, self._listenerHello, claimed
        )

    def _authReceived(self, message: Message) -> None:
        if not self.incoming:
            if not self._verify(auth.LISTENER, message.proof):
                self.refusal = ("auth", "authentication failed: wrong cluster secret, or a relayed connection")
                self.drop("authentication failed: its proof does not match our secret and channel", code="auth")
                return
            self.sendMessage(Message("auth", proof=self._proof(auth.CONNECTOR)))
            self._expecting = "ready"
            return
        if not self._verify(auth.CONNECTOR, message.proof):
            self.drop("authentication failed: wrong cluster secret, or a relayed connection", code="auth")
            return
        self.sendMessage(Message("ready", node=self.identity.node))
        self._open()

    def _readyReceived(self, message: Message) -> None:
        self._open()

    def _open(self) -> None:
        self._cancelTimeout()
        self._expecting = "open"
        self.peer = self._pendingPeer
        self.authenticated = True
        if self.peer is not None and self.peer.purpose == "control" and self.channel is not None:
            self.channel.carryBulk(CONTROL_READ_SIZE)
        self.log.info("authenticated {peer}", peer=self.describePeer())
        self._toHandler(self.handler.connectionReady, what="a new connection")


class P2PFactory(Factory):
    """
    Builds L{P2PProtocol}s that hand their events to C{handler}.

    C{handler} is either one object for every connection, or, with
    C{perConnection}, a callable that makes a fresh handler for each new
    connection (one session object per connection).  State lives on the
    handlers, never on the protocol.
    """

    protocol = P2PProtocol
    # Connections are logged by the protocol, with who is at the other end.
    noisy = False
    # Called with (reason, code, peer) when a connection is dropped.
    onRejected: Optional[Callable[[str, str, str], None]] = None
    # Caps on incoming connections (a L{ConnectionLimits}); None: no cap.
    limits: Optional[ConnectionLimits] = None

    def __init__(
        self,
        identity: LocalIdentity,
        handler: Any,
        clock: IReactorTime,
        listening: bool,
        expectedNode: Optional[int] = None,
        perConnection: bool = False,
    ) -> None:
        self.identity = identity
        self.handler = handler
        self.clock = clock
        self.listening = listening
        self.expectedNode = expectedNode
        self.perConnection = perConnection
        self.protocols: Set[P2PProtocol] = set()

    def closeAll(self) -> Deferred:
        """
        Close every open connection of this factory; fire when all are gone.
        """
        waiting = []
        for protocol in list(self.protocols):
            waiting.append(protocol.whenClosed())
            protocol.abort()
        return DeferredList(waiting)

    def buildProtocol(self, addr: Any) -> Optional[P2PProtocol]:  # type: ignore[override]
        if self.listening and self.limits is not None:
            open = [p for p in self.protocols if p.dropReason is None and not p.closed]
            admitted, evict = self.limits.admitOrEvict(addr, open)
            if not admitted:
                return None  # the reactor closes the new socket at once
            if evict is not None:  # not authenticated: closed at once; the limits log it
                evict.drop("closed to make room for another connection", quiet=True)
        handler = self.handler() if self.perConnection else self.handler
        p = self.protocol(self.identity, handler, self.clock, self.listening, self.expectedNode)
        p.factory = self
        return p
