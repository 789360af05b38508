"""
The leader's cluster index ("the log") and the writer of C{peer_files.log}.

The leader gathers every live node's file list into a L{ClusterIndex}; the
index answers "who holds this file" for downloads and "what is shared" for
C{p2pfiles ls}.  L{writeLog} streams a snapshot of it into
C{peer_files.log}, a line-based file that other tools read, and L{LogWriter}
keeps that file current on disk: atomically (a reader never sees half a
file) and coalesced (a burst of updates costs one write; a large index is
rewritten at most once per interval).

A file costs a name and a 48-byte packed record (size, mtime, SHA-256);
L{FileEntry} objects are made only when asked for.  A node's map is never
changed once a snapshot has seen it, so a snapshot costs one small copy per
node and can be read in another thread while the index goes on changing.

This is a decision/data module: it knows nothing of protocols, transports or
the reactor.  Time and threads are handed in by the node service.
"""

import bisect
import heapq
import os
import re
import struct
from datetime import datetime, timezone
from itertools import chain, islice, repeat
import json
from json.encoder import encode_basestring
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.atomic import atomicWrite, fsyncDirectory
from p2pfiles.waiting import Waiters
from p2pfiles.wire import FileEntry

LOG_FORMAT_VERSION = 1

# The keys of one data line of peer_files.log, in the order they are written.
LOG_KEYS = ("node", "address", "name", "size", "mtime", "sha256")

Holder = Tuple[int, str, FileEntry]

# One file's record, 48 bytes: size (int64), mtime (float64), raw SHA-256.
_RECORD = struct.Struct("<qd32s")
_DIGEST = slice(16, 48)

# One node's name -> record map; who holds a name: an id or a sorted tuple.
Files = Dict[str, bytes]
Held = Union[int, Tuple[int, ...]]


def packEntry(entry: FileEntry) -> bytes:
    """
    The 48-byte record of C{entry}.  Raises L{ValueError} for what a record
    cannot hold exactly (all of which the wire codec refuses already): a
    size outside 0..2**63-1, an mtime that is not a number, a SHA-256 that
    is not 64 lowercase hex digits.
    """
    try:
        digest = bytes.fromhex(entry.sha256)
        if entry.size >= 0 and digest.hex() == entry.sha256 and len(digest) == 32:
            return _RECORD.pack(entry.size, entry.mtime, digest)
    except (TypeError, ValueError, OverflowError, struct.error):
        pass
    raise ValueError(f"{entry!r} does not fit a record")


def unpackEntry(name: str, record: bytes) -> FileEntry:
    # The FileEntry that record (made by packEntry) stands for.
    size, mtime, digest = _RECORD.unpack(record)
    return FileEntry(name, size, mtime, digest.hex())


def packEntries(entries: Iterable[FileEntry], into: Files) -> int:
    """
    Add every entry's record to C{into} (name -> record, keyed by the
    entry's own name object; a later entry of a name wins).  Returns how
    many entries no record can hold (see L{packEntry}), left out.
    """
    refused = 0
    for entry in entries:
        try:
            into[entry.name] = packEntry(entry)
        except ValueError:
            refused += 1
    return refused


