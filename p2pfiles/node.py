"""
A p2pfiles node: its configuration, its members and control links, and the
wiring between the election, the index and file transfers.

L{Node} is the handler behind every connection's factory.  Protocols hand it
messages; it feeds the decisions to L{ElectionState} and the index objects,
and carries out their answers on the links.  It holds all of the node's
state; the protocols hold none.
"""

from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles import __version__
from p2pfiles.address import parseAddress
from p2pfiles.atomic import atomicWrite
from p2pfiles.election import LEADER, Claimed, ElectionState, Stale
from p2pfiles.gather import IndexKeeper
from p2pfiles.localindex import LocalIndex
from p2pfiles.protocol import LocalIdentity, P2PFactory, P2PProtocol, ProtocolViolation
from p2pfiles.client import EXIT_NO_LEADER, EXIT_REFUSED, ClientError, askLeader, connect, refusalFor
from p2pfiles.names import nameProblem
from p2pfiles.transfer import FileProducer, PartialFile, Relay, TransferError, download, openForServing
from p2pfiles.wire import FileEntry, Message, chunked, encode

# Reconnection to a peer: start fast, never wait much more than a second, so
# that a restarted peer is seen quickly.
RETRY_INITIAL = 0.1
RETRY_MAX = 1.0


class PeerLink(ClientService):
    """
    The control link to one peer, reconnecting for as long as the node runs.

    ClientService logs every retry at info level: once a second, forever,
    for a peer that is down.  The node logs the link going down and coming
    back instead, so only warnings and worse pass from here.
    """

    _log = Logger(
        observer=FilteringLogObserver(globalLogPublisher, [LogLevelFilterPredicate(LogLevel.warn)])
    )


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
    ) -> None:
        self.id = id
        self.address = address
        self.peers = dict(peers)
        self.share = share
        self.state = state
        self.secret = secret
        self.heartbeat = heartbeat
        self.leaderTimeout = leaderTimeout


class EpochStore:
    """
    The highest epoch this node has seen, kept in C{epoch} in the state
    directory so that a restart never reuses one.
    """

    def __init__(self, state: FilePath) -> None:
        self.path = state.child("epoch")

    def load(self) -> int:
        """
        Return the stored epoch (0 if none).  A file that is not a number is
        an error: starting from 0 could reuse an epoch.
        """
        if not self.path.exists():
            return 0
        text = self.path.getContent().strip()
        if not text.isdigit():
            raise ValueError(f"{self.path.path} does not hold an epoch number; remove it to start from 0")
        return int(text)

    def save(self, epoch: int) -> None:
        # A few bytes, written rarely: cheap enough to do on the reactor.
        atomicWrite(self.path, b"%d\n" % (epoch,))


class Member:
    """
    One other node as this node knows it: id, address, and its open control
    connections (ours to it, and its to us).
    """

    def __init__(self, id: int, address: str) -> None:
        self.id = id
        self.address = address
        self.links: Set[P2PProtocol] = set()
        self.service: Optional[ClientService] = None

    def link(self) -> Optional[P2PProtocol]:
        """
        The connection to send on: our own outgoing one if it is up.
        """
        best = None
        for link in self.links:
            if not link.listening:
                return link
            best = link
        return best


