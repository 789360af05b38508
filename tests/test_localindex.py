"""
Tests for L{p2pfiles.localindex}: a node's index of its own share directory.

Most tests drive the index with a L{Clock} and run its "thread" work
synchronously, so that every scan is deterministic and no real time passes.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Tuple

from twisted.internet import defer, inotify
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pfiles import sharescan
from p2pfiles.localindex import (
    MAX_NAMED_SCAN, MAX_TOMBSTONES, POLL_DUTY, Changes, IndexStopped, LocalIndex, hashOpened,
)
from p2pfiles.sharescan import HASH_TRIES
from p2pfiles.wire import FileEntry


def syncThread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """
    Run "thread" work at once, on the calling thread.
    """
    return defer.maybeDeferred(f, *args)


class ManualThreads:
    """
    Thread work that runs only when the test says so, to observe what the
    index does while a scan or a cache write is in progress.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def names(self) -> List[str]:
        return [f.__name__ for (f, args, d) in self.calls]

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        d.callback(f(*args))

    def run(self, name: str) -> None:
        """
        Run the first pending call of the function called C{name}.
        """
        [i] = [i for (i, n) in enumerate(self.names()) if n == name][:1]
        f, args, d = self.calls.pop(i)
        d.callback(f(*args))

    def runAll(self) -> None:
        while self.calls:
            self.runNext()


