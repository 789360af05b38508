"""
A p2pfiles node: the service that wires its parts together.

The parts, each in its own module:
  - L{Membership}: the members and the control links to them;
  - the coordinator, who leads: L{HeartbeatCoordinator} (the built-in
    election) or an L{ExternalCoordinator} (etcd);
  - L{LocalIndex}: this node's own files; L{IndexKeeper}: the cluster's
    index and C{peer_files.log} while this node leads;
  - L{ControlSession} and L{RequestSession}: one per connection;
  - L{Fetcher}: downloads into this node's share.

The node holds no protocol state.  It routes each new connection to the
session for its purpose, gives the sessions the small views they need, and
carries the coordinator's decisions to the index keeper.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from p2pfiles import __version__
from p2pfiles.client import askListing, connect
from p2pfiles.context import RequestContext
from p2pfiles.control import ControlSession
from p2pfiles.coordinator import INodeCoordinator
from p2pfiles.etcd import DEFAULT_PREFIX, DEFAULT_TTL
from p2pfiles.external import etcdCoordinator
from p2pfiles.errors import P2PError
from p2pfiles.fetcher import Fetcher
from p2pfiles.gather import VIEW_NAME, IndexKeeper
from p2pfiles.channel import IConnectionSecurity
from p2pfiles.heartbeat import EpochStore, HeartbeatCoordinator
from p2pfiles.identity import NodeCertificate, Pins, stateIdentity
from p2pfiles.localindex import LocalIndex
from p2pfiles.membership import Membership
from p2pfiles.admission import ConnectionLimits
from p2pfiles.runtime import NoPolicy
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PFactory, P2PProtocol
from p2pfiles.session import RequestSession
from p2pfiles.status import StatusBoard
from p2pfiles.tls import TLS
from p2pfiles.waiting import Once
from p2pfiles.wire import FileEntry, Message

__all__ = ["Node", "NodeConfig", "EpochStore"]

# How often partial downloads are looked at for removal.
PART_SWEEP_INTERVAL = 24 * 3600.0


class NodeConfig:
    """
    Everything a node is started with.  See L{p2pfiles.tap.Options} for what
    each one means.
    """

    def __init__(
        self,
        id: int,
        address: str,
        peers: Dict[int, str],
        share: FilePath,
        state: FilePath,
        secret: bytes = b"",
        heartbeat: float = 0.25,
        leaderTimeout: float = 1.0,
        partMaxAge: float = 7 * 24 * 3600.0,
        certificate: Optional[NodeCertificate] = None,
        pins: Optional[Pins] = None,
        etcd: Sequence[str] = (),
        coordinatorPrefix: str = DEFAULT_PREFIX,
        leaseTTL: float = DEFAULT_TTL,
        maxConnections: Optional[int] = 512,
        maxConnectionsPerAddress: Optional[int] = 64,
        idleTimeout: Optional[float] = 60.0,
        maxMembers: Optional[int] = 64,
        forgetAfter: Optional[float] = 600.0,
        startGrace: float = 5.0,
    ) -> None:
        # certificate: the node's TLS identity; None to keep it in the state
        # directory (made there on the first start).  etcd: the endpoints
        # (HOST:PORT) of the etcd cluster that decides who leads; none for
        # the built-in election.
        self.id = id
        self.certificate = certificate
        self.pins = pins
        self.partMaxAge = partMaxAge
        self.address = address
        self.peers = dict(peers)
        self.share = share
        self.state = state
        self.secret = secret
        self.heartbeat = heartbeat
        self.leaderTimeout = leaderTimeout
        # Seconds a starting node waits to hear from every peer before it
        # may claim without them (never less than leaderTimeout).
        self.startGrace = startGrace
        self.etcd = tuple(etcd)
        self.coordinatorPrefix = coordinatorPrefix
        self.leaseTTL = leaseTTL
        # Caps on incoming connections: in all, and from one host.
        self.maxConnections = maxConnections
        self.maxConnectionsPerAddress = maxConnectionsPerAddress
        # Seconds a request connection may stay open with no request.
        self.idleTimeout = idleTimeout
        # Most members this node links to besides the configured ones.
        self.maxMembers = maxMembers
        # Seconds after which a learned member not alive is forgotten.
        self.forgetAfter = forgetAfter


def _stateIdentity(state: FilePath) -> NodeCertificate:
    identity = stateIdentity(state, create=True)
    assert identity is not None
    return identity


@implementer(IConnectionHandler)
class Incoming:
    """
    The first handler of a connection made to this node: once the handshake
    says what the connection is for, it hands the connection to a session
    of that kind.
    """

    def __init__(self, route: Callable[[P2PProtocol], Any]) -> None:
        self.route = route

    def connectionReady(self, connection: P2PProtocol) -> None:
        session = self.route(connection)
        connection.setHandler(session)
        session.connectionReady(connection)

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        raise AssertionError("messages reach the session, not the router")

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise AssertionError("raw data reaches the session, not the router")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        raise AssertionError("raw data reaches the session, not the router")

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        # Closed during the handshake: nothing was set up.
        pass


class Node(MultiService):
    """
    The node.  Its child services are its membership (with the links to its
    peers) and, while running, nothing else: the coordinator, indexes and
    fetcher are started and stopped by the node itself.
    """

    log = Logger()

    def __init__(
        self,
        config: NodeConfig,
        reactor: Any,
        runInThread: Optional[Callable[..., Deferred]] = None,
        useInotify: bool = True,
        security: Optional[IConnectionSecurity] = None,
        policy: Optional[Any] = None,
    ) -> None:
        """
        @param security: how the node secures its connections; by default
            TLS with C{config.certificate}, which it then needs.
        @param policy: the process's collector and thread-switch settings
            (a L{ProcessPolicy}), applied while the node runs; by default
            L{NoPolicy}, which changes nothing.
        """
        super().__init__()
        self.config = config
        self.id = config.id
        self.reactor = reactor
        if runInThread is None:

            def runInThread(f: Callable[..., Any], *args: Any) -> Deferred:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self.runInThread = runInThread
        self.policy = policy if policy is not None else NoPolicy()
        if security is None:
            if config.certificate is not None:
                security = TLS(config.certificate)
            else:
                # Made in the state directory on the first start, and
                # loaded from there afterwards: not before it is needed.
                security = TLS(source=lambda: _stateIdentity(config.state))
        self.security = security
        self.identity = LocalIdentity(
            "node", config.id, config.address, config.secret, "control", security, config.pins
        )
        self.scanObserver = self.policy.scanObserver()
        background = self.policy.backgroundThreads()
        # Scans and the keeper's lists and log: in threads of their own,
        # apart from the reactor's pool, where the policy gives them (see
        # BackgroundThreads).
        backgroundRun = background.runInThread if background is not None else runInThread
        self.localIndex = LocalIndex(
            config.share, config.state, reactor, runInThread=backgroundRun, useInotify=useInotify,
            observer=self.scanObserver, settle=self.policy.settleScan,
        )
        self.localIndex.subscribe(self._localChanges)
        self._localReady = Once()
        self.membership = Membership(config.id, config.address, self.identity, reactor, self._controlSession)
        self.membership.maxMembers = config.maxMembers
        self.membership.forgetAfter = config.forgetAfter
        self.membership.setServiceParent(self)
        self.coordinator: INodeCoordinator
        if config.etcd:
            # Members come from etcd; the node links to them for the index.
            self.coordinator = etcdCoordinator(
                reactor,
                config.etcd,
                config.coordinatorPrefix,
                config.leaseTTL,
                config.id,
                config.address,
                lambda: self.security.fingerprint,
                self.membership.learn,
            )
        else:
            self.coordinator = HeartbeatCoordinator(
                config.id,
                reactor,
                EpochStore(config.state),
                runInThread,
                self.membership.sendTo,
                self.membership.broadcast,
                self.membership.addressOf,
                config.heartbeat,
                config.leaderTimeout,
                knownPeers=config.peers,
                learn=self.membership.learn,
                fingerprintOf=self.membership.fingerprintOf,
                startGrace=config.startGrace,
            )
        self._joined = Once()
        self.keeper = IndexKeeper(
            config.id,
            config.address,
            config.state.child("peer_files.log"),
            reactor,
            backgroundRun,
            self.openRequest,
            viewPath=config.state.child(VIEW_NAME),
            ownNumbers=lambda: (self.localIndex.incarnation, self.localIndex.seq),
        )
        self.fetcher = Fetcher(
            config.id,
            config.share,
            reactor,
            config.secret,
            self.identity.withPurpose("request"),
            runInThread,
            self.leaderAddress,
            lambda: [a for m, a in sorted(self._liveMembers().items())],
            lambda name: self.localIndex.entries.get(name),
            self.localIndex.rescan,
        )
        self.membership.onLinkUp = self._linkUp
        self.membership.onLinkDown = self._linkDown
        self.membership.onLinkLost = self._linkLost
        self.membership.onChange = self._changed
        self.coordinator.subscribe(self._leadershipChanged)
        # Control messages: type -> function of (sender, message).
        self.controlHandlers: Dict[str, Callable[[int, Message], None]] = {
            "heartbeat": self.coordinator.heartbeatReceived,
            "stale": self.coordinator.staleReceived,
            "index-changed": self._indexChanged,
            "error": self._controlError,
        }
        self.context = RequestContext(self)
        self.factories: List[P2PFactory] = []
        self.board = StatusBoard(reactor, self.status, self._view, self.listing)
        self.membership.onRejected = self.board.rejected
        # Housekeeping at the heartbeat's pace: retry gathers that failed,
        # and notice members whose silence made them count as down.
        self._housekeeping = LoopingCall(self._housekeep)
        self._housekeeping.clock = reactor

    # Connections.

    def listeningFactory(self, factory: Optional[P2PFactory] = None) -> P2PFactory:
        """
        The factory for the node's listening port: one session per
        connection, routed by purpose once authenticated.  The node closes
        its connections when it stops.

        @param factory: a factory already listening (made before the node,
            to learn its port), to set up as this node's.
        """
        if factory is None:
            factory = P2PFactory(self.identity, None, self.reactor, listening=True)
        factory.identity = self.identity
        factory.handler = lambda: Incoming(self._route)
        factory.perConnection = True
        factory.onRejected = self.board.rejected
        factory.limits = ConnectionLimits(self.reactor, self.config.maxConnections, self.config.maxConnectionsPerAddress)
        self.factories.append(factory)
        return factory

    def _route(self, connection: P2PProtocol) -> Any:
        peer = connection.peer
        assert peer is not None
        if peer.role == "node" and peer.purpose == "control":
            return self._controlSession()
        return RequestSession(self.context, self.config.idleTimeout)

    def _controlSession(self) -> ControlSession:
        return ControlSession(self.controlHandlers, self._controlReady, self._controlClosed)

    def _controlReady(self, connection: P2PProtocol) -> bool:
        accepted = self.membership.controlReady(connection)
        self._changed()
        return accepted

    def _controlClosed(self, connection: P2PProtocol) -> None:
        self.membership.controlClosed(connection)

    # Life cycle.

    def startService(self) -> None:
        self.policy.start()
        self.config.share.makedirs(ignoreExistingDirectory=True)
        self.config.state.makedirs(ignoreExistingDirectory=True)
        if not self.config.secret:
            self.log.warn(
                "node {id} runs without a cluster secret: it listens on loopback only, and any local "
                "process can join; use --secret-file on shared machines",
                id=self.id,
            )
        for peer, address in sorted(self.config.peers.items()):
            self.membership.learn(peer, address, configured=True)
        # First, so that a corrupt epoch file stops the start here.  Joining
        # etcd takes a round trip or more; see whenJoined.
        self.coordinator.start().addBoth(self._joined.fire)
        super().startService()
        self._housekeeping.start(self.config.heartbeat, now=False)
        self.fetcher.startSweeping(self.config.partMaxAge, PART_SWEEP_INTERVAL)
        self.log.info(
            "node {id} up at {address} as {fingerprint} ({coordinator} coordinator, epoch {epoch}, peers {peers})",
            id=self.id,
            address=self.config.address,
            fingerprint=self.security.fingerprint,
            coordinator=self.coordinator.name,
            epoch=self.coordinator.epoch(),
            peers=", ".join(str(p) for p in sorted(self.config.peers)) or "none",
        )
        self.keeper.awaitOwnFiles()
        self.localIndex.start().addCallbacks(self._localStarted, self._localFailed)
        self.keeper.start()
        self.localIndex.whenVouched().addCallback(self.keeper.ownVouched).addErrback(
            lambda f: self.log.failure("cannot stand in for this node's files", f)
        )

    def stopService(self) -> Deferred:
        """
        Stop claiming and heartbeating first, then close every connection
        this node owns, incoming ones included, and cancel what is pending.
        """
        if self._housekeeping.running:
            self._housekeeping.stop()
        stopping = [self.coordinator.stop(), self.fetcher.stop()]
        stopping.append(super().stopService())
        stopping.append(self.membership.closeLinks())
        for factory in self.factories:
            stopping.append(factory.closeAll())
        stopped = self.localIndex.stop()
        if self.scanObserver is not None:
            # Once no scan runs, the child that hashed for them can go.
            stopped.addCallback(lambda _: self.runInThread(self.scanObserver.close))
        stopping.append(stopped)
        stopping.append(self.keeper.stop())
        self.context.stop()
        self.policy.stop()
        self._localReady.fire(Failure(P2PError("the node stopped", "unavailable")))
        return DeferredList(stopping, consumeErrors=True)

    # This node's own files.

    def _localStarted(self, ignored: object) -> None:
        self.log.info(
            "sharing {count} files from {share}", count=len(self.localIndex.entries), share=self.config.share.path
        )
        self.keeper.ownListed(list(self.localIndex.entries.values())).addErrback(
            lambda f: self.log.failure("cannot index this node's files", f)
        )
        self._localReady.fire(None)
        self._announceChanges()
        # The standby stands by from now on (see _leadershipChanged).
        self._leadershipChanged()

    def _localFailed(self, reason: Failure) -> None:
        self.log.failure("cannot index the share {share}", reason, share=self.config.share.path)
        self.keeper.ownListed([]).addErrback(lambda f: self.log.failure("cannot index this node's files", f))
        # Nobody waits for a first scan that will not come.
        self._localReady.fire(Failure(P2PError(f"cannot index the share {self.config.share.path}", "io")))
        self._leadershipChanged()

    def whenJoined(self) -> Deferred:
        """
        Fire once the coordinator has admitted this node (at once for the
        built-in election); fail with its L{CoordinatorError} if it refused
        (code C{conflict}: the id is taken) or could not be reached (code
        C{unavailable}).
        """
        return self._joined.wait()

    def whenLocalReady(self) -> Deferred:
        """
        Fire once the first scan of the share is done.
        """
        return self._localReady.wait()

    def _localChanges(self, changed: List[FileEntry], removed: List[str]) -> None:
        self.keeper.ownChanges(changed, removed)
        self._announceChanges()

    def _announceChanges(self) -> None:
        """
        Tell every member (a few bytes on each control link) that this
        node's files are at a new change number; whoever keeps the index
        asks for the change on a request connection.
        """
        local = self.localIndex
        self.membership.broadcast(
            Message("index-changed", epoch=self.coordinator.epoch(), incarnation=local.incarnation, seq=local.seq)
        )

    # Links and leadership.

    def _linkUp(self, member: int) -> None:
        self.coordinator.linkUp(member)
        if self._localReady.happened:
            # A notice sent before this link was up did not reach it.
            local = self.localIndex
            self.membership.sendTo(
                member,
                Message("index-changed", epoch=self.coordinator.epoch(), incarnation=local.incarnation, seq=local.seq),
            )
        self._changed()

    def _linkDown(self, member: int) -> None:
        self.coordinator.linkDown(member)
        if self.keeper.gathering:
            self.keeper.memberGone(member)
        self._changed()

    def _linkLost(self, member: int) -> None:
        # A notice may have been lost with the link that closed: ask the
        # member what changed (nothing, usually).
        self.keeper.lost(member)

    def _leadershipChanged(self) -> None:
        coordinator = self.coordinator
        if coordinator.stopping:
            # On the way out: lead nothing, keep nothing current.
            self.keeper.idle()
            return
        if self.keeper.epoch is not None and (not coordinator.isLeader() or self.keeper.epoch != coordinator.epoch()):
            self.keeper.resign()
        if coordinator.isLeader():
            if self.keeper.epoch is None:
                self._lead(coordinator.epoch())
        else:
            leader = coordinator.leader()
            if leader is not None:
                others = sorted(m for m in coordinator.members() if m != leader)
                if others and others[0] == self.id:
                    # A keeper already gathering has this node's files
                    # current (see _localChanges): packing them all again,
                    # on the reactor, at every change of the live members
                    # would hold up heartbeats.  _tick reconciles members.
                    # A node still scanning its own share first stands by
                    # once that is done (_localStarted): copying the others'
                    # lists meanwhile would slow its scan, on a start of
                    # the whole cluster when every node is busy.
                    if not self.keeper.gathering and self._localReady.happened:
                        self.keeper.standBy(list(self.localIndex.entries.values()), self._liveMembers())
                else:
                    self.keeper.idle()
        self._tick()

    def _housekeep(self) -> None:
        # Only this loop's ticks measure how late timers run.
        self.board.ticked(self.config.heartbeat)
        try:
            self.membership.sweep(self.coordinator.isLive)
        except Exception:
            self.log.failure("error forgetting silent members")
        self._tick()

    def _tick(self) -> None:
        try:
            if self.keeper.gathering:
                self.keeper.reconcile(self._liveMembers())
            if self.keeper.epoch is not None:
                self.board.metrics.filesIndexed(self.keeper.index.fileCount())
            self.board.countConnections(self._protocols())
            self._changed()
        except Exception:
            self.log.failure("error in the node's housekeeping")

    def maxTimerDelay(self) -> float:
        return self.board.maxTimerDelay()

    def _liveMembers(self) -> Dict[int, str]:
        return {m: info.address for m, info in self.coordinator.members().items() if m != self.id}

    def _lead(self, epoch: int) -> None:
        started = self.reactor.seconds()
        own = list(self.localIndex.entries.values())

        def gathered(members: List[int]) -> None:
            self.log.info(
                "index of epoch {epoch}: {files} files on {nodes} nodes, gathered in {ms:.0f} ms",
                epoch=epoch,
                files=self.keeper.index.fileCount(),
                nodes=len(self.keeper.index.nodes()),
                ms=(self.reactor.seconds() - started) * 1000,
            )

        self.keeper.lead(epoch, own, self._liveMembers()).addCallback(gathered)

    # Control messages.

    def _controlError(self, sender: int, message: Message) -> None:
        if self.membership.refusedBy(sender, message.code, message.reason):
            return  # our link to it backs off and reports the refusal
        self.log.warn(
            "node {sender} reports an error: {reason} ({code})", sender=sender, reason=message.reason, code=message.code
        )

    def _indexChanged(self, sender: int, message: Message) -> None:
        if self.coordinator.rejectStale(sender, message.epoch):
            return
        self.keeper.noticed(sender, message.incarnation, message.seq)

    def openRequest(self, address: str) -> Deferred:
        """
        A request connection to the node at C{address}, as this node.
        """
        return connect(self.reactor, address, self.config.secret, 10.0, self.identity.withPurpose("request"))

    # Status.

    def leaderAddress(self) -> Optional[str]:
        leader = self.coordinator.leader()
        return None if leader is None else self.membership.addressOf(leader)

    def isLeader(self) -> bool:
        return self.coordinator.isLeader()

    def status(self) -> Dict[str, Any]:
        """
        What C{p2pfiles status --json} prints.
        """
        coordinator = self.coordinator
        members = []
        for member in [self.id] + self.membership.ids():
            row = {
                "id": member,
                "address": self.membership.addressOf(member),
                "alive": member == self.id or coordinator.isLive(member),
            }
            fingerprint = self.membership.fingerprintOf(member) if member != self.id else None
            if fingerprint is not None:
                # Known once the member authenticated a link (this node's
                # own is the status's "fingerprint").
                row["fingerprint"] = fingerprint
            members.append(row)
        members.sort(key=lambda m: m["id"])
        return {
            "id": self.id,
            "address": self.config.address,
            "fingerprint": self.security.fingerprint,
            "role": coordinator.role(),
            "coordinator": coordinator.name,
            "leader": coordinator.leader(),
            "epoch": coordinator.epoch(),
            "members": members,
            "version": __version__,
            "max_timer_delay": round(self.maxTimerDelay(), 3),
            # Members whose side refused this node's link, and why.
            "refused": [
                {"id": member, "reason": reason} for member, reason in sorted(self.membership.refused.items())
            ],
            # Nodes refused here for claiming an id another node holds.
            "conflicts": self.membership.conflictList(),
        }

    def _protocols(self) -> List[P2PProtocol]:
        """
        Every connection this node holds.
        """
        protocols = [p for f in self.factories for p in f.protocols]
        protocols += [link for m in self.membership.members.values() for link in m.links if not link.incoming]
        return protocols

    def _view(self) -> Tuple[Any, ...]:
        """
        The part of the status whose changes are reported.
        """
        coordinator = self.coordinator
        return (
            coordinator.role(),
            coordinator.leader(),
            coordinator.epoch(),
            tuple((m, coordinator.isLive(m)) for m in self.membership.ids()),
        )

    def _changed(self) -> None:
        self.board.changed()

    @property
    def watching(self) -> int:
        """
        How many status watches are open.
        """
        return self.board.watching

    @property
    def transfers(self) -> Dict[Any, Any]:
        """
        The transfers in flight, by session.
        """
        return self.board.transfersInFlight

    def listing(self) -> Deferred:
        """
        What C{ls --json} prints when asked of this node: the leader's
        index, asked of the leader when this node follows.
        """
        if self.coordinator.isLeader():
            return succeed(self.keeper.index.listing())
        address = self.leaderAddress()
        if address is None:
            return fail(P2PError("no leader elected right now; try again shortly", "no-leader"))
        return Deferred.fromCoroutine(
            askListing(self.reactor, address, self.config.secret, 10.0, self.identity.withPurpose("request"))
        )
