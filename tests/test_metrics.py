"""
Tests for L{p2pfiles.metrics}: every metric's name, type and value as
Prometheus reads them from the node's own registry.
"""

from typing import Dict, Optional, Tuple

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.metrics import MAX_LABEL_VALUES, NodeMetrics

NAMES = {
    "p2pfiles_is_leader": "gauge",
    "p2pfiles_epoch": "gauge",
    "p2pfiles_members": "gauge",
    "p2pfiles_leader_changes": "counter",
    "p2pfiles_failover_seconds": "histogram",
    "p2pfiles_files_indexed": "gauge",
    "p2pfiles_bytes_sent": "counter",
    "p2pfiles_bytes_received": "counter",
    "p2pfiles_transfers": "counter",
    "p2pfiles_transfer_seconds": "histogram",
    "p2pfiles_connections": "gauge",
    "p2pfiles_rejected": "counter",
    "p2pfiles_max_timer_delay_seconds": "gauge",
}


def scrape(metrics: NodeMetrics) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """
    Every sample of the registry, as Prometheus parses the text: (sample
    name, sorted labels) -> value.
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(metrics: NodeMetrics, name: str, **labels: str) -> Optional[float]:
    return scrape(metrics).get((name, tuple(sorted(labels.items()))))


class NamesTests(SynchronousTestCase):
    """
    The metrics exist under their documented names and types, in a
    registry of the node's own.
    """

    def test_namesAndTypes(self) -> None:
        """
        Every documented metric is exposed with its type (counters' families
        are named without C{_total}, their samples with it).
        """
        metrics = NodeMetrics()
        text = generate_latest(metrics.registry).decode("utf-8")
        types = {family.name: family.type for family in text_string_to_metric_families(text)}
        for name, kind in NAMES.items():
            self.assertEqual(types.get(name), kind, name)

    def test_counterSamplesEndInTotal(self) -> None:
        """
        Counter samples carry the C{_total} names dashboards query.
        """
        metrics = NodeMetrics()
        metrics.leaderChanged()
        metrics.received(1)
        metrics.sent("serve", 1)
        metrics.transferEnded("ok", 1.0)
        metrics.rejected("auth")
        samples = {name for name, labels in scrape(metrics)}
        for name in (
            "p2pfiles_leader_changes_total",
            "p2pfiles_bytes_sent_total",
            "p2pfiles_bytes_received_total",
            "p2pfiles_transfers_total",
            "p2pfiles_rejected_total",
        ):
            self.assertIn(name, samples)

    def test_ownRegistry(self) -> None:
        """
        Two nodes in one process keep separate metrics, and neither touches
        the process-wide default registry.
        """
        first, second = NodeMetrics(), NodeMetrics()
        first.leadership(True, 4)
        second.leadership(False, 4)
        self.assertEqual(value(first, "p2pfiles_is_leader"), 1)
        self.assertEqual(value(second, "p2pfiles_is_leader"), 0)
        self.assertNotIn(b"p2pfiles_", generate_latest(REGISTRY))

    def test_givenRegistry(self) -> None:
        """
        A registry passed in is the one used.
        """
        registry = CollectorRegistry()
        metrics = NodeMetrics(registry)
        self.assertIs(metrics.registry, registry)
        self.assertIn(b"p2pfiles_epoch", generate_latest(registry))

    def test_zeroSeriesPresent(self) -> None:
        """
        Before anything happens, members by state and bytes sent by kind
        read 0 instead of being missing.
        """
        metrics = NodeMetrics()
        self.assertEqual(value(metrics, "p2pfiles_members", state="alive"), 0)
        self.assertEqual(value(metrics, "p2pfiles_members", state="down"), 0)
        self.assertEqual(value(metrics, "p2pfiles_bytes_sent_total", kind="serve"), 0)
        self.assertEqual(value(metrics, "p2pfiles_bytes_sent_total", kind="relay"), 0)


class ValuesTests(SynchronousTestCase):
    """
    Each method moves its metric.
    """

    def test_leadership(self) -> None:
        """
        C{leadership} sets the role gauge to 0 or 1 and the epoch.
        """
        metrics = NodeMetrics()
        metrics.leadership(True, 9)
        self.assertEqual((value(metrics, "p2pfiles_is_leader"), value(metrics, "p2pfiles_epoch")), (1, 9))
        metrics.leadership(False, 10)
        self.assertEqual((value(metrics, "p2pfiles_is_leader"), value(metrics, "p2pfiles_epoch")), (0, 10))

    def test_leaderChanges(self) -> None:
        """
        Each C{leaderChanged} counts one.
        """
        metrics = NodeMetrics()
        metrics.leaderChanged()
        metrics.leaderChanged()
        self.assertEqual(value(metrics, "p2pfiles_leader_changes_total"), 2)

    def test_failover(self) -> None:
        """
        Losing the leader at 10 s and knowing the next at 12.5 s is one
        failover of 2.5 s, in the 3 s bucket and not the 2 s one.
        """
        metrics = NodeMetrics()
        metrics.leaderLost(10.0)
        metrics.leaderKnown(12.5)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_count"), 1)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_sum"), 2.5)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_bucket", le="2.0"), 0)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_bucket", le="3.0"), 1)

    def test_failoverCountsFromFirstLoss(self) -> None:
        """
        A second loss before a leader is known does not restart the count;
        a second C{leaderKnown} records nothing more.
        """
        metrics = NodeMetrics()
        metrics.leaderLost(10.0)
        metrics.leaderLost(11.0)
        metrics.leaderKnown(14.0)
        metrics.leaderKnown(20.0)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_count"), 1)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_sum"), 4.0)

    def test_knownWithoutLossIsNoFailover(self) -> None:
        """
        Learning a leader at start-up, with none lost, is not a failover.
        """
        metrics = NodeMetrics()
        metrics.leaderKnown(3.0)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_count"), 0)

    def test_failoverNeverNegative(self) -> None:
        """
        A clock that stepped back records 0, not a negative duration.
        """
        metrics = NodeMetrics()
        metrics.leaderLost(10.0)
        metrics.leaderKnown(9.0)
        self.assertEqual(value(metrics, "p2pfiles_failover_seconds_sum"), 0)

    def test_members(self) -> None:
        """
        C{members} sets the alive and down gauges.
        """
        metrics = NodeMetrics()
        metrics.members(2, 1)
        self.assertEqual(value(metrics, "p2pfiles_members", state="alive"), 2)
        self.assertEqual(value(metrics, "p2pfiles_members", state="down"), 1)

    def test_filesIndexed(self) -> None:
        """
        C{filesIndexed} sets the index size.
        """
        metrics = NodeMetrics()
        metrics.filesIndexed(42)
        self.assertEqual(value(metrics, "p2pfiles_files_indexed"), 42)

    def test_bytes(self) -> None:
        """
        Bytes sent add up by kind; bytes received add up.
        """
        metrics = NodeMetrics()
        metrics.sent("serve", 100)
        metrics.sent("serve", 50)
        metrics.sent("relay", 7)
        metrics.received(1000)
        self.assertEqual(value(metrics, "p2pfiles_bytes_sent_total", kind="serve"), 150)
        self.assertEqual(value(metrics, "p2pfiles_bytes_sent_total", kind="relay"), 7)
        self.assertEqual(value(metrics, "p2pfiles_bytes_received_total"), 1000)

    def test_sentKindChecked(self) -> None:
        """
        A kind other than serve or relay is a mistake in the caller.
        """
        metrics = NodeMetrics()
        self.assertRaises(ValueError, metrics.sent, "receive", 1)

    def test_transfers(self) -> None:
        """
        C{transferEnded} counts by result and observes the duration.
        """
        metrics = NodeMetrics()
        metrics.transferEnded("ok", 2.0)
        metrics.transferEnded("ok", 4.0)
        metrics.transferEnded("failed", 0.5)
        self.assertEqual(value(metrics, "p2pfiles_transfers_total", result="ok"), 2)
        self.assertEqual(value(metrics, "p2pfiles_transfers_total", result="failed"), 1)
        self.assertEqual(value(metrics, "p2pfiles_transfer_seconds_count"), 3)
        self.assertEqual(value(metrics, "p2pfiles_transfer_seconds_sum"), 6.5)

    def test_connections(self) -> None:
        """
        C{connections} sets the gauge of one purpose.
        """
        metrics = NodeMetrics()
        metrics.connections("control", 2)
        metrics.connections("request", 5)
        metrics.connections("control", 1)
        self.assertEqual(value(metrics, "p2pfiles_connections", purpose="control"), 1)
        self.assertEqual(value(metrics, "p2pfiles_connections", purpose="request"), 5)

    def test_rejected(self) -> None:
        """
        C{rejected} counts by reason.
        """
        metrics = NodeMetrics()
        metrics.rejected("auth")
        metrics.rejected("auth")
        metrics.rejected("stale")
        self.assertEqual(value(metrics, "p2pfiles_rejected_total", reason="auth"), 2)
        self.assertEqual(value(metrics, "p2pfiles_rejected_total", reason="stale"), 1)

    def test_timerDelayKeepsLongest(self) -> None:
        """
        The timer delay gauge holds the longest delay seen.
        """
        metrics = NodeMetrics()
        metrics.timerDelay(0.2)
        metrics.timerDelay(1.5)
        metrics.timerDelay(0.1)
        self.assertEqual(value(metrics, "p2pfiles_max_timer_delay_seconds"), 1.5)


class LabelBoundTests(SynchronousTestCase):
    """
    Label values are bounded: peers cannot grow the registry.
    """

    def test_distinctValuesCapped(self) -> None:
        """
        After L{MAX_LABEL_VALUES} - 1 distinct reasons, further ones count
        as C{other}; known ones still count as themselves.
        """
        metrics = NodeMetrics()
        for n in range(100):
            metrics.rejected(f"reason{n}")
        metrics.rejected("reason0")
        reasons = {dict(labels)["reason"]: v for (name, labels), v in scrape(metrics).items() if name == "p2pfiles_rejected_total"}
        self.assertEqual(len(reasons), MAX_LABEL_VALUES)
        self.assertEqual(reasons["other"], 100 - (MAX_LABEL_VALUES - 1))
        self.assertEqual(reasons["reason0"], 2)

    def test_valuesCleaned(self) -> None:
        """
        Odd characters become underscores and long values are cut.
        """
        metrics = NodeMetrics()
        metrics.rejected('bad"\n{}' + "x" * 100)
        reasons = [dict(labels)["reason"] for (name, labels) in scrape(metrics) if name == "p2pfiles_rejected_total"]
        self.assertEqual(reasons, ["bad____" + "x" * 33])
