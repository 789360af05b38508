"""
Tests for L{p2pfiles.node}: status, membership over control links, the
election's wiring, heartbeats, the stored epoch, status watchers and the
request handlers, with a L{MemoryReactorClock} and in-memory connections.
"""

import json
import random
from struct import pack
from typing import Any, Callable, Dict, List, Optional, Tuple

from zope.interface import implementer

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import ConnectionCompleter, FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import __version__, auth, external
from p2pfiles.context import LISTING_KEPT
from p2pfiles.coordinator import CoordinatorError
from p2pfiles.external import ExternalCoordinator
from p2pfiles.node import Node, NodeConfig
from p2pfiles.election import ElectionState
from p2pfiles.heartbeat import HeartbeatCoordinator
from p2pfiles.membership import Membership, PeerLink
from p2pfiles.session import RequestSession
from p2pfiles.status import StatusBoard
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PFactory, P2PProtocol
from p2pfiles.wire import SCHEMAS, FileEntry, Message, decode
from p2pfiles.tls import TLS
from tests.channels import PLAIN, PLAIN_FINGERPRINT, certificate, plainIdentity
from tests.frames import frame, hello, parseFrames, proofFor, rawFrame
from tests.test_external import FakeCoordinator

HEARTBEAT = 0.25
LEADER_TIMEOUT = 1.0


def address(node: int) -> str:
    return f"127.0.0.1:{9000 + node}"


def inline(f: Any, *args: Any) -> Deferred:
    """
    Run "threaded" work at once, on the calling thread.
    """
    return maybeDeferred(f, *args)


def heartbeat(node: int, epoch: int, leader: Optional[int], members: Optional[List[Tuple[int, str]]] = None) -> Message:
    if members is None:
        members = [(node, address(node))]
    return Message("heartbeat", node=node, epoch=epoch, leader=leader, members=members)


def nodeIdentity(node: int, purpose: str = "control") -> LocalIdentity:
    return plainIdentity("node", node, address(node), b"", purpose)


CLIENT = plainIdentity("client", None, None, b"", "request")


@implementer(IConnectionHandler)
class RecordingHandler:
    """
    The far end's handler: records every message and whether it closed.
    """

    def __init__(self) -> None:
        self.messages: List[Message] = []
        self.ready = 0
        self.closed = 0
        self.connection: Optional[P2PProtocol] = None

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.ready += 1
        self.connection = connection

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        self.messages.append(message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise AssertionError("no raw data expected")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        pass

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        self.closed += 1

    def of(self, type: str) -> List[Message]:
        return [m for m in self.messages if m.type == type]


class Link:
    """
    A connection to the node under test from a far end with C{identity},
    joined by L{twisted.test.iosim} so that the real handshake runs.
    """

    def __init__(self, harness: "Harness", identity: LocalIdentity, number: int) -> None:
        self.handler = RecordingHandler()
        here = IPv4Address("TCP", "127.0.0.1", 9000 + harness.node.id)
        there = IPv4Address("TCP", "127.0.0.1", 40000 + number)
        if harness.tls:
            # Real TLS in memory: the far end presents a certificate of its own.
            built: List[P2PProtocol] = []
            security = TLS(certificate(("far end", identity.role, identity.node)))
            identity = LocalIdentity(
                identity.role, identity.node, identity.address, identity.secret, identity.purpose, security, identity.pins
            )
            far = P2PFactory(identity, self.handler, harness.reactor, listening=False)
            far.buildProtocol = lambda addr: built.append(P2PFactory.buildProtocol(far, addr)) or built[-1]
            server = harness.node.security.serverFactory(harness.factory, harness.reactor).buildProtocol(there)
            client = security.clientFactory(far, harness.reactor).buildProtocol(here)
            (self.client,) = built
        else:
            server = harness.factory.buildProtocol(None)
            client = self.client = P2PProtocol(identity, self.handler, harness.reactor, listening=False)
        self.serverTransport = FakeTransport(server, isServer=True, hostAddress=here, peerAddress=there)
        self.clientTransport = FakeTransport(client, isServer=False, hostAddress=there, peerAddress=here)
        self.pump: IOPump = connect(
            server, self.serverTransport, client, self.clientTransport, greet=True, clock=harness.reactor
        )

    @property
    def isClosed(self) -> bool:
        return self.handler.closed > 0

    def send(self, *messages: Message) -> None:
        for message in messages:
            self.client.sendMessage(message)
        self.pump.flush()

    def close(self) -> None:
        self.clientTransport.loseConnection()
        self.pump.flush()

    def errors(self) -> List[Tuple[str, str]]:
        return [(m.code, m.reason) for m in self.handler.of("error")]


def forwardingLogger(events: List[dict]) -> Logger:
    """
    A logger that keeps its events in C{events} and still passes them on
    (so that trial sees any logged failure).
    """

    def observe(event: dict) -> None:
        events.append(event)
        globalLogPublisher(event)

    return Logger(observer=observe)


class Harness:
    """
    One L{Node} on a L{MemoryReactorClock}, its listening factory, and every
    connection a test makes to it; all of it torn down in the test's
    cleanup, which also checks that the node left no timer behind.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        node: int = 1,
        peers: Optional[Dict[int, str]] = None,
        state: Optional[FilePath] = None,
        files: Optional[Dict[str, bytes]] = None,
        tls: bool = False,
        etcd: Optional[FakeCoordinator] = None,
        at: Optional[str] = None,
        share: Optional[FilePath] = None,
        runInThread: Callable[..., Deferred] = inline,
    ) -> None:
        """
        @param at: the node's address (by default 127.0.0.1:9000+node).
        @param tls: secure the node's connections with real TLS (in memory)
            rather than the plain test channel.
        @param share: the share directory (a new one, holding C{files}, if
            None).
        @param etcd: the coordinator the node gets when configured for etcd
            (in place of an L{EtcdCoordinator}); the built-in one if None.
        """
        self.case = case
        self.tls = tls
        self.reactor = MemoryReactorClock()
        base = FilePath(case.mktemp())
        if share is None:
            share = base.child("files")
            share.makedirs()
        for name, data in (files or {}).items():
            share.child(name).setContent(data)
        self.config = NodeConfig(
            id=node,
            address=at or address(node),
            peers=peers or {},
            share=share,
            state=state if state is not None else base.child("state"),
            heartbeat=HEARTBEAT,
            leaderTimeout=LEADER_TIMEOUT,
            etcd=["127.0.0.1:2379"] if etcd is not None else [],
        )
        if etcd is not None:
            case.patch(external, "EtcdCoordinator", lambda *args: etcd)
        security = TLS(certificate(("node", node))) if tls else PLAIN
        self.node = Node(self.config, self.reactor, runInThread=runInThread, useInotify=False, security=security)
        self.factory = self.node.listeningFactory()
        self.links: List[Link] = []
        self.pumps: List[IOPump] = []
        self.byHand: List[P2PProtocol] = []
        self.events: List[dict] = []
        # What the node and its parts log.
        for part in (
            Node, Membership, PeerLink, HeartbeatCoordinator, ExternalCoordinator, ElectionState, RequestSession, StatusBoard
        ):
            case.patch(part, "log", forwardingLogger(self.events))
        self.protocolEvents: List[dict] = []
        case.patch(P2PProtocol, "log", forwardingLogger(self.protocolEvents))
        case.addCleanup(self.tearDown)

    def start(self) -> "Harness":
        self.node.startService()
        return self

    def lines(self) -> List[str]:
        """
        Everything the node logged, formatted.
        """
        return [formatEvent(e) for e in self.events]

    def drops(self) -> List[str]:
        """
        The warnings connections logged (drops and refusals).
        """
        return [formatEvent(e) for e in self.protocolEvents if e["log_level"].name in ("warn", "error", "critical")]

    def link(self, identity: LocalIdentity) -> Link:
        link = Link(self, identity, len(self.links))
        self.links.append(link)
        return link

    def peer(self, node: int, purpose: str = "control") -> Link:
        return self.link(nodeIdentity(node, purpose))

    def client(self) -> Link:
        return self.link(CLIENT)

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass, then deliver whatever was sent meanwhile.
        """
        self.reactor.advance(seconds)
        self.flush()

    def flush(self) -> None:
        for pump in [link.pump for link in self.links] + self.pumps:
            pump.flush()

    def complete(self) -> IOPump:
        """
        Complete the node's oldest pending outgoing connection to whatever
        listens on its port in the memory reactor.
        """
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        self.case.assertIsNotNone(pump)
        self.pumps.append(pump)
        pump.flush()
        return pump

    def openByHand(self, identity: LocalIdentity) -> Tuple[P2PProtocol, StringTransport]:
        """
        A listening protocol of the node over a L{StringTransport}, taken
        through the handshake by hand as C{identity}; what the node wrote
        after the handshake is left in the transport.
        """
        protocol = self.factory.buildProtocol(None)
        transport = self.fresh(protocol)
        mine = hello(identity, auth.makeNonce())
        protocol.dataReceived(frame(mine))
        (answer, proof) = parseFrames(transport.value())
        self.case.assertEqual(proof.proof, proofFor(b"", auth.LISTENER, mine, answer))
        transport.clear()
        protocol.dataReceived(frame(Message("auth", proof=proofFor(b"", auth.CONNECTOR, mine, answer))))
        self.case.assertEqual(parseFrames(transport.value())[0].type, "ready")
        return protocol, transport

    def fresh(self, protocol: P2PProtocol) -> StringTransport:
        """
        Connect C{protocol} to a new L{StringTransport}; it is closed in the
        cleanup if the test does not close it.
        """
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9000 + self.node.id),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000 + len(self.byHand)),
        )
        protocol.makeConnection(transport)
        self.byHand.append(protocol)
        return transport

    def closeByHand(self, protocol: P2PProtocol) -> None:
        if not protocol.closed:
            protocol.connectionLost(Failure(ConnectionDone()))

    def tearDown(self) -> None:
        for link in self.links:
            if not link.isClosed:
                link.close()
        for protocol in self.byHand:
            self.closeByHand(protocol)
        if self.node.running:
            stopped = self.node.stopService()
            self.flush()
            self.case.successResultOf(stopped)
        self.case.assertEqual(self.reactor.getDelayedCalls(), [], "the node left timers behind")


