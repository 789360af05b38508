"""
Tests for L{p2pfiles.sharescan}'s helpers: reading and hashing one file, and
sorting in short steps.  Scans themselves are tested through the index that
runs them, in L{tests.test_localindex}.
"""

import errno
import hashlib
import os
import random
from contextlib import contextmanager
from typing import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import scanworker, sharescan
from p2pfiles.names import MAX_NAME_BYTES, nameProblem
from p2pfiles.sharescan import hashFile, hashOpened


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HashingTests(SynchronousTestCase):
    """
    Reading and hashing one file.
    """

    def test_hashFileInChunks(self) -> None:
        """
        L{hashFile} returns the SHA-256 and length of a file longer than its
        chunk size.
        """
        path = FilePath(self.mktemp())
        data = bytes(range(256)) * 5
        path.setContent(data)
        self.assertEqual(hashFile(path.path, chunk=7), (sha(data), len(data)))
        self.assertEqual(hashFile(path.path), (sha(data), len(data)))

    def test_hashOpened(self) -> None:
        """
        L{hashOpened} returns the SHA-256 and length of what it read, and the
        fstat of the file it read; a file bigger than expected, or than one
        read, is read to its end.
        """
        path = FilePath(self.mktemp())
        data = bytes(range(256)) * 5
        path.setContent(data)
        st = os.stat(path.path)
        for expected in [len(data), 3, 0]:
            digest, length, after = hashOpened(path.path, expected)
            self.assertEqual((digest, length), (sha(data), len(data)))
            self.assertEqual((after.st_ino, after.st_size, after.st_mtime_ns), (st.st_ino, st.st_size, st.st_mtime_ns))
        self.patch(scanworker, "CHUNK", 7)
        self.assertEqual(hashOpened(path.path, len(data))[:2], (sha(data), len(data)))
        empty = FilePath(self.mktemp())
        empty.setContent(b"")
        self.assertEqual(hashOpened(empty.path, 0)[:2], (sha(b""), 0))

    def test_hashOpenedRefusesSymlink(self) -> None:
        """
        L{hashOpened} does not follow a symlink: the scan resolves links
        itself and hands it the target.
        """
        target = FilePath(self.mktemp())
        target.setContent(b"secret")
        link = FilePath(self.mktemp())
        os.symlink(target.path, link.path)
        e = self.assertRaises(OSError, hashOpened, link.path, 6)
        self.assertEqual(e.errno, errno.ELOOP)


class SortingTests(SynchronousTestCase):
    """
    Sorting a long listing without holding the GIL for the whole sort.
    """

    def test_sortedInSteps(self) -> None:
        """
        Sorting in pieces gives the same order as one sort, whatever the
        piece size.
        """
        rng = random.Random(4)
        items = [bytes(rng.randrange(256) for _ in range(rng.randrange(6))) for _ in range(200)]
        for step in [1, 3, 64, 1000]:
            self.patch(sharescan, "STEP", step)
            self.assertEqual(sharescan._sortedInSteps(list(items)), sorted(items))


