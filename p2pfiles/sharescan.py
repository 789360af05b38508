"""
The blocking half of a node's own index (L{p2pfiles.localindex}): listing
and hashing the share, numbering what changed, answering "everything since
N", and the hash cache file.  Everything here runs in a thread; it touches
only its arguments and settings fixed at construction.

A scan is handed the previous L{ShareState} and returns the next one, built
from new maps: a state is never changed once made, so that any thread may
read one while the reactor goes on, and scans, which never overlap, need no
lock.  Changes are numbered as Syncthing numbers them: C{seq} goes up by one
with every scan that changed something, each entry remembers the seq of its
last change and each removal leaves a tombstone, at most C{maxTombstones}
(L{MAX_TOMBSTONES}); once older ones are dropped, C{floor} says that asking
from before it gets the full list.

Hashes are remembered in C{hashcache.json} in the state directory, so that a
restart does not read every shared file again: a file whose name, size,
C{st_mtime_ns} and inode are unchanged keeps its hash.  The file looks like
C{{"files": {name: {"inode", "mtime_ns", "sha256", "size"}}, "version": 1}},
written L{STEP} names to a line so that it can be written and read in small
steps (a reader of plain JSON sees no difference).

What each file is (its signature, and its hash when the cached one does
not hold) is looked at by L{p2pfiles.scanworker.observe}: in the scan
thread, or, for a node, in child processes that share no GIL with the
reactor (L{ShareScanner}'s C{observer}).

The reactor thread shares the GIL with this work, so no single C call here
may run long (sorting and JSON go in pieces of L{STEP}); and a scan keeps per
file only what it shares, the previous scan's where nothing changed, because
a full pass of the garbage collector holds the GIL too.
"""

import hashlib
import heapq
import json
import os
import re
from contextlib import nullcontext
from itertools import islice
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar, Union

from twisted.logger import LogLevel
from twisted.python.filepath import FilePath

from p2pfiles.atomic import atomicWrite, fsyncDirectory
from p2pfiles.names import MAX_NAME_BYTES, nameProblem
from p2pfiles.runtime import trimAllocator
from p2pfiles.scanworker import (
    HASH_TRIES, Observation, ProcessObserver, Signature, WorkerFailed, hashOpened, observe, problemSignature,
)
from p2pfiles.wire import FileEntry

__all__ = [
    "CacheItem", "Changes", "EMPTY", "MAX_TOMBSTONES", "Problem", "ScanResult", "ShareScanner", "ShareState",
    "HASH_TRIES", "changes", "entriesDigest", "hashFile", "hashOpened", "putRecordBack", "resumed", "takeRecord",
    "writeRecord",
]

CACHE_VERSION = 1

# The format of the record a clean stop leaves (see writeRecord).
RECORD_VERSION = 1

# Removals remembered for deltas.  A tombstone costs about 100 bytes (a name
# and an int in a dict), so 100,000 of them about 10 MB: as many as the
# files we expect a node to share.  An asker older than the dropped ones gets
# the full list, which is always correct, only bigger.
MAX_TOMBSTONES = 100_000

# The size of the pieces long C calls (sorting, JSON) are cut into, so that
# each holds the GIL for under a millisecond: a 100,000-name sort or JSON
# dump in one call (50-300 ms here) stalls the reactor for as long.
STEP = 512

# Files are read this many bytes at a time by hashFile.
CHUNK = 1 << 20


class CacheItem(NamedTuple):
    """
    What the hash cache remembers of a file: its signature when hashed, and
    the hash (the very string its L{FileEntry} holds).  A tuple, at half
    the cost of the cache file's object of four.
    """

    size: int
    mtime_ns: int
    inode: int
    sha256: str

    def signature(self) -> Signature:
        return (self.size, self.mtime_ns, self.inode)


# name -> what is remembered of it: the hash cache.
Cache = Dict[str, CacheItem]

_T = TypeVar("_T")


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


