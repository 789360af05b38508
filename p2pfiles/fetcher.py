"""
Downloads into this node's own share: L{Fetcher}.

A C{fetch} request asks a node to get a file from the leader into its share,
as the original system's node-to-leader request did.  The fetcher owns every
such download: a second request for a name already being fetched joins the
one in flight and gets its result, never a second writer.  (The part file's
lock keeps other processes out as well.)
"""

import os
import stat
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.client import askLeader
from p2pfiles.errors import P2PError
from p2pfiles.partfile import PartialFile, removeStaleParts
from p2pfiles.transfer import download
from p2pfiles.waiting import Waiters
from p2pfiles.wire import Message


class Fetcher:
    """
    The node's downloads into its share, one per name.

    @param leaderAddress: returns the leader's address, or None.
    @param otherAddresses: returns the addresses of the other live members,
        where a download resumes if the leader goes away.
    @param localEntry: returns this node's own entry for a name, or None.
    @param rescan: rescans the share; returns a Deferred.
    """

    log = Logger()

    def __init__(
        self,
        me: int,
        share: FilePath,
        reactor: Any,
        secret: bytes,
        identity: Any,
        runInThread: Callable[..., Deferred],
        leaderAddress: Callable[[], Optional[str]],
        otherAddresses: Callable[[], List[str]],
        localEntry: Callable[[str], Any],
        rescan: Callable[[], Deferred],
    ) -> None:
        self.me = me
        self.share = share
        self.reactor = reactor
        self.secret = secret
        self.identity = identity
        self.runInThread = runInThread
        self.leaderAddress = leaderAddress
        self.otherAddresses = otherAddresses
        self.localEntry = localEntry
        self.rescan = rescan
        self.stopped = False
        # name -> (the download's Deferred, everyone waiting for it)
        self._inFlight: Dict[str, Deferred] = {}
        self._joined: Dict[str, Waiters] = {}
        self._progress: Dict[str, Tuple[int, int]] = {}
        self._sweeper: Optional[LoopingCall] = None

    def fetch(self, name: str, overwrite: bool) -> Deferred:
        """
        Get C{name} into the share; fire with the C{fetched} reply or fail
        with L{P2PError}.  Cancelling the returned Deferred stops waiting,
        not the download, which others may share.
        """
        if self.stopped:
            return fail(P2PError("the node is stopping", "unavailable"))
        waiter = self._joined.setdefault(name, Waiters()).wait()
        if name not in self._inFlight:
            d = Deferred.fromCoroutine(self._fetch(name, overwrite))
            self._inFlight[name] = d
            d.addBoth(self._finished, name)
        else:
            self.log.info("fetch of {name} joins the one in flight", name=name)
        return waiter

    def progress(self, name: str) -> Tuple[int, int]:
        """
        C{(bytes, size)} of the download of C{name} so far (C{(0, 0)} before
        its size is known).
        """
        return self._progress.get(name, (0, 0))

    def _finished(self, result: Any, name: str) -> None:
        del self._inFlight[name]
        self._progress.pop(name, None)
        if isinstance(result, Failure) and result.check(CancelledError) and self.stopped:
            result = Failure(P2PError("the node is stopping", "unavailable"))
        waiting = self._joined.pop(name, Waiters())
        nobody = len(waiting) == 0
        waiting.fire(result)
        if isinstance(result, Failure) and nobody and not result.check(P2PError, CancelledError):
            self.log.failure("fetch of {name} failed", result, name=name)

    def startSweeping(self, maxAge: float, interval: float) -> None:
        """
        Remove partial downloads older than C{maxAge} seconds from the share
        now and every C{interval} seconds.
        """
        self._sweeper = LoopingCall(self._sweep, maxAge)
        self._sweeper.clock = self.reactor
        self._sweeper.start(interval, now=True)

    def _sweep(self, maxAge: float) -> Deferred:
        share = self.share
        d = self.runInThread(removeStaleParts, share, maxAge, self.reactor.seconds())

        def removed(names: List[str]) -> None:
            if names:
                self.log.info(
                    "removed {count} partial downloads older than {days:g} days from {share}: {names}",
                    count=len(names),
                    days=maxAge / 86400,
                    share=share.path,
                    names=", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
                )

        def failed(reason: Failure) -> None:
            self.log.warn(
                "cannot clean partial downloads in {share}: {reason}", share=share.path, reason=reason.getErrorMessage()
            )

        return d.addCallbacks(removed, failed)

    def stop(self) -> Deferred:
        """
        Cancel every download in flight and stop sweeping; fire once the
        downloads have all ended.
        """
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self.stopped = True
        downloads = list(self._inFlight.values())
        ended = [Deferred() for _ in downloads]
        for d, e in zip(downloads, ended):
            d.addBoth(lambda result, e=e: e.callback(None))
            d.cancel()
        return DeferredList(ended)

    async def _fetch(self, name: str, overwrite: bool) -> Message:
        leader = self.leaderAddress()
        if leader is None:
            raise P2PError("no leader elected right now; try again shortly", "no-leader")
        connection, found = await askLeader(self.reactor, leader, self.secret, Message("lookup", name=name), 10.0, self.identity)
        connection.close()
        mine = self.localEntry(name)
        existing = await self.runInThread(_lstat, self.share.child(name).path)
        if mine is None and existing is not None and stat.S_ISREG(existing.st_mode):
            await self.rescan()
            mine = self.localEntry(name)
        if mine is not None and mine.sha256 == found.sha256:
            return Message("fetched", name=name, size=mine.size, sha256=mine.sha256, already=True)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise P2PError(f"{name} is a directory on node {self.me}; it cannot be replaced", "conflict")
        if existing is not None and not overwrite:
            what = "other content" if mine is not None else "something that is not shared"
            raise P2PError(
                f"{name} already exists on node {self.me} with {what}; use --overwrite to replace it",
                "conflict",
            )
        addresses = [leader] + [a for a in self.otherAddresses() if a != leader]
        sink = PartialFile(self.share, name)
        def progress(done: int, size: int) -> None:
            self._progress[name] = (done, size)

        summary = await download(
            self.reactor, name, sink, addresses, self.secret, self.runInThread, self.identity, onProgress=progress
        )
        self.log.info(
            "fetched {name} ({size} bytes) via {via} in {seconds:.2f}s",
            name=name,
            size=summary["size"],
            via=summary["via"],
            seconds=summary["seconds"],
        )
        await self.rescan()
        return Message("fetched", name=name, size=summary["size"], sha256=summary["sha256"], already=False)


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
