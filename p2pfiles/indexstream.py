"""
A node's file list, moved on a request connection: L{IndexSender} writes it,
L{pullIndex} reads it.

A gatherer (the leader, or the node that would lead next) asks a member
C{index-since{incarnation, since}}; the member answers with C{index-delta}
frames, the last one marked.  The sender is a pull producer: it encodes the
next frame only when the transport has sent the last one, so a reader that
does not read pauses it instead of growing the sender's memory, and no frame
is built long before it can be sent.  None of this travels on control links,
so it never delays a heartbeat.
"""

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from p2pfiles.client import bounded
from p2pfiles.errors import P2PError
from p2pfiles.index import packEntries
from p2pfiles.packed import PackedBuilder, PackedFiles
from p2pfiles.localindex import Changes
from p2pfiles.names import nameProblem
from p2pfiles.wire import FileEntry, Message, deltaFrames


# A delta of more names than this is applied in a thread (see pullIndex).
LARGE_DELTA = 2000


@implementer(IPullProducer)
class IndexSender:
    """
    Send C{changes} as C{index-delta} frames on C{connection}, one frame
    each time its transport asks for more.

    @ivar done: fires with the number of frames sent, or fails if the
        connection went away first.
    """

    def __init__(self, connection: Any, changes: Changes) -> None:
        self.connection = connection
        self.changes = changes
        self.frames = 0
        self.done: Deferred = Deferred()
        # Each entry's JSON is made once, as its frame is (see deltaFrames).
        self._frames: Iterator[bytes] = deltaFrames(
            changes.incarnation, changes.seq, changes.full, changes.entries, changes.removed
        )
        self._next: Optional[bytes] = next(self._frames)

    def start(self) -> Deferred:
        self.connection.transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called or self._next is None:
            return
        frame = self._next
        following = next(self._frames, None)
        self.connection.sendEncoded(frame)
        self.frames += 1
        if following is None:
            self.connection.transport.unregisterProducer()
            self.done.callback(self.frames)
        else:
            self._next = following

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.errback(P2PError(f"connection lost after {self.frames} index frames", "gone"))


class Pulled(NamedTuple):
    """
    A member's answer to C{index-since}, as L{pullIndex} collected it.

    @ivar full: the answer is the member's whole list, which replaces what
        the asker held; otherwise it is the changes, in C{entries} and
        C{removed}.
    @ivar files: the member's whole list after this answer, packed (see
        L{p2pfiles.index.packEntry}): a full answer's acceptable entries,
        packed frame by frame as they came, or the asker's copy with the
        changes applied.
    @ivar refused: entries left out of C{files}: names no node accepts,
        values no record holds, or, in a full answer, entries out of name
        order (a name again included).
    """

    incarnation: str
    seq: int
    full: bool
    entries: List[FileEntry]
    removed: List[str]
    files: PackedFiles
    refused: int


async def pullIndex(
    reactor: Any,
    connection: Any,
    incarnation: Optional[str],
    since: int,
    timeout: float,
    maxEntries: int,
    base: Callable[[], PackedFiles] = PackedFiles.empty,
    runInThread: Optional[Callable[..., Deferred]] = None,
) -> Pulled:
    """
    Ask the node at the other end of C{connection} for what changed since
    C{since} of C{incarnation} (everything, when C{incarnation} is None),
    and collect its C{index-delta} frames.  Each frame must come within
    C{timeout} seconds of the last.  A list of more than C{maxEntries}
    entries is refused with a L{P2PError} of code C{limit}.

    The entries of a full answer are checked and packed as each frame
    comes, so that the work is spread over the answer (a few hundred
    entries at a time) instead of done at the end, in one long stretch.
    The changes of a delta are checked and applied, when the last frame is
    in, to C{base()}, the asker's copy of the member's files at C{since}:
    in a thread (C{runInThread}) if there are more than L{LARGE_DELTA}
    names.
    """
    connection.send(Message("index-since", incarnation=incarnation, since=since))
    entries: List[FileEntry] = []
    removed: List[str] = []
    # Nodes send their lists in name order; entries out of it are refused.
    files = PackedBuilder(strict=True)
    count = refused = 0
    first: Optional[Message] = None
    while True:
        frame = await bounded(reactor, connection.receive(), timeout, connection.address)
        if frame.type != "index-delta":
            raise P2PError(f"unexpected {frame.type} reply to index-since", "protocol")
        if first is None:
            first = frame
        elif (frame.incarnation, frame.seq, frame.full) != (first.incarnation, first.seq, first.full):
            raise P2PError("index frames of one answer disagree", "protocol")
        count += len(frame.entries)
        if count > maxEntries:
            raise P2PError(f"more than {maxEntries} files in one node's list", "limit")
        if first.full:
            refused += _packAcceptable(frame.entries, files)
        else:
            entries.extend(frame.entries)
        removed.extend(frame.removed)
        if frame.last:
            break
    if first.full:
        packed = files.build()
    elif runInThread is not None and len(entries) + len(removed) > LARGE_DELTA:
        packed, refused = await runInThread(deltaApplied, base(), entries, removed)
    else:
        packed, refused = deltaApplied(base(), entries, removed)
    return Pulled(first.incarnation, first.seq, first.full, entries, removed, packed, refused)


def _packAcceptable(entries: List[FileEntry], into: Any) -> int:
    # Pack into `into` the entries whose names every node accepts (whatever
    # enters the index is offered to every client); how many were left out.
    good = [entry for entry in entries if nameProblem(entry.name) is None]
    return len(entries) - len(good) + packEntries(good, into)


def deltaApplied(base: PackedFiles, entries: List[FileEntry], removed: List[str]) -> Tuple[PackedFiles, int]:
    """
    C{base} with a member's changes applied, leaving out names no node
    accepts and values no record holds; and how many were left out.
    O(changes): run it in a thread for many.
    """
    records: Dict[str, bytes] = {}
    refused = _packAcceptable(entries, records)
    return base.changed(records, removed), refused
