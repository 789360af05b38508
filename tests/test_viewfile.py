"""
Tests for L{p2pfiles.viewfile}: the keeper's copies, written at a stop and
read back at the next start.
"""

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import viewfile
from p2pfiles.index import packEntry
from p2pfiles.viewfile import KeptMember, ViewError, loadView, writeView
from p2pfiles.wire import FileEntry


def files(prefix: str, count: int) -> dict:
    return {
        f"{prefix}{i:05d}": packEntry(FileEntry(f"{prefix}{i:05d}", i, 1.5 + i, "%064x" % i)) for i in range(count)
    }


class ViewFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.path = directory.child("keeper.view")
        self.members = [
            KeptMember(2, "127.0.0.1:2", "a" * 16, 7, files("x", 2 * viewfile.PIECE + 3)),
            KeptMember(3, "127.0.0.1:3", "b" * 16, 0, {}),
            KeptMember(4, "127.0.0.1:4", "c" * 16, 9, {"tab\there ünï": packEntry(FileEntry("t", 1, 2.0, "f" * 64))}),
        ]

    def test_roundTrip(self) -> None:
        """
        What is written is read back the same, over several pieces, empty
        members and names with any legal characters; no temporary file is
        left.
        """
        writeView(self.path, 1, self.members)
        self.assertEqual(loadView(self.path, 1), self.members)
        self.assertEqual([c.basename() for c in self.path.parent().children()], ["keeper.view"])

    def test_missing(self) -> None:
        """
        No file is no view, not an error.
        """
        self.assertIsNone(loadView(self.path, 1))

    def test_refused(self) -> None:
        """
        Any byte changed, a file cut short or extended, or the view of
        another node is refused with a L{ViewError}.
        """
        writeView(self.path, 1, self.members)
        good = self.path.getContent()
        bad = [good[:-1], good + b"x", good[:40], b"", good.replace(b"x00001", b"y00001")]
        for k in (len(viewfile.MAGIC) + 5, len(good) // 2, len(good) - 10):
            bad.append(good[:k] + bytes([good[k] ^ 0x20]) + good[k + 1 :])
        for data in bad:
            self.path.setContent(data)
            self.assertRaises(ViewError, loadView, self.path, 1)
        self.path.setContent(good)
        self.assertRaises(ViewError, loadView, self.path, 2)
