"""
Leadership and membership kept in etcd: L{EtcdCoordinator}, and
L{EtcdClient}, the small part of etcd's v3 JSON gateway it speaks.

What lies under C{PREFIX} (default C{/p2pfiles/default}):

  - C{PREFIX/members/<id>}: one key per live node, written put-if-absent under
    the node's lease; its value is C{{"address": "HOST:PORT", "fingerprint":
    ...}}.  A node whose lease lapses disappears with it.
  - C{PREFIX/leader}: the id of the leader (ASCII digits), written by that
    node under its own lease when no leader key exists and it is the smallest
    live id.  The leadership's epoch is this key's C{create_revision}: every
    new leadership creates the key anew, so epochs only go up.  A leader that
    sees a smaller live id deletes its key, and the smaller id claims next.

A node trusts its view only while its lease surely lives: if no keepalive has
been answered for C{ttl - margin} seconds since the last one was sent, it
reports no leader (and is no leader) until it has registered again under a
new lease.  Since the lease cannot have expired before then, no two nodes
lead at once while clocks run at about the same rate.

See C{docs/etcd.md} for the whole story.
"""

import base64
import json
import math
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from p2pfiles.address import formatAddress, parseAddress
from p2pfiles.coordinator import CoordinatorError, ICoordinator, MemberInfo

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TTL",
    "EtcdClient",
    "EtcdCoordinator",
    "EtcdWatch",
    "KeyValue",
    "PrefixFollower",
    "PrefixView",
    "Registration",
    "Step",
    "checkPrefix",
    "encodeMember",
    "nextStep",
    "parseMember",
]

DEFAULT_PREFIX = "/p2pfiles/default"
DEFAULT_TTL = 2.0

# How long one request to one etcd endpoint may take before the next endpoint
# is tried.  Keepalives use a shorter bound of their own (see Registration).
REQUEST_TIMEOUT = 2.0

# A whole answer to one request: a range of this prefix is at most MAX_KEYS
# keys; etcd refuses requests over 1.5 MiB by default, base64 adds a third.
MAX_BODY = 16 * 1024 * 1024

# One message of a watch stream: watches ask etcd to fragment messages larger
# than its request limit (1.5 MiB by default), base64 and JSON add about half.
MAX_WATCH_LINE = 4 * 1024 * 1024

# Keys read under the prefix.  p2pfiles clusters are small; more keys than
# this means something else writes there, and the view is not trusted.
MAX_KEYS = 1024

# A member's value: {"address", "fingerprint"} takes well under 1 KiB.
MAX_MEMBER_VALUE = 4096
MAX_ADDRESS = 300
MAX_FINGERPRINT = 256

# Ids are canonical decimal, at most 18 digits (so they fit an int64).
MAX_ID_DIGITS = 18

# Retry delays after a failure, doubling up to the cap.
BACKOFF_START = 0.1
BACKOFF_CAP = 1.0

# gRPC status codes that mean "this endpoint cannot serve now": try another.
_RETRYABLE_GRPC = {1, 4, 8, 14}  # cancelled, deadline exceeded, exhausted, unavailable
_GRPC_NOT_FOUND = 5

# Every request asks the member it reaches to refuse at once (gRPC
# "unavailable") if it has no raft leader, rather than wait or answer with a
# stale view: "hasleader" is etcd's metadata key for that, and the gateway
# passes on headers named Grpc-Metadata-*.
_HEADERS = {
    b"Content-Type": [b"application/json"],
    b"Grpc-Metadata-Hasleader": [b"true"],
}


