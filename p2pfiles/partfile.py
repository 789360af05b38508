"""
Files on disk at both ends of a transfer, opened so that nothing else can
slip in between: the receiving side's hidden part file and the serving side's
shared file.

Receiving (L{PartialFile}): a download of NAME is written to a hidden part
(see L{p2pfiles.names.partName}) and renamed to NAME only once its SHA-256
matches.  The part is
  - ours: created with C{O_EXCL|O_NOFOLLOW}, mode 0600; an existing one is
    resumed only if it is a regular file with no other link, so a planted
    symlink or hard link is refused, never written through;
  - written by one download at a time: an exclusive C{flock} on the open
    part, across processes; a second download of the same destination gets
    L{PartBusy};
  - exactly what was hashed: bytes are hashed as they reach the file, and
    before the rename the part's name must still lead to the file we hold,
    of the length we hashed.
A write error (disk full) leaves a part that a later attempt resumes.

L{SerialWriter} moves that writing and hashing off the reactor thread, one
job at a time, pausing the sender while too much is queued.

Serving (L{openShared}): a shared file is opened only if it is still the file
the index hashed, so a file swapped for a symlink (or anything else) between
scans is refused rather than served.

Everything here but L{SerialWriter} and L{waitForPart} blocks: run it in a
thread.
"""

import errno
import fcntl
import hashlib
import os
import stat
from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from p2pfiles.errors import P2PError
from p2pfiles.atomic import fsyncDirectory
from p2pfiles.names import nameProblem, partName
from p2pfiles.waiting import Waiters

__all__ = [
    "PartError",
    "PartBusy",
    "PartialFile",
    "StreamSink",
    "SerialWriter",
    "waitForPart",
    "removeStaleParts",
    "openShared",
]

# Bytes read at a time when hashing the prefix of a resumed part.
READ_CHUNK = 1 << 20

# How often opening a part starts again because its name moved to another
# file between open and lock (another download finished or gave up then).
OPEN_TRIES = 5

# SerialWriter: pause the sender above this many queued bytes...
HIGH_WATER = 8 * 1024 * 1024
# ...and resume it below this many.
LOW_WATER = 2 * 1024 * 1024

_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo or device put where a file should be must not hang us.
_REOPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_SERVE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


# Errors here are the system's one error type; the name says where they come
# from.
PartError = P2PError


class PartBusy(PartError):
    """
    Another download (in this process or another) is writing C{part}.
    """

    def __init__(self, part: FilePath) -> None:
        super().__init__(f"{part.path} is being written by another download", "busy")
        self.part = part


def _osError(what: str, path: str, e: OSError) -> PartError:
    return PartError(f"{what} {path}: {e.strerror or e}", "io")


