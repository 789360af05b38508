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
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles import __version__
from p2pfiles.atomic import atomicWrite
from p2pfiles.election import CANDIDATE, LEADER, Claimed, ElectionState, Stale
from p2pfiles.protocol import LocalIdentity, P2PFactory, P2PProtocol, ProtocolViolation
from p2pfiles.wire import Message

# Reconnection to a peer: start fast, never wait much more than a second, so
# that a restarted peer is seen quickly.
RETRY_INITIAL = 0.1
RETRY_MAX = 1.0


def formatAddress(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parseAddress(text: str) -> Tuple[str, int]:
    """
    Split C{HOST:PORT} (or C{[V6HOST]:PORT}) into host and port; raise
    L{ValueError} with a one-line reason if it is not one.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} has no valid port")
    return host, int(port)


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

    def __init__(self, config: NodeConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.id = config.id
        self.reactor = reactor
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
        self._heartbeats = LoopingCall(self._tick)
        self._heartbeats.clock = reactor
        self._lastTick: Optional[float] = None
        self._snapshot: Optional[Tuple[Any, ...]] = None
        self._savedEpoch = 0
        self._leadershipHooks: List[Callable[[int], None]] = []

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

    def stopService(self) -> Deferred:
        if self._heartbeats.running:
            self._heartbeats.stop()
        for watcher in list(self._watchers):
            watcher.transport.loseConnection()
        return super().stopService()

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
        record.service = ClientService(
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
            self._changed()

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
        self._apply(self.election.heartbeatReceived(sender, message.epoch, message.leader))
        self._changed()

    def _control_stale(self, sender: int, connection: P2PProtocol, message: Message) -> None:
        self._apply(self.election.staleReceived(sender, message.epoch, message.leader))
        self._changed()

    def request_status(self, connection: P2PProtocol, message: Message) -> None:
        connection.sendMessage(Message("state", status=self.status()))
        if message.watch:
            self._watchers.add(connection)

    # The election's answers.

    def _apply(self, actions: List[object]) -> None:
        if self.election.epoch > self._savedEpoch:
            self._saveEpoch(self.election.epoch)
        for action in actions:
            if isinstance(action, Stale):
                self.sendTo(action.to, Message("stale", epoch=action.epoch, leader=action.leader))
            elif isinstance(action, Claimed):
                self._broadcastHeartbeat()
                for hook in self._leadershipHooks:
                    hook(action.epoch)

    def _saveEpoch(self, epoch: int) -> None:
        try:
            self.epochs.save(epoch)
        except OSError as e:
            self.log.error("cannot save epoch {epoch}: {reason}", epoch=epoch, reason=e.strerror or str(e))
        else:
            self._savedEpoch = epoch

    def onLeadership(self, hook: Callable[[int], None]) -> None:
        """
        Call C{hook(epoch)} each time this node becomes leader.
        """
        self._leadershipHooks.append(hook)

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
        heartbeat = self._heartbeat()
        for member in self.members:
            self.sendTo(member, heartbeat)

    def _tick(self) -> None:
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
