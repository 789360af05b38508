"""
Tests for L{p2pfiles.session}: the per-connection state machine of a request
connection, driven through a real L{P2PProtocol} over a L{StringTransport}
and a fake L{IRequestContext} (the session never sees a node).
"""

import hashlib
import io
from typing import Any, Callable, Dict, List, Optional, Tuple

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import auth, session
from p2pfiles.errors import P2PError
from p2pfiles.indexstream import IndexSender
from p2pfiles.localindex import Changes
from p2pfiles.protocol import IConnectionHandler, LocalIdentity, P2PProtocol
from p2pfiles.session import (
    CLOSED,
    FETCHING,
    IDLE,
    RELAYING,
    SENDING_INDEX,
    SENDING_LISTING,
    SERVING,
    WATCHING,
    IRequestContext,
    RequestSession,
    LISTING_ROWS_PER_FRAME,
    StatusWatch,
    encodeListing,
)
from p2pfiles.wire import ENTRIES_PER_FRAME, FileEntry, Message, decode
from tests.channels import PlainSecurity, plainIdentity
from tests.frames import frame, hello, proofFor

ME = 2
# This node's incarnation, as its local index would make it.
INCARNATION = "89abcdef01234567"
MY_ADDRESS = "127.0.0.1:9002"
LEADER_ADDRESS = "127.0.0.1:9001"
# A client presents no certificate.
CLIENT = plainIdentity("client", None, None, b"", "request", PlainSecurity(fingerprint=None))


def nodeIdentity(node: int) -> LocalIdentity:
    # Each node presents a certificate of its own.
    fingerprint = "sha256:" + f"{node:02x}" * 32
    return plainIdentity("node", node, f"127.0.0.1:{9000 + node}", b"", "request", PlainSecurity(fingerprint))


def entryOf(name: str, data: bytes) -> FileEntry:
    return FileEntry(name, len(data), 1000.0, hashlib.sha256(data).hexdigest())


def parseStream(data: bytes) -> List[Any]:
    """
    What a receiver makes of C{data}: frames as L{Message}s, and after a
    C{file} header its raw section as one C{bytes} item.
    """
    items: List[Any] = []
    while len(data) >= 4:
        length = int.from_bytes(data[:4], "big")
        if len(data) < 4 + length:
            break
        message = decode(data[4 : 4 + length])
        data = data[4 + length :]
        items.append(message)
        if message.type == "file":
            raw = message.size - message.offset
            items.append(data[:raw])
            data = data[raw:]
    return items


class Ended:
    """
    The callable a context hands out for a transfer's end: records it.
    """

    def __init__(self, what: str, name: str, peer: str, size: int, progress: Callable[[], int]) -> None:
        self.what = what
        self.name = name
        self.peer = peer
        self.size = size
        self.progress = progress
        self.results: List[Any] = []
        # What the session's progress() said as the end was reported.
        self.moved: List[int] = []

    def __call__(self, result: Any) -> None:
        self.results.append(result)
        self.moved.append(self.progress())


class FakeUpstream:
    """
    What C{openUpstream} fires with: a client connection to a holder whose
    replies the test gives by hand.
    """

    def __init__(self) -> None:
        self.sent: List[Message] = []
        self.onClose: Optional[Callable[[P2PError], None]] = None
        self.transport = StringTransport()
        self.replies: Deferred = Deferred()
        self.closed = False
        self.sink: Optional[Callable[[bytes], None]] = None
        self.done: Optional[Callable[[], None]] = None

    def send(self, message: Message) -> None:
        self.sent.append(message)

    def receive(self) -> Deferred:
        return self.replies

    def receiveRaw(self, sink: Callable[[bytes], None], done: Callable[[], None]) -> None:
        self.sink, self.done = sink, done

    def close(self) -> None:
        self.closed = True


