"""
The formats of etcd's v3 JSON gateway as p2pfiles reads and writes them:
keys, values and revisions, requests and answers, the watch stream, and the
limits on what an answer may hold.  See L{p2pfiles.etcd}.
"""

import base64
import json
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss





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


