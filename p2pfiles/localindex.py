"""
A node's own index of the files it shares.

The shared files are the regular files at the top level of the share
directory.  Listing the directory and hashing files block, so all of that runs
through an injected C{runInThread}; the reactor thread only decides when to
scan, swaps in what a scan computed, logs new problems and tells subscribers
what changed.  Nothing on the reactor thread costs time in proportion to the
number of shared files: a share of 100,000 files must not stall the node.

Changes are numbered, as Syncthing numbers them: C{incarnation} is a random
id chosen when the index is made (a restarted node has a new one), and C{seq}
goes up by one with every scan that changed something.  Each entry remembers
the C{seq} of its last change and each removal leaves a tombstone, so that
L{LocalIndex.changesSince} can answer "everything since N" with only what
changed.  At most C{maxTombstones} (L{MAX_TOMBSTONES}) are kept; when older
ones are dropped, C{floor} records that asking from before it gets the full
list instead.

The maps a scan produces (entries, their seqs, tombstones, the hash cache) are
built by the scan thread and never changed afterwards: the next scan builds
new ones and the reactor swaps the references.  So any thread may read the
maps it was handed while the reactor goes on.

Hashes are remembered in C{hashcache.json} in the state directory, so that a
restart does not read every shared file again: a file whose name, size,
C{st_mtime_ns} and inode are unchanged keeps its hash.  The file looks like
C{{"files": {name: {"inode", "mtime_ns", "sha256", "size"}}, "version": 1}},
written 512 names to a line so that it can be written and read in
small steps (a reader of plain JSON sees no difference).

Changes are noticed with inotify where available, and by polling every
C{pollInterval} seconds where not.  With inotify a slow safety poll (every
C{SAFETY_POLL_FACTOR * pollInterval}) still runs, because inotify can drop
events (queue overflow) and cannot see a share directory that is replaced.
"""

import errno
import hashlib
import heapq
import json
import os
import re
import secrets
import stat
from itertools import islice
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar, Union

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

try:
    # Imported here rather than when watching starts: the import looks for
    # libc (running ldconfig) and reads files, which would hold the reactor
    # up while the first scan's hash cache is being written.
    from twisted.internet import inotify
except ImportError:  # not Linux: the share is polled
    inotify = None

from p2pfiles.atomic import atomicWrite
from p2pfiles.names import nameProblem
from p2pfiles.waiting import Waiters
from p2pfiles.wire import FileEntry

__all__ = ["Changes", "IndexStopped", "LocalIndex", "MAX_TOMBSTONES", "hashFile", "hashOpened"]

CACHE_NAME = "hashcache.json"
CACHE_VERSION = 1

# A file that keeps changing while we hash it is given up on after this many
# tries; the next scan tries again.
HASH_TRIES = 3

# With inotify, the safety poll runs this many times less often than polling.
SAFETY_POLL_FACTOR = 10

# Removals remembered for deltas.  A tombstone costs about 100 bytes (a name
# and an int in a dict), so 100,000 of them about 10 MB: as many as the
# files we expect a node to share.  An asker older than the dropped ones gets
# the full list, which is always correct, only bigger.
MAX_TOMBSTONES = 100_000

# The size of the pieces long C calls (sorting, JSON) are cut into, so that
# each holds the GIL for under a millisecond.  The reactor thread gives up the
# GIL at every system call and waits to get it back while a C call runs: a
# 100,000-name sort or JSON dump in one call (50-300 ms here) stalls it.
STEP = 512

# Files up to this size are read with one read() call.
CHUNK = 1 << 20

# name -> {"size", "mtime_ns", "inode", "sha256"}: the hash cache.
_Cache = Dict[str, Dict[str, Any]]

# subscriber(changed, removed)
Subscriber = Callable[[List[FileEntry], List[str]], None]

_T = TypeVar("_T")


class IndexStopped(Exception):
    """
    The index was stopped (or never started), so the scan asked for will not
    happen.
    """


class Changes(NamedTuple):
    """
    The answer to "everything since N".

    @ivar incarnation: the index's incarnation; an asker keeps it with C{seq}
        for its next question.
    @ivar seq: the index's seq this answer brings the asker up to.
    @ivar full: C{entries} is the whole share (sorted by name) and replaces
        whatever the asker held; C{removed} is empty.
    @ivar entries: when not C{full}, the entries changed (added or modified)
        after the asked seq, sorted by name.
    @ivar removed: the names removed after the asked seq (and not shared
        again since), sorted.
    """

    incarnation: str
    seq: int
    full: bool
    entries: List[FileEntry]
    removed: List[str]


