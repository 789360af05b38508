"""
Moving file bytes: serving a file from disk, relaying it through the leader,
and receiving it into a hidden partial file that becomes the real file only
once its SHA-256 matches.

Back-pressure everywhere, so no file is ever held in memory:
  - serving: L{FileProducer} is a pull producer; the transport asks for the
    next chunk only when it has sent the last one;
  - relaying: the holder's transport is registered as the streaming producer
    of the client's transport, so a slow client pauses reading from the
    holder, and TCP slows the holder down in turn;
  - receiving: each chunk is hashed and written as it arrives, in a thread
    (L{SerialWriter}), and the sender is paused while the disk falls behind.

Partial files, streams and opening shared files safely live in
L{p2pfiles.partfile}.

Whoever registers a producer unregisters it, on success, error and
disconnect alike.
"""

from typing import Any, BinaryIO, Callable, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.client import askLeader
from p2pfiles.errors import P2PError
from p2pfiles.sharescan import hashFile
from p2pfiles.partfile import PartBusy, SerialWriter, waitForPart
from p2pfiles.wire import Message

# Bytes read from disk per resumeProducing: large enough that per-chunk
# overhead is small next to the copy, small enough to keep buffers modest.
CHUNK_SIZE = 256 * 1024


@implementer(IPullProducer)
class FileProducer:
    """
    Send C{length} bytes of an open file, from its current position, to a
    consumer, one chunk each time the consumer asks.

    @ivar done: fires with the number of bytes sent, or fails if the file
        ended early, could not be read, or the consumer went away.
    """

    log = Logger()

    def __init__(self, file: BinaryIO, length: int, consumer: IConsumer, chunkSize: int = CHUNK_SIZE) -> None:
        self.file = file
        self.remaining = length
        self.sent = 0
        self.consumer = consumer
        self.chunkSize = chunkSize
        self.done: Deferred = Deferred()

    def start(self) -> Deferred:
        if self.remaining == 0:
            self.file.close()
            self.done.callback(0)
        else:
            self.consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        try:
            data = self.file.read(min(self.chunkSize, self.remaining))
        except OSError as e:
            self._finish(P2PError(f"cannot read file: {e.strerror or e}", "io"))
            return
        if not data:
            self._finish(P2PError(f"file ended {self.remaining} bytes early (changed while sent?)", "io"))
            return
        self.remaining -= len(data)
        self.sent += len(data)
        self.consumer.write(data)
        if self.remaining == 0:
            self._finish(None)

    def stopProducing(self) -> None:
        # The consumer went away (connection lost): it has dropped us already.
        if not self.done.called:
            self.file.close()
            self.done.errback(P2PError(f"receiver went away after {self.sent} bytes", "gone"))

    def _finish(self, error: Optional[Exception]) -> None:
        self.consumer.unregisterProducer()
        self.file.close()
        if error is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(error)


