"""
Tests for L{p2pfiles.transfer}: serving a file with a pull producer, relaying
it through the leader with back-pressure and failover, receiving it into a
verified part file, and the resuming download loop; plus the node's use of
them (L{p2pfiles.node.Node._serveLocal}, C{_track}, C{connectionClosed}).

Everything runs on a L{Clock} with fake or in-memory connections and
synchronous "thread" work: no sockets, no real time.  Files are real, in
temporary directories.
"""

import builtins
import errno
import hashlib
import io
from typing import Any, Callable, List, Optional, Tuple

from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath, InsecurePath
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import transfer
from p2pfiles.client import (
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_VERIFY,
    ClientConnection,
    ClientError,
)
from p2pfiles.names import partName
from p2pfiles.node import Node, NodeConfig
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PProtocol
from p2pfiles.transfer import (
    CHUNK_SIZE,
    FileProducer,
    PartialFile,
    Relay,
    StreamSink,
    TransferError,
    download,
    openForServing,
)
from p2pfiles.wire import FileEntry, Message

NAME = "movie.bin"
# Not a multiple of anything in particular, so off-by-one errors show.
CONTENT = bytes(range(256)) * 40 + b"tail"
SIZE = len(CONTENT)


def sha256hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SHA = sha256hex(CONTENT)
OTHER_SHA = sha256hex(b"some other content")


def syncThread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """
    Run "thread" work at once, on the calling thread.
    """
    return defer.maybeDeferred(f, *args)


class ConsumerTransport(StringTransport):
    """
    A L{StringTransport} that also records each C{write} separately, how
    often a producer was registered and unregistered, and whether the
    connection was aborted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: List[bytes] = []
        self.registered = 0
        self.unregistered = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.registered += 1
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.unregistered += 1
        super().unregisterProducer()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def connectionLostWithProducer(self) -> None:
        """
        What L{twisted.internet.abstract.FileDescriptor.connectionLost} does
        to a registered producer: stop it, then drop it.
        """
        producer = self.producer
        producer.stopProducing()
        self.producer = None
        self.streaming = None


class FailingFile(io.BytesIO):
    """
    A file whose reads fail, as a disk error would.
    """

    def read(self, n: Optional[int] = -1) -> bytes:
        raise OSError(errno.EIO, "Input/output error")


def openWith(testCase: SynchronousTestCase, data: bytes, position: int = 0) -> Any:
    """
    A real file holding C{data}, open for reading at C{position}.
    """
    path = FilePath(testCase.mktemp())
    path.setContent(data)
    f = open(path.path, "rb")
    testCase.addCleanup(f.close)
    f.seek(position)
    return f


def pullAll(transport: StringTransport, limit: int = 1000) -> int:
    """
    Ask the registered pull producer for chunks until it unregisters, as a
    transport whose buffer drains would; return how many times it asked.
    """
    calls = 0
    while transport.producer is not None:
        assert calls < limit, "producer never finished"
        transport.producer.resumeProducing()
        calls += 1
    return calls


# Fakes for a ClientConnection's protocol.


class FakeConnectionProtocol:
    """
    Stands in for the L{P2PProtocol} under a L{ClientConnection}: records
    sent messages, counts raw bytes announced with C{expectRaw} the way the
    real protocol does, and has a L{StringTransport} (which is also a push
    producer) as its transport.
    """

    refusal = None
    # A finished handshake: a lost connection is "lost", not a failed handshake.
    peer = "node"

    def __init__(self, handler: ClientConnection) -> None:
        self.handler = handler
        self.transport = StringTransport()
        self.sent: List[Message] = []
        self.rawExpected: List[int] = []
        self.rawRemaining = 0

    def sendMessage(self, message: Message) -> None:
        self.sent.append(message)

    def expectRaw(self, length: int) -> None:
        self.rawExpected.append(length)
        if length == 0:
            self.handler.rawDataFinished(self)
        else:
            self.rawRemaining = length


def makeConnection(address: str) -> ClientConnection:
    """
    A real L{ClientConnection}, ready, over a L{FakeConnectionProtocol}.
    """
    connection = ClientConnection(address)
    connection.connectionReady(FakeConnectionProtocol(connection))
    return connection


def reply(connection: ClientConnection, message: Message) -> None:
    """
    A message arrives on C{connection}.
    """
    connection.messageReceived(connection.protocol, message)


def feed(connection: ClientConnection, data: bytes) -> None:
    """
    Raw bytes arrive on C{connection}, ending the raw section when the
    announced length is reached, as L{P2PProtocol.dataReceived} does.
    """
    protocol = connection.protocol
    assert 0 < len(data) <= protocol.rawRemaining, (len(data), protocol.rawRemaining)
    protocol.rawRemaining -= len(data)
    connection.rawDataReceived(protocol, data)
    if protocol.rawRemaining == 0:
        connection.rawDataFinished(protocol)


def lose(connection: ClientConnection) -> None:
    """
    C{connection} goes away.
    """
    connection.connectionClosed(connection.protocol, Failure(ConnectionLost("gone")))


def closedByUs(connection: ClientConnection) -> bool:
    return bool(connection.protocol.transport.disconnecting)


def fileHeader(offset: int, sha256: str = SHA, size: int = SIZE, name: str = NAME, holder: int = 1) -> Message:
    return Message("file", name=name, size=size, sha256=sha256, offset=offset, holder=holder, leader=9)


class FileProducerTests(SynchronousTestCase):
    """
    L{FileProducer} sends a span of an open file as a pull producer.
    """

    def test_sendsLengthBytesInChunksOnePerPull(self) -> None:
        """
        Started on a file positioned at an offset, the producer registers as
        a pull (non-streaming) producer and writes nothing until asked; each
        C{resumeProducing} writes one chunk of at most C{CHUNK_SIZE} bytes;
        exactly C{length} bytes from the file's position are sent, even when
        the file has more, and then it unregisters, closes the file and
        fires C{done} with the count.
        """
        data = bytes(range(256)) * ((2 * CHUNK_SIZE + 1000) // 256 + 1)
        f = openWith(self, data, position=300)
        length = 2 * CHUNK_SIZE + 200
        transport = ConsumerTransport()
        producer = FileProducer(f, length, transport)

        done = producer.start()

        self.assertIs(transport.producer, producer)
        self.assertIs(transport.streaming, False)
        self.assertEqual(transport.writes, [])
        producer.resumeProducing()
        self.assertEqual([len(w) for w in transport.writes], [CHUNK_SIZE])
        producer.resumeProducing()
        self.assertEqual([len(w) for w in transport.writes], [CHUNK_SIZE, CHUNK_SIZE])
        self.assertNoResult(done)
        producer.resumeProducing()
        self.assertEqual([len(w) for w in transport.writes], [CHUNK_SIZE, CHUNK_SIZE, 200])
        self.assertEqual(transport.value(), data[300 : 300 + length])
        self.assertEqual(self.successResultOf(done), length)
        self.assertIsNone(transport.producer)
        self.assertTrue(f.closed)

    def test_chunkSizeIsAdjustable(self) -> None:
        """
        C{chunkSize} bounds each write; the last chunk is the remainder.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, 25, transport, chunkSize=10)
        done = producer.start()
        self.assertEqual(pullAll(transport), 3)
        self.assertEqual(transport.writes, [CONTENT[:10], CONTENT[10:20], CONTENT[20:25]])
        self.assertEqual(self.successResultOf(done), 25)

    def test_pullAfterDoneWritesNothing(self) -> None:
        """
        A late C{resumeProducing} after the producer finished writes nothing
        and does not touch the (closed) file.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, 10, transport)
        done = producer.start()
        pullAll(transport)
        self.successResultOf(done)
        producer.resumeProducing()
        self.assertEqual(transport.value(), CONTENT[:10])

    def test_readErrorUnregistersClosesAndFails(self) -> None:
        """
        If reading the file fails, the producer unregisters, closes the file
        and fails C{done} with a L{TransferError} of code C{"io"}.
        """
        f = FailingFile(CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE, transport)
        done = producer.start()
        self.assertIs(transport.producer, producer)

        producer.resumeProducing()

        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "io")
        self.assertIn("Input/output error", str(failure.value))
        self.assertIsNone(transport.producer)
        self.assertTrue(f.closed)
        self.assertEqual(transport.value(), b"")

    def test_earlyEndOfFileUnregistersClosesAndFails(self) -> None:
        """
        If the file holds fewer bytes than C{length} (it shrank since it was
        indexed), the producer sends what there is, then unregisters, closes
        the file and fails C{done} with a L{TransferError} of code C{"io"}
        that says how many bytes were missing.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE + 100, transport, chunkSize=4096)
        done = producer.start()

        pullAll(transport)

        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "io")
        self.assertIn("100 bytes early", str(failure.value))
        self.assertEqual(transport.value(), CONTENT)
        self.assertIsNone(transport.producer)
        self.assertEqual(transport.unregistered, 1)
        self.assertTrue(f.closed)

    def test_consumerGoneStopsClosesAndFails(self) -> None:
        """
        When the consumer's connection is lost, Twisted calls
        C{stopProducing} and drops the producer: C{done} fails with a
        L{TransferError} of code C{"gone"}, the file is closed, the consumer
        holds no producer afterwards, and a late pull writes nothing.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE, transport, chunkSize=100)
        done = producer.start()
        producer.resumeProducing()

        transport.connectionLostWithProducer()

        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "gone")
        self.assertIn("after 100 bytes", str(failure.value))
        self.assertTrue(f.closed)
        self.assertIsNone(transport.producer)
        producer.resumeProducing()
        self.assertEqual(transport.value(), CONTENT[:100])

    def test_stopTwiceFailsOnce(self) -> None:
        """
        A second C{stopProducing} is harmless: C{done} has already failed.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE, transport)
        done = producer.start()
        transport.connectionLostWithProducer()
        producer.stopProducing()
        self.failureResultOf(done, TransferError)

    def test_zeroLengthFinishesWithoutRegistering(self) -> None:
        """
        Nothing to send (an empty file, or a resume from its very end):
        C{done} fires with 0 at once, the file is closed, and the consumer
        never sees a producer registered or unregistered.
        """
        f = openWith(self, CONTENT, position=SIZE)
        transport = ConsumerTransport()
        producer = FileProducer(f, 0, transport)

        done = producer.start()

        self.assertEqual(self.successResultOf(done), 0)
        self.assertTrue(f.closed)
        self.assertIsNone(transport.producer)
        self.assertEqual((transport.registered, transport.unregistered), (0, 0))
        self.assertEqual(transport.value(), b"")

    def test_providesIPullProducer(self) -> None:
        """
        L{FileProducer} declares L{IPullProducer}, so that consumers treat it
        as one.
        """
        producer = FileProducer(io.BytesIO(b""), 0, StringTransport())
        self.assertTrue(IPullProducer.providedBy(producer))