def _sortedInSteps(items: List[_T]) -> List[_T]:
    """
    C{sorted(items)}, sorted in pieces of L{STEP} then merged in Python, so
    that the GIL is never held for the whole sort.
    """
    if len(items) <= STEP:
        return sorted(items)
    runs = [sorted(items[i:i + STEP]) for i in range(0, len(items), STEP)]
    return list(heapq.merge(*runs))


class Problem(NamedTuple):
    """
    A name we do not share, and why.  C{signature} lets us warn once per name
    and again only when the file (or the reason) changes.
    """

    key: Any  # the name: str, or bytes when it is not UTF-8
    signature: Tuple[Any, ...]
    reason: str
    level: LogLevel


class ShareState(NamedTuple):
    """
    What the index knows after a scan.  Built by a scan thread, never
    changed afterwards: the next scan builds a new one.
    """

    entries: Dict[str, FileEntry]  # name -> entry, in name order
    seqs: Dict[str, int]  # name -> seq of its last change, in name order
    tombstones: Dict[str, int]  # removed name -> seq of removal, oldest first
    seq: int
    floor: int  # deltas from a seq below this cannot be given
    cache: Optional[Cache]  # None: not loaded yet
    reported: Dict[Any, Tuple[Any, ...]]  # problems logged: key -> signature


EMPTY = ShareState({}, {}, {}, 0, 0, None, {})


class ScanResult(NamedTuple):
    """
    A scan thread's answer: the new state, what changed from the state it was
    handed, and what the reactor has to log or save.
    """

    state: ShareState
    changed: List[FileEntry]
    removed: List[str]
    newProblems: List[Problem]
    cacheProblem: Optional[str]
    cacheChanged: bool
    workerProblem: Optional[str] = None  # the child process failed: why