class CountingHasher:
    """
    A hasher that counts what it hashes, and can fail or run a hook first.
    """

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.failFor: set = set()
        self.beforeHash: Callable[[str], None] = lambda path: None

    def __call__(self, path: str, size: int) -> Tuple[str, int, os.stat_result]:
        name = os.path.basename(path)
        self.calls.append(name)
        if name in self.failFor:
            raise PermissionError(13, "Permission denied", path)
        self.beforeHash(path)
        return hashOpened(path, size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalIndexTestsMixin:
    """
    Build indexes over temporary directories with a L{Clock}, and stop them
    (checking that no timer is left) at the end of each test.
    """

    def setUp(self) -> None:
        self.share = FilePath(self.mktemp())
        self.share.makedirs()
        self.state = FilePath(self.mktemp())
        self.clock = Clock()
        self.hasher = CountingHasher()
        self.events: List[dict] = []
        # Tests that expect log.failure() events set this.
        self.failuresExpected = False

    def makeIndex(self, runInThread: Any = syncThread, **kwargs: Any) -> LocalIndex:
        if isinstance(runInThread, ManualThreads):
            # What a stop leaves to run there (the restart record) is run
            # by stopIndex.
            self.manualThreads = runInThread
        index = LocalIndex(
            self.share, self.state, self.clock, runInThread=runInThread,
            useInotify=False, hasher=self.hasher, **kwargs,
        )
        index.log = Logger(observer=self.events.append)
        return index

    def startIndex(self, **kwargs: Any) -> LocalIndex:
        index = self.makeIndex(**kwargs)
        self.assertIsNone(self.successResultOf(index.start()))
        self.addCleanup(self.stopIndex, index)
        return index

    def startManual(self, **kwargs: Any) -> Tuple[LocalIndex, "ManualThreads"]:
        """
        A started index whose thread work runs only when the test says
        (its first scan done), and that L{ManualThreads}.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads, **kwargs)
        started = index.start()
        threads.runAll()
        self.successResultOf(started)
        self.addCleanup(self.stopIndex, index)
        return index, threads

    def stopIndex(self, index: LocalIndex) -> None:
        stopped = index.stop()
        threads = getattr(self, "manualThreads", None)
        if threads is not None:
            threads.runAll()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        if not self.failuresExpected:
            self.assertEqual(self.messages(LogLevel.critical), [])

    def write(self, name: str, data: bytes) -> FilePath:
        child = self.share.child(name)
        child.setContent(data)
        return child

    def messages(self, level: LogLevel = LogLevel.warn) -> List[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == level]

    def poll(self, index: LocalIndex) -> None:
        """
        Let one poll fire and the scan it schedules run.
        """
        self.clock.advance(1.0)
        self.clock.advance(0.1)


class ListingTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    Which files are shared, and how they are described.
    """

    def test_regularFiles(self) -> None:
        """
        Each regular file at the top of the share is listed with its size,
        mtime and SHA-256.
        """
        a = self.write("a.txt", b"hello")
        b = self.write("b.bin", b"")
        index = self.startIndex()
        self.assertEqual(
            index.entries,
            {
                "a.txt": FileEntry("a.txt", 5, os.stat(a.path).st_mtime, sha(b"hello")),
                "b.bin": FileEntry("b.bin", 0, os.stat(b.path).st_mtime, sha(b"")),
            },
        )

    def test_hiddenAndDirectoriesSkipped(self) -> None:
        """
        Hidden names (partial downloads) and subdirectories, with what they
        hold, are not shared, and are not warned about.
        """
        self.write(".movie.part", b"partial")
        sub = self.share.child("sub")
        sub.makedirs()
        sub.child("inner.txt").setContent(b"inner")
        self.write("shown", b"x")
        index = self.startIndex()
        self.assertEqual(list(index.entries), ["shown"])
        self.assertEqual(self.messages(), [])

    def test_missingShareCreated(self) -> None:
        """
        A share directory that does not exist is created at start.
        """
        self.share = self.share.child("not").child("yet")
        index = self.startIndex()
        self.assertTrue(self.share.isdir())
        self.assertEqual(index.entries, {})

    def test_symlinkInsideShare(self) -> None:
        """
        A symlink to a regular file in the share is shared under the link's
        name, with the target's content.
        """
        self.write("real", b"content")
        os.symlink("real", self.share.child("alias").path)
        index = self.startIndex()
        self.assertEqual(sorted(index.entries), ["alias", "real"])
        self.assertEqual(index.entries["alias"].sha256, sha(b"content"))
        self.assertEqual(self.messages(), [])

    def test_signature(self) -> None:
        """
        C{signature(name)} is the size, C{st_mtime_ns} and inode a shared
        file (a link's target, for a link) had when hashed; L{None} for a
        name that is not shared.
        """
        real = self.write("real", b"content")
        os.symlink("real", self.share.child("alias").path)
        self.write(".hidden", b"x")
        index = self.startIndex()
        st = os.stat(real.path)
        expected = (7, st.st_mtime_ns, st.st_ino)
        self.assertEqual(index.signature("real"), expected)
        self.assertEqual(index.signature("alias"), expected)
        self.assertIsNone(index.signature(".hidden"))
        self.assertIsNone(index.signature("absent"))

    def test_symlinkOutsideShareSkipped(self) -> None:
        """
        A symlink resolving outside the share (or to a hidden file in it) is
        not followed, and is warned about once.
        """
        outside = FilePath(self.mktemp())
        outside.setContent(b"secret")
        os.symlink(outside.path, self.share.child("escape").path)
        os.symlink("../" + self.share.basename(), self.share.child("loop").path)
        self.write(".x.part", b"partial")
        os.symlink(".x.part", self.share.child("partial").path)
        index = self.startIndex()
        self.assertEqual(index.entries, {})
        self.successResultOf(index.rescan())
        self.assertEqual(len(self.messages()), 3)
        self.assertIn("escape", " ".join(self.messages()))

    def test_unreadableFileSkipped(self) -> None:
        """
        A file that cannot be read is skipped with one warning, not repeated
        on later scans; the warning comes again once the file changes.
        """
        self.hasher.failFor.add("locked")
        locked = self.write("locked", b"data")
        self.write("open", b"data")
        index = self.startIndex()
        self.assertEqual(list(index.entries), ["open"])
        self.successResultOf(index.rescan())
        self.successResultOf(index.rescan())
        [message] = self.messages()
        self.assertIn("locked", message)
        self.assertIn("Permission denied", message)
        locked.setContent(b"more data")
        self.successResultOf(index.rescan())
        self.assertEqual(len(self.messages()), 2)

    def test_nonUtf8NameSkipped(self) -> None:
        """
        A name that is not valid UTF-8 is skipped with one warning, however
        many scans see it.
        """
        with open(os.path.join(os.fsencode(self.share.path), b"\xff.bin"), "wb") as f:
            f.write(b"x")
        self.write("fine.bin", b"x")
        index = self.startIndex()
        self.successResultOf(index.rescan())
        self.successResultOf(index.rescan())
        self.assertEqual(list(index.entries), ["fine.bin"])
        [message] = self.messages()
        self.assertIn("UTF-8", message)

    def test_refusedNameSkipped(self) -> None:
        """
        A name that L{p2pfiles.names.nameProblem} refuses is skipped with one
        warning.
        """
        self.write("back\\slash", b"x")
        self.write("tab\there", b"y")
        index = self.startIndex()
        self.successResultOf(index.rescan())
        self.assertEqual(sorted(index.entries), ["tab\there"])
        [message] = self.messages()
        self.assertIn("must not contain", message)

    def test_shareRemovedWhileRunning(self) -> None:
        """
        A share directory removed while the index runs is created again by the
        next scan, and its files are reported removed.
        """
        self.write("a", b"1")
        index = self.startIndex()
        seen: List[Any] = []
        index.subscribe(lambda changed, removed: seen.append((changed, removed)))
        self.share.remove()
        self.successResultOf(index.rescan())
        self.assertTrue(self.share.isdir())
        self.assertEqual(seen, [([], ["a"])])

    def test_startFails(self) -> None:
        """
        If the first scan fails, start() fails with the reason, the failure is
        logged and the index does not run.
        """
        self.share.remove()
        self.share.setContent(b"not a directory")
        index = self.makeIndex()
        self.failureResultOf(index.start(), OSError)
        self.assertEqual(len(self.messages(LogLevel.critical)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(index.rescan(), IndexStopped)
        self.successResultOf(index.stop())

    def test_fileReplacedBySymlinkNotFollowed(self) -> None:
        """
        A file that becomes a symlink to something outside the share while
        the scan looks at it is not read through the link: it is left out,
        and the next scan refuses the link with a warning.
        """
        outside = FilePath(self.mktemp())
        outside.setContent(b"secret")
        self.write("a", b"plain")

        def swap(path: str) -> None:
            self.hasher.beforeHash = lambda path: None
            os.unlink(path)
            os.symlink(outside.path, path)

        self.hasher.beforeHash = swap
        index = self.startIndex()
        self.assertEqual(index.entries, {})
        self.assertEqual(self.messages(), [])
        self.successResultOf(index.rescan())
        self.assertEqual(index.entries, {})
        [message] = self.messages()
        self.assertIn("symlink", message)

class HashCacheTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    Hashes are kept in C{hashcache.json} so that a restart does not rehash.
    """

    def restart(self, index: LocalIndex) -> LocalIndex:
        self.successResultOf(index.stop())
        self.hasher.calls = []
        return self.startIndex()

    def test_cacheFileContent(self) -> None:
        """
        The cache holds each file's size, mtime_ns, inode and hash by name.
        """
        f = self.write("a", b"abc")
        self.startIndex()
        st = os.stat(f.path)
        cache = json.loads(self.state.child("hashcache.json").getContent())
        self.assertEqual(
            cache["files"],
            {"a": {
                "size": 3, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": sha(b"abc")
            }},
        )

    def test_restartDoesNotRehash(self) -> None:
        """
        After a restart, unchanged files are not hashed again.
        """
        self.write("a", b"abc")
        self.write("b", b"def")
        index = self.startIndex()
        self.assertEqual(sorted(self.hasher.calls), ["a", "b"])
        before = index.entries
        index = self.restart(index)
        self.assertEqual(self.hasher.calls, [])
        self.assertEqual(index.entries, before)

    def test_changedFilesRehashed(self) -> None:
        """
        A file whose mtime or size changed is hashed again, after a rescan
        and after a restart.
        """
        a = self.write("a", b"abc")
        b = self.write("b", b"def")
        index = self.startIndex()
        self.hasher.calls = []
        os.utime(a.path, ns=(0, 1_000_000_000))
        self.successResultOf(index.rescan())
        self.assertEqual(self.hasher.calls, ["a"])
        self.assertEqual(index.entries["a"].mtime, 1.0)
        index = self.restart(index)
        self.assertEqual(self.hasher.calls, [])
        with open(b.path, "ab") as f:
            f.write(b"more")
        index = self.restart(index)
        self.assertEqual(self.hasher.calls, ["b"])
        self.assertEqual(index.entries["b"].sha256, sha(b"defmore"))

    def test_replacedFileRehashed(self) -> None:
        """
        A file replaced by another of the same size and mtime (a new inode)
        is hashed again.
        """
        a = self.write("a", b"abc")
        index = self.startIndex()
        self.hasher.calls = []
        old = os.stat(a.path)
        replacement = self.share.child(".replacement")
        replacement.setContent(b"xyz")
        os.utime(replacement.path, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.rename(replacement.path, a.path)
        self.assertNotEqual(os.stat(a.path).st_ino, old.st_ino)
        self.successResultOf(index.rescan())
        self.assertEqual(self.hasher.calls, ["a"])
        self.assertEqual(index.entries["a"].sha256, sha(b"xyz"))

    def test_corruptCacheTolerated(self) -> None:
        """
        A cache file that is not valid is warned about once and treated as
        empty; it is then rewritten.
        """
        bad = {"size": 3, "mtime_ns": 1, "inode": 1, "sha256": "not hex"}
        for content in [
            b"\x00not json",
            b"[]",
            b'{"version": 1, "files": {"a": 3}}',
            json.dumps({"version": 1, "files": {"a": bad}}).encode(),
        ]:
            self.state.makedirs(ignoreExistingDirectory=True)
            self.state.child("hashcache.json").setContent(content)
            self.write("a", b"abc")
            self.events[:] = []
            self.hasher.calls = []
            index = self.startIndex()
            self.assertEqual(self.hasher.calls, ["a"])
            self.assertEqual(index.entries["a"].sha256, sha(b"abc"))
            [message] = self.messages()
            self.assertIn("hashcache.json", message)
            cache = json.loads(self.state.child("hashcache.json").getContent())
            self.assertEqual(list(cache["files"]), ["a"])
            self.successResultOf(index.stop())

    def test_cacheWritesCoalesced(self) -> None:
        """
        While a cache write is running, changes are saved by one later write,
        not one per scan; stop() waits for the last write.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.run("takeRecord")
        threads.runNext()  # the first scan
        self.successResultOf(started)
        self.assertEqual(threads.names(), ["writeCache"])
        for data in [b"1", b"22", b"333"]:
            self.write("f", data)
            d = index.rescan()
            threads.run("scan")  # the first write is still pending
            self.successResultOf(d)
        self.assertEqual(threads.names(), ["writeCache"])
        stopped = index.stop()
        threads.runNext()
        self.assertNoResult(stopped)
        self.assertEqual(threads.names(), ["writeCache"])
        threads.runNext()
        self.assertEqual(threads.names(), ["writeRecord"])
        threads.runNext()
        self.successResultOf(stopped)
        cache = json.loads(self.state.child("hashcache.json").getContent())
        self.assertEqual(cache["files"]["f"]["size"], 3)


    def test_cacheWrittenInLines(self) -> None:
        """
        The cache is plain JSON written a few names to a line, so that it is
        written and read in short steps; a restart reads it without hashing.
        """
        self.patch(sharescan, "STEP", 2)
        for name in "abcde":
            self.write(name, name.encode())
        index = self.startIndex()
        lines = self.state.child("hashcache.json").getContent().split(b"\n")
        self.assertEqual(lines[0], b'{"files": {')
        self.assertEqual(lines[-2:], [b'}, "version": 1}', b""])
        self.assertEqual(len(lines), 6)  # 3 lines of names
        cache = json.loads(self.state.child("hashcache.json").getContent())
        self.assertEqual(list(cache["files"]), list("abcde"))
        self.assertEqual(cache["files"]["e"]["sha256"], sha(b"e"))
        self.restart(index)
        self.assertEqual(self.hasher.calls, [])

    def test_otherLayoutRead(self) -> None:
        """
        A valid cache laid out otherwise (as one line, as earlier versions
        wrote it) is read whole, used without hashing, and written again in
        lines.
        """
        self.write("a", b"abc")
        self.write("b", b"def")
        index = self.startIndex()
        self.successResultOf(index.stop())
        cacheFile = self.state.child("hashcache.json")
        files = json.loads(cacheFile.getContent())["files"]
        cacheFile.setContent(json.dumps({"version": 1, "files": files}, sort_keys=True).encode())
        self.hasher.calls = []
        index = self.startIndex()
        self.assertEqual(self.hasher.calls, [])
        self.assertEqual(self.messages(), [])
        self.assertEqual(cacheFile.getContent().split(b"\n")[0], b'{"files": {')
        self.assertEqual(json.loads(cacheFile.getContent())["files"], files)

    def test_unchangedCacheNotWritten(self) -> None:
        """
        A scan that hashed nothing and lost no name does not write the cache
        again, nor does a restart that found it as written.
        """
        threads = ManualThreads()
        self.write("a", b"abc")
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.runAll()
        self.successResultOf(started)
        d = index.rescan()
        threads.runAll()
        self.successResultOf(d)
        self.assertEqual(threads.calls, [])
        stopped = index.stop()
        self.assertEqual(threads.names(), ["writeRecord"])
        threads.runNext()
        self.successResultOf(stopped)
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        self.assertEqual(threads.names(), ["takeRecord"])
        threads.runNext()
        self.assertEqual(threads.names(), ["_firstScan"])
        threads.runNext()
        self.successResultOf(started)
        self.assertEqual(threads.calls, [])
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)


class ChangingFileTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    Files that change while they are hashed.
    """

    def test_changedWhileHashingHashedAgain(self) -> None:
        """
        A file that changes during hashing is hashed again, and the entry
        describes its final content.
        """
        f = self.write("growing", b"start")

        def appendOnce(path: str) -> None:
            self.hasher.beforeHash = lambda path: None
            with open(path, "ab") as out:
                out.write(b"+more")

        self.hasher.beforeHash = appendOnce
        index = self.startIndex()
        self.assertEqual(self.hasher.calls, ["growing", "growing"])
        self.assertEqual(index.entries["growing"].sha256, sha(b"start+more"))
        self.assertEqual(index.entries["growing"].size, os.stat(f.path).st_size)

    def test_keepsChangingRetriedNextScan(self) -> None:
        """
        A file that changes on every try is given up after a few tries, is
        not listed, and is listed by a later scan once it is stable.
        """
        f = self.write("busy", b"x")

        def appendAlways(path: str) -> None:
            with open(path, "ab") as out:
                out.write(b"x")

        self.hasher.beforeHash = appendAlways
        index = self.startIndex()
        self.assertEqual(self.hasher.calls, ["busy"] * HASH_TRIES)
        self.assertEqual(index.entries, {})
        self.assertEqual(len(self.messages(LogLevel.info)), 1)
        self.assertEqual(self.messages(), [])
        seen: List[Any] = []
        index.subscribe(lambda changed, removed: seen.append((changed, removed)))
        self.hasher.beforeHash = lambda path: None
        self.poll(index)
        self.assertEqual(seen, [([index.entries["busy"]], [])])
        self.assertEqual(index.entries["busy"].sha256, sha(f.getContent()))


class WatchingTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    Noticing changes: polling, coalescing, subscribers and stopping.
    """

    def subscribed(self, index: LocalIndex) -> List[Tuple[List[FileEntry], List[str]]]:
        seen: List[Tuple[List[FileEntry], List[str]]] = []
        index.subscribe(lambda changed, removed: seen.append((changed, removed)))
        return seen

    def test_pollingSeesAddChangeRemove(self) -> None:
        """
        Polling notices an added, a changed and a removed file within one
        poll interval plus the coalescing delay, and tells subscribers exactly
        what changed.
        """
        self.write("old", b"1")
        index = self.startIndex()
        seen = self.subscribed(index)
        self.clock.advance(0.9)
        self.assertEqual(seen, [])
        self.write("new", b"2")
        self.poll(index)
        self.assertEqual(seen, [([index.entries["new"]], [])])
        self.write("new", b"22")
        self.poll(index)
        self.assertEqual(seen[1], ([index.entries["new"]], []))
        self.assertEqual(index.entries["new"].size, 2)
        self.share.child("old").remove()
        self.poll(index)
        self.assertEqual(seen[2], ([], ["old"]))
        self.assertEqual(list(index.entries), ["new"])

    def test_noCallbackWithoutChange(self) -> None:
        """
        Subscribers are not called for the first scan, nor for scans that
        change nothing; an unsubscribed callback is not called.
        """
        self.write("a", b"1")
        index = self.makeIndex()
        seen = self.subscribed(index)
        self.successResultOf(index.start())
        self.addCleanup(self.stopIndex, index)
        self.poll(index)
        self.successResultOf(index.rescan())
        self.assertEqual(seen, [])
        other = self.subscribed(index)
        index.unsubscribe(index._subscribers[-1])
        self.write("b", b"2")
        self.successResultOf(index.rescan())
        self.assertEqual(len(seen), 1)
        self.assertEqual(other, [])

    def test_callbackErrorLogged(self) -> None:
        """
        A subscriber that raises is logged and does not keep others (or later
        scans) from running.
        """
        self.failuresExpected = True
        index = self.startIndex()

        def broken(changed: Any, removed: Any) -> None:
            raise ZeroDivisionError()

        index.subscribe(broken)
        seen = self.subscribed(index)
        self.write("a", b"1")
        self.successResultOf(index.rescan())
        self.write("b", b"2")
        self.successResultOf(index.rescan())
        self.assertEqual([[e.name for e in changed] for (changed, removed) in seen], [["a"], ["b"]])
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 2)
        self.assertIsInstance(failures[0]["log_failure"].value, ZeroDivisionError)

    def test_burstCoalesced(self) -> None:
        """
        Many change events within the coalescing delay cause one scan; events
        during a running scan cause exactly one more scan after it.
        """
        index, threads = self.startManual()
        for i in range(50):
            index._changed()  # what an inotify event or a poll calls
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # poll + scan
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scan"])
        for i in range(50):
            index._changed()
        self.clock.advance(0.5)
        self.assertEqual(threads.names(), ["scan"])
        threads.runNext()
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scan"])
        threads.runNext()
        self.clock.advance(0.1)
        self.assertEqual(threads.calls, [])

    def test_eventsScanOnlyTheNamedFiles(self) -> None:
        """
        After inotify events about files in the share, the next scan looks
        at those names only (C{scanNames}), and finds what a full scan
        would: an added, a changed and a removed file, told to subscribers
        as such, entries still in name order.  An event about a hidden name
        (a partial download) schedules nothing.
        """
        for i in range(20):
            self.write(f"f{i:02d}", b"x" * i)
        index, threads = self.startManual()
        seen = self.subscribed(index)
        self.hasher.calls.clear()
        self.write("new", b"new")
        self.write("f03", b"changed")
        self.share.child("f07").remove()
        index._inotifyEvent(None, self.share.child(".new.part"), inotify.IN_MODIFY)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the poll only
        for name, mask in [("new", inotify.IN_CREATE), ("f03", inotify.IN_CLOSE_WRITE), ("f07", inotify.IN_DELETE)]:
            index._inotifyEvent(None, self.share.child(name), mask)
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scanNames"])
        threads.runAll()
        self.assertEqual(sorted(self.hasher.calls), ["f03", "new"])
        [(changed, removed)] = seen
        self.assertEqual(sorted(e.name for e in changed), ["f03", "new"])
        self.assertEqual(removed, ["f07"])
        self.assertEqual(list(index.entries), sorted(index.entries))
        partial = dict(index.entries)
        rescanned = index.rescan()
        threads.runAll()
        self.successResultOf(rescanned)
        self.assertEqual(index.entries, partial)
        self.assertEqual(len(seen), 1)  # the full scan found nothing more

    def test_eventsDuringTheFirstScan(self) -> None:
        """
        An event while the restart record is taken starts nothing (the
        first scan, next, lists the share); one while the first scan runs
        is looked at by name right after it, so a file written after the
        first scan listed the share is shared without waiting for a poll.
        """
        self.write("a", b"1")
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        self.addCleanup(self.stopIndex, index)
        self.assertEqual(threads.names(), ["takeRecord"])
        index._inotifyEvent(None, self.share.child("a"), inotify.IN_CLOSE_WRITE)
        self.clock.advance(1)
        self.assertEqual(threads.names(), ["takeRecord"])
        threads.runNext()
        self.assertEqual(threads.names(), ["_firstScan"])
        self.write("late", b"2")
        index._inotifyEvent(None, self.share.child("late"), inotify.IN_CLOSE_WRITE)
        threads.runNext()  # the first scan: it sees "late" too, as a listing would not have
        self.successResultOf(started)
        self.clock.advance(0.1)
        self.assertIn("scanNames", threads.names())
        [names] = [args[1] for (f, args, d) in threads.calls if f.__name__ == "scanNames"]
        self.assertEqual(names, ["late"])
        threads.runAll()
        self.assertEqual(sorted(index.entries), ["a", "late"])

    def test_slowScansPollLessOften(self) -> None:
        """
        A poll does not start a full scan until the last one ended
        L{POLL_DUTY} times its length ago: a share whose full scan takes
        2 s is polled every 20 s, not every second; a scan of no length
        (a small share) leaves polling at its interval.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        self.addCleanup(self.stopIndex, index)
        threads.runNext()  # the record
        self.clock.advance(2.0)  # the first scan takes 2 s
        threads.runAll()
        self.successResultOf(started)
        for _ in range(19):
            self.clock.advance(1.0)
            self.assertEqual(threads.names(), [])
        self.clock.advance(1.0)
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scan"])
        threads.runAll()  # this one takes no time
        self.clock.advance(0.9)  # the next poll
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scan"])
        threads.runAll()

    def test_eventsGivenAsBytes(self) -> None:
        """
        inotify gives paths as bytes: an event about a file in the share
        still makes a scan of that name only, and one about a hidden name
        schedules nothing.
        """
        self.write("a", b"1")
        index, threads = self.startManual()
        self.write("b", b"2")
        index._inotifyEvent(None, self.share.child(".b.part").asBytesMode(), inotify.IN_MODIFY)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the poll only
        index._inotifyEvent(None, self.share.child("b").asBytesMode(), inotify.IN_CLOSE_WRITE)
        self.clock.advance(0.1)
        self.assertEqual(threads.names(), ["scanNames"])
        self.assertEqual(threads.calls[0][1][1], ["b"])
        threads.runAll()
        self.assertEqual(sorted(index.entries), ["a", "b"])

    def test_fullScanWhenNamesCannotSay(self) -> None:
        """
        A poll, an event about the share itself (or a queue overflow) and
        more than L{MAX_NAMED_SCAN} names each make the next scan a full one.
        """
        index, threads = self.startManual()
        cases = [
            lambda: index._inotifyEvent(None, self.share, inotify.IN_ATTRIB),
            lambda: index._inotifyEvent(None, self.share.child("a"), inotify.IN_Q_OVERFLOW),
            lambda: [index._inotifyEvent(None, self.share.child(f"n{i}"), inotify.IN_CREATE) for i in range(MAX_NAMED_SCAN + 1)],
            lambda: (index._inotifyEvent(None, self.share.child("a"), inotify.IN_CREATE), index._changed()),
        ]
        for case in cases:
            case()
            self.clock.advance(0.1)
            self.assertEqual(threads.names(), ["scan"])
            threads.runAll()

    def test_rescanWaitsForLaterScan(self) -> None:
        """
        rescan() during a running scan fires only after a scan that started
        after the call; a rescan while idle starts one at once.
        """
        index, threads = self.startManual()
        first = index.rescan()
        self.assertEqual(threads.names(), ["scan"])
        second = index.rescan()
        threads.runNext()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.clock.advance(0.1)
        threads.runNext()
        self.successResultOf(second)

    def test_stopLeavesNoTimers(self) -> None:
        """
        stop() cancels the poll and a pending scan, waits for a running scan,
        and fails a rescan that would have followed it.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.runAll()
        self.successResultOf(started)
        index._changed()
        self.clock.advance(0.1)
        waiting = index.rescan()
        index._changed()
        stopped = index.stop()
        self.assertNoResult(stopped)
        threads.runAll()
        self.successResultOf(stopped)
        self.failureResultOf(waiting, IndexStopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(index.rescan(), IndexStopped)


class CountingMapping(Mapping):
    """
    A read-only mapping that counts how often it is walked through (by
    iteration, a view, a comparison or a copy): to show that a piece of code
    does no work in proportion to its size.
    """

    def __init__(self, data: Dict[Any, Any]) -> None:
        self._data = data
        self.walks = 0

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        self.walks += 1
        return iter(self._data)


class NumberedChangesTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    The index numbers its changes (an incarnation and a seq) and answers
    "everything since N" with what changed after N.
    """

    def changes(self, index: LocalIndex, since: int, incarnation: Any = "mine") -> Changes:
        if incarnation == "mine":
            incarnation = index.incarnation
        return self.successResultOf(index.changesSince(incarnation, since))

    def entry(self, index: LocalIndex, name: str) -> FileEntry:
        return index.entries[name]

    def test_incarnation(self) -> None:
        """
        Each index has an incarnation of 16 hex digits of its own, which its
        scans do not change.
        """
        a = self.makeIndex()
        b = self.makeIndex()
        self.assertRegex(a.incarnation, "^[0-9a-f]{16}$")
        self.assertNotEqual(a.incarnation, b.incarnation)
        before = a.incarnation
        self.successResultOf(a.start())
        self.addCleanup(self.stopIndex, a)
        self.write("f", b"1")
        self.successResultOf(a.rescan())
        self.assertEqual(a.incarnation, before)

    def test_seqAfterFirstScan(self) -> None:
        """
        C{seq} is 0 before the first scan, and 1 after a first scan that
        found files.
        """
        self.write("a", b"1")
        index = self.makeIndex()
        self.assertEqual(index.seq, 0)
        self.successResultOf(index.start())
        self.addCleanup(self.stopIndex, index)
        self.assertEqual(index.seq, 1)
        self.assertEqual(index.floor, 0)

    def test_emptyShareSeqZero(self) -> None:
        """
        A first scan that finds no file leaves C{seq} at 0; the first file
        found makes it 1.
        """
        index = self.startIndex()
        self.assertEqual(index.seq, 0)
        self.successResultOf(index.rescan())
        self.assertEqual(index.seq, 0)
        self.write("a", b"1")
        self.successResultOf(index.rescan())
        self.assertEqual(index.seq, 1)

    def test_seqCountsScansThatChange(self) -> None:
        """
        C{seq} goes up by one for each scan that changed something, however
        many files it changed, and not for a scan that changed nothing;
        subscribers see the seq of the change they are told about.
        """
        self.write("a", b"1")
        index = self.startIndex()
        seen: List[int] = []
        index.subscribe(lambda changed, removed: seen.append(index.seq))
        self.successResultOf(index.rescan())
        self.poll(index)
        self.assertEqual(index.seq, 1)
        self.write("b", b"2")
        self.write("c", b"3")
        self.share.child("a").remove()
        self.successResultOf(index.rescan())
        self.assertEqual(index.seq, 2)
        self.write("b", b"22")
        self.poll(index)
        self.assertEqual(index.seq, 3)
        self.assertEqual(seen, [2, 3])

    def test_deltaAddedAndChanged(self) -> None:
        """
        A delta holds the entries added or changed after the asked seq, in
        name order, and nothing else.
        """
        self.write("b", b"1")
        self.write("a", b"2")
        index = self.startIndex()  # seq 1
        self.write("c", b"3")
        self.successResultOf(index.rescan())  # seq 2
        self.write("a", b"22")
        self.successResultOf(index.rescan())  # seq 3
        a, c = self.entry(index, "a"), self.entry(index, "c")
        self.assertEqual(self.changes(index, 1), Changes(index.incarnation, 3, False, [a, c], []))
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 3, False, [a], []))
        self.assertEqual(self.changes(index, 3), Changes(index.incarnation, 3, False, [], []))

    def test_deltaRemoved(self) -> None:
        """
        A name removed after the asked seq is in the delta's removals, in
        name order; one removed before it is not.
        """
        for name in "abcd":
            self.write(name, name.encode())
        index = self.startIndex()  # seq 1
        self.share.child("d").remove()
        self.successResultOf(index.rescan())  # seq 2
        self.share.child("c").remove()
        self.share.child("a").remove()
        self.successResultOf(index.rescan())  # seq 3
        self.assertEqual(self.changes(index, 1), Changes(index.incarnation, 3, False, [], ["a", "c", "d"]))
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 3, False, [], ["a", "c"]))

    def test_deltaReAdded(self) -> None:
        """
        A name removed and then shared again is a changed entry, not a
        removal, for every asker that saw it before it came back.
        """
        self.write("a", b"1")
        self.write("b", b"2")
        index = self.startIndex()  # seq 1
        self.share.child("a").remove()
        self.successResultOf(index.rescan())  # seq 2
        self.write("a", b"again")
        self.successResultOf(index.rescan())  # seq 3
        a = self.entry(index, "a")
        self.assertEqual(a.sha256, sha(b"again"))
        self.assertEqual(self.changes(index, 1), Changes(index.incarnation, 3, False, [a], []))
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 3, False, [a], []))
        self.assertEqual(self.changes(index, 3).removed, [])

    def test_deltaChangedTwice(self) -> None:
        """
        An entry changed twice after the asked seq is in the delta once, as
        it is now.
        """
        self.write("a", b"1")
        self.write("b", b"2")
        index = self.startIndex()  # seq 1
        self.write("a", b"11")
        self.successResultOf(index.rescan())  # seq 2
        self.write("a", b"111")
        self.successResultOf(index.rescan())  # seq 3
        a = self.entry(index, "a")
        self.assertEqual(a.sha256, sha(b"111"))
        self.assertEqual(self.changes(index, 1), Changes(index.incarnation, 3, False, [a], []))
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 3, False, [a], []))

    def test_fullAnswers(self) -> None:
        """
        The whole share, in name order and without removals, is the answer
        to an asker of another incarnation (or none), one asking from 0, and
        one asking from past the current seq.
        """
        for name in ["b", "Z", "\u00e9t\u00e9", "a", "z"]:
            self.write(name, name.encode("utf-8"))
        index = self.startIndex()
        self.share.child("z").remove()
        self.successResultOf(index.rescan())  # seq 2, a removal
        everything = [index.entries[name] for name in sorted(index.entries)]
        self.assertEqual([e.name for e in everything], ["Z", "a", "b", "\u00e9t\u00e9"])
        full = Changes(index.incarnation, 2, True, everything, [])
        for incarnation, since in [
            ("0123456789abcdef", 1), (None, 1), (index.incarnation, 0), (index.incarnation, 3),
        ]:
            self.assertEqual(self.changes(index, since, incarnation), full, (incarnation, since))
        self.assertFalse(self.changes(index, 1).full)

    def test_beforeStart(self) -> None:
        """
        Before its first scan the index answers with an empty full list at
        seq 0.
        """
        index = self.makeIndex()
        self.assertEqual(self.changes(index, 0), Changes(index.incarnation, 0, True, [], []))

    def test_tombstonesCapped(self) -> None:
        """
        At most C{maxTombstones} removals are remembered, the oldest dropped
        first; C{floor} becomes the seq of the newest dropped, and an asker
        from before it gets the full list.
        """
        for name in "abcdef":
            self.write(name, name.encode())
        index = self.startIndex(maxTombstones=2)  # seq 1
        for name in "abc":
            self.share.child(name).remove()
            self.successResultOf(index.rescan())
        # seq 4; "a" (removed at seq 2) was dropped.
        self.assertEqual((index.seq, index.floor), (4, 2))
        self.assertTrue(self.changes(index, 1).full)
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 4, False, [], ["b", "c"]))
        self.assertEqual(self.changes(index, 3).removed, ["c"])
        self.share.child("d").remove()
        self.share.child("e").remove()
        self.successResultOf(index.rescan())
        # seq 5; "b" (seq 3) and "c" (seq 4) were dropped.
        self.assertEqual((index.seq, index.floor), (5, 4))
        self.assertTrue(self.changes(index, 3).full)
        self.assertEqual(self.changes(index, 4), Changes(index.incarnation, 5, False, [], ["d", "e"]))

    def test_tombstonesCappedWithinOneScan(self) -> None:
        """
        When one scan removes more names than can be remembered, asking from
        before that scan gets the full list, and asking from it the delta.
        """
        for name in "abcd":
            self.write(name, name.encode())
        index = self.startIndex(maxTombstones=2)
        for name in "abc":
            self.share.child(name).remove()
        self.successResultOf(index.rescan())  # seq 2
        self.assertEqual(index.floor, 2)
        self.assertTrue(self.changes(index, 1).full)
        self.assertEqual(self.changes(index, 2), Changes(index.incarnation, 2, False, [], []))

    def test_defaultTombstoneCap(self) -> None:
        """
        By default the index remembers L{MAX_TOMBSTONES} removals, as many as
        the files a node is expected to share.
        """
        self.assertEqual(MAX_TOMBSTONES, 100_000)
        index = self.makeIndex()
        self.assertEqual(index._scanner.maxTombstones, MAX_TOMBSTONES)

    def test_answerInThread(self) -> None:
        """
        The answer is computed by thread work, from the state at the time of
        the question: a scan applied meanwhile does not change it.
        """
        threads = ManualThreads()
        self.write("a", b"1")
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.runAll()
        self.successResultOf(started)
        a = index.entries["a"]
        asked = index.changesSince(index.incarnation, 0)
        self.assertNoResult(asked)
        self.assertEqual(threads.names(), ["changes"])
        self.write("b", b"2")
        self.share.child("a").remove()
        scanned = index.rescan()
        threads.run("scan")
        self.successResultOf(scanned)
        self.assertEqual(index.seq, 2)
        threads.run("changes")
        self.assertEqual(self.successResultOf(asked), Changes(index.incarnation, 1, True, [a], []))
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)

    def test_snapshotsNotMutated(self) -> None:
        """
        The maps a scan hands out (C{entries}, and the state a question is
        answered from) are never changed by later scans: those build new ones.
        """
        for name in "abc":
            self.write(name, name.encode())
        index = self.startIndex(maxTombstones=1)
        self.share.child("c").remove()
        self.successResultOf(index.rescan())
        held = index.entries
        state = index._state
        copies = [dict(m) for m in (state.entries, state.seqs, state.tombstones, state.cache)]
        answer = self.changes(index, 0)
        answerCopy = list(answer.entries)
        self.write("a", b"changed")
        self.share.child("b").remove()
        self.write("c", b"back")
        self.write("d", b"new")
        self.successResultOf(index.rescan())
        self.share.child("d").remove()
        self.successResultOf(index.rescan())
        self.assertIsNot(index.entries, held)
        self.assertEqual(
            [dict(m) for m in (state.entries, state.seqs, state.tombstones, state.cache)], copies
        )
        self.assertIs(held, state.entries)
        self.assertEqual(answer.entries, answerCopy)

    def test_applyScanWalksNoMap(self) -> None:
        """
        Applying a scan on the reactor walks none of the maps of the old or
        the new state (entries, seqs, tombstones, hash cache, problems): the
        scan thread worked out what changed, and subscribers get its lists.
        """
        threads = ManualThreads()
        for k in range(20):
            self.write(f"f{k:02d}", b"%d" % (k,))
        self.write("back\\slash", b"refused")
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.runAll()
        self.successResultOf(started)
        seen: List[Any] = []
        index.subscribe(lambda changed, removed: seen.append((changed, removed)))
        self.write("f00", b"changed")
        self.share.child("f01").remove()
        self.write("new", b"new")
        self.write("tab\there", b"fine")
        scanned = index.rescan()

        def guard(state: Any) -> Any:
            return state._replace(**{
                field: CountingMapping(getattr(state, field))
                for field in ("entries", "seqs", "tombstones", "cache", "reported")
            })

        f, args, d = threads.calls.pop(0)
        self.assertEqual(f.__name__, "scan")
        result = f(*args)
        index._state = old = guard(index._state)
        new = guard(result.state)
        d.callback(result._replace(state=new))
        self.successResultOf(scanned)
        maps = [getattr(s, field) for s in (old, new) for field in ("entries", "seqs", "tombstones", "cache", "reported")]
        self.assertEqual([m.walks for m in maps], [0] * len(maps))
        [(changed, removed)] = seen
        self.assertIs(changed, result.changed)
        self.assertIs(removed, result.removed)
        self.assertEqual([e.name for e in changed], ["f00", "new", "tab\there"])
        self.assertEqual(removed, ["f01"])
        self.assertEqual(index.seq, 2)
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)


class RestartTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    A clean stop leaves a restart record; the next start keeps the
    incarnation and seq only when its share is exactly as the record says,
    and no (incarnation, seq) pair ever names two different lists of files.
    """

    def changes(self, index: LocalIndex, incarnation: Any, since: int) -> Changes:
        return self.successResultOf(index.changesSince(incarnation, since))

    def cleanRun(self) -> Tuple[str, int]:
        """
        Start an index over the share, change it twice, stop it cleanly;
        return the incarnation and seq it stopped at.
        """
        self.write("a", b"1")
        index = self.makeIndex()
        self.successResultOf(index.start())
        self.write("b", b"2")
        self.successResultOf(index.rescan())
        self.share.child("a").remove()
        self.successResultOf(index.rescan())
        self.assertEqual(index.seq, 3)
        self.successResultOf(index.stop())
        return index.incarnation, index.seq

    def test_unchangedShareKeepsIncarnation(self) -> None:
        """
        After a clean stop, a start over the unchanged share keeps the
        incarnation and seq: asking from that seq gets an empty delta, from
        an earlier or a later seq the full list (the removal before the stop
        is no longer known).  The record is used up.
        """
        incarnation, seq = self.cleanRun()
        self.assertTrue(self.state.child("incarnation.json").exists())
        index = self.startIndex()
        self.assertFalse(self.state.child("incarnation.json").exists())
        self.assertEqual((index.incarnation, index.seq, index.floor), (incarnation, seq, seq))
        self.assertEqual(self.changes(index, incarnation, seq), Changes(incarnation, seq, False, [], []))
        full = Changes(incarnation, seq, True, [index.entries["b"]], [])
        self.assertEqual(self.changes(index, incarnation, seq - 1), full)
        self.assertEqual(self.changes(index, incarnation, seq + 1), full)
        self.assertEqual(self.changes(index, "0" * 16, seq), full)
        # Later changes go on from the kept seq.
        self.write("c", b"3")
        self.successResultOf(index.rescan())
        self.assertEqual(index.seq, seq + 1)
        self.assertEqual(self.changes(index, incarnation, seq), Changes(incarnation, seq + 1, False, [index.entries["c"]], []))

    def test_changedShareNewIncarnation(self) -> None:
        """
        A share that changed while the node was down (a file added, or one
        changed in size) gets a new incarnation, numbered from 1.
        """
        for change in [lambda: self.write("new", b"x"), lambda: self.write("b", b"longer")]:
            incarnation, seq = self.cleanRun()
            change()
            index = self.makeIndex()
            self.successResultOf(index.start())
            self.assertNotEqual(index.incarnation, incarnation)
            self.assertEqual(index.seq, 1)
            self.assertFalse(self.state.child("incarnation.json").exists())
            self.successResultOf(index.stop())
            for child in self.share.children():
                child.remove()

    def test_missingOrCorruptRecord(self) -> None:
        """
        Without a record the incarnation is new; a record that is not valid
        (bad JSON, another version, a wrong field) is removed, ignored with a
        warning, and the incarnation is new.
        """
        incarnation, seq = self.cleanRun()
        record = self.state.child("incarnation.json")
        good = json.loads(record.getContent())
        record.remove()
        index = self.makeIndex()
        self.successResultOf(index.start())
        self.assertNotEqual(index.incarnation, incarnation)
        self.assertEqual(self.messages(), [])
        self.successResultOf(index.stop())
        bad = [b"{", json.dumps(dict(good, version=2)).encode(), json.dumps(dict(good, seq="3")).encode()]
        for data in bad:
            # The stop above wrote a good record of this content: replace it.
            record.setContent(data)
            index = self.makeIndex()
            self.successResultOf(index.start())
            self.assertNotEqual(index.incarnation, incarnation)
            self.assertFalse(record.exists())
            self.successResultOf(index.stop())
        warnings = self.messages()
        self.assertEqual(len(warnings), 3)
        self.assertTrue(all(w.startswith("ignoring restart record") for w in warnings), warnings)

    def test_crashNeverReusesAPair(self) -> None:
        """
        A node that kept its incarnation, changed (handing out seq + 1) and
        then crashed (no stop) starts with a new incarnation, even if its
        share is back to what the record described: the record was taken
        at the start before.  A second start after a crash right after a
        start does not find the record either.
        """
        incarnation, seq = self.cleanRun()
        crashed = self.makeIndex()
        self.successResultOf(crashed.start())
        self.assertEqual((crashed.incarnation, crashed.seq), (incarnation, seq))
        self.write("c", b"3")
        self.successResultOf(crashed.rescan())
        self.assertEqual(crashed.seq, seq + 1)
        # The crash: no stop.  The share goes back as it was.
        self.share.child("c").remove()
        index = self.startIndex()
        # Runs first: the crashed index's timers go.
        self.addCleanup(lambda: self.successResultOf(crashed.stop()))
        self.assertNotEqual(index.incarnation, incarnation)
        self.assertEqual(index.seq, 1)
        self.assertFalse(self.state.child("incarnation.json").exists())

    def test_startAgainTakesRecord(self) -> None:
        """
        An index started again after its own clean stop takes the record it
        left (a later crash cannot reuse it) and keeps its incarnation.
        """
        self.write("a", b"1")
        index = self.makeIndex()
        self.successResultOf(index.start())
        incarnation = index.incarnation
        self.successResultOf(index.stop())
        self.assertTrue(self.state.child("incarnation.json").exists())
        self.successResultOf(index.start())
        self.addCleanup(self.stopIndex, index)
        self.assertFalse(self.state.child("incarnation.json").exists())
        self.assertEqual((index.incarnation, index.seq), (incarnation, 1))

    def test_failedFirstScanPutsRecordBack(self) -> None:
        """
        An index whose first scan failed vouched for nothing but the
        recorded change: stopped, it puts the record back, unchanged, and
        the next start over the repaired share keeps that change.
        """
        incarnation, seq = self.cleanRun()
        record = self.state.child("incarnation.json").getContent()
        share = self.share.path
        os.rename(share, share + ".aside")
        self.share.setContent(b"not a directory")
        index = self.makeIndex()
        self.failureResultOf(index.start(), OSError)
        self.failuresExpected = True
        self.successResultOf(index.stop())
        self.assertEqual(self.state.child("incarnation.json").getContent(), record)
        self.share.remove()
        os.rename(share + ".aside", share)
        self.share.changed()
        again = self.startIndex()
        self.assertEqual((again.incarnation, again.seq), (incarnation, seq))


class VouchingTests(LocalIndexTestsMixin, SynchronousTestCase):
    """
    Until its first scan is done, an index restarted over a restart record
    answers the exact question the record names, and nothing else.
    """

    def restart(self) -> Tuple[LocalIndex, ManualThreads, Any, str, int]:
        """
        Leave a restart record (incarnation, seq 2), then start a new index
        whose record is taken but whose first scan has not run.
        """
        self.write("a", b"1")
        first = self.makeIndex()
        self.successResultOf(first.start())
        self.write("b", b"2")
        self.successResultOf(first.rescan())
        self.successResultOf(first.stop())
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        vouched = index.whenVouched()
        self.assertNoResult(vouched)
        threads.run("takeRecord")
        self.assertEqual(threads.names(), ["_firstScan"])
        return index, threads, started, first.incarnation, first.seq

    def test_quickAnswerBeforeFirstScan(self) -> None:
        """
        Before the first scan, "since the recorded seq of the recorded
        incarnation" is answered at once: nothing changed.  Any other
        question waits for the scan (no quick answer).  Once the scan
        confirms the share, the index carries on from that pair.
        """
        index, threads, started, incarnation, seq = self.restart()
        self.assertEqual(self.successResultOf(index.whenVouched()), (incarnation, seq))
        self.assertEqual(index.quickChanges(incarnation, seq), Changes(incarnation, seq, False, [], []))
        self.assertIsNone(index.quickChanges(incarnation, seq - 1))
        self.assertIsNone(index.quickChanges(incarnation, seq + 1))
        self.assertIsNone(index.quickChanges("f" * 16, seq))
        self.assertIsNone(index.quickChanges(None, 0))
        threads.runNext()
        self.successResultOf(started)
        self.assertEqual((index.incarnation, index.seq), (incarnation, seq))
        self.assertIsNone(index.quickChanges(incarnation, seq), "the scan answers from now on")
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)

    def test_changedShareRefutes(self) -> None:
        """
        A share changed while the node was down: the quick answer vouched
        for the recorded pair, the scan then takes a new incarnation (which
        the node announces), and the recorded pair is never given to the
        new list.
        """
        index, threads, started, incarnation, seq = self.restart()
        self.assertIsNotNone(index.quickChanges(incarnation, seq))
        self.write("c", b"3")
        threads.runNext()
        self.successResultOf(started)
        self.assertNotEqual(index.incarnation, incarnation)
        self.assertEqual(index.seq, 1)
        self.assertIsNone(index.quickChanges(incarnation, seq))
        self.assertTrue(any("share changed since the last stop" in m for m in self.messages(LogLevel.info)))
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)

    def test_nothingVouchedWithoutRecord(self) -> None:
        """
        Without a restart record there is no quick answer, and
        C{whenVouched} fires with None.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        threads.run("takeRecord")
        self.assertIsNone(self.successResultOf(index.whenVouched()))
        self.assertIsNone(index.quickChanges(index.incarnation, 0))
        threads.runAll()
        self.successResultOf(started)
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)

    def test_scanWaitsForTheRecord(self) -> None:
        """
        A rescan asked for while the record is being taken starts no scan
        before it is taken: the first scan, after it, answers both.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        rescanned = index.rescan()
        self.assertEqual(threads.names(), ["takeRecord"])
        threads.runNext()
        self.assertEqual(threads.names(), ["_firstScan"])
        threads.runNext()
        self.successResultOf(started)
        self.successResultOf(rescanned)
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)

    def test_stopBeforeFirstScanPutsRecordBack(self) -> None:
        """
        An index stopped after taking the record but before its first scan
        vouched for nothing but the recorded change: it writes the record
        back, and the next start keeps that change.
        """
        index, threads, started, incarnation, seq = self.restart()
        self.assertFalse(self.state.child("incarnation.json").exists())
        stopped = index.stop()
        threads.runAll()
        self.successResultOf(stopped)
        self.successResultOf(started)
        self.assertTrue(self.state.child("incarnation.json").exists())
        again = self.startIndex()
        self.assertEqual((again.incarnation, again.seq), (incarnation, seq))

    def test_stopWhileTakingTheRecord(self) -> None:
        """
        A stop while the record is being taken waits for it, scans nothing
        and leaves no record; start() fires.
        """
        threads = ManualThreads()
        index = self.makeIndex(runInThread=threads)
        started = index.start()
        stopped = index.stop()
        self.assertNoResult(stopped)
        threads.runAll()
        self.successResultOf(stopped)
        self.successResultOf(started)
        self.assertFalse(self.state.child("incarnation.json").exists())


