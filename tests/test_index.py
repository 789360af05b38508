"""
Tests for L{p2pfiles.index}: the cluster index, the C{peer_files.log} format
and the coalescing atomic writer.
"""

import errno
import json
import os
import re
from typing import Dict, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import atomic
from p2pfiles import peerlog
from p2pfiles.index import (
    LOG_KEYS,
    ClusterIndex,
    Compactor,
    IndexSnapshot,
    listingChunks,
    listingOf,
    logChunks,
    packEntries,
    packEntry,
    packFiles,
    parseLog,
    renderLog,
    unpackEntry,
)
from p2pfiles.packed import COMPACT_MIN
from p2pfiles.peerlog import LogCache, LogContent, LogWriter, writeLog
from p2pfiles.wire import FileEntry

HEADER_LINES = 6


def sha(c: str) -> str:
    return c * 64


def entry(name: str, digest: str = "a", size: int = 10, mtime: float = 1.5) -> FileEntry:
    return FileEntry(name, size, mtime, sha(digest))


def syncThread(f, *args):
    return defer.maybeDeferred(f, *args)


class ClusterIndexTests(SynchronousTestCase):
    """
    Tests for L{ClusterIndex}.
    """

    def test_replaceNode(self) -> None:
        """
        C{replaceNode} sets a node's full list, dropping files it no longer
        reports, and a node replaced with no files still counts as present.
        """
        index = ClusterIndex()
        index.replaceNode(2, "h:2", [entry("a"), entry("b")])
        index.replaceNode(2, "h:2", [entry("b", "c")])
        index.replaceNode(3, "h:3", [])
        self.assertEqual(index.nodes(), [2, 3])
        self.assertTrue(index.hasNode(3))
        self.assertEqual(index.fileCount(), 1)
        self.assertEqual(index.holders("a"), [])
        self.assertEqual(index.holders("b"), [(2, "h:2", entry("b", "c"))])

    def test_applyChanges(self) -> None:
        """
        C{applyChanges} replaces entries of the same name, removes listed
        names, ignores unknown removed names and records a new node.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry("a"), entry("b")])
        index.applyChanges(1, "h:1", [entry("a", "d"), entry("c")], ["b", "nope"])
        index.applyChanges(4, "h:4", [], ["ghost"])
        self.assertEqual(
            [(n, e) for n, _, e in index.entries()],
            [(1, entry("a", "d")), (1, entry("c"))],
        )
        self.assertEqual(index.nodes(), [1, 4])
        self.assertEqual(index.holders("b"), [])

    def test_removeNodeAndClear(self) -> None:
        """
        C{removeNode} drops every file of that node and only those;
        C{clear} empties the index.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry("a"), entry("b")])
        index.replaceNode(2, "h:2", [entry("a")])
        index.removeNode(1)
        index.removeNode(9)
        self.assertEqual(index.nodes(), [2])
        self.assertEqual(index.holders("a"), [(2, "h:2", entry("a"))])
        self.assertEqual(index.holders("b"), [])
        index.clear()
        self.assertEqual((index.nodes(), index.fileCount(), index.entries()), ([], 0, []))

    def test_version(self) -> None:
        """
        C{version} moves on every change of content and stays put when an
        update changes nothing, so a writer can skip needless rewrites.
        """
        index = ClusterIndex()
        versions = [index.version]
        index.replaceNode(1, "h:1", [entry("a")])
        versions.append(index.version)
        index.replaceNode(1, "h:1", [entry("a")])
        index.applyChanges(1, "h:1", [entry("a")], ["missing"])
        index.removeNode(7)
        versions.append(index.version)
        index.applyChanges(1, "h:1", [], ["a"])
        versions.append(index.version)
        index.replaceNode(1, "h:other", [])
        versions.append(index.version)
        index.clear()
        versions.append(index.version)
        self.assertEqual(versions, [0, 1, 1, 2, 3, 4])

    def test_holdersExactName(self) -> None:
        """
        C{holders} matches the name exactly: asking for C{a.png} never
        returns C{aa.png} or C{a.png.bak}; results are sorted by node id and
        can be narrowed by SHA-256.
        """
        index = ClusterIndex()
        index.replaceNode(5, "h:5", [entry("a.png", "b")])
        index.replaceNode(3, "h:3", [entry("a.png"), entry("aa.png")])
        index.replaceNode(4, "h:4", [entry("a.png.bak")])
        self.assertEqual([n for n, _, _ in index.holders("a.png")], [3, 5])
        self.assertEqual(index.holders("a.png", sha("b")), [(5, "h:5", entry("a.png", "b"))])
        self.assertEqual(index.holders("a.pn"), [])

    def test_listing(self) -> None:
        """
        C{listing} has one row per distinct (name, sha256), sorted by name
        then sha256, with holders ascending.
        """
        index = ClusterIndex()
        index.replaceNode(3, "h:3", [entry("x", "b", 5), entry("y")])
        index.replaceNode(1, "h:1", [entry("x", "b", 5)])
        index.replaceNode(2, "h:2", [entry("x", "a", 7)])
        self.assertEqual(
            index.listing(),
            [
                {"name": "x", "size": 7, "sha256": sha("a"), "holders": [2]},
                {"name": "x", "size": 5, "sha256": sha("b"), "holders": [1, 3]},
                {"name": "y", "size": 10, "sha256": sha("a"), "holders": [3]},
            ],
        )
        self.assertEqual(list(index.listing()[0]), ["name", "size", "sha256", "holders"])


class SnapshotTests(SynchronousTestCase):
    """
    L{ClusterIndex.snapshot} is a copy that later changes do not reach.
    """

    def test_independent(self) -> None:
        """
        Changes to the index after a snapshot leave the snapshot as it was,
        and the snapshot renders the same log the index did when taken.
        """
        index = ClusterIndex()
        index.replaceNode(1, "127.0.0.1:9001", [entry("a"), entry("b")])
        index.replaceNode(2, "127.0.0.1:9002", [entry("a")])
        before = renderLog(index, 1, 3, 100.0)
        copy = index.snapshot()
        index.applyChanges(1, "127.0.0.1:9001", [entry("c")], ["a"])
        index.removeNode(2)
        self.assertEqual(renderLog(copy, 1, 3, 100.0), before)
        self.assertEqual([h[0] for h in copy.holders("a")], [1, 2])
        self.assertEqual(index.holders("a"), [])


