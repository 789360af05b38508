"""
Tests for L{p2pfiles.waiting}: L{Waiters} (everyone waiting for the next
time something happens) and L{Once} (something that happens once).
"""

from typing import List

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.errors import P2PError
from p2pfiles.waiting import Once, Waiters


class WaitersTests(SynchronousTestCase):
    """
    L{Waiters}.
    """

    def test_fireFiresEveryone(self) -> None:
        """
        C{fire(result)} fires every Deferred handed out by C{wait} with that
        result, in the order they were asked for, and empties the list.
        """
        waiters = Waiters()
        order: List[int] = []
        first = waiters.wait().addCallback(lambda r: (order.append(1), r)[1])
        second = waiters.wait().addCallback(lambda r: (order.append(2), r)[1])
        self.assertEqual(len(waiters), 2)
        waiters.fire("done")
        self.assertEqual(self.successResultOf(first), "done")
        self.assertEqual(self.successResultOf(second), "done")
        self.assertEqual(order, [1, 2])
        self.assertEqual(len(waiters), 0)

    def test_fireWithFailureFailsEveryone(self) -> None:
        """
        A L{Failure} given to C{fire} fails every waiter with it.
        """
        waiters = Waiters()
        first, second = waiters.wait(), waiters.wait()
        waiters.fire(Failure(P2PError("gone away", "gone")))
        for d in (first, second):
            self.assertEqual(self.failureResultOf(d, P2PError).value.code, "gone")

    def test_onlyThoseWaitingNow(self) -> None:
        """
        C{fire} is for those waiting now: a wait begun afterwards waits for
        the next C{fire}.
        """
        waiters = Waiters()
        waiters.wait()
        waiters.fire(1)
        later = waiters.wait()
        self.assertNoResult(later)
        waiters.fire(2)
        self.assertEqual(self.successResultOf(later), 2)

    def test_cancelledWaiterLeaves(self) -> None:
        """
        A cancelled waiter fails with L{CancelledError} and leaves the list at
        once, so that waiters of something that never happens do not pile
        up; the others still fire.
        """
        waiters = Waiters()
        gone = waiters.wait()
        stays = waiters.wait()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(len(waiters), 1)
        waiters.fire("x")
        self.assertEqual(self.successResultOf(stays), "x")

    def test_fireWithNobody(self) -> None:
        """
        Firing with nobody waiting does nothing (and raises nothing).
        """
        waiters = Waiters()
        waiters.fire(None)
        waiters.fire(Failure(P2PError("unused", "io")))
        self.assertEqual(len(waiters), 0)


class OnceTests(SynchronousTestCase):
    """
    L{Once}.
    """

    def test_firesWaitersOnce(self) -> None:
        """
        The first C{fire} fires everyone waiting; a second C{fire} changes
        nothing, even with another result.
        """
        once = Once()
        self.assertFalse(once.happened)
        waiting = once.wait()
        once.fire("first")
        once.fire("second")
        self.assertTrue(once.happened)
        self.assertEqual(self.successResultOf(waiting), "first")
        self.assertEqual(self.successResultOf(once.wait()), "first")

    def test_laterWaitFiresAtOnceWithResult(self) -> None:
        """
        Once it happened, C{wait} returns an already fired Deferred with the
        same result, every time.
        """
        once = Once()
        once.fire(42)
        self.assertEqual(self.successResultOf(once.wait()), 42)
        self.assertEqual(self.successResultOf(once.wait()), 42)
        self.assertEqual(len(once), 0)

    def test_laterWaitFailsAtOnceWithFailure(self) -> None:
        """
        Once it happened with a failure, every later C{wait} fails at once
        with that failure (each caller gets its own Deferred to handle).
        """
        once = Once()
        early = once.wait()
        once.fire(Failure(P2PError("the node stopped", "unavailable")))
        self.assertEqual(self.failureResultOf(early, P2PError).value.code, "unavailable")
        for _ in range(2):
            self.assertEqual(self.failureResultOf(once.wait(), P2PError).value.code, "unavailable")

    def test_cancelBeforeItHappens(self) -> None:
        """
        A waiter of a L{Once} cancelled before it happened leaves the list;
        the others still get the result.
        """
        once = Once()
        gone, stays = once.wait(), once.wait()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(len(once), 1)
        once.fire("ok")
        self.assertEqual(self.successResultOf(stays), "ok")