def hashFile(path: str, chunk: int = CHUNK) -> Tuple[str, int]:
    """
    Return the SHA-256 (hex) of the file at C{path} and the number of bytes
    hashed.  Reads C{chunk} bytes at a time so that a large file never sits
    in memory.  Blocks: call it in a thread.
    """
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            digest.update(data)
            length += len(data)
    return digest.hexdigest(), length


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


def _signature(st: os.stat_result) -> Tuple[int, int, int]:
    # What must be unchanged for a cached hash (or a fresh one) to hold.
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _sortedInSteps(items: List[_T]) -> List[_T]:
    """
    C{sorted(items)}, sorted in pieces of L{STEP} then merged in Python, so
    that the GIL is never held for the whole sort.
    """
    if len(items) <= STEP:
        return sorted(items)
    runs = [sorted(items[i:i + STEP]) for i in range(0, len(items), STEP)]
    return list(heapq.merge(*runs))


class _Problem(NamedTuple):
    """
    A name we do not share, and why.  C{signature} lets us warn once per name
    and again only when the file (or the reason) changes.
    """

    key: Any  # the name: str, or bytes when it is not UTF-8
    signature: Tuple[Any, ...]
    reason: str
    level: LogLevel


class _State(NamedTuple):
    """
    What the index knows after a scan.  Built by a scan thread, never
    changed afterwards: the next scan builds a new one.
    """

    entries: Dict[str, FileEntry]  # name -> entry, in name order
    seqs: Dict[str, int]  # name -> seq of its last change, in name order
    tombstones: Dict[str, int]  # removed name -> seq of removal, oldest first
    seq: int
    floor: int  # deltas from a seq below this cannot be given
    cache: Optional[_Cache]  # None: not loaded yet
    reported: Dict[Any, Tuple[Any, ...]]  # problems logged: key -> signature


_EMPTY = _State({}, {}, {}, 0, 0, None, {})


class _ScanResult(NamedTuple):
    """
    A scan thread's answer: the new state, what changed from the state it was
    handed, and what the reactor has to log or save.
    """

    state: _State
    changed: List[FileEntry]
    removed: List[str]
    newProblems: List[_Problem]
    cacheProblem: Optional[str]
    cacheChanged: bool


