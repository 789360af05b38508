"""
Looking at the files of a share, one name at a time (L{observe}), and a
child process that does it for a scan thread (L{ProcessObserver}).

Hashing a share is the bulk of a node's CPU time while it starts: every
file is opened, read, hashed and closed, which at 100,000 small files is
seconds of work.  Done in a thread of the node's process, that work holds
the GIL most of the time, and the reactor thread, which gives the GIL up at
every system call, has to win it back again and again; on a machine whose
cores other processes keep busy each time may wait until the holder is
scheduled again, and heartbeats go out late.  Done in a child process, it
holds no lock the reactor needs, and the child runs at a lower CPU priority
(C{nice} L{WORKER_NICE}): when the cores are short, the kernel runs the
nodes' reactor threads first.

The scan thread hands the child the names to look at in batches of
L{BATCH}, each with the signature its cached hash was taken at, and reads
back one observation per name while the child goes on with the next batch:
the child hashes while the scan thread builds entries.  The child is ours,
started from our own interpreter, so the batches are pickled.

This module imports nothing but the standard library: the child runs this
file alone, and starts in a few tens of milliseconds.
"""

import errno
import hashlib
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO, Callable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "BATCH", "GONE", "HASH_TRIES", "MAX_WORKERS", "ProcessObserver", "UNSTABLE", "WORKER_NICE", "WorkerFailed",
    "hashOpened", "observe",
]

# A file that keeps changing while we hash it is given up on after this many
# tries; the next scan tries again.
HASH_TRIES = 3

# Files up to this size are read with one read() call.
CHUNK = 1 << 20

# How much lower than the node the child runs (0 to 19): enough that the
# kernel prefers any node's reactor thread to any hashing.
WORKER_NICE = 10

# Children at most: hashing small files is one core's work per child.
MAX_WORKERS = 2

# Names per request to the child: large enough that a request costs little
# per name, small enough that the scan thread has the first answers soon.
BATCH = 256

# (size, st_mtime_ns, st_ino): what must be unchanged for a hash to hold.
Signature = Tuple[int, int, int]

# What L{observe} finds for one name: ("file", size, mtime_ns, inode, mtime,
# sha256 or None when the cached hash holds), ("problem", reason, signature,
# is_os_error), GONE (not shared, nothing to say) or UNSTABLE (it kept
# changing while being hashed).
Observation = Tuple[Any, ...]
GONE: Observation = ("gone",)
UNSTABLE: Observation = ("unstable",)

_LENGTH = struct.Struct("!I")


class WorkerFailed(Exception):
    """
    The child process could not be started, or stopped answering.
    """