@implementer(IRequestContext)
class FakeContext:
    """
    A node as its request sessions see it, with every answer set by the test
    and every request recorded.
    """

    def __init__(self, me: int = ME, leader: Optional[int] = ME) -> None:
        self.me = me
        self.clock = Clock()
        self.leader = leader
        self.addresses = {ME: MY_ADDRESS, 1: LEADER_ADDRESS}
        self.statusValue: Dict[str, Any] = {"id": me, "role": "leader"}
        self.watchers: List[Callable[[Dict[str, Any]], None]] = []
        self.watchesStopped = 0
        self.files: List[Dict[str, Any]] = []
        self.contents: Dict[str, Tuple[FileEntry, List[Tuple[int, str]]]] = {}
        self.contentCalls: List[Tuple[str, Optional[str], bool]] = []
        self.relayCount = 0
        self.relayAsked: List[int] = []
        self.local: Dict[str, FileEntry] = {}
        self.data: Dict[str, bytes] = {}
        self.openError: Optional[P2PError] = None
        self.opened: List[Tuple[str, int, io.BytesIO]] = []
        self.upstreams: List[Tuple[str, Deferred]] = []
        self.fetches: List[Tuple[str, bool, Deferred]] = []
        self.fetchCancels = 0
        self.indexAsks: List[Tuple[Optional[str], int, Deferred]] = []
        self.indexCancels = 0
        self.progressValue = (0, 0)
        self.ended: List[Ended] = []

    def isLeader(self) -> bool:
        return self.leader == self.me

    def leaderId(self) -> Optional[int]:
        return self.leader

    def leaderAddress(self) -> Optional[str]:
        return None if self.leader is None else self.addresses.get(self.leader)

    def status(self) -> Dict[str, Any]:
        return dict(self.statusValue)

    def watchStatus(self, callback: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        self.watchers.append(callback)

        def stop() -> None:
            self.watchesStopped += 1
            self.watchers.remove(callback)

        return stop

    def listing(self) -> List[Dict[str, Any]]:
        return self.files

    def listingFrames(self) -> List[bytes]:
        return encodeListing(self.files)

    def content(self, name: str, sha256: Optional[str], everyone: bool = False) -> Any:
        self.contentCalls.append((name, sha256, everyone))
        found = self.contents.get(name)
        if found is None or (sha256 is not None and found[0].sha256 != sha256):
            return None
        return found

    def nextRelay(self, count: int) -> int:
        self.relayAsked.append(count)
        start = self.relayCount % count
        self.relayCount += 1
        return start

    def localEntry(self, name: str) -> Optional[FileEntry]:
        return self.local.get(name)

    def openShared(self, entry: FileEntry, offset: int) -> Any:
        if self.openError is not None:
            raise self.openError
        f = io.BytesIO(self.data[entry.name])
        f.seek(offset)
        self.opened.append((entry.name, offset, f))
        return f

    def openUpstream(self, address: str) -> Deferred:
        d: Deferred = Deferred()
        self.upstreams.append((address, d))
        return d

    def fetch(self, name: str, overwrite: bool) -> Deferred:
        def cancelled(d: Deferred) -> None:
            self.fetchCancels += 1

        d: Deferred = Deferred(cancelled)
        self.fetches.append((name, overwrite, d))
        return d

    def indexSince(self, incarnation: Optional[str], since: int) -> Deferred:
        def cancelled(d: Deferred) -> None:
            self.indexCancels += 1

        d: Deferred = Deferred(cancelled)
        self.indexAsks.append((incarnation, since, d))
        return d

    def fetchProgress(self, name: str) -> Tuple[int, int]:
        return self.progressValue

    def transferStarted(self, session: Any, what: str, name: str, peer: str, size: int) -> Callable[[Any], None]:
        ended = Ended(what, name, peer, size, session.progress)
        self.ended.append(ended)
        return ended

    # For tests.

    def share(self, name: str, data: bytes) -> FileEntry:
        entry = entryOf(name, data)
        self.local[name] = entry
        self.data[name] = data
        return entry


class Connection:
    """
    One request connection to a L{RequestSession}: a real listening
    L{P2PProtocol} on a L{StringTransport}, over a plain test channel that
    shows it the certificate C{identity} presents, taken through the
    handshake by hand as C{identity}.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        context: FakeContext,
        identity: LocalIdentity = CLIENT,
        idleTimeout: Optional[float] = None,
    ) -> None:
        self.case = case
        self.session = RequestSession(context, idleTimeout)
        listener = plainIdentity(
            "node", context.me, MY_ADDRESS, b"", "request", PlainSecurity(peer=identity.fingerprint)
        )
        self.protocol = P2PProtocol(listener, self.session, context.clock, listening=True)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9002),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.protocol.makeConnection(self.transport)
        mine = hello(identity, auth.makeNonce())
        self.protocol.dataReceived(frame(mine))
        answer, listenerAuth = parseStream(self.transport.value())
        case.assertEqual(listenerAuth.proof, proofFor(b"", auth.LISTENER, mine, answer))
        self.transport.clear()
        self.protocol.dataReceived(frame(Message("auth", proof=proofFor(b"", auth.CONNECTOR, mine, answer))))
        case.assertEqual([m.type for m in parseStream(self.transport.value())], ["ready"])
        self.transport.clear()
        case.assertIs(self.session.connection, self.protocol)
        case.addCleanup(self.close)

    def send(self, message: Message) -> None:
        self.protocol.dataReceived(frame(message))

    def received(self) -> List[Any]:
        """
        Everything sent to the client since the last call.
        """
        items = parseStream(self.transport.value())
        self.transport.clear()
        return items

    def pumpFile(self) -> None:
        """
        Let the transport pull from its producer until the producer is done
        (as a TCP transport does when its buffer drains).
        """
        for _ in range(100):
            if self.transport.producer is None or self.transport.streaming:
                return
            self.transport.producer.resumeProducing()
        raise AssertionError("the producer never finished")

    @property
    def dropped(self) -> bool:
        return self.transport.disconnecting

    def close(self, tcpLike: bool = True) -> None:
        """
        The connection is lost.  Like a TCP transport, with C{tcpLike} a
        registered producer is told to stop first.
        """
        if self.protocol.closed:
            return
        if tcpLike and self.transport.producer is not None:
            producer, self.transport.producer = self.transport.producer, None
            producer.stopProducing()
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.context = FakeContext()
        self.events: List[dict] = []
        self.patch(RequestSession, "log", Logger(observer=self.events.append))

    def connect(self, identity: LocalIdentity = CLIENT) -> Connection:
        return Connection(self, self.context, identity)

    def errors(self, items: List[Any]) -> List[str]:
        return [m.code for m in items if isinstance(m, Message) and m.type == "error"]

    def assertViolation(self, connection: Connection) -> None:
        """
        The session refused the last message as a protocol violation: the
        connection was told so and is being closed.
        """
        self.assertEqual(self.errors(connection.received()), ["protocol"])
        self.assertTrue(connection.dropped)

    def assertNoTimers(self) -> None:
        self.assertEqual(self.context.clock.getDelayedCalls(), [])


class InterfaceTests(Case):
    """
    The session and its context keep to their declared interfaces.
    """

    def test_fakeContextProvidesIRequestContext(self) -> None:
        """
        The fake context used by these tests provides every attribute and
        method of L{IRequestContext} with compatible signatures: if the
        interface grows, this fails until the fake (and the node) follow.
        """
        self.assertTrue(verifyObject(IRequestContext, self.context))

    def test_sessionProvidesIConnectionHandler(self) -> None:
        """
        L{RequestSession} provides L{IConnectionHandler}.
        """
        self.assertTrue(verifyObject(IConnectionHandler, RequestSession(self.context)))

    def test_startsIdle(self) -> None:
        """
        A new session is idle, with no connection until it is ready, and
        nothing in flight.
        """
        session = RequestSession(self.context)
        self.assertEqual(session.state, IDLE)
        self.assertIsNone(session.connection)
        self.assertEqual(session.progress(), 0)

    def test_closeWhileIdle(self) -> None:
        """
        Closing an idle session leaves it closed, with nothing to let go and
        nothing sent; the context hears of no transfer.
        """
        connection = self.connect()
        connection.close()
        self.assertEqual(connection.session.state, CLOSED)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual((self.context.ended, self.context.watchesStopped, self.context.fetchCancels), ([], 0, 0))

    def test_unknownTypeIsViolation(self) -> None:
        """
        A message that is not a request (a heartbeat on a request
        connection) is a protocol violation.
        """
        connection = self.connect()
        connection.send(Message("heartbeat", node=3, epoch=1, leader=1, members=[]))
        self.assertViolation(connection)

    def test_rawDataIsViolation(self) -> None:
        """
        Raw bytes are never expected on a request connection's serving end.
        """
        from p2pfiles.protocol import ProtocolViolation

        session = RequestSession(self.context)
        self.assertRaises(ProtocolViolation, session.rawDataReceived, None, b"x")

    def test_errorFromClientLogged(self) -> None:
        """
        An C{error} from the other end is logged with who sent it, and the
        session carries on.
        """
        connection = self.connect()
        connection.send(Message("error", code="io", reason="disk full"))
        self.assertEqual(connection.received(), [])
        self.assertFalse(connection.dropped)
        self.assertIn("client 127.0.0.1:50000 reports an error: disk full (io)", [formatEvent(e) for e in self.events])


class StatusTests(Case):
    """
    C{status}: idle, or watching.
    """

    def test_statusOnce(self) -> None:
        """
        C{status} without watch answers one C{state} and stays idle.
        """
        connection = self.connect()
        connection.send(Message("status", watch=False))
        (state,) = connection.received()
        self.assertEqual((state.type, state.status), ("state", {"id": ME, "role": "leader"}))
        self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(self.context.watchers, [])

    def test_watchGoesWatching(self) -> None:
        """
        C{status} with watch answers the status at once, moves to
        I{watching} and sends a C{state} on every change the context reports.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        self.assertEqual([m.type for m in connection.received()], ["state"])
        self.assertEqual(connection.session.state, WATCHING)
        (watcher,) = self.context.watchers
        watcher({"id": ME, "role": "follower"})
        (state,) = connection.received()
        self.assertEqual(state.status, {"id": ME, "role": "follower"})

    def test_secondWatchNotDoubled(self) -> None:
        """
        Asking to watch again answers the status but does not open a second
        watch.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        connection.send(Message("status", watch=True))
        self.assertEqual([m.type for m in connection.received()], ["state", "state"])
        self.assertEqual(len(self.context.watchers), 1)

    def test_getWhileWatchingIsViolation(self) -> None:
        """
        A C{get} on a connection that is watching is a violation: its file
        bytes would be interleaved with status frames.
        """
        connection = self.connect()
        self.context.share("a.txt", b"abc")
        connection.send(Message("status", watch=True))
        connection.received()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertViolation(connection)
        self.assertEqual(self.context.opened, [])

    def test_otherRequestsWhileWatching(self) -> None:
        """
        C{ls} and C{lookup} are answered while watching, and the session
        stays watching.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        connection.send(Message("ls"))
        connection.send(Message("lookup", name="nothing"))
        self.assertEqual(
            [m.type for m in connection.received()], ["state", "listing", "error"]
        )
        self.assertEqual(connection.session.state, WATCHING)
        self.assertFalse(connection.dropped)

    def test_fetchWhileWatchingKeepsWatching(self) -> None:
        """
        A fetch answered on a watching connection leaves it watching: a
        C{get} afterwards is still refused, since status frames keep coming.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        (_, _, d) = self.context.fetches[0]
        d.callback(Message("fetched", name="a.txt", size=3, sha256="0" * 64, already=True))
        connection.received()
        self.assertEqual(connection.session.state, WATCHING)


    def test_closeStopsWatch(self) -> None:
        """
        Closing a watching connection stops its watch, and a change the
        context reports afterwards sends nothing.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        (watcher,) = self.context.watchers
        connection.received()
        connection.close()
        self.assertEqual(self.context.watchesStopped, 1)
        self.assertEqual(connection.session.state, CLOSED)
        watcher({"id": ME})
        self.assertEqual(connection.transport.value(), b"")


class ListingAndLookupTests(Case):
    """
    C{ls} and C{lookup}: answered by the leader, redirected elsewhere.
    """

    def test_lsOnLeader(self) -> None:
        """
        The leader answers C{ls} with its listing, the last part marked.
        """
        self.context.files = [{"name": "a", "size": 1, "sha256": "0" * 64, "holders": [1, 2]}]
        connection = self.connect()
        connection.send(Message("ls"))
        (listing,) = connection.received()
        self.assertEqual((listing.type, listing.files, listing.last), ("listing", self.context.files, True))

    def test_lsSplitIntoParts(self) -> None:
        """
        A listing too large for one frame is sent in parts; only the last
        part says it is last, and together they are the whole listing.
        """
        self.context.files = [
            {"name": f"file{i:05d}" + "x" * 100, "size": i, "sha256": "0" * 64, "holders": [1]} for i in range(20000)
        ]
        connection = self.connect()
        connection.send(Message("ls"))
        parts = connection.received()
        self.assertGreater(len(parts), 1)
        self.assertEqual([p.last for p in parts], [False] * (len(parts) - 1) + [True])
        self.assertEqual([f for p in parts for f in p.files], self.context.files)

    def test_lookupOnLeader(self) -> None:
        """
        The leader answers C{lookup} with size, hash and every holder the
        index names (C{everyone}).
        """
        entry = entryOf("a.txt", b"abc")
        self.context.contents["a.txt"] = (entry, [(1, LEADER_ADDRESS), (3, "127.0.0.1:9003")])
        connection = self.connect()
        connection.send(Message("lookup", name="a.txt"))
        (found,) = connection.received()
        self.assertEqual(
            (found.type, found.name, found.size, found.sha256, found.holders),
            ("found", "a.txt", 3, entry.sha256, [1, 3]),
        )
        self.assertEqual(self.context.contentCalls, [("a.txt", None, True)])

    def test_lookupNotFound(self) -> None:
        """
        A name nobody holds is refused with C{not-found}.
        """
        connection = self.connect()
        connection.send(Message("lookup", name="missing"))
        self.assertEqual(self.errors(connection.received()), ["not-found"])
        self.assertFalse(connection.dropped)

    def test_followerRedirects(self) -> None:
        """
        A follower answers C{ls}, C{lookup} and a C{get} of a file it does
        not hold with a C{redirect} to its leader.
        """
        self.context.leader = 1
        connection = self.connect()
        connection.send(Message("ls"))
        connection.send(Message("lookup", name="a.txt"))
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        replies = connection.received()
        self.assertEqual(
            [(m.type, m.leader, m.address) for m in replies], [("redirect", 1, LEADER_ADDRESS)] * 3
        )
        self.assertEqual(connection.session.state, IDLE)

    def test_followerRedirectsClientForItsOwnFile(self) -> None:
        """
        A client asking a follower for a file the follower holds is still
        redirected: clients get files through the leader.
        """
        self.context.leader = 1
        self.context.share("a.txt", b"abc")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual([m.type for m in connection.received()], ["redirect"])
        self.assertEqual(self.context.opened, [])

    def test_noLeader(self) -> None:
        """
        With no leader, C{ls}, C{lookup} and C{get} are refused with
        C{no-leader}.
        """
        self.context.leader = None
        connection = self.connect()
        connection.send(Message("ls"))
        connection.send(Message("lookup", name="a.txt"))
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual(self.errors(connection.received()), ["no-leader"] * 3)

    def test_leaderWithoutAddressIsNoLeader(self) -> None:
        """
        A leader whose address is unknown cannot be redirected to: the
        answer is C{no-leader}, not a redirect without an address.
        """
        self.context.leader = 7
        connection = self.connect()
        connection.send(Message("ls"))
        self.assertEqual(self.errors(connection.received()), ["no-leader"])


class BadNameTests(Case):
    """
    Names are checked before anything else.
    """

    def test_badNamesRefused(self) -> None:
        """
        C{lookup}, C{get} and C{fetch} of a name that is not a plain shared
        name are refused with C{bad-name}, without asking the context, and
        the connection stays usable.
        """
        connection = self.connect()
        for name in ["../etc/passwd", ".hidden", "", "a/b", "nul\0"]:
            connection.send(Message("lookup", name=name))
            connection.send(Message("get", name=name, offset=0, sha256=None))
            connection.send(Message("fetch", name=name, overwrite=True))
            self.assertEqual(self.errors(connection.received()), ["bad-name"] * 3, name)
        self.assertEqual(self.context.contentCalls, [])
        self.assertEqual(self.context.fetches, [])
        self.assertEqual(connection.session.state, IDLE)
        self.assertFalse(connection.dropped)


class ServeTests(Case):
    """
    C{get} of this node's own file: idle -> serving -> idle.
    """

    def test_serveOwnFileOnLeader(self) -> None:
        """
        The leader serves its own file to a client: a C{file} header naming
        itself as holder and leader, then the bytes; the session is
        I{serving} until the producer is done, then idle, and the
        transfer's end is reported with the byte count while C{progress()}
        still says it (the status board reads it then).
        """
        entry = self.context.share("a.txt", b"hello world")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual(connection.session.state, SERVING)
        (ended,) = self.context.ended
        self.assertEqual((ended.what, ended.name, ended.peer, ended.size), ("serve", "a.txt", "client 127.0.0.1:50000", 11))
        connection.pumpFile()
        header, raw = connection.received()
        self.assertEqual(
            (header.type, header.name, header.size, header.sha256, header.offset, header.holder, header.leader),
            ("file", "a.txt", 11, entry.sha256, 0, ME, ME),
        )
        self.assertEqual(raw, b"hello world")
        self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(ended.results, [11])
        self.assertEqual(ended.moved, [11])
        self.assertTrue(self.context.opened[0][2].closed)

    def test_serveFromOffset(self) -> None:
        """
        A resumed C{get} is served from its offset: the header says the
        offset, and only the rest of the file follows.
        """
        self.context.share("a.txt", b"0123456789")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=4, sha256=None))
        connection.pumpFile()
        header, raw = connection.received()
        self.assertEqual((header.offset, raw), (4, b"456789"))
        self.assertEqual(self.context.ended[0].results, [6])

    def test_serveToNodeOnFollower(self) -> None:
        """
        A follower serves its own file to a node (the leader relaying from
        it), naming the leader in the header.
        """
        self.context.leader = 1
        self.context.share("a.txt", b"abc")
        connection = self.connect(nodeIdentity(1))
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.pumpFile()
        header, raw = connection.received()
        self.assertEqual((header.holder, header.leader, raw), (ME, 1, b"abc"))

    def test_leadersRelayRequestForMissingFile(self) -> None:
        """
        The leader relaying from a follower that does not hold the file
        gets C{not-found} (not a redirect to itself), so that it tries the
        next holder.
        """
        self.context.leader = 1
        connection = self.connect(nodeIdentity(1))
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual(self.errors(connection.received()), ["not-found"])

    def test_otherContentNotServed(self) -> None:
        """
        A C{get} naming another SHA-256 than this node's copy is not served
        from it: on the leader it becomes a relay question to the index.
        """
        self.context.share("a.txt", b"abc")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256="f" * 64))
        self.assertEqual(self.errors(connection.received()), ["not-found"])
        self.assertEqual(self.context.opened, [])
        self.assertEqual(self.context.contentCalls, [("a.txt", "f" * 64, False)])

    def test_openRefusalPassedOn(self) -> None:
        """
        If the context cannot open the file (it changed, or the offset is
        beyond it), the client gets that refusal's code and the session
        stays idle.
        """
        self.context.share("a.txt", b"abc")
        connection = self.connect()
        for code in ("changed", "bad-offset"):
            self.context.openError = P2PError("no", code)
            connection.send(Message("get", name="a.txt", offset=0, sha256=None))
            self.assertEqual(self.errors(connection.received()), [code])
            self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(self.context.ended, [])

    def test_emptyRemainder(self) -> None:
        """
        A C{get} from the very end of the file is a header and no bytes;
        the session is idle again at once.
        """
        self.context.share("a.txt", b"abc")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=3, sha256=None))
        header, raw = connection.received()
        self.assertEqual((header.offset, raw), (3, b""))
        self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(self.context.ended[0].results, [0])

    def test_progressWhileServing(self) -> None:
        """
        C{progress} reports the bytes the producer has sent so far.
        """
        self.context.share("a.txt", b"x" * 1000)
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        producer = connection.transport.producer
        producer.chunkSize = 100
        producer.resumeProducing()
        producer.resumeProducing()
        self.assertEqual(connection.session.progress(), 200)

    def test_requestsDuringServeAreViolations(self) -> None:
        """
        Any request while a file is being served is a protocol violation
        (its answer would land in the file bytes).
        """
        for request in (
            Message("status", watch=False),
            Message("ls"),
            Message("lookup", name="a.txt"),
            Message("get", name="a.txt", offset=0, sha256=None),
            Message("fetch", name="a.txt", overwrite=False),
        ):
            self.context.share("a.txt", b"abc")
            connection = self.connect()
            connection.send(Message("get", name="a.txt", offset=0, sha256=None))
            connection.transport.clear()
            connection.send(request)
            self.assertTrue(connection.dropped, request.type)
            self.assertEqual(self.context.fetches, [])
            connection.close()

    def test_violationDuringServeDoesNotCorruptTheFile(self) -> None:
        """
        A violation while the file's bytes are on the way closes the
        connection without writing a frame into them: the client must not
        take an error frame for file bytes.
        """
        self.context.share("a.txt", b"abcdef")
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.send(Message("ls"))
        self.assertTrue(connection.dropped)
        connection.pumpFile()
        header, raw = connection.received()
        self.assertEqual(raw, b"abcdef")


    def test_closeWhileServing(self) -> None:
        """
        Losing the connection mid-file (a TCP transport stops its producer)
        ends the transfer with a C{gone} failure, closes the file, sends
        nothing more, and leaves the session closed.
        """
        self.context.share("a.txt", b"x" * 1000)
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.transport.producer.chunkSize = 100
        connection.transport.producer.resumeProducing()
        connection.transport.clear()
        connection.close()
        self.assertEqual(connection.session.state, CLOSED)
        (ended,) = self.context.ended
        (result,) = ended.results
        self.assertEqual(result.value.code, "gone")
        self.assertTrue(self.context.opened[0][2].closed)
        self.assertEqual(connection.transport.value(), b"")
        self.assertFalse(connection.transport.disconnected, "a lost connection is not aborted again")

    def test_closeWhileServingEndsTransferItself(self) -> None:
        """
        The session's own C{connectionClosed} ends a transfer in flight,
        whatever the transport does with its producer (L{StringTransport},
        like L{twisted.test.iosim}, does not stop it).
        """
        self.context.share("a.txt", b"x" * 1000)
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.close(tcpLike=False)
        self.assertEqual(len(self.context.ended[0].results), 1)
        self.assertTrue(self.context.opened[0][2].closed)


    def test_readErrorAbortsConnection(self) -> None:
        """
        A file that ends early while served fails the transfer with C{io}
        and aborts the connection (mid-file no frame can say why).
        """
        entry = self.context.share("a.txt", b"abcdef")
        self.context.data["a.txt"] = b"abc"
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.pumpFile()
        self.assertTrue(connection.transport.disconnected)
        (result,) = self.context.ended[0].results
        self.assertEqual(result.value.code, "io")
        self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(entry.size, 6)


