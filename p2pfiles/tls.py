"""
TLS on every p2pfiles connection: L{TLS}, this end's security, and
L{TLSBinding}, what one TLS connection is bound to.

Every connection, loopback included, is TLS (1.3 where both ends have it,
1.2 at least), through Twisted's memory-BIO TLS layer: clients wrap their
endpoint with L{TLSClientEndpoint}, listeners with L{TLSServerEndpoint}.

Nobody checks a certificate against an authority or a host name.  A node
presents its self-signed certificate on both sides of a connection (so that
a listener learns who connects too); a command-line client presents none.
Each end accepts whatever the other presents, and records its fingerprint:
who a node is, is its fingerprint (checked against pins, if any), and the
cluster secret is proved over this very connection's exported keying
material (L{p2pfiles.auth}).
"""

from typing import Any, Callable, Optional

from OpenSSL import SSL
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.channel import ChannelError, IChannelBinding, IConnectionSecurity
from p2pfiles.identity import NodeCertificate, fingerprintOf

# RFC 5705 exporter label and length of the channel binding.
EXPORTER_LABEL = b"EXPORTER-p2pfiles-v2"
EXPORTER_LENGTH = 32

# TLS 1.2, if a peer has nothing newer: forward-secret AEAD suites only.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

# TLS 1.3: AES-128-GCM first, the fastest of the three with AES-NI, and as
# safe for this use as the others.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


# OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (ssl.h), which pyOpenSSL sets on
# every context and does not name.
MODE_ENABLE_PARTIAL_WRITE = 0x1

# Plaintext asked of OpenSSL per call: more than one record (16 KiB) holds.
RECORD_READ = 32 * 1024

# Received plaintext handed up in one piece at most (a TCP read gives less).
RECEIVE_BATCH = 256 * 1024

# Ciphertext taken out of the memory BIO per call when nothing says how
# much there is (handshake, alerts): a record and a half.
SEND_READ = 24 * 1024

# What TLS 1.3 adds to each record of at most 16 KiB of plaintext (header,
# content type, tag), and to a write: records made by a write of N bytes fit
# in N + N // 16384 * RECORD_OVERHEAD + RECORD_OVERHEAD.
RECORD_OVERHEAD = 32


