"""
The operators' view of a node over HTTP: a status page, a JSON API, a live
stream and Prometheus metrics, as one C{twisted.web} resource tree.

    GET /               the status page: rendered by L{p2pfiles.page} (it
                        works without JavaScript), then kept live by
                        C{static/app.js}
    GET /static/...     its stylesheet and script
    GET /api/status     what C{p2pfiles status --json} prints for this node
    GET /api/files      what C{p2pfiles ls --json} prints when asked of it
    GET /api/transfers  transfers in flight
    GET /api/events     the recent events, oldest first
    GET /api/watch      Server-Sent Events: C{event: status} now and on every
                        change, C{event: event} as events happen
    GET /metrics        Prometheus text

The tree reads the node only through L{IStatusSource}; L{StatusSource}
builds one from a few callables and an L{EventLog}.  With a token, every path
needs C{Authorization: Bearer <token>}; without one (the node listens on
loopback only), requests must name a loopback host, so that a web page
elsewhere cannot reach the node by rebinding a DNS name to 127.0.0.1.
"""

import hmac
import ipaddress
import json
from typing import Any, Callable, Dict, List, Optional

from zope.interface import Interface, implementer

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.static import Data

from p2pfiles.events import EventLog, Subscribers, boundText
from p2pfiles.page import renderPage

STATIC = FilePath(__file__).sibling("static")

# How long /api/files waits for the listing (a follower asks its leader,
# which answers within the client's own default timeout when it can).
LISTING_TIMEOUT = 10.0

# How long the page waits for the listing before it renders without files:
# an operator looking at a sick cluster wants the rest of the page now.
PAGE_LISTING_WAIT = 2.0

# Seconds between comment lines on an idle stream, so that proxies keep it
# open and a client that went away is noticed.
KEEPALIVE = 15.0

# Open streams at once: each holds a connection and a subscription.
MAX_WATCHERS = 64

# Messages kept for a stream whose client does not read; beyond this the
# client is dropped (its EventSource reconnects and starts from the status).
MAX_PENDING = 256

# A token file holds one short line; a big file is a mistake.
MAX_TOKEN_FILE = 4096

# Shorter tokens can be guessed.
MIN_TOKEN = 16

SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


class IStatusSource(Interface):
    """
    What the web view needs from a node.
    """

    def status() -> Dict[str, Any]:
        """
        What C{p2pfiles status --json} prints for this node:
        C{{"id", "address", "role", "leader", "epoch", "members": [{"id",
        "address", "alive"}, ...], "version"}} and any further fields (a
        member may carry a C{"fingerprint"}).
        """

    def listing() -> Deferred:
        """
        A new Deferred (the caller may cancel it) that fires with what
        C{p2pfiles ls --json} prints when asked of this node: a list of
        C{{"name", "size", "sha256", "holders": [ids]}}.
        """

    def transfers() -> List[Dict[str, Any]]:
        """
        Transfers in flight: C{{"name", "direction": "serve" | "relay" |
        "receive", "peer", "bytes", "size", "started"}}, C{started} in the
        clock's seconds.
        """

    def events() -> List[Dict[str, Any]]:
        """
        Recent events, oldest first (see L{p2pfiles.events}).
        """

    def subscribe(callback: Callable[[str, Dict[str, Any]], None]) -> Callable[[], None]:
        """
        Call C{callback(kind, payload)} with C{("status", status dict)} on
        every change of the status and C{("event", event dict)} on every
        event, until the returned callable is called.
        """