class Relay:
    """
    The leader passing one file from a holder to a client, as the bytes
    arrive.

    The holder's transport is registered as the streaming producer of the
    client's transport: when the client falls behind, Twisted pauses reading
    from the holder.  If the holder goes away mid-file the relay continues
    from the next holder of the same SHA-256, at the byte where it stopped;
    with none left it drops the client, which resumes later from its part
    file.

    @ivar done: fires with the number of bytes relayed, or fails with a
        L{P2PError}.
    """

    log = Logger()

    def __init__(
        self,
        downstream: Any,
        name: str,
        sha256: str,
        size: int,
        offset: int,
        holders: List[Tuple[int, str]],
        openUpstream: Callable[[str], Deferred],
        leader: int,
        timeout: float = 10.0,
        clock: Any = None,
    ) -> None:
        self.downstream = downstream
        self.name = name
        self.sha256 = sha256
        self.size = size
        self.offset = offset
        self.holders = list(holders)
        self.openUpstream = openUpstream
        self.leader = leader
        self.timeout = timeout
        self.clock = clock
        self.relayed = 0
        self.upstream: Any = None
        self.holder: Optional[int] = None
        self._headerSent = False
        self._registered = False
        self.done: Deferred = Deferred()

    def start(self) -> Deferred:
        self._nextHolder(None)
        return self.done

    def downstreamLost(self) -> None:
        """
        The client went away: stop reading from the holder.
        """
        if not self.done.called:
            self._unregister()
            self._closeUpstream()
            self.done.errback(P2PError(f"client went away after {self.relayed} bytes", "gone"))

    def _nextHolder(self, why: Optional[str]) -> None:
        if self.done.called:
            return
        if why is not None:
            self.log.warn("relay of {name} from node {holder}: {why}", name=self.name, holder=self.holder, why=why)
        if not self.holders:
            self._fail(P2PError(f"no live holder of {self.name} could send it", "unavailable"))
            return
        self.holder, address = self.holders.pop(0)
        position = self.offset + self.relayed
        d = self.openUpstream(address)

        def ask(connection: Any) -> Deferred:
            self.upstream = connection
            connection.onClose = self._upstreamClosed
            connection.send(Message("get", name=self.name, offset=position, sha256=self.sha256))
            reply = connection.receive()
            if self.clock is not None:
                reply.addTimeout(self.timeout, self.clock)
            return reply

        def header(message: Message) -> None:
            if message.type != "file" or message.sha256 != self.sha256 or message.size != self.size:
                raise P2PError(f"node {self.holder} offered other content", "verify")
            if message.offset != position:
                raise P2PError(f"node {self.holder} answered from offset {message.offset}", "protocol")
            self._stream(position)

        def failed(reason: Failure) -> None:
            self._closeUpstream()
            self._nextHolder(reason.getErrorMessage())

        d.addCallback(ask).addCallback(header).addErrback(failed)

    def _stream(self, position: int) -> None:
        if self.done.called:
            self._closeUpstream()
            return
        downstream = self.downstream
        if not self._headerSent:
            self._headerSent = True
            downstream.sendMessage(
                Message(
                    "file",
                    name=self.name,
                    size=self.size,
                    sha256=self.sha256,
                    offset=self.offset,
                    holder=self.holder,
                    leader=self.leader,
                )
            )
        upstream = self.upstream
        if downstream.channel is not None:
            downstream.channel.carryBulk(CHUNK_SIZE)
        downstream.transport.registerProducer(upstream.transport, True)
        self._registered = True
        upstream.receiveRaw(self._forward, self._finished)

    def _forward(self, data: bytes) -> None:
        self.relayed += len(data)
        self.downstream.transport.write(data)

    def _finished(self) -> None:
        self._unregister()
        self._closeUpstream()
        if not self.done.called:
            self.done.callback(self.relayed)

    def _upstreamClosed(self, error: Exception) -> None:
        if self.done.called:
            return
        self._unregister()
        self.upstream = None
        self._nextHolder(f"lost after {self.relayed} bytes ({error})")

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.downstream.transport.unregisterProducer()

    def _closeUpstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.onClose = None
            upstream.close()

    def _fail(self, error: P2PError) -> None:
        self._unregister()
        self._closeUpstream()
        if not self._headerSent:
            # Still framed: the client gets a clean refusal.
            self.downstream.sendError(error.code, str(error))
        else:
            # Mid-file, no frame can be sent: drop the client, which resumes.
            self.downstream.transport.abortConnection()
        self.done.errback(error)


# Downloads log as this module.
log = Logger()

# Failures that another attempt cannot cure.
FINAL_CODES = frozenset(
    {"auth", "version", "not-found", "bad-name", "bad-offset", "conflict", "refused", "usage", "verify", "io", "busy"}
)

# How long a download keeps trying to resume after losing its leader.
RESUME_FOR = 30.0


async def download(
    reactor: Any,
    name: str,
    sink: Any,
    addresses: List[str],
    secret: bytes,
    runInThread: Callable[..., Deferred],
    identity: Any = None,
    timeout: float = 10.0,
    resumeFor: float = RESUME_FOR,
    onProgress: Optional[Callable[[int, int], None]] = None,
    waitTurn: float = 24 * 3600.0,
    onStage: Optional[Callable[[str, Any], None]] = None,
) -> dict:
    """
    Download C{name} through the leader into C{sink} (a L{PartialFile} or
    L{StreamSink}), asking first the node at C{addresses[0]}.

    If the connection breaks mid-file the download keeps what it has and
    resumes through whichever of C{addresses} leads next, for up to
    C{resumeFor} seconds.  Fires with the summary that C{p2pfiles get --json}
    prints; fails with a L{P2PError}.  Cancelled, it waits for the bytes
    already received to reach the part, keeps a part that holds bytes for a
    later resume (removes an empty one), and fails with L{CancelledError}.

    @param onProgress: called with the bytes held and the file's size as
        bytes arrive.
    @param onStage: called with C{("asking", address)} before each request,
        C{("receiving", header)} when a node starts sending, and
        C{("lost", reason)} when an attempt failed and another will follow:
        what a progress display needs to say who it waits for.
    """
    writers: List[SerialWriter] = []
    try:
        return await _download(
            reactor,
            name,
            sink,
            addresses,
            secret,
            runInThread,
            identity,
            timeout,
            resumeFor,
            onProgress,
            waitTurn,
            writers,
            onStage or _ignoreStage,
        )
    except CancelledError:
        for writer in writers:
            try:
                await writer.flush()
            except Exception:
                pass
        _giveUp(sink)
        raise