class IndexView:
    """
    The reads shared by the live index and its snapshots: node -> name ->
    record maps, and each node's address.
    """

    def __init__(self, files: Dict[int, Files], addresses: Dict[int, str], version: int) -> None:
        self._files = files
        self._addresses = addresses
        self.version = version

    def nodes(self) -> List[int]:
        return sorted(self._files)

    def hasNode(self, node: int) -> bool:
        return node in self._files

    def fileCount(self) -> int:
        # How many (node, name) entries there are: O(number of nodes).
        return sum(map(len, self._files.values()))

    def address(self, node: int) -> str:
        return self._addresses[node]

    def nodeFiles(self, node: int) -> Mapping[str, bytes]:
        """
        The name -> record map of C{node} (see L{unpackEntry}), to read only.
        """
        return self._files[node]

    def _holderIds(self, name: str) -> Iterable[int]:
        return [node for node in sorted(self._files) if name in self._files[node]]

    def holders(self, name: str, sha256: Optional[str] = None) -> List[Holder]:
        """
        Return C{(node, address, entry)} for every node holding a file named
        exactly C{name} (optionally with content C{sha256}), by node id.
        """
        result = []
        for node in self._holderIds(name):
            entry = unpackEntry(name, self._files[node][name])
            if sha256 is None or entry.sha256 == sha256:
                result.append((node, self._addresses[node], entry))
        return result

    def content(self, name: str, sha256: Optional[str] = None, usable: Optional[Callable[[int], bool]] = None) -> Optional[Tuple[FileEntry, List[Tuple[int, str]]]]:
        """
        The content served under C{name}, and the nodes that can send it:
        C{(entry, [(node, address), ...])}, or L{None} if nobody holds it.

        When holders disagree, the lowest id's copy names the content (the
        rule every client sees in C{ls}); any holder of that same content
        can serve it.  C{usable} narrows the holders (e.g. to live nodes).
        """
        holders = [h for h in self.holders(name, sha256) if usable is None or usable(h[0])]
        if not holders:
            return None
        entry = holders[0][2]
        return entry, [(node, address) for node, address, e in holders if e.sha256 == entry.sha256]

    def listing(self) -> List[dict]:
        # The ls --json rows: see listingOf.
        return listingOf(self)

    def entries(self) -> List[Holder]:
        """
        Every C{(node, address, entry)}, sorted by name then node.
        """
        return [(node, self._addresses[node], unpackEntry(name, self._files[node][name])) for name, node in sortedKeys(self)]


class IndexSnapshot(IndexView):
    """
    The index as it was at one moment.  Nothing changes it afterwards, so
    it can be read in any thread (see L{ClusterIndex.snapshot}).
    """


