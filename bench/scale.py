"""
The cluster index at scale: elections, hashing, failover, changes, memory
and timer delays of real nodes sharing many small files, in one run.

Setup: --files F (100,000) files per node of random bytes, each of a random
size from 1 to 4 KiB, written once (os.write of os.urandom) into --dir
(default a temporary directory, removed at the end unless --keep; a --dir
that already holds shares of the same size is reused).  Nodes 1-3 (a
--cluster file listing all) share one such directory each.  A lone node with
an empty share (no peers) runs beside them for the whole run, as the memory
baseline.  The node logs are tailed every 10 ms by a thread that stamps each
line with time.monotonic() when read.

In order:

  - baseline: C{find SHARE -type f -print0 | xargs -0 sha256sum > /dev/null}
    on each node's share, timed (median of 3; files/s, MB/s).  The files
    are in the page cache for it and for the nodes alike.
  - cold: empty state directories (no hash cache); the nodes are started one
    after the other, each once the previous one logged "sharing N files" and
    node 1's peer_files.log lists every file shared so far (the leader's
    gather of the previous node is over), so each hashes alone, as sha256sum
    did.  Per node, the rate from its start
    (Popen) to its "sharing N files" log line, against the baseline of its
    own share: target >= 0.8x (median of the nodes).
  - warm, --warm (3) times: the nodes are stopped (followers first, largest
    id first, so that no stop makes anyone claim), every peer_files.log is
    removed and all are started together.  From node 1's "node 1 leads epoch
    E" log line to its peer_files.log reading "# epoch: E" and "# files:
    3F": target <= 1.5 s (median; max printed).  If the leadership changes
    before epoch E has a complete log, that start counts as never complete,
    and the first complete log of a later epoch is printed beside it.
  - adds: --adds (5) files written into a follower's share (nodes 2 and 3 in
    turn, a random 0.2-1.2 s apart); from just before the write to the
    leader's peer_files.log listing it: target median <= 1 s.
  - memory: VmRSS and VmHWM of the leader (and of the others); bytes per
    entry = (leader VmRSS - the lone idle node's VmRSS) / entries: what the
    whole leader process costs per entry, its own share included (a third
    of the entries here, so informative; bench/indexmem.py breaks it down).
  - kill: SIGKILL of node 1 with 3F entries; node 2 (the standby, which
    kept the index) claims.  From its "leads epoch" line to its complete
    peer_files.log (2F + the adds): target <= 2 s.  Its log lines after the
    claim say, per other member, "all files from" (a full re-gather) or
    "changes from" (a delta), or nothing (its copy was current); target: no
    "all files from".
  - rejoin: node 1 is started again and leads again; the time to its
    complete log (it has no copy: a full gather) is informative.
  - ten (--ten): nodes 1-10, node 10 sharing one more file (10F + 1
    entries: 1,000,001 at F = 100,000), all state removed, started together
    cold, then once warm: they must converge (every node reports the same
    leader and epoch with all members alive, and the leader's log is
    complete), with no extra leadership change, leader VmRSS <= 400 MiB and
    (VmRSS - the idle node's) / entries <= 300 B: the headline figure of
    what an entry costs a leader.

Throughout, every ~2 s (--poll-interval), C{p2pfiles status --json --node
ADDR} is asked of every running node (--poll direct: the same request from
this process, see L{common.directStatus}); its "max_timer_delay" (the
longest timer lateness over the last minute) is collected: target median
<= 50 ms and max <= 250 ms over all samples of the cluster's nodes.  As each
sample covers a minute, a spike shows in the samples of the following
minute, in whatever phase those fall.  A node that has not answered yet
since it was started is not counted; one that stops answering is (as "no
answer").  One CLI process costs ~0.25 CPU-s; the cost is printed: with
--ten, --poll direct keeps the poller from loading the 2 cores it measures.

Extra leadership changes: the "node N leads epoch E" lines in all cluster
node logs, beyond the expected ones (1 per start of the cluster, 1 for the
kill, 1 for the restart of the killed leader; 0 while stopping): target 0.

Every wait has a deadline; all nodes are stopped at the end, on Ctrl-C and
on SIGTERM.  A phase that fails (a deadline passed) ends the run, and what
was measured before it is still reported.  Run it with the interpreter of a
virtualenv holding the p2pfiles to measure: the nodes are its twistd.

Usage: .venv/bin/python bench/scale.py [--files 100000] [--dir DIR] [--keep]
           [--warm 3] [--adds 5] [--poll cli|direct] [--poll-interval 2]
           [--ten] [--quick] [--node-arg ARG ...]
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MiB, Cluster, Figure, dataLines, logHeader, median  # noqa: E402

# Targets.
WARM_FULL_LOG = 1.5
COLD_RATIO = 0.8
KILL_FULL_LOG = 2.0
ADDED_FILE = 1.0
TIMER_MEDIAN = 0.050
TIMER_MAX = 0.250
TEN_RSS_MIB = 400.0
ENTRY_BYTES = 300.0

POLL = 0.01
MIN_SIZE, MAX_SIZE = 1024, 4096
MANIFEST = "share.json"

LEADS = re.compile(r"node (\d+) leads epoch (\d+)")
SHARING = re.compile(r"sharing (\d+) files from")
UP = re.compile(r"node \d+ up at")
PULLED = re.compile(r"(all files|changes) from node (\d+): (\d+) files, (\d+) removed, in (\d+) ms")
GATHERED = re.compile(r"index of epoch \d+: \d+ files on \d+ nodes, gathered in \d+ ms")


# The shares.


def makeShare(share: str, files: int, seed: int, extra: int = 0) -> Tuple[int, int]:
    """
    Make C{share} hold exactly C{files} + C{extra} files of 1-4 KiB of
    random bytes, reusing what an earlier run wrote when its manifest
    matches; return C{(files, bytes)}.
    """
    manifestPath = os.path.join(os.path.dirname(share), MANIFEST)
    wanted = {"files": files, "extra": extra, "seed": seed, "min": MIN_SIZE, "max": MAX_SIZE}
    try:
        with open(manifestPath) as f:
            manifest = json.load(f)
        if all(manifest.get(k) == v for k, v in wanted.items()) and len(os.listdir(share)) == files + extra:
            return files + extra, manifest["bytes"]
    except (OSError, ValueError):
        pass
    shutil.rmtree(share, ignore_errors=True)
    os.makedirs(share)
    sizes = random.Random(seed)
    node = os.path.basename(os.path.dirname(share))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    total = 0
    names = [f"{node}-{k:06d}.dat" for k in range(files)] + [f"{node}-extra-{k}.dat" for k in range(extra)]
    for name in names:
        size = sizes.randint(MIN_SIZE, MAX_SIZE)
        fd = os.open(os.path.join(share, name), flags, 0o644)
        try:
            os.write(fd, os.urandom(size))
        finally:
            os.close(fd)
        total += size
    with open(manifestPath, "w") as f:
        json.dump(dict(wanted, bytes=total), f)
    return len(names), total


def removeAdded(share: str) -> None:
    for name in os.listdir(share):
        if name.startswith("added-"):
            os.unlink(os.path.join(share, name))


def resetNode(node: common.NodeProcess, logs: bool = True) -> None:
    """
    Empty C{node}'s state directory (hash cache, epoch, peer_files.log) and
    remove its logs (if C{logs}): each run starts cold and logs from nothing.
    """
    shutil.rmtree(node.state, ignore_errors=True)
    os.makedirs(node.state)
    if not logs:
        return
    directory = os.path.dirname(node.log)
    for name in os.listdir(directory):
        if name.startswith("twistd.log") or name == "stdout.log":
            os.unlink(os.path.join(directory, name))


def baseline(share: str) -> float:
    """
    Seconds for C{find | xargs sha256sum} to hash every file in C{share}.
    """
    started = time.monotonic()
    subprocess.run(f"find {share} -type f -print0 | xargs -0 sha256sum > /dev/null", shell=True, check=True, timeout=1800)
    return time.monotonic() - started


# Logs.


class LogWatcher:
    """
    Tail the nodes' twistd logs in a thread, every L{POLL} seconds; stamp
    each line with C{time.monotonic()} when read.  Follows twistd's
    rotation (the rest of the old file is read before the new one).
    """

    def __init__(self) -> None:
        self._files: Dict[Any, List[Any]] = {}  # key -> [path, file or None, partial bytes]
        self.lines: Dict[Any, List[Tuple[float, str]]] = {}
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, key: Any, path: str) -> None:
        with self._condition:
            if key not in self._files:
                self._files[key] = [path, None, b""]
                self.lines[key] = []

    def _read(self, key: Any, entry: List[Any], now: float) -> None:
        path, f, partial = entry
        if f is None:
            try:
                f = entry[1] = open(path, "rb")
            except FileNotFoundError:
                return
        data = f.read()
        try:
            rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            data += f.read()
            f.close()
            entry[1] = None
        if not data:
            return
        chunks = (partial + data).split(b"\n")
        entry[2] = chunks.pop()
        if chunks:
            with self._condition:
                self.lines[key].extend((now, line.decode("utf-8", "replace")) for line in chunks)
                self._condition.notify_all()

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            with self._condition:
                entries = list(self._files.items())
            for key, entry in entries:
                self._read(key, entry, now)
            self._stopping.wait(POLL)

    def find(self, key: Any, pattern: "re.Pattern[str]", after: float = 0.0, before: float = float("inf")) -> List[Tuple[float, "re.Match[str]"]]:
        """
        Every line of C{key} read in C{[after, before)} that matches.
        """
        with self._condition:
            lines = list(self.lines.get(key, ()))
        found = []
        for t, line in lines:
            if after <= t < before:
                match = pattern.search(line)
                if match:
                    found.append((t, match))
        return found

    def waitFor(self, key: Any, pattern: "re.Pattern[str]", after: float, deadline: float) -> Optional[Tuple[float, "re.Match[str]"]]:
        """
        The first line of C{key} read at or after C{after} that matches,
        waiting until the monotonic C{deadline}.
        """
        checked = 0
        while True:
            with self._condition:
                lines = self.lines.get(key, [])
                for t, line in lines[checked:]:
                    if t >= after:
                        match = pattern.search(line)
                        if match:
                            return t, match
                checked = len(lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(min(remaining, 0.1))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        for entry in self._files.values():
            if entry[1] is not None:
                entry[1].close()


def waitForLog(path: str, files: int, deadline: float, epoch: Optional[int] = None) -> Optional[Tuple[float, int]]:
    """
    Poll peer_files.log every L{POLL} seconds until its header lists
    C{files} files in C{epoch} or a later one (any epoch if None); return
    the monotonic time when seen and that epoch, or None at C{deadline}.
    The log is replaced by rename, so a header seen is a whole file written.
    """
    while time.monotonic() < deadline:
        header = logHeader(path)
        if header.get("files") == files and (epoch is None or header.get("epoch", -1) >= epoch):
            return time.monotonic(), header["epoch"]
        time.sleep(POLL)
    return None


def sinceClaim(seen: Optional[Tuple[float, int]], elected: float, epoch: int) -> Tuple[Optional[float], Optional[Tuple[int, float]]]:
    """
    From what L{waitForLog} saw: the seconds from the claim of C{epoch} to
    its complete log (None if that epoch never had one), and C{(later
    epoch, seconds)} when the first complete log came only in a later one.
    """
    if seen is None:
        return None, None
    if seen[1] == epoch:
        return seen[0] - elected, None
    return None, (seen[1], seen[0] - elected)


# Status.


def askStatus(address: str, useCli: bool = False, timeout: float = 5.0) -> Optional[Dict[str, Any]]:
    """
    The status of the node at C{address}, or None when it does not answer
    in time, whatever the reason (refused, a TLS handshake timed out under
    load, a CLI error).
    """
    try:
        if useCli:
            return common.cliStatus(address, timeout=timeout)
        return common.directStatus(address, timeout=timeout)
    except Exception:
        return None


def waitAgreed(
    cluster: Cluster, ids: Optional[Sequence[int]] = None, expectLeader: Optional[int] = None, allAlive: bool = True, timeout: float = 30.0
) -> Tuple[int, int]:
    """
    Poll (in-process status client) until every node of C{ids} reports the
    same leader and epoch (see L{common.agreement}); return them.  Raises
    C{TimeoutError} after C{timeout}.
    """
    addresses = cluster.addresses(ids)
    deadline = time.monotonic() + timeout
    replies: List[Optional[Dict[str, Any]]] = []
    with ThreadPoolExecutor(max_workers=min(len(addresses), 16)) as pool:
        while time.monotonic() < deadline:
            replies = list(pool.map(askStatus, addresses))
            agreed = common.agreement(replies, expectLeader, allAlive)
            if agreed is not None:
                return agreed
            time.sleep(0.1)
    views = [None if r is None else (r["id"], r["leader"], r["epoch"]) for r in replies]
    raise TimeoutError(f"no agreement within {timeout:g} s: (id, leader, epoch) = {views}")


# Timer delays.


class TimerPoller:
    """
    Every C{interval} seconds, ask every running node for its status (the
    CLI or the in-process client) and keep its C{max_timer_delay}.  A node
    that has not answered since it was started is starting, not late: its
    silence is not recorded.
    """

    def __init__(self, targets: Callable[[], List[Tuple[str, str, int]]], interval: float, useCli: bool) -> None:
        self.targets = targets
        self.interval = interval
        self.useCli = useCli
        self.phase = "setup"
        # (time, phase, node, max_timer_delay or None when it did not answer)
        self.samples: List[Tuple[float, str, str, Optional[float]]] = []
        self._answered: set = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _one(self, address: str) -> Optional[float]:
        status = askStatus(address, self.useCli)
        try:
            return None if status is None else float(status["max_timer_delay"])
        except (KeyError, TypeError, ValueError):
            return None

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=12) as pool:
            while not self._stopping.wait(self.interval):
                try:
                    self._sweep(pool)
                except Exception:
                    # The poller must outlive any one sweep.
                    traceback.print_exc()

    def _sweep(self, pool: ThreadPoolExecutor) -> None:
        targets = self.targets()
        phase = self.phase
        delays = list(pool.map(self._one, [address for _, address, _ in targets]))
        now = time.monotonic()
        for (key, _, pid), delay in zip(targets, delays):
            if delay is not None:
                self._answered.add(pid)
            if pid in self._answered:
                self.samples.append((now, phase, key, delay))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)


def cliCpuPerCall(address: str, calls: int = 3) -> float:
    """
    CPU seconds (user + system) one C{p2pfiles status --json} process costs.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(calls):
        common.cliStatus(address, timeout=5.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / calls


# The run.


class Phase:
    """
    A named stretch of the run, and how many "leads epoch" lines it should
    bring.
    """

    def __init__(self, name: str, expectedLeads: int) -> None:
        self.name = name
        self.expectedLeads = expectedLeads
        self.start = time.monotonic()
        self.end = float("inf")


class ScaleRun:
    """
    The state of one run: the nodes, the log watcher, the poller, the
    phases, and what was measured.
    """

    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.root = root
        self.files = args.files
        self.watcher = LogWatcher()
        self.phases: List[Phase] = []
        self.clusters: List[Cluster] = []
        self.idle = Cluster(1, os.path.join(root, "idle"), peers="none")
        self.poller: Optional[TimerPoller] = None
        self.results: Dict[str, Any] = {}
        self.shareBytes: Dict[int, int] = {}
        self.shareFiles: Dict[int, int] = {}

    # Bookkeeping.

    @contextmanager
    def phase(self, name: str, expectedLeads: int) -> Iterator[Phase]:
        if self.phases and self.phases[-1].end == float("inf"):
            self.phases[-1].end = time.monotonic()
        phase = Phase(name, expectedLeads)
        self.phases.append(phase)
        if self.poller is not None:
            self.poller.phase = name
        try:
            yield phase
        finally:
            phase.end = time.monotonic()

    def running(self) -> List[Tuple[str, str, int]]:
        """
        (name, address, pid) of every node running now.
        """
        nodes = [(str(id), node) for cluster in self.clusters for id, node in sorted(cluster.nodes.items())]
        targets = []
        for key, node in nodes + [("idle", self.idle.nodes[1])]:
            process = node.process
            if process is not None and process.poll() is None:
                targets.append((key, node.address, process.pid))
        return targets

    def watchCluster(self, cluster: Cluster) -> None:
        for id, node in cluster.nodes.items():
            self.watcher.watch(id, node.log)

    def leadLines(self, after: float = 0.0, before: float = float("inf")) -> List[Tuple[float, int, int]]:
        """
        Every "node N leads epoch E" line of the cluster nodes: (time, N, E).
        """
        found = []
        for key in list(self.watcher.lines):
            if key == "idle":
                continue
            found += [(t, int(m.group(1)), int(m.group(2))) for t, m in self.watcher.find(key, LEADS, after, before)]
        return sorted(found)

    def stopCluster(self, cluster: Cluster, name: str) -> None:
        """
        Stop every node, largest id first (followers before the leader), so
        that no stop is a reason for anyone to claim; wait until the watcher
        has read their last lines.
        """
        with self.phase(f"stop {name}", 0):
            for id in sorted(cluster.nodes, reverse=True):
                cluster.stop(id)
            time.sleep(5 * POLL)

    # Phases.

    def measureBaselines(self, cluster: Cluster) -> None:
        for id, node in sorted(cluster.nodes.items()):
            seconds = median(baseline(node.share) for _ in range(3))
            self.results.setdefault("baseline", {})[id] = seconds
            files, size = self.shareFiles[id], self.shareBytes[id]
            print(
                f"  sha256sum on node {id}'s share (median of 3): {seconds:.2f} s, {files / seconds:,.0f} files/s, "
                f"{size / seconds / 1e6:.1f} MB/s",
                flush=True,
            )

    def coldStart(self, cluster: Cluster) -> None:
        """
        Start the nodes one after the other, each once the previous one has
        indexed its share; time each one's hashing.
        """
        deadlineEach = 120.0 + self.files / 500
        cold = self.results["cold"] = {}
        leader = cluster.nodes[1]
        with self.phase("cold start (one node at a time)", 1):
            sharedSoFar = 0
            for id in sorted(cluster.nodes):
                if sharedSoFar:
                    # The leader gathers what the previous node shares:
                    # the next one hashes once that is over, alone.
                    if waitForLog(leader.peerFilesLog, sharedSoFar, time.monotonic() + deadlineEach) is None:
                        raise TimeoutError(f"node 1's peer_files.log never listed {sharedSoFar} files; see {leader.log}")
                after = time.monotonic()
                cluster.start(id)
                started = time.monotonic()
                shared = self.watcher.waitFor(id, SHARING, after, started + deadlineEach)
                if shared is None:
                    raise TimeoutError(f"node {id} did not log 'sharing N files' within {deadlineEach:g} s; see {cluster.nodes[id].log}")
                up = self.watcher.waitFor(id, UP, after, started + 1.0)
                seconds = shared[0] - started
                count = int(shared[1].group(1))
                cold[id] = {"seconds": seconds, "count": count, "fromUp": None if up is None else shared[0] - up[0]}
                base = self.results["baseline"][id]
                files, size = self.shareFiles[id], self.shareBytes[id]
                print(
                    f"  node {id} cold: 'sharing {count} files' {seconds:.2f} s after its start "
                    f"({common.fmt(cold[id]['fromUp'], 2)} s after its 'up' line): {count / seconds:,.0f} files/s, "
                    f"{size / seconds / 1e6:.1f} MB/s; ratio to sha256sum {(files / seconds) / (files / base):.2f}",
                    flush=True,
                )
                if count != files:
                    print(f"  WARNING: node {id} shares {count} files, expected {files}")
                sharedSoFar += count
            total = sum(self.shareFiles[id] for id in cluster.nodes)
            done = waitForLog(leader.peerFilesLog, total, time.monotonic() + 120.0 + total / 5000)
            waitAgreed(cluster, expectLeader=1, timeout=60.0)
            print(f"  cold: node 1's peer_files.log lists all {total} files {common.fmt(None if done is None else done[0] - started, 2)} s after the last start", flush=True)

    def warmStart(self, cluster: Cluster, total: int, label: str) -> Dict[str, Any]:
        """
        Start every node together (hashes cached); time node 1's claim and
        its first complete peer_files.log.
        """
        leader = cluster.nodes[1]
        for node in cluster.nodes.values():
            if not os.path.exists(os.path.join(node.state, "hashcache.json")):
                raise RuntimeError(f"node {node.id} left no hashcache.json")
            if os.path.exists(node.peerFilesLog):
                os.unlink(node.peerFilesLog)
        timeout = 60.0 + total / 5000
        with self.phase(label, 1):
            after = time.monotonic()
            started = cluster.startAll()
            claim = self.watcher.waitFor(1, LEADS, after, started + timeout)
            if claim is None or int(claim[1].group(1)) != 1:
                raise TimeoutError(f"node 1 did not claim within {timeout:g} s; see {leader.log}")
            elected, epoch = claim[0], int(claim[1].group(2))
            full, later = sinceClaim(waitForLog(leader.peerFilesLog, total, started + timeout, epoch), elected, epoch)
            waitAgreed(cluster, expectLeader=1, timeout=timeout)
            time.sleep(5 * POLL)
            pulls = [(round(t - elected, 3), m.group(0)) for t, m in self.watcher.find(1, PULLED, after)]
            gathered = [m.group(0) for _, m in self.watcher.find(1, GATHERED, after)]
            sharing = {id: round(t - started, 2) for id in cluster.nodes for t, _ in self.watcher.find(id, SHARING, after)[:1]}
        return {
            "toElection": elected - started,
            "epoch": epoch,
            "full": full,
            "later": later,
            "pulls": pulls,
            "gathered": gathered,
            "sharing": sharing,
        }

    def currentLog(self, cluster: Cluster, total: int) -> int:
        """
        Wait until node 1 leads and its peer_files.log lists C{total} files
        in its current epoch; return that epoch.
        """
        epoch = waitAgreed(cluster, expectLeader=1, timeout=60.0)[1]
        if waitForLog(cluster.nodes[1].peerFilesLog, total, time.monotonic() + 60.0 + total / 5000, epoch) is None:
            raise TimeoutError(f"node 1's peer_files.log does not list {total} files in epoch {epoch}")
        return epoch

    def timeAdd(self, cluster: Cluster, follower: int, name: str, expected: int, epoch: int, timeout: float) -> Optional[float]:
        """
        Write C{name} into C{follower}'s share; return the seconds until
        node 1's peer_files.log lists it (its header shows C{expected}
        files in C{epoch}, and the name is in it).
        """
        path = cluster.nodes[1].peerFilesLog
        needle = f'"name": "{name}"'.encode()
        size = random.Random(name).randint(MIN_SIZE, MAX_SIZE)
        started = time.monotonic()
        fd = os.open(os.path.join(cluster.nodes[follower].share, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, os.urandom(size))
        finally:
            os.close(fd)

        def listed(path: str) -> bool:
            header = logHeader(path)
            if header.get("files") != expected or header.get("epoch") != epoch:
                return False
            with open(path, "rb") as f:
                return needle in f.read()

        when = common.waitForVersion(path, listed, started + timeout, poll=POLL)
        return None if when is None else when - started

    def killLeader(self, cluster: Cluster, expected: int) -> Dict[str, Any]:
        """
        SIGKILL node 1; time node 2's claim and its complete log; read what
        it gathered after claiming.
        """
        result: Dict[str, Any] = {}
        standby = cluster.nodes[2]
        result["standby"] = bool(self.watcher.find(2, re.compile("keeping the index as the standby")))
        with self.phase("SIGKILL of the leader", 1):
            killed = time.monotonic()
            cluster.signal(1, signal.SIGKILL)
            claim = self.watcher.waitFor(2, LEADS, killed, killed + 30.0)
            if claim is None:
                raise TimeoutError(f"node 2 did not claim within 30 s of the kill; see {standby.log}")
            elected, epoch = claim[0], int(claim[1].group(2))
            full, later = sinceClaim(waitForLog(standby.peerFilesLog, expected, elected + 60.0, epoch), elected, epoch)
            # Node 1 is still a member, and dead: agreement on the leader only.
            waitAgreed(cluster, ids=[2, 3], expectLeader=2, allAlive=False, timeout=30.0)
            time.sleep(5 * POLL)
            result.update(
                toElection=elected - killed,
                epoch=epoch,
                full=full,
                later=later,
                pulls=[(round(t - elected, 3), m.group(0)) for t, m in self.watcher.find(2, PULLED, killed)],
                gathered=[m.group(0) for _, m in self.watcher.find(2, GATHERED, killed)],
            )
            # Per other live member: what the new leader fetched after its claim.
            fetched: Dict[int, List[str]] = {3: []}
            for t, m in self.watcher.find(2, PULLED, elected):
                fetched.setdefault(int(m.group(2)), []).append(m.group(1))
            result["fetched"] = fetched
        return result

    def rejoin(self, cluster: Cluster, expected: int) -> Dict[str, Any]:
        with self.phase("restart of the killed leader", 1):
            cluster.stop(1)
            after = time.monotonic()
            cluster.start(1)
            started = time.monotonic()
            claim = self.watcher.waitFor(1, LEADS, after, started + 60.0)
            if claim is None:
                raise TimeoutError(f"node 1 did not claim again within 60 s; see {cluster.nodes[1].log}")
            elected, epoch = claim[0], int(claim[1].group(2))
            full, later = sinceClaim(
                waitForLog(cluster.nodes[1].peerFilesLog, expected, elected + 60.0 + expected / 5000, epoch), elected, epoch
            )
            waitAgreed(cluster, expectLeader=1, timeout=30.0)
            time.sleep(5 * POLL)
        return {
            "toElection": elected - started,
            "full": full,
            "later": later,
            "pulls": [(round(t - elected, 3), m.group(0)) for t, m in self.watcher.find(1, PULLED, after)],
        }

    def threeNodes(self) -> None:
        args = self.args
        cluster = Cluster(3, self.root, extraArgs=self.args.node_arg)
        self.clusters.append(cluster)
        self.watchCluster(cluster)
        print(f"  node 1: {' '.join(cluster.argv(1))}", flush=True)
        total = sum(self.shareFiles[id] for id in cluster.nodes)

        with self.phase("baseline (sha256sum)", 0):
            self.measureBaselines(cluster)
        self.coldStart(cluster)

        warms = self.results["warm"] = []
        for k in range(args.warm):
            self.stopCluster(cluster, f"before warm start {k + 1}")
            warm = self.warmStart(cluster, total, f"warm start {k + 1}")
            warms.append(warm)
            print(
                f"  warm start {k + 1}: node 1 claims epoch {warm['epoch']} {warm['toElection']:.2f} s after the last start; "
                f"complete peer_files.log ({total} files) {common.fmt(warm['full'])} s after the claim{laterText(warm)}; "
                f"'sharing' lines (s after the start): {warm['sharing']}",
                flush=True,
            )
            printLines(warm["pulls"], "node 1 log, {t:+.3f} s: {line}")
            printLines(warm["gathered"], "node 1 log: {line}")
        lines = dataLines(cluster.nodes[1].peerFilesLog)
        if lines != total:
            print(f"  WARNING: peer_files.log has {lines} data lines, expected {total}")

        epoch = self.currentLog(cluster, total)
        adds = self.results["adds"] = []
        rng = random.Random(7)
        with self.phase("added files", 0):
            for k in range(args.adds):
                time.sleep(rng.uniform(0.2, 1.2))
                follower = 2 + k % 2
                seconds = self.timeAdd(cluster, follower, f"added-{k}.dat", total + k + 1, epoch, 30.0)
                adds.append(seconds)
                print(f"  added file on node {follower}: in node 1's peer_files.log after {common.fmt(seconds)} s", flush=True)
            entries = total + len(adds)
            time.sleep(1.0)
            memory = {id: common.procStatus(node.pid) for id, node in cluster.nodes.items()}
            idleMemory = common.procStatus(self.idle.nodes[1].pid)
        self.results["memory"] = {"entries": entries, "nodes": memory, "idle": idleMemory}

        # Every add was on node 2 or 3, so all of them survive node 1.
        kill = self.results["kill"] = self.killLeader(cluster, entries - self.shareFiles[1])
        print(
            f"  SIGKILL of node 1: node 2 claims epoch {kill['epoch']} {kill['toElection']:.2f} s after the kill "
            f"(it kept the index as the standby: {kill['standby']}); its complete peer_files.log "
            f"({entries - self.shareFiles[1]} files) {common.fmt(kill['full'])} s after the claim{laterText(kill)}",
            flush=True,
        )
        printLines(kill["pulls"], "node 2 log, {t:+.3f} s from its claim: {line}")
        printLines(kill["gathered"], "node 2 log: {line}")
        rejoin = self.results["rejoin"] = self.rejoin(cluster, entries)
        print(
            f"  node 1 restarted: claims {rejoin['toElection']:.2f} s after its start; complete peer_files.log "
            f"({entries} files) {common.fmt(rejoin['full'])} s after the claim{laterText(rejoin)}",
            flush=True,
        )
        printLines(rejoin["pulls"], "node 1 log, {t:+.3f} s from its claim: {line}")
        self.stopCluster(cluster, "3 nodes")
        for node in cluster.nodes.values():
            removeAdded(node.share)

    def tenNodes(self) -> None:
        cluster = Cluster(10, self.root, extraArgs=self.args.node_arg)
        self.clusters.append(cluster)
        for node in cluster.nodes.values():
            # Cold again; the logs go on (their lines are already stamped).
            resetNode(node, logs=False)
        self.watchCluster(cluster)
        total = sum(self.shareFiles[id] for id in cluster.nodes)
        ten = self.results["ten"] = {"total": total}
        timeout = 120.0 + total / 5000
        leader = cluster.nodes[1]
        with self.phase("10 nodes: cold start", 1):
            started = cluster.startAll()
            sampler = common.RssSampler(leader.pid, interval=0.2)
            seen = waitForLog(leader.peerFilesLog, total, started + timeout)
            full = None if seen is None else seen[0]
            try:
                waitAgreed(cluster, expectLeader=1, timeout=max(1.0, started + timeout - time.monotonic()))
                converged = time.monotonic()
            except TimeoutError as e:
                print(f"  10 nodes cold: {e}")
                converged = None
            sampler.stop()
        ten["cold"] = None if full is None or converged is None else max(full, converged) - started
        ten["coldRss"] = (sampler.maxRss, sampler.maxHwm)
        print(
            f"  10 nodes cold ({total} files): complete log and agreement {common.fmt(ten['cold'], 2)} s after the last start; "
            f"leader VmRSS peak {sampler.maxRss / MiB:.0f} MiB",
            flush=True,
        )
        self.stopCluster(cluster, "10 nodes (cold)")
        try:
            warm = ten["warm"] = self.warmStart(cluster, total, "10 nodes: warm start")
        except TimeoutError as e:
            print(f"  10 nodes warm: {e}", flush=True)
            ten["converged"] = False
            self.stopCluster(cluster, "10 nodes")
            return
        time.sleep(1.0)
        ten["memory"] = common.procStatus(leader.pid)
        ten["idle"] = common.procStatus(self.idle.nodes[1].pid)
        ten["standby"] = common.procStatus(cluster.nodes[2].pid)
        print(
            f"  10 nodes warm: node 1 claims {warm['toElection']:.2f} s after the last start; complete peer_files.log "
            f"{common.fmt(warm['full'])} s after the claim{laterText(warm)}; leader VmRSS {ten['memory'].get('VmRSS', 0) / MiB:.0f} MiB, "
            f"VmHWM {ten['memory'].get('VmHWM', 0) / MiB:.0f} MiB",
            flush=True,
        )
        printLines(warm["gathered"], "node 1 log: {line}")
        ten["converged"] = ten["cold"] is not None and (warm["full"] is not None or warm["later"] is not None)
        self.stopCluster(cluster, "10 nodes")


def printLines(lines: Sequence[Any], form: str, most: int = 8) -> None:
    """
    Print the first C{most} of C{lines} (log lines, or C{(t, line)}), and
    how many more there were.
    """
    for item in lines[:most]:
        t, line = item if isinstance(item, tuple) else (0.0, item)
        print("    " + form.format(t=t, line=line))
    if len(lines) > most:
        print(f"    ... and {len(lines) - most} more such lines")


def laterText(result: Dict[str, Any]) -> str:
    later = result.get("later")
    if later is None:
        return ""
    return f" (that epoch never had one: leadership changed; complete in epoch {later[0]}, {later[1]:.2f} s after the claim)"


def extraLeads(run: ScaleRun, phases: Sequence[Phase]) -> Tuple[int, int]:
    """
    C{(lines seen, lines expected)} over C{phases}.
    """
    seen = sum(len(run.leadLines(p.start, p.end)) for p in phases)
    return seen, sum(p.expectedLeads for p in phases)


def report(run: ScaleRun) -> List[Figure]:
    results, F = run.results, run.files
    figures: List[Figure] = []

    # Hashing, cold.
    cold, base = results.get("cold", {}), results.get("baseline", {})
    if cold:
        rows = []
        ratios = []
        for id in sorted(cold):
            files, size = run.shareFiles[id], run.shareBytes[id]
            seconds = cold[id]["seconds"]
            ratio = (files / seconds) / (files / base[id])
            ratios.append(ratio)
            rows.append([id, files, size / 1e6, base[id], files / base[id], size / base[id] / 1e6, seconds, files / seconds, size / seconds / 1e6, ratio])
        print()
        common.printTable(
            ["node", "files", "MB", "sha256sum s", "files/s", "MB/s", "node s", "files/s", "MB/s", "ratio"], rows
        )
        figures.append(Figure(f"cold: node hashing rate / sha256sum rate, {F} files (median of 3 nodes)", median(ratios), "x", COLD_RATIO, kind="min"))
        figures.append(Figure("cold: node hashing, files/s (median)", median(r[7] for r in rows), "files/s", None))
        figures.append(Figure("cold: node hashing, MB/s (median)", median(r[8] for r in rows), "MB/s", None))
        figures.append(Figure("cold: sha256sum, files/s (median)", median(r[4] for r in rows), "files/s", None))

    # Warm elections.
    warms = results.get("warm", [])
    if warms:
        fulls = [float("inf") if w["full"] is None else w["full"] for w in warms]
        anyEpoch = [w["full"] if w["full"] is not None else w["later"][1] if w["later"] else float("inf") for w in warms]
        elections = [w["toElection"] for w in warms]
        total = 3 * F
        print()
        common.printTable(
            ["3 nodes, warm (seconds)", "n", "median", "max", "each", "target"],
            [
                ["last start -> node 1 claims", len(elections), median(elections), max(elections), " ".join(common.fmt(e, 2) for e in elections), "(info)"],
                [f"claim -> complete peer_files.log ({total})", len(fulls), median(fulls), max(fulls), " ".join(common.fmt(e, 2) for e in fulls), f"<= {WARM_FULL_LOG}"],
                ["claim -> first complete log, any epoch", len(anyEpoch), median(anyEpoch), max(anyEpoch), " ".join(common.fmt(e, 2) for e in anyEpoch), "(info)"],
            ],
        )
        figures.append(Figure(f"warm: election -> complete log, 3 x {F} (median of {len(fulls)})", median(fulls), "s", WARM_FULL_LOG))
        figures.append(Figure(f"warm: election -> complete log, 3 x {F} (max)", max(fulls), "s", None))

    # Adds.
    adds = results.get("adds", [])
    if adds:
        times = [float("inf") if a is None else a for a in adds]
        figures.append(Figure(f"added file on a follower -> in peer_files.log (median of {len(times)})", median(times), "s", ADDED_FILE))
        figures.append(Figure("added file on a follower -> in peer_files.log (max)", max(times), "s", None))

    # Memory.
    memory = results.get("memory")
    if memory:
        entries, idle = memory["entries"], memory["idle"].get("VmRSS", 0)
        rows = []
        for id, m in sorted(memory["nodes"].items()):
            role = " (leader)" if id == 1 else " (standby)" if id == 2 else ""
            rss = m.get("VmRSS", 0)
            rows.append([f"{id}{role}", rss / MiB, m.get("VmHWM", 0) / MiB, (rss - idle) / entries if id in (1, 2) else "-"])
        rows.append(["idle, empty share", idle / MiB, memory["idle"].get("VmHWM", 0) / MiB, "-"])
        print()
        common.printTable([f"3 nodes, {entries} entries", "VmRSS MiB", "VmHWM MiB", "bytes/entry over idle"], rows)
        leader = memory["nodes"][1]
        figures.append(Figure(f"leader VmRSS, {entries} entries", leader.get("VmRSS", 0) / MiB, "MiB", None))
        figures.append(Figure(f"leader VmHWM, {entries} entries", leader.get("VmHWM", 0) / MiB, "MiB", None))
        figures.append(Figure("idle node (empty share) VmRSS", idle / MiB, "MiB", None))
        figures.append(Figure("leader bytes per entry ((VmRSS - idle) / entries; 1/3 its own)", (leader.get("VmRSS", 0) - idle) / entries, "B", None))

    # Kill.
    kill = results.get("kill")
    if kill:
        full = float("inf") if kill["full"] is None else kill["full"]
        fetched = kill["fetched"]
        fulls = sum(kinds.count("all files") for kinds in fetched.values())
        figures.append(Figure("SIGKILL leader: kill -> new leader's claim", kill["toElection"], "s", None))
        figures.append(Figure(f"SIGKILL leader ({3 * F}+ entries): claim -> complete log", full, "s", KILL_FULL_LOG))
        figures.append(Figure("SIGKILL leader: full re-gathers ('all files from') after the claim", fulls, "", 0))
        what = "; ".join(
            f"node {m}: " + (", ".join(f"'{k} from'" for k in kinds) if kinds else "nothing (its copy was current)")
            for m, kinds in sorted(fetched.items())
        )
        print(f"\nnew leader (node 2) after its claim fetched: {what}; it kept the index as the standby before: {kill['standby']}")
    rejoin = results.get("rejoin")
    if rejoin:
        figures.append(Figure("restarted leader: claim -> complete log (full gather)", float("inf") if rejoin["full"] is None else rejoin["full"], "s", None))

    # Ten nodes.
    ten = results.get("ten")
    if ten:
        phases = [p for p in run.phases if p.name.startswith(("10 nodes", "stop 10 nodes"))]
        seen, expected = extraLeads(run, phases)
        infinite = float("inf")
        figures.append(Figure(f"10 nodes ({ten['total']} entries): converged, cold and warm (1 = yes)", 1 if ten.get("converged") else 0, "", 1, kind="min"))
        figures.append(Figure("10 nodes: cold start -> complete log and agreement", infinite if ten.get("cold") is None else ten["cold"], "s", None))
        figures.append(Figure("10 nodes: extra leadership changes", seen - expected, "", 0))
        warm = ten.get("warm")
        # The memory target is about a leader holding the whole index: not
        # judged when the index was never complete.
        whole = bool(ten.get("converged"))
        unjudged = "" if whole else " (the index was never complete: not judged)"
        if warm is not None:
            rss = ten["memory"].get("VmRSS", 0)
            figures.append(Figure("10 nodes: warm election -> complete log", infinite if warm["full"] is None else warm["full"], "s", None))
            figures.append(Figure(f"10 nodes: leader VmRSS after the warm start{unjudged}", rss / MiB, "MiB", TEN_RSS_MIB if whole else None))
            figures.append(Figure("10 nodes: leader VmHWM after the warm start", ten["memory"].get("VmHWM", 0) / MiB, "MiB", None))
            if whole:
                figures.append(Figure("10 nodes: leader bytes per entry over idle", (rss - ten["idle"].get("VmRSS", 0)) / ten["total"], "B", ENTRY_BYTES))
        if "coldRss" in ten:
            figures.append(Figure(f"10 nodes: leader VmRSS peak during the cold start{unjudged}", ten["coldRss"][0] / MiB, "MiB", None))

    # Leadership changes.
    rows = []
    for p in run.phases:
        lines = run.leadLines(p.start, p.end)
        claims = ", ".join(f"node {n} epoch {e}" for _, n, e in lines[:6]) + (f", ... ({len(lines) - 6} more)" if len(lines) > 6 else "")
        rows.append([p.name, len(lines), p.expectedLeads, len(lines) - p.expectedLeads, claims])
    covered = sum(len(run.leadLines(p.start, p.end)) for p in run.phases)
    allLines = run.leadLines()
    if len(allLines) != covered:
        rows.append(["(outside any phase)", len(allLines) - covered, 0, len(allLines) - covered, ""])
    print()
    common.printTable(["phase", "'leads epoch' lines", "expected", "extra", "claims"], rows)
    expected = sum(p.expectedLeads for p in run.phases)
    figures.append(Figure("extra leadership changes, whole run", len(allLines) - expected, "", 0))

    # Timer delays.
    samples = run.poller.samples if run.poller else []
    answered = [s for s in samples if s[3] is not None and s[2] != "idle"]
    if samples:
        rows = []
        for p in run.phases:
            mine = [s for s in samples if s[1] == p.name and s[2] != "idle"]
            got = [s[3] for s in mine if s[3] is not None]
            worst = max(mine, key=lambda s: s[3] or 0.0) if got else None
            silent = sorted({s[2] for s in mine if s[3] is None})
            rows.append([
                p.name, len(got), f"{len(mine) - len(got)} {' '.join(silent)}".strip(),
                median(got) * 1000 if got else None, max(got) * 1000 if got else None, worst[2] if worst else "-",
            ])
        idleGot = [s[3] for s in samples if s[2] == "idle" and s[3] is not None]
        rows.append(["(idle node, whole run)", len(idleGot), sum(1 for s in samples if s[2] == "idle" and s[3] is None), median(idleGot) * 1000 if idleGot else None, max(idleGot) * 1000 if idleGot else None, "idle"])
        print()
        common.printTable(["phase: max_timer_delay samples", "answered", "no answer (nodes)", "median ms", "max ms", "worst node"], rows)
        delays = [s[3] for s in answered]
        figures.append(Figure(f"max_timer_delay, all cluster nodes (median of {len(delays)})", median(delays) * 1000 if delays else None, "ms", TIMER_MEDIAN * 1000))
        figures.append(Figure("max_timer_delay, all cluster nodes (max)", max(delays) * 1000 if delays else None, "ms", TIMER_MAX * 1000))
        stopping = {p.name for p in run.phases if p.name.startswith("stop")}
        silent = sum(1 for s in samples if s[3] is None and s[2] != "idle" and s[1] not in stopping)
        figures.append(Figure("status polls a running node did not answer in 5 s (not while stopping)", silent, "", None))
    print()
    common.printFigures(figures)
    return figures


def main(argv: Optional[List[str]] = None) -> List[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="files per node (default 100000)")
    parser.add_argument("--quick", action="store_true", help="10,000 files per node")
    parser.add_argument("--dir", help="where the shares are made and kept (reused when they match); default a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (pass it as --dir next time)")
    parser.add_argument("--warm", type=int, default=3, help="warm starts timed (default 3)")
    parser.add_argument("--adds", type=int, default=5, help="added files timed (default 5)")
    parser.add_argument("--poll", choices=("cli", "direct"), default="cli", help="ask status with the CLI (default) or in-process")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between status sweeps (default 2)")
    parser.add_argument("--ten", action="store_true", help="also 10 nodes x FILES (10 x FILES + 1 entries)")
    parser.add_argument(
        "--node-arg", action="append", default=[], metavar="ARG",
        help="an extra argument for every cluster node's twistd p2pfiles, e.g. --node-arg=--scan-nice=0 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.files = 10_000
    if args.warm < 1 or args.files < 1:
        parser.error("--warm and --files must be at least 1")
    common.installSignalHandlers()
    began = time.monotonic()
    temporary = args.dir is None
    root = common.makeTempDir("scale") if temporary else os.path.abspath(args.dir)
    os.makedirs(root, exist_ok=True)
    run = ScaleRun(args, root)
    figures: List[Figure] = []
    try:
        import p2pfiles

        print(
            f"scale: {args.files:,} files of {MIN_SIZE}-{MAX_SIZE} random bytes per node; 3 nodes"
            f"{', then 10' if args.ten else ''}; {args.warm} warm starts, {args.adds} adds; "
            f"status {args.poll} every {args.poll_interval:g} s; in {root}",
            flush=True,
        )
        print(f"  p2pfiles {p2pfiles.__version__} from {os.path.dirname(p2pfiles.__file__)}; python {common.PYTHON}", flush=True)
        made = time.monotonic()
        for id in range(1, (10 if args.ten else 3) + 1):
            extra = 1 if id == 10 else 0
            share = os.path.join(root, f"node{id}", "share")
            os.makedirs(share, exist_ok=True)
            removeAdded(share)
            run.shareFiles[id], run.shareBytes[id] = makeShare(share, args.files, seed=id, extra=extra)
            resetNode(common.NodeProcess(id, 0, root))
        size = sum(run.shareBytes.values())
        print(f"  shares: {sum(run.shareFiles.values()):,} files, {size / MiB:.0f} MiB, ready in {time.monotonic() - made:.1f} s", flush=True)

        idle = run.idle.nodes[1]
        resetNode(idle)
        run.watcher.watch("idle", idle.log)
        run.idle.start(1)
        run.idle.waitListening(timeout=30.0)
        if args.poll == "cli":
            cpu = cliCpuPerCall(idle.address)
            print(f"  one 'p2pfiles status --json' costs {cpu:.2f} CPU-s: polling 4 nodes every {args.poll_interval:g} s "
                  f"uses about {4 * cpu / args.poll_interval:.2f} cores (3 nodes and the idle one)", flush=True)
        run.poller = TimerPoller(run.running, args.poll_interval, args.poll == "cli")

        print("\n3 nodes", flush=True)
        run.threeNodes()
        if args.ten:
            print("\n10 nodes", flush=True)
            run.tenNodes()
        with run.phase("end", 0):
            pass
    except Exception:
        # What was measured before the failure is still reported.
        traceback.print_exc()
        print("\nscale: FAILED (the figures below are those measured before the failure)", flush=True)
    finally:
        if run.poller is not None:
            run.poller.stop()
        for cluster in reversed(run.clusters):
            cluster.stopAll()
        run.idle.stopAll()
        common.stopAll()
        run.watcher.stop()
        for id in run.shareFiles:
            share = os.path.join(root, f"node{id}", "share")
            if os.path.isdir(share):
                removeAdded(share)
        if temporary and not args.keep:
            common.removeTree(root)
        elif temporary:
            print(f"\nkept {root} (reuse it with --dir {root})")
    figures = report(run)
    print(f"\n(scale took {time.monotonic() - began:.0f} s)")
    return figures


if __name__ == "__main__":
    main()