def recordsSize(plaintext: int) -> int:
    """
    The most bytes the records of a write of C{plaintext} bytes take.
    """
    return plaintext + (plaintext // 16384 + 1) * RECORD_OVERHEAD


# Small writes gathered into one TLS write at most (Twisted gathers 64 KB):
# what a connection that is not read holds, encrypted, is about this much
# plus TCP's pause threshold, and OpenSSL's outgoing buffer grows to the
# largest write it was given.
GATHER_LIMIT = 4 * 1024

# TCP's read size and pause threshold on an accepted connection until it
# carries file bytes or is a control link (Twisted's default is 64 KiB):
# requests are small, and an answer that is not read pauses its producer
# after this much.
ACCEPTED_BUFFER = 4 * 1024

# The most the client's first TLS record (its ClientHello: some 300 bytes,
# under 2 KiB with post-quantum key shares) may announce.  Until it is
# whole, the bytes wait here and OpenSSL is not asked for anything, so a
# connection that sends nothing, or trickles, costs no TLS buffers.  What
# is not a TLS handshake record is refused at once; a larger first record
# is not read any further and is left to the handshake deadline (closing
# it at once would only have its sender open another at once).
FIRST_RECORD_LIMIT = 8 * 1024

# A TLS record's header: content type (22 is a handshake), version (3, x),
# length.
RECORD_HEADER = 5
HANDSHAKE_RECORD = 22


class FirstRecordRefused(SSL.Error):
    """
    What a client sent first is not a TLS handshake record of an acceptable
    size.  Like OpenSSL's errors, its argument is a list of (library,
    function, reason), here of one reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__([("p2pfiles", "", reason)])


@implementer(IOpenSSLServerConnectionCreator)
class _FirstRecordCreator:
    """
    The accepting side's connection creator, as Twisted's TLS layer sees
    it: the connection it makes at once is L{_NOT_YET}; the OpenSSL
    connection is made by C{creator} when the client's first record is whole
    (L{BulkTLSProtocol.dataReceived}).  An OpenSSL connection costs some
    14 KiB before it has read a byte, and a flood of connections that never
    send one should not cost that.
    """

    def __init__(self, creator: "ConnectionCreator") -> None:
        self.creator = creator

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return _NOT_YET


class _NotYet:
    """
    Stands for the OpenSSL connection of an accepted connection before the
    client's first record is whole: nothing to read, send or shut down.
    (Twisted's TLS layer asks this much of it when such a connection is
    closed.)
    """

    def set_accept_state(self) -> None:
        pass

    def do_handshake(self) -> None:
        raise SSL.WantReadError()

    def set_app_data(self, data: Any) -> None:
        pass

    def bio_read(self, size: int) -> bytes:
        raise SSL.WantReadError()

    def recv(self, size: int) -> bytes:
        raise SSL.WantReadError()

    def send(self, data: Any) -> int:
        raise SSL.WantReadError()

    def bio_shutdown(self) -> None:
        pass

    def shutdown(self) -> bool:
        return True

    def get_peer_certificate(self) -> None:
        return None


_NOT_YET = _NotYet()


class SmallWrites:
    """
    Small writes gathered until the next turn of C{clock}, or until more
    than L{GATHER_LIMIT} bytes wait, then written with C{write} in one
    piece: Twisted's gathering of small writes in its TLS layer (which
    gathers 64 KB), with a smaller batch.
    """

    def __init__(self, write: Callable[[bytes], Any], clock: IReactorTime) -> None:
        self._write = write
        self._clock = clock
        self._pending: list = []
        self._size = 0
        self._scheduled: Any = None

    def write(self, data: bytes) -> None:
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size > GATHER_LIMIT:
            self.flush()
        elif self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._scheduledFlush)

    def _scheduledFlush(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        if self._pending:
            pending, self._pending, self._size = self._pending, [], 0
            self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._scheduledFlush()


class BulkTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS layer, in fewer and larger steps for file bytes.

    Twisted's layer hands each received 16 KiB record up on its own, so a
    256 KiB TCP read made sixteen trips through the protocols above (and,
    on a relay, sixteen writes into the other connection's TLS layer); and
    it copies every write into 16 KiB slices, sending each one's record to
    TCP as a write of its own.  Here:

      - received: every record that one TCP read completes is decrypted,
        then the plaintext goes up in one piece (up to L{RECEIVE_BATCH});
      - sent: a write goes to OpenSSL through a memoryview (no slices
        copied), and the records it makes leave the memory BIO in one
        piece, as one write to TCP.

    Small writes are still gathered until the next turn of the reactor, as
    L{BufferingTLSTransport} does, but at most L{GATHER_LIMIT} bytes.

    On the accepting side, nothing of TLS is done until the client's first
    record is whole (see L{FIRST_RECORD_LIMIT}), and TCP reads and pauses at
    L{ACCEPTED_BUFFER} until the connection carries file bytes.

    This overrides private methods of Twisted's C{TLSMemoryBIOProtocol}
    (and its gathering of small writes), keeping their handling of errors
    and shutdown; C{tests/test_tls.py} pins the behaviour.
    """

    # The bytes of the client's first record so far, on the accepting side;
    # None once it is whole (or on the connecting side).
    _firstRecord: Optional[bytes] = None

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        # In the place of Twisted's gathering, which the layer flushes when
        # it closes and drops once it is closed.
        self._aggregator = SmallWrites(super(BufferingTLSTransport, self).write, factory.clock)
        self.write = self._aggregator.write  # type: ignore[method-assign]

    def makeConnection(self, transport: Any) -> None:
        if self.factory.accepting:
            self._firstRecord = b""
            if getattr(transport, "bufferSize", 0) > ACCEPTED_BUFFER:
                transport.bufferSize = ACCEPTED_BUFFER
        super().makeConnection(transport)

    # True once the client announced too large a first record: what it
    # sends is no longer read.
    _ignoring = False

    def dataReceived(self, data: bytes) -> None:
        if self._ignoring:
            return
        if self._firstRecord is not None:
            data = self._firstRecord + data
            problem = _notTLS(data)
            if problem is not None:
                self._firstRecord = None
                self._tlsShutdownFinished(Failure(FirstRecordRefused(problem)))
                return
            if len(data) < RECORD_HEADER:
                self._firstRecord = data
                return
            length = int.from_bytes(data[3:5], "big")
            if length > FIRST_RECORD_LIMIT:
                self._firstRecord = b""
                self._ignoring = True
                self.transport.pauseProducing()
                return
            if len(data) < RECORD_HEADER + length:
                self._firstRecord = data
                return
            self._firstRecord = None
            self._tlsConnection = self.factory.creator.serverConnectionForTLS(self)
            # As Twisted's layer does for the connections it makes.
            self._tlsConnection.set_app_data(self)
        super().dataReceived(data)

    def _flushReceiveBIO(self) -> None:
        pending: list = []
        size = 0
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(RECORD_READ)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The peer shut TLS down: what came before goes up first.
                self._deliver(pending)
                pending, size = [], 0
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                self._deliver(pending)
                pending, size = [], 0
                self._tlsShutdownFinished(failure)
            else:
                pending.append(data)
                size += len(data)
                if size >= RECEIVE_BATCH:
                    self._deliver(pending)
                    pending, size = [], 0
        self._deliver(pending)
        # What was received may call for an answer (the handshake does).
        self._flushSendBIO()

    def _deliver(self, pending: list) -> None:
        if pending and not self._aborted:
            ProtocolWrapper.dataReceived(self, pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        expected = recordsSize(len(view))
        while sent < len(view):
            try:
                # All of it at once (see makeContext); a record at a time
                # with a pyOpenSSL older than Context.clear_mode.
                sent += self._tlsConnection.send(view[sent:] if sent else view)
            except SSL.WantReadError:
                # Only during a handshake: the rest waits for it.
                self._flushSendBIO()
                self._bufferedWrite(bytes(view[sent:]))
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
        # All the records in one read, so in one piece.
        self._flushSendBIO(expected)

    def _flushSendBIO(self, expected: int = SEND_READ) -> None:
        pending = []
        while True:
            try:
                data = self._tlsConnection.bio_read(expected)
            except SSL.WantReadError:
                break
            pending.append(data)
            if len(data) < expected:
                break
        if pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))