class RenderLogTests(SynchronousTestCase):
    """
    Tests for L{renderLog} and L{parseLog}: the C{peer_files.log} contract.
    """

    def test_header(self) -> None:
        """
        The log starts with the six header lines in the documented shape,
        including the leader's own node among the node count.
        """
        index = ClusterIndex()
        index.replaceNode(1, "127.0.0.1:9001", [entry("a")])
        index.replaceNode(2, "127.0.0.1:9002", [entry("b"), entry("c")])
        index.replaceNode(3, "127.0.0.1:9003", [])
        data = renderLog(index, leader=1, epoch=7, now=1764096934.123)
        self.assertEqual(
            data.decode("utf-8").split("\n")[:HEADER_LINES],
            [
                "# p2pfiles peer_files.log format 1",
                "# leader: 1",
                "# epoch: 7",
                "# written: 2025-11-25T18:55:34.123Z (1764096934.123)",
                "# nodes: 3",
                "# files: 3",
            ],
        )
        header, rows = parseLog(data)
        self.assertEqual(
            header,
            {
                "format": 1,
                "leader": 1,
                "epoch": 7,
                "written": "2025-11-25T18:55:34.123Z",
                "time": 1764096934.123,
                "nodes": 3,
                "files": 3,
            },
        )
        self.assertEqual(len(rows), 3)

    def test_rows(self) -> None:
        """
        Data lines are JSON objects with exactly the documented keys in
        order, formatted like the example, sorted by name then node, with
        the leader's own files listed like anyone's; the file ends with a
        newline.
        """
        index = ClusterIndex()
        index.replaceNode(2, "127.0.0.1:9002", [FileEntry("12241300.png", 3000001, 1764000000.5, sha("e"))])
        index.replaceNode(1, "127.0.0.1:9001", [entry("b"), entry("12241300.png", "f")])
        data = renderLog(index, leader=1, epoch=1, now=0)
        self.assertTrue(data.endswith(b"\n"))
        lines = data.decode("utf-8").split("\n")[HEADER_LINES:-1]
        self.assertEqual(
            lines[1],
            '{"node": 2, "address": "127.0.0.1:9002", "name": "12241300.png", '
            '"size": 3000001, "mtime": 1764000000.5, "sha256": "' + sha("e") + '"}',
        )
        rows = [json.loads(line) for line in lines]
        self.assertEqual([(r["name"], r["node"]) for r in rows], [("12241300.png", 1), ("12241300.png", 2), ("b", 1)])
        for row in rows:
            self.assertEqual(list(row), ["node", "address", "name", "size", "mtime", "sha256"])

    def test_empty(self) -> None:
        """
        An empty index renders as the header alone, with zero counts.
        """
        data = renderLog(ClusterIndex(), leader=4, epoch=2, now=0.0)
        self.assertEqual(len(data.split(b"\n")), HEADER_LINES + 1)
        header, rows = parseLog(data)
        self.assertEqual((header["nodes"], header["files"], header["written"], rows), (0, 0, "1970-01-01T00:00:00.000Z", []))

    def assertRoundTrips(self, names) -> None:
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry(name) for name in names])
        data = renderLog(index, leader=1, epoch=1, now=1.0)
        text = data.decode("utf-8")
        self.assertEqual(len(text.split("\n")), HEADER_LINES + len(set(names)) + 1)
        self.assertEqual(len(text.splitlines()), HEADER_LINES + len(set(names)))
        header, rows = parseLog(data)
        self.assertEqual([r["name"] for r in rows], sorted(set(names)))

    def test_escaping(self) -> None:
        """
        Names with newlines, tabs, quotes, backslashes, non-ASCII text and
        Unicode line separators cannot break or inject a line, for a
        C{\\n} splitter or for C{str.splitlines}, and parse back unchanged.
        """
        names = [
            'a\n{"node": 9, "name": "evil"}',
            "tab\there",
            'quote"d',
            "back\\slash",
            "caf\u00e9 \u65e5\u672c",
            "sep\u2028arator\u2029para",
            "nel\x85line",
            "cr\rlf\r\n",
            "# not a header",
        ]
        self.assertRoundTrips(names)

    def test_loneSurrogate(self) -> None:
        """
        A lone surrogate (impossible from valid UTF-8, but not impossible
        in a str) does not crash rendering and round-trips as an escape.
        """
        self.assertRoundTrips(["bad\udcffname"])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.text(), max_size=8))
    def test_arbitraryNames(self, names) -> None:
        """
        For arbitrary text names the log has exactly one line per entry
        after the header, and every name parses back unchanged.
        """
        self.assertRoundTrips(names)


