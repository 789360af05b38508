"""
Writing C{peer_files.log}: L{writeLog} streams a snapshot of the cluster
index (L{p2pfiles.index}) into the file, atomically; L{LogCache} remembers
what the last log holds so that the next one copies what did not change;
L{LogWriter} keeps the file current on disk, one write at a time, promptly
after each change.

The format and the lines are L{p2pfiles.index}'s (L{logChunks}); this module
only decides when and how they reach the disk.  Time and threads are handed
in by the caller.
"""

import bisect
import json
import os
from itertools import islice
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.atomic import atomicWrite, fsyncDirectory
from p2pfiles.index import LINES_PER_WRITE, IndexView, formatLine, headerOf, linePrefix, logChunks, sortedItems
from p2pfiles.packed import differences
from p2pfiles.runtime import trimAllocator
from p2pfiles.waiting import Waiters

__all__ = ["LogCache", "LogContent", "LogWriter", "writeLog"]


def writeLog(
    path: FilePath, snapshot: IndexView, leader: int, epoch: int, now: float, cache: Optional["LogCache"] = None,
    versions: Optional[Dict[int, Tuple[str, str, int]]] = None,
) -> None:
    """
    Replace C{path} with the log of C{snapshot} (the bytes of L{renderLog}),
    atomically and durably, never holding the whole text: about 1 MiB at a
    time into a temporary file beside it, fsynced, renamed over C{path}, the
    rename fsynced (as L{atomicWrite} does).  Blocks: run it in a thread, on
    an L{IndexSnapshot}.  If writing fails the temporary file is removed.

    With a C{cache} (see L{LogCache}) the pieces of the last log written
    with it that no change touched are copied from that file, not made
    again; C{versions} says which change of each node the log shows (see
    L{LogCache.keep}).
    """
    directory = path.parent()
    temporary = directory.child("." + path.basename() + ".tmp")
    fd = os.open(temporary.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if cache is None:
            for chunk in logChunks(snapshot, leader, epoch, now, LINES_PER_WRITE):
                _writeAll(fd, chunk)
        else:
            cache.write(fd, snapshot, headerOf(snapshot, leader, epoch, now))
        os.fsync(fd)
    except BaseException:
        if cache is not None:
            cache.forget()
        os.close(fd)
        os.unlink(temporary.path)
        raise
    if cache is None:
        os.close(fd)
    else:
        cache.keep(temporary, versions)
    os.replace(temporary.path, path.path)
    fsyncDirectory(directory)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


Key = Tuple[str, int]


class LogCache:
    """
    What the last C{peer_files.log} written holds, so that the next write
    copies what did not change instead of making every line again: a log of
    300,000 lines costs about half a second of the interpreter to make, and
    a copy costs the kernel a few milliseconds.

    The cache keeps the file it wrote open (so that it reads exactly that,
    whatever happens to the path since), the maps of the snapshot it shows
    (which the index never changes once a snapshot saw them), and where each
    piece of about L{LINES_PER_WRITE} lines begins and ends with the key
    (name, node) of its last line.  Each piece holds the keys after the last
    key of the piece before it, up to its own (the last piece: all after).
    A write works out which (name, node) lines differ, by comparing each
    node's map with the one shown (at once when it is the same map), makes
    again only the pieces those keys fall in, and copies the others.  When
    much changed it writes everything afresh.  Memory: a few words per
    piece, and the maps of the last log, shared with the index until they
    change.

    Used by one write at a time (L{LogWriter} sees to it), in its thread.

    With a C{keepPath}, the cache outlives the process: each log written
    is also linked as C{keepPath} (the same file, no copy), and beside it,
    in C{keepPath + ".json"}, go its pieces and which change (address,
    incarnation, seq) of each node it shows.  After a restart, L{prime}
    takes that log back for the maps of those very changes (a change
    number names one list of files only), so that the first log written
    copies instead of making 300,000 lines again.
    """

    def __init__(self, keepPath: Optional[FilePath] = None) -> None:
        self._fd: Optional[int] = None
        self._maps: Dict[int, Tuple[Mapping[str, bytes], str]] = {}
        self._pieces: List[Tuple[Key, int, int]] = []
        self._keepPath = keepPath
        # How many nodes the kept log shows.
        self._keptNodes = 0
        # How many lines each write made again (for tests and benchmarks).
        self.made = 0

    def keep(self, written: FilePath, versions: Optional[Dict[int, Tuple[str, str, int]]]) -> None:
        """
        Link C{written} (the log just written with this cache, not yet
        renamed into place) as C{keepPath}, with what L{prime} needs beside
        it; when C{versions} is L{None} (some node's change is not known)
        nothing is kept.  A log of fewer nodes than the one kept does not
        replace it: as a cluster stops, the leader's last logs lose the
        members that stopped first, and the log worth keeping is the one
        that showed them all.  Best effort: a cache that cannot be kept
        costs only time after a restart.
        """
        if self._keepPath is None:
            return
        sidecar = self._keepPath.siblingExtension(".json")
        try:
            if versions is not None and len(versions) < self._keptNodes:
                return
            if versions is None or set(versions) != set(self._maps):
                self._keptNodes = 0
                if sidecar.exists():
                    sidecar.remove()
                return
            link = self._keepPath.siblingExtension(".tmp")
            if link.exists():
                link.remove()
            os.link(written.path, link.path)
            st = os.stat(link.path)
            os.replace(link.path, self._keepPath.path)
            data = {
                "inode": st.st_ino,
                "size": st.st_size,
                "nodes": [[node, *versions[node]] for node in sorted(versions)],
                "pieces": [[name, node, begin, end] for (name, node), begin, end in self._pieces],
            }
            temporary = sidecar.siblingExtension(".tmp")
            fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _writeAll(fd, json.dumps(data).encode("ascii"))
            finally:
                os.close(fd)
            os.replace(temporary.path, sidecar.path)
            self._keptNodes = len(versions)
        except OSError:
            pass

    def prime(self, maps: Dict[int, Tuple[Mapping[str, bytes], str, str, int]]) -> bool:
        """
        Take back the log kept by the last process (see L{keep}) if it
        shows, for every node, exactly the change of C{maps} (node -> its
        files, address, incarnation, seq); return whether it did.  The next
        write then copies what did not change since.
        """
        if self._keepPath is None or self._fd is not None:
            return False
        try:
            data = json.loads(self._keepPath.siblingExtension(".json").getContent())
            nodes = {node: (address, incarnation, seq) for node, address, incarnation, seq in data["nodes"]}
            self._keptNodes = len(nodes)
            if any(node not in maps or tuple(maps[node][1:]) != version for node, version in nodes.items()):
                return False
            pieces = [((name, node), begin, end) for name, node, begin, end in data["pieces"]]
            fd = os.open(self._keepPath.path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, TypeError, KeyError):
            return False
        st = os.fstat(fd)
        if (st.st_ino, st.st_size) != (data["inode"], data["size"]) or not pieces:
            os.close(fd)
            return False
        self._fd = fd
        self._maps = {node: (maps[node][0], maps[node][1]) for node in nodes}
        self._pieces = pieces
        return True

    def forget(self) -> None:
        """
        Drop what is known: the next write makes every line.
        """
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._maps = {}
        self._pieces = []

    def write(self, fd: int, view: IndexView, header: bytes) -> None:
        """
        Write C{header} and the data lines of C{view} to C{fd} (open for
        reading and writing, empty), which then becomes the file this cache
        copies from; the caller must not close it.
        """
        maps = {node: (view.nodeFiles(node), view.address(node)) for node in view.nodes()}
        dirty = self._dirty(maps)
        _writeAll(fd, header)
        start = len(header)
        if dirty is None:
            pieces = self._writeAll(fd, view, start)
        else:
            pieces = self._writeChanged(fd, maps, dirty, start)
        self.forget()
        self._fd, self._maps, self._pieces = fd, maps, pieces

    def _dirty(self, maps: Dict[int, Tuple[Mapping[str, bytes], str]]) -> Optional[Dict[Key, Optional[str]]]:
        """
        The lines that differ from the last log's: (name, node) -> the new
        line, or L{None} if it goes.  L{None} when there is no last log or
        so much changed that writing afresh is cheaper.
        """
        if self._fd is None or not self._pieces:
            return None
        total = sum(len(files) for files, address in maps.values())
        limit = max(1000, total // 8)
        dirty: Dict[Key, Optional[str]] = {}
        for node in sorted(set(maps) | set(self._maps)):
            new, address = maps.get(node, ({}, ""))
            old, oldAddress = self._maps.get(node, ({}, ""))
            if new is old and address == oldAddress:
                continue
            if address != oldAddress and old and new:
                return None  # every line of the node changes
            prefix = linePrefix(node, address)
            for name, record in differences(old, new):
                dirty[(name, node)] = None if record is None else formatLine(prefix, name, record)
                if len(dirty) > limit:
                    return None
        return dirty

    def _writeAll(self, fd: int, view: IndexView, start: int) -> List[Tuple[Key, int, int]]:
        pieces = []
        prefixes = {node: linePrefix(node, view.address(node)) for node in view.nodes()}
        items = sortedItems(view)
        line = formatLine
        position = start
        while True:
            batch = list(islice(items, LINES_PER_WRITE))
            if not batch:
                break
            data = "".join([line(prefixes[node], name, record) for name, node, record in batch]).encode("utf-8")
            _writeAll(fd, data)
            pieces.append((batch[-1][:2], position, position + len(data)))
            position += len(data)
            self.made += len(batch)
        return pieces

    def _writeChanged(self, fd: int, maps: Any, dirty: Dict[Key, Optional[str]], start: int) -> List[Tuple[Key, int, int]]:
        keys = sorted(dirty)
        pieces: List[Tuple[Key, int, int]] = []
        position = start
        clean: Optional[Tuple[int, int]] = None  # a run of unchanged pieces to copy
        first = 0
        last = len(self._pieces) - 1
        for i, (lastKey, begin, end) in enumerate(self._pieces):
            upTo = len(keys) if i == last else bisect.bisect_right(keys, lastKey, first)
            if upTo == first:
                clean = (clean[0], end) if clean is not None else (begin, end)
                pieces.append((lastKey, position, position + end - begin))
                position += end - begin
                continue
            if clean is not None:
                self._copy(fd, *clean)
                clean = None
            for piece in self._remade(fd, begin, end, dirty, keys[first:upTo]):
                data = piece[1]
                _writeAll(fd, data)
                pieces.append((piece[0], position, position + len(data)))
                position += len(data)
            first = upTo
        if clean is not None:
            self._copy(fd, *clean)
        return pieces

    def _remade(self, fd: int, begin: int, end: int, dirty: Dict[Key, Optional[str]], keys: List[Key]) -> Iterator[Tuple[Key, bytes]]:
        """
        The piece between C{begin} and C{end} of the last log with the
        lines of C{keys} (those of C{dirty} that fall in it) replaced,
        added or removed: in pieces of at most L{LINES_PER_WRITE} lines,
        each with the key of its last line.
        """
        assert self._fd is not None
        data = os.pread(self._fd, end - begin, begin)
        lines: List[Tuple[Key, str]] = []
        for text in data.decode("utf-8").split("\n")[:-1]:
            row = json.loads(text)
            key = (row["name"], row["node"])
            if key not in dirty:
                lines.append((key, text + "\n"))
        for key in keys:
            text = dirty[key]
            if text is not None:
                lines.append((key, text))
        lines.sort()
        for at in range(0, len(lines), LINES_PER_WRITE):
            batch = lines[at : at + LINES_PER_WRITE]
            self.made += sum(1 for key, text in batch if key in dirty)
            yield batch[-1][0], "".join([text for key, text in batch]).encode("utf-8")

    def _copy(self, fd: int, begin: int, end: int) -> None:
        # The bytes begin..end of the last log, appended to fd by the kernel.
        assert self._fd is not None
        while begin < end:
            try:
                n = os.copy_file_range(self._fd, fd, end - begin, begin)
            except (AttributeError, OSError):
                n = 0
            if n <= 0:
                data = os.pread(self._fd, min(end - begin, 1 << 20), begin)
                if not data:
                    raise OSError("the last log is shorter than it was")
                _writeAll(fd, data)
                n = len(data)
            begin += n


class LogContent:
    """
    What C{peer_files.log} is to say: a snapshot and the header values,
    made on the reactor, written by L{writeLog} in the writer's thread.

    @ivar entries: how many data lines the log will have.
    @ivar versions: node -> (address, incarnation, seq) of what the
        snapshot shows of it, when known for every node (see L{LogCache}).
    """

    def __init__(
        self, snapshot: IndexView, leader: int, epoch: int, now: float,
        versions: Optional[Dict[int, Tuple[str, str, int]]] = None,
    ) -> None:
        self.snapshot = snapshot
        self.leader = leader
        self.epoch = epoch
        self.now = now
        self.entries = snapshot.fileCount()
        self.versions = versions


def _buildAndWrite(path: FilePath, data: Any, cache: Optional[LogCache] = None) -> None:
    if callable(data):
        data = data()
    if isinstance(data, LogContent):
        writeLog(path, data.snapshot, data.leader, data.epoch, data.now, cache, data.versions)
        # The lines made for it are freed, in this thread's arena.
        trimAllocator()
    else:
        atomicWrite(path, data)


class LogWriter:
    """
    Keep C{peer_files.log} current promptly, one write at a time.

    A change when the writer is quiet starts a write at once (in the next
    turn of the reactor, so that changes made together ride together); a
    change during a write makes exactly one more, which starts when the
    running one ends; and the starts of two writes are at least
    C{minInterval} apart, so that a small log changing all the time is not
    rewritten more than a few times a second.  The content is rendered when
    a write starts, so the latest state is what lands on disk.  Writes run
    in a thread (they fsync) and replace the file atomically; a log written
    from a L{LogContent} copies what did not change from the last one (see
    L{LogCache}), so that a change to a large log costs little more than
    copying it.
    """

    log = Logger()

    def __init__(
        self, path: FilePath, clock: IReactorTime, runInThread: Callable[..., Deferred], minInterval: float = 0.25,
        keepPath: Optional[FilePath] = None,
    ) -> None:
        self._path = path
        self._clock = clock
        self._runInThread = runInThread
        self._minInterval = minInterval
        self._render: Optional[Callable[[], Any]] = None
        self._timer: Optional[IDelayedCall] = None
        self._writing: Optional[Deferred] = None
        self._idleWaiters = Waiters()
        self._stopped = False
        # The start of the last write, for its successor's delay.
        self._started: Optional[float] = None
        self._cache = LogCache(keepPath)
        self.writes = 0

    def changed(self, render: Callable[[], Any]) -> None:
        """
        Something in the index changed: write the output of C{render} soon.

        C{render} is called on the reactor thread when the write starts.  It
        returns a L{LogContent} (streamed by L{writeLog} in the writer's
        thread), the bytes to write, or a callable that builds them in the
        writer's thread.
        """
        if self._stopped:
            return
        self._render = render
        if self._writing is None and self._timer is None:
            self._timer = self._clock.callLater(self._delay(), self._write)

    def flush(self) -> Deferred:
        """
        Write now if a change is pending (after any write under way), and
        return a Deferred that fires when the file is current.
        """
        if self._writing is not None:
            waiter = self._idleWaiters.wait()
            waiter.addCallback(lambda _: self.flush())
            return waiter
        if self._render is None:
            return succeed(None)
        self._cancelTimer()
        return self._write()

    def prime(self, maps: Dict[int, Tuple[Mapping[str, bytes], str, str, int]]) -> Deferred:
        """
        Before the first write: take back, in the writer's thread, the log
        the last process kept (see L{LogCache.prime}).  Fires with whether
        it did; writes wait for it.
        """
        if self._writing is not None or self._started is not None or self._stopped:
            return succeed(False)
        priming = maybeDeferred(self._runInThread, self._cache.prime, maps)
        self._writing = priming

        def failed(reason: Failure) -> bool:
            self.log.failure("could not read the kept log", reason)
            return False

        priming.addErrback(failed)

        def primed(result: bool) -> bool:
            self._written(None)
            return result

        return priming.addCallback(primed)

    def stop(self) -> Deferred:
        """
        Stop writing: cancel any scheduled write and wait for a running one.
        A pending change is dropped; call L{flush} first to keep it.
        """
        self._stopped = True
        self._render = None
        self._cancelTimer()
        if self._writing is not None:
            return self._idleWaiters.wait().addCallback(lambda _: self._cache.forget())
        self._cache.forget()
        return succeed(None)

    def _delay(self) -> float:
        # How long from now the next write may start.
        if self._started is None:
            return 0.0
        return max(0.0, self._started + self._minInterval - self._clock.seconds())

    def _write(self) -> Deferred:
        """
        Render and start one write; the result fires (with L{None}, never an
        error) once it has ended either way.
        """
        self._timer = None
        render, self._render = self._render, None
        assert render is not None
        try:
            data = render()
        except Exception:
            self.log.failure("could not render {path}", path=self._path.path)
            return succeed(None)
        self._started = self._clock.seconds()
        writing = maybeDeferred(self._runInThread, _buildAndWrite, self._path, data, self._cache)
        self._writing = writing
        writing.addCallbacks(self._succeeded, self._failed)
        writing.addCallback(self._written)
        return writing

    def _succeeded(self, _: object) -> None:
        self.writes += 1

    def _failed(self, reason: Failure) -> None:
        self.log.error("could not write {path}: {reason}", path=self._path.path, reason=reason.getErrorMessage())

    def _written(self, _: None) -> None:
        self._writing = None
        if self._render is not None and not self._stopped:
            self._timer = self._clock.callLater(self._delay(), self._write)
        self._idleWaiters.fire(None)

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