class OpenForServingTests(SynchronousTestCase):
    """
    L{openForServing} opens a shared file at an offset, and nothing else.
    """

    def setUp(self) -> None:
        base = FilePath(self.mktemp())
        self.share = base.child("share")
        self.share.makedirs()
        self.share.child(NAME).setContent(CONTENT)
        self.secret = base.child("secret")
        self.secret.setContent(b"not to be served")
        base.child("x").setContent(b"not to be served either")

    def test_opensAtOffset(self) -> None:
        """
        The returned file reads from C{offset}.
        """
        f = openForServing(self.share, NAME, SIZE, 1000)
        self.addCleanup(f.close)
        self.assertEqual(f.read(), CONTENT[1000:])

    def test_offsetAtSizeReadsNothing(self) -> None:
        """
        An offset equal to the size is allowed (a resume of a complete part)
        and reads nothing.
        """
        f = openForServing(self.share, NAME, SIZE, SIZE)
        self.addCleanup(f.close)
        self.assertEqual(f.read(), b"")

    def test_offsetBeyondSizeRefused(self) -> None:
        """
        An offset beyond the size raises L{TransferError} with code
        C{"bad-offset"}, before any file is opened (the name need not even
        exist).
        """
        error = self.assertRaises(TransferError, openForServing, self.share, NAME, SIZE, SIZE + 1)
        self.assertEqual(error.code, "bad-offset")
        error = self.assertRaises(TransferError, openForServing, self.share, "no-such-file", 10, 11)
        self.assertEqual(error.code, "bad-offset")

    def test_missingFileIsOSError(self) -> None:
        """
        A name that is not in the share raises L{OSError} (the node turns
        that into a "not-found" refusal).
        """
        self.assertRaises(FileNotFoundError, openForServing, self.share, "no-such-file", 10, 0)

    def test_traversalRefusedWithoutOpeningAnything(self) -> None:
        """
        Names that would leave the share raise L{InsecurePath} from
        C{FilePath.child}, and no file at all is opened for them.
        """
        opened: List[str] = []
        realOpen = builtins.open

        def recordingOpen(file: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(file)
            return realOpen(file, *args, **kwargs)

        self.patch(builtins, "open", recordingOpen)
        for name in ["../secret", "a/../../x", "/etc/passwd", "..", "../share/" + NAME]:
            self.assertRaises(InsecurePath, openForServing, self.share, name, 100, 0)
        self.assertEqual(opened, [])


class FakeDownstream:
    """
    The client's connection as the relay sees it: a transport (which
    records producers and aborts) and framed messages and errors, recorded.
    """

    def __init__(self) -> None:
        self.transport = ConsumerTransport()
        self.messages: List[Message] = []
        self.errors: List[Tuple[str, str]] = []
        self.peer = None

    def sendMessage(self, message: Message) -> None:
        self.messages.append(message)

    def sendError(self, code: str, reason: str) -> None:
        self.errors.append((code, reason))

    def describePeer(self) -> str:
        return "client 127.0.0.15:40000"


class FakeNetwork:
    """
    C{openUpstream} for a relay: each call makes a connection to the
    address (at once, or when the test says so with C{pending}).
    """

    def __init__(self, immediate: bool = True) -> None:
        self.immediate = immediate
        self.connections: List[ClientConnection] = []
        self.pending: List[Tuple[str, defer.Deferred]] = []

    @property
    def addresses(self) -> List[str]:
        return [c.address for c in self.connections] + [a for a, d in self.pending]

    def __call__(self, address: str) -> defer.Deferred:
        if not self.immediate:
            d: defer.Deferred = defer.Deferred()
            self.pending.append((address, d))
            return d
        connection = makeConnection(address)
        self.connections.append(connection)
        return defer.succeed(connection)

    def completeNext(self) -> ClientConnection:
        address, d = self.pending.pop(0)
        connection = makeConnection(address)
        self.connections.append(connection)
        d.callback(connection)
        return connection


class RelayTests(SynchronousTestCase):
    """
    L{Relay} passes a file from a holder to a client with the holder's
    transport as the client transport's streaming producer, fails over
    between holders, and always unregisters what it registered.
    """

    def makeRelay(
        self,
        offset: int = 0,
        holders: Tuple[Tuple[int, str], ...] = ((1, "h1:7000"), (2, "h2:7000")),
        network: Optional[FakeNetwork] = None,
    ) -> Relay:
        self.clock = Clock()
        self.downstream = FakeDownstream()
        self.network = network if network is not None else FakeNetwork()
        return Relay(
            self.downstream,
            NAME,
            SHA,
            SIZE,
            offset,
            list(holders),
            self.network,
            leader=9,
            timeout=5.0,
            clock=self.clock,
        )

    def startStreaming(self, offset: int = 0) -> Tuple[Relay, defer.Deferred, ClientConnection]:
        """
        A relay whose first holder has answered with the file header.
        """
        relay = self.makeRelay(offset=offset)
        done = relay.start()
        [upstream] = self.network.connections
        reply(upstream, fileHeader(offset))
        return relay, done, upstream

    def test_asksFirstHolderForTheContentAtTheOffset(self) -> None:
        """
        The relay connects to the first holder and asks for the same name,
        content and offset; nothing goes downstream before it answers.
        """
        relay = self.makeRelay(offset=123)
        done = relay.start()
        self.assertEqual(self.network.addresses, ["h1:7000"])
        [upstream] = self.network.connections
        self.assertEqual(upstream.protocol.sent, [Message("get", name=NAME, offset=123, sha256=SHA)])
        self.assertEqual(self.downstream.messages, [])
        self.assertIsNone(self.downstream.transport.producer)
        self.assertNoResult(done)

    def test_headerForwardedAndHolderRegisteredAsStreamingProducer(self) -> None:
        """
        When the holder answers, the client gets one C{file} header naming
        the leader and the holder, the holder's transport becomes the
        client transport's I{streaming} producer, and the holder connection
        expects the rest of the file as raw bytes.
        """
        relay, done, upstream = self.startStreaming(offset=100)
        self.assertEqual(
            self.downstream.messages,
            [Message("file", name=NAME, size=SIZE, sha256=SHA, offset=100, holder=1, leader=9)],
        )
        self.assertIs(self.downstream.transport.producer, upstream.protocol.transport)
        self.assertIs(self.downstream.transport.streaming, True)
        self.assertEqual(upstream.protocol.rawExpected, [SIZE - 100])
        self.assertNoResult(done)

    def test_slowClientPausesHolder(self) -> None:
        """
        When the client's transport pauses its producer (its buffer is
        full), reading from the holder is paused; when it resumes, so does
        the holder.
        """
        relay, done, upstream = self.startStreaming()
        holderTransport = upstream.protocol.transport
        self.assertEqual(holderTransport.producerState, "producing")

        self.downstream.transport.producer.pauseProducing()
        self.assertEqual(holderTransport.producerState, "paused")

        self.downstream.transport.producer.resumeProducing()
        self.assertEqual(holderTransport.producerState, "producing")

    def test_bytesForwardedThenUnregisteredAndClosed(self) -> None:
        """
        Raw bytes from the holder are written to the client as they come;
        at the end of the raw section the producer is unregistered, the
        holder connection closed, and C{done} fires with the byte count.
        The client connection stays open for further requests.
        """
        relay, done, upstream = self.startStreaming(offset=4)
        feed(upstream, CONTENT[4:1000])
        self.assertEqual(self.downstream.transport.value(), CONTENT[4:1000])
        self.assertEqual(relay.relayed, 996)
        self.assertNoResult(done)

        feed(upstream, CONTENT[1000:])

        self.assertEqual(self.downstream.transport.value(), CONTENT[4:])
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(self.downstream.transport.unregistered, 1)
        self.assertTrue(closedByUs(upstream))
        self.assertEqual(self.successResultOf(done), SIZE - 4)
        self.assertFalse(self.downstream.transport.disconnecting)
        self.assertEqual(self.downstream.errors, [])

    def test_nothingLeftToSend(self) -> None:
        """
        A request from the very end of the file: header sent, no bytes,
        producer registered and unregistered, C{done} fires with 0.
        """
        relay, done, upstream = self.startStreaming(offset=SIZE)
        self.assertEqual(len(self.downstream.messages), 1)
        self.assertEqual(self.successResultOf(done), 0)
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(
            (self.downstream.transport.registered, self.downstream.transport.unregistered), (1, 1)
        )
        self.assertTrue(closedByUs(upstream))

    def test_holderLostMidFileWithNoOtherHolderAbortsClient(self) -> None:
        """
        If the only holder goes away mid-file, no frame can be sent any more:
        the producer is unregistered, the client connection aborted (it
        resumes later from its part), and C{done} fails with code
        C{"unavailable"}.
        """
        relay = self.makeRelay(holders=((1, "h1:7000"),))
        done = relay.start()
        [upstream] = self.network.connections
        reply(upstream, fileHeader(0))
        feed(upstream, CONTENT[:500])

        lose(upstream)

        self.assertIsNone(self.downstream.transport.producer)
        self.assertTrue(self.downstream.transport.aborted)
        self.assertEqual(self.downstream.errors, [])
        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "unavailable")

    def test_clientLostUnregistersAndClosesHolder(self) -> None:
        """
        If the client goes away mid-file, the producer is unregistered, the
        holder connection closed, C{done} fails with code C{"gone"}, and the
        holder's connection closing afterwards starts no other transfer.
        """
        relay, done, upstream = self.startStreaming()
        feed(upstream, CONTENT[:10])

        relay.downstreamLost()

        self.assertIsNone(self.downstream.transport.producer)
        self.assertTrue(closedByUs(upstream))
        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "gone")
        lose(upstream)
        self.assertEqual(self.network.addresses, ["h1:7000"])
        self.assertFalse(self.downstream.transport.aborted)

    def test_clientLostWhileConnectingToHolder(self) -> None:
        """
        If the client goes away before the holder connection is up, the
        holder is closed as soon as it answers, nothing is registered, and
        no other holder is tried.
        """
        relay = self.makeRelay(network=FakeNetwork(immediate=False))
        done = relay.start()
        relay.downstreamLost()
        self.failureResultOf(done, TransferError)

        upstream = self.network.completeNext()
        reply(upstream, fileHeader(0))

        self.assertTrue(closedByUs(upstream))
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(self.downstream.transport.registered, 0)
        self.assertEqual(self.downstream.messages, [])
        self.assertEqual(self.network.addresses, ["h1:7000"])

    def test_otherContentThenNoHolderRefusesClient(self) -> None:
        """
        A holder answering with other content (another SHA-256) is dropped;
        with no holder left and no header sent yet, the client gets a framed
        C{"unavailable"} error, not an abort, and nothing was registered.
        """
        relay = self.makeRelay(holders=((1, "h1:7000"),))
        done = relay.start()
        [upstream] = self.network.connections

        reply(upstream, fileHeader(0, sha256=OTHER_SHA))

        self.assertTrue(closedByUs(upstream))
        self.assertEqual(self.downstream.messages, [])
        self.assertEqual([code for code, reason in self.downstream.errors], ["unavailable"])
        self.assertFalse(self.downstream.transport.aborted)
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(self.downstream.transport.registered, 0)
        failure = self.failureResultOf(done, TransferError)
        self.assertEqual(failure.value.code, "unavailable")

    def test_otherContentTriesNextHolder(self) -> None:
        """
        After a holder offers other content, the next holder is asked for
        the same offset, and its bytes reach the client.
        """
        relay = self.makeRelay(offset=7)
        done = relay.start()
        first = self.network.connections[0]
        reply(first, fileHeader(7, sha256=OTHER_SHA))

        [_, second] = self.network.connections
        self.assertEqual(second.protocol.sent, [Message("get", name=NAME, offset=7, sha256=SHA)])
        reply(second, fileHeader(7, holder=2))
        feed(second, CONTENT[7:])

        self.assertEqual(self.downstream.transport.value(), CONTENT[7:])
        self.assertEqual([m.holder for m in self.downstream.messages], [2])
        self.assertEqual(self.successResultOf(done), SIZE - 7)

    def test_refusalTriesNextHolder(self) -> None:
        """
        A holder refusing (say it no longer has the file) makes the relay try
        the next holder.
        """
        relay = self.makeRelay()
        done = relay.start()
        reply(self.network.connections[0], Message("error", code="not-found", reason="gone"))
        self.assertEqual(self.network.addresses, ["h1:7000", "h2:7000"])
        self.assertTrue(closedByUs(self.network.connections[0]))
        self.assertNoResult(done)

    def test_wrongOffsetTriesNextHolder(self) -> None:
        """
        A holder answering from another offset than asked is dropped.
        """
        relay = self.makeRelay(offset=50)
        relay.start()
        reply(self.network.connections[0], fileHeader(0))
        self.assertEqual(self.network.addresses, ["h1:7000", "h2:7000"])
        self.assertEqual(self.downstream.messages, [])

    def test_silentHolderTimesOut(self) -> None:
        """
        A holder that does not answer within the timeout is closed and the
        next one asked.
        """
        relay = self.makeRelay()
        done = relay.start()
        self.clock.advance(4.9)
        self.assertEqual(self.network.addresses, ["h1:7000"])
        self.clock.advance(0.2)
        self.assertTrue(closedByUs(self.network.connections[0]))
        self.assertEqual(self.network.addresses, ["h1:7000", "h2:7000"])
        self.assertNoResult(done)

    def test_holderLostBeforeAnsweringTriesNextOnce(self) -> None:
        """
        A holder connection that closes before answering leads to exactly
        one more holder being asked (its receive failure and its close are
        one event, not two).
        """
        relay = self.makeRelay(holders=((1, "h1:7000"), (2, "h2:7000"), (3, "h3:7000")))
        relay.start()
        lose(self.network.connections[0])
        self.assertEqual(self.network.addresses, ["h1:7000", "h2:7000"])

    def test_failoverContinuesAtTheRightByte(self) -> None:
        """
        If the holder drops mid-file, the relay asks the next holder for the
        same content at (original offset + bytes relayed), registers its
        transport instead, and the client receives every byte exactly once
        behind a single header.
        """
        relay, done, first = self.startStreaming(offset=4)
        feed(first, CONTENT[4:1000])

        lose(first)

        self.assertIsNone(self.downstream.transport.producer)
        [_, second] = self.network.connections
        self.assertEqual(second.address, "h2:7000")
        self.assertEqual(second.protocol.sent, [Message("get", name=NAME, offset=1000, sha256=SHA)])
        reply(second, fileHeader(1000, holder=2))
        self.assertIs(self.downstream.transport.producer, second.protocol.transport)
        self.assertIs(self.downstream.transport.streaming, True)
        self.assertEqual(second.protocol.rawExpected, [SIZE - 1000])
        feed(second, CONTENT[1000:3000])
        feed(second, CONTENT[3000:])

        self.assertEqual(self.downstream.transport.value(), CONTENT[4:])
        self.assertEqual(len(self.downstream.messages), 1)
        self.assertEqual(self.downstream.messages[0].offset, 4)
        self.assertEqual(self.successResultOf(done), SIZE - 4)
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(
            (self.downstream.transport.registered, self.downstream.transport.unregistered), (2, 2)
        )
        self.assertFalse(self.downstream.transport.aborted)

    def test_failoverToHolderWithOtherContentAbortsClient(self) -> None:
        """
        If the replacement holder offers other content after the header was
        sent, the client connection is aborted (no frame possible mid-file)
        and nothing stays registered.
        """
        relay, done, first = self.startStreaming()
        feed(first, CONTENT[:100])
        lose(first)
        second = self.network.connections[1]
        reply(second, fileHeader(100, sha256=OTHER_SHA))

        self.assertTrue(self.downstream.transport.aborted)
        self.assertEqual(self.downstream.errors, [])
        self.assertIsNone(self.downstream.transport.producer)
        self.assertEqual(self.downstream.transport.value(), CONTENT[:100])
        self.failureResultOf(done, TransferError)


