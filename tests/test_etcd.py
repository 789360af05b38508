"""
Tests for L{p2pfiles.etcd}: the etcd coordinator and its gateway client.

Two layers.  The unit tests run the real client and coordinator against
L{tests.etcdfake.FakeEtcd}, an in-memory etcd that answers in the gateway's
own JSON, with a L{Clock}.  The integration tests run coordinators in this
process against a real etcd (one member, or a cluster of three), in real
time, and skip when etcd is not installed.
"""

import json
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from p2pfiles import etcd
from p2pfiles.coordinator import CoordinatorError, ICoordinator, MemberInfo
from p2pfiles.etcd import (
    EtcdClient,
    EtcdCoordinator,
    KeyValue,
    PrefixView,
    RangeResult,
    checkPrefix,
    compareCreated,
    encodeMember,
    nextStep,
    parseMember,
    prefixEnd,
    putOp,
    rangeOp,
)
from tests.etcdfake import ENDPOINT, FakeGateway
from tests.etcdserver import SKIP_REASON, EtcdCluster, etcdPath, startEtcd

# Generous: the machine running the tests may be loaded.
DEADLINE = 30.0

TTL = 2.0

PREFIX = "/p2pfiles/default"
LEADER_KEY = b"/p2pfiles/default/leader"


def memberKey(id: int) -> bytes:
    return f"/p2pfiles/default/members/{id}".encode()


def logged(events: List[Dict[str, Any]], level: Optional[LogLevel] = None) -> List[str]:
    return [formatEvent(e) for e in events if level is None or e.get("log_level") == level]


# The interface's value objects.


class ValueObjectTests(SynchronousTestCase):
    """
    L{MemberInfo} and L{CoordinatorError}.
    """

    def test_memberInfoEquality(self) -> None:
        """
        Two member infos are equal when id, address and fingerprint are.
        """
        self.assertEqual(MemberInfo(1, "h:1", "ab"), MemberInfo(1, "h:1", "ab"))
        self.assertNotEqual(MemberInfo(1, "h:1", "ab"), MemberInfo(1, "h:1"))
        self.assertEqual(len({MemberInfo(1, "h:1"), MemberInfo(1, "h:1")}), 1)

    def test_errorIsOneLine(self) -> None:
        """
        A coordinator error carries its refusal code and reads as one line.
        """
        error = CoordinatorError("conflict", "node id 1 is taken\nby someone")
        self.assertEqual((error.code, str(error)), ("conflict", "node id 1 is taken"))


# Parsing, with nothing running.


class ParsingTests(SynchronousTestCase):
    """
    What the coordinator accepts from etcd and from its caller.
    """

    def test_memberRoundTrip(self) -> None:
        """
        A member's value holds its address and, when it has one, its
        fingerprint, and reads back as the same member.
        """
        for member in [MemberInfo(3, "127.0.0.1:9003"), MemberInfo(0, "[::1]:9000", "sha256:AB:CD")]:
            self.assertEqual(parseMember(member.id, encodeMember(member)), member)
        self.assertEqual(encodeMember(MemberInfo(3, "h:1")), b'{"address":"h:1"}')

    def test_memberValuesRefused(self) -> None:
        """
        Values that are not a member are refused with a one-line reason:
        not JSON, not an object, a bad or oversized address, a fingerprint
        that is not printable ASCII, an oversized value.
        """
        bad = [
            b"not json",
            b"\xff\xfe",
            b"[1]",
            b'{"address": 5}',
            b'{"address": "nohost"}',
            b'{"address": "h:99999"}',
            b'{"address": "a b:1"}',
            b'{"address": "h:1\\n"}',
            json.dumps({"address": "h" * 300 + ":1"}).encode(),
            b'{"address": "h:1", "fingerprint": 7}',
            b'{"address": "h:1", "fingerprint": ""}',
            b'{"address": "h:1", "fingerprint": "a b"}',
            b'{"address": "h:1", "x": NaN}',
            json.dumps({"address": "h:1", "pad": "x" * 5000}).encode(),
        ]
        for value in bad:
            with self.assertRaises(ValueError, msg=value) as caught:
                parseMember(1, value)
            self.assertNotIn("\n", str(caught.exception))

    def test_prefix(self) -> None:
        """
        A prefix starts with a slash, does not end with one, and is short
        printable ASCII; the range end covers exactly the keys under it.
        """
        self.assertEqual(checkPrefix("/p2pfiles/x"), "/p2pfiles/x")
        for bad in ["p2pfiles", "/", "/a/", "/a b", "/\u00e9", "/" + "a" * 200]:
            self.assertRaises(ValueError, checkPrefix, bad)
        self.assertEqual(prefixEnd(b"/a/"), b"/a0")
        self.assertEqual(prefixEnd(b"a\xff"), b"b")

    def test_keyValueStrict(self) -> None:
        """
        Key-values are read as the gateway writes them (base64, int64 as
        strings, zero values left out), and anything else is refused.
        """
        kv = KeyValue.fromJSON({"key": "L2E=", "create_revision": "2", "mod_revision": "3", "version": "1", "lease": "7"})
        self.assertEqual((kv.key, kv.value, kv.createRevision, kv.modRevision, kv.lease), (b"/a", b"", 2, 3, 7))
        for bad in [
            {"key": "not base64!"},
            {"key": "L2E=", "create_revision": True},
            {"key": "L2E=", "create_revision": "2x"},
            {"key": "L2E=", "lease": 1.5},
            "kv",
        ]:
            self.assertRaises(etcd._Malformed, KeyValue.fromJSON, bad)


