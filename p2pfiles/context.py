"""
The view of a node that its request sessions get: L{RequestContext}, the
node's side of L{p2pfiles.session.IRequestContext}.  It answers from the
node's parts (coordinator, keeper, local index, fetcher, status board) and
holds the one thing of its own, the C{ls} answer encoded once per version
of the index.  The encoded answer is a whole copy of the index (about 150
bytes a file), so it is kept only while it is asked for: it is dropped
L{LISTING_KEPT} seconds after the last ask (a sender still writing it holds
its own reference), and made again at the next.
"""

from itertools import chain
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from zope.interface import implementer

from p2pfiles.errors import P2PError
from p2pfiles.index import listingChunks
from p2pfiles.partfile import openShared
from p2pfiles.session import IRequestContext, encodeListing
from p2pfiles.wire import FileEntry

# Seconds the encoded ls answer is kept after it was last asked for: a burst
# of asks, or a client polling every few seconds, shares one encoding; an
# answer nobody asks for costs no memory.
LISTING_KEPT = 30.0


@implementer(IRequestContext)
class RequestContext:
    """
    The view of a node that its request sessions get.
    """

    def __init__(self, node: Any) -> None:
        self._node = node
        self.me = node.id
        self.clock = node.reactor
        self._relayCount = 0
        # (index, version, frames): the ls answer, encoded once per version,
        # and the call that drops it (see LISTING_KEPT).
        self._listing: Optional[Tuple[Any, int, List[bytes]]] = None
        self._dropListing: Optional[IDelayedCall] = None

    def isLeader(self) -> bool:
        return self._node.coordinator.isLeader()

    def leaderId(self) -> Optional[int]:
        return self._node.coordinator.leader()

    def leaderAddress(self) -> Optional[str]:
        return self._node.leaderAddress()

    def status(self) -> Dict[str, Any]:
        return self._node.status()

    def watchStatus(self, callback: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        return self._node.board.watchStatus(callback)

    def listing(self) -> List[dict]:
        return self._node.keeper.index.listing()

    def listingFrames(self) -> List[bytes]:
        index = self._node.keeper.index
        cached = self._listing
        if cached is None or cached[0] is not index or cached[1] != index.version:
            rows = chain.from_iterable(listingChunks(index.snapshot()))
            self._listing = cached = (index, index.version, encodeListing(rows))
        if self._dropListing is not None and self._dropListing.active():
            self._dropListing.reset(LISTING_KEPT)
        else:
            self._dropListing = self.clock.callLater(LISTING_KEPT, self._forgetListing)
        return cached[2]

    def _forgetListing(self) -> None:
        self._dropListing = None
        self._listing = None

    def stop(self) -> None:
        """
        Drop the encoded ls answer and its timer: the node is stopping.
        """
        if self._dropListing is not None and self._dropListing.active():
            self._dropListing.cancel()
        self._forgetListing()

    def content(self, name: str, sha256: Optional[str], everyone: bool = False) -> Any:
        node = self._node
        if everyone:
            return node.keeper.index.content(name, sha256)
        return node.keeper.index.content(
            name, sha256, usable=lambda holder: holder != node.id and node.coordinator.isLive(holder)
        )

    def nextRelay(self, count: int) -> int:
        start = self._relayCount % count
        self._relayCount += 1
        return start

    def localEntry(self, name: str) -> Optional[FileEntry]:
        return self._node.localIndex.entries.get(name)

    def openShared(self, entry: FileEntry, offset: int) -> Any:
        node = self._node
        signature = node.localIndex.signature(entry.name)
        if signature is None or signature[0] != entry.size:
            raise P2PError(f"{entry.name} changed since it was indexed; try again", "changed")
        try:
            return openShared(node.config.share, entry.name, signature, offset)
        except P2PError as e:
            if e.code == "changed":
                # Look again, so that the next request finds it as it is.
                node.localIndex.rescan().addErrback(lambda reason: None)
            raise

    def openUpstream(self, address: str) -> Deferred:
        return self._node.openRequest(address)

    def indexSince(self, incarnation: Optional[str], since: int) -> Deferred:
        node = self._node
        # Before the first scan, the one question the restart record
        # answers is answered at once (see LocalIndex.quickChanges).
        quick = node.localIndex.quickChanges(incarnation, since)
        if quick is not None:
            return succeed(quick)
        return node.whenLocalReady().addCallback(lambda _: node.localIndex.changesSince(incarnation, since))

    def fetch(self, name: str, overwrite: bool) -> Deferred:
        return self._node.fetcher.fetch(name, overwrite)

    def fetchProgress(self, name: str) -> Tuple[int, int]:
        return self._node.fetcher.progress(name)

    def transferStarted(self, session: Any, direction: str, name: str, peer: str, size: int) -> Callable[[Any], None]:
        return self._node.board.transferStarted(session, direction, name, peer, size, session.progress)
