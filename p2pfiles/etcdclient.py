"""
L{EtcdClient}: the small part of etcd's v3 JSON gateway that the etcd
coordinator speaks, over Twisted's own HTTP client.  See L{p2pfiles.etcd}.
"""

import json
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from p2pfiles.address import formatAddress, parseAddress
from p2pfiles.coordinator import CoordinatorError

from p2pfiles.etcdwire import (
    EtcdWatch,
    Event,
    MAX_BODY,
    MAX_WATCH_LINE,
    REQUEST_TIMEOUT,
    TxnResult,
    WatchEnd,
    _BodyReader,
    _GRPC_NOT_FOUND,
    _HEADERS,
    _HTTP_FAILURES,
    _Malformed,
    _NOT_ANSWERED,
    _RETRYABLE_GRPC,
    _Refused,
    _TooLong,
    _Unreachable,
    _WatchEnded,
    _WatchParser,
    _b64,
    _bool,
    _decode,
    _headerRevision,
    _int,
    _object,
    _oneLine,
    _rangeResult,
    rangeOp,
)


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