class NamedScanTests(SynchronousTestCase):
    """
    L{sharescan.ShareScanner.scanNames}: looking again at some names only
    builds the state a full scan would.
    """

    def test_sameStateAsAFullScan(self) -> None:
        """
        After a file is added, one changed, one removed, one given a name
        that is not shared and one replaced by a symlink out of the share,
        a scan of those names gives the full scan's entries, change
        numbers, tombstones, hash cache and problems, and the same changes.
        """
        share = FilePath(self.mktemp())
        share.makedirs()
        outside = FilePath(self.mktemp())
        outside.setContent(b"outside")
        for i in range(30):
            share.child(f"f{i:02d}").setContent(b"%d" % i)
        scanner = sharescan.ShareScanner(share, FilePath(self.mktemp()).child("cache.json"))
        old = scanner.scan(sharescan.EMPTY).state
        share.child("f00new").setContent(b"new")
        share.child("f05").setContent(b"changed, longer")
        share.child("f09").remove()
        with open(os.path.join(os.fsencode(share.path), b"bad\xff"), "wb") as f:
            f.write(b"x")
        share.child("f12").remove()
        os.symlink(outside.path, share.child("f12").path)
        names = ["f00new", "f05", "f09", os.fsdecode(b"bad\xff"), "f12"]
        full = scanner.scan(old)
        named = scanner.scanNames(old, names)
        for field in ("entries", "seqs", "tombstones", "seq", "floor", "cache"):
            self.assertEqual(getattr(named.state, field), getattr(full.state, field), field)
        self.assertEqual(list(named.state.entries), list(full.state.entries))
        self.assertEqual(list(named.state.cache), list(full.state.cache))
        self.assertEqual(named.state.reported.keys(), full.state.reported.keys())
        self.assertEqual(named.changed, full.changed)
        self.assertEqual(named.removed, full.removed)
        self.assertEqual(sorted(repr(p.key) for p in named.newProblems), sorted(repr(p.key) for p in full.newProblems))
        self.assertEqual([p.key for p in named.newProblems], [b"bad\xff", "f12"])
        # A changed file (none added) keeps its place: entries and the
        # cache stay in name order.
        share.child("f01").setContent(b"changed again")
        full = scanner.scan(named.state)
        named = scanner.scanNames(named.state, ["f01"])
        self.assertEqual([e.name for e in named.changed], ["f01"])
        self.assertEqual(list(named.state.entries), list(full.state.entries))
        self.assertEqual(list(named.state.entries), sorted(named.state.entries))
        self.assertEqual(list(named.state.cache), list(full.state.cache))
        self.assertEqual(named.state.seqs, full.state.seqs)
        # Nothing changed since: the same names give back the same state.
        again = scanner.scanNames(named.state, names)
        self.assertEqual((again.changed, again.removed, again.newProblems), ([], [], []))
        self.assertIs(again.state.entries, named.state.entries)


