"""
A flood against the leader of a real 3-node cluster: how much memory it
costs the node, whether C{status} still answers, and whether the cluster
keeps its leader.

What is done, and how:

  - Three C{twistd -n p2pfiles} nodes (ids 1-3, a C{--cluster} file listing
    all); node 1 leads and shares C{--files} small files (20,000), so that
    an C{ls} answer is large (some 3 MB of frames).
  - Against node 1, all at once and held for C{--seconds} (30):
      - C{--idle} (500) TCP connections that never start TLS;
      - C{--trickle} (100) connections that send the first bytes of a TLS
        record announcing 16 KiB and then one random byte a second;
      - C{--ls} (300) authenticated connections (the real handshake, with
        the cluster secret: none here) that each send one C{ls} request
        and never read the answer.  Their receive buffer is set to 4 KiB
        (C{SO_RCVBUF}) before connecting, as a hostile reader would, so
        that the answers stay in the node rather than in the kernel.
    A connection the node closes (the idle and trickling ones are closed
    after the 5 s handshake timeout) is opened again at once, so the
    pressure holds throughout.  The idle and trickling connections run on
    an asyncio loop in a thread; the C{ls} connections are set up by a few
    threads with the blocking client of L{common.directConnect}.
  - Every client socket is bound to its own source address in
    127.0.0.0/8 (all loopback on Linux), at most 50 per address, so the
    per-address cap (C{--max-connections-per-address}, 64 by default) does
    not apply: the flood is what many hosts would send.  The total cap
    (C{--max-connections}, 512 by default) would refuse about 400 of the
    900 connections at connect time; the nodes of the first flood
    therefore run with C{--max-connections 1024}
    (C{--node-max-connections}) so that the whole flood reaches node 1, the
    harder case for its memory.
  - Meanwhile, every C{--interval} (0.5 s): C{status} of node 1, timed (the
    in-process client: the same TLS, handshake and request as C{p2pfiles
    status --json}, without the ~0.5 s of a Python start-up), and the
    status of nodes 2 and 3, whose leader and epoch (and node 1's) must
    never change.  Every 5 s one real C{p2pfiles status --json} is timed
    as well (informative).  VmRSS and VmHWM of node 1 are sampled all the
    while; VmHWM is reset when the flood starts (C{/proc/PID/clear_refs}),
    so that its peak is the flood's, not start-up's (which is reported on
    its own).  Before the flood the same status timings are taken as the
    baseline.
  - Then the same flood, for C{--default-seconds} (15), against a new
    cluster whose nodes run with the default C{--max-connections}: the
    node is full, and a legitimate C{status} (from 127.0.0.1, which holds
    few connections) must still get in, by taking the place of an
    unauthenticated flood connection.

Figures: peak RSS of node 1 during the flood (target <= 96 MiB), the
median status time during the flood (target <= 1 s) and its maximum, and
how many changes of leader or epoch any node reported (target 0); with the
default cap, how many status polls were refused (target 0).

Usage: .venv/bin/python bench/flood.py [--files 20000] [--idle 500] [--trickle 100] [--ls 300]
       [--seconds 30] [--node-max-connections 1024] [--default-seconds 15] [--keep]
"""

import argparse
import asyncio
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MiB, Cluster, Figure, median  # noqa: E402

# Targets.
PEAK_RSS = 96 * MiB
STATUS_MEDIAN = 1.0

# Most client connections bound to one source address (the node's
# per-address cap is 64 by default).
PER_SOURCE = 50

# The first bytes of a TLS record (handshake, TLS 1.0 header) announcing
# 16 KiB: a TLS layer waits for the rest.
RECORD_START = bytes([0x16, 0x03, 0x01, 0x40, 0x00])


def source(kind: int, index: int) -> str:
    """
    The source address of client C{index} of flood C{kind}: 127.KIND.A.B,
    L{PER_SOURCE} clients to one address.
    """
    group = index // PER_SOURCE
    return f"127.{kind}.{group // 250}.{group % 250 + 1}"


