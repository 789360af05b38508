"""
What happened lately on this node, for its operators: a bounded log of
events (a leader elected, a member up or down, a transfer done or failed, a
connection refused) that the status page shows as a timeline and streams as
it grows.

Many fields come from peers (a refusal's reason, a file's name), so every
value is bounded on the way in: strings are cut to L{MAX_TEXT} characters,
lists to L{MAX_ITEMS} items, numbers to what JSON readers agree on.  The log
itself keeps the last C{size} events.

The kinds the status page knows how to describe, with their fields:

  - C{leader}: C{leader} (an id, or None), C{epoch}
  - C{member-up}, C{member-down}: C{member} (an id), optionally C{address}
  - C{transfer-done}: C{name}, C{direction}, C{peer}, C{bytes}, C{seconds}
  - C{transfer-failed}: C{name}, C{direction}, C{peer}, C{reason}
  - C{rejected}: C{reason}, optionally C{peer}

Other kinds and fields are kept and shown as they are.
"""

import math
from collections import deque
from typing import Any, Callable, Deque, Dict, List

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# A refusal's reason or a file's name fits in this many characters; anything
# longer is a peer talking too much, and the page has one line per event.
MAX_TEXT = 200

# Lists (a file's holders) are cut to this many items.
MAX_ITEMS = 32

# A kind is a short word chosen by this node; cut anyway.
MAX_KIND = 40

# Integers beyond 2**53 lose precision in JavaScript; no count here gets near.
MAX_INT = 2**53

ELLIPSIS = "\u2026"


def boundText(text: str, limit: int = MAX_TEXT) -> str:
    """
    C{text} cut to C{limit} characters, the last one an ellipsis when cut.
    """
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS


def _boundScalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return max(-MAX_INT, min(MAX_INT, value))
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return boundText(value[: MAX_TEXT * 4].decode("utf-8", "replace"))
    if isinstance(value, str):
        return boundText(value)
    return boundText(str(value))


def boundValue(value: Any) -> Any:
    """
    A JSON-ready, bounded copy of one event field: None, a bool, a bounded
    number, a string of at most L{MAX_TEXT} characters, or a list of at most
    L{MAX_ITEMS} of those.  Anything else becomes its (bounded) string form.
    """
    if isinstance(value, (list, tuple)):
        return [_boundScalar(item) for item in value[:MAX_ITEMS]]
    return _boundScalar(value)


class Subscribers:
    """
    Callables to call with each new thing, in the order they subscribed.

    One that raises is logged and the others still run: a broken watcher
    must not break the node that feeds it.
    """

    log = Logger()

    def __init__(self) -> None:
        self._callbacks: Dict[object, Callable[..., None]] = {}

    def __len__(self) -> int:
        return len(self._callbacks)

    def subscribe(self, callback: Callable[..., None]) -> Callable[[], None]:
        """
        Call C{callback} with the arguments of every later L{notify}, until
        the returned callable is called (calling it again does nothing).
        """
        key = object()
        self._callbacks[key] = callback

        def unsubscribe() -> None:
            self._callbacks.pop(key, None)

        return unsubscribe

    def notify(self, *args: Any) -> None:
        for callback in list(self._callbacks.values()):
            try:
                callback(*args)
            except Exception:
                self.log.failure("watcher {callback!r} failed", callback=callback)


class EventLog:
    """
    The last C{size} events, oldest first, each a dict with C{time} (from
    C{clock.seconds()}), C{kind} and the bounded fields it was added with.
    Events are shared with every reader: treat them as read-only.
    """

    def __init__(self, clock: IReactorTime, size: int = 200) -> None:
        self._clock = clock
        self._events: Deque[Dict[str, Any]] = deque(maxlen=size)
        self._subscribers = Subscribers()

    def add(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """
        Record an event of C{kind} now, tell every subscriber, and return it.
        """
        if "time" in fields:
            raise TypeError("an event's time is the clock's, not a field")
        event: Dict[str, Any] = {"time": self._clock.seconds(), "kind": boundText(str(kind), MAX_KIND)}
        for name, value in fields.items():
            event[name] = boundValue(value)
        self._events.append(event)
        self._subscribers.notify(event)
        return event

    def recent(self) -> List[Dict[str, Any]]:
        """
        The events kept, oldest first.
        """
        return list(self._events)

    def subscribe(self, callback: Callable[[Dict[str, Any]], None]) -> Callable[[], None]:
        """
        Call C{callback(event)} for every event added from now on; returns
        the callable that stops it.
        """
        return self._subscribers.subscribe(callback)