class Node(MultiService):
    """
    The node.  Its child services are the links to its peers.
    """

    log = Logger()

    def __init__(
        self,
        config: NodeConfig,
        reactor: Any,
        runInThread: Optional[Callable[..., Deferred]] = None,
        useInotify: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.id = config.id
        self.reactor = reactor
        if runInThread is None:

            def runInThread(f: Callable[..., Any], *args: Any) -> Deferred:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self.runInThread = runInThread
        self.localIndex = LocalIndex(
            config.share, config.state, reactor, runInThread=runInThread, useInotify=useInotify
        )
        self.localIndex.subscribe(self._localChanges)
        self._localReady = False
        self._localWaiters: List[Deferred] = []
        self.keeper = IndexKeeper(
            config.id,
            config.address,
            config.state.child("peer_files.log"),
            reactor,
            runInThread,
            self.sendTo,
        )
        self.identity = LocalIdentity("node", config.id, config.address, config.secret, "control")
        self.epochs = EpochStore(config.state)
        self.election = ElectionState(
            config.id,
            reactor,
            config.leaderTimeout,
            epoch=0,
            knownPeers=config.peers,
        )
        self.members: Dict[int, Member] = {}
        self._watchers: Set[P2PProtocol] = set()
        self._transfers: Dict[P2PProtocol, Any] = {}
        self._relayCount = 0
        self._heartbeats = LoopingCall(self._tick)
        self._heartbeats.clock = reactor
        self._lastTick: Optional[float] = None
        self._snapshot: Optional[Tuple[Any, ...]] = None
        self._savedEpoch = 0

    # Life cycle.

    def startService(self) -> None:
        self.config.share.makedirs(ignoreExistingDirectory=True)
        self.config.state.makedirs(ignoreExistingDirectory=True)
        self._savedEpoch = self.election.epoch = self.epochs.load()
        if not self.config.secret:
            self.log.warn(
                "node {id} runs without a cluster secret: any local process can join; "
                "use --secret-file on shared machines",
                id=self.id,
            )
        for peer, address in sorted(self.config.peers.items()):
            self._learn(peer, address)
        super().startService()
        self.log.info(
            "node {id} up at {address} (epoch {epoch}, peers {peers})",
            id=self.id,
            address=self.config.address,
            epoch=self.election.epoch,
            peers=", ".join(str(p) for p in sorted(self.config.peers)) or "none",
        )
        self._heartbeats.start(self.config.heartbeat, now=True)
        self.localIndex.start().addCallbacks(self._localStarted, self._localFailed)

    def stopService(self) -> Deferred:
        if self._heartbeats.running:
            self._heartbeats.stop()
        for watcher in list(self._watchers):
            watcher.transport.loseConnection()
        stopping = [
            super().stopService(),
            self.localIndex.stop(),
            self.keeper.stop(),
        ]
        return DeferredList(stopping, consumeErrors=True)

    # This node's own files.

    def _localStarted(self, ignored: object) -> None:
        self.log.info(
            "sharing {count} files from {share}", count=len(self.localIndex.entries), share=self.config.share.path
        )
        self._localReady = True
        if self.keeper.epoch is not None:
            self.keeper.ownChanges(list(self.localIndex.entries.values()), [])
        waiters, self._localWaiters = self._localWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _localFailed(self, reason: Failure) -> None:
        self.log.failure("cannot index the share {share}", reason, share=self.config.share.path)

    def whenLocalReady(self) -> Deferred:
        """
        Fire once the first scan of the share is done.
        """
        if self._localReady:
            return succeed(None)
        d: Deferred = Deferred()
        self._localWaiters.append(d)
        return d

    def _localChanges(self, changed: List[FileEntry], removed: List[str]) -> None:
        if self.keeper.epoch is not None:
            self.keeper.ownChanges(changed, removed)
            return
        leader = self.election.leader
        if leader is None or leader == self.id:
            return
        # Followers send only changes, tagged with the epoch; a change lost
        # in an election is covered by the new leader's full gather.
        parts = chunked(changed)
        gone = chunked(removed)
        for i in range(max(len(parts), len(gone))):
            self.sendTo(
                leader,
                Message(
                    "index-update",
                    epoch=self.election.epoch,
                    entries=parts[i] if i < len(parts) else [],
                    removed=gone[i] if i < len(gone) else [],
                ),
            )

    # Membership.

    def _learn(self, member: int, address: str) -> None:
        """
        Know of C{member} at C{address} and keep a control link to it.
        """
        if member == self.id or member in self.members:
            return
        self.members[member] = record = Member(member, address)
        self.election.peerKnown(member)
        try:
            host, port = parseAddress(address)
        except ValueError as e:
            self.log.warn("not linking to node {id}: {reason}", id=member, reason=str(e))
            return
        endpointType = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        factory = P2PFactory(self.identity, self, self.reactor, listening=False)
        factory.expectedNode = member
        record.service = PeerLink(
            endpointType(self.reactor, host, port, timeout=5),
            factory,
            retryPolicy=backoffPolicy(RETRY_INITIAL, RETRY_MAX, factor=2.0, jitter=lambda: 0.0),
            clock=self.reactor,
        )
        record.service.setServiceParent(self)
        self.log.info("linking to node {id} at {address}", id=member, address=address)

    def _isControl(self, connection: P2PProtocol) -> bool:
        peer = connection.peer
        return peer is not None and peer.role == "node" and peer.purpose == "control"

    def connectionReady(self, connection: P2PProtocol) -> None:
        peer = connection.peer
        assert peer is not None
        if not self._isControl(connection):
            return
        expected = getattr(connection.factory, "expectedNode", None)
        if peer.node == self.id:
            connection.refuse("conflict", f"node id {self.id} is already in use by the node at {self.config.address}")
            return
        if expected is not None and peer.node != expected:
            connection.refuse("conflict", f"expected node {expected} at this address, found node {peer.node}")
            return
        self._learn(peer.node, peer.address)
        member = self.members[peer.node]
        first = not member.links
        member.links.add(connection)
        if first:
            self.log.info("member {id} link up ({address})", id=peer.node, address=member.address)
            self._apply(self.election.memberUp(peer.node))
        connection.sendMessage(self._heartbeat())
        self._changed()

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        self._watchers.discard(connection)
        transfer = self._transfers.pop(connection, None)
        if isinstance(transfer, Relay):
            transfer.downstreamLost()
        peer = connection.peer
        if peer is None or not self._isControl(connection):
            return
        member = self.members.get(peer.node)
        if member is None or connection not in member.links:
            return
        member.links.discard(connection)
        if not member.links:
            self.log.info("member {id} link down ({address})", id=member.id, address=member.address)
            self._apply(self.election.memberDown(member.id))
            if self.keeper.epoch is not None:
                self.keeper.memberGone(member.id)
            self._changed()
        elif self.keeper.epoch is not None and (
            self.keeper.index.hasNode(member.id) or self.keeper.isGathering(member.id)
        ):
            # Index messages are not acknowledged: an update, a request or
            # its answer may have been lost with the link that closed.  Its
            # whole index again covers that.
            self.keeper.gather(member.id, member.address)

    # Messages.

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        handler = getattr(self, "_control_" + message.type.replace("-", "_"), None)
        if handler is not None:
            if not self._isControl(connection):
                raise ProtocolViolation(f"{message.type} is only accepted on control links")
            handler(connection.peer.node, connection, message)
            return
        handler = getattr(self, "request_" + message.type.replace("-", "_"), None)
        if handler is None:
            raise ProtocolViolation(f"unexpected {message.type} message")
        if message.type != "error":
            if self._isControl(connection):
                raise ProtocolViolation(f"{message.type} is not accepted on a control link")
            if connection in self._transfers:
                # Its bytes are on the wire: a reply now would land in them.
                raise ProtocolViolation(f"{message.type} sent during a transfer")
        handler(connection, message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise ProtocolViolation("unexpected raw data")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        pass

    def _control_heartbeat(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        if message.node != sender:
            raise ProtocolViolation(f"heartbeat names node {message.node} on node {sender}'s link")
        for member, address in message.members:
            self._learn(member, address)
        before = self._electionView(sender)
        self._apply(self.election.heartbeatReceived(sender, message.epoch, message.leader))
        # Most heartbeats change nothing; the tick catches what time changes.
        if self._electionView(sender) != before:
            self._changed()

    def _electionView(self, member: int) -> Tuple[Any, ...]:
        election = self.election
        return (election.role, election.leader, election.epoch, election.isLive(member))

    def _control_stale(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        self._apply(self.election.staleReceived(sender, message.epoch, message.leader))
        self._changed()

    def _rejectStale(self, sender: int, epoch: int) -> bool:
        """
        If C{epoch} is older than ours, log it, tell C{sender} the current
        epoch and leader, and return True: the message must not be acted on.
        """
        if epoch >= self.election.epoch:
            return False
        self.log.info(
            "rejected message from {sender}: stale epoch {old} < {current}",
            sender=sender,
            old=epoch,
            current=self.election.epoch,
        )
        self.sendTo(sender, Message("stale", epoch=self.election.epoch, leader=self.election.leader))
        return True

    def _control_index_request(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        epoch = message.epoch
        if self._rejectStale(sender, epoch):
            return
        if epoch != self.election.epoch or sender != self.election.leader:
            # A claim we have not heard yet: the leader asks again.
            return

        def send(ignored: object) -> None:
            if self.election.epoch != epoch or self.election.leader != sender:
                return
            entries = sorted(self.localIndex.entries.values(), key=lambda e: e.name)
            parts = chunked(entries)
            for i, part in enumerate(parts):
                # On the same link as later changes, so they cannot overtake it.
                self.sendTo(
                    sender,
                    Message(
                        "index-chunk",
                        epoch=epoch,
                        request=message.request,
                        entries=part,
                        last=i == len(parts) - 1,
                    ),
                )

        self.whenLocalReady().addCallback(send).addErrback(
            lambda reason: self.log.failure("cannot send the index to {leader}", reason, leader=sender)
        )

    def _control_index_chunk(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        self.keeper.chunkReceived(sender, message)

    def _control_index_update(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        if self._rejectStale(sender, message.epoch):
            return
        self.keeper.updateReceived(sender, self.members[sender].address, message)

    def request_error(self, connection: P2PProtocol, message: Message) -> None:
        self.log.warn(
            "{peer} reports an error: {reason} ({code})",
            peer=connection.describePeer(),
            reason=message.reason,
            code=message.code,
        )

    def request_status(self, connection: P2PProtocol, message: Message) -> None:
        connection.sendMessage(Message("state", status=self.status()))
        if message.watch:
            self._watchers.add(connection)

    def request_ls(self, connection: P2PProtocol, message: Message) -> None:
        if self.isLeader():
            parts = chunked(self.keeper.index.listing())
            for i, part in enumerate(parts):
                connection.sendMessage(Message("listing", files=part, last=i == len(parts) - 1))
        else:
            self._redirect(connection)

    def request_lookup(self, connection: P2PProtocol, message: Message) -> None:
        name = message.name
        if not self._checkName(connection, name):
            return
        if not self.isLeader():
            self._redirect(connection)
            return
        holders = self.keeper.index.holders(name)
        if not holders:
            connection.sendError("not-found", f"not found: {name}")
            return
        # The lowest id's copy names the content when holders disagree.
        entry = holders[0][2]
        connection.sendMessage(
            Message(
                "found",
                name=name,
                size=entry.size,
                sha256=entry.sha256,
                holders=[node for node, _, e in holders if e.sha256 == entry.sha256],
            )
        )

    def _checkName(self, connection: P2PProtocol, name: str) -> bool:
        problem = nameProblem(name)
        if problem is not None:
            connection.sendError("bad-name", f"bad file name {name!r}: {problem}")
            return False
        return True

    def request_get(self, connection: P2PProtocol, message: Message) -> None:
        if connection in self._watchers:
            raise ProtocolViolation("get on a connection that is watching status")
        name = message.name
        if not self._checkName(connection, name):
            return
        assert connection.peer is not None
        entry = self.localIndex.entries.get(name)
        mine = entry is not None and message.sha256 in (None, entry.sha256)
        if mine and (self.isLeader() or connection.peer.role == "node"):
            self._serveLocal(connection, entry, message.offset)
            return
        if not self.isLeader():
            if connection.peer.role == "node" and connection.peer.node == self.election.leader:
                # Our leader relaying from us: it should look elsewhere.
                connection.sendError("not-found", f"not found: {name} (node {self.id} does not have it)")
            else:
                self._redirect(connection)
            return
        candidates = [
            (node, address, e)
            for node, address, e in self.keeper.index.holders(name, message.sha256)
            if node != self.id and self.election.isLive(node)
        ]
        if not candidates:
            connection.sendError("not-found", f"not found: {name}")
            return
        # The lowest id's copy names the content when holders disagree; any
        # holder of that same content can serve it.
        content = candidates[0][2]
        holders = [(node, address) for node, address, e in candidates if e.sha256 == content.sha256]
        if message.offset > content.size:
            connection.sendError(
                "bad-offset", f"offset {message.offset} is beyond the size of {name} ({content.size} bytes)"
            )
            return
        # Spread relays over the holders.
        start = self._relayCount % len(holders)
        self._relayCount += 1
        relay = Relay(
            connection,
            name,
            content.sha256,
            content.size,
            message.offset,
            holders[start:] + holders[:start],
            self._openUpstream,
            self.id,
            clock=self.reactor,
        )
        self._track(connection, relay, relay.start(), f"relay of {name}")

    def _openUpstream(self, address: str) -> Deferred:
        return connect(
            self.reactor, address, self.config.secret, 10.0, self.identity.withPurpose("request")
        )

    def _serveLocal(self, connection: P2PProtocol, entry: FileEntry, offset: int) -> None:
        try:
            f = openForServing(self.config.share, entry.name, entry.size, offset)
        except TransferError as e:
            connection.sendError(e.code, str(e))
            return
        except OSError as e:
            connection.sendError("not-found", f"cannot open {entry.name}: {e.strerror or e}")
            return
        connection.sendMessage(
            Message(
                "file",
                name=entry.name,
                size=entry.size,
                sha256=entry.sha256,
                offset=offset,
                holder=self.id,
                leader=self.election.leader if self.election.leader is not None else self.id,
            )
        )
        producer = FileProducer(f, entry.size - offset, connection.transport)
        done = producer.start()

        def failed(reason: Failure) -> Failure:
            # Mid-file no frame can say why: close, so that the receiver
            # notices at once and resumes (or the relay fails over).
            if not (reason.check(TransferError) and reason.value.code == "gone"):
                connection.transport.loseConnection()
            return reason

        done.addErrback(failed)
        self._track(connection, producer, done, f"sending {entry.name}")

    def _track(self, connection: P2PProtocol, transfer: Any, done: Deferred, what: str) -> None:
        """
        Remember a transfer running on C{connection} until it ends, and log
        how it ended.
        """
        self._transfers[connection] = transfer
        started = self.reactor.seconds()

        def ended(result: Any) -> None:
            self._transfers.pop(connection, None)
            if isinstance(result, Failure):
                self.log.warn("{what} to {peer} failed: {reason}", what=what, peer=connection.describePeer(), reason=result.getErrorMessage())
            else:
                self.log.info(
                    "{what} to {peer}: {bytes} bytes in {s:.2f}s",
                    what=what,
                    peer=connection.describePeer(),
                    bytes=result,
                    s=self.reactor.seconds() - started,
                )

        done.addBoth(ended)

    def request_fetch(self, connection: P2PProtocol, message: Message) -> None:
        name = message.name
        if not self._checkName(connection, name):
            return
        d = Deferred.fromCoroutine(self._fetch(name, message.overwrite))

        def fetched(reply: Message) -> None:
            connection.sendMessage(reply)

        def failed(reason: Failure) -> None:
            if reason.check(ClientError):
                code = reason.value.refusal or refusalFor(reason.value.code)
                connection.sendError(code, str(reason.value))
            else:
                self.log.failure("fetch of {name} failed", reason, name=name)
                connection.sendError("internal", f"fetch of {name} failed: {reason.getErrorMessage()}")

        d.addCallbacks(fetched, failed)

    async def _fetch(self, name: str, overwrite: bool) -> Message:
        """
        Get C{name} from the leader into this node's share, as the original
        system's node-to-leader request did.
        """
        leader = self.leaderAddress()
        if leader is None:
            raise ClientError("no leader elected right now; try again shortly", EXIT_NO_LEADER, "no-leader")
        identity = self.identity.withPurpose("request")
        connection, found = await askLeader(self.reactor, leader, self.config.secret, Message("lookup", name=name), 10.0, identity)
        connection.close()
        mine = self.localIndex.entries.get(name)
        if mine is None and self.config.share.child(name).exists():
            await self.localIndex.rescan()
            mine = self.localIndex.entries.get(name)
        if mine is not None and mine.sha256 == found.sha256:
            return Message("fetched", name=name, size=mine.size, sha256=mine.sha256, already=True)
        if mine is not None and not overwrite:
            raise ClientError(
                f"{name} already exists on node {self.id} with other content; use --overwrite to replace it",
                EXIT_REFUSED,
                "conflict",
            )
        addresses = [leader] + [a for m, a in sorted(self._liveMembers().items()) if a != leader]
        sink = PartialFile(self.config.share, name)
        summary = await download(
            self.reactor, name, sink, addresses, self.config.secret, self.runInThread, identity
        )
        self.log.info(
            "fetched {name} ({size} bytes) via {via} in {seconds:.2f}s",
            name=name,
            size=summary["size"],
            via=summary["via"],
            seconds=summary["seconds"],
        )
        await self.localIndex.rescan()
        return Message("fetched", name=name, size=summary["size"], sha256=summary["sha256"], already=False)

    def _redirect(self, connection: P2PProtocol) -> None:
        """
        Point a client at the leader, or tell it there is none right now.
        """
        address = self.leaderAddress()
        leader = self.election.leader
        if leader is None or address is None:
            connection.sendError("no-leader", "no leader elected right now; try again shortly")
        else:
            connection.sendMessage(Message("redirect", leader=leader, address=address))

    # The election's answers.

    def _apply(self, actions: List[object]) -> None:
        if self.election.epoch > self._savedEpoch:
            self._saveEpoch(self.election.epoch)
        for action in actions:
            if isinstance(action, Stale):
                self.sendTo(action.to, Message("stale", epoch=action.epoch, leader=action.leader))
            elif isinstance(action, Claimed):
                self._broadcastHeartbeat()
                self._lead(action.epoch)
        if self.keeper.epoch is not None and (
            not self.isLeader() or self.keeper.epoch != self.election.epoch
        ):
            self.keeper.resign()

    def _liveMembers(self) -> Dict[int, str]:
        return {m: self.members[m].address for m in self.election.liveMembers() if m != self.id}

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

    def _saveEpoch(self, epoch: int) -> None:
        try:
            self.epochs.save(epoch)
        except OSError as e:
            self.log.error("cannot save epoch {epoch}: {reason}", epoch=epoch, reason=e.strerror or str(e))
        else:
            self._savedEpoch = epoch

    def sendTo(self, member: int, message: Message) -> bool:
        record = self.members.get(member)
        link = record.link() if record is not None else None
        if link is None:
            return False
        link.sendMessage(message)
        return True

    def _heartbeat(self) -> Message:
        members = [(self.id, self.config.address)] + [
            (m, self.members[m].address) for m in self.election.liveMembers() if m != self.id
        ]
        return Message(
            "heartbeat",
            node=self.id,
            epoch=self.election.epoch,
            leader=self.election.leader,
            members=members,
        )

    def _broadcastHeartbeat(self) -> None:
        # Encoded once for every member: this runs each tick on each link.
        heartbeat = encode(self._heartbeat())
        for member in self.members.values():
            link = member.link()
            if link is not None:
                link.sendEncoded(heartbeat)

    def _tick(self) -> None:
        # The heartbeat loop must outlive any bug in one tick: a LoopingCall
        # whose function raises stops for good, and the node would go silent.
        try:
            self._tickOnce()
        except Exception:
            self.log.failure("error in the heartbeat tick")

    def _tickOnce(self) -> None:
        now = self.reactor.seconds()
        if self._lastTick is not None and now - self._lastTick > self.config.leaderTimeout + self.config.heartbeat:
            self.log.warn(
                "timers ran {late:.1f}s late (process suspended?): hearing from members afresh",
                late=now - self._lastTick - self.config.heartbeat,
            )
            self._apply(self.election.resumed())
        self._lastTick = now
        self._apply(self.election.tick())
        self._broadcastHeartbeat()
        if self.keeper.epoch is not None:
            self.keeper.reconcile(self._liveMembers())
        self._changed()

    # Status.

    def leaderAddress(self) -> Optional[str]:
        leader = self.election.leader
        if leader is None:
            return None
        if leader == self.id:
            return self.config.address
        member = self.members.get(leader)
        return member.address if member is not None else None

    def isLeader(self) -> bool:
        return self.election.role == LEADER

    def status(self) -> Dict[str, Any]:
        """
        What C{p2pfiles status --json} prints.
        """
        members = [{"id": self.id, "address": self.config.address, "alive": True}]
        for member in sorted(self.members):
            members.append(
                {
                    "id": member,
                    "address": self.members[member].address,
                    "alive": self.election.isLive(member),
                }
            )
        members.sort(key=lambda m: m["id"])
        return {
            "id": self.id,
            "address": self.config.address,
            "role": self.election.role,
            "leader": self.election.leader,
            "epoch": self.election.epoch,
            "members": members,
            "version": __version__,
        }

    def _changed(self) -> None:
        """
        Tell watchers (and the log) when role, leader, epoch or membership
        changed since the last look.
        """
        snapshot = (
            self.election.role,
            self.election.leader,
            self.election.epoch,
            tuple((m, self.election.isLive(m)) for m in sorted(self.members)),
        )
        if snapshot == self._snapshot:
            return
        previous = self._snapshot
        self._snapshot = snapshot
        if previous is not None:
            before = dict(previous[3])
            for member, alive in snapshot[3]:
                # A newly learned member is only worth a line once it is up.
                if before.get(member, False) != alive:
                    self.log.info(
                        "member {id} is {state}", id=member, state="alive" if alive else "down"
                    )
        if self._watchers:
            state = Message("state", status=self.status())
            for watcher in list(self._watchers):
                watcher.sendMessage(state)
