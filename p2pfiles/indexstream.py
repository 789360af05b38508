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

from typing import Any, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.client import bounded
from p2pfiles.errors import P2PError
from p2pfiles.localindex import Changes
from p2pfiles.wire import FileEntry, Message, deltaFrames


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


async def pullIndex(
    reactor: Any,
    connection: Any,
    incarnation: Optional[str],
    since: int,
    timeout: float,
    maxEntries: int,
) -> Changes:
    """
    Ask the node at the other end of C{connection} for what changed since
    C{since} of C{incarnation} (everything, when C{incarnation} is None),
    and collect its C{index-delta} frames.  Each frame must come within
    C{timeout} seconds of the last.  A list of more than C{maxEntries}
    entries is refused with a L{P2PError} of code C{limit}.
    """
    connection.send(Message("index-since", incarnation=incarnation, since=since))
    entries: List[FileEntry] = []
    removed: List[str] = []
    first: Optional[Message] = None
    while True:
        frame = await bounded(reactor, connection.receive(), timeout, connection.address)
        if frame.type != "index-delta":
            raise P2PError(f"unexpected {frame.type} reply to index-since", "protocol")
        if first is None:
            first = frame
        elif (frame.incarnation, frame.seq, frame.full) != (first.incarnation, first.seq, first.full):
            raise P2PError("index frames of one answer disagree", "protocol")
        entries.extend(frame.entries)
        removed.extend(frame.removed)
        if len(entries) > maxEntries:
            raise P2PError(f"more than {maxEntries} files in one node's list", "limit")
        if frame.last:
            return Changes(first.incarnation, first.seq, first.full, entries, removed)