class ShareScanner:
    """
    The blocking half of L{LocalIndex}: lists and hashes the share, works out
    what changed and reads and writes the hash cache.  Every method runs in a
    thread and touches only its arguments and the attributes set here, which
    never change; a scan is handed the previous L{_State} and returns the
    next, so that scans need no lock (they never overlap).
    """

    def __init__(
        self,
        share: FilePath,
        cacheFile: FilePath,
        hasher: Callable[[str, int], Tuple[str, int, os.stat_result]] = hashOpened,
        maxTombstones: int = MAX_TOMBSTONES,
    ) -> None:
        self.sharePath = os.fsencode(share.path)
        self.cacheFile = cacheFile
        self.hasher = hasher
        self.maxTombstones = maxTombstones

    # Scanning

    def scan(self, old: _State) -> _ScanResult:
        """
        Scan the share and return the state that follows C{old}.
        """
        # Every scan (re)creates the share: one that was removed is then an
        # empty share, not a failed scan logged at every poll.
        os.makedirs(self.sharePath, exist_ok=True)
        cacheProblem = None
        cache = old.cache
        rewrite = False
        if cache is None:
            cache, cacheProblem, current = self.loadCache()
            rewrite = not current
        shareReal = os.path.realpath(self.sharePath)
        entries: Dict[str, FileEntry] = {}
        newCache: _Cache = {}
        problems: List[_Problem] = []
        hashed = False
        # Only the objects shared are kept per file (the entry, its cache
        # item), and those that did not change are the previous scan's: a
        # scan makes little work for the garbage collector, whose full passes
        # hold the GIL.
        for raw in _sortedInSteps(os.listdir(self.sharePath)):
            found = self._scanOne(raw, shareReal, cache, old.entries)
            if isinstance(found, _Problem):
                problems.append(found)
            elif found is not None:
                entry, item, read = found
                entries[entry.name] = entry
                newCache[entry.name] = item
                hashed = hashed or read
        # A name keeps its cached item unless it was hashed, so the cache is
        # unchanged when nothing was hashed and no name left it.
        cacheChanged = hashed or len(newCache) != len(cache) or rewrite
        if not cacheChanged:
            newCache = cache
        reported = {p.key: p.signature for p in problems}
        newProblems = [p for p in problems if old.reported.get(p.key) != p.signature]
        state, changed, removed = self._diff(old, entries)
        state = state._replace(cache=newCache, reported=reported)
        return _ScanResult(state, changed, removed, newProblems, cacheProblem, cacheChanged)

    def _diff(self, old: _State, entries: Dict[str, FileEntry]) -> Tuple[_State, List[FileEntry], List[str]]:
        """
        The state after a scan found C{entries}: what changed since C{old} is
        numbered with the next seq, and removals leave tombstones.
        """
        seq = old.seq + 1
        oldEntries, oldSeqs = old.entries, old.seqs
        seqs: Dict[str, int] = {}
        changed = []
        for name, entry in entries.items():
            previous = oldEntries.get(name)
            if previous is entry or previous == entry:
                seqs[name] = oldSeqs[name]
            else:
                seqs[name] = seq
                changed.append(entry)
        removed = [name for name in oldEntries if name not in entries]
        if not changed and not removed:
            return old, [], []
        tombstones = old.tombstones
        floor = old.floor
        if removed or any(entry.name in tombstones for entry in changed):
            tombstones = dict(tombstones)
            for entry in changed:
                tombstones.pop(entry.name, None)  # shared again
            for name in removed:
                tombstones[name] = seq
            excess = len(tombstones) - self.maxTombstones
            if excess > 0:
                dropped = list(islice(tombstones, excess))
                floor = max(floor, tombstones[dropped[-1]])
                for name in dropped:
                    del tombstones[name]
        state = old._replace(entries=entries, seqs=seqs, tombstones=tombstones, seq=seq, floor=floor)
        return state, changed, removed

    def _scanOne(
        self, raw: bytes, shareReal: bytes, cache: _Cache, oldEntries: Dict[str, FileEntry]
    ) -> Union[Tuple[FileEntry, Dict[str, Any], bool], _Problem, None]:
        """
        What one name in the share is: see L{_hashOne}.
        """
        path = os.path.join(self.sharePath, raw)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._problem(raw, path, "name is not valid UTF-8")
        if name.startswith("."):
            return None  # hidden, like partial downloads: not shared, not a problem
        problem = nameProblem(name)
        if problem is not None:
            return self._problem(name, path, problem)
        try:
            return self._hashOne(name, path, shareReal, cache, oldEntries)
        except FileNotFoundError:
            return None  # removed while we looked at it: the next scan agrees
        except OSError as e:
            return self._problem(raw, path, e.strerror or str(e))

    def _hashOne(
        self, name: str, path: bytes, shareReal: bytes, cache: _Cache, oldEntries: Dict[str, FileEntry]
    ) -> Union[Tuple[FileEntry, Dict[str, Any], bool], _Problem, None]:
        """
        The entry, cache item and whether it was read now, for one file; or
        why it is not shared; or L{None} when it is silently not shared.
        """
        st = os.lstat(path)
        target = path
        if stat.S_ISLNK(st.st_mode):
            # Only a link to a visible file directly in the share is followed:
            # a link must not publish anything the share would not.
            target = os.path.realpath(path)
            if os.path.dirname(target) != shareReal or os.path.basename(target).startswith(b"."):
                return self._problem(name, path, "symlink does not lead to a visible file in the share")
            st = os.lstat(target)
        for attempt in range(HASH_TRIES):
            if attempt:
                st = os.lstat(target)
            if not stat.S_ISREG(st.st_mode):
                return None  # directories, devices, fifos: silently not shared
            signature = _signature(st)
            size, mtimeNs, inode = signature
            cached = cache.get(name)
            if cached is not None and (cached["size"], cached["mtime_ns"], cached["inode"]) == signature:
                digest = cached["sha256"]
                previous = oldEntries.get(name)
                if (
                    previous is not None and previous.size == size
                    and previous.mtime == st.st_mtime and previous.sha256 == digest
                ):
                    return previous, cached, False  # the same object in both states
                return FileEntry(name, size, st.st_mtime, digest), cached, False
            try:
                digest, length, after = self.hasher(os.fsdecode(target), size)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # it became a symlink while we looked: look again
                raise
            if _signature(after) != signature or length != size:
                continue  # changed while we read it
            item = {"size": size, "mtime_ns": mtimeNs, "inode": inode, "sha256": digest}
            return FileEntry(name, size, st.st_mtime, digest), item, True
        return _Problem(name, ("unstable",), "it kept changing while being hashed; will retry", LogLevel.info)

    def _problem(self, key: Any, path: bytes, reason: str) -> _Problem:
        try:
            signature: Tuple[Any, ...] = (reason,) + _signature(os.lstat(path))
        except OSError:
            signature = (reason,)
        return _Problem(key, signature, reason, LogLevel.warn)

    # The hash cache file

    def writeCache(self, cache: _Cache) -> None:
        """
        Write C{cache} (never mutated once handed over: each scan builds a new
        one) in pieces of L{STEP} names, one piece to a line, in name order.
        """
        self.cacheFile.parent().makedirs(ignoreExistingDirectory=True)
        pieces = []
        items = iter(cache.items())
        while True:
            piece = dict(islice(items, STEP))
            if not piece:
                break
            pieces.append(json.dumps(piece, sort_keys=True)[1:-1].encode("utf-8"))
        data = b'{"files": {\n' + b",\n".join(pieces) + b'\n}, "version": %d}\n' % (CACHE_VERSION,)
        atomicWrite(self.cacheFile, data)

    def loadCache(self) -> Tuple[_Cache, Optional[str], bool]:
        """
        Read the cache file.  Anything wrong with it makes it count as empty
        (we only lose time rehashing), with the reason to log.  The flag says
        whether the file is there, valid and laid out as L{writeCache} writes
        it; if not, it is written again.
        """
        try:
            data = self.cacheFile.getContent()
        except FileNotFoundError:
            return {}, None, False
        except OSError as e:
            return {}, f"cannot read it: {e}", False
        files = _parseCacheLines(data)
        current = files is not None
        if files is None:
            # Not laid out as we write it (an older or edited file): parse it
            # whole, in one step.
            try:
                parsed = json.loads(data)
            except (ValueError, RecursionError):
                return {}, "not valid JSON", False
            if not isinstance(parsed, dict) or parsed.get("version") != CACHE_VERSION:
                return {}, "not a version 1 hash cache", False
            files = parsed.get("files")
            if not isinstance(files, dict):
                return {}, "not a version 1 hash cache", False
        for item in files.values():
            if not (
                isinstance(item, dict)
                and all(type(item.get(k)) is int for k in ("size", "mtime_ns", "inode"))
                and re.fullmatch("[0-9a-f]{64}", str(item.get("sha256")))
            ):
                return {}, "malformed entry", False
        return files, None, current


