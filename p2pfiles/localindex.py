"""
A node's own index of the files it shares.

The shared files are the regular files at the top level of the share
directory.  Listing the directory and hashing files block, so all of that runs
through an injected C{runInThread}; the reactor thread only decides when to
scan, applies the results, logs and tells subscribers what changed.

Hashes are remembered in C{hashcache.json} in the state directory, so that a
restart does not read every shared file again: a file whose name, size,
C{st_mtime_ns} and inode are unchanged keeps its hash.  The file looks like
C{{"version": 1, "files": {name: {"size", "mtime_ns", "inode", "sha256"}}}}.

Changes are noticed with inotify where available, and by polling every
C{pollInterval} seconds where not.  With inotify a slow safety poll (every
C{SAFETY_POLL_FACTOR * pollInterval}) still runs, because inotify can drop
events (queue overflow) and cannot see a share directory that is replaced.
"""

import hashlib
import json
import os
import re
import stat
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.atomic import atomicWrite
from p2pfiles.names import nameProblem
from p2pfiles.waiting import Waiters
from p2pfiles.wire import FileEntry

__all__ = ["LocalIndex", "IndexStopped", "hashFile"]

CACHE_NAME = "hashcache.json"
CACHE_VERSION = 1

# A file that keeps changing while we hash it is given up on after this many
# tries; the next scan tries again.
HASH_TRIES = 3

# With inotify, the safety poll runs this many times less often than polling.
SAFETY_POLL_FACTOR = 10

# name -> {"size", "mtime_ns", "inode", "sha256"}: the hash cache.
_Cache = Dict[str, Dict[str, Any]]

# subscriber(changed, removed)
Subscriber = Callable[[List[FileEntry], List[str]], None]


class IndexStopped(Exception):
    """
    The index was stopped (or never started), so the scan asked for will not
    happen.
    """


def hashFile(path: str, chunk: int = 1 << 20) -> Tuple[str, int]:
    """
    Return the SHA-256 (hex) of the file at C{path} and the number of bytes
    hashed.  Reads C{chunk} bytes at a time so that a large file never sits
    in memory.  Blocks: call it in a thread.
    """
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            digest.update(data)
            length += len(data)
    return digest.hexdigest(), length


def _signature(st: os.stat_result) -> Tuple[int, int, int]:
    # What must be unchanged for a cached hash (or a fresh one) to hold.
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class _Problem(NamedTuple):
    """
    A name we do not share, and why.  C{signature} lets us warn once per name
    and again only when the file (or the reason) changes.
    """

    key: Any  # the name: str, or bytes when it is not UTF-8
    signature: Tuple[Any, ...]
    reason: str
    level: LogLevel


class _ScanResult(NamedTuple):
    entries: Dict[str, FileEntry]
    cache: _Cache
    problems: List[_Problem]
    cacheProblem: Optional[str]