class PrefixViewTests(SynchronousTestCase):
    """
    L{PrefixView}: the keys under the prefix, checked where they enter.
    """

    def kv(self, key: bytes, value: bytes, revision: int, lease: int = 0) -> KeyValue:
        return KeyValue(key, value, revision, revision, 1, lease)

    def test_membersAndLeader(self) -> None:
        """
        Members are the valid keys under members/; the leader is the id in
        the leader key when that member's key has the same lease.
        """
        view = PrefixView(PREFIX)
        view.reset(
            RangeResult(
                [
                    self.kv(memberKey(2), b'{"address":"h:2"}', 2, lease=20),
                    self.kv(memberKey(5), b'{"address":"h:5"}', 3, lease=50),
                    self.kv(LEADER_KEY, b"2", 4, lease=20),
                ],
                4,
                False,
            )
        )
        self.assertEqual(view.members(), {2: MemberInfo(2, "h:2"), 5: MemberInfo(5, "h:5")})
        self.assertEqual((view.smallest(), view.revision), (2, 4))
        self.assertEqual(view.leaderClaim()[0], 2)
        # A leader key under another lease than its member's claims nothing.
        view.apply([etcd.Event(False, self.kv(LEADER_KEY, b"2", 6, lease=50))])
        self.assertIsNone(view.leaderClaim())
        self.assertEqual(view.revision, 6)
        view.apply([etcd.Event(True, KeyValue(memberKey(2), modRevision=7))])
        self.assertEqual((sorted(view.members()), view.revision), ([5], 7))

    def test_hostileKeysIgnored(self) -> None:
        """
        A member key whose id is not canonical decimal, or whose value is
        not a member, is ignored with one log line each; so is a leader key
        that holds no id.  The good members stand.
        """
        view = PrefixView(PREFIX)
        hostile = [
            (b"/p2pfiles/default/members/01", b'{"address":"h:1"}'),
            (b"/p2pfiles/default/members/-1", b'{"address":"h:1"}'),
            (b"/p2pfiles/default/members/x", b'{"address":"h:1"}'),
            (b"/p2pfiles/default/members/1234567890123456789", b'{"address":"h:1"}'),
            (b"/p2pfiles/default/members/\xff", b'{"address":"h:1"}'),
            (memberKey(0), b"{}"),
            (memberKey(4), b"x" * 10000),
            (LEADER_KEY, b"one"),
        ]
        kvs = [self.kv(key, value, i + 2, lease=9) for i, (key, value) in enumerate(hostile)]
        kvs.append(self.kv(memberKey(3), b'{"address":"h:3"}', 20, lease=30))
        with capturedLogs() as events:
            view.reset(RangeResult(kvs, 20, False))
        self.assertEqual(view.members(), {3: MemberInfo(3, "h:3")})
        self.assertIsNone(view.leaderClaim())
        self.assertEqual(len(logged(events, LogLevel.warn)), len(hostile))

    def test_overfull(self) -> None:
        """
        More keys than the view may hold (by a range that says there are
        more, or by puts) make it overfull, with one log line; a fresh read
        with fewer keys makes it whole again.
        """
        view = PrefixView(PREFIX, maxKeys=2)
        members = [self.kv(memberKey(i), b'{"address":"h:1"}', i + 1, lease=1) for i in range(3)]
        with capturedLogs() as events:
            view.reset(RangeResult(members[:2], 3, True))
            self.assertTrue(view.overfull)
            view.reset(RangeResult(members[:2], 3, False))
            self.assertFalse(view.overfull)
            view.apply([etcd.Event(False, members[2])])
        self.assertTrue(view.overfull)
        self.assertEqual(sorted(view.members()), [0, 1])
        self.assertEqual(len(logged(events, LogLevel.error)), 2)


class NextStepTests(SynchronousTestCase):
    """
    L{nextStep}: what a node does about the leader key, as the view stands.
    """

    def view(self, leader: Optional[KeyValue] = None, **members: int) -> PrefixView:
        """
        A view with members C{n<id>=lease} and the given leader key.
        """
        view = PrefixView(PREFIX)
        kvs = [KeyValue(memberKey(int(name[1:])), b'{"address":"h:1"}', 2, 2, 1, lease) for name, lease in members.items()]
        view.reset(RangeResult(kvs + ([leader] if leader else []), 10, False))
        return view

    def test_claimWhenFreeAndSmallest(self) -> None:
        """
        With no leader key, the smallest live id claims it under its lease,
        on condition that the key is still absent and its registration
        stands; any other id does nothing.
        """
        view = self.view(n1=11, n2=22)
        step = nextStep(view, 1, 11, 2)
        self.assertEqual(step.what, "claim the leadership")
        self.assertEqual(step.compare, [compareCreated(LEADER_KEY, 0), compareCreated(memberKey(1), 2)])
        self.assertEqual(step.success, [putOp(LEADER_KEY, b"1", 11)])
        self.assertIsNone(nextStep(view, 2, 22, 2))

    def test_handOverToSmaller(self) -> None:
        """
        A leader that sees a smaller live id deletes its leader key, if it
        is still that leadership's; while none is live, it does nothing.
        """
        leaderKey = KeyValue(LEADER_KEY, b"2", 7, 7, 1, 22)
        step = nextStep(self.view(leaderKey, n1=11, n2=22), 2, 22, 2)
        self.assertEqual((step.what, step.handingOver, step.epoch), ("hand over the leadership", True, 7))
        self.assertEqual(step.compare, [compareCreated(LEADER_KEY, 7)])
        self.assertIsNone(nextStep(self.view(leaderKey, n2=22, n3=33), 2, 22, 2))
        # A smaller id waits for the leader to hand over.
        self.assertIsNone(nextStep(self.view(leaderKey, n1=11, n2=22), 1, 11, 2))

    def test_clearStrayKey(self) -> None:
        """
        A leader key naming no live member under that member's lease is
        cleared by the smallest id, if unchanged; not when it is the node's
        own key under the lease it gave up (revoking that lease clears it).
        """
        stray = KeyValue(LEADER_KEY, b"9", 5, 6, 1, 0)
        step = nextStep(self.view(stray, n1=11, n2=22), 1, 11, 2)
        self.assertEqual(step.what, "clear the leader key")
        self.assertEqual(step.compare, [etcd.compareModified(LEADER_KEY, 6)])
        self.assertIsNone(nextStep(self.view(stray, n1=11, n2=22), 2, 22, 2))
        old = KeyValue(LEADER_KEY, b"1", 5, 5, 1, 10)
        self.assertIsNone(nextStep(self.view(old, n1=11, n2=22), 1, 11, 2, abandoned={10}))


# The client against the fake gateway.


class CannedGateway(Resource):
    """
    Answers each path with a canned status and body.
    """

    isLeaf = True

    def __init__(self, answers: Dict[str, Any]) -> None:
        super().__init__()
        self.answers = answers
        self.streams: List[Any] = []

    def render_POST(self, request: Any) -> Any:
        answer = self.answers[request.path.decode()]
        if answer is None:
            self.streams.append(request)
            return NOT_DONE_YET
        code, body = answer
        request.setResponseCode(code)
        return body


