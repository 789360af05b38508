"""
Tests for L{p2pfiles.events}: the bounded event log the status page shows,
and the subscriber list behind its live stream.
"""

from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.events import MAX_ITEMS, MAX_TEXT, EventLog, Subscribers, boundText, boundValue


class BoundTests(SynchronousTestCase):
    """
    Every field is bounded on its way in, since many come from peers.
    """

    def test_shortTextKept(self) -> None:
        """
        Text of up to L{MAX_TEXT} characters is kept as it is.
        """
        self.assertEqual(boundText("x" * MAX_TEXT), "x" * MAX_TEXT)

    def test_longTextCut(self) -> None:
        """
        Longer text is cut to L{MAX_TEXT} characters, ending in an ellipsis.
        """
        cut = boundText("y" * (MAX_TEXT + 1))
        self.assertEqual(len(cut), MAX_TEXT)
        self.assertEqual(cut, "y" * (MAX_TEXT - 1) + "\u2026")

    def test_bytesDecoded(self) -> None:
        """
        Bytes become text, invalid UTF-8 replaced, and are cut like text.
        """
        self.assertEqual(boundValue(b"caf\xc3\xa9 \xff"), "caf\u00e9 \ufffd")
        self.assertEqual(len(boundValue(b"z" * 10**6)), MAX_TEXT)

    def test_numbers(self) -> None:
        """
        Finite numbers pass; NaN and infinities become None; integers past
        what JavaScript holds exactly are clamped; bools stay bools.
        """
        self.assertEqual(boundValue(3), 3)
        self.assertEqual(boundValue(2.5), 2.5)
        self.assertIsNone(boundValue(float("nan")))
        self.assertIsNone(boundValue(float("inf")))
        self.assertEqual(boundValue(10**400), 2**53)
        self.assertEqual(boundValue(-(10**400)), -(2**53))
        self.assertIs(boundValue(True), True)
        self.assertIsNone(boundValue(None))

    def test_lists(self) -> None:
        """
        Lists keep at most L{MAX_ITEMS} items, each bounded; nested
        containers become bounded text.
        """
        self.assertEqual(boundValue(list(range(100))), list(range(MAX_ITEMS)))
        self.assertEqual(boundValue(("a" * 500, [1])), ["a" * (MAX_TEXT - 1) + "\u2026", "[1]"])

    def test_otherTypes(self) -> None:
        """
        Anything else becomes its string form, bounded.
        """
        self.assertEqual(boundValue({"k": 1}), "{'k': 1}")
        self.assertEqual(len(boundValue({"k": "v" * 1000})), MAX_TEXT)


class EventLogTests(SynchronousTestCase):
    """
    L{EventLog} keeps the last events with the clock's time.
    """

    def test_addStampsTimeAndKind(self) -> None:
        """
        An event carries the clock's time, its kind and its fields, and
        C{add} returns it.
        """
        clock = Clock()
        clock.advance(12.5)
        events = EventLog(clock)
        event = events.add("leader", leader=2, epoch=7)
        self.assertEqual(event, {"time": 12.5, "kind": "leader", "leader": 2, "epoch": 7})
        self.assertEqual(events.recent(), [event])

    def test_oldestFirst(self) -> None:
        """
        C{recent} lists events oldest first.
        """
        clock = Clock()
        events = EventLog(clock)
        events.add("member-up", member=2)
        clock.advance(1)
        events.add("member-down", member=2)
        self.assertEqual([e["kind"] for e in events.recent()], ["member-up", "member-down"])

    def test_keepsOnlyTheLast(self) -> None:
        """
        Past C{size} events, the oldest go: 250 added to a log of 200 keep
        the last 200 in order.
        """
        events = EventLog(Clock())
        for n in range(250):
            events.add("rejected", reason=str(n))
        kept = events.recent()
        self.assertEqual(len(kept), 200)
        self.assertEqual(kept[0]["reason"], "50")
        self.assertEqual(kept[-1]["reason"], "249")

    def test_sizeParameter(self) -> None:
        """
        The size is the log's own.
        """
        events = EventLog(Clock(), size=3)
        for n in range(5):
            events.add("x", n=n)
        self.assertEqual([e["n"] for e in events.recent()], [2, 3, 4])

    def test_hostileFieldsBounded(self) -> None:
        """
        A peer's 10,000-character reason is stored cut to L{MAX_TEXT}
        characters; an absurd kind is cut too.
        """
        events = EventLog(Clock())
        event = events.add("k" * 1000, reason="<" * 10000)
        self.assertEqual(len(event["reason"]), MAX_TEXT)
        self.assertLessEqual(len(event["kind"]), 40)

    def test_timeIsNotAField(self) -> None:
        """
        A field named C{time} is a mistake: the time is the clock's.
        """
        events = EventLog(Clock())
        self.assertRaises(TypeError, events.add, "leader", time=3)
        self.assertEqual(events.recent(), [])

    def test_subscribe(self) -> None:
        """
        A subscriber hears of every event added after it subscribed, until
        it unsubscribes.
        """
        events = EventLog(Clock())
        events.add("before")
        heard: List[Dict[str, Any]] = []
        unsubscribe = events.subscribe(heard.append)
        added = events.add("member-up", member=3)
        self.assertEqual(heard, [added])
        unsubscribe()
        events.add("member-down", member=3)
        self.assertEqual(heard, [added])


class SubscribersTests(SynchronousTestCase):
    """
    L{Subscribers} calls each subscriber in turn and survives broken ones.
    """

    def test_order(self) -> None:
        """
        Subscribers are called in the order they subscribed, with the
        arguments given to C{notify}.
        """
        subscribers = Subscribers()
        calls: List[Any] = []
        subscribers.subscribe(lambda *a: calls.append(("first", a)))
        subscribers.subscribe(lambda *a: calls.append(("second", a)))
        subscribers.notify("status", {"id": 1})
        self.assertEqual(calls, [("first", ("status", {"id": 1})), ("second", ("status", {"id": 1}))])

    def test_sameCallableTwice(self) -> None:
        """
        One callable subscribed twice is two subscriptions, ended one at a
        time; ending one twice changes nothing.
        """
        subscribers = Subscribers()
        calls: List[int] = []
        first = subscribers.subscribe(calls.append)
        subscribers.subscribe(calls.append)
        first()
        first()
        self.assertEqual(len(subscribers), 1)
        subscribers.notify(1)
        self.assertEqual(calls, [1])

    def test_brokenSubscriberLogged(self) -> None:
        """
        A subscriber that raises is logged; the others are still called.
        """
        subscribers = Subscribers()
        calls: List[int] = []

        def broken(n: int) -> None:
            raise ValueError("broken watcher")

        subscribers.subscribe(broken)
        subscribers.subscribe(calls.append)
        with capturedLogs() as logged:
            subscribers.notify(7)
        self.assertEqual(calls, [7])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(any("failed" in str(e.get("log_format")) for e in logged))

    def test_unsubscribeDuringNotify(self) -> None:
        """
        A subscriber may end another's subscription while being notified;
        the current round still reaches everyone subscribed when it began.
        """
        subscribers = Subscribers()
        calls: List[str] = []
        stops: List[Any] = []
        stops.append(subscribers.subscribe(lambda: (calls.append("a"), stops[1]())))
        stops.append(subscribers.subscribe(lambda: calls.append("b")))
        subscribers.notify()
        subscribers.notify()
        self.assertEqual(calls, ["a", "b", "a"])
