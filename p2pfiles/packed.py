"""
One node's files as the cluster index holds them: L{PackedFiles}, a read-only
name -> record map (see L{p2pfiles.index.packEntry}) at about 75 bytes a
file, where a C{dict} of C{str} -> C{bytes} costs about 200.

The files of a full list are packed in name order into three flat buffers:
the names in UTF-8 one after the other, where each ends (an array of
integers), and the 48-byte records.  A name is found by binary search.  What
changes afterwards is kept beside them in a small C{dict} (a record, or
L{None} for a name that went), so that a change costs O(the changes so far),
never O(the node's files).  A map is never changed once made: a change makes
a new map sharing the buffers, so a map can be read in any thread while the
index goes on changing, and a snapshot of the index costs nothing per file.
When the changes grow to a part of the whole, L{PackedFiles.compacted} packs
them in (in a thread); L{PackedFiles.rebased} then carries the changes made
meanwhile over to the compacted map.

Iteration is in name order (the order of Python's C{str} comparison, which
is the order of the UTF-8 bytes), so that the log and C{ls} merge the
nodes' maps without sorting anything.

This is a data module: no reactor, no I/O.
"""

import heapq
from array import array
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

__all__ = ["PackedBuilder", "PackedFiles", "RECORD_SIZE", "differences", "packItems"]

RECORD_SIZE = 48

# Name bytes are read back with this, so that any str makes a round trip.
_ENCODING = ("utf-8", "surrogatepass")

_MISSING = object()

# Changes kept beside the packed buffers before a compaction pays: at least
# this many, and at least this fraction of the files.
COMPACT_MIN = 4096
COMPACT_FRACTION = 8


def _encode(name: str) -> bytes:
    return name.encode(*_ENCODING)


