"""
Tests for L{p2pfiles.transfer}: serving a file with a pull producer, relaying
it through the leader with back-pressure and failover, receiving it into a
verified part file, and the resuming download loop; the raw mode of a
L{p2pfiles.client.ClientConnection} that the receiving side relies on; and
how a L{p2pfiles.session.RequestSession} uses them to serve and relay.

Everything runs on a L{Clock} with fake or in-memory connections and
synchronous "thread" work: no sockets, no real time.  Files are real, in
temporary directories.
"""

import errno
import hashlib
import io
import os
from struct import pack
from typing import Any, Callable, Dict, List, Optional, Tuple

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import transfer
from p2pfiles.client import ClientConnection
from p2pfiles.errors import P2PError
from p2pfiles.localindex import Changes
from p2pfiles.names import partName
from p2pfiles.node import Node, NodeConfig
from p2pfiles.partfile import PartialFile, StreamSink, openShared
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PProtocol, PeerInfo
from p2pfiles.session import IDLE, RELAYING, SERVING, IRequestContext, RequestSession
from p2pfiles.transfer import CHUNK_SIZE, FileProducer, Relay, download
from p2pfiles.wire import FileEntry, Message, encode
from tests.channels import PLAIN_EXPORTER, PlainBinding, PlainSecurity, plainIdentity

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
    producer) as its transport; C{close} and C{abort} act on it as the real
    protocol's do.
    """

    refusal = None
    # A finished handshake: a lost connection is "lost", not a failed handshake.
    peer = "node"
    closed = False

    def __init__(self, handler: ClientConnection) -> None:
        self.handler = handler
        self.transport = StringTransport()
        self.sent: List[Message] = []
        self.rawExpected: List[int] = []
        self.rawRemaining = 0

    def sendMessage(self, message: Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

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
    connection.protocol.closed = True


def closedByUs(connection: ClientConnection) -> bool:
    return bool(connection.protocol.transport.disconnecting)


def reading(connection: ClientConnection) -> bool:
    """
    Whether C{connection}'s transport is reading (not paused).
    """
    return connection.protocol.transport.producerState == "producing"


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
        and fails C{done} with a L{P2PError} of code C{"io"}.
        """
        f = FailingFile(CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE, transport)
        done = producer.start()
        self.assertIs(transport.producer, producer)

        producer.resumeProducing()

        failure = self.failureResultOf(done, P2PError)
        self.assertEqual(failure.value.code, "io")
        self.assertIn("Input/output error", str(failure.value))
        self.assertIsNone(transport.producer)
        self.assertTrue(f.closed)
        self.assertEqual(transport.value(), b"")

    def test_earlyEndOfFileUnregistersClosesAndFails(self) -> None:
        """
        If the file holds fewer bytes than C{length} (it shrank since it was
        indexed), the producer sends what there is, then unregisters, closes
        the file and fails C{done} with a L{P2PError} of code C{"io"}
        that says how many bytes were missing.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE + 100, transport, chunkSize=4096)
        done = producer.start()

        pullAll(transport)

        failure = self.failureResultOf(done, P2PError)
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
        L{P2PError} of code C{"gone"}, the file is closed, the consumer
        holds no producer afterwards, and a late pull writes nothing.
        """
        f = openWith(self, CONTENT)
        transport = ConsumerTransport()
        producer = FileProducer(f, SIZE, transport, chunkSize=100)
        done = producer.start()
        producer.resumeProducing()

        transport.connectionLostWithProducer()

        failure = self.failureResultOf(done, P2PError)
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
        self.failureResultOf(done, P2PError)

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


class OpenSharedTraversalTests(SynchronousTestCase):
    """
    L{openShared}, with which a node serves its files, opens a shared file
    and nothing else.  (Its other checks are pinned in
    L{tests.test_partfile.OpenSharedTests}.)
    """

    def setUp(self) -> None:
        base = FilePath(self.mktemp())
        self.share = base.child("share")
        self.share.makedirs()
        self.share.child(NAME).setContent(CONTENT)
        base.child("secret").setContent(b"not to be served")
        base.child("x").setContent(b"not to be served either")

    def test_traversalRefusedWithoutOpeningAnything(self) -> None:
        """
        Names that would leave the share, even ones that lead back into it,
        are refused with code C{"bad-name"}, and no file at all is opened
        for them.
        """
        opened: List[Any] = []
        realOpen = os.open

        def recordingOpen(path: Any, *args: Any, **kwargs: Any) -> int:
            opened.append(path)
            return realOpen(path, *args, **kwargs)

        self.patch(os, "open", recordingOpen)
        for name in ["../secret", "a/../../x", "/etc/passwd", "..", "../share/" + NAME]:
            error = self.assertRaises(P2PError, openShared, self.share, name, (100, 0), 0)
            self.assertEqual(error.code, "bad-name", name)
        self.assertEqual(opened, [])


