"""
Tests for L{p2pfiles.partfile}: part files that cannot be corrupted (one
writer, no links followed, only hashed bytes renamed into place), stale part
removal, serving only the indexed file, and L{SerialWriter}'s ordered,
back-pressured thread writes.

Files are real, in temporary directories; "threads" run when the test says
so, on the test's thread; time is a L{Clock}.
"""

import errno
import fcntl
import hashlib
import io
import os
import stat
from typing import Any, Callable, List, Tuple

from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.names import MAX_NAME_BYTES, partName
from p2pfiles.partfile import (
    PartBusy,
    PartError,
    PartialFile,
    SerialWriter,
    StreamSink,
    openShared,
    removeStaleParts,
    waitForPart,
)

NAME = "big.bin"
CONTENT = bytes(range(256)) * 40 + b"tail"
SIZE = len(CONTENT)


def sha256hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SHA = sha256hex(CONTENT)
OTHER_SHA = sha256hex(b"some other content")


def syncThread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """
    Run "thread" work at once, on the calling thread.
    """
    return defer.maybeDeferred(f, *args)


class ManualThreads:
    """
    Thread work that runs only when the test says so.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)


class PartNameTests(SynchronousTestCase):
    """
    L{partName} gives every acceptable name a hidden part name that fits
    the file system and is the same each time.
    """

    def test_shortName(self) -> None:
        """
        A name with room for them gets C{.} before and C{.part} after.
        """
        self.assertEqual(partName("movie.bin"), ".movie.bin.part")

    def test_longestNameKeptReadable(self) -> None:
        """
        A 249-byte name makes a part name of exactly 255 bytes, still the
        readable form.
        """
        name = "a" * (MAX_NAME_BYTES - 6)
        self.assertEqual(partName(name), "." + name + ".part")
        self.assertEqual(len(partName(name).encode("utf-8")), MAX_NAME_BYTES)

    def test_255ByteNameGetsFixedHiddenName(self) -> None:
        """
        A 255-byte name (and one of 250) gets a short hidden C{.part} name made
        from its SHA-256; different names get different part names.
        """
        for name in ["a" * MAX_NAME_BYTES, "b" * (MAX_NAME_BYTES - 5)]:
            part = partName(name)
            digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:40]
            self.assertEqual(part, ".p2pfiles-" + digest + ".part")
            self.assertEqual(part, partName(name))
        self.assertNotEqual(partName("a" * 255), partName("a" * 254))

    def test_multiByteNameCountedInBytes(self) -> None:
        """
        The limit is in UTF-8 bytes, not characters: 124 two-byte characters
        (248 bytes) fit, 125 (250 bytes) do not.
        """
        fits = "\u00e9" * 124
        self.assertEqual(partName(fits), "." + fits + ".part")
        tooLong = "\u00e9" * 125
        part = partName(tooLong)
        self.assertTrue(part.startswith(".p2pfiles-"))
        self.assertLessEqual(len(part.encode("utf-8")), MAX_NAME_BYTES)


class PartialFileTestsMixin:
    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.final = self.directory.child(NAME)
        self.part = self.directory.child(partName(NAME))

    def openSink(self, name: str = NAME, **kwargs: Any) -> PartialFile:
        sink = PartialFile(self.directory, name, **kwargs)
        self.addCleanup(sink.close)
        return sink


class PartialFileTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    L{PartialFile} writes a hidden part, hashed as written, and renames it
    only after verifying it.
    """

    def test_success(self) -> None:
        """
        All bytes in and the SHA-256 matching: the final file holds them, no
        part is left, and the file has the mode a new file gets (the part
        itself is private).
        """
        old = os.umask(0o027)
        self.addCleanup(os.umask, old)
        sink = self.openSink()
        self.assertEqual(sink.resumeOffset(), 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.part.path).st_mode), 0o600)
        sink.write(CONTENT[:1000])
        sink.write(CONTENT[1000:])
        self.assertEqual(sink.offset, SIZE)
        self.assertEqual(sink.digest(), SHA)
        sink.finish(SHA, SIZE)
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertFalse(os.path.lexists(self.part.path))
        self.assertEqual(stat.S_IMODE(os.stat(self.final.path).st_mode), 0o640)

    def test_mismatchSavesNothing(self) -> None:
        """
        A SHA-256 mismatch raises L{PartError} with code "verify"; the part is
        removed and a file already under the final name is untouched.
        """
        self.final.setContent(b"the old version")
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        error = self.assertRaises(PartError, sink.finish, OTHER_SHA)
        self.assertEqual(error.code, "verify")
        self.assertEqual(self.final.getContent(), b"the old version")
        self.assertFalse(os.path.lexists(self.part.path))

    def test_sizeMismatchSavesNothing(self) -> None:
        """
        A matching hash of fewer bytes than the size announced is refused
        too ("verify").
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        error = self.assertRaises(PartError, sink.finish, SHA, SIZE + 1)
        self.assertEqual(error.code, "verify")
        self.assertFalse(os.path.lexists(self.final.path))
        self.assertFalse(os.path.lexists(self.part.path))

    def test_resumeRehashesExistingPart(self) -> None:
        """
        A part left by an earlier attempt is resumed from its length, its
        bytes hashed again.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT[:3000])
        sink.close()
        again = self.openSink()
        self.assertEqual(again.resumeOffset(), 3000)
        self.assertEqual(again.digest(), sha256hex(CONTENT[:3000]))
        again.write(CONTENT[3000:])
        again.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_restartTruncates(self) -> None:
        """
        C{restart} throws the part's bytes away: offset 0, a fresh hash, and
        writes start again at byte 0.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(b"junk that is not a prefix" * 10)
        sink.restart()
        self.assertEqual((sink.offset, sink.digest()), (0, sha256hex(b"")))
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_discardRemovesOnlyItsOwnPart(self) -> None:
        """
        C{discard} removes the part it holds (twice is harmless); a
        L{PartialFile} that never got the part (busy) removes nothing.
        """
        sink = self.openSink()
        sink.resumeOffset()
        loser = self.openSink()
        self.assertRaises(PartBusy, loser.resumeOffset)
        loser.discard()
        self.assertTrue(os.path.lexists(self.part.path))
        sink.discard()
        sink.discard()
        self.assertFalse(os.path.lexists(self.part.path))

    def test_createsMissingDirectory(self) -> None:
        """
        C{resumeOffset} creates the destination directory if needed.
        """
        directory = self.directory.child("new").child("deeper")
        sink = PartialFile(directory, NAME)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertEqual(directory.child(NAME).getContent(), CONTENT)

    def test_badNamesRefused(self) -> None:
        """
        A name that is not a single path segment is refused with code
        "bad-name" before anything is created.
        """
        for name in ["", ".", "..", "a/b", "../x", "a\0b"]:
            error = self.assertRaises(PartError, PartialFile, self.directory, name)
            self.assertEqual(error.code, "bad-name")
        self.assertEqual(self.directory.listdir(), [])

    def test_writeBeforeOpenRefused(self) -> None:
        """
        Writing to a part that was never opened (or was closed) is an "io"
        error, not a crash.
        """
        sink = self.openSink()
        self.assertEqual(self.assertRaises(PartError, sink.write, b"x").code, "io")


class OneWriterTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    One download per destination, across processes: the part is locked.
    """

    def test_secondWriterOfOneDestinationIsRefused(self) -> None:
        """
        While one L{PartialFile} holds the part, a second one (a second open
        file description, as in another process) gets L{PartBusy}, naming the
        part, and writes nothing; once the first lets go, the second resumes
        what the first wrote.
        """
        first = self.openSink()
        first.resumeOffset()
        first.write(CONTENT[:100])
        second = self.openSink()
        busy = self.assertRaises(PartBusy, second.resumeOffset)
        self.assertEqual(busy.code, "busy")
        self.assertEqual(busy.part, self.part)
        self.assertIn(self.part.path, str(busy))
        self.assertRaises(PartError, second.write, b"x" * 50)
        self.assertEqual(self.part.getContent(), CONTENT[:100])
        first.close()
        self.assertEqual(second.resumeOffset(), 100)
        second.write(CONTENT[100:])
        second.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_lockHeldUntilRenamed(self) -> None:
        """
        A writer that opened the part just before another finished with it
        (and got the lock only after the rename) does not write into the
        renamed file: it starts a new, empty part.
        """
        first = self.openSink()
        first.resumeOffset()
        first.write(CONTENT)
        realFlock = fcntl.flock
        calls: List[int] = []

        def flockAfterFirstFinishes(fd: int, operation: int) -> None:
            if not calls:
                # The second has opened the part; the first renames it now.
                self.assertRaises(BlockingIOError, realFlock, fd, operation)
                first.finish(SHA)
            calls.append(fd)
            realFlock(fd, operation)

        self.patch(fcntl, "flock", flockAfterFirstFinishes)
        second = self.openSink()
        self.assertEqual(second.resumeOffset(), 0)
        self.assertEqual(len(calls), 2)
        second.write(b"other bytes")
        second.close()
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertEqual(self.part.getContent(), b"other bytes")

    def test_partReplacedWhileWaitingForLockIsOpenedAgain(self) -> None:
        """
        If, while a writer waited for the lock, the part it opened was
        renamed into place and a new part made under the name, the writer
        opens and resumes that new part instead of writing into the renamed
        file.
        """
        first = self.openSink()
        first.resumeOffset()
        first.write(CONTENT)
        realFlock = fcntl.flock
        calls: List[int] = []

        def flockAfterAnotherPart(fd: int, operation: int) -> None:
            if not calls:
                calls.append(fd)
                first.finish(SHA)
                third = PartialFile(self.directory, NAME)
                third.resumeOffset()
                third.write(b"third")
                third.close()
            calls.append(fd)
            realFlock(fd, operation)

        self.patch(fcntl, "flock", flockAfterAnotherPart)
        second = self.openSink()
        self.assertEqual(second.resumeOffset(), 5)
        self.assertEqual(second.digest(), sha256hex(b"third"))
        second.write(b" and more")
        second.close()
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertEqual(self.part.getContent(), b"third and more")

    def test_waitForPartTakesItsTurn(self) -> None:
        """
        L{waitForPart} tries again every C{interval} seconds while the part
        is busy and fires with the offset once it is free.
        """
        clock = Clock()
        first = self.openSink()
        first.resumeOffset()
        first.write(b"abc")
        second = self.openSink()
        d = defer.Deferred.fromCoroutine(waitForPart(clock, syncThread, second, timeout=10.0, interval=1.0))
        clock.advance(1.0)
        self.assertNoResult(d)
        first.close()
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), 3)

    def test_waitForPartGivesUp(self) -> None:
        """
        L{waitForPart} fails with L{PartBusy} once the part stayed busy for
        C{timeout} seconds, leaving no timer behind.
        """
        clock = Clock()
        self.openSink().resumeOffset()
        d = defer.Deferred.fromCoroutine(waitForPart(clock, syncThread, self.openSink(), timeout=3.0, interval=1.0))
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertNoResult(d)
        clock.advance(1.0)
        self.failureResultOf(d, PartBusy)
        self.assertEqual(clock.getDelayedCalls(), [])


class PlantedPartTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    Something other than our own plain file at the part's name is refused,
    and nothing is written through it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.elsewhere = FilePath(self.mktemp())
        self.elsewhere.makedirs()
        self.important = self.elsewhere.child("important.conf")
        self.important.setContent(b"keep me")

    def assertRefused(self, what: str) -> None:
        sink = self.openSink()
        error = self.assertRaises(PartError, sink.resumeOffset)
        self.assertEqual(error.code, "io")
        self.assertIn(self.part.path, str(error))
        self.assertIn(what, str(error))
        self.assertNotIn("\n", str(error))
        self.assertRaises(PartError, sink.write, b"x")
        self.assertFalse(os.path.lexists(self.final.path))

    def test_plantedSymlinkPartIsRefusedAndTargetUntouched(self) -> None:
        """
        A symlink at the part's name is refused, not followed: its target
        keeps its content and the link stays a link.
        """
        os.symlink(self.important.path, self.part.path)
        self.assertRefused("symbolic link")
        self.assertEqual(self.important.getContent(), b"keep me")
        self.assertTrue(os.path.islink(self.part.path))

    def test_danglingSymlinkPartRefused(self) -> None:
        """
        A symlink to nothing is refused too (rather than creating its
        target).
        """
        target = self.elsewhere.child("not-yet")
        os.symlink(target.path, self.part.path)
        self.assertRefused("symbolic link")
        self.assertFalse(os.path.lexists(target.path))

    def test_hardLinkedPartRefused(self) -> None:
        """
        A part that is a hard link to another file is refused, and that
        file keeps its content.
        """
        os.link(self.important.path, self.part.path)
        self.assertRefused("hard links")
        self.assertEqual(self.important.getContent(), b"keep me")

    def test_fifoPartRefusedWithoutBlocking(self) -> None:
        """
        A fifo at the part's name is refused at once (opening it does not
        wait for a writer).
        """
        os.mkfifo(self.part.path)
        self.assertRefused("not a regular file")

    def test_directoryPartRefused(self) -> None:
        """
        A directory at the part's name is refused.
        """
        self.part.makedirs()
        self.assertRefused("Is a directory")


class IdentityAtFinishTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    C{finish} renames only the file it wrote, of the length it hashed.
    """

    def test_partReplacedDuringDownloadNotRenamed(self) -> None:
        """
        If the part's name leads to another file by the time of C{finish}
        (even one of the same length), nothing is renamed: the final name
        stays absent, the other file stays, and the error names the part.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        # Our file keeps one link (elsewhere), the name leads to another.
        os.link(self.part.path, self.directory.child("moved").path)
        planted = self.directory.child("planted")
        planted.setContent(b"p" * SIZE)
        os.replace(planted.path, self.part.path)
        error = self.assertRaises(PartError, sink.finish, SHA)
        self.assertEqual(error.code, "io")
        self.assertIn(self.part.path, str(error))
        self.assertFalse(os.path.lexists(self.final.path))
        self.assertEqual(self.part.getContent(), b"p" * SIZE)

    def test_partReplacedBySymlinkNotRenamed(self) -> None:
        """
        Nor is a symlink put in the part's place renamed into place.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        os.unlink(self.part.path)
        os.symlink("/etc/passwd", self.part.path)
        self.assertEqual(self.assertRaises(PartError, sink.finish, SHA).code, "io")
        self.assertFalse(os.path.lexists(self.final.path))
        self.assertTrue(os.path.islink(self.part.path))

    def test_discardLeavesAReplacedPartAlone(self) -> None:
        """
        C{discard} removes the part only if its name still leads to the file
        this object holds.
        """
        sink = self.openSink()
        sink.resumeOffset()
        planted = self.directory.child("planted")
        planted.setContent(b"not ours")
        os.replace(planted.path, self.part.path)
        sink.discard()
        self.assertEqual(self.part.getContent(), b"not ours")

    def test_partGrownBehindOurBackNotRenamed(self) -> None:
        """
        Bytes that were not hashed (appended by something else) keep the
        part from being renamed.
        """
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        with open(self.part.path, "ab") as f:
            f.write(b"unhashed")
        self.assertRaises(PartError, sink.finish, SHA)
        self.assertFalse(os.path.lexists(self.final.path))

    def test_finalSymlinkReplacedNotFollowed(self) -> None:
        """
        A symlink under the final name is replaced by the file, and its
        target is untouched.
        """
        outside = FilePath(self.mktemp())
        outside.setContent(b"keep me")
        os.symlink(outside.path, self.final.path)
        sink = self.openSink()
        sink.resumeOffset()
        sink.write(CONTENT)
        sink.finish(SHA)
        self.assertFalse(os.path.islink(self.final.path))
        self.assertEqual(self.final.getContent(), CONTENT)
        self.assertEqual(outside.getContent(), b"keep me")


class LongNameTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    Names too long for C{.NAME.part} can be downloaded and resumed.
    """

    def test_longNamePartFitsAndIsFoundAgain(self) -> None:
        """
        A 255-byte name is received into its fixed-length part, which a
        later attempt resumes, and saved under the full name.
        """
        name = "\u00e9" * 127 + "x"
        self.assertEqual(len(name.encode("utf-8")), MAX_NAME_BYTES)
        sink = self.openSink(name)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT[:500])
        sink.close()
        self.assertEqual(self.directory.listdir(), [partName(name)])
        again = self.openSink(name)
        self.assertEqual(again.resumeOffset(), 500)
        again.write(CONTENT[500:])
        again.finish(SHA)
        self.assertEqual(self.directory.child(name).getContent(), CONTENT)
        self.assertEqual(self.directory.listdir(), [name])


