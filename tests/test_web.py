"""
Tests for L{p2pfiles.web}: every path of the web view, its authentication,
its live stream and its page, against a fake L{IStatusSource}.

Unit tests run the whole HTTP stack in memory (a real L{Site} and
C{HTTPChannel} over a L{StringTransport}, time on a L{Clock}).  C{/metrics},
which renders in the reactor's thread pool, and the browser tests use a real
port on 127.0.0.1.
"""

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from p2pfiles.events import EventLog, Subscribers
from p2pfiles.metrics import NodeMetrics
from p2pfiles.page import visible
from p2pfiles.web import (
    KEEPALIVE,
    LISTING_TIMEOUT,
    MAX_PENDING,
    MAX_WATCHERS,
    PAGE_LISTING_WAIT,
    IStatusSource,
    StatusSource,
    TokenError,
    makeWebRoot,
    readToken,
)

from .browser import Browser, chromiumPath

TOKEN = b"0123456789abcdef-token"

HOSTILE = "<script>alert(1)</script>\x1b[31mred\u202egnp.exe"


def member(id: int, alive: bool = True, **more: Any) -> Dict[str, Any]:
    return {"id": id, "address": f"127.0.0.1:{9000 + id}", "alive": alive, **more}


def statusOf(leader: Optional[int] = 1, epoch: int = 3, members: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    return {
        "id": 1,
        "address": "127.0.0.1:9001",
        "role": "leader" if leader == 1 else "follower",
        "leader": leader,
        "epoch": epoch,
        "members": members if members is not None else [member(1), member(2), member(3)],
        "version": "0.1.0",
        "uptime": 12.5,  # a field the CLI does not print yet: passed through
    }


FILES = [
    {"name": "12241300.png", "size": 48213, "sha256": "ab" * 32, "holders": [2]},
    {"name": "notes.txt", "size": 8800, "sha256": "cd" * 32, "holders": [1, 3]},
]

TRANSFERS = [
    {"name": "big.iso", "direction": "relay", "peer": 3, "bytes": 1 << 20, "size": 4 << 20, "started": 0.0},
]


@implementer(IStatusSource)
class FakeSource:
    """
    A node as the web view sees it, changed by hand.

    C{listing()} answers at once with C{files}, or, when C{files} is None,
    with a Deferred left in C{listings} for the test to fire.
    """

    def __init__(
        self,
        status: Optional[Dict[str, Any]] = None,
        files: Optional[List[Dict[str, Any]]] = FILES,
        transfers: Optional[List[Dict[str, Any]]] = None,
        events: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        self.now = status if status is not None else statusOf()
        self.files = files
        self.inFlight = transfers if transfers is not None else list(TRANSFERS)
        self.log = events if events is not None else [{"time": 5.0, "kind": "leader", "leader": 1, "epoch": 3}]
        self.watchers = Subscribers()
        self.listings: List[Deferred] = []
        self.cancelled: List[Deferred] = []
        self.subscriptions = 0
        self.onSubscribe: Optional[Callable[[], None]] = None

    def status(self) -> Dict[str, Any]:
        return self.now

    def listing(self) -> Deferred:
        if self.files is not None:
            return succeed(self.files)
        waiting: Deferred = Deferred(self.cancelled.append)
        self.listings.append(waiting)
        return waiting

    def transfers(self) -> List[Dict[str, Any]]:
        return self.inFlight

    def events(self) -> List[Dict[str, Any]]:
        return self.log

    def subscribe(self, callback: Callable[[str, Dict[str, Any]], None]) -> Callable[[], None]:
        self.subscriptions += 1
        unsubscribe = self.watchers.subscribe(callback)
        if self.onSubscribe is not None:
            self.onSubscribe()
        return unsubscribe

    def announce(self, status: Dict[str, Any]) -> None:
        self.now = status
        self.watchers.notify("status", status)

    def event(self, event: Dict[str, Any]) -> None:
        self.log.append(event)
        self.watchers.notify("event", event)


class Response:
    """
    An HTTP response parsed from what the server wrote so far.
    """

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.code = int(lines[0].split(b" ")[1])
        self.headers: Dict[bytes, List[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        chunked = self.header(b"transfer-encoding") == b"chunked"
        self.body = _dechunk(rest) if chunked else rest

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        length = int(size, 16)
        if length == 0 or len(data) < length:
            break
        body += data[:length]
        data = data[length + 2 :]
    return body


class Exchange:
    """
    One request on its own in-memory connection.
    """

    def __init__(self, site: Site, request: bytes) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(request)

    def response(self) -> Response:
        return Response(self.transport.value())

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class WebTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.registry = CollectorRegistry()

    def site(self, token: Optional[bytes] = None) -> Site:
        self.root = makeWebRoot(self.source, self.registry, token, self.clock)
        return Site(self.root, reactor=self.clock)

    def open(self, path: str, headers: Optional[Dict[str, str]] = None, token: Optional[bytes] = None) -> Exchange:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1:8080"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return Exchange(self.site(token), raw)

    def get(self, path: str, headers: Optional[Dict[str, str]] = None, token: Optional[bytes] = None) -> Response:
        return self.open(path, headers, token).response()


class InterfaceTests(SynchronousTestCase):
    """
    The providers of L{IStatusSource} provide it.
    """

    def test_fakeSource(self) -> None:
        """
        The tests' fake source provides the interface, so the tests exercise
        what a node must offer.
        """
        self.assertTrue(verifyObject(IStatusSource, FakeSource()))

    def test_statusSource(self) -> None:
        """
        L{StatusSource} provides the interface.
        """
        source = StatusSource(statusOf, lambda: succeed([]), list, EventLog(Clock()))
        self.assertTrue(verifyObject(IStatusSource, source))


class StatusSourceTests(SynchronousTestCase):
    """
    L{StatusSource} turns a node's callables and event log into a source.
    """

    def setUp(self) -> None:
        self.now = statusOf()
        self.events = EventLog(Clock())
        self.source = StatusSource(lambda: self.now, lambda: succeed(FILES), lambda: TRANSFERS, self.events)
        self.heard: List[Tuple[str, Dict[str, Any]]] = []

    def test_passesThrough(self) -> None:
        """
        Status, listing, transfers and events are the node's own.
        """
        self.events.add("member-up", member=2)
        self.assertEqual(self.source.status(), self.now)
        self.assertEqual(self.successResultOf(self.source.listing()), FILES)
        self.assertEqual(self.source.transfers(), TRANSFERS)
        self.assertEqual(self.source.events(), self.events.recent())

    def test_changedTellsOnlyChanges(self) -> None:
        """
        C{changed} tells subscribers the status when it differs from the last
        one told, and stays quiet otherwise.
        """
        self.source.subscribe(lambda kind, payload: self.heard.append((kind, payload)))
        self.source.changed()
        self.source.changed()
        self.now = statusOf(leader=2, epoch=4)
        self.source.changed()
        self.assertEqual(self.heard, [("status", statusOf()), ("status", statusOf(leader=2, epoch=4))])

    def test_eventsReachSubscribers(self) -> None:
        """
        Events added to the log reach subscribers as C{("event", event)}.
        """
        self.source.subscribe(lambda kind, payload: self.heard.append((kind, payload)))
        event = self.events.add("rejected", reason="bad proof")
        self.assertEqual(self.heard, [("event", event)])

    def test_unsubscribeStopsBoth(self) -> None:
        """
        Unsubscribing stops both statuses and events.
        """
        unsubscribe = self.source.subscribe(lambda kind, payload: self.heard.append((kind, payload)))
        unsubscribe()
        self.events.add("member-up", member=2)
        self.now = statusOf(leader=2)
        self.source.changed()
        self.assertEqual(self.heard, [])


class TokenFileTests(SynchronousTestCase):
    """
    L{readToken} reads the web token, with one-line errors.
    """

    def write(self, content: bytes) -> str:
        path = FilePath(self.mktemp())
        path.setContent(content)
        return path.path

    def assertOneLine(self, error: TokenError, *words: str) -> None:
        text = str(error)
        self.assertNotIn("\n", text)
        for word in words:
            self.assertIn(word, text)

    def test_read(self) -> None:
        """
        The token is the file's content without surrounding whitespace.
        """
        self.assertEqual(readToken(self.write(b"  " + TOKEN + b"\n")), TOKEN)

    def test_missing(self) -> None:
        """
        A missing file is an error naming it.
        """
        path = self.mktemp()
        self.assertOneLine(self.assertRaises(TokenError, readToken, path), "cannot read", path)

    def test_empty(self) -> None:
        """
        An empty (or blank) file is an error.
        """
        self.assertOneLine(self.assertRaises(TokenError, readToken, self.write(b" \n")), "empty")

    def test_tooShort(self) -> None:
        """
        Fewer than 16 characters is an error: such a token can be guessed.
        """
        self.assertOneLine(self.assertRaises(TokenError, readToken, self.write(b"x" * 15)), "too short")
        self.assertEqual(readToken(self.write(b"x" * 16)), b"x" * 16)

    def test_notAHeaderValue(self) -> None:
        """
        Inner spaces or non-ASCII bytes are an error: a header cannot carry
        them.
        """
        for content in (b"0123456789 abcdef", b"0123456789abcdef\xc3\xa9", b"0123456789\nabcdef"):
            self.assertOneLine(self.assertRaises(TokenError, readToken, self.write(content)), "visible ASCII")

    def test_tooLarge(self) -> None:
        """
        A file over 4 KiB is refused before it is read.
        """
        self.assertOneLine(self.assertRaises(TokenError, readToken, self.write(b"x" * 5000)), "larger")


class AuthTests(WebTestCase):
    """
    With a token, every path needs it; without one, only loopback host
    names are answered.
    """

    PATHS = ["/", "/api/status", "/api/files", "/api/transfers", "/api/events", "/api/watch", "/metrics", "/static/app.js", "/nowhere"]

    def test_noTokenRefused(self) -> None:
        """
        Without an C{Authorization} header every path answers 401 with
        C{WWW-Authenticate: Bearer}, and reveals nothing of the node.
        """
        for path in self.PATHS:
            response = self.get(path, token=TOKEN)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(response.header(b"www-authenticate"), b"Bearer", path)
            self.assertNotIn(b"127.0.0.1:9002", response.body)
        self.assertEqual(self.source.subscriptions, 0)

    def test_wrongTokenRefused(self) -> None:
        """
        A wrong token, a prefix of the right one, another scheme, or the
        right token in the wrong place are all refused.
        """
        for header in (
            "Bearer wrong-token-wrong-token",
            "Bearer " + TOKEN.decode()[:-1],
            "Bearer " + TOKEN.decode() + "x",
            "Basic " + TOKEN.decode(),
            TOKEN.decode(),
            "Bearer",
        ):
            response = self.get("/api/status", {"Authorization": header}, token=TOKEN)
            self.assertEqual(response.code, 401, header)

    def test_rightToken(self) -> None:
        """
        The right token opens every path, whatever the host name (a token
        endpoint may be reached by any name).
        """
        headers = {"Authorization": "Bearer " + TOKEN.decode()}
        for path in ("/", "/api/status", "/api/files", "/api/transfers", "/api/events", "/static/style.css"):
            self.assertEqual(self.get(path, headers, token=TOKEN).code, 200, path)
        lines = f"GET /api/status HTTP/1.1\r\nHost: node.example\r\nAuthorization: Bearer {TOKEN.decode()}\r\n\r\n"
        self.assertEqual(Exchange(self.site(TOKEN), lines.encode()).response().code, 200)

    def test_schemeCaseInsensitive(self) -> None:
        """
        The scheme's case does not matter (RFC 7235).
        """
        response = self.get("/api/status", {"Authorization": "bearer " + TOKEN.decode()}, token=TOKEN)
        self.assertEqual(response.code, 200)

    def test_loopbackHostsWithoutToken(self) -> None:
        """
        Without a token, requests naming a loopback host are answered.
        """
        site = self.site()
        for host in ("127.0.0.1:8080", "127.0.0.1", "localhost:8080", "LOCALHOST", "[::1]:8080", "127.1.2.3"):
            response = Exchange(site, f"GET /api/status HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()).response()
            self.assertEqual(response.code, 200, host)

    def test_otherHostsWithoutTokenRefused(self) -> None:
        """
        Without a token, a request naming another host (a DNS name rebound to
        127.0.0.1 by some web page) is refused with 403.
        """
        site = self.site()
        for host in ("evil.example", "evil.example:8080", "10.0.0.1", "127.0.0.1.evil.example", "[::2]:80"):
            response = Exchange(site, f"GET /api/status HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()).response()
            self.assertEqual(response.code, 403, host)
            self.assertNotIn(b"127.0.0.1:9002", response.body)

    def test_securityHeaders(self) -> None:
        """
        Responses carry a content security policy, no-sniff and no-store,
        refusals included.
        """
        for response in (self.get("/"), self.get("/api/status"), self.get("/api/status", token=TOKEN)):
            self.assertIn(b"script-src 'self'", response.header(b"content-security-policy"))
            self.assertIn(b"frame-ancestors 'none'", response.header(b"content-security-policy"))
            self.assertEqual(response.header(b"x-content-type-options"), b"nosniff")
            self.assertEqual(response.header(b"cache-control"), b"no-store")


class JSONTests(WebTestCase):
    """
    The JSON API returns exactly what the source says.
    """

    def test_status(self) -> None:
        """
        C{/api/status} is the source's status, fields it does not know
        included.
        """
        response = self.get("/api/status")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=utf-8")
        self.assertEqual(response.json(), self.source.now)

    def test_files(self) -> None:
        """
        C{/api/files} is the source's listing.
        """
        response = self.get("/api/files")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json(), FILES)

    def test_transfers(self) -> None:
        """
        C{/api/transfers} is the source's transfers.
        """
        self.assertEqual(self.get("/api/transfers").json(), TRANSFERS)

    def test_events(self) -> None:
        """
        C{/api/events} is the source's events, oldest first.
        """
        events = EventLog(self.clock)
        for n in range(3):
            self.clock.advance(1)
            events.add("member-up", member=n)
        self.source.log = events.recent()
        self.assertEqual(self.get("/api/events").json(), events.recent())

    def test_hostileNamesStayData(self) -> None:
        """
        A hostile name comes back as the same string, in plain JSON.
        """
        self.source.files = [{"name": HOSTILE, "size": 1, "sha256": "00" * 32, "holders": [2]}]
        response = self.get("/api/files")
        self.assertEqual(response.json()[0]["name"], HOSTILE)
        for byte in (b"<", b">", b"&", b"\x1b"):
            self.assertNotIn(byte, response.body)

    def test_unknownPath(self) -> None:
        """
        An unknown path is a 404.
        """
        self.assertEqual(self.get("/api/nothing").code, 404)

    def test_postRefused(self) -> None:
        """
        The API is read-only: a POST is refused.
        """
        raw = b"POST /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        self.assertEqual(Exchange(self.site(), raw).response().code, 405)


class ListingTests(WebTestCase):
    """
    C{/api/files} waits for the listing, within bounds.
    """

    def setUp(self) -> None:
        super().setUp()
        self.source.files = None

    def test_waitsForListing(self) -> None:
        """
        Nothing is answered until the listing arrives; then it is.
        """
        exchange = self.open("/api/files")
        self.assertEqual(exchange.transport.value(), b"")
        self.source.listings[0].callback(FILES)
        self.assertEqual(exchange.response().json(), FILES)

    def test_timeout(self) -> None:
        """
        A listing that takes longer than L{LISTING_TIMEOUT} is cancelled and
        answered with 504.
        """
        exchange = self.open("/api/files")
        self.clock.advance(LISTING_TIMEOUT - 0.1)
        self.assertEqual(exchange.transport.value(), b"")
        self.clock.advance(0.2)
        self.assertEqual(exchange.response().code, 504)
        self.assertEqual(self.source.cancelled, self.source.listings)

    def test_failure(self) -> None:
        """
        A failed listing (no leader, say) is a 502 with the reason.
        """
        exchange = self.open("/api/files")
        self.source.listings[0].errback(RuntimeError("no leader"))
        response = exchange.response()
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json(), {"error": "no leader"})

    def test_cancelledElsewhere(self) -> None:
        """
        A listing the source itself gives up on is an error answer, not an
        empty 200.
        """
        exchange = self.open("/api/files")
        self.source.listings[0].cancel()
        response = exchange.response()
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json(), {"error": "CancelledError"})

    def test_clientLeaves(self) -> None:
        """
        A client that leaves cancels the wait; nothing is written after.
        """
        exchange = self.open("/api/files")
        exchange.leave()
        self.assertEqual(self.source.cancelled, self.source.listings)
        self.clock.advance(LISTING_TIMEOUT * 2)
        self.assertEqual(exchange.transport.value(), b"")

    def test_badListingIs500(self) -> None:
        """
        A listing that cannot be encoded is logged and answered with 500,
        not left hanging.
        """
        exchange = self.open("/api/files")
        self.source.listings[0].callback([{"name": object()}])
        self.assertEqual(exchange.response().code, 500)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


def sse(body: bytes) -> List[Tuple[str, Any]]:
    """
    The messages of an event stream: (event name, parsed data).
    """
    messages = []
    for block in body.decode("utf-8").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            messages.append((fields.get("event", "message"), json.loads(fields["data"])))
    return messages


class WatchTests(WebTestCase):
    """
    C{/api/watch} streams the status and events as Server-Sent Events.
    """

    def test_statusFirst(self) -> None:
        """
        The stream opens with C{text/event-stream} and the status now, and
        subscribes to the source.
        """
        exchange = self.open("/api/watch")
        response = exchange.response()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), b"text/event-stream; charset=utf-8")
        self.assertEqual(sse(response.body), [("status", self.source.now)])
        self.assertEqual(len(self.source.watchers), 1)

    def test_changesAndEvents(self) -> None:
        """
        Every status the source announces and every event follow, in order,
        each on one C{data:} line under its own C{event:} name.
        """
        exchange = self.open("/api/watch")
        changed = statusOf(leader=2, epoch=4)
        event = {"time": 9.0, "kind": "leader", "leader": 2, "epoch": 4}
        self.source.announce(changed)
        self.source.event(event)
        self.assertEqual(sse(exchange.response().body), [("status", statusOf()), ("status", changed), ("event", event)])
        for block in exchange.response().text.split("\n\n"):
            self.assertLessEqual(sum(line.startswith("data:") for line in block.splitlines()), 1)

    def test_multilineTextStaysOneLine(self) -> None:
        """
        A newline in a value cannot end the message early or inject fields.
        """
        exchange = self.open("/api/watch")
        event = {"time": 1.0, "kind": "rejected", "reason": "x\n\nevent: status\ndata: {}\r\n"}
        self.source.event(event)
        self.assertEqual(sse(exchange.response().body)[-1], ("event", event))

    def test_stopsWhenClientLeaves(self) -> None:
        """
        When the client leaves the stream unsubscribes, stops its keepalive
        and writes nothing more.
        """
        exchange = self.open("/api/watch")
        exchange.leave()
        self.assertEqual(len(self.source.watchers), 0)
        written = exchange.transport.value()
        self.source.announce(statusOf(leader=2))
        self.clock.advance(KEEPALIVE * 3)
        self.assertEqual(exchange.transport.value(), written)

    def test_keepalive(self) -> None:
        """
        An idle stream gets a comment line every L{KEEPALIVE} seconds.
        """
        exchange = self.open("/api/watch")
        self.clock.advance(KEEPALIVE - 0.1)
        self.assertNotIn(b": keepalive", exchange.transport.value())
        self.clock.advance(0.2)
        self.assertEqual(exchange.transport.value().count(b": keepalive"), 1)
        self.clock.advance(KEEPALIVE)
        self.assertEqual(exchange.transport.value().count(b": keepalive"), 2)

    def test_pausedClientGetsNewestStatus(self) -> None:
        """
        While the client does not read, statuses wait coalesced and events
        queue; on resuming the events follow in order, then the newest status.
        """
        exchange = self.open("/api/watch")
        before = exchange.transport.value()
        exchange.transport.producer.pauseProducing()
        event = {"time": 1.0, "kind": "member-down", "member": 3}
        self.source.announce(statusOf(leader=2, epoch=4))
        self.source.event(event)
        self.source.announce(statusOf(leader=3, epoch=5))
        self.assertEqual(exchange.transport.value(), before)
        exchange.transport.producer.resumeProducing()
        self.assertEqual(
            sse(exchange.response().body)[1:], [("event", event), ("status", statusOf(leader=3, epoch=5))]
        )

    def test_clientThatNeverReadsDropped(self) -> None:
        """
        A client that does not read while more than L{MAX_PENDING} events
        happen is dropped and unsubscribed, instead of queueing without end.
        """
        exchange = self.open("/api/watch")
        exchange.transport.producer.pauseProducing()
        for n in range(MAX_PENDING):
            self.source.event({"time": 1.0, "kind": "rejected", "reason": str(n)})
        self.assertFalse(exchange.transport.disconnecting)
        self.source.event({"time": 1.0, "kind": "rejected", "reason": "one too many"})
        self.assertTrue(exchange.transport.disconnecting)
        self.assertEqual(len(self.source.watchers), 0)

    def test_tooManyWatchers(self) -> None:
        """
        Beyond L{MAX_WATCHERS} open streams a new one is refused with 503;
        when one leaves there is room again.
        """
        site = self.site()
        raw = b"GET /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        streams = [Exchange(site, raw) for n in range(MAX_WATCHERS)]
        self.assertEqual({s.response().code for s in streams}, {200})
        self.assertEqual(Exchange(site, raw).response().code, 503)
        streams[0].leave()
        self.assertEqual(Exchange(site, raw).response().code, 200)

    def test_closeStreams(self) -> None:
        """
        C{closeStreams} drops every open stream and unsubscribes it.
        """
        site = self.site()
        raw = b"GET /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        streams = [Exchange(site, raw) for n in range(3)]
        self.root.closeStreams()
        self.assertTrue(all(s.transport.disconnecting for s in streams))
        self.assertEqual(len(self.source.watchers), 0)


class PageTests(WebTestCase):
    """
    C{/} is a complete snapshot without JavaScript.
    """

    def page(self) -> str:
        response = self.get("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), b"text/html; charset=utf-8")
        return response.text

    def test_members(self) -> None:
        """
        Every member has a row with its id, address and alive state, and
        C{#leader} holds the leader's id.
        """
        self.source.now = statusOf(leader=2, members=[member(1), member(2), member(3, alive=False)])
        page = self.page()
        self.assertIn('<tr data-member="1" data-alive="true"', page)
        self.assertIn('<tr data-member="2" data-alive="true" class="leader"', page)
        self.assertIn('<tr data-member="3" data-alive="false"', page)
        self.assertIn("127.0.0.1:9003", page)
        self.assertIn('<span id="leader">2</span>', page)
        self.assertIn('<span id="epoch">3</span>', page)

    def test_noLeader(self) -> None:
        """
        With no leader, C{#leader} says none.
        """
        self.source.now = statusOf(leader=None)
        self.assertIn('<span id="leader">none</span>', self.page())

    def test_fingerprints(self) -> None:
        """
        A member's fingerprint is shown when the status carries one; the
        column is hidden when none does.
        """
        self.assertIn('<table id="members" class="no-fp">', self.page())
        self.source.now = statusOf(members=[member(1, fingerprint="SHA256:abcdef"), member(2)])
        page = self.page()
        self.assertIn('<table id="members" class="">', page)
        self.assertIn("SHA256:abcdef", page)

    def test_filesAndTransfersAndEvents(self) -> None:
        """
        Files with sizes and holders, transfers with progress bars, and
        events described in words.
        """
        self.source.log = [{"time": 5.0, "kind": "member-down", "member": 3}]
        page = self.page()
        self.assertIn('<tr data-name="12241300.png">', page)
        self.assertIn("47.1 KiB", page)
        self.assertIn('<span class="chip">2</span>', page)
        self.assertIn('<progress max="4194304" value="1048576"></progress>', page)
        self.assertIn("node 3 is down", page)

    def test_hostileNamesEscaped(self) -> None:
        """
        Names, addresses, reasons and fingerprints are escaped: no markup
        gets through, and control or bidi characters are shown as escapes.
        """
        self.source.files = [{"name": HOSTILE, "size": 1, "sha256": "00" * 32, "holders": [HOSTILE]}]
        self.source.now = statusOf(members=[member(1), member(2, address=HOSTILE, fingerprint='"><b>')])
        self.source.log = [{"time": 1.0, "kind": "rejected", "reason": HOSTILE, "peer": HOSTILE}]
        self.source.inFlight = [dict(TRANSFERS[0], name=HOSTILE, peer=HOSTILE, direction=HOSTILE)]
        page = self.page()
        self.assertNotIn("<script>", page)
        self.assertNotIn("<b>", page)
        self.assertNotIn("\x1b", page)
        self.assertNotIn("\u202e", page)
        shown = "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[31mred\\u202egnp.exe"
        self.assertGreaterEqual(page.count(shown), 6)
        self.assertIn("&quot;&gt;&lt;b&gt;", page)

    def test_visible(self) -> None:
        """
        Control, bidi-override and lone surrogate characters become escapes;
        ordinary text, accents and emoji do not.
        """
        self.assertEqual(visible("a\x00b\x7f\x9b\u202e\u2066\udc80"), "a\\x00b\\x7f\\x9b\\u202e\\u2066\\udc80")
        self.assertEqual(visible("caf\u00e9 \U0001f600 \u4e2d"), "caf\u00e9 \U0001f600 \u4e2d")

    def test_waitsForFiles(self) -> None:
        """
        The page is rendered when the listing arrives, with the files.
        """
        self.source.files = None
        exchange = self.open("/")
        self.assertEqual(exchange.transport.value(), b"")
        self.source.listings[0].callback(FILES)
        self.assertIn("notes.txt", exchange.response().text)

    def test_rendersWithoutFilesAfterWait(self) -> None:
        """
        Without the listing after L{PAGE_LISTING_WAIT} seconds the page is
        rendered without files, saying so, and the listing is cancelled.
        """
        self.source.files = None
        exchange = self.open("/")
        self.clock.advance(PAGE_LISTING_WAIT)
        page = exchange.response().text
        self.assertIn("did not arrive in time", page)
        self.assertIn('data-member="3"', page)
        self.assertEqual(self.source.cancelled, self.source.listings)

    def test_rendersWithoutFilesOnFailure(self) -> None:
        """
        A failed listing leaves the rest of the page; the failure is logged.
        """
        self.source.files = None
        exchange = self.open("/")
        self.source.listings[0].errback(RuntimeError("no leader"))
        self.assertIn('data-member="3"', exchange.response().text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_leaderSince(self) -> None:
        """
        The leader card says since when, from the event that announced the
        current leader and epoch.
        """
        self.source.log = [{"time": 0.0, "kind": "leader", "leader": 1, "epoch": 3}]
        self.assertIn('<span id="leader-since">since ', self.page())
        self.source.log = [{"time": 0.0, "kind": "leader", "leader": 2, "epoch": 2}]
        self.assertIn('<span id="leader-since"></span>', self.page())

    def test_staticFiles(self) -> None:
        """
        The stylesheet and script are served with their types; the page
        refers to them by relative paths (it may sit behind a path prefix).
        """
        css = self.get("/static/style.css")
        js = self.get("/static/app.js")
        self.assertEqual(css.header(b"content-type"), b"text/css; charset=utf-8")
        self.assertEqual(js.header(b"content-type"), b"text/javascript; charset=utf-8")
        self.assertIn(b"prefers-color-scheme: dark", css.body)
        self.assertIn(b"EventSource", js.body)
        page = self.page()
        self.assertIn('href="static/style.css"', page)
        self.assertIn('src="static/app.js"', page)
        self.assertEqual(self.get("/static/").code, 404)
        self.assertEqual(self.get("/static/../web.py").code, 404)

    def test_noExternalResources(self) -> None:
        """
        Nothing on the page comes from elsewhere, and no script is inline.
        """
        page = self.page()
        for marker in ("http://", "https://", "//cdn", "<script>", "style="):
            self.assertNotIn(marker, page)


class MetricsTests(TestCase):
    """
    C{/metrics} serves the node's registry (rendered in the reactor's
    thread pool, so over a real port).
    """

    async def fetch(self, token: Optional[bytes], headers: Optional[Dict[bytes, List[bytes]]] = None) -> Tuple[int, bytes]:
        metrics = NodeMetrics()
        metrics.leadership(True, 7)
        metrics.rejected("auth")
        root = makeWebRoot(FakeSource(), metrics.registry, token, reactor)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        agent = Agent(reactor)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = await agent.request(b"GET", url, Headers(headers or {}))
        body = await readBody(response)
        return response.code, body

    async def test_metrics(self) -> None:
        """
        The node's metrics in Prometheus text, parsed back to their values.
        """
        code, body = await self.fetch(None)
        self.assertEqual(code, 200)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples
        }
        self.assertEqual(samples[("p2pfiles_is_leader", ())], 1)
        self.assertEqual(samples[("p2pfiles_epoch", ())], 7)
        self.assertEqual(samples[("p2pfiles_rejected_total", (("reason", "auth"),))], 1)
        self.assertNotIn(b"python_gc", body)  # the node's registry, not the global one

    async def test_metricsNeedToken(self) -> None:
        """
        With a token, C{/metrics} is refused without it and served with it.
        """
        code, body = await self.fetch(TOKEN)
        self.assertEqual(code, 401)
        self.assertNotIn(b"p2pfiles_", body)
        code, body = await self.fetch(TOKEN, {b"Authorization": [b"Bearer " + TOKEN]})
        self.assertEqual(code, 200)
        self.assertIn(b"p2pfiles_epoch 7.0", body)


CHROMIUM = chromiumPath()


class BrowserTests(TestCase):
    """
    The page in headless Chromium: rendered by its script from the live
    stream, and following changes.
    """

    if CHROMIUM is None:
        skip = "no chromium or chromium-browser on PATH (apt-get install chromium)"

    async def serve(self, source: FakeSource) -> str:
        self.root = makeWebRoot(source, CollectorRegistry(), None, reactor)
        port = reactor.listenTCP(0, Site(self.root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.root.closeStreams)
        return f"http://127.0.0.1:{port.getHost().port}/"

    async def browser(self) -> Browser:
        browser = await Browser.start(reactor)
        self.addCleanup(browser.close)
        return browser

    async def test_liveMembersAndLeaderChange(self) -> None:
        """
        The script renders every member from the stream, then shows a new
        leader, epoch and a member going down when the source announces them.
        """
        source = FakeSource(status=statusOf(members=[member(1), member(2), member(3), member(4)]))
        url = await self.serve(source)
        browser = await self.browser()
        await browser.open(url)
        await browser.waitFor('document.body.dataset.live === "1"', "the page to render from the stream")
        rows = await browser.evaluate(
            "[...document.querySelectorAll('#member-rows tr')].map(r => [r.dataset.member, r.dataset.alive])"
        )
        self.assertEqual(rows, [["1", "true"], ["2", "true"], ["3", "true"], ["4", "true"]])
        self.assertEqual(await browser.evaluate("document.getElementById('leader').textContent"), "1")

        source.announce(statusOf(leader=2, epoch=4, members=[member(1, alive=False), member(2), member(3), member(4)]))
        source.event({"time": 9.0, "kind": "leader", "leader": 2, "epoch": 4})
        await browser.waitFor("document.getElementById('leader').textContent === '2'", "the new leader on the page")
        self.assertEqual(await browser.evaluate("document.getElementById('epoch').textContent"), "4")
        self.assertEqual(
            await browser.evaluate("document.querySelector('tr[data-member=\"1\"]').dataset.alive"), "false"
        )
        self.assertEqual(await browser.evaluate("document.getElementById('alive-count').textContent"), "3")
        await browser.waitFor(
            "document.querySelector('#events li').textContent.includes('node 2 leads, epoch 4')", "the leader event"
        )
        self.assertEqual(await browser.evaluate("document.getElementById('conn').dataset.state"), "live")

    async def test_hostileNamesAreText(self) -> None:
        """
        A file named like markup is shown as text by the script, runs
        nothing, and the filter box finds it.
        """
        hostile = '<img src=x onerror="window.pwned=1">\x1b[31m'
        files = FILES + [{"name": hostile, "size": 5, "sha256": "ef" * 32, "holders": [3]}]
        url = await self.serve(FakeSource(files=files))
        browser = await self.browser()
        await browser.open(url)
        await browser.waitFor('document.body.dataset.files === "1"', "the script to render the files")
        names = await browser.evaluate("[...document.querySelectorAll('#file-rows td.name')].map(t => t.textContent)")
        self.assertIn('<img src=x onerror="window.pwned=1">\\x1b[31m', names)
        self.assertIsNone(await browser.evaluate("window.pwned === undefined ? null : window.pwned"))
        self.assertEqual(await browser.evaluate("document.querySelectorAll('#file-rows img').length"), 0)
        shown = await browser.evaluate(
            "(() => { const f = document.getElementById('file-filter'); f.value = 'onerror';"
            " f.dispatchEvent(new Event('input'));"
            " return [...document.querySelectorAll('#file-rows tr[data-name]')].filter(r => !r.hidden).length; })()"
        )
        self.assertEqual(shown, 1)

    async def test_snapshotWithoutJavaScript(self) -> None:
        """
        With JavaScript off the page still shows every member, the leader
        and the files, as the node rendered them.
        """
        url = await self.serve(FakeSource(status=statusOf(leader=2, members=[member(1), member(2), member(3, alive=False)])))
        browser = await Browser.start(reactor, scripts=False)
        self.addCleanup(browser.close)
        await browser.open(url)
        rows = await browser.evaluate(
            "[...document.querySelectorAll('#member-rows tr')].map(r => [r.dataset.member, r.dataset.alive])"
        )
        self.assertEqual(rows, [["1", "true"], ["2", "true"], ["3", "false"]])
        self.assertEqual(await browser.evaluate("document.getElementById('leader').textContent"), "2")
        self.assertEqual(await browser.evaluate("document.querySelectorAll('#file-rows tr[data-name]').length"), 2)
        self.assertEqual(await browser.evaluate("document.body.dataset.live"), "0")