CLIENT_PEER = PeerInfo("client", None, None, "request")


class FakeDownstream:
    """
    The client's connection as a relay or a request session sees it: the
    authenticated C{peer}, a transport (which records producers and aborts)
    and framed messages and errors, recorded.
    """

    def __init__(self, peer: PeerInfo = CLIENT_PEER) -> None:
        self.transport = ConsumerTransport()
        self.channel = PlainBinding(PLAIN_EXPORTER, None)
        self.messages: List[Message] = []
        self.errors: List[Tuple[str, str]] = []
        self.peer = peer

    def abort(self) -> None:
        self.transport.abortConnection()

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
        self.assertEqual(self.downstream.channel.bulkSize, CHUNK_SIZE)
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
        failure = self.failureResultOf(done, P2PError)
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
        failure = self.failureResultOf(done, P2PError)
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
        self.failureResultOf(done, P2PError)

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
        failure = self.failureResultOf(done, P2PError)
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
        self.failureResultOf(done, P2PError)


class PartialFileTests(SynchronousTestCase):
    """
    L{p2pfiles.partfile.PartialFile}, the sink a download writes to,
    receives into a hidden C{.NAME.part} and renames it only after the
    SHA-256 matches.  (More of it is pinned in L{tests.test_partfile}.)
    """

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.final = self.directory.child(NAME)
        self.part = self.directory.child(partName(NAME))

    def openSink(self) -> PartialFile:
        sink = PartialFile(self.directory, NAME)
        self.addCleanup(sink.close)
        return sink

    def test_partName(self) -> None:
        """
        The part is C{.NAME.part} in the destination directory.
        """
        sink = self.openSink()
        self.assertEqual(sink.part, self.directory.child("." + NAME + ".part"))
        self.assertEqual(sink.final, self.final)

    def test_finalNameAbsentUntilVerified(self) -> None:
        """
        With every byte written but C{finish} not yet called, nothing exists
        under the final name; the bytes are in the part.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        self.assertFalse(self.final.exists())
        self.assertTrue(self.part.exists())
        sink.close()
        self.assertEqual(self.part.getContent(), CONTENT)
        self.assertFalse(self.final.exists())

    def test_resumeOfWrongPrefixFailsVerification(self) -> None:
        """
        A part that is not a prefix of the file is caught at the end: its
        bytes count in the hash, so the result fails verification and is not
        saved.
        """
        self.part.setContent(b"x" * 3000)
        sink = self.openSink()
        self.assertEqual(sink.resumeOffset(), 3000)
        sink.write(CONTENT[3000:])
        error = self.assertRaises(P2PError, sink.finish, SHA)
        self.assertEqual(error.code, "verify")
        self.assertFalse(self.final.exists())
        self.assertFalse(self.part.exists())

    def test_closeKeepsPartForResume(self) -> None:
        """
        C{close} stops writing but keeps the part (twice is harmless), so a
        later attempt can resume from it.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT[:123])
        sink.close()
        sink.close()
        self.assertEqual(self.part.getContent(), CONTENT[:123])
        again = self.openSink()
        self.assertEqual(again.resumeOffset(), 123)

    def test_replacesExistingFileOnSuccess(self) -> None:
        """
        A verified download replaces what was under the final name.
        """
        self.final.setContent(b"the old version")
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)


