"""
The leader's cluster index ("the log") and the format of C{peer_files.log}.

The leader gathers every live node's file list into a L{ClusterIndex}; the
index answers "who holds this file" for downloads and "what is shared" for
C{p2pfiles ls}.  L{logChunks} makes the content of C{peer_files.log}, a
line-based file that other tools read, from a snapshot of it, and
L{parseLog} reads it back; L{p2pfiles.peerlog} writes it to disk.

A file costs about 75 bytes: its name in UTF-8 and a 48-byte record (size,
mtime, SHA-256) in the packed buffers of its node's L{PackedFiles};
L{FileEntry} objects are made only when asked for.  A node's map is never
changed, only replaced by one made from it, so a snapshot costs one small
copy per node and can be read in another thread while the index goes on
changing.

This is a decision/data module: it knows nothing of protocols, transports or
the reactor.  Time and threads are handed in by the node service.
"""

import heapq
import re
import struct
from datetime import datetime, timezone
from itertools import chain, islice
import json
from json.encoder import encode_basestring
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from twisted.logger import Logger

from p2pfiles.packed import RECORD_SIZE, PackedBuilder, PackedFiles, packItems
from p2pfiles.wire import FileEntry

LOG_FORMAT_VERSION = 1

# The keys of one data line of peer_files.log, in the order they are written.
LOG_KEYS = ("node", "address", "name", "size", "mtime", "sha256")

Holder = Tuple[int, str, FileEntry]

# One file's record, 48 bytes: size (int64), mtime (float64), raw SHA-256.
_RECORD = struct.Struct("<qd32s")
assert _RECORD.size == RECORD_SIZE
_DIGEST = slice(16, 48)

# One node's name -> record map.
Files = PackedFiles


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


def packEntries(entries: Iterable[FileEntry], into: Union[PackedBuilder, Dict[str, bytes]]) -> int:
    """
    Add every entry's record to C{into} (a L{PackedBuilder}, or a dict keyed
    by the entry's own name object; a later entry of a name wins).  Returns
    how many entries were left out: no record can hold them (see
    L{packEntry}), or a strict builder refused them (out of name order).
    """
    add = into.add if isinstance(into, PackedBuilder) else into.__setitem__
    refused = 0
    for entry in entries:
        try:
            record = packEntry(entry)
        except ValueError:
            refused += 1
        else:
            if add(entry.name, record) is False:
                refused += 1
    return refused


def packFiles(entries: Iterable[FileEntry]) -> Tuple[PackedFiles, int]:
    """
    The L{PackedFiles} of C{entries} (best in name order), and how many no
    record can hold (left out).  O(entries): in a thread for many.
    """
    builder = PackedBuilder()
    refused = packEntries(entries, builder)
    return builder.build(), refused


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

    def nodeFiles(self, node: int) -> PackedFiles:
        """
        The name -> record map of C{node} (see L{unpackEntry}); it never
        changes, so any thread may read it.
        """
        return self._files[node]

    def _holderIds(self, name: str) -> Iterable[int]:
        # Every node's map is asked: a binary search in each, as nodes are few.
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
        return [(node, self._addresses[node], unpackEntry(name, record)) for name, node, record in sortedItems(self)]


class IndexSnapshot(IndexView):
    """
    The index as it was at one moment.  Nothing changes it afterwards, so
    it can be read in any thread (see L{ClusterIndex.snapshot}).
    """