class LocalIndex:
    """
    The files this node shares, kept up to date as the share changes.

    C{entries} maps each shared name to its L{FileEntry}.  It is replaced (not
    mutated) after each scan, so a reader holding it sees a consistent view.
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
        hasher: Callable[[str], Tuple[str, int]] = hashFile,
    ) -> None:
        """
        @param hasher: C{hasher(path) -> (sha256hex, length)}, run in a thread;
            replaceable so that tests can count or fail reads.
        """
        if runInThread is None:
            runInThread = lambda f, *a: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *a
            )
        self.entries: Dict[str, FileEntry] = {}
        self._share = share
        self._sharePath = os.fsencode(share.path)
        self._cacheFile = state.child(CACHE_NAME)
        self._reactor = reactor
        self._runInThread = runInThread
        self._pollInterval = pollInterval
        self._coalesce = coalesce
        self._useInotify = useInotify
        self._hasher = hasher

        self._running = False
        self._firstDone = False
        self._cache: Optional[_Cache] = None  # None: not loaded
        self._reported: Dict[Any, Tuple[Any, ...]] = {}
        self._subscribers: List[Subscriber] = []
        self._notifier: Any = None
        self._poller: Optional[LoopingCall] = None

        # Scan scheduling: at most one scan runs; _again asks for one more.
        self._scanning = False
        self._again = False
        self._pending: Any = None  # the coalescing DelayedCall
        self._waiters = Waiters()  # for the next scan to start
        self._idleWaiters = Waiters()  # for the running scan to end

        # Cache writes: at most one runs; _cacheDirty asks for one more.
        self._saving = False
        self._cacheDirty = False
        self._savedWaiters = Waiters()

    # Public API

    def start(self) -> Deferred:
        """
        Load the hash cache, scan the share and start watching it.  Fires with
        L{None} once the first scan is complete and C{entries} holds it.
        """
        self._running = True
        d = self._requestScan()
        d.addCallbacks(self._startWatching, self._startFailed)
        return d

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

    def subscribe(self, callback: Subscriber) -> None:
        """
        Call C{callback(changed, removed)} on the reactor thread after each
        scan (but the first) that changed something.
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
        if name not in self.entries or self._cache is None:
            return None
        item = self._cache.get(name)
        if item is None:
            return None
        return (item["size"], item["mtime_ns"], item["inode"])

    # Watching

    def _startWatching(self, ignored: object) -> None:
        if not self._running:  # stopped during the first scan
            return
        interval = self._pollInterval
        if self._useInotify and self._startInotify():
            interval = self._pollInterval * SAFETY_POLL_FACTOR
        self._poller = LoopingCall(self._changed)
        self._poller.clock = self._reactor
        self._poller.start(interval, now=False).addErrback(
            lambda f: self.log.failure("polling {share} failed", f, share=self._share.path)
        )

    def _startFailed(self, failure: Failure) -> Failure:
        self._running = False
        return failure

    def _startInotify(self) -> bool:
        """
        Watch the share with inotify; return whether that worked, so that the
        caller can fall back to polling on platforms without it.
        """
        try:
            from twisted.internet import inotify

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
        self._changed()

    # Scan scheduling (reactor thread)

    def _changed(self) -> None:
        """
        Something may have changed: scan after C{coalesce} seconds, so that a
        burst of events costs one scan.
        """
        if not self._running:
            return
        if self._scanning:
            self._again = True
        elif self._pending is None:
            self._pending = self._reactor.callLater(self._coalesce, self._pendingFired)

    def _pendingFired(self) -> None:
        self._pending = None
        self._startScan()

    def _requestScan(self) -> Deferred:
        d = self._waiters.wait()
        if self._scanning:
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
        # The thread only reads the cache; a scan's result replaces it.
        d = self._runInThread(self._scanBlocking, self._cache)
        d.addCallback(self._applyScan)
        d.addErrback(self._scanFailed)
        d.addBoth(self._scanFinished, waiters)

    def _scanFailed(self, failure: Failure) -> Failure:
        self.log.failure("scan of {share} failed", failure, share=self._share.path)
        return failure

    def _scanFinished(self, result: Optional[Failure], waiters: Waiters) -> None:
        self._scanning = False
        waiters.fire(result)
        self._idleWaiters.fire(None)
        if self._again and self._running:
            self._again = False
            self._changed()

    def _applyScan(self, result: _ScanResult) -> None:
        if result.cacheProblem is not None:
            self.log.warn(
                "ignoring hash cache {path}: {reason}",
                path=self._cacheFile.path, reason=result.cacheProblem,
            )
        self._report(result.problems)
        if result.cache != self._cache:
            self._cache = result.cache
            self._saveCache()
        old, self.entries = self.entries, result.entries
        if not self._firstDone:
            self._firstDone = True
            return
        changed = [e for (n, e) in sorted(result.entries.items()) if old.get(n) != e]
        removed = sorted(set(old) - set(result.entries))
        if changed or removed:
            for callback in list(self._subscribers):
                try:
                    callback(changed, removed)
                except Exception:
                    self.log.failure("index subscriber {callback!r} failed", callback=callback)

    def _report(self, problems: List[_Problem]) -> None:
        """
        Log each problem once: again only if its file or reason changed, or
        after it went away and came back.
        """
        reported = {}
        for p in problems:
            reported[p.key] = p.signature
            if self._reported.get(p.key) != p.signature:
                name = p.key
                if isinstance(name, bytes):
                    name = name.decode("utf-8", "backslashreplace")
                self.log.emit(p.level, "not sharing {name!r}: {reason}", name=name, reason=p.reason)
        self._reported = reported

    async def _stop(self) -> None:
        self._running = False
        self._again = False
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        self._cancelPending()
        if self._scanning:
            await self._idleWaiters.wait()
        self._waiters.fire(Failure(IndexStopped("the index stopped before scanning again")))
        await self._whenSaved()

    # The hash cache file

    def _saveCache(self) -> None:
        self._cacheDirty = True
        if not self._saving:
            self._writeNext()

    def _writeNext(self) -> None:
        self._cacheDirty = False
        self._saving = True
        d = self._runInThread(self._writeCache, self._cache)
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

    def _writeCache(self, cache: _Cache) -> None:
        # In a thread.  The dict is never mutated once handed over: each scan
        # builds a new one.
        self._cacheFile.parent().makedirs(ignoreExistingDirectory=True)
        data = json.dumps({"version": CACHE_VERSION, "files": cache}, sort_keys=True)
        atomicWrite(self._cacheFile, data.encode("utf-8"))

    def _loadCache(self) -> Tuple[_Cache, Optional[str]]:
        """
        In a thread: read the cache file.  Anything wrong with it makes it
        count as empty (we only lose time rehashing), with the reason to log.
        """
        try:
            data = self._cacheFile.getContent()
        except FileNotFoundError:
            return {}, None
        except OSError as e:
            return {}, f"cannot read it: {e}"
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return {}, "not valid JSON"
        if not isinstance(parsed, dict) or parsed.get("version") != CACHE_VERSION:
            return {}, "not a version 1 hash cache"
        files = parsed.get("files")
        if not isinstance(files, dict):
            return {}, "not a version 1 hash cache"
        for item in files.values():
            if not (
                isinstance(item, dict)
                and all(type(item.get(k)) is int for k in ("size", "mtime_ns", "inode"))
                and re.fullmatch("[0-9a-f]{64}", str(item.get("sha256")))
            ):
                return {}, "malformed entry"
        return files, None

    # Scanning (in a thread: touches only its arguments and fixed attributes)

    def _scanBlocking(self, cache: Optional[_Cache]) -> _ScanResult:
        # Every scan (re)creates the share: one that was removed is then an
        # empty share, not a failed scan logged at every poll.
        os.makedirs(self._sharePath, exist_ok=True)
        cacheProblem = None
        if cache is None:
            cache, cacheProblem = self._loadCache()
        result = _ScanResult({}, {}, [], cacheProblem)
        shareReal = os.path.realpath(self._sharePath)
        for raw in sorted(os.listdir(self._sharePath)):
            path = os.path.join(self._sharePath, raw)
            try:
                self._scanOne(raw, path, shareReal, cache, result)
            except FileNotFoundError:
                pass  # removed while we looked at it: the next scan agrees
            except OSError as e:
                self._problem(result, raw, path, e.strerror or str(e))
        return result

    def _scanOne(self, raw: bytes, path: bytes, shareReal: bytes,
                 cache: _Cache, result: _ScanResult) -> None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._problem(result, raw, path, "name is not valid UTF-8")
        if name.startswith("."):
            return  # hidden, like partial downloads: not shared, not a problem
        problem = nameProblem(name)
        if problem is not None:
            return self._problem(result, name, path, problem)
        if os.path.islink(path):
            # Only a link to a visible file directly in the share is followed:
            # a link must not publish anything the share would not.
            target = os.path.realpath(path)
            if os.path.dirname(target) != shareReal or os.path.basename(target).startswith(b"."):
                reason = "symlink does not lead to a visible file in the share"
                return self._problem(result, name, path, reason)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return  # directories, devices, fifos: silently not shared
        for attempt in range(HASH_TRIES):
            if attempt:
                st = os.stat(path)
            size, mtimeNs, inode = _signature(st)
            cached = cache.get(name, {})
            if (cached.get("size"), cached.get("mtime_ns"), cached.get("inode")) == _signature(st):
                digest = cached["sha256"]
            else:
                digest, length = self._hasher(os.fsdecode(path))
                after = os.stat(path)
                if _signature(after) != (size, mtimeNs, inode) or length != size:
                    continue  # changed while we read it
            result.entries[name] = FileEntry(name, size, st.st_mtime, digest)
            result.cache[name] = {
                "size": size, "mtime_ns": mtimeNs, "inode": inode, "sha256": digest
            }
            return
        result.problems.append(_Problem(
            name, ("unstable",), "it kept changing while being hashed; will retry", LogLevel.info
        ))

    def _problem(self, result: _ScanResult, key: Any, path: bytes, reason: str) -> None:
        try:
            signature: Tuple[Any, ...] = (reason,) + _signature(os.lstat(path))
        except OSError:
            signature = (reason,)
        result.problems.append(_Problem(key, signature, reason, LogLevel.warn))