# Encoding.


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, field: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise _Malformed(f"{field} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise _Malformed(f"{field} is not valid base64") from None


def _int(value: Any, field: str) -> int:
    """
    An int64 as the gateway writes it: a decimal string (or a JSON number);
    absent means 0.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _Malformed(f"{field} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= 20 and value.lstrip("-").isdigit() and value.isascii():
        return int(value)
    raise _Malformed(f"{field} is not an integer")


def _object(value: Any, field: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Malformed(f"{field} is not an object")
    return value


def _bool(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _Malformed(f"{field} is not a boolean")
    return value


def prefixEnd(key: bytes) -> bytes:
    """
    The C{range_end} that makes a range cover every key starting with C{key}.
    """
    for i in range(len(key) - 1, -1, -1):
        if key[i] < 0xFF:
            return key[:i] + bytes([key[i] + 1])
    return b"\0"


def checkPrefix(prefix: str) -> str:
    """
    C{prefix} if it is a usable key prefix: starts with C{/}, does not end
    with one, printable ASCII without spaces, at most 200 characters.  Raise
    L{ValueError} with a one-line reason otherwise.
    """
    if not isinstance(prefix, str) or not prefix.startswith("/") or len(prefix) < 2:
        raise ValueError(f"etcd prefix {prefix!r} must start with '/' and name something")
    if prefix.endswith("/"):
        raise ValueError(f"etcd prefix {prefix!r} must not end with '/'")
    if len(prefix) > 200 or not all(33 <= ord(c) < 127 for c in prefix):
        raise ValueError(f"etcd prefix {prefix!r} must be at most 200 printable ASCII characters")
    return prefix


def _canonicalId(text: str) -> Optional[int]:
    """
    The id written as C{text} if it is canonical decimal, else L{None}.
    """
    if not (0 < len(text) <= MAX_ID_DIGITS and text.isascii() and text.isdigit()):
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    return int(text)


class _Malformed(Exception):
    """
    etcd's answer is not what the gateway sends.
    """


class _Unreachable(Exception):
    """
    One endpoint did not answer, or said it cannot serve now.
    """


class _Refused(Exception):
    """
    etcd answered with an error.
    """

    def __init__(self, grpcCode: int, message: str) -> None:
        super().__init__(message)
        self.grpcCode = grpcCode


# What etcd holds.


class KeyValue:
    """
    One key as etcd reports it.
    """

    __slots__ = ("key", "value", "createRevision", "modRevision", "version", "lease")

    def __init__(
        self,
        key: bytes,
        value: bytes = b"",
        createRevision: int = 0,
        modRevision: int = 0,
        version: int = 0,
        lease: int = 0,
    ) -> None:
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease

    @classmethod
    def fromJSON(cls, value: Any) -> "KeyValue":
        kv = _object(value, "kv")
        return cls(
            key=_unb64(kv.get("key"), "key"),
            value=_unb64(kv.get("value"), "value"),
            createRevision=_int(kv.get("create_revision"), "create_revision"),
            modRevision=_int(kv.get("mod_revision"), "mod_revision"),
            version=_int(kv.get("version"), "version"),
            lease=_int(kv.get("lease"), "lease"),
        )

    def __repr__(self) -> str:
        return (
            f"KeyValue({self.key!r}, {self.value!r}, create={self.createRevision}, "
            f"mod={self.modRevision}, lease={self.lease:x})"
        )


class Event:
    """
    One change seen by a watch: a put (C{kv} as written) or a delete (C{kv}
    holds the key and the revision of the deletion).
    """

    __slots__ = ("deleted", "kv")

    def __init__(self, deleted: bool, kv: KeyValue) -> None:
        self.deleted = deleted
        self.kv = kv

    @classmethod
    def fromJSON(cls, value: Any) -> "Event":
        event = _object(value, "event")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise _Malformed("event type is neither PUT nor DELETE")
        return cls(kind == "DELETE", KeyValue.fromJSON(event.get("kv")))


class RangeResult:
    def __init__(self, kvs: List[KeyValue], revision: int, more: bool) -> None:
        self.kvs = kvs
        self.revision = revision
        self.more = more


class TxnResult:
    """
    @ivar ranges: the key-values of each range operation that ran, in order.
    """

    def __init__(self, succeeded: bool, revision: int, ranges: List[RangeResult]) -> None:
        self.succeeded = succeeded
        self.revision = revision
        self.ranges = ranges


def _headerRevision(answer: Dict[str, Any]) -> int:
    return _int(_object(answer.get("header"), "header").get("revision"), "revision")


def _rangeResult(answer: Dict[str, Any], revision: int) -> RangeResult:
    kvs = answer.get("kvs") or []
    if not isinstance(kvs, list):
        raise _Malformed("kvs is not a list")
    return RangeResult([KeyValue.fromJSON(kv) for kv in kvs], revision, _bool(answer.get("more"), "more"))


# Transaction parts, as the gateway spells them.


def compareCreated(key: bytes, revision: int) -> Dict[str, Any]:
    """
    Compare: C{key} was created at C{revision} (0: does not exist).
    """
    return {"target": "CREATE", "key": _b64(key), "create_revision": str(revision), "result": "EQUAL"}


def compareModified(key: bytes, revision: int) -> Dict[str, Any]:
    """
    Compare: C{key} was last written at C{revision} (0: does not exist).
    """
    return {"target": "MOD", "key": _b64(key), "mod_revision": str(revision), "result": "EQUAL"}


def putOp(key: bytes, value: bytes, lease: int = 0) -> Dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}


def rangeOp(key: bytes, rangeEnd: Optional[bytes] = None, limit: int = 0) -> Dict[str, Any]:
    request: Dict[str, Any] = {"key": _b64(key)}
    if rangeEnd is not None:
        request["range_end"] = _b64(rangeEnd)
    if limit:
        request["limit"] = str(limit)
    return {"request_range": request}


def deleteOp(key: bytes) -> Dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


# Reading bodies.


class _TooLong(Exception):
    pass


class _WatchEnded(Exception):
    pass


_BODY_DONE = Failure(ResponseDone())


class _BodyReader(Protocol):
    """
    Reads an HTTP response body: whole (at most C{limit} bytes), or, given
    C{onLine}, as newline-delimited lines of at most C{limit} bytes each.

    C{done} fires with the body (or C{b""} in line mode) at its end, or fails;
    cancelling it closes the connection.  C{closed} fires once the connection
    is gone, whatever happened.
    """

    def __init__(self, limit: int, onLine: Optional[Callable[[bytes], None]] = None) -> None:
        self.limit = limit
        self.onLine = onLine
        self.done: Deferred = Deferred(lambda d: self._abort())
        self.closed: Deferred = Deferred()
        self._buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._buffer += data
        try:
            # A newline can only be in what just arrived.
            if self.onLine is not None and b"\n" in data:
                lines = self._buffer.split(b"\n")
                self._buffer = lines.pop()
                for line in lines:
                    if len(line) > self.limit:
                        raise _TooLong(f"etcd sent a message over {self.limit} bytes")
                    if line.strip():
                        self.onLine(bytes(line))
                    if self.done.called:
                        return
            if len(self._buffer) > self.limit:
                what = "a message" if self.onLine is not None else "an answer"
                raise _TooLong(f"etcd sent {what} over {self.limit} bytes")
        except Exception:
            failure = Failure()
            self._abort()
            if not self.done.called:
                self.done.errback(failure)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = _BODY_DONE) -> None:
        if not self.done.called:
            if reason.check(ResponseDone, PotentialDataLoss):
                self.done.callback(b"" if self.onLine is not None else bytes(self._buffer))
            else:
                self.done.errback(reason)
        self.closed.callback(None)


def _decode(body: bytes) -> Dict[str, Any]:
    """
    One JSON object from etcd; an C{"error"} member becomes L{_Refused}.
    """
    try:
        answer = json.loads(body.decode("utf-8"), parse_constant=_refuseConstant)
    except (UnicodeDecodeError, ValueError):
        raise _Malformed(f"not JSON: {body[:60]!r}") from None
    if not isinstance(answer, dict):
        raise _Malformed("not a JSON object")
    error = answer.get("error")
    if error is not None:
        # Unary calls put the error at the top ({"error", "message",
        # "code"}); streams wrap it: {"error": {"grpc_code", "message", ...}}.
        detail = error if isinstance(error, dict) else answer
        message = detail.get("message") or error
        code = detail.get("code", detail.get("grpc_code", 2))
        if not isinstance(message, str):
            message = "unreadable error"
        if isinstance(code, bool) or not isinstance(code, int):
            code = 2
        raise _Refused(code, message.splitlines()[0][:200] if message else "error")
    return answer


def _refuseConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _oneLine(failure: Failure, timeout: Optional[float] = None) -> str:
    value = failure.value
    if isinstance(value, DeferredTimeout) and timeout is not None:
        return f"no answer within {timeout:g}s"
    if isinstance(value, _HTTP_FAILURES) and value.reasons:
        return _oneLine(value.reasons[0])
    text = str(value).splitlines()[0] if str(value) else type(value).__name__
    return text[:120]


# Failures that mean an endpoint did not answer (as opposed to answering with
# an error): the next endpoint is tried.
_HTTP_FAILURES = (ResponseFailed, RequestGenerationFailed, RequestTransmissionFailed)
_NOT_ANSWERED = (
    _Unreachable,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    DeferredTimeout,
    DNSLookupError,
) + _HTTP_FAILURES


# The client.


class WatchEnd:
    """
    Why a watch stream ended: etcd compacted the history the watch needed
    (C{compactRevision} > 0: read afresh), cancelled it (C{reason}), or just
    closed the stream.
    """

    def __init__(self, compactRevision: int = 0, reason: str = "stream closed") -> None:
        self.compactRevision = compactRevision
        self.reason = reason


class EtcdWatch:
    """
    A watch stream.

    @ivar endpoint: the endpoint it reached, once it has.
    @ivar received: how many whole messages it has received.
    @ivar done: fires with a L{WatchEnd}, or fails with L{CoordinatorError}.
    """

    def __init__(self) -> None:
        self.endpoint: Optional[str] = None
        self.received = 0
        self.done: Deferred = Deferred()  # replaced by the stream's own

    def cancel(self) -> None:
        self.done.cancel()


class _WatchParser:
    """
    Turns a watch stream's lines into batches of events, joining fragments.
    """

    def __init__(self, watch: EtcdWatch, onEvents: Callable[[List[Event]], None]) -> None:
        self.watch = watch
        self.onEvents = onEvents
        self.pending: List[Event] = []
        self.end: Optional[WatchEnd] = None

    def line(self, line: bytes) -> None:
        answer = _decode(line)
        result = _object(answer.get("result"), "result")
        events = result.get("events") or []
        if not isinstance(events, list):
            raise _Malformed("events is not a list")
        self.pending.extend(Event.fromJSON(e) for e in events)
        if _bool(result.get("canceled"), "canceled"):
            reason = result.get("cancel_reason") or "cancelled by etcd"
            self.end = WatchEnd(_int(result.get("compact_revision"), "compact_revision"), str(reason)[:200])
            raise _WatchEnded()
        compacted = _int(result.get("compact_revision"), "compact_revision")
        if compacted:
            self.end = WatchEnd(compacted, "history compacted")
            raise _WatchEnded()
        if _bool(result.get("fragment"), "fragment"):
            return
        self.watch.received += 1
        batch, self.pending = self.pending, []
        if batch:
            self.onEvents(batch)


class EtcdClient:
    """
    The few calls of etcd's v3 JSON gateway that the coordinator needs, over
    treq, failing over across C{endpoints} (C{HOST:PORT} each).

    Every call fails with a one-line L{CoordinatorError}: code C{unavailable}
    when no endpoint answered in time, C{protocol} when etcd's answer could
    not be read, C{internal} when etcd refused the request.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoints: List[str],
        treqClient: Any = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = [formatAddress(*parseAddress(e)) for e in endpoints]
        self.reactor = reactor
        self.timeout = timeout
        self._current = 0
        self._pool = None
        if treqClient is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.retryAutomatically = False
            treqClient = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))
        self._treq = treqClient
        self._calls: Set[Deferred] = set()
        self._readers: Set[_BodyReader] = set()
        self._failing: Set[str] = set()

    @property
    def current(self) -> str:
        """
        The endpoint requests go to first.
        """
        return self.endpoints[self._current]

    # Calls.

    def grant(self, ttl: int) -> Deferred:
        """
        A new lease of C{ttl} seconds; fires with C{(lease id, granted ttl)}.
        """

        def parse(answer: Dict[str, Any]) -> Tuple[int, int]:
            lease = _int(answer.get("ID"), "ID")
            if lease == 0:
                raise _Malformed("lease grant without an ID")
            return lease, _int(answer.get("TTL"), "TTL")

        return self._call("/v3/lease/grant", {"TTL": int(ttl)}, parse)

    def keepalive(self, lease: int, timeout: Optional[float] = None) -> Deferred:
        """
        Renew C{lease}; fires with its new TTL in seconds, 0 if etcd no longer
        knows it.
        """

        def parse(answer: Dict[str, Any]) -> int:
            return _int(_object(answer.get("result"), "result").get("TTL"), "TTL")

        return self._call("/v3/lease/keepalive", {"ID": str(lease)}, parse, timeout)

    def revoke(self, lease: int, timeout: Optional[float] = None) -> Deferred:
        """
        Revoke C{lease}, deleting every key attached to it; fires with
        L{False} if etcd no longer knew it, else L{True}.
        """
        return self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda answer: True, timeout, notFound=False)

    def range(self, key: bytes, rangeEnd: Optional[bytes] = None, limit: int = 0) -> Deferred:
        """
        Fires with a L{RangeResult}.
        """
        body = rangeOp(key, rangeEnd, limit)["request_range"]
        return self._call("/v3/kv/range", body, lambda answer: _rangeResult(answer, _headerRevision(answer)))

    def txn(
        self, compare: List[Dict[str, Any]], success: List[Dict[str, Any]], failure: Iterable[Dict[str, Any]] = ()
    ) -> Deferred:
        """
        Fires with a L{TxnResult}.
        """

        def parse(answer: Dict[str, Any]) -> TxnResult:
            revision = _headerRevision(answer)
            responses = answer.get("responses") or []
            if not isinstance(responses, list):
                raise _Malformed("responses is not a list")
            ranges = []
            for response in responses:
                response = _object(response, "response")
                if "response_range" in response:
                    ranges.append(_rangeResult(_object(response["response_range"], "response_range"), revision))
            return TxnResult(_bool(answer.get("succeeded"), "succeeded"), revision, ranges)

        body = {"compare": compare, "success": success, "failure": list(failure)}
        return self._call("/v3/kv/txn", body, parse)

    def watch(
        self, key: bytes, rangeEnd: bytes, startRevision: int, onEvents: Callable[[List[Event]], None]
    ) -> EtcdWatch:
        """
        Watch C{[key, rangeEnd)} from C{startRevision} on, calling
        C{onEvents} with each batch of events (one or more whole revisions).
        """
        watch = EtcdWatch()
        request = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(rangeEnd),
                "start_revision": str(startRevision),
                "fragment": True,
            }
        }
        watch.done = Deferred.fromCoroutine(self._watch(watch, json.dumps(request).encode(), onEvents))
        self._track(watch.done)
        return watch

    def close(self) -> Deferred:
        """
        Cancel every call and watch under way and close every connection;
        fires once they are closed.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        for d in list(self._calls):
            d.cancel()
        for reader in list(self._readers):
            await reader.closed
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # Plumbing.

    def _track(self, d: Deferred) -> None:
        self._calls.add(d)

        def untrack(result: Any) -> Any:
            self._calls.discard(d)
            return result

        d.addBoth(untrack)

    def _call(
        self,
        path: str,
        body: Dict[str, Any],
        parse: Callable[[Dict[str, Any]], Any],
        timeout: Optional[float] = None,
        notFound: Any = None,
    ) -> Deferred:
        d = Deferred.fromCoroutine(
            self._unary(path, json.dumps(body).encode(), parse, self.timeout if timeout is None else timeout, notFound)
        )
        self._track(d)
        return d

    async def _unary(
        self, path: str, data: bytes, parse: Callable[[Dict[str, Any]], Any], timeout: float, notFound: Any
    ) -> Any:
        problems = []
        for _ in range(len(self.endpoints)):
            endpoint = self.current
            attempt = Deferred.fromCoroutine(self._exchange(endpoint, path, data))
            attempt.addTimeout(timeout, self.reactor)
            try:
                answer = await attempt
                result = parse(answer)
            except _NOT_ANSWERED as e:
                problems.append(f"{endpoint}: {_oneLine(Failure(e), timeout)}")
            except _Refused as e:
                if e.grpcCode == _GRPC_NOT_FOUND and notFound is not None:
                    return notFound
                if e.grpcCode not in _RETRYABLE_GRPC:
                    raise CoordinatorError("internal", f"etcd at {endpoint} refused {path}: {e}") from None
                problems.append(f"{endpoint}: {e}")
            except _Malformed as e:
                raise CoordinatorError("protocol", f"etcd at {endpoint} sent a malformed answer to {path}: {e}") from None
            except _TooLong as e:
                raise CoordinatorError("protocol", f"{e} (to {path} at {endpoint})") from None
            else:
                self._failing.discard(endpoint)
                return result
            self._failover(endpoint, problems[-1])
        raise CoordinatorError("unavailable", f"no etcd endpoint answered {path} ({'; '.join(problems)})")

    async def _exchange(self, endpoint: str, path: str, data: bytes) -> Dict[str, Any]:
        response = await self._post(endpoint, path, data)
        reader = _BodyReader(MAX_BODY)
        self._readers.add(reader)
        reader.closed.addBoth(lambda _: self._readers.discard(reader))
        response.deliverBody(reader)
        body = await reader.done
        if response.code != 200:
            reason = f"HTTP {response.code}"
            try:
                _decode(body)
            except _Refused as e:
                if response.code < 500:
                    raise
                reason = str(e)
            except _Malformed:
                pass
            # 5xx: this member cannot serve now (no raft leader, timed out).
            if response.code >= 500:
                raise _Unreachable(reason)
            raise _Refused(2, reason)
        return _decode(body)

    async def _post(self, endpoint: str, path: str, data: bytes) -> Any:
        url = f"http://{endpoint}{path}".encode("ascii")
        try:
            return await self._treq.post(url, data=data, headers=Headers(_HEADERS), unbuffered=True)
        except ConnectingCancelledError:
            raise CancelledError() from None
        except _HTTP_FAILURES as e:
            # The agent reports a request cancelled under way as a failure
            # to connect, send or receive it; to our callers (and to
            # addTimeout) it is a cancellation.
            if any(reason.check(CancelledError, ConnectingCancelledError) for reason in e.reasons):
                raise CancelledError() from None
            raise

    def _failover(self, endpoint: str, why: str) -> None:
        """
        C{endpoint} failed: send requests to the next one from now on.  Logged
        once until the endpoint answers again.
        """
        if len(self.endpoints) > 1 and self.current == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)
            if endpoint not in self._failing:
                self.log.info(
                    "etcd at {endpoint} did not answer ({why}); trying {next}", endpoint=endpoint, why=why, next=self.current
                )
        self._failing.add(endpoint)

    async def _watch(self, watch: EtcdWatch, data: bytes, onEvents: Callable[[List[Event]], None]) -> WatchEnd:
        problems = []
        response = None
        for _ in range(len(self.endpoints)):
            endpoint = self.current
            attempt = Deferred.fromCoroutine(self._post(endpoint, "/v3/watch", data))
            attempt.addTimeout(self.timeout, self.reactor)
            try:
                response = await attempt
                break
            except _NOT_ANSWERED as e:
                problems.append(f"{endpoint}: {_oneLine(Failure(e), self.timeout)}")
                self._failover(endpoint, problems[-1])
        if response is None:
            raise CoordinatorError("unavailable", f"no etcd endpoint answered /v3/watch ({'; '.join(problems)})")
        self._failing.discard(endpoint)
        parser = _WatchParser(watch, onEvents)
        if response.code == 200:
            reader = _BodyReader(MAX_WATCH_LINE, parser.line)
        else:
            reader = _BodyReader(MAX_BODY)
        self._readers.add(reader)
        reader.closed.addBoth(lambda _: self._readers.discard(reader))
        response.deliverBody(reader)
        watch.endpoint = endpoint
        try:
            body = await reader.done
        except _WatchEnded:
            assert parser.end is not None
            return parser.end
        except _TooLong as e:
            raise CoordinatorError("protocol", f"{e} (watch at {endpoint})") from None
        except _Malformed as e:
            raise CoordinatorError("protocol", f"etcd at {endpoint} sent a malformed watch message: {e}") from None
        except _Refused as e:
            raise CoordinatorError("unavailable", f"etcd at {endpoint} ended the watch: {e}") from None
        except _NOT_ANSWERED as e:
            raise CoordinatorError("unavailable", f"watch stream from {endpoint} broke: {_oneLine(Failure(e))}") from None
        if response.code != 200:
            try:
                _decode(body)
            except (_Refused, _Malformed) as e:
                raise CoordinatorError("unavailable", f"etcd at {endpoint} refused the watch: {e}") from None
            raise CoordinatorError("unavailable", f"etcd at {endpoint} refused the watch: HTTP {response.code}")
        return WatchEnd()


# What lies under the prefix.


def encodeMember(member: MemberInfo) -> bytes:
    """
    The value of a member's key: C{{"address": ..., "fingerprint": ...}}, the
    fingerprint left out when there is none.
    """
    value: Dict[str, str] = {"address": member.address}
    if member.fingerprint is not None:
        value["fingerprint"] = member.fingerprint
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _printable(text: str) -> bool:
    return all(33 <= ord(c) < 127 for c in text)


def parseMember(id: int, value: bytes) -> MemberInfo:
    """
    The member C{id} as described by the value of its key; raise
    L{ValueError} with a one-line reason if the value is not one.  Unknown
    fields are ignored, so that a later version may add some.
    """
    if len(value) > MAX_MEMBER_VALUE:
        raise ValueError(f"value of {len(value)} bytes (at most {MAX_MEMBER_VALUE})")
    try:
        data = json.loads(value.decode("utf-8"), parse_constant=_refuseConstant)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("value is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("value is not a JSON object")
    address = data.get("address")
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS or not _printable(address):
        raise ValueError(f"address is not printable ASCII of at most {MAX_ADDRESS} characters")
    parseAddress(address)
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and (
        not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= MAX_FINGERPRINT or not _printable(fingerprint)
    ):
        raise ValueError(f"fingerprint is not printable ASCII of at most {MAX_FINGERPRINT} characters")
    return MemberInfo(id, address, fingerprint)


def _shortKey(key: bytes) -> str:
    return repr(key[:80]) + ("..." if len(key) > 80 else "")


class PrefixView:
    """
    The keys under one prefix as of C{revision}, fed with etcd's answers (a
    range, then watch events): who the members are, and which leader key
    stands.  It knows nothing of connections or time.

    Every key is checked where it enters: a member key must end in a
    canonical decimal id and hold a valid member value, a leader key must
    hold a canonical id.  Anything else is ignored with one log line.  More
    than C{maxKeys} keys make the view C{overfull}: it is not to be trusted
    until it has been read afresh with fewer.
    """

    log = Logger()

    def __init__(self, prefix: str, maxKeys: Optional[int] = None) -> None:
        self.prefix = checkPrefix(prefix)
        self.start = (prefix + "/").encode("ascii")
        self.end = prefixEnd(self.start)
        self.leaderKey = self.start + b"leader"
        self._membersStart = self.start + b"members/"
        self.maxKeys = MAX_KEYS if maxKeys is None else maxKeys
        self.revision = 0
        self.overfull = False
        self._kvs: Dict[bytes, KeyValue] = {}
        self._members: Dict[int, Tuple[MemberInfo, KeyValue]] = {}

    def memberKey(self, id: int) -> bytes:
        return self._membersStart + str(id).encode("ascii")

    # Input.

    def reset(self, result: RangeResult) -> None:
        """
        Start again from a range of the whole prefix.
        """
        self._kvs.clear()
        self._members.clear()
        self.overfull = False
        for kv in result.kvs:
            self._put(kv)
        if result.more and not self.overfull:
            self._overflow()
        self.revision = result.revision

    def apply(self, events: List[Event]) -> None:
        for event in events:
            if event.deleted:
                self._delete(event.kv.key)
            else:
                self._put(event.kv)
            self.revision = max(self.revision, event.kv.modRevision)

    def _overflow(self) -> None:
        self.overfull = True
        self.log.error(
            "more than {max} keys under {prefix} in etcd: not trusting them until there are fewer",
            max=self.maxKeys,
            prefix=self.prefix,
        )

    def _put(self, kv: KeyValue) -> None:
        if not kv.key.startswith(self.start):
            return
        if kv.key not in self._kvs and len(self._kvs) >= self.maxKeys:
            if not self.overfull:
                self._overflow()
            return
        self._kvs[kv.key] = kv
        if kv.key == self.leaderKey:
            if _canonicalId(kv.value.decode("ascii", "replace")) is None:
                self.log.warn("ignored the leader key in etcd: {value} is not a node id", value=_shortKey(kv.value))
        elif kv.key.startswith(self._membersStart):
            id = self._memberId(kv.key)
            if id is None:
                self.log.warn("ignored etcd key {key}: not a member id", key=_shortKey(kv.key))
                return
            self._members.pop(id, None)
            try:
                self._members[id] = (parseMember(id, kv.value), kv)
            except ValueError as e:
                self.log.warn("ignored member {id} in etcd: {why}", id=id, why=str(e))

    def _delete(self, key: bytes) -> None:
        self._kvs.pop(key, None)
        if key.startswith(self._membersStart):
            id = self._memberId(key)
            if id is not None:
                self._members.pop(id, None)

    def _memberId(self, key: bytes) -> Optional[int]:
        return _canonicalId(key[len(self._membersStart) :].decode("ascii", "replace"))

    # What it says.

    def entry(self, key: bytes) -> Optional[KeyValue]:
        return self._kvs.get(key)

    def members(self) -> Dict[int, MemberInfo]:
        return {id: info for id, (info, kv) in self._members.items()}

    def smallest(self) -> Optional[int]:
        return min(self._members) if self._members else None

    def leaderClaim(self) -> Optional[Tuple[int, KeyValue]]:
        """
        The leader id and its key, if the leader key names a live member and
        was written under that member's lease (both go when it does).
        """
        kv = self._kvs.get(self.leaderKey)
        if kv is None or kv.lease == 0:
            return None
        id = _canonicalId(kv.value.decode("ascii", "replace"))
        member = self._members.get(id) if id is not None else None
        if member is None or member[1].lease != kv.lease:
            return None
        return id, kv


class PrefixFollower:
    """
    Keeps a L{PrefixView} current: watches the prefix from the revision
    after the view's, resumes a broken watch from there (backing off, up to
    a second), and reads the prefix afresh when etcd has compacted the
    history the watch needs, sends something it cannot read, or the view
    overflowed.  Calls C{onChange} after each change of the view.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, client: EtcdClient, view: PrefixView, onChange: Callable[[], None]) -> None:
        self.reactor = reactor
        self.client = client
        self.view = view
        self.onChange = onChange
        self._token: Optional[object] = None
        self._watch: Optional[EtcdWatch] = None
        self._pending: Set[Deferred] = set()

    @property
    def endpoint(self) -> Optional[str]:
        """
        The endpoint the watch under way reached, if any.
        """
        return self._watch.endpoint if self._watch is not None else None

    def start(self) -> None:
        """
        (Re)start following, from the revision after the view's.
        """
        self.stop()
        token = self._token = object()
        d = Deferred.fromCoroutine(self._follow(token))
        d.addErrback(lambda f: self.log.failure("following etcd failed", f))

    def stop(self) -> None:
        self._token = None
        self._watch = None
        for d in list(self._pending):
            d.cancel()

    async def _wait(self, d: Deferred) -> Any:
        self._pending.add(d)
        try:
            return await d
        finally:
            self._pending.discard(d)

    async def _follow(self, token: object) -> None:
        view = self.view
        backoff = BACKOFF_START
        reread = False
        problem = None
        while self._token is token:
            try:
                if reread:
                    current = await self._wait(self.client.range(view.start, view.end, MAX_KEYS + 1))
                    if self._token is not token:
                        return
                    view.reset(current)
                    self.onChange()
                    reread = False
                watch = self.client.watch(
                    view.start, view.end, view.revision + 1, lambda events: self._watched(token, events)
                )
                self._watch = watch
                end = await self._wait(watch.done)
                if watch.received:
                    backoff = BACKOFF_START
                    problem = None
                if end.compactRevision:
                    self.log.info(
                        "etcd compacted its history past revision {revision}: reading {prefix} afresh",
                        revision=end.compactRevision,
                        prefix=view.prefix,
                    )
                    reread = True
                else:
                    self.log.info("etcd ended the watch ({why}); resuming", why=end.reason)
            except CancelledError:
                if self._token is not token:
                    return
                reread = True  # cancelled by _watched, to read afresh
            except CoordinatorError as e:
                if self._token is not token:
                    return
                reread = reread or e.code == "protocol"
                if str(e) != problem:
                    problem = str(e)
                    self.log.info("etcd watch: {why}; trying again", why=problem)
            except Exception:
                if self._token is not token:
                    return
                self.log.failure("unexpected error following etcd; reading it afresh")
                reread = True
            if self._token is token:
                self._watch = None
            try:
                await self._wait(deferLater(self.reactor, backoff, lambda: None))
            except CancelledError:
                return
            backoff = min(backoff * 2, BACKOFF_CAP)

    def _watched(self, token: object, events: List[Event]) -> None:
        if self._token is not token:
            return
        self.view.apply(events)
        self.onChange()
        if self.view.overfull and self._watch is not None:
            self._watch.cancel()