class ShareableNameTests(SynchronousTestCase):
    """
    Which directory entries a scan shares: exactly those whose name
    L{nameProblem} accepts, hidden ones left out silently.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.binary(min_size=1, max_size=MAX_NAME_BYTES + 8).filter(lambda b: b"/" not in b and b"\0" not in b))
    def test_agreesWithNameProblem(self, raw: bytes) -> None:
        """
        Any name a directory can hold (no '/', no NUL, not empty) is
        shared exactly when it decodes as UTF-8, is not hidden and
        L{nameProblem} finds nothing wrong with it; a refused one is
        reported as a problem unless it is a hidden UTF-8 name.
        """
        scanner = sharescan.ShareScanner(FilePath(self.mktemp()), FilePath(self.mktemp()))
        problems: list = []
        name = scanner._shareable(raw, problems)
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            decoded = None
        hidden = raw.startswith(b".")
        accepted = decoded is not None and not hidden and nameProblem(decoded) is None
        self.assertEqual(name, decoded if accepted else None)
        # A name that is not UTF-8 is a problem even when it is hidden.
        self.assertEqual(len(problems), 0 if accepted or (hidden and decoded is not None) else 1)

    def test_longAndBackslashNamesRefused(self) -> None:
        """
        The names the quick check passes on to L{nameProblem}: too long, or
        holding a backslash, are refused with its reason.
        """
        scanner = sharescan.ShareScanner(FilePath(self.mktemp()), FilePath(self.mktemp()))
        for raw, reason in [(b"a" * (MAX_NAME_BYTES + 1), "longer than"), (b"a\\b", "must not contain")]:
            problems: list = []
            self.assertIsNone(scanner._shareable(raw, problems))
            [problem] = problems
            self.assertIn(reason, problem.reason)
        self.assertEqual(scanner._shareable(b"a" * MAX_NAME_BYTES, []), "a" * MAX_NAME_BYTES)


class SettleTests(SynchronousTestCase):
    """
    Every scan runs inside the scanner's C{settle(first)}; only the first,
    which builds an entry for every file, settles.
    """

    def test_firstScanSettles(self) -> None:
        """
        The first scan (its state has no cache yet) is settled; later
        full scans and named scans do not.
        """
        share = FilePath(self.mktemp())
        share.makedirs()
        share.child("a").setContent(b"1")
        asked: list = []

        @contextmanager
        def settle(first: bool) -> Iterator[None]:
            asked.append(first)
            yield

        scanner = sharescan.ShareScanner(share, FilePath(self.mktemp()), settle=settle)
        first = scanner.scan(sharescan.EMPTY)
        second = scanner.scan(first.state)
        scanner.scanNames(second.state, ["a"])
        self.assertEqual(asked, [True, False, False])


class HashCacheTests(SynchronousTestCase):
    """
    The hash cache in memory is one L{sharescan.CacheItem} per file; the
    file it is kept in does not change.
    """

    def setUp(self) -> None:
        root = FilePath(self.mktemp())
        self.share = root.child("share")
        self.share.makedirs()
        self.scanner = sharescan.ShareScanner(self.share, root.child("state").child("hashcache.json"))

    def test_roundTrip(self) -> None:
        """
        What L{ShareScanner.writeCache} writes, in the cache file's JSON
        objects (C{inode}, C{mtime_ns}, C{sha256}, C{size}), L{loadCache}
        reads back as equal L{CacheItem}s, the file's layout current.
        """
        cache = {
            f"f{i:04d}": sharescan.CacheItem(i, 1_700_000_000_123_456_789 + i, 10**12 + i, sha(b"%d" % i))
            for i in range(sharescan.STEP * 2 + 3)
        }
        self.scanner.writeCache(cache)
        data = self.scanner.cacheFile.getContent()
        import json

        self.assertEqual(
            json.loads(data)["files"]["f0001"],
            {"size": 1, "mtime_ns": 1_700_000_000_123_456_790, "inode": 10**12 + 1, "sha256": sha(b"1")},
        )
        loaded, problem, current = self.scanner.loadCache()
        self.assertEqual((loaded, problem, current), (cache, None, True))
        self.assertTrue(all(type(item) is sharescan.CacheItem for item in loaded.values()))
        self.assertEqual(loaded["f0002"].signature(), (2, 1_700_000_000_123_456_791, 10**12 + 2))

    def test_malformedItem(self) -> None:
        """
        A file object with a field of the wrong type makes the whole cache
        count as empty, whether the file is laid out as written or not.
        """
        good = {"size": 1, "mtime_ns": 2, "inode": 3, "sha256": sha(b"")}
        for files in ({"a": good, "b": dict(good, size="1")}, {"a": dict(good, sha256="x" * 64)}):
            import json

            laidOut = b'{"files": {\n' + json.dumps(files, sort_keys=True)[1:-1].encode() + b'\n}, "version": 1}\n'
            for data in (laidOut, json.dumps({"files": files, "version": 1}).encode()):
                self.scanner.cacheFile.parent().makedirs(ignoreExistingDirectory=True)
                self.scanner.cacheFile.setContent(data)
                self.assertEqual(self.scanner.loadCache(), ({}, "malformed entry", False))

    def test_oneStringPerName(self) -> None:
        """
        After a scan that took its hashes from a loaded cache, the entries,
        the change numbers and the cache are keyed by the very string each
        entry holds (a loaded cache's own key strings are not kept).
        """
        for name in ("a.txt", "b.txt"):
            self.share.child(name).setContent(name.encode())
        first = self.scanner.scan(sharescan.EMPTY).state
        self.scanner.writeCache(first.cache)
        second = self.scanner.scan(first._replace(cache=None)).state
        self.assertEqual(second.cache, first.cache)
        for key in second.cache:
            entry = second.entries[key]
            self.assertIs([k for k in second.entries if k == key][0], entry.name)
            self.assertIs([k for k in second.cache if k == key][0], entry.name)
            self.assertIs(second.cache[key].sha256, entry.sha256)
