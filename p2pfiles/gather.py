"""
The leader's side of the index: gathering every member's file list in each
new epoch, applying their changes afterwards, and keeping C{peer_files.log}
current.

L{IndexKeeper} sends through a callable and keeps time with an injected
clock; it knows nothing of connections.  Each member's gather is a Deferred
bounded by a timeout, so one slow or dead member never holds up the others:
its files arrive when it answers, it is asked again if it does not, and it is
dropped when it leaves.
"""

import itertools
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.index import ClusterIndex, LogWriter, renderLog
from p2pfiles.names import nameProblem
from p2pfiles.wire import FileEntry, Message

# How long a member may take to send its whole index before it is asked again.
GATHER_TIMEOUT = 10.0

# How long a new leader holds back its first peer_files.log while the gather
# is under way: a complete first log soon beats a partial one at once.
FIRST_WRITE_HOLD = 1.0


class IndexKeeper:
    """
    The cluster index while this node leads.

    @ivar index: the L{ClusterIndex}.
    @ivar epoch: the epoch being led, or L{None} when not leading.
    """

    log = Logger()

    def __init__(
        self,
        me: int,
        address: str,
        logPath: FilePath,
        clock: IReactorTime,
        runInThread: Callable[..., Deferred],
        send: Callable[[int, Message], bool],
        gatherTimeout: float = GATHER_TIMEOUT,
    ) -> None:
        self.me = me
        self.address = address
        self.clock = clock
        self.send = send
        self.gatherTimeout = gatherTimeout
        self.index = ClusterIndex()
        self.writer = LogWriter(logPath, clock, runInThread)
        self.epoch: Optional[int] = None
        self._requests = itertools.count(1)
        # member -> (request id, entries so far, Deferred)
        self._pending: Dict[int, Tuple[int, List[FileEntry], Deferred]] = {}
        self._writtenVersion = -1
        self._hold: Optional[IDelayedCall] = None

    # Leadership.

    def lead(self, epoch: int, ownEntries: Iterable[FileEntry], members: Dict[int, str]) -> Deferred:
        """
        Start leading C{epoch}: forget what the last leadership knew and ask
        every live member for its whole index.  Fires with the list of members
        gathered once each has answered or timed out (it never fails).
        """
        self._cancelPending()
        self.epoch = epoch
        self._freshIndex()
        self._cancelHold()
        self._hold = self.clock.callLater(FIRST_WRITE_HOLD, self._release)
        self.index.replaceNode(self.me, self.address, ownEntries)
        ds = [self.gather(member, address) for member, address in sorted(members.items())]

        def gathered(results: List[Optional[int]]) -> List[int]:
            if self.epoch == epoch:
                self._release()
            return sorted(m for m in results if m is not None)

        return gatherResults(ds, consumeErrors=True).addCallback(gathered)

    def _release(self) -> None:
        """
        End the hold on the first log of this leadership and write it now.
        """
        self._cancelHold()
        if self.epoch is not None:
            self._changed()
            self.writer.flush()

    def _cancelHold(self) -> None:
        if self._hold is not None and self._hold.active():
            self._hold.cancel()
        self._hold = None

    def resign(self) -> None:
        """
        No longer leader: stop gathering and forget the index.
        """
        if self.epoch is not None:
            self.log.info("no longer keeping the index of epoch {epoch}", epoch=self.epoch)
        self.epoch = None
        self._cancelPending()
        self._cancelHold()
        self._freshIndex()

    def _freshIndex(self) -> None:
        # A new object rather than clear(): a log write still pending renders
        # the index it was scheduled for, so the old leadership's last log
        # is complete, never emptied.
        self.index = ClusterIndex()
        self._writtenVersion = -1

    def isGathering(self, member: int) -> bool:
        return member in self._pending

    def gather(self, member: int, address: str) -> Deferred:
        """
        Ask C{member} for its whole index.  Fires with C{member} once its
        files are in the index, or with L{None} if it did not answer in time
        or could not be asked.
        """
        if self.epoch is None:
            raise RuntimeError("gather while not leading")
        self._cancelPending(member)
        request = next(self._requests)
        d: Deferred = Deferred()
        self._pending[member] = (request, [], d)
        started = self.clock.seconds()
        if not self.send(member, Message("index-request", epoch=self.epoch, request=request)):
            # No link to it right now: the next reconcile asks again.
            del self._pending[member]
            return succeed(None)

        def gathered(entries: List[FileEntry]) -> int:
            self.index.replaceNode(member, address, entries)
            self._changed()
            self.log.info(
                "gathered {count} files from node {member} in {ms:.0f} ms (epoch {epoch})",
                count=len(entries),
                member=member,
                ms=(self.clock.seconds() - started) * 1000,
                epoch=self.epoch,
            )
            return member

        def failed(reason: Failure) -> None:
            if self._pending.get(member, (None,))[0] == request:
                del self._pending[member]
            if reason.check(DeferredTimeout):
                self.log.warn(
                    "node {member} sent no index within {t:g}s; will ask again", member=member, t=self.gatherTimeout
                )
            return None

        d.addTimeout(self.gatherTimeout, self.clock)
        return d.addCallbacks(gathered, failed)

    # Messages from members.

    def chunkReceived(self, member: int, message: Message) -> None:
        pending = self._pending.get(member)
        if message.epoch != self.epoch or pending is None or pending[0] != message.request:
            self.log.debug("ignoring index chunk {request} from node {member}", request=message.request, member=member)
            return
        pending[1].extend(self._acceptable(member, message.entries))
        if message.last:
            del self._pending[member]
            pending[2].callback(pending[1])

    def updateReceived(self, member: int, address: str, message: Message) -> None:
        if message.epoch != self.epoch:
            self.log.info(
                "ignored index changes from node {member}: epoch {old}, leading {current}",
                member=member,
                old=message.epoch,
                current=self.epoch,
            )
            return
        if not self.index.hasNode(member) or member in self._pending:
            # Its whole index is on its way (or will be asked for): that
            # includes this change.
            return
        self.index.applyChanges(member, address, self._acceptable(member, message.entries), message.removed)
        self._changed()

    def _acceptable(self, member: int, entries: List[FileEntry]) -> List[FileEntry]:
        """
        The entries whose names every node would accept: a member's list is
        checked again here, since whatever enters the index is offered to
        every client.
        """
        good = [e for e in entries if nameProblem(e.name) is None]
        if len(good) != len(entries):
            self.log.warn(
                "ignored {count} entries with unacceptable names from node {member}",
                count=len(entries) - len(good),
                member=member,
            )
        return good

    def ownChanges(self, changed: List[FileEntry], removed: List[str]) -> None:
        if self.epoch is None:
            return
        self.index.applyChanges(self.me, self.address, changed, removed)
        self._changed()

    def memberGone(self, member: int) -> None:
        self._cancelPending(member)
        if self.index.hasNode(member):
            self.index.removeNode(member)
            self.log.info("dropped node {member}'s files from the index", member=member)
            self._changed()

    def reconcile(self, live: Dict[int, str]) -> None:
        """
        Make the index cover exactly the live members: gather the ones that
        are missing (new, or whose gather failed), drop the ones that left.
        """
        if self.epoch is None:
            return
        # A member still being gathered can leave too: cancel its gather.
        for member in sorted(set(self.index.nodes()) | set(self._pending)):
            if member != self.me and member not in live:
                self.memberGone(member)
        for member, address in live.items():
            if member != self.me and not self.index.hasNode(member) and member not in self._pending:
                self.gather(member, address)

    # The log.

    def _changed(self) -> None:
        if self.epoch is None or self._hold is not None or self.index.version == self._writtenVersion:
            return
        self._writtenVersion = self.index.version
        epoch, index = self.epoch, self.index

        def render() -> Callable[[], bytes]:
            # Copy now, on the reactor; build the text in the writer's thread
            # (tens of thousands of lines would stall heartbeats here).
            return partial(renderLog, index.snapshot(), self.me, epoch, self.clock.seconds())

        self.writer.changed(render)

    def stop(self) -> Deferred:
        self._cancelPending()
        self._cancelHold()
        return self.writer.flush().addCallback(lambda _: self.writer.stop())

    def _cancelPending(self, member: Optional[int] = None) -> None:
        members = list(self._pending) if member is None else [member]
        for m in members:
            pending = self._pending.pop(m, None)
            if pending is not None:
                pending[2].cancel()