class FailingWrite:
    """
    C{os.write} that lets C{allow} more bytes through (a short write when
    asked for more), then fails with C{error}.
    """

    def __init__(self, allow: int, error: int = errno.ENOSPC) -> None:
        self.allow = allow
        self.error = error

    def __call__(self, fd: int, data: Any) -> int:
        if self.allow == 0:
            raise OSError(self.error, os.strerror(self.error))
        written = os.write(fd, data[: self.allow])
        self.allow -= written
        return written


class WriteErrorTests(PartialFileTestsMixin, SynchronousTestCase):
    """
    A write error ends the download with a one-line error and leaves a part
    whose hash state matches what reached it.
    """

    def test_diskFullLeavesResumablePart(self) -> None:
        """
        After a short write then ENOSPC, the error names the part and the
        reason; exactly the bytes that reached the file are counted and
        hashed; a later attempt resumes from there to a verified file.
        """
        sink = self.openSink(osWrite=FailingWrite(700))
        sink.resumeOffset()
        error = self.assertRaises(PartError, sink.write, CONTENT[:1000])
        self.assertEqual(str(error), f"cannot write {self.part.path}: No space left on device")
        self.assertEqual(error.code, "io")
        self.assertEqual(sink.offset, 700)
        self.assertEqual(sink.digest(), sha256hex(CONTENT[:700]))
        sink.close()
        self.assertEqual(self.part.getContent(), CONTENT[:700])
        again = self.openSink()
        self.assertEqual(again.resumeOffset(), 700)
        again.write(CONTENT[700:])
        again.finish(SHA)
        self.assertEqual(self.final.getContent(), CONTENT)

    def test_ioErrorNamesThePath(self) -> None:
        """
        Other write errors (EIO) are reported the same way.
        """
        sink = self.openSink(osWrite=FailingWrite(0, errno.EIO))
        sink.resumeOffset()
        error = self.assertRaises(PartError, sink.write, b"abc")
        self.assertEqual(str(error), f"cannot write {self.part.path}: Input/output error")
        self.assertEqual((sink.offset, sink.digest()), (0, sha256hex(b"")))