class PartialFileTests(SynchronousTestCase):
    """
    L{PartialFile} receives into a hidden C{.NAME.part} and renames it only
    after the SHA-256 matches.
    """

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.final = self.directory.child(NAME)
        self.part = self.directory.child(partName(NAME))

    def test_partName(self) -> None:
        """
        The part is C{.NAME.part} in the destination directory.
        """
        sink = PartialFile(self.directory, NAME)
        self.assertEqual(sink.part, self.directory.child("." + NAME + ".part"))
        self.assertEqual(sink.final, self.final)

    def test_success(self) -> None:
        """
        All bytes in and the SHA-256 matching: the final file holds them and
        no part is left.
        """
        sink = PartialFile(self.directory, NAME)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT[:1000])
        sink.write(CONTENT[1000:])
        self.assertEqual(sink.offset, SIZE)
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(self.part.exists())

    def test_finalNameAbsentUntilVerified(self) -> None:
        """
        With every byte written but C{finish} not yet called, nothing exists
        under the final name; the bytes are in the part.
        """
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT)
        self.assertFalse(self.final.exists())
        self.assertTrue(self.part.exists())
        sink.close()
        self.assertEqual(self.part.getContent(), CONTENT)
        self.assertFalse(self.final.exists())

    def test_mismatchSavesNothing(self) -> None:
        """
        A SHA-256 mismatch raises L{TransferError} with code C{"verify"};
        nothing appears under the final name and the part is removed (it
        cannot be resumed).
        """
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT)
        error = self.assertRaises(TransferError, sink.finish, OTHER_SHA)
        self.assertEqual(error.code, "verify")
        self.assertFalse(self.final.exists())
        self.assertFalse(self.part.exists())

    def test_mismatchLeavesExistingFileAlone(self) -> None:
        """
        A failed verification does not touch a file already under the final
        name.
        """
        self.final.setContent(b"the old version")
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT)
        self.assertRaises(TransferError, sink.finish, OTHER_SHA)
        self.assertEqual(self.final.getContent(), b"the old version")

    def test_resumeRehashesExistingPart(self) -> None:
        """
        An existing part is resumed: C{resumeOffset} returns its length, its
        bytes are hashed (not fetched again), and the remaining writes
        complete a file that verifies.
        """
        self.part.setContent(CONTENT[:3000])
        sink = PartialFile(self.directory, NAME)
        self.assertEqual(sink.resumeOffset(), 3000)
        self.assertEqual(sink.offset, 3000)
        self.assertEqual(sink.digest(), sha256hex(CONTENT[:3000]))
        sink.write(CONTENT[3000:])
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(self.part.exists())

    def test_resumeOfWrongPrefixFailsVerification(self) -> None:
        """
        A part that is not a prefix of the file is caught at the end: its
        bytes count in the hash, so the result fails verification and is not
        saved.
        """
        self.part.setContent(b"x" * 3000)
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT[3000:])
        self.assertRaises(TransferError, sink.finish, SHA)
        self.assertFalse(self.final.exists())
        self.assertFalse(self.part.exists())

    def test_restartTruncates(self) -> None:
        """
        C{restart} throws the part's bytes away: offset 0, a fresh hash, and
        later writes start at byte 0 of the part.
        """
        self.part.setContent(b"junk that is not a prefix" * 10)
        sink = PartialFile(self.directory, NAME)
        self.assertEqual(sink.resumeOffset(), 250)
        sink.restart()
        self.assertEqual(sink.offset, 0)
        self.assertEqual(sink.digest(), sha256hex(b""))
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_closeKeepsPartForResume(self) -> None:
        """
        C{close} stops writing but keeps the part, so a later attempt can
        resume from it.
        """
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT[:123])
        sink.close()
        sink.close()
        self.assertEqual(self.part.getContent(), CONTENT[:123])
        again = PartialFile(self.directory, NAME)
        self.assertEqual(again.resumeOffset(), 123)
        again.close()

    def test_discardRemovesPart(self) -> None:
        """
        C{discard} closes and removes the part; doing it twice is harmless.
        """
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(b"abc")
        sink.discard()
        sink.discard()
        self.assertFalse(self.part.exists())

    def test_createsMissingDirectory(self) -> None:
        """
        C{resumeOffset} creates the destination directory if needed.
        """
        directory = self.directory.child("new").child("deeper")
        sink = PartialFile(directory, NAME)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(directory.child(NAME).getContent(), CONTENT)

    def test_replacesExistingFileOnSuccess(self) -> None:
        """
        A verified download replaces what was under the final name.
        """
        self.final.setContent(b"the old version")
        sink = PartialFile(self.directory, NAME)
        sink.resumeOffset()
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)


