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
  - receiving: each chunk is hashed and written as it arrives.

Whoever registers a producer unregisters it, on success, error and
disconnect alike.
"""

import hashlib
import os
from typing import Any, BinaryIO, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from p2pfiles.atomic import fsyncDirectory
from p2pfiles.client import (
    EXIT_AUTH,
    EXIT_LOCAL,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    EXIT_VERIFY,
    ClientError,
    askLeader,
)
from p2pfiles.names import partName
from p2pfiles.wire import Message

# Bytes read from disk per resumeProducing: large enough that per-chunk
# overhead is small next to the copy, small enough to keep buffers modest.
CHUNK_SIZE = 256 * 1024


class TransferError(Exception):
    """
    A transfer failed; C{code} is one of the node refusal codes (see
    L{p2pfiles.client}) and the string form is a one-line reason.
    """

    def __init__(self, reason: str, code: str = "transfer") -> None:
        super().__init__(reason)
        self.code = code


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
            self._finish(TransferError(f"cannot read file: {e.strerror or e}", "io"))
            return
        if not data:
            self._finish(TransferError(f"file ended {self.remaining} bytes early (changed while sent?)", "io"))
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
            self.done.errback(TransferError(f"receiver went away after {self.sent} bytes", "gone"))

    def _finish(self, error: Optional[Exception]) -> None:
        self.consumer.unregisterProducer()
        self.file.close()
        if error is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(error)


def openForServing(share: FilePath, name: str, size: int, offset: int) -> BinaryIO:
    """
    Open shared file C{name} positioned at C{offset}.  C{FilePath.child}
    refuses any name that would leave the share.
    """
    if offset > size:
        raise TransferError(f"offset {offset} is beyond the size of {name} ({size} bytes)", "bad-offset")
    path = share.child(name)
    f = open(path.path, "rb")
    f.seek(offset)
    return f


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
        L{TransferError}.
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
            self.done.errback(TransferError(f"client went away after {self.relayed} bytes", "gone"))

    def _nextHolder(self, why: Optional[str]) -> None:
        if self.done.called:
            return
        if why is not None:
            self.log.warn("relay of {name} from node {holder}: {why}", name=self.name, holder=self.holder, why=why)
        if not self.holders:
            self._fail(TransferError(f"no live holder of {self.name} could send it", "unavailable"))
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
                raise TransferError(f"node {self.holder} offered other content", "verify")
            if message.offset != position:
                raise TransferError(f"node {self.holder} answered from offset {message.offset}", "protocol")
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
        upstream.rawSink = self._forward
        upstream.rawDone = self._finished
        downstream.transport.registerProducer(upstream.protocol.transport, True)
        self._registered = True
        upstream.protocol.expectRaw(self.size - position)

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

    def _fail(self, error: TransferError) -> None:
        self._unregister()
        self._closeUpstream()
        if not self._headerSent:
            # Still framed: the client gets a clean refusal.
            self.downstream.sendError(error.code, str(error))
        else:
            # Mid-file, no frame can be sent: drop the client, which resumes.
            self.downstream.transport.abortConnection()
        self.done.errback(error)


class PartialFile:
    """
    The receiving end of a download: a hidden C{.NAME.part} file in the
    destination directory, hashed as it is written, renamed to NAME only once
    the whole file is there and its SHA-256 matches.

    A C{.part} left by an earlier attempt is resumed: its bytes are hashed
    again (not fetched again) and the transfer continues from its length.
    """

    log = Logger()

    def __init__(self, directory: FilePath, name: str) -> None:
        self.directory = directory
        self.name = name
        self.final = directory.child(name)
        self.part = directory.child(partName(name))
        self.hasher = hashlib.sha256()
        self.offset = 0
        self._file: Optional[BinaryIO] = None

    def resumeOffset(self) -> int:
        """
        Open (or create) the part file and hash what it already holds.
        Blocking: run it in a thread for large parts.  Returns the offset to
        continue from.
        """
        self.directory.makedirs(ignoreExistingDirectory=True)
        f = open(self.part.path, "ab+")
        f.seek(0)
        hasher = hashlib.sha256()
        offset = 0
        while True:
            data = f.read(1 << 20)
            if not data:
                break
            hasher.update(data)
            offset += len(data)
        self._file = f
        self.hasher = hasher
        self.offset = offset
        return offset

    def restart(self) -> None:
        """
        Throw away what the part holds and start from byte 0.
        """
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def finish(self, sha256: str) -> None:
        """
        All bytes are in: verify, make durable, and put the file in place.
        On a mismatch the part is removed (it cannot be resumed) and
        L{TransferError} is raised; nothing appears under the final name.
        """
        assert self._file is not None
        actual = self.digest()
        if actual != sha256:
            self.discard()
            raise TransferError(
                f"{self.name}: SHA-256 mismatch (expected {sha256[:16]}..., got {actual[:16]}...); nothing saved",
                "verify",
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.part.path, self.final.path)
        fsyncDirectory(self.directory)

    def close(self) -> None:
        """
        Stop writing but keep the part for a later resume.
        """
        if self._file is not None:
            try:
                self._file.flush()
            except OSError:
                pass
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.part.path)
        except FileNotFoundError:
            pass


class StreamSink:
    """
    The receiving end of a download to a stream (C{-o -}): bytes are written
    as they arrive and verified at the end; there is nothing to rename, and a
    resume continues after the bytes already written.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hasher = hashlib.sha256()
        self.offset = 0

    def resumeOffset(self) -> int:
        return self.offset

    def restart(self) -> None:
        if self.offset:
            raise TransferError("cannot restart a download already written to a stream", "io")

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def finish(self, sha256: str) -> None:
        self.stream.flush()
        actual = self.hasher.hexdigest()
        if actual != sha256:
            raise TransferError(f"SHA-256 mismatch (expected {sha256[:16]}..., got {actual[:16]}...)", "verify")

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