class FakeLeader:
    """
    Replaces L{p2pfiles.client.askLeader} inside L{p2pfiles.transfer}: each
    call is recorded and answered with the next scripted outcome, either an
    exception or a C{file} header on a new fake connection.  The header
    arrives on the connection as a real one would (so it switches the
    connection to raw mode) and is then read from it.
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
        reply(connection, outcome)
        return connection.receive().addCallback(lambda header: (connection, header))


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
        self.assertTrue(reading(connection))
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
        # The 4000 bytes kept were not fetched again.
        self.assertEqual(summary["resumed_from"], 4000)
        self.assertTrue(closedByUs(first))
        self.assertTrue(closedByUs(second))

    def test_resumedFromSumsEveryAttempt(self) -> None:
        """
        C{resumed_from} adds up the bytes already in the part at each
        attempt's start (a part of 1000 from an earlier run, then 3000 at a
        resume inside this run), and C{bytes_per_second} counts only the
        bytes this run received.
        """
        self.directory.makedirs()
        self.part.setContent(CONTENT[:1000])
        self.leader.script = [fileHeader(1000), fileHeader(3000)]
        d = self.start()
        feed(self.leader.connections[0], CONTENT[1000:3000])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 1000), ("n2:7000", 3000)])
        self.clock.advance(1.9)
        feed(self.leader.connections[1], CONTENT[3000:])
        summary = self.successResultOf(d)
        self.assertEqual(summary["resumed_from"], 1000 + 3000)
        self.assertEqual(summary["bytes_per_second"], (SIZE - 1000) // 2)

    def test_stages(self) -> None:
        """
        C{onStage} hears whom the download asks, when a node starts sending
        (with its header) and when an attempt is lost, in that order.
        """
        stages: List[Tuple[str, Any]] = []
        self.leader.script = [fileHeader(0, holder=3), fileHeader(4000, holder=3)]
        d = self.start(onStage=lambda stage, detail: stages.append((stage, detail)))
        feed(self.leader.connections[0], CONTENT[:4000])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        feed(self.leader.connections[1], CONTENT[4000:])
        self.successResultOf(d)
        self.assertEqual([stage for stage, _ in stages], ["asking", "receiving", "lost", "asking", "receiving"])
        self.assertEqual([stages[0][1], stages[3][1]], ["n1:7000", "n2:7000"])
        self.assertEqual([(h.offset, h.holder) for h in (stages[1][1], stages[4][1])], [(0, 3), (4000, 3)])
        self.assertIsInstance(stages[2][1], str)

    def test_cancelledKeepsPart(self) -> None:
        """
        Cancelled mid-file, the download keeps the bytes it received in the
        part and fails with L{CancelledError}; cancelled before any byte, it
        leaves no empty part behind.
        """
        self.leader.script = [fileHeader(0)]
        d = self.start()
        feed(self.leader.connections[0], CONTENT[:3000])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.part.getContent(), CONTENT[:3000])
        self.assertFalse(self.final.exists())
        self.part.remove()
        self.leader.script = [fileHeader(0)]
        d = self.start()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertFalse(self.part.exists())

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
        code C{"not-found"}, and creates no output file.
        """
        self.leader.script = [P2PError(f"not found: {NAME}", "not-found")]
        d = self.start()
        failure = self.failureResultOf(d, P2PError)
        self.assertEqual(failure.value.code, "not-found")
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
            P2PError(f"not found: {NAME}", "not-found"),
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
        self.leader.script = [P2PError(f"not found: {NAME}", "not-found")]
        d = self.start()
        self.failureResultOf(d, P2PError)
        self.assertFalse(self.part.exists())

    def test_verifyFailureSavesNothing(self) -> None:
        """
        Bytes that do not match the header's SHA-256 fail the download with
        code C{"verify"}; neither the file nor a part is left.
        """
        self.leader.script = [fileHeader(0)]
        d = self.start()
        feed(self.leader.connections[0], b"x" * SIZE)
        failure = self.failureResultOf(d, P2PError)
        self.assertEqual(failure.value.code, "verify")
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
            P2PError("offset beyond the size", "bad-offset"),
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
            P2PError("offset beyond the size", "bad-offset"),
            P2PError("offset beyond the size", "bad-offset"),
        ]
        d = self.start()
        failure = self.failureResultOf(d, P2PError)
        self.assertEqual(failure.value.code, "bad-offset")
        self.assertEqual(len(self.leader.asks), 2)

    def test_contentChangedDuringResume(self) -> None:
        """
        If the resumed answer names other content than the first, the
        download stops with code C{"verify"} rather than mixing two versions.
        """
        self.leader.script = [fileHeader(0), fileHeader(100, sha256=OTHER_SHA)]
        d = self.start()
        feed(self.leader.connections[0], CONTENT[:100])
        lose(self.leader.connections[0])
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, P2PError)
        self.assertEqual(failure.value.code, "verify")
        self.assertTrue(closedByUs(self.leader.connections[1]))
        self.assertFalse(self.final.exists())

    def test_unreachableRetriedThenGivesUp(self) -> None:
        """
        Unreachable nodes are retried in turn, with growing pauses, for up
        to C{resumeFor} seconds; then the last error is raised.
        """
        error = P2PError("cannot connect", "unreachable")
        self.leader.script = [error] * 20
        d = self.start(resumeFor=1.0)
        for _ in range(30):
            self.clock.advance(0.05)
        failure = self.failureResultOf(d, P2PError)
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


    def startSecond(self, **kwargs: Any) -> defer.Deferred:
        """
        Another download of the same name into the same directory.
        """
        return defer.Deferred.fromCoroutine(
            download(
                self.clock, NAME, PartialFile(self.directory, NAME), self.addresses, b"secret", syncThread, **kwargs
            )
        )

    def test_secondDownloadWaitsThenFindsTheFileInPlace(self) -> None:
        """
        A second download of the same destination while the first holds the
        part asks nobody until the first is done; then, finding that the
        first put the very content the leader announces in place, it
        closes the connection without reading a byte and reports the whole
        file as already there (C{resumed_from} is the size).
        """
        self.leader.script = [fileHeader(0), fileHeader(0, holder=2)]
        first = self.start()
        feed(self.leader.connections[0], CONTENT[:1000])
        second = self.startSecond()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(self.leader.asks), 1)
        self.assertNoResult(second)

        feed(self.leader.connections[0], CONTENT[1000:])
        self.successResultOf(first)
        self.clock.advance(1)

        summary = self.successResultOf(second)
        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n1:7000", 0)])
        other = self.leader.connections[1]
        self.assertTrue(closedByUs(other))
        self.assertFalse(reading(other))
        self.assertEqual(
            (summary["size"], summary["resumed_from"], summary["bytes_per_second"], summary["via"]),
            (SIZE, SIZE, 0, [9, 2]),
        )
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(self.part.exists())

    def test_secondDownloadResumesWhatTheFirstLeft(self) -> None:
        """
        If the first download gives up with bytes in the part, the second,
        which waited its turn, resumes from them.
        """
        self.leader.script = [fileHeader(0), fileHeader(1000)]
        first = self.start(resumeFor=0)
        feed(self.leader.connections[0], CONTENT[:1000])
        second = self.startSecond()
        lose(self.leader.connections[0])
        self.failureResultOf(first, P2PError)
        self.assertEqual(self.part.getContent(), CONTENT[:1000])

        self.clock.advance(1)

        self.assertEqual(self.offsetsAsked(), [("n1:7000", 0), ("n1:7000", 1000)])
        feed(self.leader.connections[1], CONTENT[1000:])
        summary = self.successResultOf(second)
        self.assertEqual(summary["resumed_from"], 1000)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_secondDownloadGivesUpWaiting(self) -> None:
        """
        A second download does not wait beyond C{waitTurn} seconds: once its
        next look would come later than that, it fails with code C{"busy"},
        having asked nobody, and leaves the first's part alone.
        """
        self.leader.script = [fileHeader(0)]
        self.start()
        feed(self.leader.connections[0], CONTENT[:1000])
        second = self.startSecond(waitTurn=2.5)
        self.clock.advance(1)
        self.assertNoResult(second)
        self.clock.advance(1)
        self.assertEqual(self.failureResultOf(second, P2PError).value.code, "busy")
        self.assertEqual(len(self.leader.asks), 1)
        self.assertEqual(self.part.getContent(), CONTENT[:1000])


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
        child = self.share.child(message.name)
        data = child.getContent()
        st = os.stat(child.path)
        f = openShared(self.share, message.name, (st.st_size, st.st_mtime_ns, st.st_ino), message.offset)
        connection.sendMessage(fileHeader(message.offset, sha256=sha256hex(data), size=len(data), name=message.name))
        self.done.append(FileProducer(f, len(data) - message.offset, connection.transport).start())

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise AssertionError("no raw data expected")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        raise AssertionError("no raw data expected")

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        pass