class Counts:
    """
    What the flood did, counted across threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened: Dict[str, int] = {"idle": 0, "trickle": 0, "ls": 0}
        self.closedByNode: Dict[str, int] = {"idle": 0, "trickle": 0, "ls": 0}
        self.failed: Dict[str, int] = {"idle": 0, "trickle": 0, "ls": 0}
        self.lsOpen = 0

    def add(self, table: Dict[str, int], kind: str) -> None:
        with self.lock:
            table[kind] += 1


async def holdRaw(host: str, port: int, src: str, kind: str, counts: Counts, stop: asyncio.Event, trickle: bool) -> None:
    """
    Keep one raw connection open (idle, or trickling garbage) until C{stop};
    open it again whenever the node closes it.
    """
    rng = random.Random()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
        except OSError:
            counts.add(counts.failed, kind)
            await asyncio.sleep(0.5)
            continue
        counts.add(counts.opened, kind)
        try:
            if trickle:
                writer.write(RECORD_START)
            while not stop.is_set():
                if trickle:
                    writer.write(bytes([rng.randrange(256)]))
                    await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if not data:
                    counts.add(counts.closedByNode, kind)
                    break
        except (OSError, ConnectionError):
            counts.add(counts.closedByNode, kind)
        finally:
            writer.close()
        await asyncio.sleep(0.05)


class RawFlood:
    """
    The idle and trickling connections, on an asyncio loop in a thread.
    """

    def __init__(self, address: str, idle: int, trickle: int, counts: Counts) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.idle = idle
        self.trickle = trickle
        self.counts = counts
        self.loop = asyncio.new_event_loop()
        self.stopEvent: Optional[asyncio.Event] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.stopEvent = asyncio.Event()
        tasks = [
            holdRaw(self.host, self.port, source(1, i), "idle", self.counts, self.stopEvent, False) for i in range(self.idle)
        ]
        tasks += [
            holdRaw(self.host, self.port, source(2, i), "trickle", self.counts, self.stopEvent, True)
            for i in range(self.trickle)
        ]
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self.stopEvent is not None:
            self.loop.call_soon_threadsafe(self.stopEvent.set)
        self.thread.join(10)


class ListingFlood:
    """
    C{ls} requests whose answers are never read, each on a connection of
    its own, set up by a few threads and held until C{stop}.
    """

    def __init__(self, address: str, count: int, counts: Counts, receiveBuffer: int = 4096) -> None:
        self.address = address
        self.count = count
        self.counts = counts
        self.receiveBuffer = receiveBuffer
        self.sockets: List[Any] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=8)

    def start(self) -> None:
        for i in range(self.count):
            self.pool.submit(self._open, i)

    def _open(self, index: int) -> None:
        from p2pfiles.wire import Message

        while not self.stopping.is_set():
            try:
                sock = common.directConnect(
                    self.address, timeout=10.0, source=source(3, index), receiveBuffer=self.receiveBuffer
                )
                common._sendMessage(sock, Message("ls"))
            except (OSError, ValueError, Exception):
                self.counts.add(self.counts.failed, "ls")
                time.sleep(0.5)
                continue
            self.counts.add(self.counts.opened, "ls")
            with self.lock:
                self.sockets.append(sock)
                self.counts.lsOpen = len(self.sockets)
            return

    def stop(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True)
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.close()
                except Exception:
                    pass
            self.sockets.clear()


def writeShare(path: str, count: int) -> None:
    """
    C{count} small distinct files, with names long enough to make a
    listing row of about 150 bytes.
    """
    for i in range(count):
        with open(os.path.join(path, f"flood-file-{i:06d}-of-a-large-listing.dat"), "wb") as f:
            f.write(b"%d\n" % i)


def timedStatus(address: str) -> Tuple[Optional[float], Optional[Dict[str, Any]]]:
    started = time.monotonic()
    try:
        status = common.directStatus(address, timeout=10.0)
    except (OSError, ValueError, Exception):
        return None, None
    return time.monotonic() - started, status


def timedCli(address: str) -> Optional[float]:
    started = time.monotonic()
    try:
        common.cliStatus(address, timeout=10.0)
    except (OSError, ValueError, Exception):
        return None
    return time.monotonic() - started


def waitIndexed(address: str, files: int, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    count = -1
    while time.monotonic() < deadline:
        try:
            count = common.directListingCount(address)
        except (OSError, ValueError, Exception):
            count = -1
        if count >= files:
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"node 1 lists {count} of {files} files after {timeout:g}s")


def resetPeak(pid: int) -> bool:
    """
    Reset C{pid}'s VmHWM to its present RSS (Linux: C{5} into
    C{/proc/PID/clear_refs}), so that the VmHWM read later is the peak of
    what came after, not of start-up; False if it cannot be done.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class FloodResult:
    """
    What one flood did to node 1 and the cluster.
    """

    def __init__(self) -> None:
        self.counts = Counts()
        self.lsOpen = 0
        self.before: Dict[str, int] = {}
        self.after: Dict[str, int] = {}
        self.peakReset = False
        self.peak = 0
        self.latencies: List[Optional[float]] = []
        self.cliLatencies: List[Optional[float]] = []
        self.views: Dict[int, set] = {1: set(), 2: set(), 3: set()}
        self.unanswered = {1: 0, 2: 0, 3: 0}
        self.leader: Any = None
        self.epoch: Any = None
        self.indexed = 0.0
        self.baseline: List[Optional[float]] = []
        self.baselineCli: List[Optional[float]] = []
        self.finalViews: List[Any] = []
        self.alive = False

    @property
    def answered(self) -> List[float]:
        return [l for l in self.latencies if l is not None]

    @property
    def changes(self) -> int:
        return sum(len(v - {(self.leader, self.epoch)}) for v in self.views.values())