# Failures that another attempt cannot cure.
FINAL_EXITS = (EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE, EXIT_VERIFY, EXIT_LOCAL)

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
) -> dict:
    """
    Download C{name} through the leader into C{sink} (a L{PartialFile} or
    L{StreamSink}), asking first the node at C{addresses[0]}.

    If the connection breaks mid-file the download keeps what it has and
    resumes through whichever of C{addresses} leads next, for up to
    C{resumeFor} seconds.  Fires with the summary that C{p2pfiles get --json}
    prints; fails with a L{p2pfiles.client.ClientError}.
    """
    started = reactor.seconds()
    try:
        resumedFrom = await runInThread(sink.resumeOffset)
    except OSError as e:
        raise ClientError(f"cannot write {name}: {e.strerror or e}", EXIT_LOCAL) from None
    expected: Optional[str] = None
    attempt = 0
    giveUpAt: Optional[float] = None
    restarted = False
    while True:
        address = addresses[attempt % len(addresses)]
        request = Message("get", name=name, offset=sink.offset, sha256=expected)
        try:
            connection, header = await askLeader(reactor, address, secret, request, timeout, identity)
        except ClientError as e:
            if e.refusal == "bad-offset" and not restarted:
                # The part is longer than the file: it is not a prefix of it.
                restarted = True
                sink.restart()
                continue
            if e.code in FINAL_EXITS and not (e.code == EXIT_NOT_FOUND and expected is not None):
                _giveUp(sink)
                raise
            # A file we were already receiving can be "not found" for a
            # moment after an election, until the new leader has gathered
            # its holders: keep trying within the resume window.
            attempt, giveUpAt = await _pause(reactor, attempt, giveUpAt, resumeFor, e, sink)
            continue
        if header.type != "file" or header.name != name:
            connection.close()
            sink.close()
            raise ClientError(f"unexpected {header.type} reply to get")
        if expected is None:
            expected = header.sha256
        elif header.sha256 != expected:
            connection.close()
            sink.close()
            raise ClientError(f"{name} changed on the cluster during the download; run the command again", EXIT_VERIFY)
        if header.offset != sink.offset:
            connection.close()
            sink.close()
            raise ClientError(f"the node answered from offset {header.offset}, not {sink.offset}")
        before = sink.offset
        try:
            await _receive(reactor, connection, header, sink, onProgress, timeout)
        except ClientError as e:
            if e.code == EXIT_LOCAL:
                sink.close()
                raise
            if sink.offset > before:
                # It made progress: this loss gets a resume window of its own.
                giveUpAt = None
            attempt, giveUpAt = await _pause(reactor, attempt, giveUpAt, resumeFor, e, sink)
            continue
        finally:
            connection.close()
        try:
            await runInThread(sink.finish, header.sha256)
        except TransferError as e:
            raise ClientError(str(e), EXIT_VERIFY) from None
        except OSError as e:
            sink.close()
            raise ClientError(f"cannot save {name}: {e.strerror or e}", EXIT_LOCAL) from None
        seconds = max(reactor.seconds() - started, 1e-9)
        return {
            "name": name,
            "size": header.size,
            "sha256": header.sha256,
            "seconds": round(seconds, 3),
            "bytes_per_second": int((header.size - resumedFrom) / seconds),
            "resumed_from": resumedFrom,
            "via": [header.leader, header.holder],
        }


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
) -> Deferred:
    """
    Write the raw section that follows C{header} into C{sink}; fire when it
    is all there.  A sender that goes quiet for C{stallTimeout} seconds (a
    hung leader keeps its connection open) fails the transfer so that it
    resumes elsewhere.
    """
    done: Deferred = Deferred()
    size = header.size
    seen = [sink.offset]

    def watch() -> None:
        if sink.offset == seen[0] and not done.called:
            done.errback(ClientError(f"no data from {connection.address} for {stallTimeout:g}s", EXIT_TIMEOUT))
            connection.close()
        seen[0] = sink.offset

    watchdog = LoopingCall(watch)
    watchdog.clock = reactor
    watchdog.start(stallTimeout, now=False)

    def stopWatching(result: Any) -> Any:
        if watchdog.running:
            watchdog.stop()
        return result

    done.addBoth(stopWatching)

    def write(data: bytes) -> None:
        if done.called:
            return
        try:
            sink.write(data)
        except OSError as e:
            done.errback(ClientError(f"cannot write {header.name}: {e.strerror or e}", EXIT_LOCAL))
            connection.close()
            return
        if onProgress is not None:
            onProgress(sink.offset, size)

    def finished() -> None:
        if not done.called:
            done.callback(None)

    def lost(error: Exception) -> None:
        if not done.called:
            done.errback(error)

    connection.rawSink = write
    connection.rawDone = finished
    connection.onClose = lost
    connection.protocol.expectRaw(size - header.offset)
    return done