class LogWriterTests(SynchronousTestCase):
    """
    Tests for L{LogWriter}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("peer_files.log")
        self.state = [b"0\n"]
        self.renders = 0

    def render(self) -> bytes:
        self.renders += 1
        return self.state[0]

    def writer(self, runInThread=syncThread) -> LogWriter:
        writer = LogWriter(self.path, self.clock, runInThread, minInterval=0.25)
        return writer

    def test_slowRenderingRunsInTheThread(self) -> None:
        """
        A render that returns a callable has that callable run by
        C{runInThread}, with the write, not on the reactor thread.
        """
        calls = []

        def runInThread(f, *args):
            calls.append("thread")
            return syncThread(f, *args)

        def build() -> bytes:
            calls.append("build")
            return b"built\n"

        writer = self.writer(runInThread)
        writer.changed(lambda: build)
        self.clock.advance(0)
        self.assertEqual(calls, ["thread", "build"])
        self.assertEqual(self.path.getContent(), b"built\n")

    def test_coalesced(self) -> None:
        """
        A change when quiet is written at once (changes made in the same
        turn ride along); ten more changes within C{minInterval} of that
        write's start cost one more write, which renders the latest state,
        once, C{minInterval} after the first write started.
        """
        writer = self.writer()
        writer.changed(self.render)
        writer.changed(self.render)
        self.assertEqual(writer.writes, 0)
        self.clock.advance(0)
        self.assertEqual((writer.writes, self.renders), (1, 1))
        for i in range(10):
            self.state[0] = b"%d\n" % (i,)
            writer.changed(self.render)
            self.clock.advance(0.02)
        self.assertEqual((writer.writes, self.renders), (1, 1))
        self.clock.advance(0.05)
        self.assertEqual((writer.writes, self.renders), (2, 2))
        self.assertEqual(self.path.getContent(), b"9\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_changeDuringWrite(self) -> None:
        """
        A change while a write is in flight leads to exactly one more write,
        started as soon as the running one ends, with the newer state; none
        overlaps the running one.
        """
        pending = []

        def runInThread(f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

        writer = self.writer(runInThread)
        writer.changed(self.render)
        self.clock.advance(0.25)
        self.assertEqual(len(pending), 1)
        self.state[0] = b"1\n"
        writer.changed(self.render)
        writer.changed(self.render)
        self.clock.advance(5)
        self.assertEqual(len(pending), 1)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.assertEqual(writer.writes, 1)
        self.clock.advance(0)
        self.assertEqual(len(pending), 1)
        d, f, args = pending.pop()
        self.assertEqual(args[1], b"1\n")
        d.callback(f(*args))
        self.assertEqual(writer.writes, 2)
        self.clock.advance(10)
        self.assertEqual((pending, writer.writes), ([], 2))

    def test_atomicReplace(self) -> None:
        """
        The write goes to a temporary file that is renamed over the log:
        the final path is never opened for writing, a reader before the
        rename sees the whole old content, and no temporary file remains.
        """
        self.path.setContent(b"old\n")
        opened = []
        seenBeforeRename = []
        realOpen, realReplace = os.open, os.replace

        def recordingOpen(path, flags, *args):
            if flags & (os.O_WRONLY | os.O_RDWR):
                opened.append(path)
            return realOpen(path, flags, *args)

        def checkingReplace(src, dst):
            seenBeforeRename.append(FilePath(dst).getContent())
            return realReplace(src, dst)

        self.patch(atomic.os, "open", recordingOpen)
        self.patch(atomic.os, "replace", checkingReplace)
        writer = self.writer()
        self.state[0] = b"new content\n" * 1000
        writer.changed(self.render)
        self.successResultOf(writer.flush())
        self.assertNotIn(self.path.path, opened)
        self.assertEqual(len(opened), 1)
        self.assertEqual(seenBeforeRename, [b"old\n"])
        self.assertEqual(self.path.getContent(), self.state[0])
        self.assertEqual(self.path.parent().listdir(), ["peer_files.log"])

    def test_failedWrite(self) -> None:
        """
        A failed write is logged as one error line with its reason, leaves no
        unhandled error, and a later change is still written.
        """
        fail = [True]

        def runInThread(f, *args):
            if fail[0]:
                return defer.fail(PermissionError(13, "Permission denied"))
            return syncThread(f, *args)

        writer = self.writer(runInThread)
        with capturedLogs() as events:
            writer.changed(self.render)
            self.clock.advance(0.25)
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("Permission denied", errors[0]["reason"])
        self.assertEqual(writer.writes, 0)
        fail[0] = False
        writer.changed(self.render)
        self.clock.advance(0.25)
        self.assertEqual(writer.writes, 1)
        self.assertEqual(self.path.getContent(), b"0\n")

    def test_failedRender(self) -> None:
        """
        A render that raises is logged, skips that write, and does not stop
        later writes.
        """
        writer = self.writer()
        writer.changed(lambda: 1 // 0)
        self.successResultOf(writer.flush())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        writer.changed(self.render)
        self.successResultOf(writer.flush())
        self.assertEqual(writer.writes, 1)

    def test_flush(self) -> None:
        """
        C{flush} writes a pending change at once and cancels the timer; with
        nothing pending it fires at once without writing.
        """
        writer = self.writer()
        self.successResultOf(writer.flush())
        self.assertEqual(writer.writes, 0)
        writer.changed(self.render)
        self.successResultOf(writer.flush())
        self.assertEqual(writer.writes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushDuringWrite(self) -> None:
        """
        C{flush} during a write waits for it, then writes the change made
        meanwhile, and fires only when that is on disk.
        """
        pending = []

        def runInThread(f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

        writer = self.writer(runInThread)
        writer.changed(self.render)
        self.clock.advance(0.25)
        self.state[0] = b"1\n"
        writer.changed(self.render)
        flushed = writer.flush()
        self.assertNoResult(flushed)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.assertNoResult(flushed)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.successResultOf(flushed)
        self.assertEqual((writer.writes, self.path.getContent()), (2, b"1\n"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """
        C{stop} cancels a scheduled write, leaving no delayed call, and
        later changes are ignored.
        """
        writer = self.writer()
        writer.changed(self.render)
        self.successResultOf(writer.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        writer.changed(self.render)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.path.exists())

    def test_stopDuringWrite(self) -> None:
        """
        C{stop} during a write fires only when the write ends, and no
        further write is scheduled even if a change was pending.
        """
        pending = []

        def runInThread(f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

        writer = self.writer(runInThread)
        writer.changed(self.render)
        self.clock.advance(0.25)
        writer.changed(self.render)
        stopped = writer.stop()
        self.assertNoResult(stopped)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.successResultOf(stopped)
        self.assertEqual((writer.writes, pending), (1, []))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# The data line of the log format as first defined: json.dumps of the whole
# object, then the unsafe characters escaped.  The streamed writer must
# produce exactly these bytes.
_REFERENCE_UNSAFE = re.compile("[\\x85\\u2028\\u2029\\ud800-\\udfff]")


def referenceLine(node: int, address: str, entry: FileEntry) -> str:
    values = (node, address, entry.name, entry.size, entry.mtime, entry.sha256)
    text = json.dumps(dict(zip(LOG_KEYS, values)), ensure_ascii=False, separators=(", ", ": "))
    return _REFERENCE_UNSAFE.sub(lambda m: "\\u%04x" % (ord(m.group()),), text)


def referenceLines(model: Dict[int, Tuple[str, List[FileEntry]]]) -> List[str]:
    rows = [(e.name, node, address, e) for node, (address, entries) in model.items() for e in entries]
    rows.sort(key=lambda row: (row[0], row[1]))
    return [referenceLine(node, address, e) for _, node, address, e in rows]


HOSTILE_NAMES = [
    'a\n{"node": 9, "name": "evil"}',
    "tab\there",
    'quote"d',
    "back\\slash",
    "back\\\\\\\\slashes\\\\",
    "caf\u00e9 \u65e5\u672c",
    "sep\u2028arator\u2029para",
    "nel\x85line",
    "cr\rlf\r\n",
    "# not a header",
    "bad\udcffname",
    "\ud800lead",
    "ctrl\x00\x01\x1f\x7f",
    "emoji \U0001f600",
    "</script>",
    "",
]

ODD_MTIMES = [0.0, -1.5, 1e-7, 5e-324, 1e22, 1.7976931348623157e308, 0.1 + 0.2, 1704067200.1234567, 123456789.123456789]


def buildModel(names=HOSTILE_NAMES) -> Dict[int, Tuple[str, List[FileEntry]]]:
    """
    Three nodes sharing the hostile names with odd sizes and mtimes; node
    3 has a hostile address too.
    """
    model = {}
    for node, address in ((1, "127.0.0.1:9001"), (2, "[::1]:9002"), (3, 'h"\\\u2028\udcff:3')):
        entries = []
        for k, name in enumerate(names):
            if (k + node) % 3 != 0:
                mtime = ODD_MTIMES[(k + node) % len(ODD_MTIMES)]
                size = [0, 1, 2**53 + 1, 2**63 - 1][(k * node) % 4]
                entries.append(FileEntry(name, size, mtime, sha("0123456789abcdef"[(k + node) % 16])))
        model[node] = (address, entries)
    return model


def indexOf(model) -> ClusterIndex:
    index = ClusterIndex()
    for node, (address, entries) in model.items():
        index.replaceNode(node, address, entries)
    return index


class PackTests(SynchronousTestCase):
    """
    Tests for the packed 48-byte record of one file.
    """

    def assertExact(self, entry: FileEntry) -> None:
        record = packEntry(entry)
        back = unpackEntry(entry.name, record)
        self.assertEqual(len(record), 48)
        self.assertEqual(back, entry)
        self.assertEqual((type(back.size), type(back.mtime)), (int, float))
        self.assertEqual(repr(back.mtime), repr(float(entry.mtime)))

    def test_roundTripExact(self) -> None:
        """
        A record gives back exactly the size (up to 2**63-1), the mtime (to
        the last bit, denormals and the largest float included) and the
        SHA-256 it was made from.
        """
        for size in (0, 1, 2**32, 2**53 + 1, 2**63 - 1):
            for mtime in ODD_MTIMES:
                self.assertExact(FileEntry("n", size, mtime, "0123456789abcdef" * 4))

    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(0, 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.binary(min_size=32, max_size=32),
    )
    def test_roundTripArbitrary(self, size: int, mtime: float, digest: bytes) -> None:
        """
        Every size in 0..2**63-1, every finite float mtime and every digest
        survive packing exactly.
        """
        self.assertExact(FileEntry("n", size, mtime, digest.hex()))

    def test_intMtime(self) -> None:
        """
        An integer mtime comes back as the equal float, as the wire codec
        would have decoded it.
        """
        back = unpackEntry("n", packEntry(FileEntry("n", 1, 5, sha("a"))))
        self.assertEqual((back.mtime, type(back.mtime)), (5.0, float))

    def test_refused(self) -> None:
        """
        What a record cannot hold exactly is refused with L{ValueError}: a
        negative size or one past 2**63-1, an mtime that is not a number, a
        SHA-256 that is not 64 lowercase hex digits.
        """
        bad = [
            FileEntry("n", -1, 1.0, sha("a")),
            FileEntry("n", 2**63, 1.0, sha("a")),
            FileEntry("n", 1, "soon", sha("a")),
            FileEntry("n", 1, 1.0, sha("A")),
            FileEntry("n", 1, 1.0, "ab" * 31),
            FileEntry("n", 1, 1.0, "ab" * 33),
            FileEntry("n", 1, 1.0, sha("g")),
            FileEntry("n", 1, 1.0, None),
        ]
        for entry in bad:
            self.assertRaises(ValueError, packEntry, entry)

    def test_packEntries(self) -> None:
        """
        C{packEntries} fills the map under each entry's own name object, a
        later entry of a name wins, and it counts the entries it left out.
        """
        name = "".join(["sh", "ared"])
        into = {}
        refused = packEntries([entry(name, "a"), FileEntry("x", -1, 1.0, sha("a")), entry("shared", "b")], into)
        self.assertEqual(refused, 1)
        self.assertEqual(list(into), ["shared"])
        self.assertIs(next(iter(into)), name)
        self.assertEqual(unpackEntry("shared", into["shared"]), entry("shared", "b"))

    def test_indexSkipsUnholdable(self) -> None:
        """
        The index keeps the good entries of an update and logs how many it
        could not hold, rather than failing the whole update.
        """
        index = ClusterIndex()
        with capturedLogs() as events:
            index.replaceNode(1, "h:1", [entry("a"), FileEntry("b", 2**64, 1.0, sha("a"))])
            index.applyChanges(1, "h:1", [FileEntry("c", 1, 1.0, sha("C"))], [])
        self.assertEqual([e.name for _, _, e in index.entries()], ["a"])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([(e["count"], e["node"]) for e in warnings], [(1, 1), (1, 1)])


class CompactIndexTests(SynchronousTestCase):
    """
    Tests for the compact layout of L{ClusterIndex}: packed maps, holders
    kept as one id or a tuple of ids.
    """

    def test_replaceNodeWithPackedMap(self) -> None:
        """
        C{replaceNode} takes an already built L{PackedFiles} as it is: that
        map becomes the node's, and holders and entries read from it.  An
        equal map, or a dict of the same records, changes nothing.
        """
        files, refused = packFiles([entry("a"), entry("b", "c")])
        self.assertEqual(refused, 0)
        index = ClusterIndex()
        index.replaceNode(4, "h:4", files)
        self.assertIs(index.nodeFiles(4), files)
        self.assertEqual(index.holders("b"), [(4, "h:4", entry("b", "c"))])
        self.assertEqual(index.fileCount(), 2)
        version = index.version
        index.replaceNode(4, "h:4", packFiles([entry("a"), entry("b", "c")])[0])
        index.replaceNode(4, "h:4", dict(files.items()))
        self.assertEqual(index.version, version)

    def test_holdersManyNodes(self) -> None:
        """
        A name held by one node, then several (added out of order), then
        one again, always lists its holders by id and forgets the ones gone.
        """
        index = ClusterIndex()
        for node in (5, 2, 9, 7):
            index.applyChanges(node, f"h:{node}", [entry("x")], [])
        self.assertEqual([h[0] for h in index.holders("x")], [2, 5, 7, 9])
        index.removeNode(5)
        index.applyChanges(9, "h:9", [], ["x"])
        index.replaceNode(7, "h:7", [entry("y")])
        self.assertEqual([h[0] for h in index.holders("x")], [2])
        self.assertEqual([h[0] for h in index.holders("y")], [7])
        index.removeNode(2)
        self.assertEqual(index.holders("x"), [])

    def test_fullListsArePacked(self) -> None:
        """
        A node's full list, in name order as nodes send it, is held packed:
        no change is kept beside the packed buffers.  Out of order, it
        reads the same.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry("a"), entry("b"), entry("c")])
        self.assertEqual(index.nodeFiles(1).changeCount, 0)
        index.replaceNode(2, "h:2", [entry("b"), entry("a"), entry("c")])
        self.assertEqual(list(index.nodeFiles(2).items()), list(index.nodeFiles(1).items()))

    def test_compacted(self) -> None:
        """
        A node whose map keeps many changes beside its packed buffers is
        named by C{compactable}; the compacted map, taken after more
        changes, keeps those changes, packs the rest, and leaves the
        version alone.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry("a")])
        index.replaceNode(2, "h:2", [entry("b")])
        index.applyChanges(1, "h:1", [entry(f"n{i:05d}") for i in range(COMPACT_MIN)], [])
        self.assertEqual(index.compactable(), [1])
        older = index.nodeFiles(1)
        packed = older.compacted()
        index.applyChanges(1, "h:1", [entry("late")], ["a"])
        version = index.version
        index.compacted(1, older, packed)
        self.assertEqual(index.version, version)
        self.assertEqual(index.compactable(), [])
        self.assertEqual(index.nodeFiles(1).changeCount, 2)
        self.assertEqual(len(index.nodeFiles(1)), COMPACT_MIN + 1)
        self.assertEqual([h[0] for h in index.holders("late")], [1])
        self.assertEqual(index.holders("a"), [])
        index.compacted(1, older, packed)
        self.assertEqual(len(index.nodeFiles(1)), COMPACT_MIN + 1, "taken once only")
        index.removeNode(1)
        index.compacted(1, older, packed)
        self.assertFalse(index.hasNode(1))

    def test_compactor(self) -> None:
        """
        L{Compactor} packs in one node at a time, each in a thread, while
        nodes ask for it; a failure is logged and tried again at the next
        start (the next change), not at once.
        """
        index = ClusterIndex()
        calls: list = []

        def runInThread(f, *args):
            d = defer.Deferred()
            calls.append((f, d))
            return d

        compactor = Compactor(index, runInThread)
        compactor.start()
        self.assertEqual(calls, [])
        for node in (1, 2, 3):
            index.applyChanges(node, f"h:{node}", [entry(f"n{i:05d}") for i in range(COMPACT_MIN)], [])
        compactor.start()
        compactor.start()
        self.assertEqual(len(calls), 1, "one at a time")
        f, d = calls.pop()
        with capturedLogs() as events:
            d.errback(RuntimeError("no memory"))
        self.assertEqual([e["node"] for e in events if e.get("log_failure")], [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((calls, compactor.running), ([], False))
        compactor.start()
        for expected in ([1, 2, 3], [2, 3], [3]):
            self.assertEqual(index.compactable(), expected)
            f, d = calls.pop()
            d.callback(f())
        self.assertEqual((index.compactable(), calls, compactor.running), ([], [], False))

    def test_content(self) -> None:
        """
        C{content} names the lowest holder's copy and offers every holder
        of that same content that C{usable} accepts.
        """
        index = ClusterIndex()
        index.replaceNode(3, "h:3", [entry("x", "b")])
        index.replaceNode(1, "h:1", [entry("x", "a")])
        index.replaceNode(2, "h:2", [entry("x", "a")])
        self.assertEqual(index.content("x"), (entry("x", "a"), [(1, "h:1"), (2, "h:2")]))
        self.assertEqual(index.content("x", usable=lambda n: n != 1), (entry("x", "a"), [(2, "h:2")]))
        self.assertEqual(index.content("x", sha("b")), (entry("x", "b"), [(3, "h:3")]))
        self.assertIsNone(index.content("y"))

    def test_entriesMergedInOrder(self) -> None:
        """
        The nodes' maps, each in name order, merge into entries sorted by
        name then node.
        """
        model = buildModel()
        index = indexOf(model)
        expected = sorted((e.name, node) for node, (_, entries) in model.items() for e in entries)
        self.assertEqual([(e.name, node) for node, _, e in index.entries()], expected)


# Operations for the model-based test: replace a node, apply changes,
# remove a node, take a snapshot.
_names = st.sampled_from(["a", "b", "c", "d"])
_entries = st.builds(entry, _names, st.sampled_from("ab"), st.integers(0, 3))
_nodeIds = st.sampled_from([1, 2, 3])
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("replace"), _nodeIds, st.lists(_entries, max_size=4)),
        st.tuples(st.just("apply"), _nodeIds, st.lists(_entries, max_size=3), st.lists(_names, max_size=2)),
        st.tuples(st.just("address"), _nodeIds),
        st.tuples(st.just("remove"), _nodeIds),
        st.tuples(st.just("snapshot")),
    ),
    max_size=25,
)


class ModelTests(SynchronousTestCase):
    """
    The index against a plain model (node -> name -> entry) under random
    operations.
    """

    @settings(max_examples=300, deadline=None)
    @given(_operations)
    def test_matchesModel(self, operations) -> None:
        """
        After any sequence of operations, the entries, holders, file count,
        listing and log are those of the model, and every snapshot taken on
        the way still shows the model as it was then.
        """
        index = ClusterIndex()
        model: Dict[int, Dict[str, FileEntry]] = {}
        addresses: Dict[int, str] = {}
        snapshots = []
        for op in operations:
            if op[0] == "replace":
                index.replaceNode(op[1], addresses.setdefault(op[1], f"h:{op[1]}"), op[2])
                model[op[1]] = {e.name: e for e in op[2]}
            elif op[0] == "apply":
                index.applyChanges(op[1], addresses.setdefault(op[1], f"h:{op[1]}"), op[2], op[3])
                files = model.setdefault(op[1], {})
                files.update((e.name, e) for e in op[2])
                for name in op[3]:
                    files.pop(name, None)
            elif op[0] == "address" and op[1] in model:
                addresses[op[1]] += "'"
                index.applyChanges(op[1], addresses[op[1]], [], [])
            elif op[0] == "remove":
                index.removeNode(op[1])
                model.pop(op[1], None)
            elif op[0] == "snapshot":
                frozen = {n: (addresses[n], list(files.values())) for n, files in model.items()}
                snapshots.append((index.snapshot(), frozen))
            self.assertModel(index, {n: (addresses[n], list(files.values())) for n, files in model.items()})
        for snapshot, frozen in snapshots:
            self.assertModel(snapshot, frozen)

    def assertModel(self, view, model: Dict[int, Tuple[str, List[FileEntry]]]) -> None:
        expected = sorted(((e.name, n), (n, address, e)) for n, (address, entries) in model.items() for e in entries)
        self.assertEqual(view.entries(), [row for _, row in expected])
        self.assertEqual(view.nodes(), sorted(model))
        self.assertEqual(view.fileCount(), len(expected))
        for name in "abcd":
            self.assertEqual(view.holders(name), [row for key, row in expected if key[0] == name])
        groups: Dict[Tuple[str, str], dict] = {}
        for _, (n, _, e) in expected:
            groups.setdefault((e.name, e.sha256), {"name": e.name, "size": e.size, "sha256": e.sha256, "holders": []})["holders"].append(n)
        self.assertEqual(listingOf(view), [groups[key] for key in sorted(groups)])
        lines = renderLog(view, 1, 1, 0.0).decode("utf-8").split("\n")[HEADER_LINES:-1]
        self.assertEqual(lines, referenceLines(model))


class CopyOnWriteTests(SynchronousTestCase):
    """
    A snapshot shares the index's per-node maps, which the index never
    changes afterwards: it copies a node's map before its next change.
    """

    def setUp(self) -> None:
        self.index = ClusterIndex()
        self.index.replaceNode(1, "h:1", [entry("a"), entry("b")])
        self.index.replaceNode(2, "h:2", [entry("a"), entry("c")])

    def test_snapshotIsSmall(self) -> None:
        """
        A snapshot is an L{IndexSnapshot} that shares every node's map with
        the index rather than copying them.
        """
        snapshot = self.index.snapshot()
        self.assertIsInstance(snapshot, IndexSnapshot)
        for node in (1, 2):
            self.assertIs(snapshot.nodeFiles(node), self.index.nodeFiles(node))
        self.assertEqual(snapshot.version, self.index.version)

    def test_mapsNotMutated(self) -> None:
        """
        Every kind of change after a snapshot leaves the maps it holds, and
        what it shows, exactly as they were.
        """
        snapshot = self.index.snapshot()
        maps = {node: snapshot.nodeFiles(node) for node in (1, 2)}
        contents = {node: dict(files) for node, files in maps.items()}
        before = renderLog(snapshot, 1, 1, 0.0)
        self.index.applyChanges(1, "h:1", [entry("a", "d"), entry("z")], ["b"])
        self.index.applyChanges(2, "h:2'", [], [])
        self.index.applyChanges(2, "h:2'", [], ["c"])
        self.index.replaceNode(3, "h:3", [entry("q")])
        self.index.removeNode(1)
        self.index.clear()
        for node, files in maps.items():
            self.assertEqual(files, contents[node])
            self.assertIs(snapshot.nodeFiles(node), files)
        self.assertEqual(renderLog(snapshot, 1, 1, 0.0), before)
        self.assertEqual(snapshot.nodes(), [1, 2])

    def test_changesAreNotCopies(self) -> None:
        """
        A change to a node after a snapshot makes a new map from the old
        one, sharing its packed buffers: the snapshot's map is untouched,
        the other nodes' maps are the very same.
        """
        snapshot = self.index.snapshot()
        self.index.applyChanges(1, "h:1", [entry("z")], [])
        changed = self.index.nodeFiles(1)
        self.assertIsNot(changed, snapshot.nodeFiles(1))
        self.assertIs(self.index.nodeFiles(2), snapshot.nodeFiles(2))
        self.index.applyChanges(1, "h:1", [entry("y")], ["a"])
        self.assertEqual(sorted(self.index.nodeFiles(1)), ["b", "y", "z"])
        self.assertEqual(self.index.nodeFiles(1).differences(snapshot.nodeFiles(1)), {
            "a": None, "y": packEntry(entry("y")), "z": packEntry(entry("z"))
        })
        self.assertEqual(sorted(snapshot.nodeFiles(1)), ["a", "b"])

    def test_addressChangeKeepsSharing(self) -> None:
        """
        A change of address alone copies nothing, and the node's map stays
        protected: a later change to its files still copies it first.
        """
        snapshot = self.index.snapshot()
        version = self.index.version
        self.index.applyChanges(1, "h:one", [], [])
        self.assertEqual((self.index.version, self.index.address(1)), (version + 1, "h:one"))
        self.assertIs(self.index.nodeFiles(1), snapshot.nodeFiles(1))
        self.index.applyChanges(1, "h:one", [entry("z")], [])
        self.assertEqual(sorted(snapshot.nodeFiles(1)), ["a", "b"])

    def test_noChangeNoCopy(self) -> None:
        """
        An update that changes nothing neither copies the map nor moves the
        version.
        """
        snapshot = self.index.snapshot()
        version = self.index.version
        self.index.applyChanges(1, "h:1", [entry("a")], ["nope"])
        self.assertIs(self.index.nodeFiles(1), snapshot.nodeFiles(1))
        self.assertEqual(self.index.version, version)


class StreamedLogTests(SynchronousTestCase):
    """
    Tests for L{writeLog} and L{logChunks}: the streamed log is the log
    format as first defined, byte for byte.
    """

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("peer_files.log")

    def test_sameAsReference(self) -> None:
        """
        Hostile names and addresses (newlines, U+2028, NEL, lone
        surrogates, quotes, backslashes, control characters), odd mtimes
        and sizes up to 2**63-1 give, line for line, what json.dumps of the
        whole row object gives; L{renderLog} and L{writeLog} write the same
        bytes, which parse back to the entries.
        """
        model = buildModel()
        index = indexOf(model)
        rendered = renderLog(index, 1, 7, 1764096934.123)
        writeLog(self.path, index.snapshot(), 1, 7, 1764096934.123)
        self.assertEqual(self.path.getContent(), rendered)
        text = rendered.decode("utf-8")
        self.assertEqual(text.split("\n")[HEADER_LINES:-1], referenceLines(model))
        self.assertEqual(len(text.splitlines()), HEADER_LINES + index.fileCount())
        header, rows = parseLog(rendered)
        self.assertEqual((header["files"], header["nodes"]), (index.fileCount(), 3))
        self.assertEqual(
            [(r["node"], r["address"], FileEntry(r["name"], r["size"], r["mtime"], r["sha256"])) for r in rows],
            index.entries(),
        )

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(st.text(), st.integers(0, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)),
            max_size=6,
        ),
        st.text(max_size=8),
    )
    def test_arbitraryRows(self, rows, address) -> None:
        """
        For arbitrary names, sizes, mtimes and addresses every data line is
        what json.dumps of the row object gives, escaped the same way.
        """
        entries = [FileEntry(name, size, mtime, sha("e")) for name, size, mtime in rows]
        unique = list({e.name: e for e in entries}.values())
        model = {1: (address, unique), 2: ("h:2", unique[:2])}
        lines = renderLog(indexOf(model), 1, 1, 0.0).decode("utf-8").split("\n")[HEADER_LINES:-1]
        self.assertEqual(lines, referenceLines(model))

    def test_nonFiniteMtime(self) -> None:
        """
        A non-finite mtime (which the wire refuses, but a record can hold)
        is written as json writes it.
        """
        model = {1: ("h:1", [FileEntry(n, 1, m, sha("a")) for n, m in (("i", float("inf")), ("m", float("-inf")), ("n", float("nan")))])}
        lines = renderLog(indexOf(model), 1, 1, 0.0).decode("utf-8").split("\n")[HEADER_LINES:-1]
        self.assertEqual(lines, referenceLines(model))

    def test_chunks(self) -> None:
        """
        L{logChunks} gives the header, then at most the asked number of
        lines per piece; the pieces joined are the whole log.
        """
        index = indexOf(buildModel())
        chunks = list(logChunks(index, 1, 1, 0.0, linesPerChunk=4))
        self.assertEqual(b"".join(chunks), renderLog(index, 1, 1, 0.0))
        self.assertEqual(chunks[0].count(b"\n"), HEADER_LINES)
        self.assertEqual([c.count(b"\n") for c in chunks[1:-1]], [4] * (len(chunks) - 2))
        self.assertLessEqual(chunks[-1].count(b"\n"), 4)

    def test_batchedAtomicWrite(self) -> None:
        """
        L{writeLog} writes in batches to a temporary file beside the log,
        never opens the log itself for writing, fsyncs the file and the
        directory, renames over the log (a reader before that sees the old
        content whole) and leaves no temporary file.
        """
        self.patch(peerlog, "LINES_PER_WRITE", 5)
        self.path.setContent(b"old\n")
        opened, writes, synced, seen = [], [], [], []
        paths = {}
        realOpen, realWrite, realReplace, realFsync = os.open, os.write, os.replace, os.fsync

        def recordingOpen(path, flags, *args):
            if flags & (os.O_WRONLY | os.O_RDWR):
                opened.append(path)
            fd = realOpen(path, flags, *args)
            paths[fd] = path
            return fd

        def recordingWrite(fd, data):
            writes.append(len(data))
            return realWrite(fd, data)

        def recordingFsync(fd):
            synced.append(paths[fd])
            return realFsync(fd)

        def checkingReplace(src, dst):
            seen.append(FilePath(dst).getContent())
            return realReplace(src, dst)

        for module in (peerlog.os, atomic.os):
            self.patch(module, "open", recordingOpen)
            self.patch(module, "write", recordingWrite)
            self.patch(module, "fsync", recordingFsync)
            self.patch(module, "replace", checkingReplace)
        index = indexOf(buildModel())
        writeLog(self.path, index.snapshot(), 1, 1, 0.0)
        self.assertEqual(self.path.getContent(), renderLog(index, 1, 1, 0.0))
        self.assertEqual(opened, [self.path.sibling(".peer_files.log.tmp").path])
        self.assertEqual(len(writes), 1 + -(-index.fileCount() // 5))
        self.assertEqual(synced, opened + [self.path.parent().path])
        self.assertEqual(seen, [b"old\n"])
        self.assertEqual(self.path.parent().listdir(), ["peer_files.log"])

    def test_failureKeepsOldLog(self) -> None:
        """
        A write that fails (a full disk) raises, leaves the old log as it
        was and removes the temporary file.
        """
        self.path.setContent(b"old\n")

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(peerlog.os, "write", full)
        index = indexOf(buildModel())
        self.assertRaises(OSError, writeLog, self.path, index.snapshot(), 1, 1, 0.0)
        self.assertEqual(self.path.getContent(), b"old\n")
        self.assertEqual(self.path.parent().listdir(), ["peer_files.log"])


class ListingTests(SynchronousTestCase):
    """
    Tests for L{listingOf} and L{listingChunks}.
    """

    def test_snapshotListing(self) -> None:
        """
        The listing of a snapshot is the index's listing when it was taken;
        the size of a row is the lowest holder's.
        """
        index = ClusterIndex()
        index.replaceNode(3, "h:3", [entry("x", "b", 5), entry("y")])
        index.replaceNode(1, "h:1", [entry("x", "b", 6)])
        snapshot = index.snapshot()
        expected = [
            {"name": "x", "size": 6, "sha256": sha("b"), "holders": [1, 3]},
            {"name": "y", "size": 10, "sha256": sha("a"), "holders": [3]},
        ]
        index.removeNode(1)
        self.assertEqual(listingOf(snapshot), expected)
        self.assertEqual(index.listing(), [dict(expected[0], size=5, holders=[3]), expected[1]])

    def test_chunks(self) -> None:
        """
        L{listingChunks} splits the listing into lists of at most the asked
        size, in order; an empty index gives none.
        """
        index = indexOf(buildModel())
        rows = listingOf(index)
        chunks = list(listingChunks(index, 3))
        self.assertEqual([row for chunk in chunks for row in chunk], rows)
        self.assertEqual([len(c) for c in chunks[:-1]], [3] * (len(chunks) - 1))
        self.assertEqual(list(listingChunks(ClusterIndex(), 3)), [])


class LogWriterIntervalTests(SynchronousTestCase):
    """
    Tests for L{LogWriter} with streamed content: large logs are rewritten
    less often.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("peer_files.log")
        self.index = ClusterIndex()
        self.index.replaceNode(1, "h:1", [entry("a")])
        self.pending: list = []

    def content(self, entries=None) -> LogContent:
        content = LogContent(self.index.snapshot(), 1, 2, self.clock.seconds())
        if entries is not None:
            # Stand in for a large index without building one.
            content.entries = entries
        return content

    def test_streamed(self) -> None:
        """
        A render that returns a L{LogContent} has the log streamed by
        L{writeLog} in the writer's thread: the file is what L{renderLog}
        gives for the snapshot, with its header.
        """
        calls = []

        def runInThread(f, *args):
            calls.append(f)
            return syncThread(f, *args)

        writer = LogWriter(self.path, self.clock, runInThread)
        content = self.content()
        writer.changed(lambda: content)
        self.clock.advance(0.25)
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.path.getContent(), renderLog(content.snapshot, 1, 2, 0.0))
        self.assertEqual(content.entries, 1)

    def test_promptAfterQuiet(self) -> None:
        """
        However large the log, a change long after the last write is
        written at once, and a change during a slow write is written right
        after it: the next start waits for nothing else.
        """

        def runInThread(f, *args):
            d = defer.Deferred()
            self.pending.append((d, f, args))
            return d

        writer = LogWriter(self.path, self.clock, runInThread)
        writer.changed(lambda: self.content(400_000))
        self.clock.advance(0)
        self.assertEqual(len(self.pending), 1)
        self.clock.advance(1.5)
        writer.changed(lambda: self.content(400_000))
        self.clock.advance(1.0)
        self.assertEqual(len(self.pending), 1, "one write at a time")
        d, f, args = self.pending.pop()
        d.callback(f(*args))
        self.clock.advance(0)
        self.assertEqual(len(self.pending), 1, "started right after the last one")
        d, f, args = self.pending.pop()
        d.callback(f(*args))
        self.clock.advance(60)
        writer.changed(lambda: self.content(400_000))
        self.clock.advance(0)
        self.assertEqual(len(self.pending), 1, "at once when quiet")
        d, f, args = self.pending.pop()
        d.callback(f(*args))
        self.assertEqual(writer.writes, 3)
        self.successResultOf(writer.stop())

    def test_smallLogFollowsAtOnce(self) -> None:
        """
        A small log changing all the time is written at most once per
        C{minInterval}: a change right after a write is written
        C{minInterval} after that write started.
        """
        writer = LogWriter(self.path, self.clock, syncThread)
        writer.changed(self.content)
        self.clock.advance(0)
        writer.changed(self.content)
        self.clock.advance(0.2)
        self.assertEqual(writer.writes, 1)
        self.clock.advance(0.05)
        self.assertEqual(writer.writes, 2)
        self.successResultOf(writer.stop())