class ClientTests(SynchronousTestCase):
    """
    L{EtcdClient} against the fake gateway.
    """

    def setUp(self) -> None:
        self.gateway = FakeGateway()
        self.etcd = self.gateway.etcd

    def result(self, d: Deferred) -> Any:
        self.gateway.settle()
        return self.successResultOf(d)

    def failure(self, d: Deferred) -> CoordinatorError:
        self.gateway.settle()
        return self.failureResultOf(d, CoordinatorError).value

    def canned(self, answers: Dict[str, Any]) -> Any:
        gateway = CannedGateway(answers)
        stub = StubTreq(gateway)
        return gateway, stub, EtcdClient(self.gateway.clock, [ENDPOINT], treqClient=stub)

    def test_leases(self) -> None:
        """
        A granted lease is kept alive, then revoked; a lease etcd does not
        know is kept alive for 0 seconds, and revoking it says so.
        """
        client = self.gateway.client()
        lease, ttl = self.result(client.grant(3))
        self.assertEqual(ttl, 3)
        self.assertEqual(self.result(client.keepalive(lease)), 3)
        self.assertIs(self.result(client.revoke(lease)), True)
        self.assertEqual(self.result(client.keepalive(lease)), 0)
        self.assertIs(self.result(client.revoke(lease)), False)

    def test_txnAndRange(self) -> None:
        """
        A put-if-absent transaction succeeds once, then fails and ranges;
        a range over a prefix returns the keys with their revisions and
        lease, and says when a limit left some out.
        """
        client = self.gateway.client()
        lease, _ = self.result(client.grant(2))
        putIfAbsent = lambda key, value: client.txn([compareCreated(key, 0)], [putOp(key, value, lease)], [rangeOp(key)])
        first = self.result(putIfAbsent(b"/p/a", b"1"))
        self.assertEqual((first.succeeded, first.revision, first.ranges), (True, 2, []))
        second = self.result(putIfAbsent(b"/p/a", b"2"))
        self.assertFalse(second.succeeded)
        self.assertEqual([(kv.value, kv.createRevision, kv.lease) for kv in second.ranges[0].kvs], [(b"1", 2, lease)])
        self.etcd.put(b"/p/b", b"")
        result = self.result(client.range(b"/p/", prefixEnd(b"/p/")))
        self.assertEqual([(kv.key, kv.value, kv.modRevision) for kv in result.kvs], [(b"/p/a", b"1", 2), (b"/p/b", b"", 3)])
        self.assertEqual((result.revision, result.more), (3, False))
        self.assertTrue(self.result(client.range(b"/p/", prefixEnd(b"/p/"), limit=1)).more)

    def test_failover(self) -> None:
        """
        An endpoint that answers "no leader" or does not answer in time is
        passed over for the next one, which later requests go to first.
        """
        endpoints = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
        client = self.gateway.client(endpoints, timeout=1.0)
        self.etcd.down.add("127.0.0.1:1")
        self.etcd.hung.add("127.0.0.1:2")
        d = client.grant(2)
        self.gateway.advance(1.5)
        self.assertEqual(self.successResultOf(d)[1], 2)
        self.assertEqual(client.current, "127.0.0.1:3")
        self.assertEqual([e for e, _, _ in self.etcd.requests], list(endpoints))

    def test_streamErrorFailsOver(self) -> None:
        """
        A keepalive refused the way etcd refuses streams without a raft
        leader (HTTP 503, the error wrapped) is passed to the next endpoint.
        """
        client = self.gateway.client(("127.0.0.1:1", "127.0.0.1:2"))
        lease, _ = self.result(client.grant(2))
        self.etcd.down.add(client.current)
        self.assertEqual(self.result(client.keepalive(lease)), 2)
        self.assertEqual([path for _, path, _ in self.etcd.requests], ["/v3/lease/grant", "/v3/lease/keepalive", "/v3/lease/keepalive"])

    def test_nobodyAnswers(self) -> None:
        """
        When no endpoint answers, the call fails "unavailable" in one line
        naming each endpoint and what went wrong there.
        """
        client = self.gateway.client(("127.0.0.1:1", "127.0.0.1:2"), timeout=1.0)
        self.etcd.down.add("127.0.0.1:1")
        self.etcd.hung.add("127.0.0.1:2")
        d = client.range(b"/p")
        self.gateway.advance(1.5)
        error = self.failureResultOf(d, CoordinatorError).value
        self.assertEqual(error.code, "unavailable")
        self.assertEqual(
            str(error),
            "no etcd endpoint answered /v3/kv/range (127.0.0.1:1: etcdserver: no leader; "
            "127.0.0.1:2: no answer within 1s)",
        )

    def test_badAnswers(self) -> None:
        """
        An answer that is not the gateway's JSON fails "protocol"; an error
        etcd answers that is not about availability fails "internal"; an
        answer over the size limit fails "protocol" and is not read further.
        """
        self.patch(etcd, "MAX_BODY", 100)
        gateway, stub, client = self.canned(
            {
                "/v3/kv/range": (200, b'{"header": {"revision": "x"}}'),
                "/v3/lease/grant": (400, b'{"error": "bad", "message": "etcdserver: bad TTL", "code": 3}'),
                "/v3/lease/keepalive": (200, b'{"result": {"TTL": "' + b"1" * 200 + b'"}}'),
                "/v3/lease/revoke": (200, b"[]"),
            }
        )
        cases = [
            (client.range(b"/p"), "protocol", "etcd at 127.0.0.1:2379 sent a malformed answer to /v3/kv/range: revision is not an integer"),
            (client.grant(2), "internal", "etcd at 127.0.0.1:2379 refused /v3/lease/grant: etcdserver: bad TTL"),
            (client.keepalive(1), "protocol", "etcd sent an answer over 100 bytes (to /v3/lease/keepalive at 127.0.0.1:2379)"),
            (client.revoke(1), "protocol", "etcd at 127.0.0.1:2379 sent a malformed answer to /v3/lease/revoke: not a JSON object"),
        ]
        for _ in range(30):
            stub.flush()
        for d, code, message in cases:
            error = self.failureResultOf(d, CoordinatorError).value
            self.assertEqual((error.code, str(error)), (code, message))

    def test_watch(self) -> None:
        """
        A watch delivers the events from its start revision on, each
        revision's events in one batch however etcd fragments them, and
        ends cleanly when cancelled.
        """
        client = self.gateway.client()
        self.etcd.put(b"/p/a", b"1")
        self.etcd.fragmentEvents = 1
        batches: List[List[Any]] = []
        watch = client.watch(b"/p/", prefixEnd(b"/p/"), 2, batches.append)
        self.gateway.settle()
        self.etcd.put(b"/q", b"elsewhere")
        self.etcd._commit([("put", b"/p/b", b"2", 0), ("delete", b"/p/a", b"", 0)])
        self.gateway.settle()
        seen = [[(e.deleted, e.kv.key, e.kv.value, e.kv.modRevision) for e in batch] for batch in batches]
        self.assertEqual(seen, [[(False, b"/p/a", b"1", 2)], [(False, b"/p/b", b"2", 4), (True, b"/p/a", b"", 4)]])
        self.assertEqual((watch.endpoint, watch.received), (ENDPOINT, 3))  # with "created"
        watch.cancel()
        self.gateway.settle()
        self.failureResultOf(watch.done)
        self.assertEqual(self.etcd.watchers, [])

    def test_watchCompacted(self) -> None:
        """
        A watch from a revision etcd has compacted away ends saying so.
        """
        client = self.gateway.client()
        self.etcd.put(b"/p/a", b"1")
        self.etcd.put(b"/p/a", b"2")
        self.etcd.compact(3)
        watch = client.watch(b"/p/", prefixEnd(b"/p/"), 2, lambda events: None)
        end = self.result(watch.done)
        self.assertEqual(end.compactRevision, 3)

    def test_watchLineTooLong(self) -> None:
        """
        A watch message over the line limit fails the watch "protocol" and
        closes its connection, without reading the rest.
        """
        self.patch(etcd, "MAX_WATCH_LINE", 50)
        gateway, stub, client = self.canned({"/v3/watch": None})
        watch = client.watch(b"/p/", b"/p0", 1, lambda events: None)
        stub.flush()
        [request] = gateway.streams
        lost = request.notifyFinish()
        request.write(b'{"result": {"created": true}}\n' + b"x" * 60)
        stub.flush()
        error = self.failureResultOf(watch.done, CoordinatorError).value
        self.assertEqual((error.code, str(error)), ("protocol", "etcd sent a message over 50 bytes (watch at 127.0.0.1:2379)"))
        stub.flush()
        self.failureResultOf(lost)

    def test_closeCancelsEverything(self) -> None:
        """
        close() cancels calls and watches under way and fires once their
        connections are gone.
        """
        client = self.gateway.client()
        watch = client.watch(b"/p/", b"/p0", 1, lambda events: None)
        self.gateway.settle()
        self.etcd.hung.add(ENDPOINT)
        call = client.range(b"/p")
        self.gateway.settle()
        closed = client.close()
        self.gateway.settle()
        self.successResultOf(closed)
        self.failureResultOf(watch.done)
        self.failureResultOf(call)
        self.assertEqual(self.etcd.watchers, [])