class RealReactorTests(TestCase):
    """
    The index with the real reactor, real threads and inotify if the platform
    has it.
    """

    def test_fileWrittenDuringTheFirstScan(self) -> None:
        """
        A file written while the first scan runs, after it listed the
        share, is shared soon after the scan, by inotify, not at the next
        poll (here an hour away).
        """
        from twisted.internet import reactor

        share = FilePath(self.mktemp())
        share.makedirs()
        share.child("first").setContent(b"1")
        written: List[str] = []

        def hasher(path: str, size: int) -> Tuple[str, int, os.stat_result]:
            # Called by the first scan, which has listed the share already.
            if not written:
                written.append("late")
                share.child("late").setContent(b"late")
            return hashOpened(path, size)

        index = LocalIndex(share, FilePath(self.mktemp()), reactor, pollInterval=3600, hasher=hasher)
        appeared: defer.Deferred = defer.Deferred()

        def changed(entries: List[FileEntry], removed: List[str]) -> None:
            if any(e.name == "late" for e in entries) and not appeared.called:
                appeared.callback(None)

        index.subscribe(changed)

        def started(ignored: object) -> defer.Deferred:
            self.addCleanup(index.stop)
            self.assertEqual(written, ["late"])
            if "late" in index.entries:
                return defer.succeed(None)
            appeared.addTimeout(30, reactor)
            return appeared

        def check(ignored: object) -> None:
            self.assertEqual(index.entries["late"].sha256, sha(b"late"))

        return index.start().addCallback(started).addCallback(check)

    def test_newFileAppears(self) -> None:
        """
        A file written into the share shows up in the index and is reported
        to subscribers.
        """
        from twisted.internet import reactor

        share = FilePath(self.mktemp())
        state = FilePath(self.mktemp())
        index = LocalIndex(share, state, reactor)
        appeared: defer.Deferred = defer.Deferred()

        def changed(entries: List[FileEntry], removed: List[str]) -> None:
            for entry in entries:
                if entry.name == "hello.txt" and entry.size == 5 and not appeared.called:
                    appeared.callback(entry)

        def started(ignored: object) -> defer.Deferred:
            self.addCleanup(index.stop)
            index.subscribe(changed)
            with open(share.child("hello.txt").path, "wb") as f:
                f.write(b"hello")
            appeared.addTimeout(10, reactor)
            return appeared

        def check(entry: FileEntry) -> None:
            self.assertEqual(entry.sha256, sha(b"hello"))
            self.assertEqual(index.entries["hello.txt"], entry)

        return index.start().addCallback(started).addCallback(check)