class StreamSinkTests(SynchronousTestCase):
    """
    L{StreamSink} writes a download straight to a stream and verifies it at
    the end.
    """

    def test_writesThroughAndVerifies(self) -> None:
        """
        Bytes reach the stream as they are written; a matching SHA-256
        finishes quietly.
        """
        stream = io.BytesIO()
        sink = StreamSink(stream)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT[:10])
        self.assertEqual(stream.getvalue(), CONTENT[:10])
        sink.write(CONTENT[10:])
        self.assertEqual(sink.resumeOffset(), SIZE)
        sink.finish(SHA)
        self.assertEqual(stream.getvalue(), CONTENT)

    def test_mismatch(self) -> None:
        """
        A mismatch raises L{TransferError} with code C{"verify"} (the bytes
        are already out: nothing to undo).
        """
        sink = StreamSink(io.BytesIO())
        sink.write(CONTENT)
        error = self.assertRaises(TransferError, sink.finish, OTHER_SHA)
        self.assertEqual(error.code, "verify")

    def test_restart(self) -> None:
        """
        A restart before any byte is written is fine; after, it is an error,
        since written bytes cannot be taken back.
        """
        sink = StreamSink(io.BytesIO())
        sink.restart()
        sink.write(b"a")
        error = self.assertRaises(TransferError, sink.restart)
        self.assertEqual(error.code, "io")