class StatusTests(SynchronousTestCase):
    """
    L{Node.status}: what C{p2pfiles status --json} prints.
    """

    def test_beforeStart(self) -> None:
        """
        Before it starts a node is a candidate in epoch 0 with no leader,
        and lists itself, alive; it names its coordinator (the built-in
        election) and no timer has run late yet.
        """
        harness = Harness(self, node=1)
        self.assertEqual(
            harness.node.status(),
            {
                "id": 1,
                "address": "127.0.0.1:9001",
                "role": "candidate",
                "coordinator": "builtin",
                "leader": None,
                "epoch": 0,
                "members": [{"id": 1, "address": "127.0.0.1:9001", "alive": True}],
                "version": __version__,
                "fingerprint": PLAIN_FINGERPRINT,
                "coordinator": "builtin",
                "max_timer_delay": 0.0,
                "refused": [],
                "conflicts": [],
            },
        )

    def test_memberFingerprints(self) -> None:
        """
        The status names the node's own certificate fingerprint, and each
        member's once one of its links has authenticated it: a configured
        peer that never connected has none.
        """
        harness = Harness(self, node=1, peers={3: address(3)}).start()
        harness.peer(2)
        harness.flush()
        members = {m["id"]: m for m in harness.node.status()["members"]}
        self.assertEqual(harness.node.status()["fingerprint"], PLAIN_FINGERPRINT)
        self.assertEqual(members[2]["fingerprint"], PLAIN_FINGERPRINT)
        self.assertNotIn("fingerprint", members[3])
        self.assertNotIn("fingerprint", members[1])

    def test_loneNodeLeadsAtOnce(self) -> None:
        """
        A node with no peers leads epoch 1 as soon as it starts, and stays
        leader of that epoch as time passes.
        """
        harness = Harness(self, node=1).start()
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("leader", 1, 1))
        self.assertTrue(harness.node.isLeader())
        harness.advance(10 * LEADER_TIMEOUT)
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("leader", 1, 1))
        self.assertEqual(status["members"], [{"id": 1, "address": "127.0.0.1:9001", "alive": True}])
        self.assertEqual(status["version"], __version__)
        self.assertEqual(harness.node.leaderAddress(), "127.0.0.1:9001")

    def test_nodeZeroLeads(self) -> None:
        """
        Node 0 is a real id: alone, it leads.
        """
        harness = Harness(self, node=0).start()
        self.assertEqual((harness.node.status()["role"], harness.node.status()["leader"]), ("leader", 0))

    def test_waitsForConfiguredPeers(self) -> None:
        """
        A node that knows of peers lists them, not alive, and does not claim
        before it has heard from them or the start grace (longer than the
        leader timeout) has passed; then it leads, as the smallest live id.
        """
        harness = Harness(self, node=2, peers={1: address(1), 3: address(3)}).start()
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("candidate", None, 0))
        self.assertEqual(
            [(m["id"], m["address"], m["alive"]) for m in status["members"]],
            [(1, "127.0.0.1:9001", False), (2, "127.0.0.1:9002", True), (3, "127.0.0.1:9003", False)],
        )
        self.assertEqual(harness.node.leaderAddress(), None)
        self.assertGreater(harness.config.startGrace, LEADER_TIMEOUT)
        harness.advance(LEADER_TIMEOUT)
        self.assertEqual(harness.node.status()["role"], "candidate")
        for _ in range(round((harness.config.startGrace - LEADER_TIMEOUT) / HEARTBEAT)):
            harness.advance(HEARTBEAT)
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("leader", 2, 1))

    def test_linksToConfiguredPeers(self) -> None:
        """
        Starting, a node opens a control link attempt to each configured
        peer's address.
        """
        harness = Harness(self, node=2, peers={1: address(1), 3: address(3)}).start()
        # Control links to both (and, as the standby, request connections
        # to ask for their files).
        self.assertEqual(
            {(host, port) for host, port, *_ in harness.reactor.tcpClients},
            {("127.0.0.1", 9001), ("127.0.0.1", 9003)},
        )