@implementer(IStatusSource)
class StatusSource:
    """
    An L{IStatusSource} made of the node's own callables and its
    L{EventLog}; the node calls L{changed} whenever its status may have
    changed (subscribers hear of it only if it did).
    """

    def __init__(
        self,
        status: Callable[[], Dict[str, Any]],
        listing: Callable[[], Deferred],
        transfers: Callable[[], List[Dict[str, Any]]],
        events: EventLog,
    ) -> None:
        self._status = status
        self._listing = listing
        self._transfers = transfers
        self._events = events
        self._watchers = Subscribers()
        self._last: Optional[Dict[str, Any]] = None

    def status(self) -> Dict[str, Any]:
        return self._status()

    def listing(self) -> Deferred:
        return self._listing()

    def transfers(self) -> List[Dict[str, Any]]:
        return self._transfers()

    def events(self) -> List[Dict[str, Any]]:
        return self._events.recent()

    def changed(self) -> None:
        status = self._status()
        if status == self._last:
            return
        self._last = status
        self._watchers.notify("status", status)

    def subscribe(self, callback: Callable[[str, Dict[str, Any]], None]) -> Callable[[], None]:
        stopStatus = self._watchers.subscribe(callback)
        stopEvents = self._events.subscribe(lambda event: callback("event", event))

        def unsubscribe() -> None:
            stopStatus()
            stopEvents()

        return unsubscribe


class TokenError(Exception):
    """
    The web token file cannot be used; the string form says why, in one line.
    """


def readToken(path: str) -> bytes:
    """
    The bearer token in the file at C{path}, surrounding whitespace removed:
    at least L{MIN_TOKEN} visible ASCII characters (what an C{Authorization}
    header can carry), else a L{TokenError}.
    """
    file = FilePath(path)
    try:
        if file.getsize() > MAX_TOKEN_FILE:
            raise TokenError(f"web token file {path} is larger than {MAX_TOKEN_FILE} bytes")
        token = file.getContent().strip()
    except OSError as e:
        raise TokenError(f"cannot read web token file {path}: {e.strerror or e}") from None
    if not token:
        raise TokenError(f"web token file {path} is empty")
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise TokenError(f"web token file {path} holds spaces or characters other than visible ASCII")
    if len(token) < MIN_TOKEN:
        raise TokenError(f"web token in {path} is too short: use at least {MIN_TOKEN} characters")
    return token


def bearerMatches(request: Request, token: bytes) -> bool:
    """
    Whether C{request} carries C{Authorization: Bearer <token>}, compared in
    constant time.
    """
    header = request.getHeader(b"authorization") or b""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        given = b""
    return hmac.compare_digest(given.strip(), token)


