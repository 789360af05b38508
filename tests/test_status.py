"""
Tests for L{p2pfiles.status.StatusBoard}: what the leadership metrics and
events record as the view of the cluster changes, on a L{Clock}.
"""

from typing import Any, Optional, Tuple

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.status import StatusBoard

from .test_metrics import value


class LeadershipMetricsTests(SynchronousTestCase):
    """
    C{p2pfiles_leader_changes_total} counts changes from one known leader to
    another, once however the change went; C{p2pfiles_failover_seconds}
    records one observation per leader lost, from the loss to knowing the
    next; start-up is neither.  This node is node 3; the view is set by
    L{see}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.snapshot: Tuple[Any, ...] = ("candidate", None, 0, ())
        self.board = StatusBoard(self.clock, lambda: {}, lambda: self.snapshot, lambda: succeed([]))

    def see(self, leader: Optional[int], epoch: int, down: Tuple[int, ...] = (), after: float = 0.0) -> None:
        """
        After C{after} seconds, the node sees C{leader} in C{epoch}, with
        members 1 and 2 alive unless in C{down}.
        """
        self.clock.advance(after)
        role = "leader" if leader == 3 else ("candidate" if leader is None else "follower")
        self.snapshot = (role, leader, epoch, tuple((m, m not in down) for m in (1, 2)))
        self.board.changed()

    def changes(self) -> Optional[float]:
        return value(self.board.metrics, "p2pfiles_leader_changes_total")

    def failovers(self) -> Tuple[Optional[float], Optional[float]]:
        metrics = self.board.metrics
        return (value(metrics, "p2pfiles_failover_seconds_count"), value(metrics, "p2pfiles_failover_seconds_sum"))

    def test_startUpIsNeither(self) -> None:
        """
        Knowing no leader at start, then the first one, is no change and no
        failover; the first leader is an event.
        """
        self.see(None, 0)
        self.see(1, 1, after=0.5)
        self.assertEqual(self.changes(), 0)
        self.assertEqual(self.failovers(), (0, 0))
        self.assertEqual([e["leader"] for e in self.board.events() if e["kind"] == "leader"], [1])

    def test_lossThenNextLeader(self) -> None:
        """
        Leader 1 lost, none for 0.75 s, then leader 2: one change and one
        failover of 0.75 s.
        """
        self.see(1, 1)
        self.see(None, 1, down=(1,), after=5)
        self.see(2, 2, down=(1,), after=0.75)
        self.assertEqual(self.changes(), 1)
        self.assertEqual(self.failovers(), (1, 0.75))

    def test_directReplacementOfDownLeader(self) -> None:
        """
        Leader 1 down and leader 2 known in the same look (as on the node
        that claims at once): one change and one failover of 0 s.
        """
        self.see(1, 1)
        self.see(2, 2, down=(1,), after=5)
        self.assertEqual(self.changes(), 1)
        self.assertEqual(self.failovers(), (1, 0))

    def test_newEpochBeforeTheLinkCloses(self) -> None:
        """
        Node 2's claim can arrive before this node notices that its link to
        leader 1 closed: a larger id taking over is a failover all the same,
        and noticing 1 down afterwards adds nothing.
        """
        self.see(1, 1)
        self.see(2, 2, after=5)
        self.see(2, 2, down=(1,), after=0.01)
        self.assertEqual(self.changes(), 1)
        self.assertEqual(self.failovers(), (1, 0))

    def test_returningSmallerIdIsNoFailover(self) -> None:
        """
        Leader 2 steps aside for node 1, back and alive: a change, not a
        failover.
        """
        self.see(2, 2, down=(1,))
        self.see(1, 3, after=5)
        self.assertEqual(self.changes(), 1)
        self.assertEqual(self.failovers(), (0, 0))

    def test_ledItselfIsNoFailover(self) -> None:
        """
        This node led and another node leads now (a smaller id came back):
        it lost nothing.
        """
        self.snapshot = ("leader", 3, 4, ((1, False), (2, False)))
        self.board.changed()
        self.snapshot = ("follower", 1, 5, ((1, True), (2, False)))
        self.board.changed()
        self.assertEqual(self.changes(), 1)
        self.assertEqual(self.failovers(), (0, 0))

    def test_sameLeaderAgainIsNoChange(self) -> None:
        """
        Leader 1 lost and back after 2 s (in a new epoch): one failover of
        2 s, but no change of leader.
        """
        self.see(1, 1)
        self.see(None, 1, down=(1,), after=5)
        self.see(1, 2, after=2)
        self.assertEqual(self.changes(), 0)
        self.assertEqual(self.failovers(), (1, 2))

    def test_twoFailovers(self) -> None:
        """
        Each loss is one observation and each new leader one change.
        """
        self.see(1, 1)
        self.see(None, 1, down=(1,), after=1)
        self.see(2, 2, down=(1,), after=0.5)
        self.see(None, 2, down=(1, 2), after=1)
        self.see(3, 3, down=(1, 2), after=0.25)
        self.assertEqual(self.changes(), 2)
        self.assertEqual(self.failovers(), (2, 0.75))