def _ignoreStage(stage: str, detail: Any) -> None:
    pass


async def _download(
    reactor: Any,
    name: str,
    sink: Any,
    addresses: List[str],
    secret: bytes,
    runInThread: Callable[..., Deferred],
    identity: Any,
    timeout: float,
    resumeFor: float,
    onProgress: Optional[Callable[[int, int], None]],
    waitTurn: float,
    writers: List[SerialWriter],
    onStage: Callable[[str, Any], None],
) -> dict:
    started = reactor.seconds()
    # Bytes already in the part when each attempt started (what a download
    # without resume would have fetched again), and bytes received in this run.
    notTransferred = 0
    transferred = 0
    try:
        await runInThread(sink.resumeOffset)
        waited = False
    except PartBusy as e:
        # Another download of the same destination: wait our turn, then
        # find its result (or resume what it left).
        log.info("{reason}; waiting for it to finish", reason=str(e))
        await waitForPart(reactor, runInThread, sink, waitTurn)
        waited = True
    expected: Optional[str] = None
    attempt = 0
    giveUpAt: Optional[float] = None
    restarted = False
    while True:
        address = addresses[attempt % len(addresses)]
        request = Message("get", name=name, offset=sink.offset, sha256=expected)
        onStage("asking", address)
        try:
            connection, header = await askLeader(reactor, address, secret, request, timeout, identity)
        except P2PError as e:
            if e.code == "bad-offset" and not restarted:
                # The part is longer than the file: it is not a prefix of it.
                restarted = True
                sink.restart()
                continue
            if e.code in FINAL_CODES and not (e.code == "not-found" and expected is not None):
                _giveUp(sink)
                raise
            # A file we were already receiving can be "not found" for a
            # moment after an election, until the new leader has gathered
            # its holders: keep trying within the resume window.
            onStage("lost", str(e))
            attempt, giveUpAt = await _pause(reactor, attempt, giveUpAt, resumeFor, e, sink)
            continue
        if header.type != "file" or header.name != name:
            connection.close()
            sink.close()
            raise P2PError(f"unexpected {header.type} reply to get", "protocol")
        if expected is None:
            expected = header.sha256
        elif header.sha256 != expected:
            connection.close()
            sink.close()
            raise P2PError(f"{name} changed on the cluster during the download; run the command again", "verify")
        if header.offset != sink.offset:
            connection.close()
            sink.close()
            raise P2PError(f"the node answered from offset {header.offset}, not {sink.offset}", "protocol")
        if waited:
            waited = False
            if await _alreadyThere(runInThread, sink, header):
                connection.close()
                sink.discard()
                return _summary(reactor, started, header, header.size, 0)
        before = sink.offset
        notTransferred += before
        onStage("receiving", header)
        try:
            await _receive(reactor, connection, header, sink, onProgress, timeout, runInThread, writers)
        except P2PError as e:
            transferred += max(sink.offset - before, 0)
            if e.code == "io":
                sink.close()
                raise
            if sink.offset > before:
                # It made progress: this loss gets a resume window of its own.
                giveUpAt = None
            onStage("lost", str(e))
            attempt, giveUpAt = await _pause(reactor, attempt, giveUpAt, resumeFor, e, sink)
            continue
        finally:
            connection.close()
        transferred += max(sink.offset - before, 0)
        try:
            await runInThread(sink.finish, header.sha256, header.size)
        except OSError as e:
            sink.close()
            raise P2PError(f"cannot save {name}: {e.strerror or e}", "io") from None
        return _summary(reactor, started, header, notTransferred, transferred)