def _parseCacheLines(data: bytes) -> Optional[_Cache]:
    """
    Read a hash cache laid out as L{ShareScanner.writeCache} writes it, a line
    at a time; L{None} if it is laid out otherwise.
    """
    lines = data.split(b"\n")
    if lines[0] != b'{"files": {' or lines[-2:] != [b'}, "version": %d}' % (CACHE_VERSION,), b""]:
        return None
    files: _Cache = {}
    for line in lines[1:-2]:
        if not line:
            continue
        if line.endswith(b","):
            line = line[:-1]
        try:
            piece = json.loads(b"{" + line + b"}")
        except (ValueError, RecursionError):
            return None
        files.update(piece)
    return files


def _changes(state: _State, incarnation: str, asked: Optional[str], since: int) -> Changes:
    """
    In a thread: L{LocalIndex.changesSince} from C{state}.
    """
    if asked != incarnation or since <= 0 or since < state.floor or since > state.seq:
        return Changes(incarnation, state.seq, True, list(state.entries.values()), [])
    entries = state.entries
    changed = [entries[name] for name, seq in state.seqs.items() if seq > since]
    removed = []
    for name, seq in reversed(state.tombstones.items()):
        if seq <= since:
            break  # tombstones are oldest first
        removed.append(name)
    removed.sort()
    return Changes(incarnation, state.seq, False, changed, removed)


