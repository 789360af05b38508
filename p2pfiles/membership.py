"""
Who else is in the cluster, and the control links to them.

L{Membership} knows every member this node has learned of (configured peers
and those learned since), keeps one reconnecting L{PeerLink} to each, and
tracks the open control connections in both directions.  It decides nothing
about leadership: it tells its owner when a member's first link comes up and
its last link goes down, and sends what it is given.

It also guards the ids: a node that claims the id of a member held by
another live node (another address, or another certificate), or of a
configured member at another address, or this node's own id, is refused
with code C{conflict} and listed in L{Membership.conflicts}; and it forgets
learned members that have not been alive for C{forgetAfter} seconds.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pfiles.address import clientEndpoint
from p2pfiles.protocol import LocalIdentity, P2PFactory, P2PProtocol
from p2pfiles.wire import Message, encode

# Reconnection to a peer: start fast, never wait much more than a second, so
# that a restarted peer is seen quickly.
RETRY_INITIAL = 0.1
RETRY_MAX = 1.0

# A peer that refuses our secret will not change its mind soon: back off
# much further, so that neither side floods its log or the network.
AUTH_RETRY_MAX = 60.0

# How often the same reason for a failing link is logged again, with the
# number of times it happened meanwhile.
REPEAT_LOG_INTERVAL = 60.0


class PeerLink(Service):
    """
    The control link to one peer, reconnecting for as long as it runs.

    Failures back off exponentially, to L{RETRY_MAX} seconds for a peer
    that is down and to L{AUTH_RETRY_MAX} for one that refuses our secret.
    Each reason is logged once, then at most once a minute with a count.
    """

    log = Logger()

    def __init__(
        self,
        member: int,
        address: str,
        reactor: Any,
        factory: P2PFactory,
        onRefused: Optional[Callable[[int, Optional[str]], None]] = None,
    ) -> None:
        self.member = member
        self.address = address
        self.reactor = reactor
        self.factory = factory
        self.onRefused = onRefused
        self.protocol: Optional[P2PProtocol] = None
        self.failures = 0
        self.refusal: Optional[str] = None
        self._attempt: Optional[Deferred] = None
        self._retry: Any = None
        self._reported: Dict[str, Tuple[float, int]] = {}
        # (code, reason) if the link that is up was refused after its
        # handshake (an id conflict): its close counts as that refusal.
        self._lateRefusal: Optional[Tuple[str, str]] = None

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self.protocol is not None:
            closed = self.protocol.whenClosed()
            self.protocol.abort()
            return closed
        return succeed(None)

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        try:
            endpoint = clientEndpoint(self.reactor, self.address, 5, self.factory.identity.security)
        except ValueError as e:
            self._report("address", f"cannot link to node {self.member}: {e}")
            return
        self._attempt = endpoint.connect(self.factory)
        self._attempt.addCallbacks(self._connected, self._connectFailed)

    def refusedAfterHandshake(self, code: str, reason: str) -> None:
        """
        The link that is up was refused by one end after its handshake (the
        id it claims is held by another node): treat its close as a refusal
        with C{code}, backed off and logged as one.
        """
        if self.protocol is not None:
            self._lateRefusal = (code, reason)

    def _connected(self, protocol: P2PProtocol) -> None:
        self._attempt = None
        self._lateRefusal = None
        self.protocol = protocol
        protocol.whenClosed().addCallback(lambda _: self._closed(protocol))

    def _connectFailed(self, reason: Failure) -> None:
        self._attempt = None
        if not self.running:
            return
        self.failures += 1
        self._report("connect", f"cannot reach node {self.member} at {self.address}: {reason.getErrorMessage()}")
        self._schedule(RETRY_MAX)

    def _closed(self, protocol: P2PProtocol) -> None:
        refusal = protocol.refusal
        if self.protocol is protocol:
            self.protocol = None
            refusal, self._lateRefusal = refusal or self._lateRefusal, None
        if not self.running:
            return
        if protocol.peer is not None and refusal is None:
            # It was up: try again at once, as after any first failure.
            self.failures = 0
            self._setRefusal(None)
            self._schedule(RETRY_MAX)
            return
        self.failures += 1
        if refusal is not None:
            code, reason = refusal
            self._setRefusal(reason if code in ("auth", "conflict", "version") else None)
            self._report(code, f"node {self.member} at {self.address} refused the link: {reason}")
            self._schedule(AUTH_RETRY_MAX if code in ("auth", "conflict", "version") else RETRY_MAX)
        else:
            self._report("handshake", f"link to node {self.member} at {self.address} closed during the handshake")
            self._schedule(RETRY_MAX)

    def _setRefusal(self, reason: Optional[str]) -> None:
        if reason != self.refusal:
            self.refusal = reason
            if self.onRefused is not None:
                self.onRefused(self.member, reason)

    def _schedule(self, maximum: float) -> None:
        delay = min(RETRY_INITIAL * (2 ** max(self.failures - 1, 0)), maximum)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _report(self, cause: str, line: str) -> None:
        """
        Log C{line} the first time C{cause} happens, then at most once every
        L{REPEAT_LOG_INTERVAL} with how often it happened since.
        """
        now = self.reactor.seconds()
        last, count = self._reported.get(cause, (None, 0))
        if last is None:
            self.log.warn("{line}", line=line)
            self._reported[cause] = (now, 0)
        elif now - last >= REPEAT_LOG_INTERVAL:
            self.log.warn("{line} ({count} times in the last {s:.0f}s)", line=line, count=count + 1, s=now - last)
            self._reported[cause] = (now, 0)
        else:
            self._reported[cause] = (last, count + 1)


class Member:
    """
    One other node as this node knows it: id, address, and its open control
    connections (ours to it, and its to us).
    """

    def __init__(self, id: int, address: str, configured: bool, lastAlive: float = 0.0) -> None:
        self.id = id
        self.address = address
        self.configured = configured
        self.links: Set[P2PProtocol] = set()
        self.service: Optional[PeerLink] = None
        # Its certificate's fingerprint, once a link has authenticated it.
        self.fingerprint: Optional[str] = None
        # When it was last seen alive (or learned, if never).
        self.lastAlive = lastAlive

    def describe(self) -> str:
        """
        The holder of this id, for log lines: its address and certificate.
        """
        return f"the node at {self.address}" + (f" ({self.fingerprint})" if self.fingerprint else "")

    def link(self) -> Optional[P2PProtocol]:
        """
        The connection to send on: our own outgoing one if it is up.
        """
        best = None
        for link in self.links:
            if not link.isReady():
                continue
            if not link.incoming:
                return link
            best = link
        return best


class Conflict:
    """
    A node refused because the id it claims is held by another: who it
    said it was, why it was refused, and when (reactor seconds: POSIX time
    on a real reactor) it was first and last refused.
    """

    def __init__(self, id: int, address: str, fingerprint: Optional[str], reason: str, now: float) -> None:
        self.id = id
        self.address = address
        self.fingerprint = fingerprint
        self.reason = reason
        self.since = now
        self.seen = now
        self.count = 1

    def describe(self) -> Dict[str, Any]:
        """
        The conflict as C{status --json} lists it.
        """
        return {
            "id": self.id,
            "address": self.address,
            "fingerprint": self.fingerprint,
            "reason": self.reason,
            "since": round(self.since, 3),
            "seen": round(self.seen, 3),
            "count": self.count,
        }


class Membership(MultiService):
    """
    The members of the cluster as this node knows them, and their control
    links.  Its child services are the L{PeerLink}s.

    @ivar onLinkUp: called with a member's id when its first link is up.
    @ivar onLinkDown: called with a member's id when its last link closes.
    @ivar onLinkLost: called with a member's id when one of several links
        closes (messages on it may have been lost).
    @ivar forgetAfter: seconds after which a learned member that has not
        been alive is forgotten (see L{sweep}); None: never.
    @ivar conflicts: the nodes refused for claiming a held id, by
        C{(id, address, fingerprint)}; each is kept until it has not been
        seen for C{forgetAfter} seconds.
    """

    log = Logger()

    def __init__(
        self,
        me: int,
        address: str,
        identity: LocalIdentity,
        reactor: Any,
        handlerFor: Callable[[], Any],
    ) -> None:
        super().__init__()
        self.me = me
        self.address = address
        self.identity = identity
        self.reactor = reactor
        self.handlerFor = handlerFor
        self.members: Dict[int, Member] = {}
        self.refused: Dict[int, str] = {}
        # Most members learned (configured ones always count and are kept).
        self.maxMembers: Optional[int] = None
        self._capWarned = False
        self.forgetAfter: Optional[float] = None
        self.conflicts: Dict[Tuple[int, str, Optional[str]], Conflict] = {}
        self.onLinkUp: Callable[[int], None] = lambda member: None
        self.onLinkDown: Callable[[int], None] = lambda member: None
        self.onLinkLost: Callable[[int], None] = lambda member: None
        self.onChange: Callable[[], None] = lambda: None
        self.onRejected: Optional[Callable[[str, str, str], None]] = None

    def __contains__(self, member: int) -> bool:
        return member in self.members

    def ids(self) -> List[int]:
        return sorted(self.members)

    def fingerprintOf(self, member: int) -> Optional[str]:
        """
        The fingerprint C{member} presented on its last authenticated link,
        or None if none has been seen.
        """
        if member == self.me:
            return self.identity.fingerprint
        record = self.members.get(member)
        return record.fingerprint if record is not None else None

    def addressOf(self, member: int) -> Optional[str]:
        if member == self.me:
            return self.address
        record = self.members.get(member)
        return record.address if record is not None else None

    def learn(self, member: int, address: str, configured: bool = False) -> bool:
        """
        Know of C{member} at C{address} and keep a control link to it.
        Return True if it was new.
        """
        if member == self.me or member in self.members:
            return False
        if not configured and self.maxMembers is not None and len(self.members) >= self.maxMembers:
            if not self._capWarned:
                self._capWarned = True
                self.log.warn(
                    "not linking to node {id} at {address}: {most} members known, the most allowed (--max-members)",
                    id=member,
                    address=address,
                    most=self.maxMembers,
                )
            return False
        self.members[member] = record = Member(member, address, configured, self.reactor.seconds())
        factory = P2PFactory(
            self.identity, self.handlerFor, self.reactor, listening=False, expectedNode=member, perConnection=True
        )
        factory.onRejected = self.onRejected
        record.service = PeerLink(member, address, self.reactor, factory, self._refusedBy)
        record.service.setServiceParent(self)
        self.log.info("linking to node {id} at {address}", id=member, address=address)
        return True

    def _refusedBy(self, member: int, reason: Optional[str]) -> None:
        if reason is None:
            self.refused.pop(member, None)
        else:
            self.refused[member] = reason
        self.onChange()

    def controlReady(self, connection: P2PProtocol) -> bool:
        """
        A control connection finished its handshake: accept it as a link of
        its member, or refuse it.  Return True if accepted.
        """
        peer = connection.peer
        assert peer is not None and peer.node is not None and peer.address is not None
        why = self._conflictWith(peer.node, peer.address, peer.fingerprint)
        if why is not None:
            self._refuseClaim(connection, why)
            return False
        self.learn(peer.node, peer.address)
        member = self.members.get(peer.node)
        if member is None:
            # Not learned: the most members are known.
            connection.close()
            return False
        if member.address != peer.address:
            # It proved who it is on this very link: its address now is the
            # one it gives, and our link to it follows.
            self.log.info(
                "node {id} moved from {old} to {new}", id=peer.node, old=member.address, new=peer.address
            )
            member.address = peer.address
            if member.service is not None:
                member.service.address = peer.address
        if peer.fingerprint != member.fingerprint:
            if member.fingerprint is not None:
                self.log.warn(
                    "member {id} now presents certificate {new} (was {old})",
                    id=peer.node,
                    new=peer.fingerprint,
                    old=member.fingerprint,
                )
            member.fingerprint = peer.fingerprint
        first = not member.links
        member.links.add(connection)
        if first:
            self.log.info("member {id} link up ({address})", id=peer.node, address=member.address)
            self.onLinkUp(peer.node)
        return True

    def _conflictWith(self, node: int, address: str, fingerprint: Optional[str]) -> Optional[str]:
        """
        Why a node that proved it holds the secret may not have C{node} as
        its id, or None if it may.  Who has the id first keeps it: this
        node its own; a member with a link up, against a claimant at
        another address or with another certificate; a configured member,
        against a claimant at another address.
        """
        if node == self.me:
            return f"node id {node} is already in use by the node at {self.address}"
        member = self.members.get(node)
        if member is None:
            return None
        if member.links and (
            address != member.address or (member.fingerprint is not None and fingerprint != member.fingerprint)
        ):
            return f"node id {node} is already held by {member.describe()}, which is live"
        if member.configured and address != member.address:
            return f"node id {node} is configured at {member.address}"
        return None

    def _refuseClaim(self, connection: P2PProtocol, why: str) -> None:
        """
        Refuse C{connection}, whose node claims an id it may not have: tell
        it why (code C{conflict}), log it once per claimant, and list it in
        L{conflicts}.
        """
        peer = connection.peer
        assert peer is not None and peer.node is not None and peer.address is not None
        now = self.reactor.seconds()
        key = (peer.node, peer.address, peer.fingerprint)
        conflict = self.conflicts.get(key)
        if conflict is None:
            self.conflicts[key] = Conflict(peer.node, peer.address, peer.fingerprint, why, now)
            self.log.warn(
                "refused node {id} at {address} ({fingerprint}): {why}",
                id=peer.node,
                address=peer.address,
                fingerprint=peer.fingerprint,
                why=why,
            )
        else:
            conflict.seen = now
            conflict.count += 1
            conflict.reason = why
        member = self.members.get(peer.node)
        if not connection.incoming and member is not None and member.service is not None:
            # Our own link found the claimant: back off as from a refusal.
            member.service.refusedAfterHandshake("conflict", why)
        connection.refuse("conflict", why)
        self.onChange()

    def refusedBy(self, member: int, code: str, reason: str) -> bool:
        """
        C{member} refused this node's link after the handshake (the id this
        node claims is held by another node there): its link backs off and
        reports it as a refusal.  Return True if a link of ours takes it.
        """
        record = self.members.get(member)
        if code != "conflict" or record is None or record.service is None or record.service.protocol is None:
            return False
        record.service.refusedAfterHandshake(code, reason)
        return True

    def conflictList(self) -> List[Dict[str, Any]]:
        """
        The refused claimants, as C{status --json} lists them (C{"conflicts"}).
        """
        return [self.conflicts[key].describe() for key in sorted(self.conflicts, key=repr)]

    def sweep(self, isLive: Callable[[int], bool]) -> List[int]:
        """
        Note which members are alive now; forget every learned member that
        has not been alive for L{forgetAfter} seconds (its links closed, its
        link service stopped: no more reconnects), and every conflict not
        seen for as long.  Configured members are never forgotten.  Return
        the ids forgotten.
        """
        now = self.reactor.seconds()
        forgotten = []
        for member in list(self.members.values()):
            if isLive(member.id):
                member.lastAlive = now
            elif not member.configured and self.forgetAfter is not None and now - member.lastAlive >= self.forgetAfter:
                self._forget(member)
                forgotten.append(member.id)
        if self.forgetAfter is not None:
            for key, conflict in list(self.conflicts.items()):
                if now - conflict.seen >= self.forgetAfter:
                    del self.conflicts[key]
        return forgotten

    def _forget(self, member: Member) -> None:
        self.log.info(
            "forgot node {id} at {address}: not alive for {s:.0f}s (--forget-after)",
            id=member.id,
            address=member.address,
            s=self.reactor.seconds() - member.lastAlive,
        )
        del self.members[member.id]
        self.refused.pop(member.id, None)
        if member.service is not None:
            member.service.disownServiceParent()
        links, member.links = list(member.links), set()
        for link in links:
            link.abort()
        if links:
            self.onLinkDown(member.id)
        self.onChange()

    def controlClosed(self, connection: P2PProtocol) -> None:
        peer = connection.peer
        if peer is None:
            return
        member = self.members.get(peer.node)
        if member is None or connection not in member.links:
            return
        member.links.discard(connection)
        if not member.links:
            self.log.info("member {id} link down ({address})", id=member.id, address=member.address)
            self.onLinkDown(member.id)
        else:
            self.onLinkLost(member.id)

    def sendTo(self, member: int, message: Message) -> bool:
        record = self.members.get(member)
        link = record.link() if record is not None else None
        if link is None:
            return False
        link.sendMessage(message)
        return True

    def broadcast(self, message: Message, to: Optional[Iterable[int]] = None) -> None:
        """
        Send C{message} on every member's link (or those of C{to}),
        encoded once.
        """
        payload = encode(message)
        for member in self.members.values() if to is None else (self.members[m] for m in to if m in self.members):
            link = member.link()
            if link is not None:
                link.sendEncoded(payload)

    def closeLinks(self) -> Deferred:
        """
        Close every control connection, in both directions.
        """
        waiting = []
        for member in self.members.values():
            for link in list(member.links):
                waiting.append(link.whenClosed())
                link.abort()
        return DeferredList(waiting)