def _notTLS(data: bytes) -> Optional[str]:
    """
    Why the first bytes a client sent (C{data}, possibly not all of its
    first record yet) cannot begin a TLS handshake, or None.
    """
    if data[:1] and data[0] != HANDSHAKE_RECORD:
        return "not TLS: the first record is not a handshake"
    if data[1:2] and data[1] != 3:
        return "not TLS: the first record has no TLS version"
    return None


class BulkTLSFactory(TLSMemoryBIOFactory):
    """
    A L{TLSMemoryBIOFactory} whose connections are L{BulkTLSProtocol}s.

    @ivar accepting: True for the accepting side of connections: their
        OpenSSL connection is made by C{creator} once the client's first
        record is whole.
    """

    protocol = BulkTLSProtocol
    accepting = False

    def __init__(self, creator: "ConnectionCreator", isClient: bool, wrappedFactory: Any, clock: IReactorTime) -> None:
        self.creator = creator
        self.clock = clock
        self.accepting = not isClient
        super().__init__(creator if isClient else _FirstRecordCreator(creator), isClient, wrappedFactory, clock)


def _acceptAny(connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
    # Identity is the fingerprint and the secret proof, not a CA: accept
    # whatever certificate the other end presents (self-signed ones are the
    # rule), and let the handshake judge its fingerprint.
    return True


def makeContext(certificate: Optional[NodeCertificate], server: bool) -> SSL.Context:
    """
    The OpenSSL context for one side of p2pfiles connections.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Free each connection's record buffers while it is idle: hundreds of
    # idle or half-open connections then cost little memory.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # One SSL_write takes a whole write (all its records), not a record a
    # call: into a memory BIO there is never anything to wait for.
    clearMode = getattr(context, "clear_mode", None)
    if clearMode is not None:
        clearMode(MODE_ENABLE_PARTIAL_WRITE)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_tls13_ciphersuites(TLS13_SUITES)
    if certificate is not None:
        context.use_certificate(certificate.certificate)
        context.use_privatekey(certificate.key)
        context.check_privatekey()
    # On a listener VERIFY_PEER asks the connector for its certificate, and
    # without FAIL_IF_NO_PEER_CERT a client that has none still connects.
    context.set_verify(SSL.VERIFY_PEER | (SSL.VERIFY_CLIENT_ONCE if server else 0), _acceptAny)
    return context


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class ConnectionCreator:
    """
    Makes the OpenSSL connection of each new TLS connection from one
    context.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        return connection

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        return connection


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Listen through another server endpoint, TLS on every accepted
    connection.
    """

    def __init__(self, wrapped: Any, security: "TLS", clock: IReactorTime) -> None:
        self.wrapped = wrapped
        self.security = security
        self.clock = clock

    def listen(self, factory: Any) -> Deferred:
        try:
            tls = self.security.serverFactory(factory, self.clock)
        except Exception:
            # A certificate that cannot be had fails the listening, as a
            # port that cannot be had does.
            return fail()
        return self.wrapped.listen(tls)


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    Connect through another client endpoint, TLS on the connection; fire
    with the protocol inside the TLS layer.

    (Twisted's C{wrapClientTLS} does the same, but its TLS layer takes its
    clock from the global reactor; this one is given the clock.)
    """

    def __init__(self, wrapped: Any, security: "TLS", clock: IReactorTime) -> None:
        self.wrapped = wrapped
        self.security = security
        self.clock = clock

    def connect(self, factory: Any) -> Deferred:
        try:
            tls = self.security.clientFactory(factory, self.clock)
        except Exception:
            return fail()
        return self.wrapped.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IChannelBinding)