class LocalIndex:
    """
    The files this node shares, kept up to date as the share changes.

    C{entries} maps each shared name to its L{FileEntry}, in name order.  It
    is replaced (not mutated) after each scan that changed something, so a
    reader holding it sees a consistent view.

    @ivar incarnation: 16 hex digits chosen at random for this index.
    """

    log = Logger()

    def __init__(
        self,
        share: FilePath,
        state: FilePath,
        reactor: Any,
        runInThread: Optional[Callable[..., Deferred]] = None,
        pollInterval: float = 1.0,
        coalesce: float = 0.1,
        useInotify: bool = True,
        hasher: Callable[[str, int], Tuple[str, int, os.stat_result]] = hashOpened,
        maxTombstones: int = MAX_TOMBSTONES,
    ) -> None:
        """
        @param hasher: like L{hashOpened}, run in the scan thread; replaceable
            so that tests can count or fail reads.
        @param maxTombstones: removals remembered for L{changesSince}.
        """
        if runInThread is None:
            runInThread = lambda f, *a: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *a
            )
        self.incarnation = secrets.token_hex(8)
        self._state = _EMPTY
        self._share = share
        self._cacheFile = state.child(CACHE_NAME)
        self._scanner = ShareScanner(share, self._cacheFile, hasher, maxTombstones)
        self._reactor = reactor
        self._runInThread = runInThread
        self._pollInterval = pollInterval
        self._coalesce = coalesce
        self._useInotify = useInotify

        self._running = False
        self._firstDone = False
        self._subscribers: List[Subscriber] = []
        self._notifier: Any = None
        self._poller: Optional[LoopingCall] = None

        # Scan scheduling: at most one scan runs; _again asks for one more.
        self._scanning = False
        self._again = False
        self._pending: Any = None  # the coalescing DelayedCall
        self._waiters = Waiters()  # for the next scan to start
        self._idleWaiters = Waiters()  # for the running scan to end

        # Cache writes: at most one runs; _cacheDirty asks for one more.
        self._saving = False
        self._cacheDirty = False
        self._savedWaiters = Waiters()

    # Public API

    @property
    def entries(self) -> Dict[str, FileEntry]:
        """
        Each shared name's entry, in name order.  Never mutated: a scan that
        changes something replaces it.
        """
        return self._state.entries

    @property
    def seq(self) -> int:
        """
        The number of scans so far that changed something: 0 until a scan
        finds a file.
        """
        return self._state.seq

    @property
    def floor(self) -> int:
        """
        The oldest seq L{changesSince} can give a delta from: the tombstones
        of removals at or before it were dropped (see L{MAX_TOMBSTONES}).
        """
        return self._state.floor

    def start(self) -> Deferred:
        """
        Load the hash cache, scan the share and start watching it.  Fires with
        L{None} once the first scan is complete and C{entries} holds it.
        """
        self._running = True
        d = self._requestScan()
        d.addCallbacks(self._startWatching, self._startFailed)
        return d

    def stop(self) -> Deferred:
        """
        Stop watching, cancel timers, wait for a running scan and flush the
        hash cache.  After it fires the index leaves nothing in the reactor.
        """
        return Deferred.fromCoroutine(self._stop())

    def rescan(self) -> Deferred:
        """
        Ask for a scan now.  Fires when a scan that started after this call
        is complete (a scan already running does not count: it may have
        listed the directory before the change the caller knows about).
        """
        if not self._running:
            return fail(IndexStopped("the index is not running"))
        return self._requestScan()

    def changesSince(self, incarnation: Optional[str], since: int) -> Deferred:
        """
        Everything that changed after seq C{since} of C{incarnation}: fires
        with L{Changes}, computed in a thread from the state at the time of
        the call.

        The answer is the full list when C{incarnation} is not this index's
        (or is L{None}), when C{since} is 0, when it is below C{floor} (the
        removals after it were forgotten) or when it is above C{seq} (the
        asker is confused).  Otherwise it holds only the entries changed, and
        the names removed, after C{since}.
        """
        return self._runInThread(_changes, self._state, self.incarnation, incarnation, since)

    def subscribe(self, callback: Subscriber) -> None:
        """
        Call C{callback(changed, removed)} on the reactor thread after each
        scan (but the first) that changed something; C{seq} is by then the
        seq of that change.
        """
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.remove(callback)

    def signature(self, name: str) -> Optional[Tuple[int, int, int]]:
        """
        C{(size, mtime_ns, inode)} of shared file C{name} (of its target, for
        a symlink) when it was last hashed, or L{None} if it is not shared:
        what the file must still have to be the one in C{entries}.
        """
        state = self._state
        if name not in state.entries or state.cache is None:
            return None
        item = state.cache.get(name)
        if item is None:
            return None
        return (item["size"], item["mtime_ns"], item["inode"])

    # Watching

    def _startWatching(self, ignored: object) -> None:
        if not self._running:  # stopped during the first scan
            return
        interval = self._pollInterval
        if self._useInotify and self._startInotify():
            interval = self._pollInterval * SAFETY_POLL_FACTOR
        self._poller = LoopingCall(self._changed)
        self._poller.clock = self._reactor
        self._poller.start(interval, now=False).addErrback(
            lambda f: self.log.failure("polling {share} failed", f, share=self._share.path)
        )

    def _startFailed(self, failure: Failure) -> Failure:
        self._running = False
        return failure

    def _startInotify(self) -> bool:
        """
        Watch the share with inotify; return whether that worked, so that the
        caller can fall back to polling on platforms without it.
        """
        if inotify is None:
            self.log.info("no inotify on this platform; polling {share}", share=self._share.path)
            return False
        try:
            mask = (
                inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MODIFY
                | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO
                | inotify.IN_CLOSE_WRITE | inotify.IN_ATTRIB
            )
            notifier = inotify.INotify(reactor=self._reactor)
            notifier.watch(self._share, mask=mask, callbacks=[self._inotifyEvent])
        except Exception as e:
            self.log.info("no inotify ({why}); polling {share}", why=e, share=self._share.path)
            return False
        notifier.startReading()
        self._notifier = notifier
        return True

    def _inotifyEvent(self, ignored: object, path: FilePath, mask: int) -> None:
        self._changed()

    # Scan scheduling (reactor thread)

    def _changed(self) -> None:
        """
        Something may have changed: scan after C{coalesce} seconds, so that a
        burst of events costs one scan.
        """
        if not self._running:
            return
        if self._scanning:
            self._again = True
        elif self._pending is None:
            self._pending = self._reactor.callLater(self._coalesce, self._pendingFired)

    def _pendingFired(self) -> None:
        self._pending = None
        self._startScan()

    def _requestScan(self) -> Deferred:
        d = self._waiters.wait()
        if self._scanning:
            self._again = True
        else:
            self._cancelPending()
            self._startScan()
        return d

    def _cancelPending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _startScan(self) -> None:
        waiters, self._waiters = self._waiters, Waiters()
        self._scanning = True
        # Scans never overlap, so the state handed over is the one the
        # result replaces.
        d = self._runInThread(self._scanner.scan, self._state)
        d.addCallback(self._applyScan)
        d.addErrback(self._scanFailed)
        d.addBoth(self._scanFinished, waiters)

    def _scanFailed(self, failure: Failure) -> Failure:
        self.log.failure("scan of {share} failed", failure, share=self._share.path)
        return failure

    def _scanFinished(self, result: Optional[Failure], waiters: Waiters) -> None:
        self._scanning = False
        waiters.fire(result)
        self._idleWaiters.fire(None)
        if self._again and self._running:
            self._again = False
            self._changed()

    def _applyScan(self, result: _ScanResult) -> None:
        """
        Swap in what the scan thread computed.  Costs time in proportion to
        what changed, never to the size of the share.
        """
        self._state = result.state
        if result.cacheProblem is not None:
            self.log.warn(
                "ignoring hash cache {path}: {reason}",
                path=self._cacheFile.path, reason=result.cacheProblem,
            )
        for p in result.newProblems:
            name = p.key
            if isinstance(name, bytes):
                name = name.decode("utf-8", "backslashreplace")
            self.log.emit(p.level, "not sharing {name!r}: {reason}", name=name, reason=p.reason)
        if result.cacheChanged:
            self._saveCache()
        if not self._firstDone:
            self._firstDone = True
            return
        if result.changed or result.removed:
            for callback in list(self._subscribers):
                try:
                    callback(result.changed, result.removed)
                except Exception:
                    self.log.failure("index subscriber {callback!r} failed", callback=callback)

    async def _stop(self) -> None:
        self._running = False
        self._again = False
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        self._cancelPending()
        if self._scanning:
            await self._idleWaiters.wait()
        self._waiters.fire(Failure(IndexStopped("the index stopped before scanning again")))
        await self._whenSaved()

    # Saving the hash cache (at most one write runs; changes meanwhile are
    # saved by one more)

    def _saveCache(self) -> None:
        self._cacheDirty = True
        if not self._saving:
            self._writeNext()

    def _writeNext(self) -> None:
        self._cacheDirty = False
        self._saving = True
        d = self._runInThread(self._scanner.writeCache, self._state.cache)
        d.addErrback(
            lambda f: self.log.failure("cannot save {path}", f, path=self._cacheFile.path)
        )
        d.addCallback(self._written)

    def _written(self, ignored: object) -> None:
        self._saving = False
        if self._cacheDirty:
            self._writeNext()
            return
        self._savedWaiters.fire(None)

    def _whenSaved(self) -> Deferred:
        if not self._saving:
            return succeed(None)
        return self._savedWaiters.wait()
