"""
Tests for L{p2pfiles.membership}: the reconnecting L{PeerLink} to one peer
(back-off, rate-limited log lines, clean stop) and L{Membership} (which links
are up, where messages go).
"""

from typing import Any, List, Optional, Tuple

from zope.interface import implementer

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import membership
from p2pfiles.address import clientEndpoint as realClientEndpoint
from p2pfiles.membership import (
    AUTH_RETRY_MAX,
    REPEAT_LOG_INTERVAL,
    RETRY_INITIAL,
    RETRY_MAX,
    Member,
    Membership,
    PeerLink,
)
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PFactory, P2PProtocol, PeerInfo
from p2pfiles.wire import Message, encode
from tests.channels import plainIdentity

ME = 1
PEER = 2
PEER_ADDRESS = "127.0.0.1:9002"


def identity(node: int, secret: bytes = b"") -> LocalIdentity:
    return plainIdentity("node", node, f"127.0.0.1:{9000 + node}", secret, "control")


@implementer(IConnectionHandler)
class Handler:
    """
    A do-nothing handler for either end of a control connection.
    """

    def connectionReady(self, connection: P2PProtocol) -> None:
        pass

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        pass

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        pass

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        pass

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        pass


class FakeEndpoint:
    """
    Stands in for the endpoint L{PeerLink} connects with: each attempt is a
    Deferred the test fires (or sees cancelled).
    """

    def __init__(self, attempts: List["Attempt"], address: str, security: Any = None) -> None:
        self.attempts = attempts
        self.address = address
        self.security = security

    def connect(self, factory: P2PFactory) -> Deferred:
        attempt = Attempt(self.address, factory, self.security)
        self.attempts.append(attempt)
        return attempt.deferred


class Attempt:
    """
    One connection attempt of a L{PeerLink}.
    """

    def __init__(self, address: str, factory: P2PFactory, security: Any = None) -> None:
        self.address = address
        self.factory = factory
        # What the endpoint was told to secure the connection with.
        self.security = security
        self.cancelled = False
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True


