"""
Tests for L{p2pfiles.index}: the cluster index, the C{peer_files.log} format
and the coalescing atomic writer.
"""

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import atomic
from p2pfiles.index import ClusterIndex, LogWriter, parseLog, renderLog
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
        self.clock.advance(0.25)
        self.assertEqual(calls, ["thread", "build"])
        self.assertEqual(self.path.getContent(), b"built\n")

    def test_coalesced(self) -> None:
        """
        Ten changes within C{minInterval} cost one write, which renders the
        latest state, once, at write time.
        """
        writer = self.writer()
        for i in range(10):
            self.state[0] = b"%d\n" % (i,)
            writer.changed(self.render)
            self.clock.advance(0.02)
        self.assertEqual((writer.writes, self.renders), (0, 0))
        self.clock.advance(0.25)
        self.assertEqual((writer.writes, self.renders), (1, 1))
        self.assertEqual(self.path.getContent(), b"9\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_changeDuringWrite(self) -> None:
        """
        A change while a write is in flight leads to exactly one more write
        after it, with the newer state; none overlaps the running one.
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
        self.clock.advance(0.25)
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