class RelayTests(Case):
    """
    C{get} on the leader of a file another node holds: idle -> relaying ->
    idle.
    """

    def setUp(self) -> None:
        super().setUp()
        self.entry = entryOf("a.txt", b"relayed bytes")
        self.holders = [(3, "127.0.0.1:9003"), (4, "127.0.0.1:9004"), (5, "127.0.0.1:9005")]
        self.context.contents["a.txt"] = (self.entry, list(self.holders))

    def fileHeader(self, holder: int, offset: int = 0) -> Message:
        return Message(
            "file",
            name="a.txt",
            size=self.entry.size,
            sha256=self.entry.sha256,
            offset=offset,
            holder=holder,
            leader=ME,
        )

    def test_relayThroughHolderChosenByContext(self) -> None:
        """
        The holders come from the context's C{content} (usable holders
        only), and the relay starts at the holder C{nextRelay} picks.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual(connection.session.state, RELAYING)
        self.assertEqual(self.context.contentCalls, [("a.txt", None, False)])
        self.assertEqual(self.context.relayAsked, [3])
        self.assertEqual([a for a, _ in self.context.upstreams], ["127.0.0.1:9003"])

    def test_roundRobin(self) -> None:
        """
        Successive relays start at successive holders (the context's
        C{nextRelay}), and a relay whose first holder fails goes on round the
        list from there; with none left the client is refused with
        C{unavailable} and the session is idle again.
        """
        first = self.connect()
        first.send(Message("get", name="a.txt", offset=0, sha256=None))
        second = self.connect()
        second.send(Message("get", name="a.txt", offset=0, sha256=None))
        self.assertEqual(self.context.relayAsked, [3, 3])
        self.assertEqual([a for a, _ in self.context.upstreams], ["127.0.0.1:9003", "127.0.0.1:9004"])
        tried = []
        for _ in range(3):
            address, d = self.context.upstreams[-1]
            tried.append(address)
            d.errback(P2PError("refused", "unreachable"))
        self.assertEqual(tried, ["127.0.0.1:9004", "127.0.0.1:9005", "127.0.0.1:9003"])
        self.assertEqual(self.errors(second.received()), ["unavailable"])
        self.assertEqual(second.session.state, IDLE)
        self.assertEqual(self.context.ended[1].results[0].value.code, "unavailable")
        self.assertEqual(first.session.state, RELAYING)

    def test_relayCompletes(self) -> None:
        """
        The relay asks the holder for the file with its SHA-256, passes the
        header and bytes on, ends the transfer with the count (while
        C{progress()} still says it), and the session is idle again.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        (address, d), = self.context.upstreams
        upstream = FakeUpstream()
        d.callback(upstream)
        (asked,) = upstream.sent
        self.assertEqual((asked.type, asked.name, asked.offset, asked.sha256), ("get", "a.txt", 0, self.entry.sha256))
        upstream.replies.callback(self.fileHeader(3))
        self.assertIs(connection.transport.producer, upstream.transport)
        self.assertEqual(connection.session.state, RELAYING)
        upstream.sink(b"relayed ")
        self.assertEqual(connection.session.progress(), 8)
        upstream.sink(b"bytes")
        upstream.done()
        header, raw = connection.received()
        self.assertEqual((header.type, header.holder, header.leader, raw), ("file", 3, ME, b"relayed bytes"))
        self.assertEqual(connection.session.state, IDLE)
        self.assertEqual(self.context.ended[0].results, [13])
        self.assertEqual(self.context.ended[0].moved, [13])
        self.assertEqual((self.context.ended[0].what, self.context.ended[0].size), ("relay", 13))
        self.assertIsNone(connection.transport.producer)
        self.assertTrue(upstream.closed)
        self.assertNoTimers()

    def test_badOffset(self) -> None:
        """
        A C{get} from beyond the file's end is refused with C{bad-offset};
        from exactly its end it is relayed.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=self.entry.size + 1, sha256=None))
        self.assertEqual(self.errors(connection.received()), ["bad-offset"])
        self.assertEqual(self.context.upstreams, [])
        connection.send(Message("get", name="a.txt", offset=self.entry.size, sha256=None))
        self.assertEqual(connection.session.state, RELAYING)

    def test_notFound(self) -> None:
        """
        The leader refuses a name that no usable holder has with
        C{not-found}.
        """
        connection = self.connect()
        connection.send(Message("get", name="b.txt", offset=0, sha256=None))
        self.assertEqual(self.errors(connection.received()), ["not-found"])
        self.assertEqual(connection.session.state, IDLE)

    def test_requestsDuringRelayAreViolations(self) -> None:
        """
        A request while relaying is a protocol violation: the connection is
        dropped without a frame, since the file's bytes may already be on
        their way.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.send(Message("ls"))
        self.assertTrue(connection.dropped)
        self.assertEqual(self.errors(connection.received()), [])

    def test_closeWhileConnectingUpstream(self) -> None:
        """
        Closing while the relay still connects to a holder tells the relay
        its downstream is lost: the transfer ends with C{gone}, and when the
        holder's connection comes up it is closed and nothing reaches the
        closed client.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        connection.close()
        self.assertEqual(connection.session.state, CLOSED)
        (result,) = self.context.ended[0].results
        self.assertEqual(result.value.code, "gone")
        (_, d), = self.context.upstreams
        upstream = FakeUpstream()
        d.callback(upstream)
        upstream.replies.callback(self.fileHeader(3))
        self.assertTrue(upstream.closed)
        self.assertEqual(connection.transport.value(), b"")
        self.assertNoTimers()

    def test_closeMidRelay(self) -> None:
        """
        Closing mid-file unregisters the holder as producer, closes the
        holder's connection and ends the transfer with C{gone}.
        """
        connection = self.connect()
        connection.send(Message("get", name="a.txt", offset=0, sha256=None))
        (_, d), = self.context.upstreams
        upstream = FakeUpstream()
        d.callback(upstream)
        upstream.replies.callback(self.fileHeader(3))
        upstream.sink(b"rel")
        connection.transport.clear()
        connection.close(tcpLike=False)
        self.assertIsNone(connection.transport.producer)
        self.assertTrue(upstream.closed)
        self.assertIsNone(upstream.onClose)
        (result,) = self.context.ended[0].results
        self.assertEqual(result.value.code, "gone")
        self.assertEqual(connection.transport.value(), b"")


class FetchTests(Case):
    """
    C{fetch}: idle -> fetching -> idle.
    """

    def fetched(self, already: bool = False) -> Message:
        return Message("fetched", name="a.txt", size=3, sha256="a" * 64, already=already)

    def test_fetchAnswered(self) -> None:
        """
        C{fetch} asks the context (with the overwrite flag), is I{fetching}
        meanwhile, and sends the context's C{fetched} reply when it comes,
        then is idle with no timer left.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=True))
        self.assertEqual(connection.session.state, FETCHING)
        ((name, overwrite, d),) = self.context.fetches
        self.assertEqual((name, overwrite), ("a.txt", True))
        self.assertEqual(connection.received(), [])
        d.callback(self.fetched())
        (reply,) = connection.received()
        self.assertEqual((reply.type, reply.name, reply.already), ("fetched", "a.txt", False))
        self.assertEqual(connection.session.state, IDLE)
        self.assertNoTimers()

    def test_progressWhileFetching(self) -> None:
        """
        While the fetch runs the client hears its progress every second, so
        that it can tell a working node from a silent one.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        self.context.progressValue = (10, 100)
        self.context.clock.advance(1.0)
        self.context.progressValue = (40, 100)
        self.context.clock.advance(1.0)
        self.assertEqual(
            [(m.type, m.name, m.bytes, m.size) for m in connection.received()],
            [("progress", "a.txt", 10, 100), ("progress", "a.txt", 40, 100)],
        )

    def test_fetchRefused(self) -> None:
        """
        A fetch that fails with a L{P2PError} is refused with its code and
        reason; the session is idle again and usable.
        """
        connection = self.connect()
        for code in ("conflict", "no-leader", "not-found", "verify"):
            connection.send(Message("fetch", name="a.txt", overwrite=False))
            self.context.fetches[-1][2].errback(P2PError(f"because {code}", code))
            (error,) = connection.received()
            self.assertEqual((error.type, error.code, error.reason), ("error", code, f"because {code}"))
            self.assertEqual(connection.session.state, IDLE)
        self.assertNoTimers()

    def test_fetchBugIsInternal(self) -> None:
        """
        A fetch that fails with something unexpected is logged and refused
        as C{internal}.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        self.context.fetches[0][2].errback(ZeroDivisionError("boom"))
        self.assertEqual(self.errors(connection.received()), ["internal"])
        (logged,) = [e for e in self.events if "log_failure" in e]
        self.assertTrue(logged["log_failure"].check(ZeroDivisionError))
        self.assertEqual(formatEvent(logged), "fetch of a.txt failed")
        self.assertEqual(connection.session.state, IDLE)

    def test_alreadyFailedFetch(self) -> None:
        """
        A context that fails the fetch at once (an already failed Deferred)
        gets the refusal sent, and no progress timer is left.
        """
        connection = self.connect()
        self.patch(self.context, "fetch", lambda name, overwrite: fail(P2PError("stopping", "unavailable")))
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        self.assertEqual(self.errors(connection.received()), ["unavailable"])
        self.assertEqual(connection.session.state, IDLE)
        self.assertNoTimers()

    def test_requestsDuringFetchAreViolations(self) -> None:
        """
        A request while a fetch is pending is a protocol violation, and the
        close that follows cancels the fetch.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        connection.send(Message("status", watch=False))
        self.assertViolation(connection)
        connection.close()
        self.assertEqual(self.context.fetchCancels, 1)

    def test_errorDuringFetchAllowed(self) -> None:
        """
        An C{error} from the client while its fetch runs is only logged.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        connection.send(Message("error", code="timeout", reason="too slow"))
        self.assertFalse(connection.dropped)
        self.assertEqual(connection.session.state, FETCHING)

    def test_closeCancelsFetch(self) -> None:
        """
        Closing while fetching cancels the context's Deferred (the waiter,
        not necessarily the download), stops the progress timer, and sends
        nothing afterwards.
        """
        connection = self.connect()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        connection.close()
        self.assertEqual(self.context.fetchCancels, 1)
        self.assertEqual(connection.session.state, CLOSED)
        self.assertNoTimers()
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])