class LinkCase(SynchronousTestCase):
    """
    A L{PeerLink} to node 2 on a L{MemoryReactorClock}, connecting through
    a L{FakeEndpoint}; every attempt that succeeds runs the real handshake
    over L{twisted.test.iosim} against a listener with C{peerSecret}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.attempts: List[Attempt] = []
        self.patch(
            membership,
            "clientEndpoint",
            lambda reactor, address, timeout, security: FakeEndpoint(self.attempts, address, security),
        )
        self.events: List[dict] = []
        self.patch(PeerLink, "log", Logger(observer=self.events.append))
        self.refusals: List[Tuple[int, Optional[str]]] = []
        self.factory = P2PFactory(
            identity(ME), Handler, self.reactor, listening=False, expectedNode=PEER, perConnection=True
        )
        self.link = PeerLink(PEER, PEER_ADDRESS, self.reactor, self.factory, onRefused=self.refused)
        self.pumps: List[IOPump] = []
        self.addCleanup(self.stopLink)

    def stopLink(self) -> None:
        if self.link.running:
            d = self.link.stopService()
            self.flush()
            self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [], "the link left timers behind")

    def refused(self, member: int, reason: Optional[str]) -> None:
        self.refusals.append((member, reason))

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def lines(self) -> List[str]:
        return [formatEvent(e) for e in self.events]

    def fail(self) -> None:
        """
        The pending attempt cannot connect.
        """
        self.attempts[-1].deferred.errback(Failure(ConnectionRefusedError("Connection refused")))

    def succeed(self, peerIdentity: Optional[LocalIdentity] = None) -> P2PProtocol:
        """
        The pending attempt connects to a listener that is C{peerIdentity}
        (node 2, no secret by default); the handshake runs.
        """
        if peerIdentity is None:
            peerIdentity = identity(PEER)
        attempt = self.attempts[-1]
        client = attempt.factory.buildProtocol(None)
        server = P2PProtocol(peerIdentity, Handler(), self.reactor, listening=True)
        here = IPv4Address("TCP", "127.0.0.1", 40001)
        there = IPv4Address("TCP", "127.0.0.1", 9002)
        pump = connect(
            server,
            FakeTransport(server, isServer=True, hostAddress=there, peerAddress=here),
            client,
            FakeTransport(client, isServer=False, hostAddress=here, peerAddress=there),
            greet=True,
            clock=self.reactor,
        )
        self.pumps.append(pump)
        attempt.deferred.callback(client)
        pump.flush()
        return client

    def retryDelay(self) -> float:
        """
        How long until the next attempt: the one timer the link has.
        """
        (call,) = self.reactor.getDelayedCalls()
        return round(call.getTime() - self.reactor.seconds(), 6)

    def retry(self) -> None:
        before = len(self.attempts)
        self.reactor.advance(self.retryDelay())
        self.assertEqual(len(self.attempts), before + 1)


class BackOffTests(LinkCase):
    """
    How long a L{PeerLink} waits before trying again.
    """

    def test_connectsAtStart(self) -> None:
        """
        Starting the link makes one attempt at once, to the peer's address,
        secured by the link's own identity.
        """
        self.link.startService()
        self.assertEqual([a.address for a in self.attempts], [PEER_ADDRESS])
        self.assertIs(self.attempts[0].security, self.factory.identity.security)

    def test_unreachableBacksOffToOneSecond(self) -> None:
        """
        A peer that cannot be reached is tried again after 0.1 s, then
        0.2, 0.4, 0.8 s, and then every second, never less often.
        """
        self.link.startService()
        delays = []
        for _ in range(7):
            self.fail()
            delays.append(self.retryDelay())
            self.retry()
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
        self.assertEqual((RETRY_INITIAL, RETRY_MAX), (0.1, 1.0))

    def test_authRefusalBacksOffToSixtySeconds(self) -> None:
        """
        A peer that does not share our secret is tried again with the same
        doubling, up to 60 s: it will not change its mind soon.  The
        refusal is reported to the owner once, with its reason.
        """
        self.link.startService()
        delays = []
        for _ in range(12):
            client = self.succeed(identity(PEER, secret=b"another secret"))
            self.assertTrue(client.closed)
            self.assertEqual(client.refusal[0], "auth")
            delays.append(self.retryDelay())
            self.retry()
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 60.0, 60.0])
        self.assertEqual(AUTH_RETRY_MAX, 60.0)
        self.assertEqual(len(self.refusals), 1)
        (member, reason), = self.refusals
        self.assertEqual(member, PEER)
        self.assertIn("authentication failed", reason)
        self.assertEqual(self.link.refusal, reason)

    def test_resetAfterLinkWasUp(self) -> None:
        """
        After a link that was up closes, the next attempt comes after the
        first delay again, however long the back-off had grown; a refusal
        reported earlier is withdrawn once a link is up.
        """
        self.link.startService()
        for _ in range(3):
            self.succeed(identity(PEER, secret=b"another secret"))
            self.retry()
        self.assertEqual(self.link.failures, 3)
        client = self.succeed()
        self.assertIsNotNone(client.peer)
        self.assertIs(self.link.protocol, client)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        client.abort()
        self.flush()
        self.assertIsNone(self.link.protocol)
        self.assertEqual(self.link.failures, 0)
        self.assertEqual(self.retryDelay(), RETRY_INITIAL)
        self.assertEqual(self.refusals[-1], (PEER, None))
        self.retry()
        self.fail()
        self.assertEqual(self.retryDelay(), RETRY_INITIAL)

    def test_wrongNodeBacksOffLikeAuth(self) -> None:
        """
        Finding another node at the peer's address (a C{conflict}) backs off
        as far as an auth refusal does, and is reported to the owner as a
        refusal.
        """
        self.link.startService()
        delays = []
        for _ in range(11):
            client = self.succeed(identity(3))
            self.assertTrue(client.closed)
            self.assertIsNone(client.peer)
            delays.append(self.retryDelay())
            self.retry()
        self.assertEqual(delays[-1], 60.0)
        self.assertEqual([member for member, _ in self.refusals], [PEER])


    def test_closedDuringHandshake(self) -> None:
        """
        A connection that closes before the handshake ends counts as a
        failure like an unreachable peer.
        """
        self.link.startService()
        attempt = self.attempts[-1]
        client = attempt.factory.buildProtocol(None)
        client.makeConnection(StringTransport())
        attempt.deferred.callback(client)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.link.failures, 1)
        self.assertEqual(self.retryDelay(), RETRY_INITIAL)
        self.assertEqual(self.lines(), [f"link to node 2 at {PEER_ADDRESS} closed during the handshake"])


class LogTests(LinkCase):
    """
    Each reason for a failing link is logged once, then at most once a
    minute with a count.
    """

    def test_sameCauseLoggedOnceThenEveryMinute(self) -> None:
        """
        A peer that stays down is logged at the first failure; the failures
        of the next minute are not; the first failure a minute or more later
        is logged with how many there were.
        """
        self.link.startService()
        self.fail()
        self.assertEqual(len(self.events), 1)
        self.assertIn(f"cannot reach node 2 at {PEER_ADDRESS}", self.lines()[0])
        failures = 1
        while self.reactor.seconds() < REPEAT_LOG_INTERVAL:
            self.retry()
            self.fail()
            failures += 1
        self.assertEqual(len(self.events), 2, self.lines())
        line = self.lines()[1]
        self.assertIn(f"cannot reach node 2 at {PEER_ADDRESS}", line)
        self.assertIn(f"({failures - 1} times in the last", line)
        for _ in range(10):
            self.retry()
            self.fail()
        self.assertEqual(len(self.events), 2)

    def test_warningLevel(self) -> None:
        """
        The lines are warnings: a peer that cannot be linked is worth an
        operator's attention.
        """
        self.link.startService()
        self.fail()
        self.assertEqual([e["log_level"].name for e in self.events], ["warn"])

    def test_alternatingCausesEachLoggedOnce(self) -> None:
        """
        Two causes that alternate (a peer that sometimes refuses the
        connection and sometimes closes it during the handshake) are each
        logged once in a minute, not at every failure.
        """
        self.link.startService()
        for _ in range(5):
            self.fail()
            self.retry()
            attempt = self.attempts[-1]
            client = attempt.factory.buildProtocol(None)
            client.makeConnection(StringTransport())
            attempt.deferred.callback(client)
            client.connectionLost(Failure(ConnectionDone()))
            self.retry()
        self.assertEqual(len(self.events), 2, self.lines())



class StopTests(LinkCase):
    """
    Stopping a link leaves nothing behind.
    """

    def test_stopCancelsRetry(self) -> None:
        """
        Stopping while a retry is scheduled cancels it: no timer is left and
        no attempt follows.
        """
        self.link.startService()
        self.fail()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.successResultOf(self.link.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(10)
        self.assertEqual(len(self.attempts), 1)

    def test_stopCancelsAttempt(self) -> None:
        """
        Stopping while an attempt is under way cancels it, and the
        cancellation is neither counted, logged nor retried.
        """
        self.link.startService()
        self.successResultOf(self.link.stopService())
        self.assertTrue(self.attempts[0].cancelled)
        self.assertEqual(self.link.failures, 0)
        self.assertEqual(self.events, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopClosesOpenLink(self) -> None:
        """
        Stopping with the link up closes it; the Deferred fires once it is
        closed, and no retry is scheduled.
        """
        self.link.startService()
        client = self.succeed()
        self.assertTrue(client.isReady())
        d = self.link.stopService()
        self.assertNoResult(d)
        self.flush()
        self.successResultOf(d)
        self.assertTrue(client.closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopWithRealEndpoint(self) -> None:
        """
        With the real endpoint on a memory reactor, stopping during the
        attempt stops the connector and leaves no timer (the endpoint's own
        included).
        """
        self.patch(membership, "clientEndpoint", realClientEndpoint)
        self.link.startService()
        ((host, port, *_),) = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 9002))
        self.successResultOf(self.link.stopService())
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_badAddressNotRetried(self) -> None:
        """
        An address that is not C{HOST:PORT} is logged once and not retried
        (no timer, no attempt).
        """
        self.patch(membership, "clientEndpoint", realClientEndpoint)
        link = PeerLink(PEER, "nonsense", self.reactor, self.factory)
        link.startService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.events), 1)
        self.assertIn("cannot link to node 2", self.lines()[0])
        self.successResultOf(link.stopService())


class FakeLink:
    """
    A control connection as L{Membership} sees it.
    """

    def __init__(self, node: int, incoming: bool, ready: bool = True, address: Optional[str] = None) -> None:
        self.peer = PeerInfo("node", node, address or f"127.0.0.1:{9000 + node}", "control")
        self.incoming = incoming
        self.ready = ready
        self.sent: List[Any] = []
        self.encoded: List[bytes] = []
        self.refused: List[Tuple[str, str]] = []
        self.aborted = 0
        self.closed: Deferred = Deferred()

    def isReady(self) -> bool:
        return self.ready

    def sendMessage(self, message: Message) -> None:
        self.sent.append(message)

    def sendEncoded(self, payload: bytes) -> None:
        self.encoded.append(payload)

    def refuse(self, code: str, reason: str) -> None:
        self.refused.append((code, reason))

    def whenClosed(self) -> Deferred:
        return self.closed

    def abort(self) -> None:
        self.aborted += 1


def membershipOnMemory(case: SynchronousTestCase, observer: Any) -> Membership:
    """
    The membership of node C{ME} on a L{MemoryReactorClock} (set as
    C{case.reactor}), its links' connection attempts going nowhere, its log
    events given to C{observer}.
    """
    case.reactor = MemoryReactorClock()
    case.patch(
        membership, "clientEndpoint", lambda reactor, address, timeout, security: FakeEndpoint([], address, security)
    )
    case.patch(Membership, "log", Logger(observer=observer))
    return Membership(ME, "127.0.0.1:9001", identity(ME), case.reactor, Handler)


class MembershipTests(SynchronousTestCase):
    """
    L{Membership}: members, their links, and where messages go.
    """

    def setUp(self) -> None:
        self.members = membershipOnMemory(self, lambda e: None)
        self.ups: List[int] = []
        self.downs: List[int] = []
        self.losts: List[int] = []
        self.members.onLinkUp = self.ups.append
        self.members.onLinkDown = self.downs.append
        self.members.onLinkLost = self.losts.append

    def test_learn(self) -> None:
        """
        Learning a member records its address and gives it a reconnecting
        link service; learning it again, or learning this node itself,
        changes nothing.
        """
        self.assertTrue(self.members.learn(2, "127.0.0.1:9002", configured=True))
        self.assertFalse(self.members.learn(2, "127.0.0.1:9999"))
        self.assertFalse(self.members.learn(ME, "127.0.0.1:9001"))
        self.assertEqual(self.members.ids(), [2])
        self.assertIn(2, self.members)
        self.assertNotIn(ME, self.members)
        record = self.members.members[2]
        self.assertEqual((record.address, record.configured), ("127.0.0.1:9002", True))
        self.assertIsInstance(record.service, PeerLink)
        self.assertIs(record.service.parent, self.members)
        self.assertEqual(self.members.addressOf(2), "127.0.0.1:9002")
        self.assertEqual(self.members.addressOf(ME), "127.0.0.1:9001")
        self.assertIsNone(self.members.addressOf(5))

    def test_maxMembers(self) -> None:
        """
        With C{maxMembers} reached, a learned id is not added (one warning,
        however many come); a configured peer still is.
        """
        events: List[dict] = []
        self.patch(Membership, "log", Logger(observer=events.append))
        self.members.maxMembers = 3
        for i in range(20):
            self.members.learn(10 + i, f"127.0.0.1:{9010 + i}")
        self.assertEqual(self.members.ids(), [10, 11, 12])
        self.assertEqual(len([e for e in events if "most allowed" in formatEvent(e)]), 1)
        self.assertTrue(self.members.learn(2, "127.0.0.1:9002", configured=True))
        self.assertEqual(self.members.ids(), [2, 10, 11, 12])

    def test_linkUpOnce(self) -> None:
        """
        A member's first accepted link reports it up (and makes it a member
        if it was not one); a second link does not report it again.
        """
        first, second = FakeLink(2, incoming=True), FakeLink(2, incoming=False)
        self.assertTrue(self.members.controlReady(first))
        self.assertIn(2, self.members)
        self.assertTrue(self.members.controlReady(second))
        self.assertEqual(self.ups, [2])
        self.assertEqual(self.members.members[2].links, {first, second})

    def test_downOnlyWhenLastLinkCloses(self) -> None:
        """
        Closing one of two links reports it lost (messages on it may be
        gone), not down; closing the last reports it down once.
        """
        first, second = FakeLink(2, incoming=True), FakeLink(2, incoming=False)
        self.members.controlReady(first)
        self.members.controlReady(second)
        self.members.controlClosed(first)
        self.assertEqual((self.downs, self.losts), ([], [2]))
        self.members.controlClosed(second)
        self.assertEqual((self.downs, self.losts), ([2], [2]))
        self.members.controlClosed(second)
        self.assertEqual(self.downs, [2])

    def test_unknownLinkClosedIgnored(self) -> None:
        """
        A link that was never accepted closing reports nothing.
        """
        self.members.controlClosed(FakeLink(3, incoming=True))
        self.assertEqual((self.ups, self.downs, self.losts), ([], [], []))

    def test_ownIdRefused(self) -> None:
        """
        A link from a node claiming this node's id is refused with
        C{conflict} and not accepted.
        """
        impostor = FakeLink(ME, incoming=True)
        self.assertFalse(self.members.controlReady(impostor))
        ((code, reason),) = impostor.refused
        self.assertEqual(code, "conflict")
        self.assertIn("node id 1", reason)
        self.assertEqual(self.members.members, {})
        self.assertEqual(self.ups, [])

    def test_movedMemberFollowed(self) -> None:
        """
        A member that proves itself from a new address is known at that
        address from now on, and its link service reconnects there.
        """
        self.members.learn(2, "127.0.0.1:9002")
        self.members.controlReady(FakeLink(2, incoming=True, address="127.0.0.1:9102"))
        self.assertEqual(self.members.addressOf(2), "127.0.0.1:9102")
        self.assertEqual(self.members.members[2].service.address, "127.0.0.1:9102")

    def test_sendToPrefersOutgoing(self) -> None:
        """
        C{sendTo} uses our own outgoing link when it is up, else an incoming
        one, and says whether it could send at all.
        """
        incoming, outgoing = FakeLink(2, incoming=True), FakeLink(2, incoming=False)
        self.members.controlReady(incoming)
        self.members.controlReady(outgoing)
        ping = Message("stale", epoch=1, leader=1)
        self.assertTrue(self.members.sendTo(2, ping))
        self.assertEqual((incoming.sent, outgoing.sent), ([], [ping]))
        outgoing.ready = False
        self.assertTrue(self.members.sendTo(2, ping))
        self.assertEqual((incoming.sent, outgoing.sent), ([ping], [ping]))
        incoming.ready = False
        self.assertFalse(self.members.sendTo(2, ping))
        self.assertFalse(self.members.sendTo(7, ping))

    def test_broadcastEncodesOnce(self) -> None:
        """
        C{broadcast} encodes the message once and sends those bytes on one
        link of every member that has one up (or of those it is told).
        """
        calls: List[Message] = []

        def counting(message: Message) -> bytes:
            calls.append(message)
            return encode(message)

        self.patch(membership, "encode", counting)
        links = {node: FakeLink(node, incoming=False) for node in (2, 3, 4)}
        for link in links.values():
            self.members.controlReady(link)
        links[4].ready = False
        self.members.learn(5, "127.0.0.1:9005")
        beat = Message("heartbeat", node=ME, epoch=1, leader=ME, members=[])
        self.members.broadcast(beat)
        self.assertEqual(calls, [beat])
        payload = encode(beat)
        self.assertEqual([links[n].encoded for n in (2, 3, 4)], [[payload], [payload], []])
        self.members.broadcast(beat, to=[3, 9])
        self.assertEqual(len(calls), 2)
        self.assertEqual([len(links[n].encoded) for n in (2, 3, 4)], [1, 2, 0])

    def test_closeLinksBothDirections(self) -> None:
        """
        C{closeLinks} aborts every control connection, ours and theirs, and
        fires once all are closed.
        """
        links = [FakeLink(2, incoming=True), FakeLink(2, incoming=False), FakeLink(3, incoming=True)]
        for link in links:
            self.members.controlReady(link)
        d = self.members.closeLinks()
        self.assertEqual([link.aborted for link in links], [1, 1, 1])
        self.assertNoResult(d)
        for link in links:
            link.closed.callback(None)
        self.successResultOf(d)

    def test_memberLinkChoice(self) -> None:
        """
        L{Member.link} picks the outgoing ready link, else any ready one,
        else none.
        """
        member = Member(2, "127.0.0.1:9002", configured=False)
        self.assertIsNone(member.link())
        incoming = FakeLink(2, incoming=True)
        member.links.add(incoming)
        self.assertIs(member.link(), incoming)
        outgoing = FakeLink(2, incoming=False)
        member.links.add(outgoing)
        self.assertIs(member.link(), outgoing)
        outgoing.ready = incoming.ready = False
        self.assertIsNone(member.link())

    def test_refusalsTracked(self) -> None:
        """
        A link refused by its peer is listed in C{refused} with the reason
        until it is withdrawn, and each change is reported with C{onChange}.
        """
        changes: List[None] = []
        self.members.onChange = lambda: changes.append(None)
        self.members.learn(2, "127.0.0.1:9002")
        service = self.members.members[2].service
        service.onRefused(2, "wrong secret")
        self.assertEqual(self.members.refused, {2: "wrong secret"})
        service.onRefused(2, None)
        self.assertEqual(self.members.refused, {})
        self.assertEqual(len(changes), 2)


class ForgetTests(SynchronousTestCase):
    """
    L{Membership.sweep}: learned members that stay down are forgotten after
    C{forgetAfter}; configured ones never are.
    """

    def setUp(self) -> None:
        self.events: List[dict] = []
        self.members = membershipOnMemory(self, self.events.append)
        self.members.forgetAfter = 600.0
        self.members.startService()
        self.addCleanup(self.members.stopService)
        self.downs: List[int] = []
        self.members.onLinkDown = self.downs.append
        self.live: set = set()

    def sweep(self) -> List[int]:
        return self.members.sweep(lambda member: member in self.live)

    def test_learnedForgottenAfterSilence(self) -> None:
        """
        A learned member never alive is forgotten C{forgetAfter} seconds
        after it was learned, not a moment before: it leaves the members,
        its link service stops (no reconnect timer left), and one line says
        so.
        """
        self.members.learn(5, "127.0.0.1:9005")
        service = self.members.members[5].service
        self.assertTrue(service.running)
        self.reactor.advance(599)
        self.assertEqual(self.sweep(), [])
        self.assertIn(5, self.members)
        self.reactor.advance(1)
        self.assertEqual(self.sweep(), [5])
        self.assertNotIn(5, self.members)
        self.assertFalse(service.running)
        self.assertIsNone(service.parent)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        lines = [formatEvent(e) for e in self.events if "forgot" in formatEvent(e)]
        self.assertEqual(lines, ["forgot node 5 at 127.0.0.1:9005: not alive for 600s (--forget-after)"])
        self.assertEqual(self.sweep(), [])

    def test_aliveResetsTheClock(self) -> None:
        """
        The time counts from when the member was last seen alive.
        """
        self.members.learn(5, "127.0.0.1:9005")
        self.reactor.advance(500)
        self.live.add(5)
        self.sweep()
        self.live.discard(5)
        self.reactor.advance(599)
        self.assertEqual(self.sweep(), [])
        self.reactor.advance(1)
        self.assertEqual(self.sweep(), [5])

    def test_configuredNeverForgotten(self) -> None:
        """
        A member given with --peer or --cluster stays, however long down.
        """
        self.members.learn(2, "127.0.0.1:9002", configured=True)
        self.reactor.advance(10 * 600)
        self.assertEqual(self.sweep(), [])
        self.assertIn(2, self.members)

    def test_openLinksClosed(self) -> None:
        """
        A forgotten member's links (up but silent) are closed and it is
        reported down once; their closing later changes nothing.
        """
        link = FakeLink(5, incoming=True)
        self.members.controlReady(link)
        self.reactor.advance(600)
        self.assertEqual(self.sweep(), [5])
        self.assertEqual((link.aborted, self.downs), (1, [5]))
        self.members.controlClosed(link)
        self.assertEqual(self.downs, [5])

    def test_neverWithoutSetting(self) -> None:
        """
        With C{forgetAfter} None nothing is forgotten.
        """
        self.members.forgetAfter = None
        self.members.learn(5, "127.0.0.1:9005")
        self.reactor.advance(10**6)
        self.assertEqual(self.sweep(), [])


class ConflictTests(SynchronousTestCase):
    """
    A second node claiming an id that another node holds is refused with
    C{conflict}, logged once and listed in C{conflicts}.
    """

    HOLDER = "sha256:" + "11" * 32
    IMPOSTOR = "sha256:" + "99" * 32

    def setUp(self) -> None:
        self.events: List[dict] = []
        self.members = membershipOnMemory(self, self.events.append)
        self.members.forgetAfter = 600.0
        self.ups: List[int] = []
        self.members.onLinkUp = self.ups.append

    def link(self, node: int, address: str, fingerprint: Optional[str], incoming: bool = True) -> FakeLink:
        link = FakeLink(node, incoming=incoming, address=address)
        link.peer.fingerprint = fingerprint
        return link

    def warnings(self) -> List[str]:
        return [formatEvent(e) for e in self.events if e["log_level"].name == "warn"]

    def test_liveHolderKeepsId(self) -> None:
        """
        While node 2 is linked from its address with its certificate, a
        node claiming id 2 from another address, or from the same address
        with another certificate, is refused with C{conflict}, is not a
        member and is listed; the holder keeps its address and certificate.
        """
        holder = self.link(2, "127.0.0.1:9002", self.HOLDER)
        self.assertTrue(self.members.controlReady(holder))
        for address, fingerprint in (("127.0.0.1:9102", self.IMPOSTOR), ("127.0.0.1:9002", self.IMPOSTOR)):
            impostor = self.link(2, address, fingerprint)
            self.assertFalse(self.members.controlReady(impostor))
            ((code, reason),) = impostor.refused
            self.assertEqual(code, "conflict")
            self.assertIn(f"node id 2 is already held by the node at 127.0.0.1:9002 ({self.HOLDER})", reason)
        self.assertEqual(self.members.members[2].links, {holder})
        self.assertEqual((self.members.addressOf(2), self.members.fingerprintOf(2)), ("127.0.0.1:9002", self.HOLDER))
        self.assertEqual(self.ups, [2])
        self.assertEqual(
            [(c["id"], c["address"], c["fingerprint"]) for c in self.members.conflictList()],
            [(2, "127.0.0.1:9002", self.IMPOSTOR), (2, "127.0.0.1:9102", self.IMPOSTOR)],
        )

    def test_sameNodeAgainAccepted(self) -> None:
        """
        The holder's own second link (same address, same certificate) is
        no conflict.
        """
        self.assertTrue(self.members.controlReady(self.link(2, "127.0.0.1:9002", self.HOLDER)))
        self.assertTrue(self.members.controlReady(self.link(2, "127.0.0.1:9002", self.HOLDER, incoming=False)))
        self.assertEqual(self.members.conflictList(), [])

    def test_loggedOncePerClaimant(self) -> None:
        """
        A claimant that keeps trying is logged once; its entry counts the
        attempts and says when it was first and last seen.
        """
        self.members.controlReady(self.link(2, "127.0.0.1:9002", self.HOLDER))
        self.reactor.advance(10)
        for _ in range(3):
            self.members.controlReady(self.link(2, "127.0.0.1:9102", self.IMPOSTOR))
            self.reactor.advance(5)
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("refused node 2 at 127.0.0.1:9102", self.warnings()[0])
        ((entry),) = self.members.conflictList()
        self.assertEqual(
            {k: entry[k] for k in ("count", "since", "seen")}, {"count": 3, "since": 10.0, "seen": 20.0}
        )

    def test_configuredAddressWins(self) -> None:
        """
        A configured member is not linked yet: a node claiming its id from
        another address is refused all the same; from the configured
        address it is accepted.
        """
        self.members.learn(2, "127.0.0.1:9002", configured=True)
        self.assertFalse(self.members.controlReady(self.link(2, "127.0.0.1:9102", self.IMPOSTOR)))
        self.assertEqual(self.members.addressOf(2), "127.0.0.1:9002")
        self.assertEqual(self.members.members[2].service.address, "127.0.0.1:9002")
        self.assertTrue(self.members.controlReady(self.link(2, "127.0.0.1:9002", self.HOLDER)))

    def test_ownIdListed(self) -> None:
        """
        A node claiming this node's own id is refused and listed too.
        """
        self.assertFalse(self.members.controlReady(self.link(ME, "127.0.0.1:9101", self.IMPOSTOR)))
        self.assertEqual([c["address"] for c in self.members.conflictList()], ["127.0.0.1:9101"])

    def test_conflictsExpire(self) -> None:
        """
        A conflict not seen for C{forgetAfter} seconds leaves the list.
        """
        self.members.controlReady(self.link(ME, "127.0.0.1:9101", self.IMPOSTOR))
        self.reactor.advance(599)
        self.members.sweep(lambda member: False)
        self.assertEqual(len(self.members.conflictList()), 1)
        self.reactor.advance(1)
        self.members.sweep(lambda member: False)
        self.assertEqual(self.members.conflictList(), [])

    def test_holderDownLearnedMoves(self) -> None:
        """
        A learned member with no link up may come back from a new address
        (it proved the secret): that is a move, not a conflict.
        """
        self.members.learn(2, "127.0.0.1:9002")
        self.assertTrue(self.members.controlReady(self.link(2, "127.0.0.1:9102", self.IMPOSTOR)))
        self.assertEqual(self.members.addressOf(2), "127.0.0.1:9102")
        self.assertEqual(self.members.conflictList(), [])


class LateRefusalTests(LinkCase):
    """
    A link refused after its handshake (an id conflict) backs off and is
    reported like one refused in it.
    """

    def test_lateConflictBacksOff(self) -> None:
        """
        The peer refuses the link that is up with C{conflict}: the link
        reports the refusal, logs it once and waits longer each time, up to
        L{AUTH_RETRY_MAX}, instead of reconnecting at once.
        """
        self.link.startService()
        delays = []
        for attempt in range(12):
            client = self.succeed()
            self.assertTrue(client.isReady())
            self.link.refusedAfterHandshake("conflict", "node id 1 is already held by the node at 127.0.0.1:9001")
            client.transport.loseConnection()
            self.flush()
            delays.append(self.retryDelay())
            if attempt < 11:
                self.retry()
        self.assertEqual(delays[:3], [RETRY_INITIAL, RETRY_INITIAL * 2, RETRY_INITIAL * 4])
        self.assertEqual(delays[-1], AUTH_RETRY_MAX)
        self.assertEqual(self.refusals, [(PEER, "node id 1 is already held by the node at 127.0.0.1:9001")])
        # Twelve refusals over some 160 s: logged at once, then at most
        # once a minute.
        lines = [line for line in self.lines() if "refused the link" in line]
        self.assertLessEqual(len(lines), 1 + sum(delays) // REPEAT_LOG_INTERVAL)
        self.assertNotIn("times in the last", lines[0])

    def test_upWithoutRefusalRetriesAtOnce(self) -> None:
        """
        The counterpart: a link that was up and closed with no refusal is
        tried again after the shortest delay.
        """
        self.link.startService()
        client = self.succeed()
        client.transport.loseConnection()
        self.flush()
        self.assertEqual(self.retryDelay(), RETRY_INITIAL)
        self.assertEqual(self.refusals, [])