def hashOpened(path: str, size: int) -> Tuple[str, int, os.stat_result]:
    """
    Hash the file at C{path}, expected to hold C{size} bytes, and return its
    SHA-256 (hex), the bytes read, and the C{fstat} of the file read, taken
    after reading: what the hash describes.  A final symlink is not followed
    (C{O_NOFOLLOW}).  A file of the expected size is read with a single
    C{read()}; a larger one C{CHUNK} bytes at a time.  Blocks: call it in a
    thread.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if size < CHUNK:
            data = os.read(fd, size + 1)
            digest = hashlib.sha256(data)
            length = len(data)
            # A regular file reads short only at its end, so no more than
            # size bytes means we are at the end: one read() does.  (Had the
            # file changed, the caller sees it in the length or the fstat.)
            more = length > size
        else:
            digest, length, more = hashlib.sha256(), 0, True
        if more:
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while True:
                n = os.readv(fd, [buffer])
                if not n:
                    break
                digest.update(view[:n])
                length += n
        return digest.hexdigest(), length, os.fstat(fd)
    finally:
        os.close(fd)


def signatureOf(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def problemSignature(reason: str, path: bytes) -> Tuple[Any, ...]:
    """
    What identifies a problem with C{path}: the reason and the file as it
    is, so that it is reported again only when either changes.
    """
    try:
        return (reason,) + signatureOf(os.lstat(path))
    except OSError:
        return (reason,)


def observe(
    sharePath: bytes,
    shareReal: bytes,
    name: str,
    cached: Optional[Signature],
    hasher: Callable[[str, int], Tuple[str, int, os.stat_result]] = hashOpened,
) -> Observation:
    """
    Look at the file C{name} (a valid, visible name) of the share at
    C{sharePath} (whose real path is C{shareReal}), and hash it unless its
    signature is C{cached}.  A symlink counts only if it leads to a visible
    file directly in the share.  A file that changes while it is read is
    read again, up to L{HASH_TRIES} times.  Blocks.
    """
    path = os.path.join(sharePath, os.fsencode(name))
    try:
        st = os.lstat(path)
        target = path
        if stat.S_ISLNK(st.st_mode):
            # Only a link to a visible file directly in the share is
            # followed: a link must not publish anything the share would not.
            target = os.path.realpath(path)
            if os.path.dirname(target) != shareReal or os.path.basename(target).startswith(b"."):
                reason = "symlink does not lead to a visible file in the share"
                return ("problem", reason, problemSignature(reason, path), False)
            st = os.lstat(target)
        for attempt in range(HASH_TRIES):
            if attempt:
                st = os.lstat(target)
            if not stat.S_ISREG(st.st_mode):
                return GONE  # directories, devices, fifos: silently not shared
            signature = signatureOf(st)
            if signature == cached:
                return ("file",) + signature + (st.st_mtime, None)
            try:
                digest, length, after = hasher(os.fsdecode(target), signature[0])
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # it became a symlink while we looked: look again
                raise
            if signatureOf(after) != signature or length != signature[0]:
                continue  # changed while we read it
            return ("file",) + signature + (st.st_mtime, digest)
        return UNSTABLE
    except FileNotFoundError:
        return GONE  # removed while we looked at it: the next scan agrees
    except OSError as e:
        reason = e.strerror or str(e)
        return ("problem", reason, problemSignature(reason, path), True)


# The child.


def _readFrame(stream: BinaryIO) -> Optional[bytes]:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        return None
    return data


def _writeFrame(stream: BinaryIO, data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """
    The child's loop: read a request C{(sharePath, shareReal, [(name,
    cached), ...])}, answer with the list of observations, until the end of
    C{requests}.
    """
    while True:
        request = _readFrame(requests)
        if request is None:
            return
        sharePath, shareReal, items = pickle.loads(request)
        answer = [observe(sharePath, shareReal, name, cached) for name, cached in items]
        _writeFrame(answers, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))


def main(argv: Sequence[str]) -> None:
    """
    C{python -I scanworker.py NICE}: lower our priority by NICE and serve
    requests on standard input.  The node ends the child by closing
    its input; signals sent to the node's process group (Ctrl-C, a service
    manager's SIGTERM) are the node's to act on, so the child ignores them.
    """
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    try:
        # A batch task: the kernel never lets its wake-ups preempt others,
        # and lets the reactor threads of the nodes preempt it.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux
    try:
        os.nice(int(argv[0]) if argv else WORKER_NICE)
    except OSError:
        pass
    serve(sys.stdin.buffer, sys.stdout.buffer)


# The scan thread's side.


class ProcessObserver:
    """
    Child processes that run L{observe} for a scan thread, each on every
    C{workers}-th batch, so that the share is hashed on as many cores.
    One scan at a time uses them (scans never overlap); they are started at
    the first scan and kept for the next ones, and started again if one
    died.

    @param workers: how many children; by default one per core, at most
        L{MAX_WORKERS}.
    @param command: a child's command line; by default this interpreter
        running this file at C{nice}.
    """

    def __init__(
        self, nice: int = WORKER_NICE, batch: int = BATCH, command: Optional[Sequence[str]] = None,
        workers: Optional[int] = None,
    ) -> None:
        if command is None:
            # This file run as a script, isolated (-I: no environment, no
            # user site, nothing prepended to the path): it needs the
            # standard library alone, so the child runs this very code
            # whatever the path says.
            command = [sys.executable, "-I", os.path.abspath(__file__), str(nice)]
        self.command = list(command)
        self.batch = batch
        self.workers = workers if workers is not None else max(1, min(MAX_WORKERS, os.cpu_count() or 1))
        self._processes: List[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False

    def pids(self) -> List[int]:
        """
        The process ids of the children running now.
        """
        return [p.pid for p in self._processes if p.poll() is None]

    def start(self) -> None:
        """
        Start the children now if they are not running, so that they get
        ready while the scan thread lists the share.  Raises
        L{WorkerFailed} if they cannot be started.  Blocks briefly.
        """
        with self._lock:
            self._children()

    def _children(self) -> List[subprocess.Popen]:
        if self._closed:
            raise WorkerFailed("the scan worker was closed")
        if len(self._processes) == self.workers and all(p.poll() is None for p in self._processes):
            return self._processes
        self._stopAll()
        try:
            for _ in range(self.workers):
                self._processes.append(
                    subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
                )
        except OSError as e:
            self._stopAll()
            raise WorkerFailed(f"cannot start the scan worker: {e}") from None
        return self._processes

    def observeAll(self, sharePath: bytes, shareReal: bytes, items: List[Tuple[str, Optional[Signature]]]) -> Iterator[Observation]:
        """
        Yield L{observe}'s answer for each of C{items} (C{(name, cached
        signature)}), in order.  Raises L{WorkerFailed} if a child dies or
        cannot be started; what was yielded until then holds.  Blocks: call
        it in a thread.
        """
        with self._lock:
            children = self._children()
            batches = [items[i:i + self.batch] for i in range(0, len(items), self.batch)]

            def feed() -> None:
                # Requests go in from a thread of their own, in order, so
                # that every child has its next batch while we read an
                # answer, and neither side can block the other on a full
                # pipe (we always wait for the oldest batch, which was sent).
                try:
                    for k, batch in enumerate(batches):
                        stdin = children[k % len(children)].stdin
                        assert stdin is not None
                        _writeFrame(stdin, pickle.dumps((sharePath, shareReal, batch), protocol=pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):
                    pass  # the child died: the reader finds out

            feeder = threading.Thread(target=feed, name="scan-worker-feeder", daemon=True)
            feeder.start()
            try:
                for k, batch in enumerate(batches):
                    child = children[k % len(children)]
                    assert child.stdout is not None
                    answer = _readFrame(child.stdout)
                    if answer is None:
                        raise WorkerFailed(f"the scan worker stopped (exit status {child.poll()})")
                    observations = pickle.loads(answer)
                    if len(observations) != len(batch):
                        raise WorkerFailed("the scan worker answered out of step")
                    yield from observations
            except BaseException:
                # Out of step with the children (or abandoned by our
                # caller): start afresh next time.
                self._stopAll()
                raise
            finally:
                feeder.join()

    def _stopAll(self) -> None:
        processes, self._processes = self._processes, []
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass

    def close(self, timeout: float = 5.0) -> None:
        """
        Stop the children (each ends at the end of its input).  Blocks up to
        C{timeout} seconds, then kills them.
        """
        self._closed = True
        with self._lock:
            for process in self._processes:
                try:
                    if process.stdin is not None:
                        process.stdin.close()
                except OSError:
                    pass
            for process in self._processes:
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._stopAll()


if __name__ == "__main__":
    main(sys.argv[1:])
