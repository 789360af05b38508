"""
An in-memory etcd behind its v3 JSON gateway, for unit tests of the client
and the coordinator with a L{Clock}: leases that expire on the clock,
put/range/delete in transactions with CREATE and MOD comparisons, and watch
streams.  Answers are written as etcd 3.4's gateway writes them (recorded
from a real one): snake_case names, int64 values as strings, zero values
left out, errors as C{{"error", "code", "message"}}, stream messages wrapped
in C{{"result": ...}} one a line.

Serve it to L{EtcdClient} through C{treq.testing.StubTreq}; L{FakeGateway}
does that and moves the bytes and the clock.
"""

import base64
import json
from typing import Any, Dict, List, Optional, Set, Tuple

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from p2pfiles.etcd import EtcdClient

ENDPOINT = "127.0.0.1:2379"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Optional[str]) -> bytes:
    return base64.b64decode(text or "")


class GrpcError(Exception):
    def __init__(self, http: int, code: int, message: str) -> None:
        super().__init__(message)
        self.http = http
        self.code = code
        self.message = message


LEASE_NOT_FOUND = GrpcError(404, 5, "etcdserver: requested lease not found")


class Watcher:
    def __init__(self, request: Request, start: bytes, end: Optional[bytes]) -> None:
        self.request = request
        self.start = start
        self.end = end

    def covers(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.start
        return self.start <= key and (self.end == b"\0" or key < self.end)


class FakeEtcd(Resource):
    """
    One etcd, at any number of endpoints.

    @ivar requests: every request, as C{(endpoint, path, body)}.
    @ivar down: endpoints that answer "no leader" (gRPC unavailable).
    @ivar refusing: endpoint (or C{"*"}) -> paths answered like C{down}.
    @ivar hung: endpoints that accept requests and never answer.
    @ivar paused: the whole etcd answers nothing and lets no lease expire;
        L{resume} answers what was held, as a real etcd after SIGCONT.
    """

    isLeaf = True

    def __init__(self, clock: Clock, minTTL: int = 1) -> None:
        super().__init__()
        self.clock = clock
        self.minTTL = minTTL
        self.revision = 1
        self.store: Dict[bytes, Dict[str, Any]] = {}
        self.history: List[Tuple[int, Dict[str, Any]]] = []
        self.leases: Dict[int, Dict[str, Any]] = {}
        self.nextLease = 0x7A0000000001
        self.compacted = 0
        self.watchers: List[Watcher] = []
        self.requests: List[Tuple[str, str, Dict[str, Any]]] = []
        self.down: Set[str] = set()
        self.refusing: Dict[str, Set[str]] = {}
        self.hung: Set[str] = set()
        self.paused = False
        self.held: List[Tuple[Request, str, Dict[str, Any]]] = []
        self.lapsed: Set[int] = set()
        self.fragmentEvents = 0  # > 0: split watch messages into fragments of this many events

    # Controls.

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        for lease in sorted(self.lapsed):
            self._revoke(lease)
        self.lapsed.clear()
        held, self.held = self.held, []
        for request, path, body in held:
            if not getattr(request, "_disconnected", False) and not request.finished:
                result = self._answer(request, path, body)
                if result is not NOT_DONE_YET:
                    request.write(result)
                    request.finish()

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """
        Write a key as another client would; returns the revision.
        """
        self._commit([("put", key, value, lease)])
        return self.revision

    def delete(self, key: bytes) -> int:
        self._commit([("delete", key, b"", 0)])
        return self.revision

    def revoke(self, lease: int) -> None:
        """
        Revoke C{lease} as another client (or its expiry) would.
        """
        self._revoke(lease)

    def compact(self, revision: int) -> None:
        self.compacted = revision
        self.history = [(r, e) for r, e in self.history if r > revision]

    def breakWatches(self) -> None:
        """
        Drop every watch stream's connection, as a restarting etcd does.
        """
        watchers, self.watchers = self.watchers, []
        for watcher in watchers:
            watcher.request.transport.loseConnection()

    def paths(self, since: int = 0) -> List[str]:
        return [path for _, path, _ in self.requests[since:]]

    def key(self, key: bytes) -> Optional[Dict[str, Any]]:
        return self.store.get(key)

    # HTTP.

    def render_POST(self, request: Request) -> Any:
        path = request.path.decode("ascii")
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return self._error(request, GrpcError(400, 3, "unexpected EOF"))
        endpoint = (request.getHeader("host") or ENDPOINT).strip()
        self.requests.append((endpoint, path, body))
        if self.paused or endpoint in self.hung:
            self.held.append((request, path, body))
            return NOT_DONE_YET
        refused = self.refusing.get(endpoint, set()) | self.refusing.get("*", set())
        if endpoint in self.down or path in refused:
            if path in ("/v3/lease/keepalive", "/v3/watch"):
                # Streams wrap their errors, as etcd 3.4 does.
                request.setResponseCode(503)
                request.setHeader("content-type", "application/json")
                message = {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader", "http_status": "Service Unavailable"}
                return json.dumps({"error": message}).encode("utf-8")
            return self._error(request, GrpcError(503, 14, "etcdserver: no leader"))
        return self._answer(request, path, body)

    def _answer(self, request: Request, path: str, body: Dict[str, Any]) -> Any:
        if path == "/v3/watch":
            return self._watch(request, body)
        handler = {
            "/v3/lease/grant": self._grant,
            "/v3/lease/keepalive": self._keepalive,
            "/v3/lease/revoke": self._revokeRequest,
            "/v3/kv/range": self._range,
            "/v3/kv/txn": self._txn,
        }.get(path)
        if handler is None:
            request.setResponseCode(404)
            return b"Not Found\n"
        try:
            answer = handler(body)
        except GrpcError as e:
            return self._error(request, e)
        request.setHeader("content-type", "application/json")
        return json.dumps(answer).encode("utf-8")

    def _error(self, request: Request, error: GrpcError) -> bytes:
        request.setResponseCode(error.http)
        request.setHeader("content-type", "application/json")
        return json.dumps({"error": error.message, "message": error.message, "code": error.code}).encode("utf-8")

    def _header(self) -> Dict[str, str]:
        return {"cluster_id": "14841639068965178418", "member_id": "10276657743932975437", "revision": str(self.revision), "raft_term": "2"}

    # Leases.

    def _grant(self, body: Dict[str, Any]) -> Dict[str, Any]:
        ttl = max(int(body.get("TTL", 0)), self.minTTL)
        lease = self.nextLease
        self.nextLease += 2
        self.leases[lease] = {"ttl": ttl, "keys": set(), "expiry": None}
        self._schedule(lease)
        return {"header": self._header(), "ID": str(lease), "TTL": str(ttl)}

    def _schedule(self, lease: int) -> None:
        entry = self.leases[lease]
        if entry["expiry"] is not None and entry["expiry"].active():
            entry["expiry"].cancel()
        entry["expiry"] = self.clock.callLater(entry["ttl"], self._expire, lease)

    def _expire(self, lease: int) -> None:
        if lease not in self.leases:
            return
        if self.paused:
            self.lapsed.add(lease)
        else:
            self._revoke(lease)

    def _keepalive(self, body: Dict[str, Any]) -> Dict[str, Any]:
        lease = int(body["ID"])
        result: Dict[str, Any] = {"header": self._header(), "ID": str(lease)}
        if lease in self.leases and lease not in self.lapsed:
            self._schedule(lease)
            result["TTL"] = str(self.leases[lease]["ttl"])
        return {"result": result}

    def _revokeRequest(self, body: Dict[str, Any]) -> Dict[str, Any]:
        lease = int(body["ID"])
        if lease not in self.leases:
            raise LEASE_NOT_FOUND
        self._revoke(lease)
        return {"header": self._header()}

    def _revoke(self, lease: int) -> None:
        entry = self.leases.pop(lease, None)
        if entry is None:
            return
        if entry["expiry"] is not None and entry["expiry"].active():
            entry["expiry"].cancel()
        if entry["keys"]:
            self._commit([("delete", key, b"", 0) for key in sorted(entry["keys"])])

    # Keys.

    def _kvJSON(self, key: bytes) -> Dict[str, Any]:
        entry = self.store[key]
        kv = {
            "key": b64(key),
            "create_revision": str(entry["create"]),
            "mod_revision": str(entry["mod"]),
            "version": str(entry["version"]),
        }
        if entry["value"]:
            kv["value"] = b64(entry["value"])
        if entry["lease"]:
            kv["lease"] = str(entry["lease"])
        return kv

    def _keys(self, request: Dict[str, Any]) -> List[bytes]:
        start = unb64(request.get("key"))
        end = unb64(request.get("range_end")) if request.get("range_end") else None
        if end is None:
            return [start] if start in self.store else []
        return sorted(k for k in self.store if start <= k and (end == b"\0" or k < end))

    def _rangeAnswer(self, request: Dict[str, Any]) -> Dict[str, Any]:
        keys = self._keys(request)
        limit = int(request.get("limit", 0))
        answer: Dict[str, Any] = {"header": self._header()}
        shown = keys[:limit] if limit else keys
        if shown:
            answer["kvs"] = [self._kvJSON(k) for k in shown]
        if len(shown) < len(keys):
            answer["more"] = True
        if keys:
            answer["count"] = str(len(keys))
        return answer

    def _range(self, body: Dict[str, Any]) -> Dict[str, Any]:
        return self._rangeAnswer(body)

    def _compare(self, compare: Dict[str, Any]) -> bool:
        assert compare.get("result", "EQUAL") == "EQUAL", compare
        entry = self.store.get(unb64(compare["key"]))
        target = compare["target"]
        if target == "CREATE":
            return (entry["create"] if entry else 0) == int(compare.get("create_revision", 0))
        if target == "MOD":
            return (entry["mod"] if entry else 0) == int(compare.get("mod_revision", 0))
        raise AssertionError(f"unsupported compare {compare}")

    def _txn(self, body: Dict[str, Any]) -> Dict[str, Any]:
        succeeded = all(self._compare(c) for c in body.get("compare", []))
        ops = body.get("success" if succeeded else "failure", [])
        writes = []
        for op in ops:
            if "request_put" in op:
                put = op["request_put"]
                lease = int(put.get("lease", 0))
                if lease and lease not in self.leases:
                    raise LEASE_NOT_FOUND
                writes.append(("put", unb64(put["key"]), unb64(put.get("value")), lease))
            elif "request_delete_range" in op:
                writes.extend(("delete", k, b"", 0) for k in self._keys(op["request_delete_range"]))
        responses = []
        if writes:
            self._commit(writes)
        for op in ops:
            if "request_put" in op:
                responses.append({"response_put": {"header": {"revision": str(self.revision)}}})
            elif "request_range" in op:
                answer = self._rangeAnswer(op["request_range"])
                answer["header"] = {"revision": str(self.revision)}
                responses.append({"response_range": answer})
            elif "request_delete_range" in op:
                responses.append({"response_delete_range": {"header": {"revision": str(self.revision)}}})
        answer: Dict[str, Any] = {"header": self._header(), "responses": responses}
        if succeeded:
            answer["succeeded"] = True
        return answer

    def _commit(self, writes: List[Tuple[str, bytes, bytes, int]]) -> None:
        """
        Apply C{writes} in one new revision and tell the watchers.
        """
        revision = self.revision + 1
        events = []
        for kind, key, value, lease in writes:
            entry = self.store.get(key)
            if kind == "delete":
                if entry is None:
                    continue
                del self.store[key]
                if entry["lease"] in self.leases:
                    self.leases[entry["lease"]]["keys"].discard(key)
                events.append({"type": "DELETE", "kv": {"key": b64(key), "mod_revision": str(revision)}})
                continue
            if entry is not None and entry["lease"] in self.leases:
                self.leases[entry["lease"]]["keys"].discard(key)
            self.store[key] = {
                "value": value,
                "create": entry["create"] if entry else revision,
                "mod": revision,
                "version": entry["version"] + 1 if entry else 1,
                "lease": lease,
            }
            if lease:
                self.leases[lease]["keys"].add(key)
            self.revision = revision
            events.append({"kv": self._kvJSON(key)})
        if not events:
            return
        self.revision = revision
        for event in events:
            self.history.append((revision, event))
        for watcher in list(self.watchers):
            self._send(watcher, [e for e in events if watcher.covers(unb64(e["kv"]["key"]))])

    # Watches.

    def _watch(self, request: Request, body: Dict[str, Any]) -> Any:
        create = body["create_request"]
        start = unb64(create.get("key"))
        end = unb64(create["range_end"]) if create.get("range_end") else None
        watcher = Watcher(request, start, end)
        request.setHeader("content-type", "application/json")
        self._line(request, {"result": {"header": self._header(), "created": True}})
        startRevision = int(create.get("start_revision", 0)) or self.revision + 1
        if startRevision <= self.compacted:
            self._line(
                request,
                {"result": {"header": {"cluster_id": "1", "member_id": "2", "raft_term": "2"}, "canceled": True, "compact_revision": str(self.compacted)}},
            )
            request.finish()
            return NOT_DONE_YET
        backlog = [e for r, e in self.history if r >= startRevision and watcher.covers(unb64(e["kv"]["key"]))]
        self._send(watcher, backlog)
        self.watchers.append(watcher)
        request.notifyFinish().addBoth(lambda _: self.watchers.remove(watcher) if watcher in self.watchers else None)
        return NOT_DONE_YET

    def _send(self, watcher: Watcher, events: List[Dict[str, Any]]) -> None:
        if not events:
            return
        size = self.fragmentEvents or len(events)
        chunks = [events[i : i + size] for i in range(0, len(events), size)]
        for i, chunk in enumerate(chunks):
            result: Dict[str, Any] = {"header": self._header(), "events": chunk}
            if i < len(chunks) - 1:
                result["fragment"] = True
            self._line(watcher.request, {"result": result})

    def _line(self, request: Request, message: Dict[str, Any]) -> None:
        request.write(json.dumps(message).encode("utf-8") + b"\n")


class FakeGateway:
    """
    A L{FakeEtcd} on a L{Clock}, served through StubTreq: make clients for
    it, and move bytes (L{settle}) and time (L{advance}).
    """

    def __init__(self, minTTL: int = 1) -> None:
        self.clock = Clock()
        self.etcd = FakeEtcd(self.clock, minTTL)
        self.stub = StubTreq(self.etcd)

    def client(self, endpoints: Tuple[str, ...] = (ENDPOINT,), timeout: float = 2.0) -> EtcdClient:
        return EtcdClient(self.clock, list(endpoints), treqClient=self.stub, timeout=timeout)

    def settle(self) -> None:
        """
        Deliver every byte in flight, and the requests their answers cause.
        """
        for _ in range(30):
            self.stub.flush()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """
        Let C{seconds} pass in steps, delivering bytes at each.
        """
        self.settle()
        steps = max(1, round(seconds / step))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.settle()
