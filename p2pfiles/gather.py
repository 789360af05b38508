"""
The cluster's index, gathered: L{IndexKeeper}.

The leader, and the node that would lead next (the standby), keep the index
of every live member's files.  Each member numbers its changes (an
incarnation and a change number, see L{p2pfiles.localindex}); the keeper
remembers, per member, the incarnation and number its copy is at, and asks
only for what changed since (C{index-since}, on a request connection, with
back-pressure).  A member tells the cluster on its control links when its
files change (C{index-changed}, a few bytes), and a keeper that is behind
asks again.  So a new leader, or a leader after a blip, fetches only the
delta, and a keeper that stops gathering keeps what it knows.

A keeper also keeps the copy of a member that left (it may come back with
the same incarnation) and, when it stops, writes every copy it holds to
C{keeper.view} in the state directory (L{p2pfiles.viewfile}); it reads the
file back when it starts, so that a node restarted with its cluster asks
each member only what changed since, which after clean stops is nothing.
A copy is used only once its member has answered: a copy of an older
incarnation is replaced by the full list before it reaches the index.

While leading, the keeper keeps C{peer_files.log} current.  It opens request
connections through a callable and keeps time with an injected clock.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.index import ClusterIndex, Compactor, Files, packFiles
from p2pfiles.packed import PackedFiles
from p2pfiles.indexstream import Pulled, pullIndex
from p2pfiles.peerlog import LogContent, LogWriter
from p2pfiles.runtime import trimAllocator
from p2pfiles.viewfile import KeptMember, ViewError, loadView, writeView
from p2pfiles.waiting import Once
from p2pfiles.wire import FileEntry

# How long a member may take between two frames of its index.
GATHER_TIMEOUT = 10.0

# Own lists up to this long are packed on the reactor, longer ones in a thread.
PACK_HERE = 2000

# How long a new leader holds back its first peer_files.log while the gather
# is under way, once its own files are listed: a complete first log soon
# beats a partial one at once, the more so for a large log, where a partial
# first log costs a full write that the complete one then waits for.  A
# member that does not answer at all is not live for long.
FIRST_WRITE_HOLD = 3.0

# The most files one member may list (a bound on what a hostile or broken
# member can make every gatherer hold).
MAX_MEMBER_ENTRIES = 1_000_000

# The copies of members that left, kept in case they come back: at most this
# many members' worth (the oldest departures are forgotten first).
MAX_KEPT_DEPARTED = 16

# The keeper's copies, in the state directory.
VIEW_NAME = "keeper.view"


class MemberView:
    """
    How far this keeper's copy of one member's files goes.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.incarnation: Optional[str] = None
        self.seq = 0
        # The newest change number the member announced.
        self.announced: Tuple[Optional[str], int] = (None, 0)
        self.pulling: Optional[Deferred] = None
        self.again = False
        # A copy kept from before (the member left, or this node restarted)
        # at incarnation/seq, not yet in the index: it goes there once the
        # member has said what changed since.
        self.kept: Optional[Files] = None

    def pullNow(self) -> bool:
        """
        Whether to pull now; if a pull is running, False, and one more is
        asked for when it ends (it may have asked before the change it
        should bring).
        """
        if self.pulling is not None:
            self.again = True
            return False
        return True

    def behind(self) -> bool:
        incarnation, seq = self.announced
        if self.incarnation is None or self.kept is not None:
            return True
        return incarnation is not None and (incarnation != self.incarnation or seq > self.seq)