class Step(NamedTuple):
    """
    A transaction that moves the cluster towards the smallest live id
    leading.

    @ivar handingOver: whether it deletes this node's own leader key
        (a smaller id is live), C{epoch} being that leadership's.
    """

    what: str
    compare: List[Dict[str, Any]]
    success: List[Dict[str, Any]]
    handingOver: bool = False
    epoch: int = 0


def nextStep(view: PrefixView, me: int, lease: int, memberRevision: int, abandoned: Iterable[int] = ()) -> Optional[Step]:
    """
    What node C{me} (registered under C{lease}, its key created at
    C{memberRevision}) should do about the leader key, as C{view} stands:

      - no leader key, and C{me} is the smallest live id: claim it, under
        our lease, if our registration still stands;
      - our own leader key, and a smaller id is live: hand over (delete it,
        if it is still that leadership's key);
      - a leader key that names no live member under that member's lease,
        and C{me} is the smallest live id: clear it (if unchanged) so that a
        claim can follow — unless it is ours under an C{abandoned} lease,
        which goes when we revoke that lease;
      - otherwise nothing: some other node leads, or must act first.
    """
    standing = view.entry(view.leaderKey)
    claim = view.leaderClaim()
    smallest = view.smallest()
    if standing is None:
        if smallest != me:
            return None
        return Step(
            "claim the leadership",
            [compareCreated(view.leaderKey, 0), compareCreated(view.memberKey(me), memberRevision)],
            [putOp(view.leaderKey, str(me).encode("ascii"), lease)],
        )
    if claim is not None and claim[0] == me and standing.lease == lease:
        if smallest is None or smallest >= me:
            return None
        return Step(
            "hand over the leadership",
            [compareCreated(view.leaderKey, standing.createRevision)],
            [deleteOp(view.leaderKey)],
            handingOver=True,
            epoch=standing.createRevision,
        )
    if claim is None and smallest == me and standing.lease not in set(abandoned):
        return Step(
            "clear the leader key",
            [compareModified(view.leaderKey, standing.modRevision)],
            [deleteOp(view.leaderKey)],
        )
    return None