class LogCacheTests(SynchronousTestCase):
    """
    Tests for L{LogCache}: a log written with the cache is byte for byte the
    log written afresh, however the index changed, and only changed lines
    are made again.
    """

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("peer_files.log")
        self.cache = LogCache()
        self.addCleanup(self.cache.forget)
        # Small pieces, so that a small index spans many.
        self.patch(peerlog, "LINES_PER_WRITE", 7)

    def check(self, index: ClusterIndex, now: float = 5.0) -> None:
        snapshot = index.snapshot()
        self.cache.made = 0
        writeLog(self.path, snapshot, 1, 2, now, self.cache)
        self.assertEqual(self.path.getContent(), renderLog(snapshot, 1, 2, now))

    def test_changesCopyTheRest(self) -> None:
        """
        After a first write (every line made), a change to one file, an
        added file, a removed one, a file now held by two nodes: each write
        equals a fresh render and makes only the changed lines.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry(f"a{i:03d}") for i in range(100)])
        index.replaceNode(2, "h:2", [entry(f"b{i:03d}") for i in range(50)])
        self.check(index)
        self.assertEqual(self.cache.made, 150)
        self.check(index, now=6.0)
        self.assertEqual(self.cache.made, 0, "nothing changed: all copied")
        index.applyChanges(1, "h:1", [entry("a050", digest="b")], [])
        self.check(index)
        self.assertEqual(self.cache.made, 1)
        index.applyChanges(2, "h:2", [entry("zzz"), entry("a000\n\u2028 ünï", size=3)], ["b010"])
        self.check(index)
        self.assertEqual(self.cache.made, 2)
        index.applyChanges(2, "h:2", [entry("a007", digest="c"), entry("0first")], [])
        self.check(index)
        self.assertEqual(self.cache.made, 2)
        index.applyChanges(1, "h:1", [], [f"a{i:03d}" for i in range(20, 30)])
        self.check(index)
        self.assertEqual(self.cache.made, 0, "only removals: nothing to make")

    def test_largeChangesWrittenAfresh(self) -> None:
        """
        A node leaving, a new node, or a node's new address, rewrite the
        log afresh (or make only what they touch); the result is the same.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry(f"n{i:03d}") for i in range(60)])
        index.replaceNode(2, "h:2", [entry(f"n{i:03d}", digest="b") for i in range(0, 60, 2)])
        self.check(index)
        index.replaceNode(3, "h:3", [entry(f"n{i:03d}", digest="c") for i in range(0, 60, 3)])
        self.check(index)
        index.replaceNode(2, "h:22", [entry(f"n{i:03d}", digest="b") for i in range(0, 60, 2)])
        self.check(index)
        index.removeNode(1)
        self.check(index)
        index.clear()
        self.check(index)
        index.replaceNode(4, "h:4", [entry("x")])
        self.check(index)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(1, 3),
                st.lists(st.tuples(st.sampled_from("abcdefghij"), st.sampled_from("abc")), max_size=8),
                st.lists(st.sampled_from("abcdefghij"), max_size=4),
            ),
            max_size=8,
        )
    )
    def test_anyChanges(self, steps) -> None:
        """
        Whatever sequence of changes, each cached write equals a fresh one.
        """
        self.cache.forget()
        index = ClusterIndex()
        for node in (1, 2, 3):
            index.replaceNode(node, f"h:{node}", [entry(c * 3, digest="a") for c in "acegi"])
        self.check(index)
        for node, changed, removed in steps:
            index.applyChanges(node, f"h:{node}", [entry(c * 3, digest=d) for c, d in changed], [c * 3 for c in removed])
            self.check(index)

    def test_failedWriteForgets(self) -> None:
        """
        A write that fails leaves the log as it was and the cache empty: the
        next write makes every line.
        """
        index = ClusterIndex()
        index.replaceNode(1, "h:1", [entry(f"a{i:02d}") for i in range(20)])
        self.check(index)
        before = self.path.getContent()
        index.applyChanges(1, "h:1", [entry("new")], [])

        def failing(fd, data):
            raise OSError(errno.ENOSPC, "full")

        original = peerlog._writeAll
        self.patch(peerlog, "_writeAll", failing)
        self.assertRaises(OSError, writeLog, self.path, index.snapshot(), 1, 2, 5.0, self.cache)
        self.assertEqual(self.path.getContent(), before)
        self.assertEqual(os.listdir(self.path.parent().path), ["peer_files.log"])
        peerlog._writeAll = original
        self.check(index)
        self.assertEqual(self.cache.made, 21)


