"""
A node's own index of the files it shares.

The shared files are the regular files at the top level of the share
directory.  Listing the directory and hashing files block, so all of that
(L{p2pfiles.sharescan}) runs through an injected C{runInThread}; the reactor
thread only decides when to scan, swaps in the state a scan built, logs new
problems and tells subscribers what changed.  Nothing on the reactor thread
costs time in proportion to the number of shared files: a share of 100,000
files must not stall the node.

Changes are numbered, as Syncthing numbers them: C{incarnation} is a random
id chosen when the index is made, and C{seq} goes up by one with every scan
that changed something, so that L{LocalIndex.changesSince} can answer
"everything since N" with only what changed.  A restarted node has a new
incarnation, unless it stopped cleanly and its share is exactly as it left
it: then it keeps the incarnation and seq it stopped at (see the restart
record in L{p2pfiles.sharescan}), and whoever kept its files asks only for
what changed since, which is nothing.  Until that first scan is done, such a
node vouches for the list it stopped with, as Syncthing serves its stored
index before rescanning: asked for exactly the recorded change of the
recorded incarnation, it answers at once that nothing changed since (see
L{LocalIndex.quickChanges}).  If the scan then finds the share changed, the
node takes a new incarnation and says so, and askers fetch the new list: the
recorded pair still names only the list it named before the stop.

Changes are noticed with inotify where available, and by polling every
C{pollInterval} seconds where not.  With inotify a slow safety poll (every
C{SAFETY_POLL_FACTOR * pollInterval}) still runs, because inotify can drop
events (queue overflow) and cannot see a share directory that is replaced.
A poll lists and checks every file, so on a large share it is skipped until
the last full scan ended L{POLL_DUTY} (with inotify L{SAFETY_POLL_DUTY})
times that scan's length ago: however large the share, polling keeps at
most about a tenth (a hundredth) of a core busy.
"""

import os
import secrets
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Set, Tuple

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

try:
    # Imported here rather than when watching starts: the import looks for
    # libc (running ldconfig) and reads files, which would hold the reactor
    # up while the first scan's hash cache is being written.
    from twisted.internet import inotify
except ImportError:  # not Linux: the share is polled
    inotify = None

from p2pfiles.sharescan import (
    EMPTY, MAX_TOMBSTONES, Changes, ProcessObserver, ScanResult, ShareScanner, changes, hashFile, hashOpened,
    putRecordBack, resumed, takeRecord, writeRecord,
)
from p2pfiles.waiting import Once, Waiters
from p2pfiles.wire import FileEntry

# Changes, MAX_TOMBSTONES and the hashers are L{p2pfiles.sharescan}'s, named
# here too for the index's users.
__all__ = ["Changes", "IndexStopped", "LocalIndex", "MAX_TOMBSTONES", "hashFile", "hashOpened"]

CACHE_NAME = "hashcache.json"

# The restart record a clean stop leaves in the state directory.
RECORD_NAME = "incarnation.json"

# With inotify, the safety poll runs this many times less often than polling.
SAFETY_POLL_FACTOR = 10

# A poll is skipped until the last full scan ended this many times its
# length ago: polling alone, and the safety poll beside inotify.
POLL_DUTY = 10
SAFETY_POLL_DUTY = 100

# More names than this changed at once (a copy into the share): one full scan
# rather than looking at each name.
MAX_NAMED_SCAN = 1000

# subscriber(changed, removed)
Subscriber = Callable[[List[FileEntry], List[str]], None]


class IndexStopped(Exception):
    """
    The index was stopped (or never started), so the scan asked for will not
    happen.
    """