class ClusterIndex(IndexView):
    """
    Every live node's shared files, as the leader knows them.

    Entries are kept per node, as L{PackedFiles} maps, so that a node
    leaving costs only its own files.  Who holds a file is found by asking
    each node's map (a binary search in each: nodes are few), not from a
    name -> holders map beside them, which would cost more than the packed
    entry itself.  C{version} changes whenever the content does, so a
    writer can tell whether the log needs rewriting.  A change replaces the
    node's map with one made from it (see L{PackedFiles.changed}): O(the
    changes kept beside its packed buffers), never O(its files); when those
    grow, L{compactable} names the node and L{compacted} takes the result
    of packing them in, made in a thread.
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__({}, {}, 0)

    def replaceNode(self, node: int, address: str, entries: Union[Files, Mapping[str, bytes], Iterable[FileEntry]]) -> None:
        """
        Set the full index of C{node}, as gathered from it.  A node with no
        files is still recorded as present.

        C{entries} is either L{FileEntry} objects or a name -> record map
        (see L{packEntry}), best an already built L{PackedFiles}, which the
        index then holds as it is.
        """
        if isinstance(entries, PackedFiles):
            files = entries
        elif isinstance(entries, Mapping):
            files = packItems(sorted(entries.items()))
        else:
            files, refused = packFiles(entries)
            self._refused(node, refused)
        old = self._files.get(node)
        # Compared only as cheaply as it can be: a list found equal name by
        # name would cost O(files) on the reactor to save one log write.
        if old is not None and old.quicklyEqual(files) and self._addresses[node] == address:
            return
        self._files[node] = files
        self._addresses[node] = address
        self.version += 1

    def applyChanges(self, node: int, address: str, changed: Iterable[FileEntry], removed: Iterable[str]) -> None:
        """
        Apply an incremental update from C{node}: C{changed} entries replace
        any of the same name, C{removed} names go.  Removing a name the node
        does not have is not an error: updates may cross a full gather.
        """
        records: Dict[str, bytes] = {}
        self._refused(node, packEntries(changed, records))
        current = self._files.get(node)
        if current is None:
            current = PackedFiles.empty()
        files = current.changed(records, removed)
        if files is current and node in self._files and self._addresses[node] == address:
            return
        self._files[node] = files
        self._addresses[node] = address
        self.version += 1

    def compactable(self) -> List[int]:
        """
        The nodes whose maps hold enough changes beside their packed
        buffers that packing them in pays (see L{compacted}).
        """
        return [node for node, files in sorted(self._files.items()) if files.wantsCompacting()]

    def compacted(self, node: int, older: PackedFiles, packed: PackedFiles) -> None:
        """
        C{packed} is C{older.compacted()}, made in a thread: take it for
        C{node}, with any changes made since C{older} carried over, if the
        node's map still comes from C{older}.  The content is the same, so
        the version does not change.
        """
        current = self._files.get(node)
        if current is None:
            return
        rebased = current.rebased(older, packed)
        if rebased is not None:
            self._files[node] = rebased

    def removeNode(self, node: int) -> None:
        """
        Forget C{node} and all its files: it left the cluster.
        """
        if self._files.pop(node, None) is not None:
            del self._addresses[node]
            self.version += 1

    def clear(self) -> None:
        """
        Forget everything, e.g. when this node stops leading.
        """
        if self._files:
            self._files, self._addresses = {}, {}
            self.version += 1

    def snapshot(self) -> IndexSnapshot:
        """
        The index as it is now, which later changes do not touch: O(number
        of nodes) to take on the reactor thread, safe to read in another.
        """
        return IndexSnapshot(dict(self._files), dict(self._addresses), self.version)

    def _refused(self, node: int, count: int) -> None:
        if count:
            self.log.warn("ignored {count} entries from node {node} that the index cannot hold", count=count, node=node)


class Compactor:
    """
    Packs in the changes that the maps of a L{ClusterIndex} keep beside
    their packed buffers, once they are many (see L{ClusterIndex.compactable}):
    one node at a time, each in a thread (C{runInThread(f)} returns a
    Deferred).  The node keeping the index calls L{start} at every change.
    """

    log = Logger()

    def __init__(self, index: ClusterIndex, runInThread: Callable[..., Any]) -> None:
        self.index = index
        self.runInThread = runInThread
        self.running = False

    def start(self) -> None:
        """
        Compact the first node that needs it, unless a compaction runs.
        """
        nodes = self.index.compactable()
        if self.running or not nodes:
            return
        self.running = True
        node = nodes[0]
        older = self.index.nodeFiles(node)

        def compacted(packed: PackedFiles) -> None:
            self.running = False
            self.index.compacted(node, older, packed)
            self.start()

        def failed(reason: Any) -> None:
            # Tried again at the next change, not at once.
            self.running = False
            self.log.failure("cannot compact node {node}'s files", reason, node=node)

        self.runInThread(older.compacted).addCallbacks(compacted, failed)


def sortedItems(view: IndexView) -> Iterator[Tuple[str, int, bytes]]:
    """
    Every C{(name, node, record)} of C{view}, sorted by name then node: the
    nodes' maps, each in name order already, merged as consumed.
    """
    runs = [_tagged(node, view.nodeFiles(node)) for node in view.nodes()]
    if len(runs) == 1:
        return runs[0]
    return heapq.merge(*runs)


def _tagged(node: int, files: PackedFiles) -> Iterator[Tuple[str, int, bytes]]:
    for name, record in files.items():
        yield name, node, record


def _listingRows(snapshot: IndexView) -> Iterator[dict]:
    last: Optional[str] = None
    held: List[Tuple[bytes, int]] = []  # (record, node) for the name "last"
    for name, node, itsRecord in chain(sortedItems(snapshot), [(None, None, None)]):
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
            held.append((itsRecord, node))


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


def linePrefix(node: int, address: str) -> str:
    # The start of every data line of node, up to the name.
    return _UNSAFE.sub(_escapeUnsafe, '{"node": %s, "address": %s, "name": ' % (int.__repr__(node), encode_basestring(address)))


def formatLine(prefix: str, name: str, record: bytes) -> str:
    """
    One data line of C{peer_files.log}, ending in a newline: exactly what
    C{json.dumps(dict(zip(LOG_KEYS, values)), ensure_ascii=False,
    separators=(", ", ": "))} writes, unsafe characters escaped, built from
    pieces: the node and address part (C{prefix}, see L{linePrefix}), the
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
    prefixes = {node: linePrefix(node, view.address(node)) for node in view.nodes()}
    line = formatLine
    for name, node, record in sortedItems(view):
        yield (name, node), line(prefixes[node], name, record)


def _logLines(view: IndexView) -> Iterator[str]:
    """
    The data lines of C{peer_files.log} for C{view} (see L{formatLine}), each
    ending in a newline, sorted by name then node.
    """
    return (text for key, text in _keyedLines(view))


def headerOf(view: IndexView, leader: int, epoch: int, now: float) -> bytes:
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
    yield headerOf(view, leader, epoch, now)
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