class _Held(Exception):
    """
    Our id is registered under another lease.
    """

    def __init__(self, id: int, holder: KeyValue) -> None:
        try:
            self.address: Optional[str] = parseMember(id, holder.value).address
        except ValueError:
            self.address = None
        self.message = f"node id {id} is already registered in etcd by {self.address or 'a node with an unreadable value'}"
        super().__init__(self.message)


class Registration:
    """
    This node's member key in etcd, and the lease it lives under.

    L{join} grants a lease of C{ttl} seconds and puts the member key under
    it if absent, reading the whole prefix in the same transaction.  Then
    L{maintain} keeps the lease alive every C{ttl / 3} seconds.  The lease
    is trusted only while it surely lives: until C{ttl - margin} after the
    last answered keepalive was sent.  When that passes, or etcd no longer
    knows the lease or the key (L{lose}), the registration is lost:
    C{onLost} is told at once, and a new lease is registered as soon as etcd
    answers.  The member key moves to the new lease in one transaction if
    it is still there, so that the other nodes see no change of members;
    only then is the old lease revoked.

    @ivar lease: the lease we hold and trust, or L{None}.
    @ivar memberRevision: the create_revision of our member key.
    @ivar abandoned: leases we stopped trusting and have not revoked yet.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        client: EtcdClient,
        me: MemberInfo,
        view: PrefixView,
        ttl: float,
        margin: float,
        onRegistered: Callable[[RangeResult], None],
        onRenewed: Callable[[], None],
        onLost: Callable[[str, int], None],
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.me = me
        self.view = view
        self.ttl = ttl
        self.margin = margin
        self.interval = ttl / 3
        self.attemptTimeout = ttl / 5
        self.memberKey = view.memberKey(me.id)
        self.onRegistered = onRegistered
        self.onRenewed = onRenewed
        self.onLost = onLost
        self.lease: Optional[int] = None
        self.memberRevision = 0
        self.abandoned: Set[int] = set()
        self._previousRevision = 0  # create_revision of our key under the last abandoned lease
        self._granted: Optional[int] = None  # a lease being registered
        self._safeUntil = 0.0
        self._lapseCall: Any = None
        self._running = False
        self._pending: Set[Deferred] = set()  # calls and naps that leave() cancels
        self._nap: Optional[Deferred] = None  # the maintenance loop's sleep
        self._loop: Optional[Deferred] = None
        self._problem: Optional[str] = None  # the etcd trouble last logged

    def trusted(self) -> bool:
        return self.lease is not None and self.reactor.seconds() < self._safeUntil

    async def join(self) -> None:
        """
        Register for the first time.  Fails with L{CoordinatorError}: code
        C{conflict} if another live node holds our id, C{unavailable} if etcd
        does not answer.
        """
        self._running = True
        waitUntil = None
        while True:
            try:
                await self._register()
                break
            except _Held as held:
                # Our own address: most likely this node's previous run, killed
                # before it could revoke its lease.  Wait for etcd to drop it.
                now = self.reactor.seconds()
                if held.address != self.me.address:
                    raise CoordinatorError("conflict", held.message) from None
                if waitUntil is None:
                    waitUntil = now + math.ceil(self.ttl) + 1.0
                    self.log.info(
                        "node id {id} is still registered in etcd at our address {address}, most likely by this "
                        "node's previous run: waiting up to {t:g}s for its lease to lapse",
                        id=self.me.id,
                        address=self.me.address,
                        t=waitUntil - now,
                    )
                if now >= waitUntil:
                    raise CoordinatorError("conflict", held.message) from None
                await self._sleep(self.interval)
                if not self._running:
                    raise CancelledError()
        self.log.info(
            "registered in etcd as node {id} under {prefix} (lease {lease:x}, revision {revision})",
            id=self.me.id,
            prefix=self.view.prefix,
            lease=self.lease,
            revision=self.memberRevision,
        )

    def maintain(self) -> None:
        """
        Keep the lease alive, and register again whenever it is lost, until
        L{leave}.
        """
        self._loop = Deferred.fromCoroutine(self._maintain())
        self._loop.addErrback(lambda f: self.log.failure("keeping our etcd registration failed", f))

    async def leave(self) -> None:
        """
        Stop keeping the lease, and revoke every lease we hold: our keys go
        with them at once.  Never fails.
        """
        self._running = False
        self._cancelLapse()
        for d in list(self._pending):
            d.cancel()
        if self._loop is not None:
            await self._loop
        leases = sorted(self.abandoned | {lease for lease in (self.lease, self._granted) if lease is not None})
        self.lease = self._granted = None
        self.abandoned.clear()
        for lease in leases:
            try:
                await self.client.revoke(lease)
            except Exception as e:
                self.log.warn(
                    "could not revoke lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                    lease=lease,
                    why=str(e) or type(e).__name__,
                    ttl=math.ceil(self.ttl),
                )

    def lose(self, why: str, keepKey: bool = True) -> None:
        """
        Stop trusting our lease at once; register again under a new lease as
        soon as etcd answers (keeping our member key if it is still there,
        unless C{keepKey} is false).
        """
        lease = self.lease
        if lease is None:
            return
        self.abandoned.add(lease)
        self.lease = None
        self._previousRevision = self.memberRevision if keepKey else 0
        self.memberRevision = 0
        self._cancelLapse()
        self.onLost(why, lease)
        if self._nap is not None:
            self._nap.cancel()

    # Registering.

    async def _register(self, previous: int = 0) -> None:
        """
        A new lease, then our member key under it, reading the whole prefix
        in the same transaction.

        The key is put if absent; or, given the C{create_revision} of the
        key we put before (C{previous}), if it is still that key.
        """
        view = self.view
        sent = self.reactor.seconds()
        lease, granted = await self._call(self.client.grant(math.ceil(self.ttl)))
        self._granted = lease
        try:
            while True:
                result = await self._call(
                    self.client.txn(
                        [compareCreated(self.memberKey, previous)],
                        [putOp(self.memberKey, encodeMember(self.me), lease), rangeOp(view.start, view.end, MAX_KEYS + 1)],
                        [rangeOp(self.memberKey)],
                    )
                )
                if not result.ranges:
                    raise CoordinatorError("protocol", "etcd's answer to our registration holds no range")
                if result.succeeded:
                    current = result.ranges[0]
                    memberRevision = previous or result.revision
                    break
                holder = result.ranges[0].kvs[0] if result.ranges[0].kvs else None
                if holder is None and previous:
                    # Our old key lapsed meanwhile: put it afresh.
                    previous = 0
                    continue
                if holder is None:
                    raise CoordinatorError("protocol", "etcd refused our registration yet holds no such key")
                if holder.lease != lease:
                    raise _Held(self.me.id, holder)
                # An earlier try of this transaction, sent to an endpoint that
                # then failed to answer, got through.
                memberRevision = holder.createRevision
                current = await self._call(self.client.range(view.start, view.end, MAX_KEYS + 1))
                break
        except BaseException:
            if self._running:
                await self._dropGranted()
            raise
        self._granted = None
        self.lease = lease
        self.memberRevision = memberRevision
        self._safeUntil = 0.0
        self._extend(sent, granted)
        self.onRegistered(current)

    async def _dropGranted(self) -> None:
        """
        Revoke the lease granted for a registration that failed.
        """
        lease, self._granted = self._granted, None
        if lease is None:
            return
        try:
            await self.client.revoke(lease)
        except CoordinatorError as e:
            self.log.info(
                "could not revoke unused lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                lease=lease,
                why=str(e),
                ttl=math.ceil(self.ttl),
            )

    async def _rejoin(self) -> None:
        """
        Register under a new lease, then revoke the one we stopped trusting:
        our leader key, if we held one, goes with it, so that a leadership
        never survives a loss of trust.
        """
        try:
            await self._register(self._previousRevision)
        except _Held as held:
            raise CoordinatorError("conflict", held.message) from None
        self._recovered()
        if self.lease is None:
            return  # lost again at once; the abandoned leases wait
        self._previousRevision = 0
        self.log.info(
            "registered in etcd again as node {id} (lease {lease:x}, revision {revision})",
            id=self.me.id,
            lease=self.lease,
            revision=self.memberRevision,
        )
        for old in sorted(self.abandoned):
            try:
                await self._call(self.client.revoke(old))
            except CoordinatorError as e:
                self.log.info(
                    "could not revoke our old lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                    lease=old,
                    why=str(e),
                    ttl=math.ceil(self.ttl),
                )
            self.abandoned.discard(old)

    # Keeping the lease.

    async def _maintain(self) -> None:
        # Retries come at least every TTL / 6, so that a node back in touch
        # with etcd soon after an outage registers again before its old
        # lease lapses there, and keeps its member key.
        cap = min(BACKOFF_CAP, self.ttl / 6)
        backoff = BACKOFF_START
        while self._running:
            try:
                if self.lease is None:
                    await self._rejoin()
                    # The lease was just granted; if it was lost at once,
                    # back off before trying again.
                    wait = self.interval if self.lease is not None else backoff
                    backoff = BACKOFF_START if self.lease is not None else min(backoff * 2, cap)
                else:
                    wait = await self._renew()
                    backoff = BACKOFF_START
            except CancelledError:
                continue
            except CoordinatorError as e:
                self._trouble(e)
                wait = backoff
                backoff = min(backoff * 2, cap)
            except Exception:
                self.log.failure("unexpected error keeping our etcd registration")
                wait = backoff = cap
            await self._sleep(wait, wakeable=True)

    async def _renew(self) -> float:
        """
        One keepalive; returns how long to wait before the next.
        """
        lease = self.lease
        assert lease is not None
        sent = self.reactor.seconds()
        ttl = await self._call(self.client.keepalive(lease, self.attemptTimeout))
        if self.lease != lease or not self._running:
            return 0.0
        if ttl <= 0:
            self.lose("etcd no longer knows our lease")
            return 0.0
        self._recovered()
        self._extend(sent, ttl)
        self.onRenewed()
        return max(0.0, sent + self.interval - self.reactor.seconds())

    def _extend(self, sent: float, ttl: int) -> None:
        """
        etcd renewed our lease for C{ttl} seconds after C{sent}: it lives
        until C{sent + ttl} at least, and we trust it until C{margin} before.
        """
        self._safeUntil = max(self._safeUntil, sent + min(float(ttl), self.ttl) - self.margin)
        self._cancelLapse()
        self._lapseCall = self.reactor.callLater(max(0.0, self._safeUntil - self.reactor.seconds()), self._lapsed)

    def _cancelLapse(self) -> None:
        if self._lapseCall is not None and self._lapseCall.active():
            self._lapseCall.cancel()
        self._lapseCall = None

    def _lapsed(self) -> None:
        self._lapseCall = None
        if self._running:
            self.lose(f"no keepalive answered for {self.ttl - self.margin:g}s, so our lease may lapse")

    def _trouble(self, error: CoordinatorError) -> None:
        """
        Log what went wrong with etcd, once until it answers again.
        """
        if str(error) != self._problem:
            self._problem = str(error)
            if error.code == "conflict":
                self.log.error("cannot register: {why}; trying again", why=str(error))
            else:
                self.log.warn("etcd: {why}", why=str(error))

    def _recovered(self) -> None:
        if self._problem is not None:
            self._problem = None
            self.log.info("etcd answers again")

    async def _call(self, d: Deferred) -> Any:
        self._pending.add(d)
        try:
            return await d
        finally:
            self._pending.discard(d)

    async def _sleep(self, seconds: float, wakeable: bool = False) -> None:
        d = deferLater(self.reactor, seconds, lambda: None)
        if wakeable:
            self._nap = d
        try:
            await self._call(d)
        except CancelledError:
            pass
        finally:
            if self._nap is d:
                self._nap = None


@implementer(ICoordinator)
class EtcdCoordinator:
    """
    Leadership and membership from etcd, for node C{me}.

    Three parts do the work: a L{Registration} keeps our member key under a
    lease we trust (or tells us at once when we must not), a
    L{PrefixFollower} keeps a L{PrefixView} of the prefix current, and
    L{nextStep} says what to do about the leader key.  This class wires them,
    answers the node's questions, and tells subscribers of changes.
    """

    name = "etcd"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        client: EtcdClient,
        me: MemberInfo,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        margin: Optional[float] = None,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 1:
            raise ValueError(f"the lease TTL must be at least 1 second, not {ttl!r}")
        if isinstance(me.id, bool) or not isinstance(me.id, int) or not 0 <= me.id < 10**MAX_ID_DIGITS:
            raise ValueError(f"node id {me.id!r} must be a non-negative integer of at most {MAX_ID_DIGITS} digits")
        parseMember(me.id, encodeMember(me))
        self.reactor = reactor
        self.client = client
        self.me = me
        self.ttl = float(ttl)
        # The margin covers our timers firing late and clocks running at
        # slightly different rates; renewals come three times a TTL, so one
        # lost renewal never costs the lease.
        self.margin = self.ttl / 4 if margin is None else margin
        if not 0 < self.margin < self.ttl * 2 / 3:
            raise ValueError(f"the margin must be between 0 and two thirds of the TTL, not {self.margin!r}")
        self._view = PrefixView(prefix)
        self._registration = Registration(
            reactor, client, me, self._view, self.ttl, self.margin, self._registered, self._renewed, self._lost
        )
        self._follower = PrefixFollower(reactor, client, self._view, self._viewChanged)
        self._state = "new"  # -> running -> stopping -> stopped
        self._epoch = 0
        self._resigning: Set[int] = set()  # epochs we lead but are handing over
        self._transactions: Set[Deferred] = set()
        self._subscribers: Dict[int, Callable[[], None]] = {}
        self._nextSubscriber = 0
        self._last: Optional[Tuple[Any, ...]] = None
        self._started: Optional[Deferred] = None
        self._stopped: Optional[Deferred] = None

    # What the node asks.

    def _trusted(self) -> bool:
        return self._state == "running" and self._registration.trusted() and not self._view.overfull

    def isLeader(self) -> bool:
        if not self._trusted():
            return False
        claim = self._view.leaderClaim()
        return (
            claim is not None
            and claim[0] == self.me.id
            and claim[1].lease == self._registration.lease
            and claim[1].createRevision not in self._resigning
        )

    def leader(self) -> Optional[int]:
        if not self._trusted():
            return None
        claim = self._view.leaderClaim()
        if claim is None or (claim[0] == self.me.id and not self.isLeader()):
            return None
        return claim[0]

    def epoch(self) -> int:
        return self._epoch

    def members(self) -> Dict[int, MemberInfo]:
        members = self._view.members()
        members[self.me.id] = self.me
        return members

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        key = self._nextSubscriber
        self._nextSubscriber += 1
        self._subscribers[key] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    # Joining and leaving.

    def start(self) -> Deferred:
        if self._state != "new":
            raise RuntimeError("an EtcdCoordinator starts once")
        self._state = "running"
        self._started = Deferred(lambda d: self.stop())
        Deferred.fromCoroutine(self._run()).addErrback(lambda f: self.log.failure("the etcd coordinator failed", f))
        return self._started

    async def _run(self) -> None:
        assert self._started is not None
        try:
            await self._registration.join()
        except BaseException:
            failure = Failure()
            if self._state == "running":
                self._state = "stopped"
            if not self._started.called:
                if failure.check(CancelledError):
                    failure = Failure(CoordinatorError("unavailable", "stopped before joining etcd"))
                self._started.errback(failure)
            return
        self._started.callback(None)
        self._registration.maintain()

    def stop(self) -> Deferred:
        if self._state == "new":
            self._state = "stopped"
        if self._stopped is None:
            if self._state == "stopped":
                return Deferred.fromCoroutine(_nothing())
            leading = self.isLeader()
            self._state = "stopping"
            self._changed()
            if leading:
                self.log.info("stepping down: leaving etcd")
            self._follower.stop()
            for d in list(self._transactions):
                d.cancel()
            self._stopped = Deferred.fromCoroutine(self._release())
        done: Deferred = Deferred()
        self._stopped.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    async def _release(self) -> None:
        await self._registration.leave()
        self._state = "stopped"
        self._changed()

    # What the registration says.

    def _registered(self, current: RangeResult) -> None:
        self._resigning.clear()
        self._view.reset(current)
        self._viewChanged()
        self._follower.start()

    def _renewed(self) -> None:
        if self._follower.endpoint not in (None, self.client.current):
            self.log.info("moving the etcd watch to {endpoint}", endpoint=self.client.current)
            self._follower.start()
        self._reconsider()
        self._changed()

    def _lost(self, why: str, lease: int) -> None:
        claim = self._view.leaderClaim()
        leading = claim is not None and claim[0] == self.me.id and claim[1].lease == lease
        self.log.warn(
            "{what}: {why}; registering again once etcd answers",
            what="stepping down" if leading else "no longer trusting etcd",
            why=why,
        )
        self._resigning.clear()
        self._follower.stop()
        self._changed()

    # Deciding.

    def _viewChanged(self) -> None:
        view = self._view
        claim = view.leaderClaim()
        if claim is not None and claim[1].createRevision > self._epoch:
            self._epoch = claim[1].createRevision
        standing = view.entry(view.leaderKey)
        self._resigning = {r for r in self._resigning if standing is not None and standing.createRevision == r}
        registration = self._registration
        if registration.lease is not None and view.revision >= registration.memberRevision and not view.overfull:
            mine = view.entry(registration.memberKey)
            if mine is None or mine.lease != registration.lease or mine.createRevision != registration.memberRevision:
                registration.lose("our member key was removed from etcd or replaced", keepKey=False)
                return
        self._reconsider()
        self._changed()

    def _reconsider(self) -> None:
        """
        Take the next step towards the smallest live id leading, if it is
        ours to take.
        """
        lease = self._registration.lease
        if not self._trusted() or self._transactions or lease is None:
            return
        step = nextStep(self._view, self.me.id, lease, self._registration.memberRevision, self._registration.abandoned)
        if step is None:
            return
        if step.handingOver and step.epoch not in self._resigning:
            self._resigning.add(step.epoch)
            self.log.info(
                "node {smaller} is live: handing over the leadership of epoch {epoch}",
                smaller=self._view.smallest(),
                epoch=step.epoch,
            )
        elif step.what == "clear the leader key":
            standing = self._view.entry(self._view.leaderKey)
            self.log.warn(
                "clearing a leader key that names no live member: {value}",
                value=_shortKey(standing.value if standing is not None else b""),
            )
        self._transact(step)

    def _transact(self, step: Step) -> None:
        """
        Run one step's transaction; whatever it changed arrives through the
        watch.
        """
        d = self.client.txn(step.compare, step.success)
        self._transactions.add(d)

        def failed(reason: Failure) -> None:
            if reason.check(CancelledError):
                return
            if reason.check(CoordinatorError):
                self.log.info("could not {what}: {why}", what=step.what, why=reason.getErrorMessage())
            else:
                self.log.failure("could not {what}", reason, what=step.what)

        d.addCallbacks(lambda result: None, failed)
        d.addBoth(lambda _: self._transactions.discard(d))

    def _changed(self) -> None:
        """
        Tell subscribers if the leader, the epoch or the members changed.
        """
        leader, epoch, leading = self.leader(), self.epoch(), self.isLeader()
        members = tuple(sorted((m.id, m.address, m.fingerprint) for m in self.members().values()))
        snapshot = (leader, epoch, leading, members)
        if snapshot == self._last:
            return
        previous, self._last = self._last, snapshot
        if previous is None or previous[:3] != snapshot[:3]:
            if leading:
                self.log.info(
                    "node {me} leads epoch {epoch} (members {members})",
                    me=self.me.id,
                    epoch=epoch,
                    members=", ".join(str(m[0]) for m in members),
                )
            elif leader is not None:
                self.log.info("following {leader} in epoch {epoch}", leader=leader, epoch=epoch)
            elif previous is not None and previous[0] is not None:
                self.log.info("no leader")
        for callback in list(self._subscribers.values()):
            try:
                callback()
            except Exception:
                self.log.failure("a coordinator subscriber failed")


async def _nothing() -> None:
    return None