class FakeLeader:
    """
    Replaces L{p2pfiles.client.askLeader} inside L{p2pfiles.transfer}: each
    call is recorded and answered with the next scripted outcome, either an
    exception or a C{file} header on a new fake connection.
    """

    def __init__(self) -> None:
        self.asks: List[Tuple[str, Message]] = []
        self.script: List[Any] = []
        self.connections: List[ClientConnection] = []

    def __call__(self, reactor: Any, address: str, secret: bytes, message: Message, timeout: float, identity: Any) -> defer.Deferred:
        self.asks.append((address, message))
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        connection = makeConnection(address)
        self.connections.append(connection)
        return defer.succeed((connection, outcome))


class DownloadTests(SynchronousTestCase):
    """
    L{download} asks the leader, receives into its sink, and resumes after a
    broken connection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.leader = FakeLeader()
        self.patch(transfer, "askLeader", self.leader)
        self.directory = FilePath(self.mktemp())
        self.final = self.directory.child(NAME)
        self.part = self.directory.child(partName(NAME))
        self.addresses = ["n1:7000", "n2:7000", "n3:7000"]

    def start(self, sink: Any = None, resumeFor: float = 30.0, **kwargs: Any) -> defer.Deferred:
        if sink is None:
            sink = PartialFile(self.directory, NAME)
        self.sink = sink
        return defer.Deferred.fromCoroutine(
            download(
                self.clock, NAME, sink, self.addresses, b"secret", syncThread, resumeFor=resumeFor, **kwargs
            )
        )

    def offsetsAsked(self) -> List[Tuple[str, int]]:
        return [(address, message.offset) for address, message in self.leader.asks]

    def test_savesVerifiedFile(self) -> None:
        """
        A straight download asks for the name from offset 0 with no content
        constraint, writes the raw section into the part, verifies, saves,
        closes the connection and reports the summary.
        """
        progress: List[Tuple[int, int]] = []
        self.leader.script = [fileHeader(0, holder=3)]
        d = self.start(onProgress=lambda done, total: progress.append((done, total)))
        [(address, request)] = self.leader.asks
        self.assertEqual(address, "n1:7000")
        self.assertEqual(request, Message("get", name=NAME, offset=0, sha256=None))
        [connection] = self.leader.connections
        self.assertEqual(connection.protocol.rawExpected, [SIZE])
        feed(connection, CONTENT[:5000])
        self.assertFalse(self.final.exists())
        self.clock.advance(2)
        feed(connection, CONTENT[5000:])

        summary = self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(self.part.exists())
        self.assertTrue(closedByUs(connection))
        self.assertEqual(progress, [(5000, SIZE), (SIZE, SIZE)])
        self.assertEqual(
            summary,
            {
                "name": NAME,
                "size": SIZE,
                "sha256": SHA,
                "seconds": 2.0,
                "bytes_per_second": SIZE // 2,
                "resumed_from": 0,
                "via": [9, 3],
            },
        )

    def test_stalledSenderResumesElsewhere(self) -> None:
        """
        A sender that stops sending but keeps its connection open (a hung
        leader) is given up on when a whole C{timeout} period passes without
        a byte; the
        download closes that connection and resumes on the next address from
        its offset.
        """
        self.leader.script = [fileHeader(0), fileHeader(3000)]
        d = self.start(timeout=5.0)
        first = self.leader.connections[0]
        feed(first, CONTENT[:3000])
        # Checked every 5 s: progress by the first check, none by the second.
        self.clock.advance(9.9)
        self.assertFalse(closedByUs(first))
        self.clock.advance(0.2)
        self.assertTrue(closedByUs(first))
        self.clock.advance(0.1)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n2:7000", 3000)])
        feed(self.leader.connections[1], CONTENT[3000:])
        self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_resumesAfterLossOnNextAddress(self) -> None:
        """
        When the connection breaks mid-file, the download keeps the bytes,
        pauses briefly, asks the next address for the same content from the
        part's offset, and completes a verified file.
        """
        self.leader.script = [fileHeader(0), fileHeader(4000)]
        d = self.start()
        first = self.leader.connections[0]
        feed(first, CONTENT[:4000])

        lose(first)

        self.assertEqual(len(self.leader.asks), 1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n2:7000", 4000)])
        self.assertEqual(self.leader.asks[1][1].sha256, SHA)
        second = self.leader.connections[1]
        self.assertEqual(second.protocol.rawExpected, [SIZE - 4000])
        feed(second, CONTENT[4000:])

        summary = self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(self.part.exists())
        self.assertEqual(summary["resumed_from"], 0)
        self.assertTrue(closedByUs(first))
        self.assertTrue(closedByUs(second))

    def test_resumesExistingPart(self) -> None:
        """
        A part left by an earlier run is continued from its length, which
        the summary reports as C{resumed_from}.
        """
        self.directory.makedirs()
        self.part.setContent(CONTENT[:2500])
        self.leader.script = [fileHeader(2500)]
        d = self.start()
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 2500)])
        feed(self.leader.connections[0], CONTENT[2500:])
        summary = self.successResultOf(d)
        self.assertEqual(summary["resumed_from"], 2500)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_notFoundIsFinal(self) -> None:
        """
        A "not found" refusal is not retried, fails with
        L{EXIT_NOT_FOUND}, and creates no output file.
        """
        self.leader.script = [ClientError.fromRefusal("not-found", f"not found: {NAME}")]
        d = self.start()
        failure = self.failureResultOf(d, ClientError)
        self.assertEqual(failure.value.code, EXIT_NOT_FOUND)
        self.clock.advance(60)
        self.assertEqual(len(self.leader.asks), 1)
        self.assertFalse(self.final.exists())

    def test_notFoundDuringResumeIsRetried(self) -> None:
        """
        Once the file is known to exist (its first header arrived), a "not
        found" while resuming is the new leader not having gathered its
        holders yet: it is retried within the resume window.
        """
        self.leader.script = [
            fileHeader(0),
            ClientError.fromRefusal("not-found", f"not found: {NAME}"),
            fileHeader(2000),
        ]
        d = self.start()
        feed(self.leader.connections[0], CONTENT[:2000])
        lose(self.leader.connections[0])
        for _ in range(10):
            self.clock.advance(0.1)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n2:7000", 2000), ("n3:7000", 2000)])
        feed(self.leader.connections[-1], CONTENT[2000:])
        self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_notFoundLeavesNoEmptyPart(self) -> None:
        """
        A download refused before any byte arrived leaves no trace in the
        destination directory: not even an empty hidden C{.NAME.part}.
        """
        self.leader.script = [ClientError.fromRefusal("not-found", f"not found: {NAME}")]
        d = self.start()
        self.failureResultOf(d, ClientError)
        self.assertFalse(self.part.exists())

    def test_verifyFailureSavesNothing(self) -> None:
        """
        Bytes that do not match the header's SHA-256 fail the download with
        L{EXIT_VERIFY}; neither the file nor a part is left.
        """
        self.leader.script = [fileHeader(0)]
        d = self.start()
        feed(self.leader.connections[0], b"x" * SIZE)
        failure = self.failureResultOf(d, ClientError)
        self.assertEqual(failure.value.code, EXIT_VERIFY)
        self.assertFalse(self.final.exists())
        self.assertFalse(self.part.exists())

    def test_partLongerThanFileRestarts(self) -> None:
        """
        A part longer than the file is refused with "bad-offset"; the
        download then throws the part away and starts again from 0, once.
        """
        self.directory.makedirs()
        self.part.setContent(b"y" * (SIZE + 10))
        self.leader.script = [
            ClientError.fromRefusal("bad-offset", "offset beyond the size"),
            fileHeader(0),
        ]
        d = self.start()
        self.assertEqual(self.offsetsAsked(), [("n1:7000", SIZE + 10), ("n1:7000", 0)])
        feed(self.leader.connections[0], CONTENT)
        self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_secondBadOffsetIsFinal(self) -> None:
        """
        "bad-offset" after a restart from 0 is a refusal like any other.
        """
        self.directory.makedirs()
        self.part.setContent(b"y" * (SIZE + 10))
        self.leader.script = [
            ClientError.fromRefusal("bad-offset", "offset beyond the size"),
            ClientError.fromRefusal("bad-offset", "offset beyond the size"),
        ]
        d = self.start()
        failure = self.failureResultOf(d, ClientError)
        self.assertEqual(failure.value.code, EXIT_REFUSED)
        self.assertEqual(len(self.leader.asks), 2)

    def test_contentChangedDuringResume(self) -> None:
        """
        If the resumed answer names other content than the first, the
        download stops with L{EXIT_VERIFY} rather than mixing two versions.
        """
        self.leader.script = [fileHeader(0), fileHeader(100, sha256=OTHER_SHA)]
        d = self.start()
        feed(self.leader.connections[0], CONTENT[:100])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, ClientError)
        self.assertEqual(failure.value.code, EXIT_VERIFY)
        self.assertTrue(closedByUs(self.leader.connections[1]))
        self.assertFalse(self.final.exists())

    def test_unreachableRetriedThenGivesUp(self) -> None:
        """
        Unreachable nodes are retried in turn, with growing pauses, for up
        to C{resumeFor} seconds; then the last error is raised.
        """
        error = ClientError("cannot connect", EXIT_UNREACHABLE)
        self.leader.script = [error] * 20
        d = self.start(resumeFor=1.0)
        for _ in range(30):
            self.clock.advance(0.05)
        failure = self.failureResultOf(d, ClientError)
        self.assertIs(failure.value, error)
        addresses = [address for address, offset in self.offsetsAsked()]
        self.assertEqual(addresses[:4], ["n1:7000", "n2:7000", "n3:7000", "n1:7000"])
        # Pauses of 0.1, 0.2, 0.3, 0.4 s: asked at 0, 0.1, 0.3, 0.6 and 1.0.
        self.assertEqual(len(addresses), 5)
        # Nothing arrived, so no empty part is left behind.
        self.assertFalse(self.part.exists())

    def test_eachLossGetsItsOwnResumeWindow(self) -> None:
        """
        The C{resumeFor} window counts from each loss, not from the first
        one: a download that resumed and then ran for longer than the window
        still resumes after a second loss.
        """
        self.leader.script = [fileHeader(0), fileHeader(1000), fileHeader(2000)]
        d = self.start(resumeFor=1.0)
        feed(self.leader.connections[0], CONTENT[:1000])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        feed(self.leader.connections[1], CONTENT[1000:2000])
        # A long, healthy stretch of transfer.
        self.clock.advance(60)

        lose(self.leader.connections[1])

        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertEqual([offset for address, offset in self.offsetsAsked()], [0, 1000, 2000])
        feed(self.leader.connections[2], CONTENT[2000:])
        self.successResultOf(d)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_toStream(self) -> None:
        """
        A download to a stream writes through and resumes after the bytes
        already written.
        """
        stream = io.BytesIO()
        self.leader.script = [fileHeader(0), fileHeader(10)]
        d = self.start(sink=StreamSink(stream))
        feed(self.leader.connections[0], CONTENT[:10])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        feed(self.leader.connections[1], CONTENT[10:])
        self.successResultOf(d)
        self.assertEqual(stream.getvalue(), CONTENT)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n2:7000", 10)])


@implementer(IConnectionHandler)
class ServingHandler:
    """
    A holder's side of a connection, cut down to serving C{get}: the header
    frame, then the file through a L{FileProducer}.
    """

    def __init__(self, share: FilePath) -> None:
        self.share = share
        self.done: List[defer.Deferred] = []

    def connectionReady(self, connection: P2PProtocol) -> None:
        pass

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        data = self.share.child(message.name).getContent()
        f = openForServing(self.share, message.name, len(data), message.offset)
        connection.sendMessage(fileHeader(message.offset, sha256=sha256hex(data), size=len(data), name=message.name))
        self.done.append(FileProducer(f, len(data) - message.offset, connection.transport).start())

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise AssertionError("no raw data expected")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        raise AssertionError("no raw data expected")

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        pass


class InMemoryTransferTests(SynchronousTestCase):
    """
    L{FileProducer} and L{download} over real L{P2PProtocol}s joined by
    L{twisted.test.iosim}: the header frame and raw section share one
    stream, and the pull producer is driven by the transport.
    """

    def test_downloadOverProtocol(self) -> None:
        """
        A multi-chunk file served by a L{FileProducer} arrives intact through
        the protocol's raw mode into a verified file.
        """
        clock = Clock()
        base = FilePath(self.mktemp())
        share = base.child("share")
        share.makedirs()
        data = bytes(range(251)) * ((2 * CHUNK_SIZE + 777) // 251)
        share.child(NAME).setContent(data)
        secret = b"cluster secret"
        server = ServingHandler(share)
        client = ClientConnection("holder:7000")
        serverProtocol = P2PProtocol(LocalIdentity("node", 1, "holder:7000", secret, "request"), server, clock, True)
        clientProtocol = P2PProtocol(LocalIdentity("client", None, None, secret, "request"), client, clock, False)
        pump = connect(
            serverProtocol,
            FakeTransport(serverProtocol, isServer=True),
            clientProtocol,
            FakeTransport(clientProtocol, isServer=False),
            clock=clock,
        )
        self.successResultOf(client.ready)

        def askLeader(reactor: Any, address: str, secret: bytes, message: Message, timeout: float, identity: Any) -> defer.Deferred:
            client.send(message)
            return client.receive().addCallback(lambda header: (client, header))

        self.patch(transfer, "askLeader", askLeader)
        d = defer.Deferred.fromCoroutine(
            download(clock, NAME, PartialFile(base.child("out"), NAME), ["holder:7000"], secret, syncThread)
        )
        pump.flush()

        summary = self.successResultOf(d)
        self.assertEqual(summary["size"], len(data))
        self.assertEqual(base.child("out").child(NAME).getContent(), data)
        [served] = server.done
        self.assertEqual(self.successResultOf(served), len(data))
        self.assertIsNone(serverProtocol.transport.producer)


class NodeServingTests(SynchronousTestCase):
    """
    How the node uses the transfer pieces: C{_serveLocal} with a
    L{FileProducer}, C{_track}, and stopping a relay when its client goes.
    """

    def setUp(self) -> None:
        base = FilePath(self.mktemp())
        self.share = base.child("share")
        self.share.makedirs()
        self.clock = Clock()
        self.node = Node(
            NodeConfig(1, "127.0.0.1:7001", {}, self.share, base.child("state")),
            self.clock,
            runInThread=syncThread,
            useInotify=False,
        )
        self.connection = FakeDownstream()

    def test_serveLocalSendsHeaderThenFile(self) -> None:
        """
        C{_serveLocal} sends the C{file} header and then the file from the
        offset through a pull producer; once done, the transfer is
        forgotten and nothing stays registered.
        """
        self.share.child(NAME).setContent(CONTENT)
        entry = FileEntry(NAME, SIZE, 0.0, SHA)
        self.node._serveLocal(self.connection, entry, 10)
        self.assertEqual(
            self.connection.messages,
            [Message("file", name=NAME, size=SIZE, sha256=SHA, offset=10, holder=1, leader=1)],
        )
        self.assertIn(self.connection, self.node._transfers)
        self.assertIs(self.connection.transport.streaming, False)
        pullAll(self.connection.transport)
        self.assertEqual(self.connection.transport.value(), CONTENT[10:])
        self.assertEqual(self.node._transfers, {})

    def test_serveLocalRefusesOffsetBeyondSize(self) -> None:
        """
        An offset beyond the file is refused with a "bad-offset" error frame
        and no transfer starts.
        """
        self.share.child(NAME).setContent(CONTENT)
        self.node._serveLocal(self.connection, FileEntry(NAME, SIZE, 0.0, SHA), SIZE + 1)
        self.assertEqual([code for code, reason in self.connection.errors], ["bad-offset"])
        self.assertEqual(self.connection.messages, [])
        self.assertIsNone(self.connection.transport.producer)
        self.assertEqual(self.node._transfers, {})

    def test_serveLocalDropsConnectionWhenFileFailsMidway(self) -> None:
        """
        If the file ends early while being served (it shrank since it was
        indexed), the header has gone and no frame can tell the receiver:
        the connection must be closed, so the receiver (a client or a relay
        in raw mode) learns the transfer failed instead of waiting for bytes
        that never come.
        """
        self.share.child(NAME).setContent(CONTENT[:100])
        self.node._serveLocal(self.connection, FileEntry(NAME, SIZE, 0.0, SHA), 0)
        pullAll(self.connection.transport)
        self.assertEqual(self.connection.transport.value(), CONTENT[:100])
        self.assertEqual(self.node._transfers, {})
        self.assertTrue(self.connection.transport.disconnecting)

    def test_clientGoneStopsRelay(self) -> None:
        """
        When a client connection with a relay running closes, the node tells
        the relay: the holder's transport is unregistered from the client's
        transport, the holder connection closed, and the transfer forgotten.
        """
        network = FakeNetwork()
        relay = Relay(
            self.connection, NAME, SHA, SIZE, 0, [(2, "h2:7000")], network, leader=1, clock=self.clock
        )
        self.node._track(self.connection, relay, relay.start(), "relay of " + NAME)
        [upstream] = network.connections
        reply(upstream, fileHeader(0, holder=2))
        feed(upstream, CONTENT[:10])
        self.assertIsNotNone(self.connection.transport.producer)

        self.node.connectionClosed(self.connection, Failure(ConnectionLost("client gone")))

        self.assertIsNone(self.connection.transport.producer)
        self.assertTrue(closedByUs(upstream))
        self.assertEqual(self.node._transfers, {})
        self.assertIsNone(self.successResultOf(relay.done))