# The coordinator against the fake gateway.


def endpointOf(id: int) -> str:
    """
    Each coordinator reaches the fake etcd at its own address, so that its
    requests can be told apart (and cut off).
    """
    return f"127.0.0.{id % 250 + 1}:2379"


class CoordinatorTests(SynchronousTestCase):
    """
    L{EtcdCoordinator} against the fake gateway, with a clock.
    """

    def setUp(self) -> None:
        self.gateway = FakeGateway()
        self.etcd = self.gateway.etcd
        self.clock = self.gateway.clock

    def coordinator(self, id: int, address: Optional[str] = None, endpoints: Optional[List[str]] = None) -> EtcdCoordinator:
        client = self.gateway.client(tuple(endpoints or [endpointOf(id)]))
        coordinator = EtcdCoordinator(self.clock, client, MemberInfo(id, address or f"127.0.0.1:{9000 + id}"), ttl=TTL)
        self.addCleanup(self.settleStop, coordinator)
        return coordinator

    def settleStop(self, coordinator: EtcdCoordinator) -> None:
        self.etcd.paused = False
        self.etcd.hung.clear()
        coordinator.stop()
        self.gateway.advance(1.0)

    def startAll(self, *ids: int) -> Dict[int, EtcdCoordinator]:
        coordinators = {id: self.coordinator(id) for id in ids}
        started = [c.start() for c in coordinators.values()]
        self.gateway.settle()
        for d in started:
            self.successResultOf(d)
        return coordinators

    def requestsOf(self, id: int, since: int = 0) -> List[str]:
        return [path for endpoint, path, _ in self.etcd.requests[since:] if endpoint == endpointOf(id)]

    def views(self, coordinators: Iterable[EtcdCoordinator]) -> List[Any]:
        return [(c.me.id, c.leader(), c.epoch(), c.isLeader()) for c in coordinators]

    def leaseOf(self, id: int) -> int:
        return self.etcd.key(memberKey(id))["lease"]

    def test_provides(self) -> None:
        """
        The coordinator provides L{ICoordinator} and is named "etcd".
        """
        coordinator = self.coordinator(1)
        self.assertTrue(verifyObject(ICoordinator, coordinator))
        self.assertEqual(coordinator.name, "etcd")

    def test_startRegisters(self) -> None:
        """
        start() puts the member key, under a lease of the TTL, with the
        node's address and fingerprint, and fires once it is there; alone,
        the node then leads in the epoch of the leader key's creation.
        """
        coordinator = EtcdCoordinator(self.clock, self.gateway.client(), MemberInfo(4, "127.0.0.1:9004", "AB:CD"), ttl=TTL)
        self.addCleanup(self.settleStop, coordinator)
        started = coordinator.start()
        self.gateway.settle()
        self.successResultOf(started)
        key = self.etcd.key(memberKey(4))
        self.assertEqual(json.loads(key["value"]), {"address": "127.0.0.1:9004", "fingerprint": "AB:CD"})
        self.assertEqual(self.etcd.leases[key["lease"]]["ttl"], 2)
        self.assertEqual(coordinator.members(), {4: MemberInfo(4, "127.0.0.1:9004", "AB:CD")})
        self.assertEqual((coordinator.leader(), coordinator.isLeader()), (4, True))
        self.assertEqual(coordinator.epoch(), self.etcd.key(LEADER_KEY)["create"])
        self.assertEqual(self.etcd.key(LEADER_KEY)["value"], b"4")

    def test_smallestLeads(self) -> None:
        """
        Whatever the order they start in, the smallest id leads and every
        node agrees on it and its epoch; a node that led before the
        smallest arrived hands over to it.
        """
        coordinators = self.startAll(3, 1, 2)
        epoch = self.etcd.key(LEADER_KEY)["create"]
        self.assertEqual(self.views(coordinators.values()), [(3, 1, epoch, False), (1, 1, epoch, True), (2, 1, epoch, False)])
        self.assertEqual(sorted(coordinators[3].members()), [1, 2, 3])

    def test_epochOnlyGoesUp(self) -> None:
        """
        Every new leadership has a higher epoch than the last, even when
        the next leader registered long before the last one did.
        """
        coordinators = self.startAll(2, 3)
        epochs = []
        coordinators[3].subscribe(lambda: epochs.append((coordinators[3].leader(), coordinators[3].epoch())))
        one = self.coordinator(1)
        one.start()
        self.gateway.settle()
        one.stop()
        self.gateway.settle()
        leaderships = []
        for leader, epoch in epochs:
            if leader is not None and (leader, epoch) not in leaderships:
                leaderships.append((leader, epoch))
        self.assertEqual([leader for leader, _ in leaderships], [2, 1, 2])
        self.assertLess(leaderships[0][1], leaderships[1][1])
        self.assertLess(leaderships[1][1], leaderships[2][1])
        self.assertEqual([e for _, e in epochs], sorted(e for _, e in epochs))

    def test_duplicateRefused(self) -> None:
        """
        A node whose id is registered from another address fails to start
        with a one-line conflict naming that address, and revokes the lease
        it took; the holder is undisturbed.
        """
        first = self.startAll(1)[1]
        duplicate = self.coordinator(1, "127.0.0.1:7777", endpoints=[endpointOf(7)])
        started = duplicate.start()
        self.gateway.settle()
        error = self.failureResultOf(started, CoordinatorError).value
        self.assertEqual((error.code, str(error)), ("conflict", "node id 1 is already registered in etcd by 127.0.0.1:9001"))
        self.assertEqual(list(self.etcd.leases), [self.leaseOf(1)])
        self.assertTrue(first.isLeader())
        self.assertEqual((duplicate.leader(), duplicate.isLeader()), (None, False))

    def test_ownAddressWaitsForLapse(self) -> None:
        """
        An id registered at this node's own address (its previous run, not
        yet lapsed) makes start() wait for that lease to lapse, then
        register; if it never lapses, start() fails with the conflict.
        """
        lease, _ = self.successResultOf(self.gateway.client().grant(2))
        self.etcd.put(memberKey(1), encodeMember(MemberInfo(1, "127.0.0.1:9001")), lease)
        coordinator = self.coordinator(1)
        started = coordinator.start()
        self.gateway.advance(1.5)
        self.assertNoResult(started)
        self.gateway.advance(1.0)
        self.successResultOf(started)
        self.assertTrue(coordinator.isLeader())
        # A previous run that is in fact alive: given up after TTL + 1 s.
        client = self.gateway.client()
        lease, _ = self.successResultOf(client.grant(2))
        self.etcd.put(memberKey(5), encodeMember(MemberInfo(5, "127.0.0.1:9005")), lease)
        other = self.coordinator(5)
        started = other.start()
        for _ in range(10):
            client.keepalive(lease)
            self.gateway.advance(0.5)
        self.assertEqual(self.failureResultOf(started, CoordinatorError).value.code, "conflict")

    def test_stopStepsDownFirst(self) -> None:
        """
        stop() tells subscribers at once that this node no longer leads,
        before it asks etcd anything; then it revokes its lease, so the next
        smallest id leads without waiting for the TTL.
        """
        coordinators = self.startAll(1, 2)
        seen = []
        coordinators[1].subscribe(
            lambda: seen.append((coordinators[1].leader(), coordinators[1].isLeader(), self.requestsOf(1, before)))
        )
        before = len(self.etcd.requests)
        stopped = coordinators[1].stop()
        self.assertEqual(seen, [(None, False, [])])
        self.gateway.settle()
        self.successResultOf(stopped)
        self.assertEqual(self.requestsOf(1, before), ["/v3/lease/revoke"])
        self.assertEqual(self.views([coordinators[2]]), [(2, 2, self.etcd.key(LEADER_KEY)["create"], True)])
        self.assertNotIn(memberKey(1), self.etcd.store)

    def test_stopNeverRegistersAgain(self) -> None:
        """
        A node stopped while it was out of touch with etcd (and so about to
        register again) never registers again, even once etcd answers.
        """
        coordinator = self.startAll(1)[1]
        self.etcd.hung.add(endpointOf(1))
        self.gateway.advance(2.0)
        self.assertIsNone(coordinator.leader())
        stopped = coordinator.stop()
        self.etcd.hung.clear()
        before = len(self.etcd.requests)
        self.gateway.advance(10.0)
        self.successResultOf(stopped)
        self.assertNotIn("/v3/lease/grant", self.requestsOf(1, before))
        self.assertNotIn("/v3/kv/txn", self.requestsOf(1, before))
        self.assertEqual(self.etcd.store, {})

    def test_stopWhileStarting(self) -> None:
        """
        stop() while start() waits for etcd: start fails "unavailable", and
        nothing of this node is left in etcd once it answers.
        """
        self.etcd.pause()
        coordinator = self.coordinator(1)
        started = coordinator.start()
        self.gateway.settle()
        stopped = coordinator.stop()
        self.assertEqual(self.failureResultOf(started, CoordinatorError).value.code, "unavailable")
        self.etcd.resume()
        self.gateway.advance(3.0)
        self.successResultOf(stopped)
        self.assertEqual((self.etcd.store, self.etcd.leases), ({}, {}))

    def test_stepsDownBeforeLeaseCanLapse(self) -> None:
        """
        With etcd silent, every node stops trusting its view (no leader,
        nobody leads, subscribers told) within TTL - margin of its last
        answered keepalive: after one keepalive is missed, and before
        etcd could drop the lease.
        """
        coordinators = self.startAll(1, 2)
        self.gateway.advance(2.0)
        told = []
        coordinators[1].subscribe(lambda: told.append(self.clock.seconds()))
        lastAnswered = self.clock.seconds()
        self.etcd.pause()
        while coordinators[1].isLeader():
            self.gateway.advance(0.01, step=0.01)
            self.assertLess(self.clock.seconds() - lastAnswered, TTL)
        down = self.clock.seconds() - lastAnswered
        self.assertGreater(down, TTL / 3)
        self.assertLessEqual(down, TTL - coordinators[1].margin + 0.02)
        self.assertEqual(told, [self.clock.seconds()])
        self.gateway.advance(0.2)
        self.assertEqual(self.views(coordinators.values()), [(1, None, 3, False), (2, None, 3, False)])

    def test_suspendedNodeDistrustsAtOnce(self) -> None:
        """
        A node whose process was suspended past its safe time does not
        claim to lead even before its timers catch up.
        """
        coordinator = self.startAll(1)[1]
        self.clock.rightNow += TTL
        self.assertEqual((coordinator.leader(), coordinator.isLeader()), (None, False))

    def test_registersAgainAfterOutage(self) -> None:
        """
        When etcd answers again after an outage longer than the TTL (every
        lease gone), the nodes register afresh under new leases; the
        smallest id leads again, in a higher epoch.
        """
        coordinators = self.startAll(1, 2)
        epoch = coordinators[2].epoch()
        old = self.leaseOf(1)
        self.etcd.pause()
        self.gateway.advance(3.0)
        self.etcd.resume()
        self.gateway.advance(2.0)
        self.assertNotIn(old, self.etcd.leases)
        self.assertIn(self.leaseOf(1), self.etcd.leases)
        newEpoch = self.etcd.key(LEADER_KEY)["create"]
        self.assertEqual(self.views(coordinators.values()), [(1, 1, newEpoch, True), (2, 1, newEpoch, False)])
        self.assertGreater(newEpoch, epoch)

    def test_shortOutageKeepsMembers(self) -> None:
        """
        A node back in touch with etcd before its old lease lapsed there
        moves its member key to its new lease in one transaction: the other
        nodes never see it leave.  Its leadership still ends (its leader key
        goes with the old lease) and begins again in a higher epoch.
        """
        coordinators = self.startAll(1, 2)
        epoch = coordinators[2].epoch()
        created = self.etcd.key(memberKey(1))["create"]
        old = self.leaseOf(1)
        memberships = []
        coordinators[2].subscribe(lambda: memberships.append(sorted(coordinators[2].members())))
        self.etcd.down.add(endpointOf(1))
        while coordinators[1].isLeader():
            self.gateway.advance(0.01, step=0.01)
        self.etcd.down.clear()
        self.gateway.advance(1.0, step=0.01)
        self.assertEqual(self.etcd.key(memberKey(1))["create"], created)
        self.assertNotEqual(self.leaseOf(1), old)
        self.assertNotIn(old, self.etcd.leases)
        self.assertEqual(set(map(tuple, memberships)), {(1, 2)})
        newEpoch = self.etcd.key(LEADER_KEY)["create"]
        self.assertEqual(self.views(coordinators.values()), [(1, 1, newEpoch, True), (2, 1, newEpoch, False)])
        self.assertGreater(newEpoch, epoch)

    def test_keepaliveSaysLeaseGone(self) -> None:
        """
        A keepalive answered "no such lease" makes the node register again
        at once, under a new lease.
        """
        coordinator = self.startAll(1)[1]
        self.etcd.refusing["*"] = {"/v3/watch"}
        self.etcd.breakWatches()
        old = self.leaseOf(1)
        self.etcd.revoke(old)
        with capturedLogs() as events:
            self.gateway.advance(1.0)
        self.assertIn("stepping down: etcd no longer knows our lease; registering again once etcd answers", logged(events))
        self.assertNotEqual(self.leaseOf(1), old)
        del self.etcd.refusing["*"]
        self.gateway.advance(1.0)
        self.assertTrue(coordinator.isLeader())

    def test_memberKeyRemoved(self) -> None:
        """
        A node whose member key is deleted by someone else registers again
        (the watch shows it), revoking the lease it had.
        """
        coordinators = self.startAll(1, 2)
        old = self.leaseOf(2)
        with capturedLogs() as events:
            self.etcd.delete(memberKey(2))
            self.gateway.settle()
        self.assertIn(
            "no longer trusting etcd: our member key was removed from etcd or replaced; registering again once etcd answers",
            logged(events),
        )
        self.assertNotIn(old, self.etcd.leases)
        self.assertIn(memberKey(2), self.etcd.store)
        self.assertEqual(sorted(coordinators[1].members()), [1, 2])

    def test_idTakenWhileAway(self) -> None:
        """
        A node cut off from etcd long enough for its lease to lapse, whose
        id another node took meanwhile, logs the conflict once, stays
        without a leader, and registers when the other node leaves.
        """
        coordinators = self.startAll(1, 2)
        self.etcd.hung.add(endpointOf(1))
        self.gateway.advance(3.0)
        impostor = self.coordinator(1, "127.0.0.1:6666", endpoints=[endpointOf(66)])
        impostor.start()
        self.gateway.settle()
        with capturedLogs() as events:
            self.etcd.hung.clear()
            self.gateway.advance(5.0)
        conflicts = [line for line in logged(events, LogLevel.error) if "already registered" in line]
        self.assertEqual(conflicts, ["cannot register: node id 1 is already registered in etcd by 127.0.0.1:6666; trying again"])
        self.assertEqual((coordinators[1].leader(), coordinators[1].isLeader()), (None, False))
        impostor.stop()
        self.gateway.advance(2.0)
        self.assertTrue(coordinators[1].isLeader())
        self.assertEqual(coordinators[2].members()[1].address, "127.0.0.1:9001")

    def test_handOverToReturningSmallerId(self) -> None:
        """
        A leader that sees a smaller id stops leading at once, before its
        hand-over reaches etcd; the smaller id leads once it has.
        """
        coordinators = self.startAll(2, 3)
        self.etcd.refusing[endpointOf(2)] = {"/v3/kv/txn"}
        one = self.coordinator(1)
        one.start()
        self.gateway.settle()
        self.assertEqual(self.views([coordinators[2], one]), [(2, None, coordinators[2].epoch(), False), (1, 2, one.epoch(), False)])
        del self.etcd.refusing[endpointOf(2)]
        self.gateway.advance(1.0)
        epoch = self.etcd.key(LEADER_KEY)["create"]
        self.assertEqual(self.views([one, coordinators[2], coordinators[3]]), [(1, 1, epoch, True), (2, 1, epoch, False), (3, 1, epoch, False)])

    def test_hungLeaderKeepsKeyUntilLapse(self) -> None:
        """
        A leader that can no longer reach etcd keeps the leader key until its
        lease lapses: the smaller id that arrives meanwhile waits, and at no
        moment do two nodes say they lead.
        """
        coordinators = self.startAll(2)
        self.etcd.hung.add(endpointOf(2))
        one = self.coordinator(1)
        one.start()
        everyone = [one, coordinators[2]]
        for _ in range(300):
            self.gateway.advance(0.01, step=0.01)
            self.assertLessEqual(sum(c.isLeader() for c in everyone), 1)
        self.assertTrue(one.isLeader())

    def test_strayLeaderKeyCleared(self) -> None:
        """
        A leader key that names no live member (no lease, or not its
        member's) makes nobody leader; the smallest id clears it and leads.
        """
        self.etcd.put(LEADER_KEY, b"7")
        coordinators = self.startAll(1, 2)
        self.gateway.settle()
        epoch = self.etcd.key(LEADER_KEY)["create"]
        self.assertEqual(self.etcd.key(LEADER_KEY)["value"], b"1")
        self.assertEqual(self.views(coordinators.values()), [(1, 1, epoch, True), (2, 1, epoch, False)])

    def test_hostileMembersIgnored(self) -> None:
        """
        Member keys with bad ids or values are not members and cannot lead;
        the good members are unaffected.
        """
        self.etcd.put(b"/p2pfiles/default/members/0", b"{}")
        self.etcd.put(b"/p2pfiles/default/members/00", b'{"address": "h:1"}')
        coordinators = self.startAll(2, 3)
        self.assertEqual(sorted(coordinators[3].members()), [2, 3])
        self.assertEqual(coordinators[3].leader(), 2)

    def test_watchResumesAfterDisconnect(self) -> None:
        """
        A broken watch resumes from the revision after the last one seen,
        and what happened meanwhile is seen.
        """
        coordinators = self.startAll(1)
        seen = self.etcd.revision
        self.etcd.breakWatches()
        self.etcd.refusing["*"] = {"/v3/watch"}
        self.gateway.advance(0.5)
        late = self.startAll(2)
        before = len(self.etcd.requests)
        del self.etcd.refusing["*"]
        self.gateway.advance(2.0)
        starts = [int(body["create_request"]["start_revision"]) for e, path, body in self.etcd.requests[before:] if path == "/v3/watch" and e == endpointOf(1)]
        self.assertEqual(starts, [seen + 1])
        self.assertEqual(sorted(coordinators[1].members()), [1, 2])
        self.assertEqual(late[2].leader(), 1)

    def test_compactionReadsAfresh(self) -> None:
        """
        When etcd has compacted the history a resumed watch needs, the node
        reads the prefix afresh and sees the present.
        """
        coordinators = self.startAll(1)
        self.etcd.breakWatches()
        self.etcd.refusing["*"] = {"/v3/watch"}
        self.gateway.advance(0.5)
        self.startAll(2)
        self.etcd.compact(self.etcd.revision)
        del self.etcd.refusing["*"]
        with capturedLogs() as events:
            self.gateway.advance(2.0)
        self.assertTrue(any("reading /p2pfiles/default afresh" in line for line in logged(events)))
        self.assertEqual(sorted(coordinators[1].members()), [1, 2])

    def test_overfullMeansNoLeader(self) -> None:
        """
        More keys under the prefix than a node may hold: it trusts none of
        them (no leader) until there are fewer again.
        """
        self.patch(etcd, "MAX_KEYS", 4)
        coordinators = self.startAll(1, 2)
        for i in range(3):
            self.etcd.put(f"/p2pfiles/default/junk{i}".encode(), b"x")
        self.gateway.advance(0.5)
        self.assertEqual((coordinators[1].leader(), coordinators[1].isLeader()), (None, False))
        for i in range(3):
            self.etcd.delete(f"/p2pfiles/default/junk{i}".encode())
        self.gateway.advance(3.0)
        self.assertEqual((coordinators[2].leader(), coordinators[1].isLeader()), (1, True))

    def test_failoverKeepsLeadership(self) -> None:
        """
        When the endpoint a node uses stops answering, its keepalives go to
        the next in time to keep its lease trusted, and its watch moves
        there too: the node never stops leading.
        """
        endpoints = ["127.0.0.1:1", "127.0.0.1:2"]
        coordinator = self.coordinator(1, endpoints=endpoints)
        coordinator.start()
        self.gateway.settle()
        self.etcd.hung.add("127.0.0.1:1")
        before = len(self.etcd.requests)
        for _ in range(400):
            self.gateway.advance(0.01, step=0.01)
            self.assertTrue(coordinator.isLeader())
        watches = [e for e, path, _ in self.etcd.requests[before:] if path == "/v3/watch"]
        self.assertEqual(watches, ["127.0.0.1:2"])
        self.etcd.put(b"/p2pfiles/default/members/9", b'{"address": "h:9"}')
        self.gateway.settle()
        self.assertIn(9, coordinator.members())

    def test_subscribers(self) -> None:
        """
        Subscribers are called after each change; one that raises is logged
        and does not stop the others; an unsubscribed one is not called.
        """
        coordinator = self.coordinator(1)
        calls: List[str] = []

        def broken() -> None:
            calls.append("broken")
            raise RuntimeError("subscriber bug")

        unsubscribeBroken = coordinator.subscribe(broken)
        coordinator.subscribe(lambda: calls.append("good"))
        coordinator.subscribe(lambda: calls.append("gone"))()
        coordinator.start()
        self.gateway.settle()
        unsubscribeBroken()
        self.assertEqual(calls[:2], ["broken", "good"])
        self.assertNotIn("gone", calls)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), calls.count("broken"))

    def test_badConfiguration(self) -> None:
        """
        A TTL under a second, a bad prefix, a negative id or an address that
        is not HOST:PORT is refused at construction.
        """
        client = self.gateway.client()
        for kwargs in [{"ttl": 0.5}, {"ttl": float("nan")}, {"prefix": "relative"}, {"margin": 2.0}]:
            self.assertRaises(ValueError, EtcdCoordinator, self.clock, client, MemberInfo(1, "h:1"), **kwargs)
        for member in [MemberInfo(-1, "h:1"), MemberInfo(True, "h:1"), MemberInfo(1, "no port")]:
            self.assertRaises(ValueError, EtcdCoordinator, self.clock, client, member)