def holderIdentity(secret: bytes) -> LocalIdentity:
    """
    Node 1 as it listens on a plain test channel, where a client shows no
    certificate.
    """
    return plainIdentity("node", 1, "holder:7000", secret, "request", PlainSecurity(peer=None))


def clientIdentity(secret: bytes) -> LocalIdentity:
    """
    A client on a plain test channel: no certificate of its own, and the
    holder's at the other end.
    """
    return plainIdentity("client", None, None, secret, "request", PlainSecurity(fingerprint=None))


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
        serverProtocol = P2PProtocol(holderIdentity(secret), server, clock, True)
        clientProtocol = P2PProtocol(clientIdentity(secret), client, clock, False)
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



def framed(message: Message) -> bytes:
    """
    C{message} as it travels: a 4-byte length, then its encoding.
    """
    payload = encode(message)
    return pack("!I", len(payload)) + payload


@implementer(IConnectionHandler)
class SilentHandler:
    """
    A node's side of a connection that only completes the handshake.
    """

    def connectionReady(self, connection: P2PProtocol) -> None:
        pass

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        pass

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise AssertionError("no raw data expected")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        raise AssertionError("no raw data expected")

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        pass


class RawModeTests(SynchronousTestCase):
    """
    A L{ClientConnection} over a real L{P2PProtocol} switches to raw mode
    the moment a C{file} header is parsed: the bytes after the header are
    file bytes whatever they look like and however late the user of the
    connection says where they go.  Raw mode cannot depend on Deferred
    timing.
    """

    def setUp(self) -> None:
        clock = Clock()
        secret = b"cluster secret"
        self.connection = ClientConnection("holder:7000")
        server = P2PProtocol(holderIdentity(secret), SilentHandler(), clock, True)
        self.protocol = P2PProtocol(clientIdentity(secret), self.connection, clock, False)
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            self.protocol,
            FakeTransport(self.protocol, isServer=False),
            clock=clock,
        )
        self.successResultOf(self.connection.ready)
        pump.flush()
        self.events: List[str] = []
        transport = self.protocol.transport
        self.patch(transport, "pauseProducing", lambda: self.events.append("pause"))
        self.patch(transport, "resumeProducing", lambda: self.events.append("resume"))
        self.received: List[bytes] = []
        self.finished: List[bool] = []
        # File bytes that would be frames, if parsed: an over-long frame
        # (which drops the connection) and a well-formed error frame.
        self.raw = b"\xff\xff\xff\xff" + framed(Message("error", code="busy", reason="not a frame")) + CONTENT
        self.header = fileHeader(0, sha256=sha256hex(self.raw), size=len(self.raw))

    def receiveLater(self, header: Message) -> defer.Deferred:
        """
        Ask for the raw section only when a Deferred fired by the test
        calls back, long after the bytes arrived.
        """
        self.assertEqual(header, self.header)
        later: defer.Deferred = defer.Deferred()
        later.addCallback(
            lambda _: self.connection.receiveRaw(self.received.append, lambda: self.finished.append(True))
        )
        return later

    def test_bytesInTheHeadersReadGoToTheSink(self) -> None:
        """
        A header, its whole raw section and the next frame in one read: the
        connection pauses reading at the header; the section's bytes wait,
        unparsed, until C{receiveRaw} is called from a later callback, then
        go to the sink in order, followed by one C{done}; reading resumes,
        and the frame after the section is read as a frame.
        """
        self.protocol.dataReceived(
            framed(self.header) + self.raw + framed(Message("error", code="not-found", reason="the next frame"))
        )
        header = self.successResultOf(self.connection.receive())
        later = self.receiveLater(header)
        self.assertEqual(self.events, ["pause"])
        self.assertEqual((self.received, self.finished), ([], []))
        self.assertFalse(self.protocol.transport.disconnecting)

        later.callback(None)

        self.assertEqual(b"".join(self.received), self.raw)
        self.assertEqual(self.finished, [True])
        self.assertEqual(self.events, ["pause", "resume"])
        error = self.failureResultOf(self.connection.receive(), P2PError).value
        self.assertEqual((error.code, str(error)), ("not-found", "the next frame"))
        self.assertFalse(self.protocol.transport.disconnecting)

    def test_sectionSplitAcrossReads(self) -> None:
        """
        A header with the first part of its raw section in one read, the
        sink given later, the rest in a later read: the sink gets every
        byte once, in order, and C{done} comes once, after the last byte.
        """
        cut = 3
        self.protocol.dataReceived(framed(self.header) + self.raw[:cut])
        self.receiveLater(self.successResultOf(self.connection.receive())).callback(None)
        self.assertEqual(b"".join(self.received), self.raw[:cut])
        self.assertEqual(self.finished, [])

        self.protocol.dataReceived(self.raw[cut:])

        self.assertEqual(b"".join(self.received), self.raw)
        self.assertEqual(self.finished, [True])
        self.assertFalse(self.protocol.transport.disconnecting)