def isLoopbackHost(host: Optional[bytes]) -> bool:
    """
    Whether a C{Host} header names this machine: C{localhost} or a loopback
    address, with or without a port.  No header (HTTP/1.0) passes: browsers,
    the only ones a rebound name can steer, always send one.
    """
    if host is None:
        return True
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if ":" in text else text
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def toJSON(value: Any) -> str:
    """
    C{value} as one line of ASCII JSON, with C{<}, C{>} and C{&} escaped
    too: no reader can mistake a hostile name in it for markup.
    """
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def jsonBody(request: Request, value: Any, code: int = 200) -> bytes:
    """
    C{value} as the JSON body of the response, with its content type.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return toJSON(value).encode("ascii")


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str, headers: Dict[bytes, bytes]) -> None:
        super().__init__()
        self._code = code
        self._message = message
        self._headers = headers

    def render(self, request: Request) -> bytes:
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return jsonBody(request, {"error": self._message}, self._code)


class WebRoot(Resource):
    """
    The root of the tree: security headers on every response, then the
    token (or the loopback host) checked before any child is reached.
    """

    def __init__(self, token: Optional[bytes], watch: "_WatchResource") -> None:
        super().__init__()
        self._token = token
        self._watch = watch

    def closeStreams(self) -> None:
        """
        Drop every open C{/api/watch} connection: a stopping node calls this
        (with stopping its listening port), since streams never end by
        themselves.
        """
        self._watch.closeAll()

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if self._token is not None:
            if not bearerMatches(request, self._token):
                return _Refusal(
                    401, "this node's web view needs Authorization: Bearer <token>", {b"www-authenticate": b"Bearer"}
                )
        elif not isLoopbackHost(request.getHeader(b"host")):
            return _Refusal(403, "without a web token this node answers only to a loopback host name", {})
        return super().getChildWithDefault(path, request)


class _JSONResource(Resource):
    isLeaf = True

    def __init__(self, get: Callable[[], Any]) -> None:
        super().__init__()
        self._get = get

    def render_GET(self, request: Request) -> bytes:
        return jsonBody(request, self._get())


def _whenFinished(request: Request) -> Deferred:
    """
    A Deferred that fires with True once C{request} is finished or its
    connection lost; never fails.
    """
    return request.notifyFinish().addBoth(lambda ignored: True)


def _failed(log: Logger, request: Request, gone: List[bool]) -> Callable[[Failure], None]:
    """
    The last errback of a response rendered later: log the bug and answer
    500, unless the client has left.
    """

    def failed(reason: Failure) -> None:
        log.failure("answering {uri} failed", reason, uri=request.uri)
        if not gone:
            request.write(jsonBody(request, {"error": "internal error; see the node's log"}, 500))
            request.finish()

    return failed


class _ListingResource(Resource):
    """
    C{/api/files}: the source's listing, or a JSON error when it fails or
    takes longer than C{timeout}.  A client that leaves cancels the wait.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, source: IStatusSource, clock: IReactorTime, timeout: float) -> None:
        super().__init__()
        self._source = source
        self._clock = clock
        self._timeout = timeout

    def render_GET(self, request: Request) -> object:
        listing = self._source.listing()
        listing.addTimeout(self._timeout, self._clock)
        gone: List[bool] = []

        def left(ignored: object) -> None:
            gone.append(True)
            listing.cancel()

        _whenFinished(request).addCallback(left)

        def answer(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(reason: Failure) -> bytes:
            if gone:
                return b""
            if reason.check(DeferredTimeout):
                return jsonBody(request, {"error": f"no file list within {self._timeout:g} s"}, 504)
            return jsonBody(request, {"error": boundText(str(reason.value) or reason.type.__name__)}, 502)

        listing.addCallbacks(lambda files: jsonBody(request, files), failed)
        listing.addCallback(answer).addErrback(_failed(self.log, request, gone))
        return NOT_DONE_YET


@implementer(IPushProducer)
class _EventStream:
    """
    One C{/api/watch} response: writes the status now, then every message
    its source sends, until the request ends.  As the request's push
    producer it is paused while the client does not read: statuses wait
    coalesced (only the newest matters), events queue up to L{MAX_PENDING},
    beyond which the client is dropped.
    """

    def __init__(self, request: Request, clock: IReactorTime, ended: Callable[["_EventStream"], None]) -> None:
        self._request = request
        self._clock = clock
        self._ended = ended
        self._paused = False
        self._pending: List[bytes] = []
        self._pendingStatus: Optional[bytes] = None
        self._stopped = False
        self._unsubscribe: Callable[[], None] = lambda: None
        self._keepalive: Optional[IDelayedCall] = None

    def start(self, source: IStatusSource) -> None:
        self._request.registerProducer(self, True)
        _whenFinished(self._request).addCallback(lambda ignored: self._stop())
        # Reconnect soon after a drop, not after the browser's default 3 s.
        self._request.write(b"retry: 1000\n\n")
        self._message("status", source.status())
        self._unsubscribe = source.subscribe(self._message)
        self._keepalive = self._clock.callLater(KEEPALIVE, self._ping)

    def _message(self, kind: str, payload: Any) -> None:
        if self._stopped or kind not in ("status", "event"):
            return
        data = f"event: {kind}\ndata: {toJSON(payload)}\n\n".encode("ascii")
        if not self._paused:
            self._request.write(data)
        elif kind == "status":
            self._pendingStatus = data
        elif len(self._pending) < MAX_PENDING:
            self._pending.append(data)
        else:
            self.close()

    def _ping(self) -> None:
        self._keepalive = self._clock.callLater(KEEPALIVE, self._ping)
        if not self._paused:
            self._request.write(b": keepalive\n\n")

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        pending, self._pending = self._pending, []
        if self._pendingStatus is not None:
            pending.append(self._pendingStatus)
            self._pendingStatus = None
        for data in pending:
            self._request.write(data)

    def stopProducing(self) -> None:
        self._stop()

    def close(self) -> None:
        """
        Stop and drop the connection.
        """
        self._stop()
        self._request.loseConnection()

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._pending = []
        self._pendingStatus = None
        self._unsubscribe()
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._ended(self)


class _WatchResource(Resource):
    isLeaf = True

    def __init__(self, source: IStatusSource, clock: IReactorTime) -> None:
        super().__init__()
        self._source = source
        self._clock = clock
        self._streams: List[_EventStream] = []

    def render_GET(self, request: Request) -> object:
        if len(self._streams) >= MAX_WATCHERS:
            return jsonBody(request, {"error": "too many watchers"}, 503)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        # Proxies that buffer responses would hold the stream back.
        request.setHeader(b"x-accel-buffering", b"no")
        stream = _EventStream(request, self._clock, self._streams.remove)
        self._streams.append(stream)
        stream.start(self._source)
        return NOT_DONE_YET

    def closeAll(self) -> None:
        for stream in list(self._streams):
            stream.close()


class _PageResource(Resource):
    """
    C{/}: the page rendered from the source once the listing arrives, or
    after L{PAGE_LISTING_WAIT} without it.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, source: IStatusSource, clock: IReactorTime, template: str) -> None:
        super().__init__()
        self._source = source
        self._clock = clock
        self._template = template

    def render_GET(self, request: Request) -> object:
        listing = self._source.listing()
        listing.addTimeout(PAGE_LISTING_WAIT, self._clock)
        gone: List[bool] = []

        def left(ignored: object) -> None:
            gone.append(True)
            listing.cancel()

        _whenFinished(request).addCallback(left)

        def without(reason: Failure) -> None:
            if not reason.check(DeferredTimeout, CancelledError):
                self.log.failure("the file list for the status page failed", reason)
            return None

        def render(files: Optional[List[Dict[str, Any]]]) -> None:
            if gone:
                return
            page = renderPage(
                self._template,
                self._source.status(),
                files,
                self._source.transfers(),
                self._source.events(),
                self._clock.seconds(),
            )
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.write(page.encode("utf-8"))
            request.finish()

        listing.addErrback(without).addCallback(render).addErrback(_failed(self.log, request, gone))
        return NOT_DONE_YET


def _staticTree() -> Resource:
    static = Resource()
    for name, kind in (("style.css", "text/css; charset=utf-8"), ("app.js", "text/javascript; charset=utf-8")):
        static.putChild(name.encode("ascii"), Data(STATIC.child(name).getContent(), kind))
    return static


def makeWebRoot(source: IStatusSource, registry: Any, token: Optional[bytes], clock: IReactorTime) -> Resource:
    """
    The whole web view of the node behind C{source}, its metrics from
    C{registry} (a C{prometheus_client.CollectorRegistry}); C{token} is the
    bearer token every request needs, or None for a loopback-only endpoint.
    Reads the page's three small files once, here.
    """
    # prometheus_client.twisted imports the global reactor (its thread pool
    # renders the text), so it is imported when the tree is built, in a
    # running node, and never merely by importing this module.
    from prometheus_client.twisted import MetricsResource

    watch = _WatchResource(source, clock)
    root = WebRoot(token, watch)
    root.putChild(b"", _PageResource(source, clock, STATIC.child("index.html").getContent().decode("utf-8")))
    root.putChild(b"static", _staticTree())
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"watch", watch)
    api.putChild(b"status", _JSONResource(source.status))
    api.putChild(b"files", _ListingResource(source, clock, LISTING_TIMEOUT))
    api.putChild(b"transfers", _JSONResource(source.transfers))
    api.putChild(b"events", _JSONResource(source.events))
    root.putChild(b"metrics", MetricsResource(registry=registry))
    return root