class TLSBinding:
    """
    What one TLS connection is bound to: its exported keying material and
    the certificate the other end presented.
    """

    def __init__(self, transport: Any) -> None:
        getHandle = getattr(transport, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        if not isinstance(handle, SSL.Connection):
            raise ChannelError("the connection is not TLS")
        self.transport = transport
        self.version = handle.get_protocol_version_name()
        self.cipher = handle.get_cipher_name()
        self._exporter = handle.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
        certificate = handle.get_peer_certificate(as_cryptography=True)
        self._peer = None if certificate is None else fingerprintOf(certificate.public_bytes(Encoding.DER))

    def exporter(self) -> bytes:
        return self._exporter

    def peerFingerprint(self) -> Optional[str]:
        return self._peer

    def carryBulk(self, size: int) -> None:
        # The sizes are TCP's (under the TLS layer, which reads whatever TCP
        # hands it): its read size and pause threshold (bufferSize) and the
        # most one send takes (SEND_LIMIT).  A file chunk's records (size
        # plus their overhead) then pass in one send, without a pause.
        lower = getattr(self.transport, "transport", None)
        if lower is None:
            return
        size = recordsSize(size)
        for name in ("bufferSize", "SEND_LIMIT"):
            if getattr(lower, name, size) < size:
                setattr(lower, name, size)


@implementer(IConnectionSecurity)
class TLS:
    """
    TLS for this end's connections, with its certificate if it has one (a
    node always does; the command-line client does not).

    A node whose certificate is made on its first start gives C{source}
    instead: a callable that loads (or makes) it, called the first time the
    certificate is needed, so that building a node's service writes
    nothing.
    """

    def __init__(
        self,
        certificate: Optional[NodeCertificate] = None,
        source: Optional[Callable[[], NodeCertificate]] = None,
    ) -> None:
        self._source = source
        self._certificate: Optional[NodeCertificate] = None
        self._client: Optional[ConnectionCreator] = None
        self._server: Optional[ConnectionCreator] = None
        if source is None or certificate is not None:
            self._build(certificate)

    def _build(self, certificate: Optional[NodeCertificate]) -> None:
        self._certificate = certificate
        self._server = ConnectionCreator(makeContext(certificate, server=True)) if certificate is not None else None
        self._client = ConnectionCreator(makeContext(certificate, server=False))

    def load(self) -> None:
        """
        Have the certificate ready; raise what its source raises (an
        L{p2pfiles.identity.IdentityError}) if it cannot be had.
        """
        if self._client is None:
            assert self._source is not None
            self._build(self._source())

    @property
    def certificate(self) -> Optional[NodeCertificate]:
        self.load()
        return self._certificate

    @property
    def fingerprint(self) -> Optional[str]:
        certificate = self.certificate
        return certificate.fingerprint if certificate is not None else None

    def _creator(self, server: bool) -> ConnectionCreator:
        self.load()
        creator = self._server if server else self._client
        if creator is None:
            raise ValueError("listening needs a certificate")
        return creator

    def wrapClient(self, endpoint: Any, clock: IReactorTime) -> TLSClientEndpoint:
        return TLSClientEndpoint(endpoint, self, clock)

    def wrapServer(self, endpoint: Any, clock: IReactorTime) -> TLSServerEndpoint:
        return TLSServerEndpoint(endpoint, self, clock)

    def clientFactory(self, factory: Any, clock: IReactorTime) -> BulkTLSFactory:
        """
        C{factory}'s connections as the connecting side of TLS.  The TLS
        layer gathers small writes until the next turn of C{clock}.
        """
        return BulkTLSFactory(self._creator(server=False), True, factory, clock)

    def serverFactory(self, factory: Any, clock: IReactorTime) -> BulkTLSFactory:
        """
        C{factory}'s connections as the accepting side of TLS.
        """
        wrapped = BulkTLSFactory(self._creator(server=True), False, factory, clock)
        # Connections are logged by the protocol, not by the factory.
        wrapped.noisy = False
        return wrapped

    def connected(self, protocol: Any) -> None:
        # The TLS layer calls protocol.handshakeCompleted() itself.
        pass

    def binding(self, transport: Any) -> TLSBinding:
        return TLSBinding(transport)