class KeptLogTests(SynchronousTestCase):
    """
    Tests for L{LogCache.keep} and L{LogCache.prime}: the last log outlives
    the process, and is taken back only for the very changes it shows.
    """

    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("peer_files.log")
        self.keepPath = directory.child(".peer_files.log.kept")
        self.patch(peerlog, "LINES_PER_WRITE", 7)
        self.index = ClusterIndex()
        self.index.replaceNode(1, "h:1", [entry(f"a{i:03d}") for i in range(40)])
        self.index.replaceNode(2, "h:2", [entry(f"b{i:03d}") for i in range(30)])
        self.versions = {1: ("h:1", "i1", 4), 2: ("h:2", "i2", 9)}

    def cache(self) -> LogCache:
        cache = LogCache(self.keepPath)
        self.addCleanup(cache.forget)
        return cache

    def maps(self, versions=None) -> dict:
        versions = versions or self.versions
        snapshot = self.index.snapshot()
        # Copies: what a restarted process reads back from its view.
        return {n: (dict(snapshot.nodeFiles(n)), *versions[n]) for n in snapshot.nodes()}

    def writeKept(self) -> None:
        writeLog(self.path, self.index.snapshot(), 1, 2, 5.0, self.cache(), self.versions)
        self.path.remove()  # as a restart's tooling may do

    def test_primedCopiesEverything(self) -> None:
        """
        A cache primed with the changes the kept log shows makes no line of
        the next log, which equals a fresh render; a change since is the
        only line made.
        """
        self.writeKept()
        cache = self.cache()
        self.assertTrue(cache.prime(self.maps()))
        snapshot = self.index.snapshot()
        writeLog(self.path, snapshot, 1, 3, 6.0, cache, self.versions)
        self.assertEqual(self.path.getContent(), renderLog(snapshot, 1, 3, 6.0))
        self.assertEqual(cache.made, 0)
        self.index.applyChanges(2, "h:2", [entry("b005", digest="c")], [])
        snapshot = self.index.snapshot()
        writeLog(self.path, snapshot, 1, 3, 7.0, cache, self.versions)
        self.assertEqual(self.path.getContent(), renderLog(snapshot, 1, 3, 7.0))
        self.assertEqual(cache.made, 1)

    def test_otherChangesNotPrimed(self) -> None:
        """
        Another change of a node, another address, a node more or less, or
        a log written without versions, is not taken back.
        """
        self.writeKept()
        for versions in [
            {1: ("h:1", "i1", 5), 2: ("h:2", "i2", 9)},
            {1: ("h:1", "i1", 4), 2: ("h:2", "j2", 9)},
            {1: ("h:9", "i1", 4), 2: ("h:2", "i2", 9)},
        ]:
            self.assertFalse(self.cache().prime(self.maps(versions)))
        maps = self.maps()
        del maps[2]
        self.assertFalse(self.cache().prime(maps))
        writeLog(self.path, self.index.snapshot(), 1, 2, 5.0, self.cache(), None)
        self.assertFalse(self.cache().prime(self.maps()))

    def test_replacedKeptFileNotPrimed(self) -> None:
        """
        A kept log that is not the file the sidecar describes (replaced, or
        cut) is not taken back.
        """
        self.writeKept()
        self.keepPath.setContent(self.keepPath.getContent())
        self.assertFalse(self.cache().prime(self.maps()))

    def test_departuresDoNotReplace(self) -> None:
        """
        A log that shows fewer nodes than the kept one (members stopping
        before the leader) does not replace it; one with as many does.
        """
        cache = self.cache()
        writeLog(self.path, self.index.snapshot(), 1, 2, 5.0, cache, self.versions)
        full = self.maps()
        self.index.removeNode(2)
        writeLog(self.path, self.index.snapshot(), 1, 2, 6.0, cache, {1: self.versions[1]})
        self.assertTrue(self.cache().prime(full))
        self.index.replaceNode(3, "h:3", [entry("c")])
        writeLog(self.path, self.index.snapshot(), 1, 2, 7.0, cache, {1: self.versions[1], 3: ("h:3", "i3", 1)})
        self.assertFalse(self.cache().prime(full))