def _summary(reactor: Any, started: float, header: Message, notTransferred: int, transferred: int) -> dict:
    """
    What C{p2pfiles get --json} prints.  C{resumed_from} is the number of
    bytes this run did not fetch again: the bytes already in the part when
    each attempt started, summed over the run's attempts (0 for a download
    that never lost its connection and found no part).
    """
    seconds = max(reactor.seconds() - started, 1e-9)
    return {
        "name": header.name,
        "size": header.size,
        "sha256": header.sha256,
        "seconds": round(seconds, 3),
        "bytes_per_second": int(transferred / seconds),
        "resumed_from": notTransferred,
        "via": [header.leader, header.holder],
    }


async def _alreadyThere(runInThread: Callable[..., Deferred], sink: Any, header: Message) -> bool:
    """
    True if the download we waited for put the very content C{header}
    announces under the final name.
    """
    final = getattr(sink, "final", None)
    if final is None or sink.offset != 0:
        return False
    try:
        digest, size = await runInThread(hashFile, final.path)
    except OSError:
        return False
    return size == header.size and digest == header.sha256


def _giveUp(sink: Any) -> None:
    """
    Stop for good: keep a part that holds bytes (a later run resumes it),
    remove one that holds none.
    """
    if sink.offset == 0:
        sink.discard()
    else:
        sink.close()


async def _pause(
    reactor: Any, attempt: int, giveUpAt: Optional[float], resumeFor: float, error: Exception, sink: Any
) -> Tuple[int, float]:
    now = reactor.seconds()
    if giveUpAt is None:
        giveUpAt = now + resumeFor
    if now >= giveUpAt:
        _giveUp(sink)
        raise error
    await deferLater(reactor, min(0.1 * (attempt + 1), 1.0))
    return attempt + 1, giveUpAt


def _receive(
    reactor: Any,
    connection: Any,
    header: Message,
    sink: Any,
    onProgress: Optional[Callable[[int, int], None]],
    stallTimeout: float,
    runInThread: Callable[..., Deferred],
    writers: Optional[List[SerialWriter]] = None,
) -> Deferred:
    """
    Write the raw section that follows C{header} into C{sink}; fire when it
    is all written.  Writing and hashing run in a thread, in order, while
    the next bytes arrive; the connection is paused while the disk falls
    behind.  A sender that goes quiet for C{stallTimeout} seconds (a hung
    leader keeps its connection open) fails the transfer so that it resumes
    elsewhere.
    """
    done: Deferred = Deferred()
    size = header.size
    received = [header.offset]
    seen = [header.offset]

    def writeFailed(reason: Failure) -> None:
        if not done.called:
            error = reason.value
            done.errback(error if isinstance(error, P2PError) else P2PError(f"cannot write {header.name}: {error}", "io"))
        connection.abort()

    writer = SerialWriter(sink, runInThread, onError=writeFailed)
    if writers is not None:
        writers[:] = [writer]

    def watch() -> None:
        # Time spent waiting for our own disk is not the sender's stall.
        if received[0] == seen[0] and not writer.paused and not done.called:
            done.errback(P2PError(f"no data from {connection.address} for {stallTimeout:g}s", "timeout"))
            connection.close()
        seen[0] = received[0]

    watchdog = LoopingCall(watch)
    watchdog.clock = reactor
    watchdog.start(stallTimeout, now=False)

    def stop(result: Any) -> Any:
        if watchdog.running:
            watchdog.stop()
        if writer.producer is not None:
            writer.unregisterProducer()
        return result

    def write(data: bytes) -> None:
        if done.called:
            return
        received[0] += len(data)
        try:
            writer.write(data)
        except P2PError:
            return
        if onProgress is not None:
            onProgress(received[0], size)

    def finished() -> None:
        if done.called:
            return
        if writer.producer is not None:
            writer.unregisterProducer()
        writer.flush().addCallbacks(
            lambda _: None if done.called else done.callback(None),
            lambda reason: None,
        )

    def lost(error: Exception) -> None:
        if done.called:
            return
        # Keep what reached the disk: wait for the writes in flight.
        writer.flush().addBoth(lambda _: None if done.called else done.errback(error))

    done.addBoth(stop)
    connection.onClose = lost
    connection.receiveRaw(write, finished)
    if not done.called and connection.transport is not None and not writer.producer:
        writer.registerProducer(connection.transport, True)
    return done