# Integration: a real etcd.


class CuttableTreq:
    """
    A treq client for one coordinator that can be cut off from etcd at once,
    as a SIGKILLed node is: every later request is refused, and (with
    L{crash}) whatever was under way is dropped, without a word to etcd.
    """

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.cut = False

    def post(self, url: bytes, **kwargs: Any) -> Deferred:
        if self.cut:
            return fail(ConnectionRefusedError("cut off by the test"))
        return self.http.post(url, **kwargs)

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


async def waitUntil(
    condition: Callable[[], Any],
    what: str,
    timeout: float = DEADLINE,
    invariant: Optional[Callable[[], Optional[str]]] = None,
) -> Any:
    """
    Wait on the reactor until C{condition()} is true and return it; fail
    after C{timeout} seconds saying C{what} was awaited.  C{invariant} is
    checked at every step and fails the wait with what it returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        if invariant is not None:
            broken = invariant()
            if broken:
                raise AssertionError(broken)
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, 0.01)


def atMostOneLeader(coordinators: Iterable[EtcdCoordinator]) -> Callable[[], Optional[str]]:
    """
    An invariant: no two of C{coordinators} say they lead.
    """
    coordinators = list(coordinators)

    def check() -> Optional[str]:
        leading = [c.me.id for c in coordinators if c.isLeader()]
        return f"nodes {leading} all say they lead" if len(leading) > 1 else None

    return check


def agreement(coordinators: Iterable[EtcdCoordinator], leader: int) -> Optional[int]:
    """
    The common epoch if every one of C{coordinators} follows C{leader} in one
    epoch, sees exactly them as members, and only C{leader} says it leads.
    """
    coordinators = list(coordinators)
    ids = {c.me.id for c in coordinators}
    views = {(c.leader(), c.epoch()) for c in coordinators}
    if len(views) != 1:
        return None
    seen, epoch = views.pop()
    if seen != leader or any(set(c.members()) != ids for c in coordinators):
        return None
    if [c.me.id for c in coordinators if c.isLeader()] != [leader]:
        return None
    return epoch


class RealEtcdMixin:
    """
    Coordinators in this process, each with its own client, against a real
    etcd; all stopped and closed in the test's cleanup.
    """

    if etcdPath() is None:
        skip = SKIP_REASON

    etcd: EtcdCluster

    def coordinator(
        self, id: int, address: Optional[str] = None, endpoints: Optional[List[str]] = None
    ) -> EtcdCoordinator:
        transport = CuttableTreq()
        self.addCleanup(transport.close)
        client = EtcdClient(reactor, endpoints or self.etcd.endpoints, treqClient=transport)
        self.addCleanup(client.close)
        coordinator = EtcdCoordinator(reactor, client, MemberInfo(id, address or f"127.0.0.1:{9000 + id}"), ttl=TTL)
        self.addCleanup(coordinator.stop)
        self.transports[coordinator] = transport
        return coordinator

    async def startAll(self, ids: Iterable[int], **kwargs: Any) -> Dict[int, EtcdCoordinator]:
        coordinators = {id: self.coordinator(id, **kwargs) for id in ids}
        await gatherResults([c.start() for c in coordinators.values()], consumeErrors=True)
        return coordinators

    async def crash(self, coordinator: EtcdCoordinator) -> None:
        """
        Cut C{coordinator} off from etcd as if its process had been killed:
        no revoke, no goodbye; its lease lapses in etcd.
        """
        transport = self.transports[coordinator]
        transport.cut = True
        await coordinator.client.close()
        await transport.close()

    async def agreed(
        self, coordinators: Iterable[EtcdCoordinator], leader: int, what: str, timeout: float = DEADLINE, also: Iterable[EtcdCoordinator] = ()
    ) -> int:
        """
        Wait until C{coordinators} agree that C{leader} leads; at every step,
        no two of them (nor of C{also}) may say they lead.  Returns the epoch.
        """
        coordinators = list(coordinators)
        return await waitUntil(
            lambda: agreement(coordinators, leader),
            what,
            timeout,
            atMostOneLeader(coordinators + list(also)),
        )


class RealEtcdTests(RealEtcdMixin, TestCase):
    """
    Coordinators against one real etcd member.
    """

    timeout = 120

    def setUp(self) -> None:
        self.transports: Dict[EtcdCoordinator, CuttableTreq] = {}
        self.etcd = startEtcd(self)

    async def test_threeAgreeOnSmallest(self) -> None:
        """
        Three coordinators started together agree that the smallest id leads,
        in one epoch, the create_revision of the leader key, and only it says
        it leads.
        """
        coordinators = await self.startAll([3, 1, 2])
        epoch = await self.agreed(coordinators.values(), 1, "leader 1")
        reader = EtcdClient(reactor, self.etcd.endpoints)
        self.addCleanup(reader.close)
        kv = (await reader.range(b"/p2pfiles/default/leader")).kvs[0]
        self.assertEqual((kv.value, kv.createRevision), (b"1", epoch))
        members = {i: (m.address, m.fingerprint) for i, m in coordinators[2].members().items()}
        self.assertEqual(members, {i: (f"127.0.0.1:{9000 + i}", None) for i in (1, 2, 3)})

    async def test_stopHandsOverAtOnce(self) -> None:
        """
        A leader that stops steps down before its stop returns, and revokes
        its lease: the next smallest id leads within half a second, in a
        higher epoch.
        """
        coordinators = await self.startAll([1, 2, 3])
        first = await self.agreed(coordinators.values(), 1, "leader 1")
        started = time.monotonic()
        stopping = coordinators[1].stop()
        self.assertEqual((coordinators[1].leader(), coordinators[1].isLeader()), (None, False))
        second = await self.agreed([coordinators[2], coordinators[3]], 2, "leader 2", also=[coordinators[1]])
        elapsed = time.monotonic() - started
        await stopping
        self.assertLess(elapsed, 0.5)
        self.assertGreater(second, first)

    async def test_silentLeaderReplaced(self) -> None:
        """
        A leader cut off from etcd without a word (as a SIGKILLed node is)
        is replaced by the next smallest id within the TTL and one second;
        the old leader itself stops saying it leads before anyone else
        starts, and then knows no leader.
        """
        coordinators = await self.startAll([1, 2, 3])
        first = await self.agreed(coordinators.values(), 1, "leader 1")
        started = time.monotonic()
        await self.crash(coordinators[1])
        second = await self.agreed([coordinators[2], coordinators[3]], 2, "leader 2", also=[coordinators[1]])
        self.assertLess(time.monotonic() - started, TTL + 1)
        self.assertGreater(second, first)
        self.assertEqual((coordinators[1].leader(), coordinators[1].isLeader()), (None, False))

    async def test_returningLeaderLeadsAgain(self) -> None:
        """
        A killed leader that comes back (a new run, same id and address)
        leads again, in an epoch higher than its successor's; the successor
        hands over.
        """
        coordinators = await self.startAll([1, 2, 3])
        first = await self.agreed(coordinators.values(), 1, "leader 1")
        await self.crash(coordinators[1])
        second = await self.agreed([coordinators[2], coordinators[3]], 2, "leader 2")
        back = self.coordinator(1)
        await back.start()
        live = [back, coordinators[2], coordinators[3]]
        third = await self.agreed(live, 1, "leader 1 again")
        self.assertGreater(second, first)
        self.assertGreater(third, second)

    async def test_restartWithinTTL(self) -> None:
        """
        A node restarted at once after being killed finds its id still
        registered at its own address: it waits for the old lease to lapse
        instead of refusing to start, then leads.
        """
        coordinators = await self.startAll([1, 2])
        await self.agreed(coordinators.values(), 1, "leader 1")
        await self.crash(coordinators[1])
        back = self.coordinator(1)
        await back.start()
        await self.agreed([back, coordinators[2]], 1, "leader 1 after the restart")

    async def test_duplicateIdRefused(self) -> None:
        """
        A second node with an id already registered from another address is
        refused at start with a one-line conflict naming that address, and
        leaves no lease behind; the first node keeps leading.
        """
        first = self.coordinator(1, "127.0.0.1:9001")
        await first.start()
        duplicate = self.coordinator(1, "127.0.0.1:9999")
        error = await self.assertFailure(duplicate.start(), CoordinatorError)
        self.assertEqual(error.code, "conflict")
        self.assertEqual(str(error), "node id 1 is already registered in etcd by 127.0.0.1:9001")
        await waitUntil(first.isLeader, "node 1 to lead")
        self.assertEqual(await self.leaseCount(), 1)

    async def leaseCount(self) -> int:
        reader = EtcdClient(reactor, self.etcd.endpoints)
        self.addCleanup(reader.close)
        transport = CuttableTreq()
        self.addCleanup(transport.close)
        response = await transport.post(
            f"http://{self.etcd.endpoints[0]}/v3/lease/leases".encode(), data=b"{}", unbuffered=False
        )
        body = json.loads(await response.content())
        return len(body.get("leases", []))

    async def test_pausedEtcdMeansNoLeader(self) -> None:
        """
        etcd stopped with SIGSTOP: within the TTL every coordinator reports
        no leader and none says it leads.  SIGCONT: one leader again, the
        smallest, in a higher epoch.
        """
        coordinators = await self.startAll([1, 2, 3])
        first = await self.agreed(coordinators.values(), 1, "leader 1")
        started = time.monotonic()
        self.etcd.pause()
        self.addCleanup(self.etcd.resume)
        await waitUntil(
            lambda: all(c.leader() is None and not c.isLeader() for c in coordinators.values()),
            "no leader anywhere",
        )
        self.assertLess(time.monotonic() - started, TTL)
        self.etcd.resume()
        second = await self.agreed(coordinators.values(), 1, "leader 1 after SIGCONT")
        self.assertGreater(second, first)


class RealEtcdClusterTests(RealEtcdMixin, TestCase):
    """
    Coordinators against a real etcd cluster of three members.
    """

    timeout = 180

    def setUp(self) -> None:
        self.transports: Dict[EtcdCoordinator, CuttableTreq] = {}

    async def test_memberKilledKeepsLeader(self) -> None:
        """
        Killing the etcd member every coordinator talks to first (a raft
        follower) changes nothing the nodes see: the leader keeps leading in
        the same epoch throughout, and a node started afterwards with the
        same endpoint list joins through the next member.
        """
        self.etcd = startEtcd(self, 3)
        raftLeader = await waitUntil(self.etcd.raftLeader, "a raft leader")
        victim = next(m for m in self.etcd.members if m is not raftLeader)
        endpoints = [victim.address] + [m.address for m in self.etcd.members if m is not victim]
        coordinators = await self.startAll([1, 2, 3], endpoints=endpoints)
        epoch = await self.agreed(coordinators.values(), 1, "leader 1")
        views: List[Any] = []
        coordinators[1].subscribe(lambda: views.append((coordinators[1].leader(), coordinators[1].isLeader())))
        victim.kill()
        late = self.coordinator(4, endpoints=endpoints)
        await late.start()
        live = list(coordinators.values()) + [late]
        self.assertEqual(await self.agreed(live, 1, "leader 1 with node 4"), epoch)
        # Several TTLs with the victim dead: still the same leadership.
        until = time.monotonic() + 3 * TTL
        await waitUntil(lambda: time.monotonic() > until, "time to pass", invariant=lambda: None if agreement(live, 1) == epoch else f"leadership changed: {[(c.leader(), c.epoch()) for c in live]}")
        self.assertTrue(all((leader, leading) == (1, True) for leader, leading in views), views)

    async def test_raftLeaderKilled(self) -> None:
        """
        Killing etcd's raft leader: once etcd has elected another, node 1
        leads again (or still), every node agrees, and no node ever saw a
        member leave (etcd keeps leases across its elections, and a node
        that lost trust meanwhile keeps its member key).
        """
        self.etcd = startEtcd(self, 3, fast=True)
        coordinators = await self.startAll([1, 2, 3])
        await self.agreed(coordinators.values(), 1, "leader 1")
        memberships = set()
        for c in coordinators.values():
            c.subscribe(lambda c=c: memberships.add(tuple(sorted(c.members()))))
        raftLeader = await waitUntil(self.etcd.raftLeader, "a raft leader")
        raftLeader.kill()
        await waitUntil(self.etcd.raftLeader, "a new raft leader")
        await self.agreed(coordinators.values(), 1, "leader 1 after the raft election")
        self.assertLessEqual(memberships, {(1, 2, 3)})