def flood(args: argparse.Namespace, maxConnections: Optional[int], seconds: float, timeCli: bool) -> FloodResult:
    """
    Start a cluster (node 1 with C{--max-connections maxConnections}, or
    the default if None), flood node 1 for C{seconds} and say what
    happened.
    """
    result = FloodResult()
    root = common.makeTempDir("flood")
    extra = [] if maxConnections is None else ["--max-connections", str(maxConnections)]
    cluster = Cluster(3, root, extraArgs=extra)
    raw: Optional[RawFlood] = None
    listings: Optional[ListingFlood] = None
    try:
        print(f"writing {args.files} files into node 1's share ...", flush=True)
        writeShare(cluster.nodes[1].share, args.files)
        cluster.startAll()
        cluster.waitListening()
        result.leader, result.epoch, _ = cluster.waitConverged(expectLeader=1, useCli=False, timeout=60)
        result.indexed = waitIndexed(cluster.nodes[1].address, args.files, timeout=300)
        print(
            f"cluster agreed on leader {result.leader} in epoch {result.epoch}; "
            f"{args.files} files listed after {result.indexed:.1f}s",
            flush=True,
        )
        pid = cluster.nodes[1].pid
        addresses = cluster.addresses()
        result.baseline = [timedStatus(addresses[0])[0] for _ in range(10)]
        if timeCli:
            result.baselineCli = [timedCli(addresses[0]) for _ in range(3)]
        result.before = common.procStatus(pid)
        result.peakReset = resetPeak(pid)
        sampler = common.RssSampler(pid, interval=0.05)
        counts = result.counts
        raw = RawFlood(addresses[0], args.idle, args.trickle, counts)
        listings = ListingFlood(addresses[0], args.ls, counts)
        limit = "default" if maxConnections is None else str(maxConnections)
        print(
            f"flooding node 1 (--max-connections {limit}) for {seconds:g}s: "
            f"{args.idle} idle, {args.trickle} trickling, {args.ls} unread ls",
            flush=True,
        )
        started = time.monotonic()
        raw.start()
        listings.start()
        nextCli = started + 5
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            if sampler.maxRss > args.rss_abort * MiB:
                print(f"node 1 passed {args.rss_abort} MiB: flood stopped early, after {tick - started:.1f}s", flush=True)
                break
            latency, status = timedStatus(addresses[0])
            result.latencies.append(latency)
            for node, address in zip((1, 2, 3), addresses):
                if node != 1:
                    _, status = timedStatus(address)
                if status is None:
                    result.unanswered[node] += 1
                else:
                    result.views[node].add((status["leader"], status["epoch"]))
            if timeCli and tick >= nextCli:
                result.cliLatencies.append(timedCli(addresses[0]))
                nextCli = tick + 5
            time.sleep(max(0.0, args.interval - (time.monotonic() - tick)))
        result.lsOpen = counts.lsOpen
        result.after = common.procStatus(pid)
        sampler.stop()
        raw.stop()
        listings.stop()
        raw = listings = None
        result.peak = max(result.after.get("VmHWM", 0), sampler.maxHwm if result.peakReset else 0, sampler.maxRss)
        result.finalViews = common.statuses(addresses, useCli=True, timeout=10)
        result.alive = cluster.nodes[1].process is not None and cluster.nodes[1].process.poll() is None
        return result
    finally:
        if raw is not None:
            raw.stop()
        if listings is not None:
            listings.stop()
        cluster.stopAll()
        common.stopAll()
        if not args.keep:
            common.removeTree(root)
        else:
            print(f"kept {root}")