class StreamSinkTests(SynchronousTestCase):
    """
    L{StreamSink} writes a download straight to a stream and verifies it at
    the end.
    """

    def test_writesThroughAndVerifies(self) -> None:
        """
        Bytes reach the stream as written; a matching SHA-256 finishes
        quietly, a mismatch raises "verify".
        """
        stream = io.BytesIO()
        sink = StreamSink(stream)
        self.assertEqual(sink.resumeOffset(), 0)
        sink.write(CONTENT[:10])
        self.assertEqual(stream.getvalue(), CONTENT[:10])
        sink.write(CONTENT[10:])
        self.assertEqual(sink.resumeOffset(), SIZE)
        sink.finish(SHA, SIZE)
        self.assertEqual(self.assertRaises(PartError, sink.finish, OTHER_SHA).code, "verify")

    def test_restartOnlyBeforeWriting(self) -> None:
        """
        A restart before any byte is written is fine; after, it is an "io"
        error, since written bytes cannot be taken back.
        """
        sink = StreamSink(io.BytesIO())
        sink.restart()
        sink.write(b"a")
        self.assertEqual(self.assertRaises(PartError, sink.restart).code, "io")

    def test_writeErrorIsPartError(self) -> None:
        """
        A stream that cannot be written (a closed pipe) gives an "io"
        L{PartError} and counts nothing.
        """

        class Broken:
            def write(self, data: bytes) -> int:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        sink = StreamSink(Broken())  # type: ignore[arg-type]
        error = self.assertRaises(PartError, sink.write, b"abc")
        self.assertEqual((error.code, str(error)), ("io", "cannot write the output: Broken pipe"))
        self.assertEqual(sink.offset, 0)


class StalePartsTests(SynchronousTestCase):
    """
    L{removeStaleParts} removes abandoned parts, and nothing else.
    """

    NOW = 1_000_000_000.0
    DAY = 86400.0

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()

    def make(self, name: str, age: float, data: bytes = b"partial") -> FilePath:
        child = self.directory.child(name)
        child.setContent(data)
        self.age(child, age)
        return child

    def age(self, child: FilePath, age: float) -> None:
        os.utime(child.path, (self.NOW - age, self.NOW - age), follow_symlinks=False)

    def test_stalePartsRemovedFreshKept(self) -> None:
        """
        Hidden C{.part} files older than C{maxAge} are removed and named;
        younger ones are kept.
        """
        self.make(".old.part", 2 * self.DAY)
        self.make(".p2pfiles-" + "0" * 40 + ".part", 2 * self.DAY)
        self.make(".fresh.part", 60)
        removed = removeStaleParts(self.directory, self.DAY, self.NOW)
        self.assertEqual(removed, [".old.part", ".p2pfiles-" + "0" * 40 + ".part"])
        self.assertEqual(self.directory.listdir(), [".fresh.part"])

    def test_stalePartsOnlyHiddenPartFiles(self) -> None:
        """
        Shared files that end in C{.part}, hidden files that are not parts,
        directories and symlinks (and what they lead to) are never removed,
        however old.
        """
        self.make("shared.part", 2 * self.DAY)
        self.make(".config", 2 * self.DAY)
        directory = self.directory.child(".dir.part")
        directory.makedirs()
        self.age(directory, 2 * self.DAY)
        outside = FilePath(self.mktemp())
        outside.setContent(b"keep me")
        os.utime(outside.path, (0, 0))
        os.symlink(outside.path, self.directory.child(".link.part").path)
        self.age(self.directory.child(".link.part"), 2 * self.DAY)
        os.mkfifo(self.directory.child(".fifo.part").path)
        self.age(self.directory.child(".fifo.part"), 2 * self.DAY)
        self.assertEqual(removeStaleParts(self.directory, self.DAY, self.NOW), [])
        self.assertEqual(
            sorted(self.directory.listdir()), [".config", ".dir.part", ".fifo.part", ".link.part", "shared.part"]
        )
        self.assertEqual(outside.getContent(), b"keep me")

    def test_stalePartsSkipLockedOnes(self) -> None:
        """
        An old part that a download holds (locked) is kept.
        """
        sink = PartialFile(self.directory, "x")
        self.addCleanup(sink.close)
        sink.resumeOffset()
        self.age(sink.part, 2 * self.DAY)
        self.assertEqual(removeStaleParts(self.directory, self.DAY, self.NOW), [])
        self.assertTrue(os.path.lexists(sink.part.path))
        sink.close()
        self.assertEqual(removeStaleParts(self.directory, self.DAY, self.NOW), [".x.part"])

    def test_stalePartsMissingDirectory(self) -> None:
        """
        A directory that does not exist has nothing to remove.
        """
        self.assertEqual(removeStaleParts(self.directory.child("nope"), self.DAY, self.NOW), [])