class PackedFiles(Mapping[str, bytes]):
    """
    A read-only name -> 48-byte record map, iterated in name order.  Build
    one with L{PackedBuilder} or L{packItems}; L{changed} makes the next.
    """

    __slots__ = ("_names", "_ends", "_records", "_changes", "_length")

    def __init__(self, names: bytes, ends: "array[int]", records: bytes, changes: Dict[str, Optional[bytes]], length: int) -> None:
        # names[ends[i]:ends[i + 1]] is the i-th packed name; ends[0] == 0.
        self._names = names
        self._ends = ends
        self._records = records
        self._changes = changes
        self._length = length

    @classmethod
    def empty(cls) -> "PackedFiles":
        return cls(b"", array("Q", [0]), b"", {}, 0)

    # The packed part.

    def _packedCount(self) -> int:
        return len(self._ends) - 1

    def _position(self, raw: bytes) -> int:
        # Where raw is, or would go, among the packed names.
        names, ends = self._names, self._ends
        low, high = 0, len(ends) - 1
        while low < high:
            middle = (low + high) // 2
            if names[ends[middle] : ends[middle + 1]] < raw:
                low = middle + 1
            else:
                high = middle
        return low

    def _packedGet(self, name: str) -> Optional[bytes]:
        raw = _encode(name)
        at = self._position(raw)
        ends = self._ends
        if at < len(ends) - 1 and self._names[ends[at] : ends[at + 1]] == raw:
            return self._records[at * RECORD_SIZE : (at + 1) * RECORD_SIZE]
        return None

    def _packedItems(self) -> Iterator[Tuple[str, bytes]]:
        names, ends, records = self._names, self._ends, self._records
        start = 0
        for at in range(1, len(ends)):
            end = ends[at]
            offset = (at - 1) * RECORD_SIZE
            yield names[start:end].decode(*_ENCODING), records[offset : offset + RECORD_SIZE]
            start = end

    # The Mapping.

    def __len__(self) -> int:
        return self._length

    def get(self, name: str, default: Optional[bytes] = None) -> Optional[bytes]:  # type: ignore[override]
        record = self._changes.get(name, _MISSING)
        if record is _MISSING:
            record = self._packedGet(name)
        return default if record is None else record  # type: ignore[return-value]

    def __getitem__(self, name: str) -> bytes:
        record = self.get(name)
        if record is None:
            raise KeyError(name)
        return record

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> Iterator[Tuple[str, bytes]]:  # type: ignore[override]
        """
        Every C{(name, record)}, in name order, made as consumed.
        """
        packed = self._packedItems()
        if not self._changes:
            return packed
        return self._merged(packed)

    def _merged(self, packed: Iterator[Tuple[str, bytes]]) -> Iterator[Tuple[str, bytes]]:
        changes = self._changes
        changed = _sortedInRuns(changes)
        at, count = 0, len(changed)
        for name, record in packed:
            while at < count and changed[at] < name:
                replacement = changes[changed[at]]
                if replacement is not None:
                    yield changed[at], replacement
                at += 1
            if name in changes:
                continue  # changed or removed: given in its turn above or below
            yield name, record
        for name in changed[at:]:
            replacement = changes[name]
            if replacement is not None:
                yield name, replacement

    def __iter__(self) -> Iterator[str]:
        return (name for name, record in self.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        if isinstance(other, PackedFiles):
            if self.quicklyEqual(other):
                return True
            if not (self._changes or other.changeCount):
                return False  # packed whole, both: the buffers are the content
            return all(a == b for a, b in zip(self.items(), other.items()))
        return all(other.get(name) == record for name, record in self.items())

    __hash__ = None  # type: ignore[assignment]

    def quicklyEqual(self, other: "PackedFiles") -> bool:
        """
        Whether C{other} is certainly equal, told at the cost of comparing
        the buffers (C{memcmp}), never name by name: the same map, or both
        with no changes and equal buffers.  L{False} says nothing.
        """
        if other is self:
            return True
        ends, names, records, changes = other._layout
        return not (self._changes or changes) and (self._ends, self._names, self._records) == (ends, names, records)

    def __repr__(self) -> str:
        return f"<PackedFiles of {self._length} names, {len(self._changes)} changed>"

    @property
    def _layout(self) -> Tuple["array[int]", bytes, bytes, Dict[str, Optional[bytes]]]:
        # What another map of this class compares and shares with this one.
        return self._ends, self._names, self._records, self._changes

    # Changes.

    @property
    def changeCount(self) -> int:
        """
        How many names are kept as changes beside the packed buffers.
        """
        return len(self._changes)

    def wantsCompacting(self) -> bool:
        return len(self._changes) >= max(COMPACT_MIN, self._packedCount() // COMPACT_FRACTION)

    def changed(self, records: Mapping[str, bytes], removed: Iterable[str]) -> "PackedFiles":
        """
        This map with C{records} set and the C{removed} names gone (a name
        not held is not an error).  C{self} if that changes nothing.
        """
        changes: Optional[Dict[str, Optional[bytes]]] = None
        length = self._length

        def lookup(name: str) -> Tuple[Optional[bytes], Optional[bytes]]:
            # The name's record now and its packed one: one search each.
            packed = self._packedGet(name)
            record = (self._changes if changes is None else changes).get(name, _MISSING)
            return (packed if record is _MISSING else record), packed  # type: ignore[return-value]

        for name, record in records.items():
            old, packed = lookup(name)
            if old == record:
                continue
            if changes is None:
                changes = dict(self._changes)
            if old is None:
                length += 1
            if packed == record:
                del changes[name]  # back to the packed record
            else:
                changes[name] = record
        for name in removed:
            old, packed = lookup(name)
            if old is None:
                continue
            if changes is None:
                changes = dict(self._changes)
            length -= 1
            if packed is None:
                del changes[name]
            else:
                changes[name] = None
        if changes is None:
            return self
        return PackedFiles(self._names, self._ends, self._records, changes, length)

    def differences(self, older: "PackedFiles") -> Optional[Dict[str, Optional[bytes]]]:
        """
        What differs from C{older} (name -> record here, or L{None} where
        the name is gone), if both share their packed buffers, as maps made
        by L{changed} from one another do: O(their changes).  L{None} if
        they do not (compare them whole, then).
        """
        ends, _, _, olderChanges = older._layout
        if self._ends is not ends:
            return None
        result: Dict[str, Optional[bytes]] = {}
        for name in set(self._changes) | set(olderChanges):
            mine = self.get(name)
            if mine != older.get(name):
                result[name] = mine
        return result

    def compacted(self) -> "PackedFiles":
        """
        The same map with its changes packed in: O(files); run it in a
        thread.
        """
        return packItems(self.items())

    def rebased(self, older: "PackedFiles", compacted: "PackedFiles") -> Optional["PackedFiles"]:
        """
        This map on the buffers of C{compacted} (C{older.compacted()}),
        where C{self} was made from C{older} by changes since; L{None} if
        C{self} does not share C{older}'s buffers.
        """
        differences = self.differences(older)
        if differences is None:
            return None
        return compacted.changed(
            {name: record for name, record in differences.items() if record is not None},
            [name for name, record in differences.items() if record is None],
        )


class PackedBuilder:
    """
    Packs C{(name, record)} pairs given in name order into a L{PackedFiles}.
    A pair out of order (or a name again) is kept as a change, where a later
    pair of a name wins, so any order gives the right map; or, if C{strict}
    (a list from another node, which must come in order), refused: keeping
    many as changes would cost their packing on the reactor at L{build}.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._names = bytearray()
        self._ends = array("Q", [0])
        self._records = bytearray()
        self._last: Optional[bytes] = None
        self._late: Dict[str, bytes] = {}

    def add(self, name: str, record: bytes) -> bool:
        """
        Add a pair; L{False} if it was refused (see C{strict}).
        """
        if len(record) != RECORD_SIZE:
            raise ValueError(f"a record is {RECORD_SIZE} bytes, not {len(record)}")
        raw = _encode(name)
        if self._last is not None and raw <= self._last:
            if self.strict:
                return False
            self._late[name] = record
            return True
        self._last = raw
        self._names += raw
        self._ends.append(len(self._names))
        self._records += record
        return True

    def __len__(self) -> int:
        return len(self._ends) - 1 + len(self._late)

    def build(self) -> PackedFiles:
        """
        The map of every pair added.  The builder is empty afterwards.
        """
        files = PackedFiles(bytes(self._names), self._ends, bytes(self._records), {}, len(self._ends) - 1)
        late = self._late
        self.__init__(self.strict)  # type: ignore[misc]
        return files.changed(late, ()) if late else files


def packItems(items: Iterable[Tuple[str, bytes]]) -> PackedFiles:
    """
    The L{PackedFiles} of C{items} (best in name order; a later pair of a
    name wins).
    """
    builder = PackedBuilder()
    add = builder.add
    for name, record in items:
        add(name, record)
    return builder.build()


# Changes are sorted in runs of at most this many, merged as read: one sort
# of 100,000 names holds the interpreter lock for tens of milliseconds.
SORT_RUN = 4096


def _sortedInRuns(names: Iterable[str]) -> List[str]:
    names = list(names)
    if len(names) <= SORT_RUN:
        return sorted(names)
    runs = [sorted(names[at : at + SORT_RUN]) for at in range(0, len(names), SORT_RUN)]
    return list(heapq.merge(*runs))


def differences(older: Mapping[str, bytes], newer: Mapping[str, bytes]) -> Iterator[Tuple[str, Optional[bytes]]]:
    """
    Every name whose record differs between C{older} and C{newer}, with its
    record in C{newer} (L{None}: gone), in no set order: O(their changes)
    for maps made from one another (see L{PackedFiles.differences}), else
    one pass over both in name order.
    """
    if isinstance(newer, PackedFiles) and isinstance(older, PackedFiles):
        found = newer.differences(older)
        if found is not None:
            return iter(found.items())
    return _mergedDifferences(_sortedItems(older), _sortedItems(newer))


def _sortedItems(files: Mapping[str, bytes]) -> Iterator[Tuple[str, bytes]]:
    return files.items() if isinstance(files, PackedFiles) else iter(sorted(files.items()))


def _mergedDifferences(older: Iterator[Tuple[str, bytes]], newer: Iterator[Tuple[str, bytes]]) -> Iterator[Tuple[str, Optional[bytes]]]:
    old = next(older, None)
    new = next(newer, None)
    while old is not None or new is not None:
        if new is None or (old is not None and old[0] < new[0]):
            yield old[0], None  # type: ignore[index]
            old = next(older, None)
        elif old is None or new[0] < old[0]:
            yield new
            new = next(newer, None)
        else:
            if old[1] != new[1]:
                yield new
            old = next(older, None)
            new = next(newer, None)