class LocalIndex:
    """
    The files this node shares, kept up to date as the share changes.

    C{entries} maps each shared name to its L{FileEntry}, in name order.  It
    is replaced (not mutated) after each scan that changed something, so a
    reader holding it sees a consistent view.

    @ivar incarnation: 16 hex digits chosen at random for this index, or
        after the first scan the incarnation of the last clean stop, if the
        share is exactly as that stop left it.
    """

    log = Logger()

    def __init__(
        self,
        share: FilePath,
        state: FilePath,
        reactor: Any,
        runInThread: Optional[Callable[..., Deferred]] = None,
        pollInterval: float = 1.0,
        coalesce: float = 0.1,
        useInotify: bool = True,
        hasher: Callable[[str, int], Tuple[str, int, os.stat_result]] = hashOpened,
        maxTombstones: int = MAX_TOMBSTONES,
        observer: Optional[ProcessObserver] = None,
        settle: Callable[[bool], ContextManager[None]] = nullcontext,
    ) -> None:
        """
        @param hasher: like L{hashOpened}, run in the scan thread; replaceable
            so that tests can count or fail reads.
        @param maxTombstones: removals remembered for L{changesSince}.
        @param observer: a child process that hashes for the scans instead
            of the scan thread (see L{p2pfiles.scanworker}); its owner
            closes it.
        @param settle: every scan runs inside C{settle(first)} (see
            L{ShareScanner}).
        """
        if runInThread is None:
            runInThread = lambda f, *a: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *a
            )
        self.incarnation = secrets.token_hex(8)
        self._state = EMPTY
        self._share = share
        self._cacheFile = state.child(CACHE_NAME)
        self._recordFile = state.child(RECORD_NAME)
        self._scanner = ShareScanner(share, self._cacheFile, hasher, maxTombstones, observer, settle)
        self._reactor = reactor
        self._runInThread = runInThread
        self._pollInterval = pollInterval
        self._coalesce = coalesce
        self._useInotify = useInotify

        self._running = False
        self._firstDone = False
        # A restart record was written by the last stop.
        self._recorded = False
        # The restart record taken at start, until the first scan is done;
        # while it is being taken no scan starts.
        self._record: Optional[Dict[str, Any]] = None
        self._taking = False
        self._tookWaiters = Waiters()
        self._vouched = Once()
        self._subscribers: List[Subscriber] = []
        self._notifier: Any = None
        self._poller: Optional[LoopingCall] = None

        # Scan scheduling: at most one scan runs; _again asks for one more.
        self._scanning = False
        self._again = False
        self._pending: Any = None  # the coalescing DelayedCall
        # The names inotify said changed since the last scan started, or
        # None when the next scan must be a full one (a poll, a rescan,
        # too many names, an event about the share itself).
        self._dirty: Optional[Set[str]] = None
        # When the last full scan started and ended (reactor time).
        self._lastFull: Optional[Tuple[float, float]] = None
        self._waiters = Waiters()  # for the next scan to start
        self._idleWaiters = Waiters()  # for the running scan to end

        # Cache writes: at most one runs; _cacheDirty asks for one more.
        self._saving = False
        self._cacheDirty = False
        self._savedWaiters = Waiters()

    # Public API

    @property
    def entries(self) -> Dict[str, FileEntry]:
        """
        Each shared name's entry, in name order.  Never mutated: a scan that
        changes something replaces it.
        """
        return self._state.entries

    @property
    def seq(self) -> int:
        """
        The number of scans so far that changed something: 0 until a scan
        finds a file.
        """
        return self._state.seq

    @property
    def floor(self) -> int:
        """
        The oldest seq L{changesSince} can give a delta from: the tombstones
        of removals at or before it were dropped (see L{MAX_TOMBSTONES}).
        """
        return self._state.floor

    def start(self) -> Deferred:
        """
        Load the hash cache, scan the share and start watching it.  Fires with
        L{None} once the first scan is complete and C{entries} holds it.
        """
        self._running = True
        # Watch from the start: a file written while the first scan runs
        # (after it listed the share) is then looked at right after it,
        # not at the next safety poll.
        if self._useInotify and self._notifier is None:
            self._startInotify()
        if self._recorded:
            # Started again after a stop that left a restart record: take
            # it before serving anything, as a new index would.
            self._recorded = False
            self._firstDone = False
            self._vouched = Once()
        if self._firstDone:
            d = self._requestScan()
        else:
            # The first scan waits for the record: it decides what the
            # scan is numbered as.
            self._taking = True
            d = self._waiters.wait()
            taken = self._runInThread(takeRecord, self._recordFile)
            taken.addBoth(self._tookRecord)
        d.addCallbacks(self._startWatching, self._startFailed)
        return d

    def _tookRecord(self, result: Any) -> None:
        self._taking = False
        record = None
        if isinstance(result, Failure):
            self.log.failure("cannot read {path}", result, path=self._recordFile.path)
        else:
            record, problem = result
            if problem is not None:
                self.log.warn("ignoring restart record {path}: {reason}", path=self._recordFile.path, reason=problem)
        self._record = record
        self._vouched.fire(None if record is None else (record["incarnation"], record["seq"]))
        if self._running:
            self._startScan()
        else:
            # Stopped meanwhile: as for a stop during a scan, start()
            # fires, with nothing shared.
            self._waiters.fire(None)
        self._tookWaiters.fire(None)

    def whenVouched(self) -> Deferred:
        """
        Fire, once the restart record is taken at start, with the
        C{(incarnation, seq)} this index vouches for until its first scan
        is done (see L{quickChanges}), or L{None} if it vouches for nothing.
        """
        return self._vouched.wait()

    def quickChanges(self, incarnation: Optional[str], since: int) -> Optional[Changes]:
        """
        Before the first scan is done: the answer to "everything since
        C{since} of C{incarnation}" when it is exactly the change the
        restart record names (nothing changed since, as far as this index
        vouches); L{None} otherwise, and always once the first scan is
        done, when L{changesSince} answers.
        """
        record = self._record
        if self._firstDone or record is None or (incarnation, since) != (record["incarnation"], record["seq"]):
            return None
        return Changes(record["incarnation"], record["seq"], False, [], [])

    def stop(self) -> Deferred:
        """
        Stop watching, cancel timers, wait for a running scan and flush the
        hash cache.  After it fires the index leaves nothing in the reactor.
        """
        return Deferred.fromCoroutine(self._stop())

    def rescan(self) -> Deferred:
        """
        Ask for a scan now.  Fires when a scan that started after this call
        is complete (a scan already running does not count: it may have
        listed the directory before the change the caller knows about).
        """
        if not self._running:
            return fail(IndexStopped("the index is not running"))
        return self._requestScan()

    def changesSince(self, incarnation: Optional[str], since: int) -> Deferred:
        """
        Everything that changed after seq C{since} of C{incarnation}: fires
        with L{Changes}, computed in a thread from the state at the time of
        the call.

        The answer is the full list when C{incarnation} is not this index's
        (or is L{None}), when C{since} is 0, when it is below C{floor} (some
        removals after it were forgotten) or when it is above C{seq} (the
        asker is confused).  Otherwise it holds only the entries changed, and
        the names removed, after C{since}.
        """
        return self._runInThread(changes, self._state, self.incarnation, incarnation, since)

    def subscribe(self, callback: Subscriber) -> None:
        """
        Call C{callback(changed, removed)} on the reactor thread after each
        scan (but the first) that changed something; C{seq} is by then the
        seq of that change.
        """
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.remove(callback)

    def signature(self, name: str) -> Optional[Tuple[int, int, int]]:
        """
        C{(size, mtime_ns, inode)} of shared file C{name} (of its target, for
        a symlink) when it was last hashed, or L{None} if it is not shared:
        what the file must still have to be the one in C{entries}.
        """
        state = self._state
        if name not in state.entries or state.cache is None:
            return None
        item = state.cache.get(name)
        if item is None:
            return None
        return item.signature()

    # Watching

    def _startWatching(self, ignored: object) -> None:
        if not self._running:  # stopped during the first scan
            return
        interval = self._pollInterval
        if self._notifier is not None:
            interval = self._pollInterval * SAFETY_POLL_FACTOR
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self._reactor
        self._poller.start(interval, now=False).addErrback(
            lambda f: self.log.failure("polling {share} failed", f, share=self._share.path)
        )

    def _poll(self) -> None:
        if self._lastFull is not None:
            started, ended = self._lastFull
            duty = SAFETY_POLL_DUTY if self._notifier is not None else POLL_DUTY
            if self._reactor.seconds() - ended < (ended - started) * duty:
                return
        self._changed()

    def _startFailed(self, failure: Failure) -> Failure:
        self._running = False
        self._stopInotify()
        return failure

    def _stopInotify(self) -> None:
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def _startInotify(self) -> bool:
        """
        Watch the share with inotify; return whether that worked, so that the
        caller can fall back to polling on platforms without it.
        """
        if inotify is None:
            self.log.info("no inotify on this platform; polling {share}", share=self._share.path)
            return False
        try:
            mask = (
                inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MODIFY
                | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO
                | inotify.IN_CLOSE_WRITE | inotify.IN_ATTRIB
            )
            notifier = inotify.INotify(reactor=self._reactor)
            notifier.watch(self._share, mask=mask, callbacks=[self._inotifyEvent])
        except Exception as e:
            self.log.info("no inotify ({why}); polling {share}", why=e, share=self._share.path)
            return False
        notifier.startReading()
        self._notifier = notifier
        return True

    def _inotifyEvent(self, ignored: object, path: FilePath, mask: int) -> None:
        # inotify gives paths as bytes; the share's may be text.
        path = path.asTextMode()
        inShare = path.dirname() == self._share.asTextMode().path and not mask & inotify.IN_Q_OVERFLOW
        if inShare and path.basename().startswith("."):
            return  # hidden names (partial downloads among them) are never shared
        if self._dirty is not None and inShare:
            self._dirty.add(path.basename())
            if len(self._dirty) > MAX_NAMED_SCAN:
                self._dirty = None
        else:
            self._dirty = None
        self._changed(full=False)

    # Scan scheduling (reactor thread)

    def _changed(self, full: bool = True) -> None:
        """
        Something may have changed: scan after C{coalesce} seconds, so that a
        burst of events costs one scan.  Unless C{full} is false, that scan
        lists the whole share; else it looks only at the names inotify gave
        (L{ShareScanner.scanNames}), if it can.
        """
        if not self._running or self._taking:
            # (While the restart record is taken, no scan has listed the
            # share yet: the first one, right after, sees this change.)
            return
        if full:
            self._dirty = None
        if self._scanning:
            self._again = True
        elif self._pending is None:
            self._pending = self._reactor.callLater(self._coalesce, self._pendingFired)

    def _pendingFired(self) -> None:
        self._pending = None
        self._startScan()

    def _requestScan(self) -> Deferred:
        d = self._waiters.wait()
        self._dirty = None  # asked for: a full scan
        if self._taking:
            pass  # the scan starts once the record is taken
        elif self._scanning:
            self._again = True
        else:
            self._cancelPending()
            self._startScan()
        return d

    def _cancelPending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _startScan(self) -> None:
        waiters, self._waiters = self._waiters, Waiters()
        self._scanning = True
        dirty, self._dirty = self._dirty, set()
        # Scans never overlap, so the state handed over is the one the
        # result replaces.
        named = self._firstDone and bool(dirty)
        # A full scan's start and end space out the polls (see _poll).
        started = None if named else self._reactor.seconds()
        if named:
            d = self._runInThread(self._scanner.scanNames, self._state, sorted(dirty))
        elif self._firstDone:
            d = self._runInThread(self._scanner.scan, self._state)
        else:
            d = self._runInThread(self._firstScan, self._state)
            d.addCallback(self._resume)
        d.addCallback(self._applyScan)
        d.addErrback(self._scanFailed)
        d.addBoth(self._scanFinished, waiters, started)

    def _firstScan(self, state: Any) -> Tuple[ScanResult, Optional[str]]:
        """
        In the scan thread: scan, and renumber the scan as the restart
        record's seq (taken at start, see L{p2pfiles.sharescan.takeRecord})
        if the share is exactly as the record describes.  Returns the scan
        and the record's incarnation if it is kept.
        """
        record = self._record
        result = self._scanner.scan(state)
        if record is None:
            return result, None
        kept = resumed(result.state, record)
        if kept is None:
            return result, None
        return result._replace(state=kept), record["incarnation"]

    def _resume(self, found: Tuple[ScanResult, Optional[str]]) -> ScanResult:
        result, incarnation = found
        if self._record is not None and incarnation is None:
            self.log.info(
                "share changed since the last stop: new incarnation {incarnation}", incarnation=self.incarnation
            )
        if incarnation is not None:
            self.incarnation = incarnation
            self.log.info(
                "share unchanged since the last stop: keeping change {seq} of {incarnation}",
                seq=result.state.seq, incarnation=incarnation,
            )
        return result

    def _scanFailed(self, failure: Failure) -> Failure:
        self.log.failure("scan of {share} failed", failure, share=self._share.path)
        return failure

    def _scanFinished(self, result: Optional[Failure], waiters: Waiters, started: Optional[float]) -> None:
        self._scanning = False
        if started is not None:
            self._lastFull = (started, self._reactor.seconds())
        waiters.fire(result)
        self._idleWaiters.fire(None)
        if self._again and self._running:
            self._again = False
            # What the next scan looks at was noted meanwhile (_dirty).
            self._changed(full=False)

    def _applyScan(self, result: ScanResult) -> None:
        """
        Swap in what the scan thread computed.  Costs time in proportion to
        what changed, never to the size of the share.
        """
        self._state = result.state
        if result.cacheProblem is not None:
            self.log.warn(
                "ignoring hash cache {path}: {reason}",
                path=self._cacheFile.path, reason=result.cacheProblem,
            )
        if result.workerProblem is not None:
            self.log.warn("hashing in the scan thread instead: {reason}", reason=result.workerProblem)
        for p in result.newProblems:
            name = p.key
            if isinstance(name, bytes):
                name = name.decode("utf-8", "backslashreplace")
            self.log.emit(p.level, "not sharing {name!r}: {reason}", name=name, reason=p.reason)
        if result.cacheChanged:
            self._saveCache()
        if not self._firstDone:
            self._firstDone = True
            self._record = None
            return
        if result.changed or result.removed:
            for callback in list(self._subscribers):
                try:
                    callback(result.changed, result.removed)
                except Exception:
                    self.log.failure("index subscriber {callback!r} failed", callback=callback)

    async def _stop(self) -> None:
        self._running = False
        self._again = False
        self._stopInotify()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        self._cancelPending()
        if self._taking:
            await self._tookWaiters.wait()
        if self._scanning:
            await self._idleWaiters.wait()
        self._waiters.fire(Failure(IndexStopped("the index stopped before scanning again")))
        await self._whenSaved()
        if self._firstDone and not self._recorded:
            # No scan runs after this: the state is the last one served.
            self._recorded = True
            try:
                await self._runInThread(writeRecord, self._recordFile, self.incarnation, self._state)
            except Exception:
                self.log.failure("cannot save {path}", path=self._recordFile.path)
        elif not self._firstDone and self._record is not None and not self._recorded:
            # Stopped before the first scan: this index vouched for nothing
            # but the recorded change, which stays its word.
            self._recorded = True
            try:
                await self._runInThread(putRecordBack, self._recordFile, self._record)
            except Exception:
                self.log.failure("cannot save {path}", path=self._recordFile.path)

    # Saving the hash cache (at most one write runs; changes meanwhile are
    # saved by one more)

    def _saveCache(self) -> None:
        self._cacheDirty = True
        if not self._saving:
            self._writeNext()

    def _writeNext(self) -> None:
        self._cacheDirty = False
        self._saving = True
        d = self._runInThread(self._scanner.writeCache, self._state.cache)
        d.addErrback(
            lambda f: self.log.failure("cannot save {path}", f, path=self._cacheFile.path)
        )
        d.addCallback(self._written)

    def _written(self, ignored: object) -> None:
        self._saving = False
        if self._cacheDirty:
            self._writeNext()
            return
        self._savedWaiters.fire(None)

    def _whenSaved(self) -> Deferred:
        if not self._saving:
            return succeed(None)
        return self._savedWaiters.wait()