@implementer(IRequestContext)
class FakeRequestContext:
    """
    What a L{RequestSession} may know of and ask of its node, for node
    C{me} with leader C{leader}: its own files (C{entries}, opened with the
    real L{openShared} from C{share}), the cluster's holders (C{holders})
    and the network (C{openUpstream}); transfers are recorded in
    C{started} and their ends in C{ended}.
    """

    def __init__(self, share: FilePath, clock: Clock, me: int = 1, leader: Optional[int] = 1) -> None:
        self.share = share
        self.clock = clock
        self.me = me
        self.leader = leader
        self.entries: Dict[str, FileEntry] = {}
        self.holders: Dict[str, Tuple[FileEntry, List[Tuple[int, str]]]] = {}
        self.network = FakeNetwork()
        self.started: List[Tuple[Any, str, str, str, int]] = []
        self.ended: List[Any] = []

    def isLeader(self) -> bool:
        return self.leader == self.me

    def leaderId(self) -> Optional[int]:
        return self.leader

    def leaderAddress(self) -> Optional[str]:
        return None if self.leader is None else f"n{self.leader}:7000"

    def status(self) -> Dict[str, Any]:
        return {"id": self.me, "leader": self.leader}

    def watchStatus(self, callback: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        return lambda: None

    def listing(self) -> List[dict]:
        return []

    def listingFrames(self) -> List[bytes]:
        return []

    def content(self, name: str, sha256: Optional[str], everyone: bool = False) -> Any:
        found = self.holders.get(name)
        if found is None or sha256 not in (None, found[0].sha256):
            return None
        return found

    def nextRelay(self, count: int) -> int:
        return 0

    def localEntry(self, name: str) -> Optional[FileEntry]:
        return self.entries.get(name)

    def openShared(self, entry: FileEntry, offset: int) -> Any:
        # The indexed size, and the mtime the file has (as if just hashed).
        mtimeNs = os.stat(self.share.child(entry.name).path).st_mtime_ns
        return openShared(self.share, entry.name, (entry.size, mtimeNs), offset)

    def openUpstream(self, address: str) -> defer.Deferred:
        return self.network(address)

    def fetch(self, name: str, overwrite: bool) -> defer.Deferred:
        return defer.Deferred()

    def indexSince(self, incarnation: Optional[str], since: int) -> defer.Deferred:
        # Always the whole list: these tests move files, not indexes.
        entries = [self.entries[name] for name in sorted(self.entries)]
        return defer.succeed(Changes("0123456789abcdef", len(entries), True, entries, []))

    def fetchProgress(self, name: str) -> Tuple[int, int]:
        return (0, 0)

    def transferStarted(self, session: Any, direction: str, name: str, peer: str, size: int) -> Callable[[Any], None]:
        self.started.append((session, direction, name, peer, size))
        return self.ended.append


class RequestSessionTransferTests(SynchronousTestCase):
    """
    How a L{RequestSession} uses the transfer pieces: serving a file of its
    node with a L{FileProducer}, relaying through a L{Relay}, reporting each
    transfer's start and end to its context, and stopping a relay when its
    client goes.
    """

    def setUp(self) -> None:
        self.share = FilePath(self.mktemp())
        self.share.makedirs()
        self.clock = Clock()
        self.context = FakeRequestContext(self.share, self.clock)
        self.session = RequestSession(self.context)

    def connect(self, peer: PeerInfo = CLIENT_PEER) -> FakeDownstream:
        connection = FakeDownstream(peer)
        self.session.connectionReady(connection)  # type: ignore[arg-type]
        return connection

    def shareFile(self, data: bytes) -> FileEntry:
        """
        Put C{data} in the share as NAME, indexed as a file of SIZE bytes.
        """
        self.share.child(NAME).setContent(data)
        entry = FileEntry(NAME, SIZE, 0.0, SHA)
        self.context.entries[NAME] = entry
        return entry

    def get(self, connection: FakeDownstream, offset: int = 0) -> None:
        message = Message("get", name=NAME, offset=offset, sha256=None)
        self.session.messageReceived(connection, message)  # type: ignore[arg-type]

    def test_fakeContextProvidesTheInterface(self) -> None:
        """
        The fake context these tests use provides L{IRequestContext}, so
        the session asks nothing of it that a node's context lacks.
        """
        self.assertTrue(verifyObject(IRequestContext, self.context))

    def test_serveSendsHeaderThenFile(self) -> None:
        """
        A leader asked for its own file sends the C{file} header (itself as
        holder and leader), then the file from the offset through a pull
        producer; the transfer is reported as started with the bytes to
        send, and as ended with the bytes sent; then the session is idle
        and nothing stays registered.
        """
        self.shareFile(CONTENT)
        connection = self.connect()
        self.get(connection, offset=10)
        self.assertEqual(
            connection.messages,
            [Message("file", name=NAME, size=SIZE, sha256=SHA, offset=10, holder=1, leader=1)],
        )
        self.assertEqual(self.context.started, [(self.session, "serve", NAME, "client 127.0.0.15:40000", SIZE - 10)])
        self.assertEqual(self.session.state, SERVING)
        self.assertIs(connection.transport.streaming, False)
        self.assertEqual(connection.channel.bulkSize, CHUNK_SIZE)

        pullAll(connection.transport)

        self.assertEqual(connection.transport.value(), CONTENT[10:])
        self.assertEqual(self.context.ended, [SIZE - 10])
        self.assertEqual(self.session.state, IDLE)
        self.assertIsNone(connection.transport.producer)
        self.assertFalse(connection.transport.aborted)

    def test_serveRefusesOffsetBeyondSize(self) -> None:
        """
        An offset beyond the file is refused with a "bad-offset" error frame
        and no transfer starts.
        """
        self.shareFile(CONTENT)
        connection = self.connect()
        self.get(connection, offset=SIZE + 1)
        self.assertEqual([code for code, reason in connection.errors], ["bad-offset"])
        self.assertEqual(connection.messages, [])
        self.assertIsNone(connection.transport.producer)
        self.assertEqual(self.context.started, [])
        self.assertEqual(self.session.state, IDLE)

    def test_serveDropsConnectionWhenFileFailsMidway(self) -> None:
        """
        If the file shrinks while it is served, the header has gone and no
        frame can tell the receiver: the connection is aborted, so the
        receiver (here the leader relaying in raw mode) learns the transfer
        failed instead of waiting for bytes that never come.  The transfer
        ends with an "io" failure and the session is idle again.
        """
        self.context.leader = 9
        self.shareFile(CONTENT)
        connection = self.connect(PeerInfo("node", 9, "n9:7000", "request"))
        self.get(connection)
        self.assertEqual([m.leader for m in connection.messages], [9])
        os.truncate(self.share.child(NAME).path, 100)

        pullAll(connection.transport)

        self.assertEqual(connection.transport.value(), CONTENT[:100])
        self.assertTrue(connection.transport.aborted)
        [failure] = self.context.ended
        self.assertEqual(failure.value.code, "io")
        self.assertEqual(self.session.state, IDLE)
        self.assertIsNone(connection.transport.producer)

    def startRelay(self) -> Tuple[FakeDownstream, ClientConnection]:
        """
        A leader without the file relaying it from holder 2: the holder has
        answered with the header and sent the first 10 bytes.
        """
        self.context.holders[NAME] = (FileEntry(NAME, SIZE, 0.0, SHA), [(2, "h2:7000")])
        connection = self.connect()
        self.get(connection)
        [upstream] = self.context.network.connections
        self.assertEqual(upstream.protocol.sent, [Message("get", name=NAME, offset=0, sha256=SHA)])
        reply(upstream, fileHeader(0, holder=2))
        feed(upstream, CONTENT[:10])
        self.assertEqual(self.session.state, RELAYING)
        self.assertEqual(self.context.started, [(self.session, "relay", NAME, "client 127.0.0.15:40000", SIZE)])
        self.assertIs(connection.transport.producer, upstream.protocol.transport)
        self.assertEqual(self.session.progress(), 10)
        return connection, upstream

    def test_relayEndsIdle(self) -> None:
        """
        A relay that delivers the whole file ends with its byte count and
        leaves the session idle, the client connection open.
        """
        connection, upstream = self.startRelay()
        feed(upstream, CONTENT[10:])
        self.assertEqual([(m.holder, m.leader) for m in connection.messages], [(2, 1)])
        self.assertEqual(connection.transport.value(), CONTENT)
        self.assertEqual(self.context.ended, [SIZE])
        self.assertEqual(self.session.state, IDLE)
        self.assertIsNone(connection.transport.producer)
        self.assertFalse(connection.transport.disconnecting)

    def test_clientGoneStopsRelay(self) -> None:
        """
        When a client connection with a relay running closes, the session
        tells the relay: the holder's transport is unregistered from the
        client's transport, the holder connection closed, the transfer ends
        with a "gone" failure, and the holder closing afterwards starts
        nothing new.
        """
        connection, upstream = self.startRelay()

        self.session.connectionClosed(connection, Failure(ConnectionLost("client gone")))  # type: ignore[arg-type]

        self.assertIsNone(connection.transport.producer)
        self.assertTrue(closedByUs(upstream))
        [failure] = self.context.ended
        self.assertEqual(failure.value.code, "gone")
        lose(upstream)
        self.assertEqual(self.context.network.addresses, ["h2:7000"])
        self.assertFalse(connection.transport.aborted)


class NodeRequestContextTests(SynchronousTestCase):
    """
    A node's own L{p2pfiles.context.RequestContext} serves a session from the
    node's share and keeps C{node.transfers} while a transfer runs.
    """

    def setUp(self) -> None:
        base = FilePath(self.mktemp())
        self.share = base.child("share")
        self.share.makedirs()
        self.data = bytes(range(251)) * ((CHUNK_SIZE + 1000) // 251)
        self.share.child(NAME).setContent(self.data)
        self.clock = Clock()
        self.node = Node(
            NodeConfig(1, "127.0.0.1:7001", {}, self.share, base.child("state")),
            self.clock,
            runInThread=syncThread,
            useInotify=False,
        )

    def test_providesTheInterface(self) -> None:
        """
        The node's context provides L{IRequestContext}.
        """
        self.assertTrue(verifyObject(IRequestContext, self.node.context))

    def test_servedTransferTrackedUntilDone(self) -> None:
        """
        A session on the node's context serving a file the node indexed
        (to a node asking for it) is listed in C{node.transfers}, with its
        progress, until the last byte is sent; then it is forgotten.
        """
        self.node.config.state.makedirs()
        started = self.node.localIndex.start()
        self.clock.advance(1)
        self.successResultOf(started)
        self.addCleanup(lambda: self.node.localIndex.stop())
        session = RequestSession(self.node.context)
        connection = FakeDownstream(PeerInfo("node", 2, "n2:7000", "request"))
        session.connectionReady(connection)  # type: ignore[arg-type]

        session.messageReceived(connection, Message("get", name=NAME, offset=0, sha256=None))  # type: ignore[arg-type]

        self.assertEqual(
            [(m.name, m.size, m.sha256, m.holder) for m in connection.messages],
            [(NAME, len(self.data), sha256hex(self.data), 1)],
        )
        self.assertEqual(list(self.node.transfers), [session])
        connection.transport.producer.resumeProducing()
        described = self.node.transfers[session].describe()
        self.assertEqual(
            (described["direction"], described["name"], described["bytes"], described["size"]),
            ("serve", NAME, CHUNK_SIZE, len(self.data)),
        )
        pullAll(connection.transport)
        self.assertEqual(connection.transport.value(), self.data)
        self.assertEqual(self.node.transfers, {})