def report(result: FloodResult, args: argparse.Namespace) -> None:
    counts = result.counts
    common.printTable(
        ["flood", "opened", "closed by node", "failed to open"],
        [[k, counts.opened[k], counts.closedByNode[k], counts.failed[k]] for k in ("idle", "trickle", "ls")],
    )
    print(f"ls connections open at the end of the flood: {result.lsOpen} of {args.ls}")
    print(
        f"node 1 RSS: {result.before.get('VmRSS', 0) / MiB:.1f} MiB before the flood "
        f"(VmHWM {result.before.get('VmHWM', 0) / MiB:.1f} MiB since start-up), "
        f"peak during the flood {result.peak / MiB:.1f} MiB"
        f"{'' if result.peakReset else ' (VmHWM could not be reset: includes start-up)'}, "
        f"VmRSS at the end {result.after.get('VmRSS', 0) / MiB:.1f} MiB"
    )
    print(f"status of node 1: {len(result.answered)} of {len(result.latencies)} answered during the flood")
    print("leader/epoch seen: " + "; ".join(f"node {n}: {sorted(v)}" for n, v in result.views.items()))
    print(f"unanswered status polls per node: {result.unanswered}")
    print(
        "after the flood: "
        + "; ".join(
            "-" if s is None else f"node {s['id']}: leader {s['leader']} epoch {s['epoch']}" for s in result.finalViews
        )
    )


def run(args: argparse.Namespace) -> int:
    common.installSignalHandlers()
    main = flood(args, args.node_max_connections, args.seconds, timeCli=True)
    print()
    report(main, args)
    default: Optional[FloodResult] = None
    if args.default_seconds > 0:
        print()
        default = flood(args, None, args.default_seconds, timeCli=False)
        print()
        report(default, args)
    print()
    timed = [10.0 if l is None else l for l in main.latencies]
    cli = [c for c in main.cliLatencies if c is not None]
    figures = [
        Figure("node 1 peak RSS during the flood", main.peak / MiB, "MiB", PEAK_RSS / MiB, note="VmHWM reset at its start"),
        Figure("node 1 RSS before the flood", main.before.get("VmRSS", 0) / MiB, "MiB", None),
        Figure("node 1 VmHWM before the flood", main.before.get("VmHWM", 0) / MiB, "MiB", None, note="start-up"),
        Figure("status median during the flood", median(timed) if timed else None, "s", STATUS_MEDIAN),
        Figure("status max during the flood", max(timed) if timed else None, "s", None),
        Figure("status median before the flood", median([b for b in main.baseline if b is not None]), "s", None),
        Figure("p2pfiles status --json median (CLI)", median(cli) if cli else None, "s", None),
        Figure("status polls unanswered (10 s timeout)", float(len(main.latencies) - len(main.answered)), "", None),
        Figure("leader/epoch changes on any node", float(main.changes), "", 0),
        Figure("node 1 still running", 1.0 if main.alive else 0.0, "", 1, kind="min"),
    ]
    if default is not None:
        refused = len(default.latencies) - len(default.answered)
        figures += [
            Figure(
                "status polls refused, default --max-connections",
                float(refused),
                "",
                0,
                note=f"of {len(default.latencies)}",
            ),
            Figure(
                "status median, default --max-connections",
                median([10.0 if l is None else l for l in default.latencies]) if default.latencies else None,
                "s",
                STATUS_MEDIAN,
            ),
            Figure("node 1 peak RSS, default --max-connections", default.peak / MiB, "MiB", None),
            Figure("leader/epoch changes, default --max-connections", float(default.changes), "", 0),
        ]
    common.printFigures(figures)
    return 0 if all(f.passed is not False for f in figures) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--trickle", type=int, default=100)
    parser.add_argument("--ls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--node-max-connections", type=int, default=1024)
    parser.add_argument(
        "--default-seconds",
        type=float,
        default=15.0,
        help="then flood a new cluster with the default --max-connections this long (0: not at all)",
    )
    parser.add_argument("--rss-abort", type=int, default=1536, help="stop the flood early past this RSS of node 1 (MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' directories and logs")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