class IndexKeeper:
    """
    The cluster index, kept while this node gathers.

    @ivar index: the L{ClusterIndex}.
    @ivar epoch: the epoch being led, or L{None} when not leading (the
        keeper may still gather as the standby).
    @ivar gathering: True while the keeper follows its members' changes.
    """

    log = Logger()

    def __init__(
        self,
        me: int,
        address: str,
        logPath: FilePath,
        clock: IReactorTime,
        runInThread: Callable[..., Deferred],
        openUpstream: Callable[[str], Deferred],
        gatherTimeout: float = GATHER_TIMEOUT,
        maxEntries: int = MAX_MEMBER_ENTRIES,
        viewPath: Optional[FilePath] = None,
        ownNumbers: Optional[Callable[[], Tuple[str, int]]] = None,
    ) -> None:
        """
        @param viewPath: where to keep the copies across restarts (see
            L{start}); L{None} to keep them in memory only.
        @param ownNumbers: this node's own incarnation and change number
            now, to keep its own files in the view with them (see
            L{ownVouched}).
        """
        self.me = me
        self.address = address
        self.clock = clock
        self.openUpstream = openUpstream
        self.gatherTimeout = gatherTimeout
        self.maxEntries = maxEntries
        self.index = ClusterIndex()
        self.runInThread = runInThread
        keepPath = None if viewPath is None else logPath.parent().child("." + logPath.basename() + ".kept")
        self.writer = LogWriter(logPath, clock, runInThread, keepPath=keepPath)
        self.viewPath = viewPath
        self.ownNumbers = ownNumbers
        self.epoch: Optional[int] = None
        self.gathering = False
        self.views: Dict[int, MemberView] = {}
        # Copies of members not live now: member -> what was kept.
        self.departed: Dict[int, KeptMember] = {}
        # The first log of a leadership is held until the gather is done and
        # this node's own files are listed, or FIRST_WRITE_HOLD after they
        # are: every write of a large log started early delays the complete
        # one, which waits for it.
        self._holding = False
        self._hold: Optional[IDelayedCall] = None
        self._gathered = False
        self._ownListed = True
        # This node's own files as the view kept them, until its first scan
        # lists them; used meanwhile if the local index vouches for them.
        self._ownKept: Optional[KeptMember] = None
        self._ownProvisional: Optional[Files] = None
        self._ownProvisionalNumbers: Tuple[str, int] = ("", 0)
        # The index holds this node's files as its local index has them now.
        self._ownCurrent = False
        # Own changes waiting for the scan's list to be packed.
        self._ownPacking: Optional[List[Tuple[List[FileEntry], List[str]]]] = None
        self._writtenVersion = -1
        self._compactor = Compactor(self.index, runInThread)
        # Fired once the copies kept across a restart are loaded; until
        # then nobody is asked anything (the answer would be everything).
        self._loaded = Once()
        if viewPath is None:
            self._loaded.fire(None)
        self._live: Dict[int, str] = {}

    def start(self) -> Deferred:
        """
        Load, in a thread, the copies the last stop left in C{viewPath}.
        Fires (never fails) once they are loaded, or found unusable, which
        is logged.
        """
        if self._loaded.happened:
            return succeed(None)
        assert self.viewPath is not None
        started = self.clock.seconds()
        d = self.runInThread(_loadView, self.viewPath, self.me)

        def loaded(kept: Optional[List[KeptMember]]) -> None:
            if kept:
                for copy in kept:
                    if copy.member == self.me:
                        self._ownKept = copy
                    else:
                        self.departed[copy.member] = copy
                # The last log, if it shows exactly these copies, saves
                # making the first one afresh.
                primed = self.writer.prime({c.member: (c.files, c.address, c.incarnation, c.seq) for c in kept})
                primed.addCallback(lambda ok: ok and self.log.info("the last log shows these copies: copying from it"))
                self.log.info(
                    "read the copies of {count} members ({files} files) in {ms:.0f} ms",
                    count=len(kept),
                    files=sum(len(k.files) for k in kept),
                    ms=(self.clock.seconds() - started) * 1000,
                )

        def unusable(failure: Failure) -> None:
            why = failure.getErrorMessage() if failure.check(ViewError) else repr(failure.value)
            self.log.warn("ignoring {path}: {why}", path=self.viewPath.path, why=why)

        d.addCallbacks(loaded, unusable)
        d.addCallback(lambda _: self._loaded.fire(None))
        d.addCallback(lambda _: self.reconcile(self._live))
        d.addCallback(lambda _: None)
        return d.addErrback(lambda f: self.log.failure("cannot resume gathering", f))
    # What to do.

    def lead(self, epoch: int, ownEntries: List[FileEntry], members: Dict[int, str]) -> Deferred:
        """
        Start leading C{epoch}: bring every live member's files up to date
        (only what changed since this keeper's copy) and keep
        C{peer_files.log}.  Fires with the members gathered once each has
        answered or failed (it never fails).
        """
        self.epoch = epoch
        self.gathering = True
        self._writtenVersion = -1
        self._cancelHold()
        self._holding = True
        self._gathered = False
        if self._ownListed:
            self._hold = self.clock.callLater(FIRST_WRITE_HOLD, self._release)
        self._own(ownEntries)
        self._live = members

        def gather(ignored: object) -> Deferred:
            return gatherResults(self.reconcile(self._live), consumeErrors=True)

        def gathered(results: List[Optional[int]]) -> List[int]:
            if self.epoch == epoch:
                self._gathered = True
                if self._ownListed:
                    self._release()
            return sorted(m for m in results if m is not None)

        return self._loaded.wait().addCallback(gather).addCallback(gathered)

    def standBy(self, ownEntries: List[FileEntry], members: Dict[int, str]) -> None:
        """
        Gather without leading: this node would lead next, and keeps the
        index current so that taking over costs only the last changes.
        """
        if self.epoch is not None:
            self.resign()
        if not self.gathering:
            self.log.info("keeping the index as the standby")
        self.gathering = True
        self._own(ownEntries)
        self.reconcile(members)

    def resign(self) -> None:
        """
        No longer leader: stop writing the log.  The index stays (a later
        leadership starts from it).
        """
        if self.epoch is not None:
            self.log.info("no longer keeping the log of epoch {epoch}", epoch=self.epoch)
        self.epoch = None
        self._cancelHold()

    def idle(self) -> None:
        """
        Neither leader nor standby: stop following members' changes, keep
        what is known.
        """
        self.resign()
        if self.gathering:
            self.gathering = False
            self._cancelPulls()

    def _release(self) -> None:
        """
        End the hold on the first log of this leadership and write it now.
        """
        self._cancelHold()
        if self.epoch is not None:
            self._changed()
            self.writer.flush()

    def _cancelHold(self) -> None:
        self._holding = False
        if self._hold is not None and self._hold.active():
            self._hold.cancel()
        self._hold = None

    def awaitOwnFiles(self) -> None:
        """
        This node's own files are not listed yet (its first scan is under
        way): hold a first log until L{ownListed}.
        """
        self._ownListed = False

    def _own(self, entries: Union[List[FileEntry], Files], listed: bool = False) -> None:
        """
        This node's own files into the index: those vouched for, until the
        first scan lists them; none of them again if the index follows them
        already (packing 100,000 entries on the reactor is a long stretch).
        C{listed}: C{entries} is the scan's list, packed.
        """
        if self._ownProvisional is not None:
            self.index.replaceNode(self.me, self.address, self._ownProvisional)
            return
        if not listed and self._ownCurrent and self.index.hasNode(self.me):
            return
        if not isinstance(entries, PackedFiles) and len(entries) <= PACK_HERE:
            entries = packFiles(entries)[0]
        if isinstance(entries, PackedFiles):
            self.index.replaceNode(self.me, self.address, entries)
            # From the scan's list on, ownChanges keeps the index current.
            self._ownCurrent = self._ownListed
        elif self._ownPacking is None:

            def packed(files: Files) -> None:
                if self.gathering:
                    self._own(files)

            self._packOwn(entries, packed)

    def _packOwn(self, entries: List[FileEntry], then: Callable[[Files], None]) -> Deferred:
        """
        Pack this node's own C{entries} in a thread and hand them to
        C{then}; own changes meanwhile wait and are applied after, and the
        log waits too (see L{_changed}).  A later packing (the scan's list)
        supersedes this one.  Fires when done.
        """
        queue: List[Tuple[List[FileEntry], List[str]]] = []
        self._ownPacking = queue

        def packed(result: Tuple[Files, int]) -> None:
            if self._ownPacking is queue:
                self._ownPacking = None
                then(result[0])
                for changed, removed in queue:
                    self.ownChanges(changed, removed)
                self._changed()

        return self.runInThread(packFiles, entries).addCallback(packed)

    def ownVouched(self, numbers: Optional[Tuple[str, int]]) -> Deferred:
        """
        This node's local index vouches for its files as of change
        C{numbers} (its restart record; L{None}: it vouches for nothing)
        until its first scan is done.  If the view kept this node's own
        files at exactly that change, they stand for its files meanwhile,
        so that a first log need not wait for the scan.  Fires once
        decided.
        """

        def decide(ignored: object) -> None:
            kept, self._ownKept = self._ownKept, None
            if (
                numbers is None or kept is None or self._ownListed
                or (kept.incarnation, kept.seq) != tuple(numbers) or kept.address != self.address
            ):
                return
            self.log.info("standing in for this node's files: {count} kept at change {seq}", count=len(kept.files), seq=kept.seq)
            self._ownProvisional = kept.files
            self._ownProvisionalNumbers = (kept.incarnation, kept.seq)
            self._listed(None)

        return self._loaded.wait().addCallback(decide)

    def ownListed(self, entries: List[FileEntry]) -> Deferred:
        """
        This node's first scan is done (C{entries}; an empty list if it
        failed): they are packed in a thread and go in the index, and a
        first log held for them is written once the gather is done too, or
        at the latest C{FIRST_WRITE_HOLD} seconds from then.  Own changes
        meanwhile wait for them.  Fires when done.
        """

        def packed(files: Files) -> None:
            self._ownProvisional = None
            self._ownKept = None
            self._listed(files)

        return self._packOwn(entries, packed)

    def _listed(self, files: Optional[Files]) -> None:
        self._ownListed = True
        if self.gathering:
            self._own(files if files is not None else PackedFiles.empty(), listed=files is not None)
        else:
            self._ownCurrent = False
        if self._holding:
            if self._gathered:
                self._release()
            elif self._hold is None:
                self._hold = self.clock.callLater(FIRST_WRITE_HOLD, self._release)
        else:
            self._changed()

    # Members.

    def isGathering(self, member: int) -> bool:
        view = self.views.get(member)
        return view is not None and view.pulling is not None

    def reconcile(self, live: Dict[int, str]) -> List[Deferred]:
        """
        Make the index cover exactly the live members: drop the ones that
        left, bring up to date the ones that are behind (or new).
        """
        self._live = live
        if not self.gathering or not self._loaded.happened:
            return []
        for member in sorted(set(self.views) | set(self.index.nodes())):
            if member != self.me and member not in live:
                self.memberGone(member)
        pulls = []
        for member, address in sorted(live.items()):
            if member == self.me:
                continue
            view = self.views.get(member)
            if view is None or view.address != address:
                self.memberGone(member)
                view = self.views[member] = MemberView(address)
                copy = self.departed.pop(member, None)
                if copy is not None and copy.address == address:
                    view.incarnation, view.seq, view.kept = copy.incarnation, copy.seq, copy.files
            if view.behind() and view.pulling is None:
                pulls.append(self.pull(member))
            elif view.pulling is not None:
                pulls.append(_whenDone(view.pulling, member))
        return pulls

    def noticed(self, member: int, incarnation: str, seq: int) -> None:
        """
        C{member} says its files are at change C{seq} of C{incarnation}.
        """
        view = self.views.get(member)
        if view is None:
            return
        view.announced = (incarnation, seq)
        if not self.gathering or not view.behind():
            return
        if view.pullNow():
            self.pull(member)

    def lost(self, member: int) -> None:
        """
        A link to C{member} closed: a notice may have been lost with it.
        Ask again what changed (a delta, cheap when nothing did).
        """
        view = self.views.get(member)
        if view is None or not self.gathering:
            return
        if view.pullNow():
            self.pull(member)

    def pull(self, member: int) -> Deferred:
        """
        Bring C{member}'s files up to date.  Fires with C{member} once they
        are, or with None if it could not be asked or did not answer.
        """
        view = self.views[member]
        started = self.clock.seconds()
        d = Deferred.fromCoroutine(self._pull(member, view))
        view.pulling = d

        def done(result: Any) -> Optional[int]:
            if view.pulling is d:
                view.pulling = None
            if isinstance(result, Failure):
                # A pull cancelled while connecting can fail with whatever
                # the endpoint makes of it (a "DNS lookup failed" from a
                # cancelled HostnameEndpoint): only a pull still wanted is
                # worth a line.
                wanted = self.gathering and self.views.get(member) is view
                if wanted and not result.check(CancelledError):
                    self.log.warn(
                        "could not get node {member}'s files: {reason}",
                        member=member,
                        reason=result.getErrorMessage(),
                    )
                return None
            changes: Pulled = result
            if self.views.get(member) is not view:
                return None
            self._apply(member, view, changes)
            self.log.info(
                "{what} from node {member}: {count} files, {gone} removed, in {ms:.0f} ms (at change {seq})",
                what="all files" if changes.full else "changes",
                member=member,
                count=len(changes.files) + changes.refused if changes.full else len(changes.entries),
                gone=len(changes.removed),
                ms=(self.clock.seconds() - started) * 1000,
                seq=changes.seq,
            )
            if view.again or view.behind():
                view.again = False
                if self.gathering:
                    self.pull(member)
            return member

        return d.addBoth(done)

    async def _pull(self, member: int, view: MemberView) -> Pulled:
        def base() -> Files:
            # The copy a delta is an answer to (none: no files).
            copy = self._copyOf(member, view)
            return PackedFiles.empty() if copy is None else copy.files

        connection = await self.openUpstream(view.address)
        try:
            asked = (view.incarnation, view.seq, self.gatherTimeout, self.maxEntries, base, self.runInThread)
            return await pullIndex(self.clock, connection, *asked)
        finally:
            connection.close()

    def _apply(self, member: int, view: MemberView, changes: Pulled) -> None:
        view.kept = None
        if changes.refused:
            self.log.warn(
                "ignored {count} entries with unacceptable names or values, or out of name order, from node {member}",
                count=changes.refused,
                member=member,
            )
        # Checked and packed as it came, or this keeper's copy with the
        # changes applied (see pullIndex).
        self.index.replaceNode(member, view.address, changes.files)
        view.incarnation = changes.incarnation
        view.seq = changes.seq
        if view.announced[0] != changes.incarnation:
            # A notice from before the member's restart (or from before the
            # answer we now hold): the answer is the newer word.
            view.announced = (changes.incarnation, changes.seq)
        self._changed()

    def ownChanges(self, changed: List[FileEntry], removed: List[str]) -> None:
        if self._ownPacking is not None:
            self._ownPacking.append((changed, removed))
            return
        if not self.gathering:
            self._ownCurrent = False  # missed: the own copy is not worth keeping
            return
        self.index.applyChanges(self.me, self.address, changed, removed)
        self._changed()

    def memberGone(self, member: int) -> None:
        view = self.views.pop(member, None)
        if view is not None and view.pulling is not None:
            view.pulling.cancel()
        copy = self._copyOf(member, view)
        if copy is not None:
            # It may come back with the same incarnation: keep its files.
            self.departed.pop(member, None)
            self.departed[member] = copy
            while len(self.departed) > MAX_KEPT_DEPARTED:
                del self.departed[next(iter(self.departed))]
        if self.index.hasNode(member):
            self.index.removeNode(member)
            self.log.info("dropped node {member}'s files from the index", member=member)
            self._changed()

    # The log.

    def _changed(self) -> None:
        self._compactor.start()
        if self.epoch is None or self._holding or self._ownPacking is not None or self.index.version == self._writtenVersion:
            return
        self._writtenVersion = self.index.version
        epoch, index = self.epoch, self.index

        def render() -> LogContent:
            # A snapshot costs O(nodes) here, on the reactor; the lines are
            # made and written, streamed, in the writer's thread.
            snapshot = index.snapshot()
            return LogContent(snapshot, self.me, epoch, self.clock.seconds(), self._versions(snapshot))

        self.writer.changed(render)

    def _copyOf(self, member: int, view: Optional[MemberView]) -> Optional[KeptMember]:
        """
        What this keeper holds of C{member}'s files, and at which change,
        if anything: the index's map is the copy once the member answered,
        the kept one before.  Maps are never changed, so any thread may
        read the copy.
        """
        if view is None or view.incarnation is None:
            return None
        if view.kept is not None:
            files: Optional[Files] = view.kept
        elif self.index.hasNode(member):
            files = self.index.nodeFiles(member)  # type: ignore[assignment]
        else:
            return None
        return KeptMember(member, view.address, view.incarnation, view.seq, files)  # type: ignore[arg-type]

    def saveView(self) -> Deferred:
        """
        Write every copy this keeper holds (of live and departed members)
        to C{viewPath}, in a thread.  Fires (never fails) when written;
        a failure is logged.
        """
        if self.viewPath is None or not self._loaded.happened:
            return succeed(None)
        # Maps are never changed: the thread reads them as they are now.
        copies = dict(self.departed)
        for member, view in sorted(self.views.items()):
            copy = self._copyOf(member, view)
            if copy is not None:
                copies[member] = copy
        if self._ownProvisional is not None:
            # Still standing in (no scan listed them): the copy it came from.
            incarnation, seq = self._ownProvisionalNumbers
            copies[self.me] = KeptMember(self.me, self.address, incarnation, seq, self._ownProvisional)
        elif self.ownNumbers is not None and self._ownCurrent and self.index.hasNode(self.me):
            incarnation, seq = self.ownNumbers()
            copies[self.me] = KeptMember(self.me, self.address, incarnation, seq, self.index.nodeFiles(self.me))
        kept = [copies[m] for m in sorted(copies)]
        d = self.runInThread(writeView, self.viewPath, self.me, kept)
        return d.addErrback(lambda f: self.log.failure("cannot save {path}", f, path=self.viewPath.path))

    def _versions(self, snapshot: Any) -> Optional[Dict[int, Tuple[str, str, int]]]:
        """
        Which change (address, incarnation, seq) of each node C{snapshot}
        shows, or L{None} if that of one is not known (see
        L{p2pfiles.peerlog.LogCache}).
        """
        versions = {}
        for node in snapshot.nodes():
            if node == self.me:
                if self._ownProvisional is not None:
                    numbers = self._ownProvisionalNumbers
                elif self._ownCurrent and self.ownNumbers is not None:
                    numbers = self.ownNumbers()
                else:
                    return None
            else:
                view = self.views.get(node)
                if view is None or view.incarnation is None or view.kept is not None:
                    return None
                numbers = (view.incarnation, view.seq)
            versions[node] = (snapshot.address(node), numbers[0], numbers[1])
        return versions

    def stop(self) -> Deferred:
        """
        Stop gathering and writing; write the log if a change is pending,
        and the copies (see L{saveView}).
        """
        self.gathering = False
        self._cancelPulls()
        self._cancelHold()
        saved = self.saveView()
        flushed = self.writer.flush().addCallback(lambda _: self.writer.stop())
        return gatherResults([saved, flushed], consumeErrors=True).addCallback(lambda _: None)

    def _cancelPulls(self) -> None:
        for view in list(self.views.values()):
            if view.pulling is not None:
                view.pulling.cancel()


def _loadView(path: FilePath, me: int) -> Optional[List[KeptMember]]:
    # In a thread: loadView, and the pieces it read given back.
    try:
        return loadView(path, me)
    finally:
        trimAllocator()


def _whenDone(pulling: Deferred, member: int) -> Deferred:
    """
    A Deferred that fires with C{member} (or None) when a pull in flight
    ends, without touching the pull's own result.
    """
    d: Deferred = Deferred()
    pulling.addBoth(lambda result: (d.callback(None if isinstance(result, Failure) or result is None else member), result)[1])
    return d