def _sameFile(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _umask() -> int:
    """
    The process umask, read without changing it (C{os.umask} sets it for
    every thread at once); 022 where it cannot be read.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


class PartialFile:
    """
    The receiving end of a download: a hidden part in C{directory}, hashed
    as it is written, renamed to C{name} only once complete and verified.

    A part left by an earlier attempt is resumed: its bytes are hashed again
    (not fetched again) and the download continues from its length.

    @ivar final: where the verified file goes.
    @ivar part: the hidden part file.
    @ivar offset: how many bytes the part holds (all of them hashed).
    """

    def __init__(
        self,
        directory: FilePath,
        name: str,
        osWrite: Callable[[int, Any], int] = os.write,
    ) -> None:
        """
        @param osWrite: C{os.write}; replaceable so that tests can fail it.
        """
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise PartError(f"bad file name {name!r}: not a single path segment", "bad-name")
        try:
            hidden = partName(name)
        except UnicodeEncodeError:
            raise PartError(f"bad file name {name!r}: not valid UTF-8", "bad-name") from None
        self.directory = directory
        self.name = name
        self.final = directory.child(name)
        self.part = directory.child(hidden)
        self.hasher = hashlib.sha256()
        self.offset = 0
        self._osWrite = osWrite
        self._fd: Optional[int] = None

    def resumeOffset(self) -> int:
        """
        Create the part, or open and lock an existing one and hash what it
        holds.  Returns the offset to continue from.

        @raise PartBusy: another download holds the part.
        @raise PartError: the part is not a plain file of ours (a symlink, a
            hard link, a directory...), or cannot be opened or read.
        """
        if self._fd is not None:
            return self.offset
        path = self.part.path
        try:
            self.directory.makedirs(ignoreExistingDirectory=True)
        except OSError as e:
            raise _osError("cannot create", self.directory.path, e) from None
        for _ in range(OPEN_TRIES):
            fd = self._openLocked(path)
            if fd is not None:
                break
        else:
            raise PartError(f"cannot open {path}: it keeps being replaced", "io")
        try:
            hasher = hashlib.sha256()
            offset = 0
            os.lseek(fd, 0, os.SEEK_SET)
            while True:
                data = os.read(fd, READ_CHUNK)
                if not data:
                    break
                hasher.update(data)
                offset += len(data)
        except OSError as e:
            os.close(fd)
            raise _osError("cannot read", path, e) from None
        self._fd = fd
        self.hasher = hasher
        self.offset = offset
        return offset

    def _openLocked(self, path: str) -> Optional[int]:
        """
        Open and lock the part; L{None} if its name moved to another file
        meanwhile (try again).
        """
        try:
            fd = os.open(path, _CREATE, 0o600)
        except FileExistsError:
            try:
                fd = os.open(path, _REOPEN)
            except FileNotFoundError:
                return None  # removed since: create it
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise PartError(f"refusing {path}: it is a symbolic link", "io") from None
                raise _osError("cannot open", path, e) from None
        except OSError as e:
            raise _osError("cannot create", path, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PartBusy(self.part) from None
            except OSError as e:
                raise _osError("cannot lock", path, e) from None
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                raise PartError(f"refusing {path}: it is not a regular file", "io")
            try:
                named = os.lstat(path)
            except FileNotFoundError:
                named = None
            if named is None or not _sameFile(named, held):
                # The download that held it renamed or removed it while we
                # waited for the lock.
                os.close(fd)
                return None
            if held.st_nlink != 1:
                raise PartError(f"refusing {path}: it has other hard links", "io")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def restart(self) -> None:
        """
        Throw away what the part holds and start from byte 0.
        """
        fd = self._open()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as e:
            raise _osError("cannot truncate", self.part.path, e) from None
        self.hasher = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the part.  On an error, what did reach the file is
        hashed and counted, so the part stays resumable.
        """
        fd = self._open()
        view = memoryview(data)
        while view:
            try:
                written = self._osWrite(fd, view)
            except OSError as e:
                raise _osError("cannot write", self.part.path, e) from None
            if written <= 0:
                raise PartError(f"cannot write {self.part.path}: nothing was written", "io")
            self.hasher.update(view[:written])
            self.offset += written
            view = view[written:]

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def finish(self, sha256: str, size: Optional[int] = None) -> None:
        """
        All bytes are in: verify, make durable, check that the part's name
        still leads to the file we wrote, rename it into place and make that
        durable.

        On a mismatch (of the SHA-256, or of C{size} if given) the part is
        removed (it cannot be resumed) and L{PartError} with code "verify" is
        raised; nothing appears under the final name.  Other failures raise
        L{PartError} with code "io" and keep the part.
        """
        fd = self._open()
        actual = self.digest()
        if size is not None and size != self.offset:
            self.discard()
            raise PartError(f"{self.name}: got {self.offset} bytes, not {size}; nothing saved", "verify")
        if actual != sha256:
            self.discard()
            raise PartError(
                f"{self.name}: SHA-256 mismatch (expected {sha256[:16]}..., got {actual[:16]}...); nothing saved",
                "verify",
            )
        path = self.part.path
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
            held = os.fstat(fd)
            named = os.lstat(path)
        except OSError as e:
            self.close()
            raise _osError("cannot save", path, e) from None
        if not _sameFile(held, named) or held.st_size != self.offset or held.st_nlink != 1:
            self.close()
            raise PartError(f"cannot save {path}: it was changed by something else during the download", "io")
        try:
            os.replace(path, self.final.path)
            fsyncDirectory(self.directory)
        except OSError as e:
            self.close()
            raise _osError("cannot save", self.final.path, e) from None
        # Only now let the next download of this name have the lock: it
        # finds the name gone and starts a new part.
        self.close()

    def close(self) -> None:
        """
        Stop writing but keep the part for a later resume; let another
        download have it.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """
        Close and remove the part, if this object holds it.  A part held by
        another download, or never opened here, is left alone.
        """
        fd = self._fd
        if fd is None:
            return
        try:
            if _sameFile(os.lstat(self.part.path), os.fstat(fd)):
                os.unlink(self.part.path)
        except FileNotFoundError:
            pass
        finally:
            self.close()

    def _open(self) -> int:
        if self._fd is None:
            raise PartError(f"{self.part.path} is not open", "io")
        return self._fd


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
            raise PartError("cannot restart a download already written to a stream", "io")

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except OSError as e:
            raise PartError(f"cannot write the output: {e.strerror or e}", "io") from None
        self.hasher.update(data)
        self.offset += len(data)

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def finish(self, sha256: str, size: Optional[int] = None) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise PartError(f"cannot write the output: {e.strerror or e}", "io") from None
        actual = self.digest()
        if size is not None and size != self.offset:
            raise PartError(f"got {self.offset} bytes, not {size}", "verify")
        if actual != sha256:
            raise PartError(f"SHA-256 mismatch (expected {sha256[:16]}..., got {actual[:16]}...)", "verify")

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


async def waitForPart(
    clock: Any,
    runInThread: Callable[..., Deferred],
    sink: Any,
    timeout: float,
    interval: float = 1.0,
) -> int:
    """
    C{sink.resumeOffset()} (in a thread), trying again every C{interval}
    seconds while another download holds the part, for up to C{timeout}
    seconds.  Fires with the offset; fails with L{PartBusy} if the part is
    still busy then, or with what C{resumeOffset} raised.
    """
    giveUpAt = clock.seconds() + timeout
    while True:
        try:
            offset: int = await runInThread(sink.resumeOffset)
            return offset
        except PartBusy:
            if clock.seconds() + interval > giveUpAt:
                raise
        await deferLater(clock, interval)


@implementer(IConsumer)
class SerialWriter:
    """
    Write a download's bytes in a thread, in order, without holding up the
    reactor: each C{write} queues its bytes; one thread job at a time writes
    all that is queued (bytes that arrive meanwhile go in the next job).

    As a consumer it pauses its registered (push) producer when more than
    C{highWater} bytes wait to be written, and resumes it once fewer than
    C{lowWater} do.

    After a write fails nothing more is written: later C{write}s raise
    L{PartError}, C{flush} fails with the error, and C{onError} (if given)
    is called with it once, on the reactor thread, so that the caller can
    drop the sender at once (a paused sender would otherwise just go quiet).
    """

    def __init__(
        self,
        target: Any,
        runInThread: Callable[..., Deferred],
        highWater: int = HIGH_WATER,
        lowWater: int = LOW_WATER,
        onError: Optional[Callable[[Failure], None]] = None,
    ) -> None:
        """
        @param target: has a blocking C{write(bytes)}, such as a
            L{PartialFile}.
        """
        if not 0 <= lowWater <= highWater:
            raise ValueError("lowWater must be between 0 and highWater")
        self.target = target
        self.runInThread = runInThread
        self.highWater = highWater
        self.lowWater = lowWater
        self.onError = onError
        self.producer: Optional[IPushProducer] = None
        self.paused = False
        # Bytes accepted but not yet written (queued or in the running job).
        self.pending = 0
        self._queue: List[bytes] = []
        self._writing = False
        self._failure: Optional[Failure] = None
        self._flushWaiters = Waiters()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self.producer!r} is registered")
        if not streaming:
            raise ValueError("SerialWriter takes push (streaming) producers only")
        self.producer = producer
        self.paused = False
        self._pauseIfFull()

    def unregisterProducer(self) -> None:
        """
        Forget the producer, resuming it first if we paused it: it is never
        left paused by us.
        """
        producer, self.producer = self.producer, None
        if producer is not None and self.paused:
            self.paused = False
            producer.resumeProducing()

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            error = self._failure.value
            code = error.code if isinstance(error, PartError) else "io"
            raise PartError(f"not writing after an earlier error: {error}", code)
        if not data:
            return
        self._queue.append(bytes(data))
        self.pending += len(data)
        self._pauseIfFull()
        self._next()

    def flush(self) -> Deferred:
        """
        Fires when every byte written so far is written to the target, or
        fails with the first error.
        """
        if self._failure is not None:
            return fail(self._failure)
        if not self._writing and not self._queue:
            return succeed(None)
        return self._flushWaiters.wait()

    def _pauseIfFull(self) -> None:
        if self.producer is not None and not self.paused and self.pending > self.highWater:
            self.paused = True
            self.producer.pauseProducing()

    def _next(self) -> None:
        if self._writing or not self._queue or self._failure is not None:
            return
        chunks, self._queue = self._queue, []
        self._writing = True
        d = self.runInThread(self._writeAll, chunks)
        d.addCallbacks(self._written, self._failed, callbackArgs=(sum(map(len, chunks)),))

    def _writeAll(self, chunks: Sequence[bytes]) -> None:
        # In a thread: nothing else touches the target meanwhile.
        for chunk in chunks:
            self.target.write(chunk)

    def _written(self, ignored: object, length: int) -> None:
        self._writing = False
        self.pending -= length
        if self.paused and self.producer is not None and self.pending < self.lowWater:
            self.paused = False
            self.producer.resumeProducing()
        if self._queue:
            self._next()
            return
        self._flushWaiters.fire(None)

    def _failed(self, failure: Failure) -> None:
        self._writing = False
        self._failure = failure
        self._queue = []
        self.pending = 0
        self._flushWaiters.fire(failure)
        if self.onError is not None:
            self.onError(failure)


def removeStaleParts(directory: FilePath, maxAge: float, now: float) -> List[str]:
    """
    Remove hidden C{*.part} files in C{directory} not modified for more than
    C{maxAge} seconds before C{now}, and return their names, sorted.

    Only regular files are removed: never a symlink (nor what it leads to),
    a directory, or a part a download holds (locked).  Anything that cannot
    be looked at or removed is left alone.  Blocks: run it in a thread.
    """
    try:
        names = os.listdir(directory.path)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        if not (name.startswith(".") and name.endswith(".part")):
            continue
        path = os.path.join(directory.path, name)
        try:
            if _removeIfStale(path, maxAge, now):
                removed.append(name)
        except OSError:
            pass  # gone meanwhile, or not ours to remove
    return removed


def _removeIfStale(path: str, maxAge: float, now: float) -> bool:
    named = os.lstat(path)
    if not stat.S_ISREG(named.st_mode) or now - named.st_mtime <= maxAge:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a download is writing it
        held = os.fstat(fd)
        # Still the same old file (not replaced or written since we looked)?
        if not _sameFile(held, os.lstat(path)) or now - held.st_mtime <= maxAge:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _identity(expected: Any) -> Tuple[int, int, Optional[int]]:
    """
    (size, mtime_ns, inode or None) from a tuple or an object with those
    attributes.
    """
    if isinstance(expected, tuple):
        size, mtimeNs = expected[0], expected[1]
        inode = expected[2] if len(expected) > 2 else None
        return size, mtimeNs, inode
    return expected.size, expected.mtime_ns, getattr(expected, "inode", None)


def openShared(share: FilePath, name: str, expected: Any, offset: int = 0) -> BinaryIO:
    """
    Open shared file C{name} for serving, positioned at C{offset}, only if
    it is still the file that was indexed.

    C{name} may be a symlink whose target is a visible file directly in the
    share (the rule of L{p2pfiles.localindex}); the target is opened without
    following any further link, and must be a regular file whose size,
    C{st_mtime_ns} and (if given) inode are those of C{expected}: a tuple
    C{(size, mtime_ns[, inode])} or an object with C{size}, C{mtime_ns} and
    optionally C{inode}, such as C{LocalIndex.signature(name)}.

    @raise PartError: code "bad-name" for a name that is not a shared name,
        "bad-offset" for an offset beyond the indexed size (checked before
        anything is opened), "changed" if the file is not the indexed one
        any more, "not-found" if it is gone or cannot be opened.
    """
    problem = nameProblem(name)
    if problem is not None:
        raise PartError(f"bad file name {name!r}: {problem}", "bad-name")
    size, mtimeNs, inode = _identity(expected)
    if offset > size:
        raise PartError(f"offset {offset} is beyond the size of {name} ({size} bytes)", "bad-offset")
    changed = PartError(f"{name} changed since it was indexed; try again", "changed")
    shareReal = os.path.realpath(share.path)
    path = os.path.join(share.path, name)
    leaf = name
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            target = os.path.realpath(path)
            if os.path.dirname(target) != shareReal or os.path.basename(target).startswith("."):
                raise changed
            leaf = os.path.basename(target)
        # The share's own path is resolved once; the file is opened in it,
        # and a link put in its place meanwhile is refused (ELOOP).
        directoryFd = os.open(shareReal, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(leaf, _SERVE, dir_fd=directoryFd)
        finally:
            os.close(directoryFd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise changed from None
        raise PartError(f"cannot open {name}: {e.strerror or e}", "not-found") from None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != size
            or st.st_mtime_ns != mtimeNs
            or (inode is not None and st.st_ino != inode)
        ):
            raise changed
        os.set_blocking(fd, True)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