class OpenSharedTests(SynchronousTestCase):
    """
    L{openShared} serves only the file that was indexed.
    """

    def setUp(self) -> None:
        base = FilePath(self.mktemp())
        self.share = base.child("share")
        self.share.makedirs()
        self.file = self.share.child(NAME)
        self.file.setContent(CONTENT)
        self.secret = base.child("secret")
        self.secret.setContent(b"not to be served")

    def signature(self, path: FilePath) -> Tuple[int, int, int]:
        st = os.stat(path.path)
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def assertChanged(self, name: str, expected: Any) -> None:
        error = self.assertRaises(PartError, openShared, self.share, name, expected)
        self.assertEqual(error.code, "changed")
        self.assertEqual(str(error), f"{name} changed since it was indexed; try again")

    def test_opensIndexedFileAtOffset(self) -> None:
        """
        The indexed file is opened at C{offset}; an offset equal to the size
        reads nothing.
        """
        f = openShared(self.share, NAME, self.signature(self.file), 1000)
        self.addCleanup(f.close)
        self.assertEqual(f.read(), CONTENT[1000:])
        g = openShared(self.share, NAME, self.signature(self.file), SIZE)
        self.addCleanup(g.close)
        self.assertEqual(g.read(), b"")

    def test_expectedAsObjectWithOrWithoutInode(self) -> None:
        """
        The identity may be an object with C{size} and C{mtime_ns} (and
        optionally C{inode}); without an inode, a copy with the same size and
        mtime is accepted.
        """

        class Identity:
            def __init__(self, size: int, mtime_ns: int) -> None:
                self.size = size
                self.mtime_ns = mtime_ns

        size, mtimeNs, inode = self.signature(self.file)
        f = openShared(self.share, NAME, Identity(size, mtimeNs))
        self.addCleanup(f.close)
        self.assertEqual(f.read(), CONTENT)
        copy = self.share.child("copy")
        copy.setContent(CONTENT)
        os.utime(copy.path, ns=(mtimeNs, mtimeNs))
        os.replace(copy.path, self.file.path)
        g = openShared(self.share, NAME, (size, mtimeNs))
        self.addCleanup(g.close)
        self.assertEqual(g.read(), CONTENT)
        self.assertChanged(NAME, (size, mtimeNs, inode))

    def test_offsetBeyondSizeRefused(self) -> None:
        """
        An offset beyond the indexed size is "bad-offset", before any file
        is opened (the name need not exist).
        """
        error = self.assertRaises(PartError, openShared, self.share, NAME, (SIZE, 0), SIZE + 1)
        self.assertEqual(error.code, "bad-offset")
        error = self.assertRaises(PartError, openShared, self.share, "no-such-file", (10, 0), 11)
        self.assertEqual(error.code, "bad-offset")

    def test_servingRefusesSwappedSymlink(self) -> None:
        """
        A shared file replaced by a symlink leading out of the share since
        it was indexed is refused with code "changed", not served.
        """
        expected = self.signature(self.file)
        self.file.remove()
        os.symlink(self.secret.path, self.file.path)
        self.assertChanged(NAME, expected)

    def test_servingRefusesSymlinkSwappedInWhileOpening(self) -> None:
        """
        A symlink put in the file's place after it was looked at, but before
        it is opened, is not followed, even to a file of the same size and
        mtime (with no inode to tell them apart).
        """
        size, mtimeNs, inode = self.signature(self.file)
        self.secret.setContent(b"s" * SIZE)
        os.utime(self.secret.path, ns=(mtimeNs, mtimeNs))
        realLstat = os.lstat

        def lstatThenSwap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            result = realLstat(path, *args, **kwargs)
            if path == self.file.path:
                os.unlink(self.file.path)
                os.symlink(self.secret.path, self.file.path)
            return result

        self.patch(os, "lstat", lstatThenSwap)
        self.assertChanged(NAME, (size, mtimeNs))

    def test_servingRefusesSymlinkToAnotherSharedFile(self) -> None:
        """
        A file replaced by a (legal) symlink to another file in the share is
        refused too: the target is not the file that was indexed.
        """
        expected = self.signature(self.file)
        self.share.child("other").setContent(b"other content")
        self.file.remove()
        os.symlink("other", self.file.path)
        self.assertChanged(NAME, expected)

    def test_symlinkInsideShareServed(self) -> None:
        """
        A symlink to a visible file in the share, indexed with its target's
        identity, is served with the target's content.
        """
        os.symlink(NAME, self.share.child("alias").path)
        f = openShared(self.share, "alias", self.signature(self.file))
        self.addCleanup(f.close)
        self.assertEqual(f.read(), CONTENT)

    def test_symlinkToHiddenFileRefused(self) -> None:
        """
        A symlink to a hidden file in the share (a part) is refused, as the
        index refuses it.
        """
        hidden = self.share.child(".hidden.part")
        hidden.setContent(CONTENT)
        os.symlink(".hidden.part", self.share.child("alias").path)
        self.assertChanged("alias", self.signature(hidden))

    def test_modifiedFileRefused(self) -> None:
        """
        A file whose size or mtime differs from the index is "changed".
        """
        expected = self.signature(self.file)
        self.file.setContent(CONTENT + b"more")
        self.assertChanged(NAME, expected)

    def test_fifoRefusedWithoutBlocking(self) -> None:
        """
        A fifo put in a file's place is "changed", at once.
        """
        expected = self.signature(self.file)
        self.file.remove()
        os.mkfifo(self.file.path)
        self.assertChanged(NAME, expected)

    def test_missingFileIsNotFound(self) -> None:
        """
        A file gone from the share is "not-found".
        """
        error = self.assertRaises(PartError, openShared, self.share, "gone", (0, 0))
        self.assertEqual(error.code, "not-found")

    def test_badNamesRefusedWithoutOpening(self) -> None:
        """
        Names that are not shared names (traversal, hidden) are "bad-name",
        and nothing is opened.
        """
        opened: List[Any] = []
        realOpen = os.open

        def recordingOpen(*args: Any, **kwargs: Any) -> int:
            opened.append(args[0])
            return realOpen(*args, **kwargs)

        self.patch(os, "open", recordingOpen)
        for name in ["../secret", "/etc/passwd", "..", ".hidden.part", "a/b"]:
            error = self.assertRaises(PartError, openShared, self.share, name, (100, 0))
            self.assertEqual(error.code, "bad-name")
        self.assertEqual(opened, [])


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self) -> None:
        self.events: List[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class RecordingTarget:
    """
    A blocking writer that records each write, and fails the ones whose
    data is in C{failOn}.
    """

    def __init__(self) -> None:
        self.writes: List[bytes] = []
        self.failOn: set = set()

    def write(self, data: bytes) -> None:
        if data in self.failOn:
            raise PartError("cannot write /x/.a.part: No space left on device", "io")
        self.writes.append(data)


class SerialWriterTests(SynchronousTestCase):
    """
    L{SerialWriter} writes in order, one thread job at a time, with
    back-pressure on its producer.
    """

    def setUp(self) -> None:
        self.threads = ManualThreads()
        self.target = RecordingTarget()
        self.errors: List[Failure] = []
        self.writer = SerialWriter(self.target, self.threads, highWater=10, lowWater=4, onError=self.errors.append)
        self.producer = FakeProducer()

    def test_isConsumer(self) -> None:
        """
        It provides L{IConsumer}.
        """
        self.assertTrue(IConsumer.providedBy(self.writer))

    def test_orderAndCoalescing(self) -> None:
        """
        One job at a time: what is written while a job runs waits, and goes
        in the next single job, in order; nothing runs on the caller's
        thread.
        """
        self.writer.write(b"a")
        self.assertEqual(len(self.threads.calls), 1)
        self.writer.write(b"b")
        self.writer.write(b"c")
        self.assertEqual(len(self.threads.calls), 1)
        self.assertEqual(self.target.writes, [])
        self.threads.runNext()
        self.assertEqual(self.target.writes, [b"a"])
        self.assertEqual(len(self.threads.calls), 1)
        self.threads.runNext()
        self.assertEqual(self.target.writes, [b"a", b"b", b"c"])
        self.assertEqual(self.threads.calls, [])
        self.assertEqual(self.writer.pending, 0)

    def test_flushWaitsForEverything(self) -> None:
        """
        C{flush} fires only when every byte written before (and while) it
        waits is written; when idle it fires at once.
        """
        self.successResultOf(self.writer.flush())
        self.writer.write(b"a")
        d = self.writer.flush()
        self.writer.write(b"b")
        self.threads.runNext()
        self.assertNoResult(d)
        self.threads.runNext()
        self.successResultOf(d)
        self.assertEqual(self.target.writes, [b"a", b"b"])

    def test_pauseAboveHighWaterResumeBelowLow(self) -> None:
        """
        The producer is paused once when more than C{highWater} bytes wait,
        and resumed once when fewer than C{lowWater} do.
        """
        self.writer.registerProducer(self.producer, True)
        self.writer.write(b"x" * 6)
        self.writer.write(b"y" * 4)
        self.assertEqual(self.producer.events, [])
        self.writer.write(b"z" * 3)
        self.assertEqual(self.producer.events, ["pause"])
        self.writer.write(b"w" * 2)
        self.assertEqual(self.producer.events, ["pause"])
        self.threads.runNext()  # the 6 bytes: 9 left, still >= 4
        self.assertEqual(self.producer.events, ["pause"])
        self.threads.runNext()  # the other 9
        self.assertEqual(self.producer.events, ["pause", "resume"])
        self.assertEqual(b"".join(self.target.writes), b"x" * 6 + b"y" * 4 + b"z" * 3 + b"w" * 2)

    def test_unregisterResumesPausedProducer(self) -> None:
        """
        A producer unregistered while paused is resumed, never left paused;
        a second producer cannot be registered over the first.
        """
        self.writer.registerProducer(self.producer, True)
        self.assertRaises(RuntimeError, self.writer.registerProducer, FakeProducer(), True)
        self.writer.write(b"x" * 11)
        self.writer.unregisterProducer()
        self.assertEqual(self.producer.events, ["pause", "resume"])
        self.threads.runNext()
        self.assertEqual(self.producer.events, ["pause", "resume"])

    def test_pullProducerRefused(self) -> None:
        """
        Only push producers can drive it.
        """
        self.assertRaises(ValueError, self.writer.registerProducer, self.producer, False)

    def test_errorPropagation(self) -> None:
        """
        A failed write fails the waiting C{flush} with that error, calls
        C{onError} once, and drops what was queued behind it.
        """
        self.target.failOn.add(b"a")
        self.writer.write(b"a")
        d = self.writer.flush()
        self.writer.write(b"b")
        self.threads.runNext()
        failure = self.failureResultOf(d, PartError)
        self.assertEqual(str(failure.value), "cannot write /x/.a.part: No space left on device")
        self.assertEqual([f.value for f in self.errors], [failure.value])
        self.assertEqual(self.threads.calls, [])
        self.assertEqual(self.target.writes, [])

    def test_flushAndWriteAfterError(self) -> None:
        """
        After an error, C{flush} fails with the first error every time and
        C{write} is refused with a L{PartError} of the same code; nothing
        more reaches the target.
        """
        self.target.failOn.add(b"a")
        self.writer.write(b"a")
        self.threads.runNext()
        self.assertEqual(str(self.failureResultOf(self.writer.flush(), PartError).value),
                         "cannot write /x/.a.part: No space left on device")
        self.failureResultOf(self.writer.flush(), PartError)
        error = self.assertRaises(PartError, self.writer.write, b"c")
        self.assertEqual(error.code, "io")
        self.assertEqual(self.threads.calls, [])
        self.assertEqual(len(self.errors), 1)

    def test_writesAPartialFile(self) -> None:
        """
        Driving a real L{PartialFile}, the part ends up with the bytes in
        order and verifies.
        """
        directory = FilePath(self.mktemp())
        sink = PartialFile(directory, NAME)
        self.addCleanup(sink.close)
        sink.resumeOffset()
        writer = SerialWriter(sink, self.threads)
        for i in range(0, SIZE, 1000):
            writer.write(CONTENT[i : i + 1000])
        d = writer.flush()
        while self.threads.calls:
            self.threads.runNext()
        self.successResultOf(d)
        sink.finish(SHA)
        self.assertEqual(directory.child(NAME).getContent(), CONTENT)