class IndexSinceTests(Case):
    """
    C{index-since}: idle -> sending-index -> idle, the answer written as
    C{index-delta} frames by a pull producer, one frame each time the
    transport asks for more.
    """

    # Enough changes for three frames of ENTRIES_PER_FRAME items.
    CHANGED = [FileEntry(f"f{i:04d}", i, 1.5, "ab" * 32) for i in range(ENTRIES_PER_FRAME + 200)]
    REMOVED = [f"gone{i:04d}" for i in range(ENTRIES_PER_FRAME)]

    def changes(self) -> Changes:
        return Changes(INCARNATION, 42, False, list(self.CHANGED), list(self.REMOVED))

    def ask(self, connection: Connection, incarnation: Optional[str] = "0011223344556677", since: int = 7) -> Deferred:
        """
        Send C{index-since} and return the Deferred the context was asked
        for.
        """
        connection.send(Message("index-since", incarnation=incarnation, since=since))
        asked, since_, d = self.context.indexAsks[-1]
        self.assertEqual((asked, since_), (incarnation, since))
        return d

    def test_framesOnePerPull(self) -> None:
        """
        C{index-since} asks the context for the changes since the given
        change of the given incarnation, and is I{sending-index}
        meanwhile.  The answer goes as C{index-delta} frames through a pull
        producer registered on the transport: nothing is written until the
        transport pulls, each pull writes exactly one frame, only the last
        is marked, every frame carries the answer's incarnation, change
        number and fullness, and together they hold every change, then
        every removal, in order.  Then the producer is unregistered and the
        session is idle and answers the next request.
        """
        connection = self.connect()
        d = self.ask(connection)
        self.assertEqual(connection.session.state, SENDING_INDEX)
        self.assertEqual(connection.received(), [])
        d.callback(self.changes())
        producer = connection.transport.producer
        self.assertIsInstance(producer, IndexSender)
        self.assertFalse(connection.transport.streaming)
        self.assertEqual(connection.received(), [])
        frames: List[Message] = []
        for pull in range(10):
            producer.resumeProducing()
            new = connection.received()
            self.assertEqual([m.type for m in new], ["index-delta"], pull)
            frames.extend(new)
            if connection.transport.producer is None:
                break
        self.assertEqual([f.last for f in frames], [False, False, True])
        self.assertEqual({(f.incarnation, f.seq, f.full) for f in frames}, {(INCARNATION, 42, False)})
        self.assertEqual([e for f in frames for e in f.entries], self.CHANGED)
        self.assertEqual([r for f in frames for r in f.removed], self.REMOVED)
        self.assertEqual(connection.session.state, IDLE)
        producer.resumeProducing()
        self.assertEqual(connection.received(), [])
        connection.send(Message("status", watch=False))
        self.assertEqual([m.type for m in connection.received()], ["state"])
        self.assertFalse(connection.dropped)

    def test_emptyAnswer(self) -> None:
        """
        Nothing changed is still one frame, empty and marked last, so the
        asker learns the change number it is at.
        """
        connection = self.connect()
        self.ask(connection, None, 0).callback(Changes(INCARNATION, 3, True, [], []))
        connection.pumpFile()
        (frame_,) = connection.received()
        self.assertEqual(
            (frame_.type, frame_.incarnation, frame_.seq, frame_.full, frame_.entries, frame_.removed, frame_.last),
            ("index-delta", INCARNATION, 3, True, [], [], True),
        )
        self.assertEqual(connection.session.state, IDLE)

    def test_requestsWhileSendingDropWithoutAFrame(self) -> None:
        """
        Any request while the answer is being prepared or sent closes the
        connection without a frame of its own (not even the refusal): the
        asker reads nothing but C{index-delta} frames, ending with the last
        one, and the context is not asked anything else.
        """
        requests = (
            Message("status", watch=False),
            Message("ls"),
            Message("lookup", name="a.txt"),
            Message("get", name="a.txt", offset=0, sha256=None),
            Message("fetch", name="a.txt", overwrite=False),
            Message("index-since", incarnation=None, since=0),
        )
        for sending in (False, True):
            for request in requests:
                self.context.share("a.txt", b"abc")
                connection = self.connect()
                d = self.ask(connection)
                if sending:
                    d.callback(self.changes())
                    connection.transport.producer.resumeProducing()
                connection.send(request)
                self.assertTrue(connection.dropped, (sending, request.type))
                self.assertEqual(connection.session.state, SENDING_INDEX)
                if not sending:
                    d.callback(self.changes())
                connection.pumpFile()
                frames = connection.received()
                self.assertEqual({m.type for m in frames}, {"index-delta"}, (sending, request.type))
                self.assertTrue(frames[-1].last)
                self.assertEqual(len(self.context.indexAsks), 1)
                self.assertEqual((self.context.fetches, self.context.ended), ([], []))
                connection.close()
                self.context.indexAsks.clear()

    def test_errorWhileSendingAllowed(self) -> None:
        """
        An C{error} from the asker while the answer is on the way is only
        logged: the frames keep coming.
        """
        connection = self.connect()
        self.ask(connection).callback(self.changes())
        connection.send(Message("error", code="io", reason="disk full"))
        self.assertFalse(connection.dropped)
        connection.pumpFile()
        self.assertTrue(connection.received()[-1].last)

    def assertStoppedByClose(self, tcpLike: bool) -> None:
        connection = self.connect()
        self.ask(connection).callback(self.changes())
        producer = connection.transport.producer
        producer.resumeProducing()
        connection.received()
        connection.close(tcpLike=tcpLike)
        self.assertEqual(connection.session.state, CLOSED)
        self.assertTrue(producer.done.called)
        self.assertEqual(connection.transport.value(), b"")
        producer.resumeProducing()
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(producer.frames, 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([e for e in self.events if "log_failure" in e], [])

    def test_closeWhileSendingStopsTheProducer(self) -> None:
        """
        Losing the connection mid-answer stops the producer even where the
        transport does not (L{StringTransport}, like L{twisted.test.iosim}):
        the session's own close does.  No frame is written after the close,
        a later pull writes nothing, and the session is closed with nothing
        logged.
        """
        self.assertStoppedByClose(tcpLike=False)

    def test_transportStopsTheProducer(self) -> None:
        """
        The same when the transport stops the producer first, as TCP does
        when the connection is lost: the C{gone} failure that ends the
        answer is not turned into a refusal written to the dying
        connection.
        """
        self.assertStoppedByClose(tcpLike=True)

    def test_closeWhileAskingCancels(self) -> None:
        """
        Losing the connection before the context has answered cancels the
        context's Deferred, and nothing is sent.
        """
        connection = self.connect()
        self.ask(connection)
        connection.close()
        self.assertEqual(self.context.indexCancels, 1)
        self.assertEqual(connection.session.state, CLOSED)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failureRefusedWithItsCode(self) -> None:
        """
        An C{indexSince} that fails with a L{P2PError} (now or later) is
        refused with its code and reason; the session is idle again and
        usable, with no producer left on the transport.
        """
        connection = self.connect()
        self.ask(connection).errback(P2PError("the node stopped", "unavailable"))
        (error,) = connection.received()
        self.assertEqual((error.type, error.code, error.reason), ("error", "unavailable", "the node stopped"))
        self.assertEqual(connection.session.state, IDLE)
        self.assertIsNone(connection.transport.producer)
        self.patch(self.context, "indexSince", lambda incarnation, since: fail(P2PError("cannot scan", "io")))
        connection.send(Message("index-since", incarnation=None, since=0))
        self.assertEqual(self.errors(connection.received()), ["io"])
        self.assertEqual(connection.session.state, IDLE)
        self.assertFalse(connection.dropped)

    def test_bugIsInternal(self) -> None:
        """
        An C{indexSince} that fails with something unexpected is logged and
        refused as C{internal}.
        """
        connection = self.connect()
        self.ask(connection).errback(ZeroDivisionError("boom"))
        self.assertEqual(self.errors(connection.received()), ["internal"])
        (logged,) = [e for e in self.events if "log_failure" in e]
        self.assertTrue(logged["log_failure"].check(ZeroDivisionError))
        self.assertEqual(connection.session.state, IDLE)


class BackPressureTests(Case):
    """
    Multi-frame answers wait for the reader: a listing stops while the
    transport has paused it, and a watch keeps only the latest status while
    the reader does not read.
    """

    def bigListing(self) -> None:
        self.context.files = [
            {"name": f"file{i:05d}" + "x" * 100, "size": i, "sha256": "0" * 64, "holders": [1]} for i in range(3000)
        ]

    def slowReader(self) -> Connection:
        """
        A connection whose transport pauses its producer after every write,
        as a TCP transport does when a reader does not read.
        """
        connection = self.connect()
        transport = connection.transport
        write = transport.write

        def writeAndPause(data: bytes) -> None:
            write(data)
            if transport.producer is not None and transport.streaming:
                transport.producer.pauseProducing()

        transport.write = writeAndPause  # type: ignore[method-assign]
        return connection

    def test_listingWaitsForReader(self) -> None:
        """
        C{ls} to a reader that does not read writes one frame and stops
        until the transport resumes it; a request sent meanwhile is a
        violation, so an unread reader cannot make the node queue answers.
        """
        self.bigListing()
        connection = self.slowReader()
        connection.send(Message("ls"))
        self.assertEqual(connection.session.state, SENDING_LISTING)
        (first,) = connection.received()
        self.assertFalse(first.last)
        connection.transport.producer.resumeProducing()
        (second,) = connection.received()
        self.assertFalse(second.last)
        connection.send(Message("ls"))
        self.assertViolation(connection)

    def test_listingStoppedOnClose(self) -> None:
        """
        A reader that leaves mid-listing stops the producer; the session is
        closed and logs no failure.
        """
        self.bigListing()
        connection = self.slowReader()
        connection.send(Message("ls"))
        connection.close()
        self.assertEqual(connection.session.state, CLOSED)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_listingThenIdle(self) -> None:
        """
        Once the last frame is written the producer is unregistered and
        the session is idle again.
        """
        self.bigListing()
        connection = self.connect()
        connection.send(Message("ls"))
        self.assertIsNone(connection.transport.producer)
        self.assertEqual(connection.session.state, IDLE)
        parts = connection.received()
        self.assertGreater(len(parts), 1)
        self.assertTrue(parts[-1].last)

    def test_watchKeepsLatest(self) -> None:
        """
        While the transport has paused the watch (the reader does not read),
        status changes are not written; when it resumes only the latest is.
        """
        connection = self.connect()
        connection.send(Message("status", watch=True))
        connection.received()
        watch = connection.transport.producer
        self.assertTrue(connection.transport.streaming)
        watch.pauseProducing()
        (watcher,) = self.context.watchers
        for i in range(1000):
            watcher({"id": ME, "change": i})
        self.assertEqual(connection.received(), [])
        watch.resumeProducing()
        (state,) = connection.received()
        self.assertEqual(state.status, {"id": ME, "change": 999})

    def test_lsWhileWatching(self) -> None:
        """
        C{ls} on a watching connection takes the transport from the watch;
        a change while the listing waits for the reader is sent after its
        last frame, and the watch has the transport again.
        """
        self.bigListing()
        connection = self.slowReader()
        connection.send(Message("status", watch=True))
        (watcher,) = self.context.watchers
        connection.transport.producer.resumeProducing()
        connection.received()
        connection.send(Message("ls"))
        watcher({"id": ME, "change": 1})
        for _ in range(1000):
            if connection.session.state != SENDING_LISTING:
                break
            connection.transport.producer.resumeProducing()
        received = connection.received()
        self.assertEqual({m.type for m in received[:-1]}, {"listing"})
        self.assertTrue(received[-2].last)
        self.assertEqual((received[-1].type, received[-1].status), ("state", {"id": ME, "change": 1}))
        self.assertEqual(connection.session.state, WATCHING)
        self.assertIsInstance(connection.transport.producer, StatusWatch)


class IdleTimeoutTests(Case):
    """
    A request connection with no request in flight is closed after its
    idle timeout; a watch or a fetch in flight keeps it open.
    """

    def connectIdle(self) -> Connection:
        return Connection(self, self.context, CLIENT, idleTimeout=60.0)

    def test_idleCloses(self) -> None:
        """
        A connection that asks nothing is closed 60 seconds after it
        authenticated, not before; no timer is left.
        """
        connection = self.connectIdle()
        self.context.clock.advance(59.9)
        self.assertFalse(connection.transport.disconnecting)
        self.context.clock.advance(0.1)
        self.assertTrue(connection.transport.disconnecting)
        connection.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoTimers()

    def test_requestRestarts(self) -> None:
        """
        Each request starts the idle time again.
        """
        connection = self.connectIdle()
        self.context.clock.advance(50)
        connection.send(Message("status", watch=False))
        self.context.clock.advance(50)
        self.assertFalse(connection.transport.disconnecting)
        self.context.clock.advance(10)
        self.assertTrue(connection.transport.disconnecting)

    def test_watchStaysOpen(self) -> None:
        """
        A connection watching status has a request in flight: it stays
        open however long no change comes.
        """
        connection = self.connectIdle()
        connection.send(Message("status", watch=True))
        self.context.clock.advance(3600)
        self.assertFalse(connection.transport.disconnecting)

    def test_fetchStaysOpen(self) -> None:
        """
        A fetch in flight keeps the connection open; once it is answered
        the idle time counts from the answer.
        """
        connection = self.connectIdle()
        connection.send(Message("fetch", name="a.txt", overwrite=False))
        self.context.clock.advance(600)
        self.assertFalse(connection.transport.disconnecting)
        ((name, overwrite, d),) = self.context.fetches
        d.callback(Message("fetched", name="a.txt", size=3, sha256="a" * 64, already=False))
        self.context.clock.advance(59)
        self.assertFalse(connection.transport.disconnecting)
        self.context.clock.advance(1)
        self.assertTrue(connection.transport.disconnecting)

    def test_noTimeoutByDefault(self) -> None:
        """
        Without an idle timeout a session sets no timer.
        """
        self.connect()
        self.context.clock.advance(3600)
        self.assertNoTimers()


class RequestContextTests(SynchronousTestCase):
    """
    The node's own L{IRequestContext}.
    """

    def test_nodeContextProvidesIRequestContext(self) -> None:
        """
        The context a L{p2pfiles.node.Node} gives its sessions provides
        L{IRequestContext}.
        """
        from tests.test_node import Harness

        harness = Harness(self, node=1)
        self.assertTrue(verifyObject(IRequestContext, harness.node.context))

    def test_nodeContextWatching(self) -> None:
        """
        A watch opened through the context counts among the node's open
        status watches until it is stopped.
        """
        from tests.test_node import Harness

        harness = Harness(self, node=1)
        stop = harness.node.context.watchStatus(lambda status: None)
        self.assertEqual(harness.node.watching, 1)
        stop()
        self.assertEqual(harness.node.watching, 0)


class EncodeListingTests(SynchronousTestCase):
    """
    L{encodeListing}: the C{ls} answer, encoded once for every reader.
    """

    def rows(self, count: int) -> List[Dict[str, Any]]:
        return [{"name": f"f{i:05d}", "size": i, "sha256": "ab" * 32, "holders": [1]} for i in range(count)]

    def test_framesInOrderLastMarked(self) -> None:
        """
        The frames decode, in order, to every row, at most
        C{LISTING_ROWS_PER_FRAME} rows each, and only the last says it is
        last; no rows is one empty last frame.
        """
        for count in (0, 1, LISTING_ROWS_PER_FRAME, LISTING_ROWS_PER_FRAME + 1, 3 * LISTING_ROWS_PER_FRAME + 7):
            messages = [decode(frame) for frame in encodeListing(self.rows(count))]
            self.assertEqual([row for m in messages for row in m.files], self.rows(count), count)
            self.assertEqual([m.last for m in messages], [False] * (len(messages) - 1) + [True], count)
            self.assertTrue(all(len(m.files) <= LISTING_ROWS_PER_FRAME for m in messages), count)
            self.assertEqual(len(messages), max(1, -(-count // LISTING_ROWS_PER_FRAME)), count)

    def test_readsAsItGoes(self) -> None:
        """
        Rows given as a generator are read one frame's worth ahead at most:
        by the time the first frame is made, no more than two frames' rows
        have been taken.
        """
        taken: List[int] = []

        def generate() -> Any:
            for row in self.rows(10 * LISTING_ROWS_PER_FRAME):
                taken.append(row["size"])
                yield row

        seen = []
        original = session.encode

        def spying(message: Message) -> bytes:
            seen.append(len(taken))
            return original(message)

        self.patch(session, "encode", spying)
        encodeListing(generate())
        self.assertLessEqual(seen[0], 2 * LISTING_ROWS_PER_FRAME)