class ShareScanner:
    """
    Lists and hashes one share, works out what changed and reads and writes
    its hash cache.  Every method runs in a thread and touches only its
    arguments and the attributes set here, which never change; a scan is
    handed the previous L{ShareState} and returns the next, so that scans
    need no lock (they never overlap).
    """

    def __init__(
        self,
        share: FilePath,
        cacheFile: FilePath,
        hasher: Callable[[str, int], Tuple[str, int, os.stat_result]] = hashOpened,
        maxTombstones: int = MAX_TOMBSTONES,
        observer: Optional[ProcessObserver] = None,
        settle: Callable[[bool], ContextManager[None]] = nullcontext,
    ) -> None:
        """
        @param hasher: hashes a file when it is looked at in the scan
            thread (see L{observe}).
        @param observer: a child process that looks at the files instead
            (the scan thread then only lists the share and builds the
            state); L{None} to look at them in the scan thread.
        @param settle: every scan runs inside C{settle(first)}, C{first}
            true for the first scan (which builds an entry for every file):
            the process policy then puts what it built out of the garbage
            collector's sight (see
            L{p2pfiles.runtime.ProcessPolicy.settleScan}).
        """
        self.sharePath = os.fsencode(share.path)
        self.cacheFile = cacheFile
        self.hasher = hasher
        self.maxTombstones = maxTombstones
        self.observer = observer
        self.settle = settle

    # Scanning

    def scan(self, old: ShareState) -> ScanResult:
        """
        Scan the share and return the state that follows C{old}, inside
        C{settle(first)}, first if C{old} has no cache yet; then give back
        what a first scan or a new cache freed (see L{trimAllocator}).
        """
        with self.settle(old.cache is None):
            result = self._scan(old)
        if old.cache is None or result.cacheChanged:
            trimAllocator()
        return result

    def _scan(self, old: ShareState) -> ScanResult:
        # Every scan (re)creates the share: one that was removed is then an
        # empty share, not a failed scan logged at every poll.
        os.makedirs(self.sharePath, exist_ok=True)
        cacheProblem = None
        cache = old.cache
        rewrite = False
        if cache is None:
            cache, cacheProblem, current = self.loadCache()
            rewrite = not current
        if self.observer is not None:
            try:
                # The children start up while we list the share.
                self.observer.start()
            except WorkerFailed:
                pass  # said when the observations are asked for
        shareReal = os.path.realpath(self.sharePath)
        entries: Dict[str, FileEntry] = {}
        newCache: Cache = {}
        problems: List[Problem] = []
        hashed = False
        # The names to look at, each with the signature of its cached hash.
        wanted: List[Tuple[str, Optional[Signature]]] = []
        for raw in _sortedInSteps(os.listdir(self.sharePath)):
            name = self._shareable(raw, problems)
            if name is not None:
                cached = cache.get(name)
                wanted.append((name, None if cached is None else cached.signature()))
        # Only the objects shared are kept per file (the entry, its cache
        # item), the previous scan's where nothing changed: full passes of
        # the garbage collector hold the GIL.
        workerProblem: List[str] = []
        # (Not zip(): it would leave the observations unfinished, and the
        # child's answers are read to the end.)
        for index, seen in enumerate(self._observations(shareReal, wanted, workerProblem)):
            name = wanted[index][0]
            found = self._found(name, seen, cache, old.entries)
            if isinstance(found, Problem):
                problems.append(found)
            elif found is not None:
                entry, item, read = found
                # By the entry's own name (maybe the last scan's): one string.
                entries[entry.name] = entry
                newCache[entry.name] = item
                hashed = hashed or read
        # A name keeps its cached item unless it was hashed, so the cache is
        # unchanged when nothing was hashed and no name left it (the new
        # map is kept even then: a loaded cache's keys are other strings).
        cacheChanged = hashed or len(newCache) != len(cache) or rewrite
        reported = {p.key: p.signature for p in problems}
        newProblems = [p for p in problems if old.reported.get(p.key) != p.signature]
        state, changed, removed = self._diff(old, entries, newCache, reported)
        return ScanResult(
            state, changed, removed, newProblems, cacheProblem, cacheChanged, workerProblem[0] if workerProblem else None
        )

    def scanNames(self, old: ShareState, names: Iterable[str]) -> ScanResult:
        """
        Look again at C{names} only (inotify said they changed) and return
        the state that follows C{old}, inside C{settle(False)}: the same state a
        full scan would build if nothing else changed, at the cost of the
        names looked at plus copying the state, not of listing and checking
        every file.  C{old} must come from a full scan (its cache loaded).
        """
        with self.settle(False):
            return self._scanNames(old, names)

    def _scanNames(self, old: ShareState, names: Iterable[str]) -> ScanResult:
        cache = old.cache if old.cache is not None else {}
        shareReal = os.path.realpath(self.sharePath)
        entries = dict(old.entries)
        newCache = dict(cache)
        reported = dict(old.reported)
        problems: List[Problem] = []
        hashed = added = False
        for raw in sorted({os.fsencode(name) for name in names}):
            decoded = raw.decode("utf-8", "surrogateescape")
            # What was said of the name is said again if it still holds.
            reported.pop(raw, None)
            reported.pop(decoded, None)
            found = None
            name = self._shareable(raw, problems)
            if name is not None:
                cached = cache.get(name)
                signature = None if cached is None else cached.signature()
                seen = observe(self.sharePath, shareReal, name, signature, self.hasher)
                found = self._found(name, seen, cache, old.entries)
            if isinstance(found, Problem):
                problems.append(found)
                found = None
            if found is None:
                entries.pop(decoded, None)
                newCache.pop(decoded, None)
                continue
            entry, item, read = found
            # Assigned in place, a name keeps its position; a new one goes
            # last and is put in order below.
            added = added or name not in entries
            entries[entry.name] = entry
            newCache[entry.name] = item
            hashed = hashed or read
        if added:
            # Entries (and the cache, written in name order) stay in name order.
            order = _sortedInSteps(list(entries))
            entries = {name: entries[name] for name in order}
            newCache = {name: newCache[name] for name in order}
        cacheChanged = hashed or len(newCache) != len(cache)
        if not cacheChanged:
            newCache = cache
        newProblems = [p for p in problems if old.reported.get(p.key) != p.signature]
        for p in problems:
            reported[p.key] = p.signature
        state, changed, removed = self._diff(old, entries, newCache, reported)
        return ScanResult(state, changed, removed, newProblems, None, cacheChanged)

    def _diff(
        self, old: ShareState, entries: Dict[str, FileEntry], cache: Cache, reported: Dict[Any, Tuple[Any, ...]]
    ) -> Tuple[ShareState, List[FileEntry], List[str]]:
        """
        The state after a scan found C{entries}: what changed since C{old} is
        numbered with the next seq, and removals leave tombstones.  Returns it
        with the entries changed and the names removed, in name order.
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
            return ShareState(old.entries, old.seqs, old.tombstones, old.seq, old.floor, cache, reported), [], []
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
        return ShareState(entries, seqs, tombstones, seq, floor, cache, reported), changed, removed

    def _shareable(self, raw: bytes, problems: List[Problem]) -> Optional[str]:
        """
        The name of the directory entry C{raw} if it may be shared; else
        L{None}, with the reason added to C{problems} unless it is hidden.
        """
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(self._problem(raw, os.path.join(self.sharePath, raw), "name is not valid UTF-8"))
            return None
        if name.startswith("."):
            return None  # hidden, like partial downloads: not shared, not a problem
        if len(raw) <= MAX_NAME_BYTES and b"\\" not in raw:
            return name  # nameProblem agrees: a listed name has no '/' or NUL
        problem = nameProblem(name)
        if problem is not None:
            problems.append(self._problem(name, os.path.join(self.sharePath, raw), problem))
            return None
        return name

    def _observations(
        self, shareReal: bytes, wanted: List[Tuple[str, Optional[Signature]]], workerProblem: List[str]
    ) -> Iterator[Observation]:
        """
        L{observe} of each of C{wanted}, in order: by the child process if
        there is one, else here.  If the child fails, the rest is looked at
        here and why is added to C{workerProblem}.
        """
        done = 0
        if self.observer is not None:
            try:
                for seen in self.observer.observeAll(self.sharePath, shareReal, wanted):
                    yield seen
                    done += 1
                return
            except WorkerFailed as e:
                workerProblem.append(str(e))
        sharePath, hasher = self.sharePath, self.hasher
        for name, cached in wanted[done:]:
            yield observe(sharePath, shareReal, name, cached, hasher)

    def _found(
        self, name: str, seen: Observation, cache: Cache, oldEntries: Dict[str, FileEntry]
    ) -> Union[Tuple[FileEntry, Dict[str, Any], bool], Problem, None]:
        """
        From what L{observe} saw of C{name}: its entry, its cache item and
        whether it was read now; or why it is not shared; or L{None} when it
        is silently not shared.
        """
        kind = seen[0]
        if kind == "file":
            _, size, mtimeNs, inode, mtime, digest = seen
            if digest is None:
                cached = cache[name]
                digest = cached.sha256
                previous = oldEntries.get(name)
                if previous is not None and previous.size == size and previous.mtime == mtime and previous.sha256 == digest:
                    if cached.sha256 is not previous.sha256:  # a loaded cache's string
                        cached = cached._replace(sha256=previous.sha256)
                    return previous, cached, False  # the same object in both states
                return FileEntry(name, size, mtime, digest), cached, False
            return FileEntry(name, size, mtime, digest), CacheItem(size, mtimeNs, inode, digest), True
        if kind == "problem":
            _, reason, signature, osError = seen
            # Reported under the name's bytes when the system refused it, as
            # a name that cannot be decoded is.
            return Problem(name.encode("utf-8") if osError else name, signature, reason, LogLevel.warn)
        if kind == "unstable":
            return Problem(name, ("unstable",), "it kept changing while being hashed; will retry", LogLevel.info)
        return None

    def _problem(self, key: Any, path: bytes, reason: str) -> Problem:
        return Problem(key, problemSignature(reason, path), reason, LogLevel.warn)

    # The hash cache file

    def writeCache(self, cache: Cache) -> None:
        """
        Write C{cache} (never mutated once handed over: each scan builds a new
        one) in pieces of L{STEP} names, one piece to a line, in name order.
        """
        self.cacheFile.parent().makedirs(ignoreExistingDirectory=True)
        pieces = []
        items = iter(cache.items())
        while True:
            piece = {name: item._asdict() for name, item in islice(items, STEP)}
            if not piece:
                break
            pieces.append(json.dumps(piece, sort_keys=True)[1:-1].encode("utf-8"))
        data = b'{"files": {\n' + b",\n".join(pieces) + b'\n}, "version": %d}\n' % (CACHE_VERSION,)
        atomicWrite(self.cacheFile, data)
        del data, pieces
        trimAllocator()

    def loadCache(self) -> Tuple[Cache, Optional[str], bool]:
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
        try:
            files = parseCacheLines(data)
            current = files is not None
            if files is None:
                # Not laid out as we write it (an older or edited file):
                # parse it whole, in one step.
                try:
                    parsed = json.loads(data)
                except (ValueError, RecursionError):
                    return {}, "not valid JSON", False
                if not isinstance(parsed, dict) or parsed.get("version") != CACHE_VERSION:
                    return {}, "not a version 1 hash cache", False
                items = parsed.get("files")
                if not isinstance(items, dict):
                    return {}, "not a version 1 hash cache", False
                files = _cacheItems(items)
        except _Malformed:
            return {}, "malformed entry", False
        return files, None, current


class _Malformed(ValueError):
    """An item of the hash cache file is not what writeCache writes."""


def _cacheItems(items: Dict[str, Any]) -> Cache:
    # The CacheItems of items, the cache file's objects; or _Malformed.
    files: Cache = {}
    for name, item in items.items():
        # Exact types, as json.loads makes them; str.strip leaves nothing of
        # a string of hex digits alone.
        if type(item) is not dict:
            raise _Malformed(name)
        size, mtimeNs, inode, digest = item.get("size"), item.get("mtime_ns"), item.get("inode"), item.get("sha256")
        if not (
            type(size) is int and type(mtimeNs) is int and type(inode) is int
            and type(digest) is str and len(digest) == 64 and not digest.strip("0123456789abcdef")
        ):
            raise _Malformed(name)
        files[name] = CacheItem(size, mtimeNs, inode, digest)
    return files


def parseCacheLines(data: bytes) -> Optional[Cache]:
    """
    Read a hash cache laid out as L{ShareScanner.writeCache} writes it, a line
    at a time; L{None} if it is laid out otherwise.  Each line's objects
    become L{CacheItem}s at once, so that loading never holds an object per
    file (raises L{_Malformed} if one is not a file's object).
    """
    lines = data.split(b"\n")
    if lines[0] != b'{"files": {' or lines[-2:] != [b'}, "version": %d}' % (CACHE_VERSION,), b""]:
        return None
    files: Cache = {}
    for line in lines[1:-2]:
        if not line:
            continue
        if line.endswith(b","):
            line = line[:-1]
        try:
            piece = json.loads(b"{" + line + b"}")
        except (ValueError, RecursionError):
            return None
        files.update(_cacheItems(piece))
    return files


def changes(state: ShareState, incarnation: str, asked: Optional[str], since: int) -> Changes:
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


# The restart record.
#
# A node that stops cleanly writes down the incarnation and seq its files are
# at, with a digest of those files; the next start takes the record (removes
# it, durably, before anything is served) and keeps that incarnation and seq
# if its first scan finds exactly the files the digest describes.  Then a
# keeper that held the node's files asks "since seq" and gets an empty
# answer instead of the whole list again.
#
# The rule that makes this safe: an (incarnation, seq) pair never names two
# different lists of files.  The pair is kept only for the very files it
# named; the record is gone before the node serves anything, so a node that
# goes on changing and then crashes starts with a new incarnation (the pairs
# after seq, which it may have handed out, are never named again); and the
# resumed state has no tombstones (floor = seq), so anyone asking from an
# older seq, or a later one, gets the full list.


def entriesDigest(entries: Dict[str, FileEntry]) -> str:
    """
    The SHA-256 (hex) of C{entries} in name order: each entry's name, size,
    mtime (its repr, exact) and SHA-256, so that two lists have the same
    digest only if they describe the same files.  Built L{STEP} entries at a
    time.
    """
    digest = hashlib.sha256()
    values = iter(entries.values())
    while True:
        piece = list(islice(values, STEP))
        if not piece:
            return digest.hexdigest()
        text = "".join([f"{e.name}\0{e.size}\0{e.mtime!r}\0{e.sha256}\n" for e in piece])
        digest.update(text.encode("utf-8", "surrogatepass"))


def writeRecord(path: FilePath, incarnation: str, state: ShareState) -> None:
    """
    Write, atomically, the restart record of C{state} (the last state of an
    index that stopped cleanly) to C{path}.  Blocks: run it in a thread.
    """
    record = {
        "digest": entriesDigest(state.entries),
        "files": len(state.entries),
        "incarnation": incarnation,
        "seq": state.seq,
        "version": RECORD_VERSION,
    }
    path.parent().makedirs(ignoreExistingDirectory=True)
    atomicWrite(path, json.dumps(record, sort_keys=True).encode("ascii") + b"\n")


def putRecordBack(path: FilePath, record: Dict[str, Any]) -> None:
    """
    Write back, atomically, a record taken by L{takeRecord}: for an index
    stopped before its first scan, which vouched for nothing but the
    record's change.  Blocks: run it in a thread.
    """
    atomicWrite(path, json.dumps(record, sort_keys=True).encode("ascii") + b"\n")


def takeRecord(path: FilePath) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """
    Read and remove the restart record at C{path}: C{(record, None)}, or
    C{(None, why)} when there is none to use (C{why} is L{None} when there
    simply is none).  The removal is made durable (the directory fsynced)
    before this returns, and a record that cannot be removed is not used:
    a record is used by one start at most.  Blocks: run it in a thread.
    """
    try:
        data = path.getContent()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read it: {e}"
    try:
        os.unlink(path.path)
        fsyncDirectory(path.parent())
    except OSError as e:
        return None, f"cannot remove it: {e}"
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not (
        isinstance(record, dict)
        and record.get("version") == RECORD_VERSION
        and isinstance(record.get("incarnation"), str)
        and re.fullmatch("[0-9a-f]{16}", record["incarnation"])
        and all(type(record.get(k)) is int and record[k] >= 0 for k in ("seq", "files"))
        and isinstance(record.get("digest"), str)
        and re.fullmatch("[0-9a-f]{64}", record["digest"])
    ):
        return None, f"not a version {RECORD_VERSION} restart record"
    return record, None


def resumed(state: ShareState, record: Dict[str, Any]) -> Optional[ShareState]:
    """
    C{state} (a first scan's) renumbered as the record's seq, when its files
    are exactly those the record describes; L{None} otherwise.  The result
    has no tombstones and its floor is its seq: only an asker at exactly
    that seq of the record's incarnation gets a delta (an empty one).
    """
    if len(state.entries) != record["files"] or entriesDigest(state.entries) != record["digest"]:
        return None
    seq = record["seq"]
    return ShareState(state.entries, dict.fromkeys(state.entries, seq), {}, seq, seq, state.cache, state.reported)
