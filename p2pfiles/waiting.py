"""
Deferreds handed to whoever waits for something to happen.

One helper instead of a hand-written list of waiters in every class that
needs one.  This module imports nothing else of the package.
"""

from typing import Any, List

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure


class Waiters:
    """
    Everyone waiting for the next time something happens.
    """

    def __init__(self) -> None:
        self._waiting: List[Deferred] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self) -> Deferred:
        """
        A Deferred that fires the next time L{fire} is called.
        """
        d: Deferred = Deferred(self._cancelled)
        self._waiting.append(d)
        return d

    def _cancelled(self, d: Deferred) -> None:
        # A cancelled waiter leaves at once, so that waiters of something
        # that never happens do not pile up.
        if d in self._waiting:
            self._waiting.remove(d)

    def fire(self, result: Any = None) -> None:
        """
        Fire everyone waiting now with C{result} (a L{Failure} fails them).
        """
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class Once(Waiters):
    """
    Something that happens once: waiting after it happened fires at once
    with the same result.
    """

    _done = False
    _result: Any = None

    @property
    def happened(self) -> bool:
        return self._done

    def wait(self) -> Deferred:
        if self._done:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)
        return super().wait()

    def fire(self, result: Any = None) -> None:
        if self._done:
            return
        self._done = True
        self._result = result
        super().fire(result)
