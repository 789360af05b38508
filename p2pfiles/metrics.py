"""
A node's Prometheus metrics, in a registry of its own.

L{NodeMetrics} creates every C{p2pfiles_*} metric in one
C{CollectorRegistry} (never the process-wide default one, so several nodes
in one process, as in the tests, keep apart) and offers one small method per
thing the node observes; C{/metrics} serves the registry (see
L{p2pfiles.web}).

Label values are bounded: a metric keeps at most L{MAX_LABEL_VALUES}
distinct values of a label, further ones are counted as C{"other"}, so a
peer inventing reasons cannot make the registry grow without end.
"""

import re
from typing import Dict, Optional, Set

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Distinct values one label of one metric may take; the node's own codes
# (refusal reasons, transfer results, connection purposes) are a handful.
MAX_LABEL_VALUES = 16

# A label value is a short code; longer ones are cut.
MAX_LABEL_LENGTH = 40

OTHER = "other"

SEND_KINDS = ("serve", "relay")

# A failover takes about the leader timeout (seconds), longer under load.
FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

# Transfers range from a small file on loopback to gigabytes over a LAN.
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


class _LabelValues:
    """
    The values one label has taken, at most L{MAX_LABEL_VALUES} of them.
    """

    def __init__(self) -> None:
        self._seen: Set[str] = set()

    def __call__(self, value: object) -> str:
        text = _UNSAFE.sub("_", str(value))[:MAX_LABEL_LENGTH] or OTHER
        if text in self._seen:
            return text
        if len(self._seen) >= MAX_LABEL_VALUES - 1:
            return OTHER
        self._seen.add(text)
        return text


class NodeMetrics:
    """
    Every metric of one node.  The node calls the methods below as things
    happen; the registry is in C{registry}.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
        self.registry = registry
        self._lostAt: Optional[float] = None
        self._longestDelay = 0.0
        self._labels: Dict[str, _LabelValues] = {
            "result": _LabelValues(),
            "purpose": _LabelValues(),
            "reason": _LabelValues(),
        }

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self._isLeader = gauge("p2pfiles_is_leader", "1 while this node leads the cluster, else 0")
        self._epoch = gauge("p2pfiles_epoch", "The election epoch this node is in")
        self._memberCount = gauge("p2pfiles_members", "Cluster members by state, this node included", "state")
        self._leaderChanges = counter(
            "p2pfiles_leader_changes_total",
            "Times the leader this node knows changed to another node (with or without a spell of none between)",
        )
        self._failover = Histogram(
            "p2pfiles_failover_seconds",
            "From this node losing its leader to knowing the next one",
            buckets=FAILOVER_BUCKETS,
            registry=registry,
        )
        self._filesIndexed = gauge("p2pfiles_files_indexed", "Files in the cluster index (kept by the leader)")
        self._bytesSent = counter(
            "p2pfiles_bytes_sent_total", "File bytes sent: from this node's share (serve) or passed on (relay)", "kind"
        )
        self._bytesReceived = counter("p2pfiles_bytes_received_total", "File bytes received into this node's share")
        self._transfers = counter("p2pfiles_transfers_total", "Transfers ended, by result", "result")
        self._transferTime = Histogram(
            "p2pfiles_transfer_seconds", "How long transfers took", buckets=TRANSFER_BUCKETS, registry=registry
        )
        self._connectionCount = gauge("p2pfiles_connections", "Open connections, by purpose", "purpose")
        self._rejections = counter("p2pfiles_rejected_total", "Messages or connections refused, by reason", "reason")
        self._maxTimerDelay = gauge(
            "p2pfiles_max_timer_delay_seconds",
            "The longest a periodic timer of this node has run late since it started",
        )
        # Series that should read 0 rather than be missing before anything happens.
        for state in ("alive", "down"):
            self._memberCount.labels(state=state)
        for kind in SEND_KINDS:
            self._bytesSent.labels(kind=kind)

    def leadership(self, isLeader: bool, epoch: int) -> None:
        """
        This node's role and epoch as they are now.
        """
        self._isLeader.set(1 if isLeader else 0)
        self._epoch.set(epoch)

    def leaderChanged(self) -> None:
        """
        The leader this node follows (or is) is another node than the last
        one it knew.
        """
        self._leaderChanges.inc()

    def leaderLost(self, now: float) -> None:
        """
        This node lost its leader at C{now} (a clock's seconds).  A second
        loss before a new leader is known does not restart the count.
        """
        if self._lostAt is None:
            self._lostAt = now

    def leaderKnown(self, now: float) -> None:
        """
        This node knows its leader again at C{now}: if it had lost one, the
        time since is one failover.
        """
        if self._lostAt is not None:
            self._failover.observe(max(0.0, now - self._lostAt))
            self._lostAt = None

    def members(self, alive: int, down: int) -> None:
        self._memberCount.labels(state="alive").set(alive)
        self._memberCount.labels(state="down").set(down)

    def filesIndexed(self, count: int) -> None:
        """
        The cluster index this node keeps as leader holds C{count} files.
        """
        self._filesIndexed.set(count)

    def sent(self, kind: str, count: int) -> None:
        """
        C{count} file bytes went out; C{kind} is C{"serve"} or C{"relay"}.
        """
        if kind not in SEND_KINDS:
            raise ValueError(f"kind must be one of {SEND_KINDS}, not {kind!r}")
        self._bytesSent.labels(kind=kind).inc(count)

    def received(self, count: int) -> None:
        self._bytesReceived.inc(count)

    def transferEnded(self, result: str, seconds: float) -> None:
        """
        A transfer ended with C{result} (e.g. C{"ok"}, C{"failed"}) after
        C{seconds}.
        """
        self._transfers.labels(result=self._labels["result"](result)).inc()
        self._transferTime.observe(max(0.0, seconds))

    def connections(self, purpose: str, count: int) -> None:
        """
        This node has C{count} open connections for C{purpose}.
        """
        self._connectionCount.labels(purpose=self._labels["purpose"](purpose)).set(count)

    def rejected(self, reason: str) -> None:
        """
        This node refused something, for C{reason} (a short code).
        """
        self._rejections.labels(reason=self._labels["reason"](reason)).inc()

    def timerDelay(self, seconds: float) -> None:
        """
        A periodic timer ran C{seconds} late; the gauge keeps the longest.
        """
        if seconds > self._longestDelay:
            self._longestDelay = seconds
            self._maxTimerDelay.set(seconds)