class MembershipTests(SynchronousTestCase):
    """
    Control links from other nodes make them members; heartbeats keep them
    alive; a closed link or silence takes them down.
    """

    def test_linkUp(self) -> None:
        """
        An authenticated control link from node 2 makes it a member, tells
        the election it is up, is logged, and is answered with a heartbeat at
        once; node 2 counts as alive only once it has been heard from.
        """
        harness = Harness(self, node=1).start()
        ups: List[int] = []
        memberUp = harness.node.coordinator.election.memberUp
        self.patch(harness.node.coordinator.election, "memberUp", lambda m: (ups.append(m), memberUp(m))[1])
        peer = harness.peer(2)
        self.assertEqual(peer.handler.ready, 1)
        self.assertIn(2, harness.node.membership.members)
        self.assertEqual(harness.node.membership.members[2].address, "127.0.0.1:9002")
        self.assertEqual(ups, [2])
        self.assertIn("member 2 link up (127.0.0.1:9002)", harness.lines())
        (first,) = peer.handler.of("heartbeat")
        self.assertEqual((first.node, first.epoch, first.leader), (1, 1, 1))
        self.assertEqual(
            [(m["id"], m["alive"]) for m in harness.node.status()["members"]], [(1, True), (2, False)]
        )

    def test_heartbeatMakesAlive(self) -> None:
        """
        After node 2's heartbeat, status shows it alive and the election
        counts it live.
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(2)
        peer.send(heartbeat(2, 1, 1))
        self.assertEqual(
            [(m["id"], m["address"], m["alive"]) for m in harness.node.status()["members"]],
            [(1, "127.0.0.1:9001", True), (2, "127.0.0.1:9002", True)],
        )
        self.assertEqual(harness.node.coordinator.election.liveMembers(), [1, 2])
        self.assertEqual(harness.node.status()["leader"], 1)

    def test_linkDown(self) -> None:
        """
        Closing node 2's only control link logs "member 2 link down", and
        status then shows it not alive (but still known).
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(2)
        peer.send(heartbeat(2, 1, 1))
        peer.close()
        self.assertIn("member 2 link down (127.0.0.1:9002)", harness.lines())
        self.assertEqual(
            [(m["id"], m["alive"]) for m in harness.node.status()["members"]], [(1, True), (2, False)]
        )
        self.assertEqual(harness.node.membership.members[2].links, set())
        self.assertEqual(harness.node.coordinator.election.liveMembers(), [1])

    def test_downOnlyWhenLastLinkCloses(self) -> None:
        """
        With two control links from node 2, closing one keeps it a live
        member; closing both takes it down.
        """
        harness = Harness(self, node=1).start()
        first, second = harness.peer(2), harness.peer(2)
        first.send(heartbeat(2, 1, 1))
        first.close()
        self.assertNotIn("member 2 link down (127.0.0.1:9002)", harness.lines())
        self.assertTrue(harness.node.coordinator.election.isLive(2))
        second.close()
        self.assertIn("member 2 link down (127.0.0.1:9002)", harness.lines())
        self.assertFalse(harness.node.coordinator.election.isLive(2))

    def test_keeperAsksAgainAfterLosingOneLink(self) -> None:
        """
        When one of a member's links closes, the leader asks that member
        what changed since the change it holds, on a request connection of
        its own: a C{index-changed} notice may have been lost with the link.
        The first question asks for everything (no incarnation held); the
        one after the loss names the incarnation and change number of the
        answer the leader holds.  The member stays live and its files stay
        in the index meanwhile.
        """
        harness = Harness(self, node=1).start()
        far: List[RecordingHandler] = []
        harness.reactor.listenTCP(
            9002,
            P2PFactory(
                nodeIdentity(2), lambda: far.append(RecordingHandler()) or far[-1], harness.reactor, True, perConnection=True
            ),
        )

        def completeAll() -> None:
            for _ in range(10):
                if not harness.reactor.tcpClients:
                    return
                harness.complete()
            self.fail("connections kept being opened")

        def asked() -> List[Tuple[RecordingHandler, Message]]:
            return [(h, m) for h in far for m in h.of("index-since")]

        first, _ = harness.peer(2), harness.peer(2)
        first.send(heartbeat(2, 1, 1))
        harness.advance(HEARTBEAT)
        completeAll()
        [(upstream, question)] = asked()
        self.assertEqual((question.incarnation, question.since), (None, 0))
        self.assertNotIn(upstream, [h for h in far if h.of("heartbeat")])
        entry = FileEntry("a.txt", 3, 1.5, "ab" * 32)
        upstream.connection.sendMessage(
            Message("index-delta", incarnation="00ff00ff00ff00ff", seq=5, full=True, entries=[entry], removed=[], last=True)
        )
        harness.flush()
        self.assertFalse(harness.node.keeper.isGathering(2))
        self.assertEqual(harness.node.keeper.index.listing()[0]["name"], "a.txt")
        self.assertEqual(upstream.closed, 1)

        first.close()
        harness.flush()
        self.assertTrue(harness.node.keeper.isGathering(2))
        completeAll()
        [_, (upstream, question)] = asked()
        self.assertEqual((question.incarnation, question.since), ("00ff00ff00ff00ff", 5))
        self.assertTrue(harness.node.coordinator.isLive(2))
        self.assertEqual(harness.node.keeper.index.listing()[0]["name"], "a.txt")
        upstream.connection.sendMessage(
            Message("index-delta", incarnation="00ff00ff00ff00ff", seq=5, full=False, entries=[], removed=[], last=True)
        )
        harness.flush()
        self.assertFalse(harness.node.keeper.isGathering(2))
        self.assertEqual([row["name"] for row in harness.node.keeper.index.listing()], ["a.txt"])
        harness.advance(HEARTBEAT)
        self.assertEqual(len(asked()), 2, "nothing changed: no further question")

    def test_silenceTakesMemberDown(self) -> None:
        """
        A linked member that stops sending heartbeats is not alive once the
        leader timeout has passed, and that is logged.
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(2)
        peer.send(heartbeat(2, 1, 1))
        harness.advance(LEADER_TIMEOUT)
        self.assertTrue(harness.node.coordinator.election.isLive(2))
        harness.advance(HEARTBEAT)
        self.assertFalse(harness.node.coordinator.election.isLive(2))
        self.assertIn("member 2 is down", harness.lines())
        self.assertFalse(peer.isClosed)

    def test_learnsMembersFromHeartbeats(self) -> None:
        """
        A member listed in the leader's heartbeat is learned, and the node
        tries to link to it.
        """
        harness = Harness(self, node=5).start()
        peer = harness.peer(2)
        peer.send(heartbeat(2, 1, 2, [(2, address(2)), (3, address(3)), (5, "127.9.9.9:1")]))
        self.assertEqual(sorted(harness.node.membership.members), [2, 3])
        self.assertEqual(harness.node.membership.members[3].address, "127.0.0.1:9003")
        self.assertIn(("127.0.0.1", 9003), [(host, port) for host, port, *_ in harness.reactor.tcpClients])
        self.assertEqual(harness.node.config.address, "127.0.0.1:9005")

    def test_silentLearnedMemberForgotten(self) -> None:
        """
        A member learned from the leader's heartbeat that never comes up is
        forgotten by the node's housekeeping after C{forgetAfter} (600 s by
        default), its link service stopped; the leader, alive, is kept.
        """
        harness = Harness(self, node=5).start()
        self.assertEqual(harness.node.membership.forgetAfter, 600.0)
        harness.node.membership.forgetAfter = 3.0
        leader = harness.peer(2)
        leader.send(heartbeat(2, 1, 2, [(2, address(2)), (3, address(3))]))
        service = harness.node.membership.members[3].service
        for _ in range(int(2.5 / HEARTBEAT)):
            harness.advance(HEARTBEAT)
            leader.send(heartbeat(2, 1, 2))
        self.assertIn(3, harness.node.membership.members)
        for _ in range(int(1 / HEARTBEAT)):
            harness.advance(HEARTBEAT)
            leader.send(heartbeat(2, 1, 2))
        self.assertEqual(harness.node.membership.ids(), [2])
        self.assertFalse(service.running)
        self.assertEqual([m["id"] for m in harness.node.status()["members"]], [2, 5])
        self.assertEqual(len([line for line in harness.lines() if line.startswith("forgot node 3")]), 1)

    def test_ownIdRefused(self) -> None:
        """
        A control link claiming this node's own id is refused with code
        C{conflict} and closed; it is not a member.
        """
        harness = Harness(self, node=1).start()
        impostor = harness.peer(1)
        [(code, reason)] = impostor.errors()
        self.assertEqual(code, "conflict")
        self.assertIn("node id 1", reason)
        self.assertTrue(impostor.isClosed)
        self.assertEqual(harness.node.membership.members, {})
        self.assertEqual(len(harness.node.status()["members"]), 1)

    def test_wrongNodeAtPeerAddress(self) -> None:
        """
        When the node links to a configured peer and finds another node id
        there, it refuses the link with C{conflict} in the handshake, before
        either side proves anything, and never counts it as a member.
        """
        harness = Harness(self, node=1, peers={2: address(2)})
        other = RecordingHandler()
        harness.reactor.listenTCP(9002, P2PFactory(nodeIdentity(3), other, harness.reactor, listening=True))
        harness.start()
        harness.complete()
        self.assertEqual(other.ready, 0)
        self.assertEqual(other.closed, 1)
        drops = [line for line in harness.drops() if "expected node 2" in line]
        self.assertTrue(drops)
        for line in drops:
            self.assertIn("found node 3", line)
        self.assertEqual(harness.node.membership.members[2].links, set())
        self.assertNotIn(3, harness.node.membership.members)

    def test_duplicateIdRefusedBothSides(self) -> None:
        """
        Node 2 follows node 1; a second node started as node 1 at another
        address links to node 2.  Node 2 refuses it with C{conflict}, logs
        it once and lists it under C{conflicts}; it keeps following the
        real node 1 at its address, in the same epoch.  The refusal reaches
        the claimant: it logs it, shows it under C{refused}, and its link
        backs off instead of reconnecting at once.
        """
        refuser = Harness(self, node=2, peers={1: address(1)}).start()
        holder = refuser.peer(1)
        holder.send(heartbeat(1, 3, 1))
        self.assertEqual((refuser.node.coordinator.leader(), refuser.node.coordinator.epoch()), (1, 3))
        claimant = Harness(self, node=1, peers={2: address(2)}, at="127.0.0.1:9101")
        claimant.reactor.listenTCP(9002, refuser.factory)
        claimant.start()
        claimant.complete()
        refuser.flush()
        status = refuser.node.status()
        self.assertEqual((status["leader"], status["epoch"]), (1, 3))
        self.assertEqual([(m["id"], m["address"]) for m in status["members"]], [(1, address(1)), (2, address(2))])
        ((conflict),) = status["conflicts"]
        self.assertEqual(
            (conflict["id"], conflict["address"], conflict["fingerprint"]), (1, "127.0.0.1:9101", PLAIN_FINGERPRINT)
        )
        self.assertIn("node id 1 is already held by the node at 127.0.0.1:9001", conflict["reason"])
        # Both nodes' parts log to the harness made last (the log is patched
        # on the classes): the lines say which side wrote them.
        lines = refuser.lines() + claimant.lines()
        self.assertEqual(len([line for line in lines if "refused node 1 at 127.0.0.1:9101" in line]), 1)
        self.assertEqual(claimant.node.status()["refused"], [{"id": 2, "reason": conflict["reason"]}])
        self.assertEqual(len([line for line in lines if "node 2 at 127.0.0.1:9002 refused the link" in line]), 1)
        self.assertEqual(claimant.node.membership.members[2].service.failures, 1)
        self.assertEqual(claimant.node.membership.members[2].links, set())
        # Its claims reach nobody: node 2 still follows the real node 1.
        claimant.advance(LEADER_TIMEOUT + HEARTBEAT)
        refuser.flush()
        self.assertEqual((refuser.node.coordinator.leader(), refuser.node.coordinator.epoch()), (1, 3))

    def test_outboundLink(self) -> None:
        """
        The node's own link to a configured peer, once up, makes it a
        member and carries the node's heartbeats.
        """
        harness = Harness(self, node=1, peers={2: address(2)})
        peer = RecordingHandler()
        harness.reactor.listenTCP(9002, P2PFactory(nodeIdentity(2), peer, harness.reactor, listening=True))
        harness.start()
        pump = harness.complete()
        self.assertEqual(peer.ready, 1)
        (link,) = harness.node.membership.members[2].links
        self.assertFalse(link.incoming)
        self.assertIs(harness.node.membership.members[2].link(), link)
        self.assertEqual(len(peer.of("heartbeat")), 1)
        harness.reactor.advance(HEARTBEAT)
        pump.flush()
        self.assertEqual(len(peer.of("heartbeat")), 2)


class ListingFramesTests(SynchronousTestCase):
    """
    The node's C{ls} answer is encoded once per state of the index and
    shared by every reader.
    """

    def test_sharedUntilTheIndexChanges(self) -> None:
        """
        Two C{ls} readers get the very same frames while the index is
        unchanged (a reader that does not read holds a place in them, not a
        copy); they decode to the listing, the last one marked; a change
        to the index gives new frames.
        """
        harness = Harness(self, node=1, files={"a.txt": b"x"}).start()
        context = harness.node.context
        first = context.listingFrames()
        self.assertIs(context.listingFrames(), first)
        messages = [decode(frame) for frame in first]
        self.assertEqual([m.last for m in messages], [False] * (len(messages) - 1) + [True])
        self.assertEqual([row for m in messages for row in m.files], harness.node.keeper.index.listing())
        self.assertEqual([row["name"] for row in messages[0].files], ["a.txt"])
        harness.node.keeper.ownChanges([FileEntry("b.txt", 1, 1.0, "ab" * 32)], [])
        second = context.listingFrames()
        self.assertIsNot(second, first)
        self.assertEqual([row["name"] for m in map(decode, second) for row in m.files], ["a.txt", "b.txt"])

    def test_droppedWhenNotAsked(self) -> None:
        """
        The encoded answer (a whole copy of the index) is kept
        C{LISTING_KEPT} seconds after the last ask, each ask restarting
        that time, then dropped; the next ask encodes it again, equal to
        the dropped one.  Stopping the node drops it and leaves no timer.
        """
        harness = Harness(self, node=1, files={"a.txt": b"x"}).start()
        context, reactor = harness.node.context, harness.reactor
        first = context.listingFrames()
        reactor.advance(LISTING_KEPT - 1)
        self.assertIs(context.listingFrames(), first)
        reactor.advance(LISTING_KEPT - 1)
        self.assertIs(context.listingFrames(), first, "each ask keeps it longer")
        reactor.advance(LISTING_KEPT)
        again = context.listingFrames()
        self.assertIsNot(again, first)
        self.assertEqual(again, first)
        pending = len(reactor.getDelayedCalls())
        context.stop()
        self.assertEqual(len(reactor.getDelayedCalls()), pending - 1)
        self.assertIsNot(context.listingFrames(), again)


class HeartbeatTests(SynchronousTestCase):
    """
    Heartbeats out on every tick; heartbeats in feed the election.
    """

    def test_sentOnEachTick(self) -> None:
        """
        Each heartbeat interval the node writes exactly one heartbeat frame
        to each linked member, naming itself, its epoch, its leader and its
        live members.
        """
        harness = Harness(self, node=1).start()
        protocol, transport = harness.openByHand(nodeIdentity(2))
        sent = [m for m in parseFrames(transport.value()) if m.type != "index-changed"]
        self.assertEqual([m.type for m in sent], ["ready", "heartbeat"])
        transport.clear()
        for tick in range(3):
            harness.reactor.advance(HEARTBEAT)
            (message,) = parseFrames(transport.value())
            transport.clear()
            self.assertEqual(message, heartbeat(1, 1, 1, [(1, address(1))]))
        protocol.dataReceived(frame(heartbeat(2, 1, 1)))
        transport.clear()
        harness.reactor.advance(HEARTBEAT)
        # Now live, node 2 is also asked for its index: only heartbeats count.
        sent = [m for m in parseFrames(transport.value()) if m.type == "heartbeat"]
        self.assertEqual(sent, [heartbeat(1, 1, 1, [(1, address(1)), (2, address(2))])])

    def test_tickSurvivesAnError(self) -> None:
        """
        An exception in one heartbeat tick is logged and the heartbeats go on:
        a stopped loop would make the node fall silent for good.
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(2)
        peer.send(heartbeat(2, 0, None))
        coordinator = harness.node.coordinator
        original = coordinator.heartbeatMessage
        failures = []

        def brokenOnce() -> Message:
            if not failures:
                failures.append(True)
                raise RuntimeError("one bad tick")
            return original()

        self.patch(coordinator, "heartbeatMessage", brokenOnce)
        before = len(peer.handler.of("heartbeat"))
        harness.advance(HEARTBEAT)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(peer.handler.of("heartbeat")), before)
        harness.advance(HEARTBEAT)
        self.assertGreater(len(peer.handler.of("heartbeat")), before)

    def test_notSentToClients(self) -> None:
        """
        A client connection gets no heartbeats.
        """
        harness = Harness(self, node=1).start()
        protocol, transport = harness.openByHand(CLIENT)
        transport.clear()
        harness.reactor.advance(3 * HEARTBEAT)
        self.assertEqual(transport.value(), b"")

    def test_staleLeaderTold(self) -> None:
        """
        A heartbeat from a node that claims leadership of an older epoch is
        answered with a C{stale} message carrying the current epoch and
        leader; this node stays leader.
        """
        harness = Harness(self, node=1)
        harness.config.state.makedirs()
        harness.config.state.child("epoch").setContent(b"5\n")
        harness.start()
        self.assertEqual(harness.node.status()["epoch"], 6)
        peer = harness.peer(2)
        peer.send(heartbeat(2, 3, 2))
        (stale,) = peer.handler.of("stale")
        self.assertEqual((stale.epoch, stale.leader), (6, 1))
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("leader", 1, 6))

    def test_staleIndexNoticeTold(self) -> None:
        """
        An C{index-changed} notice tagged with an older epoch is not acted
        on (the keeper does not take it as news); its sender is told the
        current epoch and leader, and the line is logged.  The same notice
        in the current epoch is taken.
        """
        harness = Harness(self, node=1)
        harness.config.state.makedirs()
        harness.config.state.child("epoch").setContent(b"5\n")
        harness.start()
        noticed: List[Tuple[int, str, int]] = []
        self.patch(harness.node.keeper, "noticed", lambda *args: noticed.append(args))
        peer = harness.peer(2)
        peer.send(heartbeat(2, 6, 1))
        harness.advance(HEARTBEAT)
        peer.send(Message("index-changed", epoch=4, incarnation="00ff00ff00ff00ff", seq=9))
        (stale,) = peer.handler.of("stale")
        self.assertEqual((stale.epoch, stale.leader), (6, 1))
        self.assertIn("rejected message from 2: stale epoch 4 < 6", harness.lines())
        self.assertEqual(noticed, [])
        peer.send(Message("index-changed", epoch=6, incarnation="00ff00ff00ff00ff", seq=9))
        self.assertEqual(noticed, [(2, "00ff00ff00ff00ff", 9)])
        self.assertEqual(len(peer.handler.of("stale")), 1)

    def test_staleFollowerNotTold(self) -> None:
        """
        A heartbeat of an older epoch from a node that only follows someone
        else gets no C{stale} notice.
        """
        harness = Harness(self, node=1).start()
        harness.advance(HEARTBEAT)
        peer = harness.peer(2)
        peer.send(heartbeat(2, 0, None), heartbeat(2, 0, 0))
        self.assertEqual(peer.handler.of("stale"), [])
        self.assertFalse(peer.isClosed)

    def test_higherEpochAdopted(self) -> None:
        """
        A heartbeat from a smaller id leading a newer epoch makes this node
        follow it, and the new epoch is stored.
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(0)
        peer.send(heartbeat(0, 7, 0))
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("follower", 0, 7))
        self.assertEqual(harness.config.state.child("epoch").getContent(), b"7\n")
        self.assertEqual(harness.node.leaderAddress(), "127.0.0.1:9000")

    def test_staleNoticeAdopted(self) -> None:
        """
        A C{stale} notice with a newer epoch makes the node follow the
        leader it names.
        """
        harness = Harness(self, node=2, peers={0: address(0)}).start()
        peer = harness.peer(0)
        peer.send(Message("stale", epoch=4, leader=0))
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("follower", 0, 4))

    def test_heartbeatForAnotherNode(self) -> None:
        """
        A heartbeat naming a different node than the link's is a protocol
        violation: the link is dropped.
        """
        harness = Harness(self, node=1).start()
        peer = harness.peer(2)
        peer.send(heartbeat(3, 1, 1))
        self.assertEqual([code for code, _ in peer.errors()], ["protocol"])
        self.assertTrue(peer.isClosed)
        self.assertNotIn(3, harness.node.membership.members)

    def test_heartbeatOnRequestConnection(self) -> None:
        """
        Heartbeats are accepted only on control links: on a node's request
        connection, or a client's, one is a protocol violation and the
        connection is dropped; neither becomes a member.
        """
        harness = Harness(self, node=1).start()
        for link in (harness.peer(2, purpose="request"), harness.client()):
            self.assertEqual(link.handler.ready, 1)
            link.send(heartbeat(2, 1, 1))
            [(code, reason)] = link.errors()
            self.assertEqual(code, "protocol")
            self.assertIn("heartbeat is not accepted on a request connection", reason)
            self.assertTrue(link.isClosed)
        self.assertEqual(harness.node.membership.members, {})


class ExternalCoordinatorTests(SynchronousTestCase):
    """
    A node whose coordinator decides elsewhere (etcd, here a fake): no
    heartbeats, members and leader from the coordinator, index traffic as
    with the built-in election.
    """

    def harness(self, node: int = 2, atOnce: bool = True) -> Tuple[Harness, FakeCoordinator]:
        fake = FakeCoordinator(node, atOnce=atOnce)
        return Harness(self, node=node, etcd=fake), fake

    def test_status(self) -> None:
        """
        The status names the coordinator, C{etcd}; with no leader known the
        node is a candidate in epoch 0.
        """
        harness, fake = self.harness()
        harness.start()
        status = harness.node.status()
        self.assertEqual(
            (status["coordinator"], status["role"], status["leader"], status["epoch"]), ("etcd", "candidate", None, 0)
        )

    def test_whenJoined(self) -> None:
        """
        C{whenJoined} fires once the coordinator has admitted the node, and
        fails with the coordinator's error when it refuses it; the built-in
        election admits at once.
        """
        harness, fake = self.harness(atOnce=False)
        harness.start()
        joined = harness.node.whenJoined()
        self.assertNoResult(joined)
        assert fake.started is not None
        fake.started.callback(None)
        self.successResultOf(joined)
        self.successResultOf(harness.node.whenJoined())
        fake.stopped = None
        harness.node.stopService()
        assert fake.stopped is not None
        fake.stopped.callback(None)

        refused, other = self.harness(atOnce=False)
        refused.start()
        assert other.started is not None
        other.started.errback(CoordinatorError("conflict", "node id 2 is already registered in etcd by 127.0.0.1:1"))
        error = self.failureResultOf(refused.node.whenJoined(), CoordinatorError).value
        self.assertEqual(error.code, "conflict")
        refused.node.stopService()
        assert other.stopped is not None
        other.stopped.callback(None)

        builtin = Harness(self, node=1).start()
        self.successResultOf(builtin.node.whenJoined())

    def test_noHeartbeats(self) -> None:
        """
        The node sends no heartbeat, on a new link or as time passes, and
        a heartbeat it receives changes nothing: neither the leader nor
        the members it lists.
        """
        harness, fake = self.harness()
        harness.start()
        protocol, transport = harness.openByHand(nodeIdentity(3))
        sent = [m.type for m in parseFrames(transport.value())]
        self.assertEqual([t for t in sent if t != "index-changed"], ["ready"])
        transport.clear()
        harness.reactor.advance(10 * HEARTBEAT)
        protocol.dataReceived(frame(heartbeat(3, 9, 3, [(3, address(3)), (4, address(4))])))
        harness.reactor.advance(10 * HEARTBEAT)
        self.assertEqual(transport.value(), b"")
        status = harness.node.status()
        self.assertEqual((status["leader"], status["epoch"]), (None, 0))
        self.assertNotIn(4, harness.node.membership)

    def test_membersFromCoordinator(self) -> None:
        """
        Every member the coordinator reports is linked to at its address and
        shown alive; the leader's address is known; a member that leaves
        the coordinator is shown not alive.
        """
        harness, fake = self.harness()
        harness.start()
        fake.set(1, 5, 1, 3)
        # Control links to both (and, as the standby, request connections
        # to ask for their files).
        self.assertEqual(
            {(host, port) for host, port, *_ in harness.reactor.tcpClients},
            {("127.0.0.1", 9001), ("127.0.0.1", 9003)},
        )
        status = harness.node.status()
        self.assertEqual((status["role"], status["leader"], status["epoch"]), ("follower", 1, 5))
        self.assertEqual([(m["id"], m["alive"]) for m in status["members"]], [(1, True), (2, True), (3, True)])
        self.assertEqual(harness.node.leaderAddress(), address(1))
        fake.set(1, 5, 1)
        self.assertEqual([(m["id"], m["alive"]) for m in harness.node.status()["members"]], [(1, True), (2, True), (3, False)])

    def test_standbyWaitsForItsOwnFirstScan(self) -> None:
        """
        The standby (the smallest id after the leader) does not copy the
        others' lists while its own first scan runs; it stands by once that
        scan is done.
        """
        held: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred]] = []

        def threads(f: Callable[..., Any], *args: Any) -> Deferred:
            if getattr(f, "__name__", "") == "_firstScan":
                d: Deferred = Deferred()
                held.append((f, args, d))
                return d
            return inline(f, *args)

        fake = FakeCoordinator(2, atOnce=True)
        harness = Harness(self, node=2, etcd=fake, files={"a.txt": b"a"}, runInThread=threads)
        harness.start()
        fake.set(1, 5, 1, 3)
        self.assertEqual(len(held), 1)
        self.assertFalse(harness.node.keeper.gathering)
        f, args, d = held.pop()
        d.callback(f(*args))
        self.assertTrue(harness.node.keeper.gathering)

    def test_leaderGathers(self) -> None:
        """
        When the coordinator says this node leads, it keeps the index of
        every live member in the coordinator's epoch, asking each on a
        request connection of its own.
        """
        harness, fake = self.harness()
        harness.start()
        harness.peer(3)
        before = len(harness.reactor.tcpClients)
        fake.set(2, 7, 3)
        harness.advance(HEARTBEAT)
        self.assertEqual(harness.node.keeper.epoch, 7)
        self.assertTrue(harness.node.keeper.isGathering(3))
        self.assertIn(("127.0.0.1", 9003), [(h, p) for h, p, *_ in harness.reactor.tcpClients[before:]])
        self.assertEqual(harness.node.status()["role"], "leader")
        self.assertTrue(harness.node.isLeader())

    def test_noticeOfAnOlderEpochIsRefused(self) -> None:
        """
        An C{index-changed} notice of an older epoch than the coordinator's
        is refused with one log line (however often it comes) and no stale
        notice; one of the current epoch is taken.
        """
        harness, fake = self.harness()
        harness.start()
        harness.advance(0)
        fake.set(1, 5, 1)
        leader = harness.peer(1)
        old = Message("index-changed", epoch=4, incarnation="0123456789abcdef", seq=3)
        leader.send(old, old)
        self.assertEqual(leader.handler.of("stale"), [])
        self.assertEqual(harness.lines().count("rejected message from 1: stale epoch 4 < 5"), 1)
        noticed = []
        self.patch(harness.node.keeper, "noticed", lambda *args: noticed.append(args))
        leader.send(Message("index-changed", epoch=5, incarnation="0123456789abcdef", seq=4))
        self.assertEqual(noticed, [(1, "0123456789abcdef", 4)])

    def test_stopLeavesThenCloses(self) -> None:
        """
        Stopping the node stops the coordinator, which stops leading at
        once: the node resigns its index.
        """
        harness, fake = self.harness(atOnce=False)
        harness.start()
        assert fake.started is not None
        fake.started.callback(None)
        fake.set(2, 7)
        self.assertIsNotNone(harness.node.keeper.epoch)
        stopped = harness.node.stopService()
        self.assertEqual(fake.calls, ["start", "stop"])
        self.assertIsNone(harness.node.keeper.epoch)
        self.assertFalse(harness.node.isLeader())
        assert fake.stopped is not None
        fake.stopped.callback(None)
        self.successResultOf(stopped)


class EpochStoreTests(SynchronousTestCase):
    """
    The highest epoch is kept in C{state/epoch} across restarts.
    """

    def test_persisted(self) -> None:
        """
        Once the node leads, C{state/epoch} holds its epoch.
        """
        harness = Harness(self, node=1).start()
        self.assertEqual(harness.config.state.child("epoch").getContent(), b"1\n")

    def test_restartUsesHigherEpoch(self) -> None:
        """
        A new node on the same state directory starts from the stored epoch
        and its next claim uses a higher one.
        """
        first = Harness(self, node=1).start()
        self.successResultOf(first.node.stopService())
        second = Harness(self, node=1, peers={5: address(5)}, state=first.config.state).start()
        self.assertEqual(second.node.status()["epoch"], 1)
        self.assertEqual(second.node.status()["role"], "candidate")
        for _ in range(round(second.config.startGrace / HEARTBEAT)):
            second.advance(HEARTBEAT)
        status = second.node.status()
        self.assertEqual((status["role"], status["epoch"]), ("leader", 2))
        self.assertEqual(first.config.state.child("epoch").getContent(), b"2\n")

    def test_corrupt(self) -> None:
        """
        A C{state/epoch} that is not a number stops the node from starting
        with a L{ValueError} naming the file (starting from 0 could reuse an
        epoch).
        """
        for content in (b"garbage\n", b"", b"-3\n", b"1.5\n"):
            harness = Harness(self, node=1)
            harness.config.state.makedirs()
            epoch = harness.config.state.child("epoch")
            epoch.setContent(content)
            error = self.assertRaises(ValueError, harness.node.startService)
            self.assertIn(epoch.path, str(error))
            self.assertIn("does not hold an epoch number", str(error))
            self.assertFalse(harness.node.running)
            self.assertEqual(epoch.getContent(), content)


class WatcherTests(SynchronousTestCase):
    """
    C{status} with C{watch=True}: a C{state} at once and one more at every
    change of role, leader, epoch or membership.
    """

    def watch(self, harness: Harness) -> Link:
        client = harness.client()
        client.send(Message("status", watch=True))
        return client

    def test_stateAtOnce(self) -> None:
        """
        A watcher gets the current status at once.
        """
        harness = Harness(self, node=1).start()
        client = self.watch(harness)
        (state,) = client.handler.of("state")
        self.assertEqual(state.status, harness.node.status())

    def test_stateOnChanges(self) -> None:
        """
        A member linking up, becoming alive, and a new leader and epoch each
        send the watcher one more C{state}; ticks that change nothing send
        none.
        """
        harness = Harness(self, node=1).start()
        client = self.watch(harness)
        harness.advance(2 * HEARTBEAT)
        self.assertEqual(len(client.handler.of("state")), 1)
        peer = harness.peer(2)
        harness.flush()
        states = client.handler.of("state")
        self.assertEqual(len(states), 2)
        self.assertEqual([(m["id"], m["alive"]) for m in states[-1].status["members"]], [(1, True), (2, False)])
        peer.send(heartbeat(2, 1, 1))
        harness.flush()
        states = client.handler.of("state")
        self.assertEqual(len(states), 3)
        self.assertEqual([(m["id"], m["alive"]) for m in states[-1].status["members"]], [(1, True), (2, True)])
        leader = harness.peer(0)
        leader.send(heartbeat(0, 9, 0))
        harness.flush()
        last = client.handler.of("state")[-1].status
        self.assertEqual((last["role"], last["leader"], last["epoch"]), ("follower", 0, 9))
        self.assertEqual(last, harness.node.status())
        count = len(client.handler.of("state"))
        peer.send(heartbeat(2, 9, 0))
        leader.send(heartbeat(0, 9, 0))
        harness.advance(HEARTBEAT)
        self.assertEqual(len(client.handler.of("state")), count)

    def test_noWatch(self) -> None:
        """
        C{status} without watch gets one C{state} and nothing later.
        """
        harness = Harness(self, node=1).start()
        client = harness.client()
        client.send(Message("status", watch=False))
        harness.peer(2)
        harness.flush()
        self.assertEqual(len(client.handler.of("state")), 1)
        self.assertFalse(client.isClosed)

    def test_watchersClosedOnStop(self) -> None:
        """
        Stopping the node closes its watchers' connections, so that
        C{status --watch} ends.
        """
        harness = Harness(self, node=1).start()
        client = self.watch(harness)
        stopped = harness.node.stopService()
        harness.flush()
        self.successResultOf(stopped)
        self.assertTrue(client.isClosed)

    def test_closedWatcherForgotten(self) -> None:
        """
        A watcher that went away is not written to at the next change.
        """
        harness = Harness(self, node=1).start()
        client = self.watch(harness)
        client.close()
        self.assertEqual(harness.node.watching, 0)
        harness.peer(2)
        self.assertEqual(len(client.handler.of("state")), 1)


class RequestTests(SynchronousTestCase):
    """
    Client requests: C{ls}, C{lookup}, C{get} routing.
    """

    def follower(self) -> Harness:
        """
        Node 2 following node 1 in epoch 1.
        """
        harness = Harness(self, node=2, peers={1: address(1)}).start()
        harness.peer(1).send(heartbeat(1, 1, 1, [(1, address(1)), (2, address(2))]))
        self.assertEqual(harness.node.status()["leader"], 1)
        return harness

    def test_lsOnFollowerRedirects(self) -> None:
        """
        C{ls} on a follower is redirected to the leader's id and address.
        """
        harness = self.follower()
        client = harness.client()
        client.send(Message("ls"))
        self.assertEqual(client.handler.messages, [Message("redirect", leader=1, address="127.0.0.1:9001")])
        self.assertFalse(client.isClosed)

    def test_lookupAndGetOnFollowerRedirect(self) -> None:
        """
        A client's C{lookup} or C{get} of a file the follower does not have
        is redirected to the leader too.
        """
        harness = self.follower()
        client = harness.client()
        client.send(Message("lookup", name="a.png"), Message("get", name="a.png", offset=0, sha256=None))
        self.assertEqual(
            client.handler.messages, [Message("redirect", leader=1, address="127.0.0.1:9001")] * 2
        )

    def test_lsWithoutLeader(self) -> None:
        """
        C{ls} while no leader is known is answered with C{no-leader}.
        """
        harness = Harness(self, node=2, peers={1: address(1)}).start()
        client = harness.client()
        client.send(Message("ls"))
        self.assertEqual([code for code, _ in client.errors()], ["no-leader"])
        self.assertFalse(client.isClosed)

    def test_lsOnLeader(self) -> None:
        """
        C{ls} on the leader lists the files of its share, with itself as
        holder, in one last C{listing} frame.
        """
        harness = Harness(self, node=1, files={"a.txt": b"hello", "b.bin": b"\0" * 10}).start()
        client = harness.client()
        client.send(Message("ls"))
        (listing,) = client.handler.messages
        self.assertEqual(listing.type, "listing")
        self.assertTrue(listing.last)
        self.assertEqual(
            [(f["name"], f["size"], f["holders"]) for f in listing.files], [("a.txt", 5, [1]), ("b.bin", 10, [1])]
        )

    def test_lsEmpty(self) -> None:
        """
        An empty cluster still answers C{ls} with one (empty, last) listing.
        """
        harness = Harness(self, node=1).start()
        client = harness.client()
        client.send(Message("ls"))
        self.assertEqual(client.handler.messages, [Message("listing", files=[], last=True)])

    def test_badName(self) -> None:
        """
        A request for a name with a path in it is refused with C{bad-name},
        and the connection stays usable.
        """
        harness = Harness(self, node=1).start()
        client = harness.client()
        client.send(Message("get", name="../secret", offset=0, sha256=None), Message("status", watch=False))
        self.assertEqual([m.type for m in client.handler.messages], ["error", "state"])
        self.assertEqual(client.handler.messages[0].code, "bad-name")

    def test_unknownOnLeader(self) -> None:
        """
        A lookup of a file nobody has is C{not-found} on the leader.
        """
        harness = Harness(self, node=1).start()
        client = harness.client()
        client.send(Message("lookup", name="nothing.txt"))
        self.assertEqual([code for code, _ in client.errors()], ["not-found"])


class RequestRoutingTests(SynchronousTestCase):
    """
    Which requests a node answers, and on which connections.
    """

    def follower(self, files: Optional[Dict[str, bytes]] = None) -> Harness:
        harness = Harness(self, node=2, peers={1: address(1)}, files=files).start()
        harness.peer(1).send(heartbeat(1, 1, 1, [(1, address(1)), (2, address(2))]))
        return harness

    def test_leaderRelayMissesElsewhere(self) -> None:
        """
        The leader asking a follower for a file the follower lacks is told
        C{not-found}, so that its relay tries another holder.
        """
        harness = self.follower()
        relay = harness.peer(1, "request")
        relay.send(Message("get", name="a.png", offset=0, sha256=None))
        self.assertEqual([code for code, _ in relay.errors()], ["not-found"])

    def test_otherNodeRedirected(self) -> None:
        """
        Another node (one fetching a file, say) asking a follower that lacks
        the file is pointed at the leader, like a client: after an election
        its resume finds the new leader this way.
        """
        harness = self.follower()
        fetching = harness.peer(3, "request")
        fetching.send(Message("get", name="a.png", offset=0, sha256=None))
        self.assertEqual(fetching.handler.messages, [Message("redirect", leader=1, address=address(1))])

    def test_requestOnControlLinkRefused(self) -> None:
        """
        Requests belong on request connections: one on a control link drops
        that link with the reason.
        """
        harness = self.follower()
        control = harness.peer(3)
        control.send(Message("ls"))
        self.assertTrue(control.isClosed)
        self.assertTrue(any("not accepted on a control link" in line for line in harness.drops()))

    def test_requestDuringTransferRefused(self) -> None:
        """
        While a file's bytes are being sent on a connection, any request on
        it is a protocol violation (a reply would land inside the file): the
        connection is dropped.
        """
        harness = Harness(self, node=1, files={"big.bin": b"x" * (1 << 20)}).start()
        client = harness.client()
        client.serverTransport.pauseProducing()
        client.client.sendMessage(Message("get", name="big.bin", offset=0, sha256=None))
        client.client.sendMessage(Message("status", watch=False))
        client.pump.flush()
        self.assertTrue(client.isClosed)
        self.assertTrue(any("sent during a transfer" in line for line in harness.drops()))

    def test_getOnWatchingConnectionRefused(self) -> None:
        """
        A connection that watches status gets pushed C{state} frames at any
        time, so it cannot also carry a file: C{get} on it is refused.
        """
        harness = Harness(self, node=1, files={"a.txt": b"a"}).start()
        client = harness.client()
        client.send(Message("status", watch=True), Message("get", name="a.txt", offset=0, sha256=None))
        self.assertTrue(client.isClosed)


def randomValue(rng: random.Random) -> Any:
    return rng.choice(
        [None, 0, 1, 2, -1, 2**70, 1.5, float("1e308"), "", "x", "../etc/passwd", "a\nb", True, False,
         [], {}, ["a"], [1], [{"id": 2, "address": "127.0.0.1:9002"}], [{"id": -1}], {"status": 1},
         [{"name": "a", "size": 1, "mtime": 0, "sha256": "0" * 64}], [{"name": 1}]]
    )


def garbage(rng: random.Random) -> bytes:
    """
    One stream of bad input: noise, bad frames, or well-formed messages that
    make no sense where they arrive.
    """
    kind = rng.randrange(9)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 80))
    if kind == 1:
        return pack("!I", rng.choice([0, 1, 5, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF])) + rng.randbytes(rng.randrange(0, 40))
    if kind == 2:
        return rawFrame(b"C" + rng.randbytes(rng.randrange(0, 40)))
    if kind == 3:
        return rawFrame(rng.choice([b"X", b"\0", b"c", b""]) + b'{"type":"status","watch":false}')
    if kind == 4:
        depth = rng.randrange(1, 5000)
        return rawFrame(b"C" + b"[" * depth + b"]" * depth)
    if kind == 5:
        body: Dict[str, Any] = {"type": rng.choice(sorted(SCHEMAS) + ["nonsense", ""])}
        for field in SCHEMAS.get(body["type"], {}):
            if rng.random() < 0.9:
                body[field] = randomValue(rng)
        return rawFrame(b"C" + json.dumps(body).encode("utf-8"))
    if kind == 6:
        return rawFrame(b"C" + rng.choice([b"[]", b"1", b'"x"', b"null", b"NaN", b'{"type":null}', b'{"type":1}', b"\xff\xfe"]))
    if kind == 7:
        return frame(
            rng.choice(
                [
                    Message("ready", node=1),
                    Message("auth", proof="0" * 64),
                    Message("listing", files=[], last=True),
                    Message("redirect", leader=1, address="127.0.0.1:9001"),
                    Message("found", name="a", size=1, sha256="0" * 64, holders=[1]),
                    Message("fetched", name="a", size=1, sha256="0" * 64, already=True),
                    Message("state", status={}),
                    Message("file", name="a", size=1, sha256="0" * 64, offset=0, holder=1, leader=1),
                    Message("error", code="x", reason="y"),
                    Message("get", name=rng.choice(["", ".", "..", "a/b", "x" * 300, "missing"]), offset=rng.choice([0, 5, 2**40]), sha256=rng.choice([None, "0" * 64, "zz"])),
                    Message("lookup", name=rng.choice(["", "a\0b", "missing"])),
                    Message("ls"),
                    Message("index-since", incarnation=rng.choice([None, "", "x" * 300]), since=rng.choice([0, 7, 2**70])),
                    Message(
                        "index-delta", incarnation="x", seq=rng.randrange(0, 3), full=rng.random() < 0.5,
                        entries=[], removed=["a"], last=rng.random() < 0.5,
                    ),
                ]
            )
        )
    # Election and index traffic with arbitrary values, from node 2.
    return frame(
        rng.choice(
            [
                heartbeat(2, rng.randrange(0, 10), rng.choice([None, 0, 1, 2, 3, 99]),
                          rng.choice([[], [(2, address(2))], [(3, "[::1]:9003"), (4, "bad address"), (1, address(7))]])),
                heartbeat(rng.choice([0, 3]), 1, 1),
                Message("stale", epoch=rng.randrange(0, 10), leader=rng.choice([None, 0, 2])),
                Message(
                    "index-changed", epoch=rng.randrange(0, 10), incarnation=rng.choice(["", "x", "0" * 16]),
                    seq=rng.choice([0, 1, 2**70]),
                ),
                Message("index-since", incarnation=None, since=rng.randrange(0, 3)),
                Message(
                    "index-delta", incarnation="x", seq=rng.randrange(0, 3), full=True, entries=[], removed=[], last=True
                ),
            ]
        )
    )


class BadInputTests(SynchronousTestCase):
    """
    No input from a connection breaks the node.
    """

    def test_garbage(self) -> None:
        """
        150 streams of bad input, each on a fresh connection (before the
        handshake, after it as a client, after it as node 2 on a control
        link), fed in random pieces, never raise out of the protocol nor make
        the node fail internally; afterwards the node still answers
        C{status} on a new connection.
        """
        harness = Harness(self, node=1).start()
        rng = random.Random(20240501)
        for i in range(150):
            phase = rng.choice(["fresh", "client", "control"])
            if phase == "fresh":
                protocol = harness.factory.buildProtocol(None)
                harness.fresh(protocol)
            else:
                protocol, _ = harness.openByHand(CLIENT if phase == "client" else nodeIdentity(2))
            data = garbage(rng) if phase != "fresh" or rng.random() < 0.8 else frame(heartbeat(2, 1, 1))
            while data:
                cut = rng.randrange(1, len(data) + 1)
                protocol.dataReceived(data[:cut])
                data = data[cut:]
            if rng.random() < 0.3:
                harness.reactor.advance(HEARTBEAT)
            harness.closeByHand(protocol)
        internal = [line for line in harness.drops() if "internal error" in line]
        self.assertEqual(internal, [])
        self.assertTrue(harness.node.running)
        client = harness.client()
        client.send(Message("status", watch=False))
        (state,) = client.handler.messages
        self.assertEqual(state.status, harness.node.status())


class RestartNumbersTests(SynchronousTestCase):
    """
    A node keeps its change numbers across a clean restart, and tells a
    member whose link comes up where its files are.
    """

    def test_cleanRestartKeepsIncarnation(self) -> None:
        """
        A node stopped cleanly and started again over the same state and
        unchanged share keeps its incarnation and change number; both stops
        leave the restart record and the keeper's view in the state
        directory.
        """
        state = FilePath(self.mktemp())
        first = Harness(self, node=1, state=state, files={"a": b"1", "b": b"2"}).start()
        numbers = (first.node.localIndex.incarnation, first.node.localIndex.seq)
        first.tearDown()
        self.assertTrue(state.child("incarnation.json").exists())
        self.assertTrue(state.child("keeper.view").exists())
        second = Harness(self, node=1, state=state, share=first.config.share).start()
        self.assertEqual((second.node.localIndex.incarnation, second.node.localIndex.seq), numbers)

    def test_linkUpAnnouncesNumbers(self) -> None:
        """
        Once its share is scanned, a node sends a member whose control link
        comes up an C{index-changed} notice with its incarnation and change
        number: a notice broadcast before the link was up never reached it.
        """
        harness = Harness(self, node=1, files={"a": b"1"}).start()
        protocol, transport = harness.openByHand(nodeIdentity(2))
        notices = [m for m in parseFrames(transport.value()) if m.type == "index-changed"]
        local = harness.node.localIndex
        self.assertEqual([(m.incarnation, m.seq) for m in notices], [(local.incarnation, local.seq)])