class ClusterIndex(IndexView):
    """
    Every live node's shared files, as the leader knows them.

    Entries are kept per node, as name -> record maps, so that a node
    leaving costs only its own files, with a name -> holders map beside them
    (one id, or a sorted tuple of ids) so that finding the holders of a file
    does not scan the cluster; a name is one C{str}, the key in both maps.
    C{version} changes whenever the content does, so a writer can tell
    whether the log needs rewriting.  A node's map is changed in place only
    while no snapshot has seen it; after L{snapshot}, the next change to it
    copies it first (O(that node's files), never O(the cluster)).
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__({}, {}, 0)
        self._byName: Dict[str, Held] = {}
        # Nodes whose current map no snapshot has seen: changed in place.
        self._owned: set = set()

    def replaceNode(self, node: int, address: str, entries: Union[Files, Iterable[FileEntry]]) -> None:
        """
        Set the full index of C{node}, as gathered from it.  A node with no
        files is still recorded as present.

        C{entries} is either L{FileEntry} objects or an already built
        name -> record map (see L{packEntries}), which the index then takes
        over: the caller must not change it afterwards.
        """
        if isinstance(entries, dict):
            files = entries
        else:
            files = {}
            self._refused(node, packEntries(entries, files))
        old = self._files.get(node)
        if old is not None and old == files and self._addresses[node] == address:
            return
        byName = self._byName
        if old is not None:
            for name in old:
                if name not in files:
                    self._dropHolder(name, node)
        for name in files:
            held = byName.get(name)
            if held == node:
                # Re-key by the new map's name object: the old one is freed.
                del byName[name]
                byName[name] = node
            else:
                byName[name] = _withHolder(held, node)
        self._files[node] = files
        self._addresses[node] = address
        self._owned.add(node)
        self.version += 1

    def applyChanges(self, node: int, address: str, changed: Iterable[FileEntry], removed: Iterable[str]) -> None:
        """
        Apply an incremental update from C{node}: C{changed} entries replace
        any of the same name, C{removed} names go.  Removing a name the node
        does not have is not an error: updates may cross a full gather.
        """
        records: Files = {}
        self._refused(node, packEntries(changed, records))
        removed = list(removed)
        current = self._files.get(node)
        if current is None:
            files: Files = {}
        else:
            records = {name: r for name, r in records.items() if current.get(name) != r}
            if records or any(name in current for name in removed):
                # Copy-on-write: a snapshot may be reading this map.
                files = current if node in self._owned else current.copy()
            elif self._addresses[node] != address:
                files = current
            else:
                return
        byName = self._byName
        for name, record in records.items():
            if name not in files:
                byName[name] = _withHolder(byName.get(name), node)
            files[name] = record
        for name in removed:
            if files.pop(name, None) is not None:
                self._dropHolder(name, node)
        if files is not current:
            self._files[node] = files
            self._owned.add(node)
        self._addresses[node] = address
        self.version += 1

    def removeNode(self, node: int) -> None:
        """
        Forget C{node} and all its files: it left the cluster.
        """
        files = self._files.pop(node, None)
        if files is not None:
            for name in files:
                self._dropHolder(name, node)
            del self._addresses[node]
            self._owned.discard(node)
            self.version += 1

    def clear(self) -> None:
        """
        Forget everything, e.g. when this node stops leading.
        """
        if self._files:
            self._files, self._addresses, self._byName, self._owned = {}, {}, {}, set()
            self.version += 1

    def snapshot(self) -> IndexSnapshot:
        """
        The index as it is now, which later changes do not touch: O(number
        of nodes) to take on the reactor thread, safe to read in another.
        """
        self._owned.clear()
        return IndexSnapshot(dict(self._files), dict(self._addresses), self.version)

    def _holderIds(self, name: str) -> Iterable[int]:
        held = self._byName.get(name)
        return () if held is None else held if isinstance(held, tuple) else (held,)

    def _dropHolder(self, name: str, node: int) -> None:
        held = self._byName.get(name)
        if isinstance(held, tuple):
            rest = tuple(n for n in held if n != node)
            self._byName[name] = rest[0] if len(rest) == 1 else rest
        elif held == node:
            del self._byName[name]

    def _refused(self, node: int, count: int) -> None:
        if count:
            self.log.warn("ignored {count} entries from node {node} that the index cannot hold", count=count, node=node)


def _withHolder(held: Optional[Held], node: int) -> Held:
    # The holders held, with node added.
    if held is None or held == node:
        return node
    if isinstance(held, tuple):
        return held if node in held else tuple(sorted(held + (node,)))
    return (held, node) if held < node else (node, held)


# Names are sorted in runs of at most this many, merged lazily: one sort of
# a million names holds the interpreter lock for seconds, a run of this
# size for a few tens of milliseconds, so a thread sorting a large index
# leaves the reactor thread its turns.
SORT_RUN = 16384


def sortedKeys(view: IndexView) -> Iterator[Tuple[str, int]]:
    """
    Every C{(name, node)} of C{view}, sorted by name then node.
    """
    runs = []
    for node in view.nodes():
        names = list(view.nodeFiles(node))
        for start in range(0, len(names), SORT_RUN):
            run = names[start : start + SORT_RUN]
            run.sort()
            runs.append(zip(run, repeat(node)))
    if len(runs) == 1:
        return runs[0]
    return heapq.merge(*runs)


def _listingRows(snapshot: IndexView) -> Iterator[dict]:
    maps = {node: snapshot.nodeFiles(node) for node in snapshot.nodes()}
    last: Optional[str] = None
    held: List[Tuple[bytes, int]] = []  # (record, node) for the name "last"
    for name, node in chain(sortedKeys(snapshot), [(None, None)]):
        if name != last:
            if len(held) == 1:  # the usual case: one holder, one row
                record, only = held[0]
                yield {"name": last, "size": _RECORD.unpack(record)[0], "sha256": record[_DIGEST].hex(), "holders": [only]}
            elif held:
                groups: Dict[bytes, Tuple[int, List[int]]] = {}
                for record, holder in held:
                    groups.setdefault(record[_DIGEST], (_RECORD.unpack(record)[0], []))[1].append(holder)
                # Raw digests sort as their hex forms do.
                for digest in sorted(groups):
                    yield {"name": last, "size": groups[digest][0], "sha256": digest.hex(), "holders": groups[digest][1]}
            last, held = name, []
        if name is not None:
            held.append((maps[node][name], node))


def listingChunks(snapshot: IndexView, rowsPerChunk: int = 500) -> Iterator[List[dict]]:
    """The rows of L{listingOf} in lists of C{rowsPerChunk} at most, built as consumed."""
    rows = _listingRows(snapshot)
    while True:
        chunk = list(islice(rows, rowsPerChunk))
        if not chunk:
            return
        yield chunk


def listingOf(snapshot: IndexView) -> List[dict]:
    """
    The C{p2pfiles ls --json} contract: one object per distinct
    C{(name, sha256)} (C{name}, C{size}, C{sha256}, C{holders} ascending),
    sorted by name then sha256, so that two different files under one name
    show as two rows, not as one file with misleading holders.  Safe to
    call in a thread on an L{IndexSnapshot}.
    """
    return list(_listingRows(snapshot))


# Characters that json.dumps(ensure_ascii=False) leaves raw but that some line
# splitters (str.splitlines, JavaScript) treat as line ends, plus lone
# surrogates, which cannot be encoded as UTF-8.  They only ever occur inside
# JSON strings, where a \uXXXX escape means the same character.
_UNSAFE = re.compile("[\x85\u2028\u2029\ud800-\udfff]")


def _escapeUnsafe(match: "re.Match[str]") -> str:
    return "\\u%04x" % (ord(match.group()),)


def _nonFinite(value: float) -> str:
    # What json writes for a float that is not finite.
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def _linePrefix(node: int, address: str) -> str:
    # The start of every data line of node, up to the name.
    return _UNSAFE.sub(_escapeUnsafe, '{"node": %s, "address": %s, "name": ' % (int.__repr__(node), encode_basestring(address)))


def _line(prefix: str, name: str, record: bytes) -> str:
    """
    One data line of C{peer_files.log}, ending in a newline: exactly what
    C{json.dumps(dict(zip(LOG_KEYS, values)), ensure_ascii=False,
    separators=(", ", ": "))} writes, unsafe characters escaped, built from
    pieces: the node and address part (C{prefix}, see L{_linePrefix}), the
    name through json's own string encoder, the numbers as json writes
    them.
    """
    size, mtime, digest = _RECORD.unpack(record)
    encoded = encode_basestring(name)
    # Every unsafe character is outside ASCII.
    if not encoded.isascii():
        encoded = _UNSAFE.sub(_escapeUnsafe, encoded)
    # mtime - mtime is 0.0 exactly when mtime is finite.
    mtimeText = float.__repr__(mtime) if mtime - mtime == 0.0 else _nonFinite(mtime)
    return f'{prefix}{encoded}, "size": {size}, "mtime": {mtimeText}, "sha256": "{digest.hex()}"}}\n'


def _keyedLines(view: IndexView) -> Iterator[Tuple[Tuple[str, int], str]]:
    # Every data line of view with its (name, node), sorted by both.
    maps = {node: view.nodeFiles(node) for node in view.nodes()}
    prefixes = {node: _linePrefix(node, view.address(node)) for node in maps}
    line = _line
    for key in sortedKeys(view):
        name, node = key
        yield key, line(prefixes[node], name, maps[node][name])


def _logLines(view: IndexView) -> Iterator[str]:
    """
    The data lines of C{peer_files.log} for C{view} (see L{_line}), each
    ending in a newline, sorted by name then node.
    """
    return (text for key, text in _keyedLines(view))


def _header(view: IndexView, leader: int, epoch: int, now: float) -> bytes:
    return (
        f"# p2pfiles peer_files.log format {LOG_FORMAT_VERSION}\n# leader: {leader}\n# epoch: {epoch}\n"
        f"# written: {_timestamp(now)}\n# nodes: {len(view.nodes())}\n# files: {view.fileCount()}\n"
    ).encode("utf-8")


def _timestamp(now: float) -> str:
    # Round once to milliseconds so that both forms show the same instant.
    seconds, millis = divmod(int(round(now * 1000)), 1000)
    iso = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{iso}.{millis:03d}Z ({seconds}.{millis:03d})"


# Data lines per write(2): about 1 MiB of the usual ~200-byte lines.
LINES_PER_WRITE = 5000


def logChunks(view: IndexView, leader: int, epoch: int, now: float, linesPerChunk: int = LINES_PER_WRITE) -> Iterator[bytes]:
    """
    The content of C{peer_files.log} for C{view} in pieces: the C{#} header
    lines, then C{linesPerChunk} data lines at a time (one JSON object a
    line, sorted by name then node).  Every name goes through JSON escaping
    (see L{_UNSAFE}), so no name can break a line or inject one.
    """
    yield _header(view, leader, epoch, now)
    lines = _logLines(view)
    while True:
        batch = "".join(islice(lines, linesPerChunk))
        if not batch:
            return
        yield batch.encode("utf-8")


def renderLog(index: IndexView, leader: int, epoch: int, now: float) -> bytes:
    """
    Render C{index} (the live index or a snapshot) as the whole content of
    C{peer_files.log} in memory; L{writeLog} streams the same bytes to disk.
    """
    return b"".join(logChunks(index, leader, epoch, now))


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
            cache.write(fd, snapshot, _header(snapshot, leader, epoch, now))
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
            prefix = _linePrefix(node, address)
            added = 0
            for name, record in new.items():
                if old.get(name) != record:
                    dirty[(name, node)] = _line(prefix, name, record)
                    if name not in old:
                        added += 1
                    if len(dirty) > limit:
                        return None
            if len(new) - added != len(old):
                for name in old:
                    if name not in new:
                        dirty[(name, node)] = None
                        if len(dirty) > limit:
                            return None
        return dirty

    def _writeAll(self, fd: int, view: IndexView, start: int) -> List[Tuple[Key, int, int]]:
        pieces = []
        maps = {node: view.nodeFiles(node) for node in view.nodes()}
        prefixes = {node: _linePrefix(node, view.address(node)) for node in maps}
        keys = sortedKeys(view)
        line = _line
        position = start
        while True:
            batch = list(islice(keys, LINES_PER_WRITE))
            if not batch:
                break
            data = "".join([line(prefixes[node], name, maps[node][name]) for name, node in batch]).encode("utf-8")
            _writeAll(fd, data)
            pieces.append((batch[-1], position, position + len(data)))
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


_HEADER_INTS = ("leader", "epoch", "nodes", "files")


def parseLog(data: bytes) -> Tuple[dict, List[dict]]:
    """
    Parse C{peer_files.log} content into its header fields and its rows.
    Lines are split on C{\\n} only, as the format defines them.  Raises
    L{ValueError} on anything malformed.

    The header dict has C{format}, C{leader}, C{epoch}, C{nodes}, C{files}
    (ints), C{written} (the ISO-8601 text) and C{time} (epoch seconds).
    """
    text = data.decode("utf-8")
    if not text.endswith("\n"):
        raise ValueError("log does not end with a newline")
    header: dict = {}
    rows: List[dict] = []
    prefix = "# p2pfiles peer_files.log format "
    for line in text[:-1].split("\n"):
        if line.startswith(prefix):
            header["format"] = int(line[len(prefix) :])
        elif line.startswith("# "):
            key, sep, value = line[2:].partition(": ")
            if not sep:
                raise ValueError(f"malformed header line {line[:80]!r}")
            if key == "written":
                iso, _, seconds = value.partition(" ")
                header["written"] = iso
                header["time"] = float(seconds.strip("()"))
            elif key in _HEADER_INTS:
                header[key] = int(value)
            else:
                header[key] = value
        else:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"log line is not a JSON object: {line[:80]!r}")
            rows.append(row)
    if "format" not in header:
        raise ValueError("log has no format line")
    return header, rows


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
