"""
The operators' view of a node over HTTP: a status page, a JSON API, a live
stream and Prometheus metrics, as one C{twisted.web} resource tree.

    GET /               the status page: rendered here (it works without
                        JavaScript), then kept live by C{static/app.js}
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
import html
import ipaddress
import json
import re
import time
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

from p2pfiles.events import MAX_TEXT, EventLog, Subscribers, boundText

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
            if reason.check(DeferredTimeout):
                return jsonBody(request, {"error": f"no file list within {self._timeout:g} s"}, 504)
            if reason.check(CancelledError):
                return b""
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


# Page rendering.  static/app.js builds the same markup from the same data.

_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def visible(text: object) -> str:
    """
    C{text} with control, bidirectional-override and lone surrogate
    characters shown as escapes: a hostile name cannot hide or reorder what
    is around it.
    """

    def escape(match: "re.Match[str]") -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _INVISIBLE.sub(escape, str(text))


def _h(value: object) -> str:
    """
    C{value} as HTML text or attribute value.
    """
    return html.escape(visible(boundText(str(value), MAX_TEXT * 5)), quote=True)


def humanSize(size: object) -> str:
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        return "?"
    if size < 1024:
        return f"{size:g} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _clockTime(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _isoTime(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _peer(peer: object) -> str:
    if isinstance(peer, int) and not isinstance(peer, bool):
        return f"node {peer}"
    return str(peer)


def describeEvent(event: Dict[str, Any]) -> str:
    """
    One line saying what an event means (plain text; escape to show it).
    """
    kind = event.get("kind")
    get = event.get
    if kind == "leader":
        leader = get("leader")
        who = "no leader" if leader is None else f"node {leader} leads"
        return f"{who}, epoch {get('epoch')}"
    if kind in ("member-up", "member-down"):
        at = f" at {get('address')}" if get("address") else ""
        return f"node {get('member')}{at} is {'up' if kind == 'member-up' else 'down'}"
    if kind in ("transfer-done", "transfer-failed"):
        verb = {"serve": "served", "relay": "relayed", "receive": "received"}.get(get("direction"), "moved")
        towards = "from" if get("direction") == "receive" else "to"
        line = f"{verb} {get('name')} {towards} {_peer(get('peer'))}"
        if kind == "transfer-failed":
            return f"{line} failed: {get('reason')}"
        seconds = get("seconds")
        if isinstance(seconds, (int, float)):
            line += f" in {seconds * 1000:.0f} ms" if seconds < 1 else f" in {seconds:.1f} s"
        return f"{line} ({humanSize(get('bytes'))})" if "bytes" in event else line
    if kind == "rejected":
        peer = f" {_peer(get('peer'))}" if get("peer") is not None else ""
        return f"refused{peer}: {get('reason')}"
    return " ".join(f"{key}={value}" for key, value in event.items() if key not in ("time", "kind"))


def _leaderSince(status: Dict[str, Any], events: List[Dict[str, Any]]) -> Optional[float]:
    """
    When the current leader was last announced, if the events still say.
    """
    for event in reversed(events):
        if event.get("kind") == "leader":
            if event.get("leader") == status.get("leader") and event.get("epoch") == status.get("epoch"):
                return event.get("time")
            return None
    return None


def _memberRows(status: Dict[str, Any]) -> List[str]:
    rows = []
    leader = status.get("leader")
    for member in status.get("members", []):
        mid = member.get("id")
        alive = bool(member.get("alive"))
        classes = ["leader" if mid == leader else "", "self" if mid == status.get("id") else ""]
        role = "leader" if mid == leader else "member"
        tag = ' <span class="tag">this node</span>' if mid == status.get("id") else ""
        fingerprint = member.get("fingerprint")
        fp = f'<td class="fp mono" title="{_h(fingerprint)}">{_h(fingerprint)}</td>' if fingerprint else '<td class="fp muted">—</td>'
        state = "alive" if alive else "down"
        rows.append(
            f'<tr data-member="{_h(mid)}" data-alive="{"true" if alive else "false"}" class="{" ".join(c for c in classes if c)}">'
            f'<td class="num">{_h(mid)}</td>'
            f'<td><span class="state" data-state="{state}">{state}</span></td>'
            f"<td>{role}{tag}</td>"
            f'<td class="mono">{_h(member.get("address", ""))}</td>'
            f"{fp}</tr>"
        )
    return rows or ['<tr class="empty"><td colspan="5">no members known</td></tr>']


def _fileRows(files: Optional[List[Dict[str, Any]]]) -> List[str]:
    if files is None:
        return ['<tr class="empty"><td colspan="4">the file list did not arrive in time; reload to try again</td></tr>']
    if not files:
        return ['<tr class="empty"><td colspan="4">no files shared</td></tr>']
    rows = []
    for entry in files:
        holders = "".join(f'<span class="chip">{_h(holder)}</span>' for holder in entry.get("holders", []))
        sha = str(entry.get("sha256", ""))
        rows.append(
            f'<tr data-name="{_h(entry.get("name", ""))}">'
            f'<td class="name">{_h(entry.get("name", ""))}</td>'
            f'<td class="num">{_h(humanSize(entry.get("size")))}</td>'
            f"<td>{holders}</td>"
            f'<td class="mono muted" title="{_h(sha)}">{_h(sha[:12])}</td></tr>'
        )
    return rows


def _rate(transfer: Dict[str, Any], now: float) -> Optional[float]:
    started, done = transfer.get("started"), transfer.get("bytes")
    if not isinstance(started, (int, float)) or not isinstance(done, (int, float)) or now - started <= 0:
        return None
    return done / (now - started)


def _transferRows(transfers: List[Dict[str, Any]], now: float) -> List[str]:
    if not transfers:
        return ['<tr class="empty"><td colspan="5">none</td></tr>']
    rows = []
    for transfer in transfers:
        done, size = transfer.get("bytes", 0), transfer.get("size", 0)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (done, size))
        percent = f" · {100 * done / size:.0f}%" if numeric and size > 0 else ""
        bar = f'<progress max="{_h(size)}" value="{_h(done)}"></progress>' if numeric and size > 0 else "<progress></progress>"
        rate = _rate(transfer, now)
        rows.append(
            f'<tr><td class="name">{_h(transfer.get("name", ""))}</td>'
            f'<td><span class="dir" data-dir="{_h(transfer.get("direction", ""))}">{_h(transfer.get("direction", ""))}</span></td>'
            f'<td class="nowrap">{_h(_peer(transfer.get("peer", "")))}</td>'
            f'<td class="progress-col">{bar}<span class="muted small">{_h(humanSize(done))} of {_h(humanSize(size))}{percent}</span></td>'
            f'<td class="num">{_h(humanSize(rate) + "/s") if rate is not None else "—"}</td></tr>'
        )
    return rows


def _eventItems(events: List[Dict[str, Any]]) -> List[str]:
    if not events:
        return ['<li class="empty">nothing yet</li>']
    return [
        f'<li data-kind="{_h(event.get("kind", ""))}">'
        f'<time datetime="{_isoTime(event.get("time"))}">{_clockTime(event.get("time"))}</time>'
        f'<span class="kind">{_h(event.get("kind", ""))}</span>'
        f'<span class="what">{_h(describeEvent(event))}</span></li>'
        for event in reversed(events)
    ]


_MARKER = re.compile(r"<!--@([a-z-]+)-->")


def renderPage(
    template: str,
    status: Dict[str, Any],
    files: Optional[List[Dict[str, Any]]],
    transfers: List[Dict[str, Any]],
    events: List[Dict[str, Any]],
    now: float,
) -> str:
    """
    The status page as it is at C{now}; C{files} is None when the listing
    did not arrive.
    """
    members = status.get("members", [])
    alive = [m for m in members if m.get("alive")]
    down = [m for m in members if not m.get("alive")]
    leader = status.get("leader")
    since = _leaderSince(status, events)
    rates = [r for r in (_rate(t, now) for t in transfers) if r is not None]
    sizes = [f.get("size") for f in files or [] if isinstance(f.get("size"), int)]
    parts = {
        "node-id": _h(status.get("id", "?")),
        "node-address": _h(status.get("address", "")),
        "role": _h(status.get("role", "")),
        "rendered": _h(_clockTime(now)),
        "leader": "none" if leader is None else _h(leader),
        "leader-address": _h(next((m.get("address", "") for m in members if m.get("id") == leader), "")),
        "epoch": _h(status.get("epoch", "?")),
        "leader-since": f"since {_clockTime(since)}" if since is not None else "",
        "alive-count": str(len(alive)),
        "member-count": str(len(members)),
        "any-down": "true" if down else "false",
        "down-list": _h("down: " + ", ".join(str(m.get("id")) for m in down)) if down else "all up",
        "members-class": "" if any(m.get("fingerprint") for m in members) else "no-fp",
        "members": "\n".join(_memberRows(status)),
        "file-count": "—" if files is None else str(len(files)),
        "file-shown": f"({len(files)})" if files else "",
        "file-total": "" if files is None else _h(humanSize(sum(sizes)) + " in total"),
        "files": "\n".join(_fileRows(files)),
        "transfer-count": str(len(transfers)),
        "transfer-rate": _h(humanSize(sum(rates)) + "/s") if rates else "idle",
        "transfers": "\n".join(_transferRows(transfers, now)),
        "events": "\n".join(_eventItems(events)),
        "version": _h(status.get("version", "")),
    }
    return _MARKER.sub(lambda match: parts.get(match.group(1), ""), template)


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

