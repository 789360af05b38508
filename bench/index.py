"""
How fast the leader's index (peer_files.log) fills and follows changes.

Setup: 3 real nodes (a --cluster file listing all), each sharing 10,000
files of 100 random bytes; node 2 also shares a 1 GiB file of random data
(real blocks, not sparse).  The nodes are started once so that every file is
hashed and the hashes are cached in each node's hashcache.json; that cold
start is timed too (informative).  Then, 3 times (--restarts): they are
stopped with SIGTERM, the old peer_files.log is removed, and all three are
started again, and:

  - election -> full index: the election is the moment the leader's twistd
    log gains its "node 1 leads epoch N" line (the log is tailed from its
    size before the restart, every 10 ms; the line is timestamped when read).
    The end is the moment peer_files.log, polled every 10 ms, has the header
    "# epoch: N" and "# files: 30001".  Target <= 1 s (median and max of
    the restarts).  Printed too: the time from the restart to the election,
    each version of peer_files.log seen on the way (its file count), and the
    leader's own "gathered ... in N ms" log lines.
then, after the last restart:
  - one added file: a 100-byte file is written into a follower's share
    (followers 2 and 3 alternately, 5 times); the time from just before the
    write to peer_files.log containing its name.  The leader's log is polled
    every 10 ms with stat(); it is read only when it was replaced.  Median of
    5; target <= 2 s.
  - the leader's VmRSS and VmHWM (/proc/PID/status) with the 30,000-entry
    index, after the above (the followers' too, for comparison).

Usage: .venv/bin/python bench/index.py [--files 10000] [--big-mib 1024] [--adds 5] [--restarts 3] [--quick]
"""

import argparse
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MiB, Cluster, Figure, dataLines, logHeader, median  # noqa: E402

# Targets.
FULL_INDEX = 1.0
ADDED_FILE = 2.0

POLL = 0.01


def makeShares(cluster: Cluster, files: int, bigMiB: int) -> int:
    """
    Fill the shares; return how many files the cluster shares in all.
    """
    for node in cluster.nodes.values():
        for k in range(files):
            with open(os.path.join(node.share, f"n{node.id}-{k:05d}.dat"), "wb") as f:
                f.write(os.urandom(100))
    common.writeRandomFile(os.path.join(cluster.nodes[2].share, f"big-{bigMiB}MiB.bin"), bigMiB * MiB)
    return files * len(cluster.nodes) + 1


def waitForFiles(
    path: str, count: int, timeout: float, epoch: Optional[int] = None, history: Optional[List[Tuple[float, int]]] = None
) -> Optional[float]:
    """
    Poll peer_files.log every 10 ms until its header lists C{count} files
    (in C{epoch}, if given); return the C{time.monotonic()} when seen.
    Each distinct file count seen on the way is appended to C{history} as
    C{(time, files)}.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        header = logHeader(path)
        now = time.monotonic()
        if history is not None and header.get("files") != last and (epoch is None or header.get("epoch") == epoch):
            last = header.get("files")
            history.append((now, last))
        if header.get("files") == count and (epoch is None or header.get("epoch") == epoch):
            return now
        time.sleep(POLL)
    return None


class LogTail:
    """
    The new lines of a growing text file, from its size when created.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.partial = ""

    def newLines(self) -> List[str]:
        try:
            with open(self.path, "r", errors="replace") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        data = self.partial + data
        lines = data.split("\n")
        self.partial = lines.pop()
        return lines


def restartAndTime(cluster: Cluster, total: int, timeout: float = 60.0) -> Dict[str, Any]:
    """
    Start every node; time the election (the leader's "leads epoch" log
    line) and the first peer_files.log listing all C{total} files in that
    epoch.
    """
    leader = cluster.nodes[1]
    tail = LogTail(leader.log)
    started = cluster.startAll()
    deadline = started + timeout
    elected = epoch = None
    lines: List[str] = []
    while time.monotonic() < deadline and elected is None:
        for line in tail.newLines():
            lines.append(line)
            match = re.search(r"node 1 leads epoch (\d+)", line)
            if match and elected is None:
                elected, epoch = time.monotonic(), int(match.group(1))
        if elected is None:
            time.sleep(POLL)
    if elected is None:
        raise TimeoutError(f"node 1 did not claim leadership within {timeout:g}s; see {leader.log}")
    history: List[Tuple[float, int]] = []
    full = waitForFiles(leader.peerFilesLog, total, deadline - time.monotonic(), epoch, history)
    # What the leader logged about the gather (after the election line).
    lines += tail.newLines()
    gathered = [line.split("] ", 1)[-1] for line in lines if "gathered" in line]
    return {
        "toElection": elected - started,
        "epoch": epoch,
        "electionToFull": None if full is None else full - elected,
        "writes": [(round(t - elected, 3), files) for t, files in history],
        "gathered": gathered,
    }


def timeAddedFile(cluster: Cluster, follower: int, name: str, timeout: float = 10.0) -> Optional[float]:
    """
    Write C{name} into C{follower}'s share; return the seconds until the
    leader's peer_files.log lists it (L{None} after C{timeout}).
    """
    path = cluster.nodes[1].peerFilesLog
    needle = f'"name": "{name}"'.encode()
    seen = common.versionOf(path)
    started = time.monotonic()
    with open(os.path.join(cluster.nodes[follower].share, name), "wb") as f:
        f.write(os.urandom(100))

    def listed(path: str) -> bool:
        with open(path, "rb") as f:
            return needle in f.read()

    when = common.waitForVersion(path, listed, started + timeout, seen, POLL)
    return None if when is None else when - started


def main(argv: Optional[List[str]] = None) -> List[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000, help="small files per node (default 10000)")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of node 2's big file in MiB (default 1024)")
    parser.add_argument("--adds", type=int, default=5, help="added-file repetitions (default 5)")
    parser.add_argument("--restarts", type=int, default=3, help="warm restarts timed (default 3)")
    parser.add_argument("--quick", action="store_true", help="1,000 files per node, a 64 MiB big file, 1 warm restart")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.big_mib, args.restarts = 1000, 64, 1
    common.installSignalHandlers()
    root = common.makeTempDir("index")
    cluster = Cluster(3, root)
    try:
        began = time.monotonic()
        total = makeShares(cluster, args.files, args.big_mib)
        print(f"index: {args.files} x 100 B files on each of 3 nodes + {args.big_mib} MiB on node 2 = {total} files "
              f"(written in {time.monotonic() - began:.1f} s)", flush=True)

        # Cold start: everything is hashed and the hashes are cached.
        started = cluster.startAll()
        leader = cluster.nodes[1]
        cold = waitForFiles(leader.peerFilesLog, total, timeout=600.0)
        if cold is None:
            raise TimeoutError(f"the leader never listed {total} files; see {leader.log}")
        coldSeconds = cold - started
        print(f"  cold start (hashing everything): {total} files listed {coldSeconds:.2f} s after the last start", flush=True)
        # Warm starts: hashes cached.
        warms = []
        for restart in range(args.restarts):
            cluster.stopAll()
            for node in cluster.nodes.values():
                if not os.path.exists(os.path.join(node.state, "hashcache.json")):
                    raise RuntimeError(f"node {node.id} left no hashcache.json")
            os.unlink(leader.peerFilesLog)
            warm = restartAndTime(cluster, total)
            warms.append(warm)
            print(
                f"  warm start {restart + 1}: election {warm['toElection']:.2f} s after the last start (epoch {warm['epoch']}); "
                f"full index {common.fmt(warm['electionToFull'])} s after the election",
                flush=True,
            )
            print(f"    peer_files.log versions seen (s after election, files): {warm['writes']}")
            for line in warm["gathered"]:
                print(f"    leader log: {line}")
        lines = dataLines(leader.peerFilesLog)
        if lines != total:
            print(f"  WARNING: peer_files.log has {lines} data lines, expected {total}")

        adds: List[Optional[float]] = []
        for k in range(args.adds):
            follower = 2 + k % 2
            seconds = timeAddedFile(cluster, follower, f"added-{k}.dat")
            adds.append(seconds)
            print(f"  added file on node {follower}: in the leader's log after {common.fmt(seconds)} s", flush=True)
            time.sleep(0.3)

        memory = {id: common.procStatus(node.pid) for id, node in cluster.nodes.items()}
    finally:
        cluster.stopAll()
        common.stopAll()
        common.removeTree(root)

    addTimes = [float("inf") if a is None else a for a in adds]
    fulls = [float("inf") if w["electionToFull"] is None else w["electionToFull"] for w in warms]
    elections = [w["toElection"] for w in warms]
    rows = [
        ["cold start: last start -> all files listed (hashing)", 1, coldSeconds, coldSeconds, "(info)"],
        ["warm start: last start -> 'leads epoch' log line", len(elections), median(elections), max(elections), "(info)"],
        [f"warm start: election -> peer_files.log lists all {total}", len(fulls), median(fulls), max(fulls), f"<= {FULL_INDEX} s"],
        ["added file on a follower -> in peer_files.log", len(addTimes), median(addTimes), max(addTimes), f"median <= {ADDED_FILE} s"],
    ]
    print()
    common.printTable(["figure (seconds)", "n", "median", "max", "target"], rows)
    print()
    common.printTable(
        ["node", "VmRSS MiB", "VmHWM MiB"],
        [[f"{id}{' (leader)' if id == 1 else ''}", m.get("VmRSS", 0) / MiB, m.get("VmHWM", 0) / MiB] for id, m in memory.items()],
    )
    figures = [
        Figure(f"index: election -> all {total} in peer_files.log (median)", median(fulls), "s", FULL_INDEX),
        Figure(f"index: election -> all {total} in peer_files.log (max)", max(fulls), "s", FULL_INDEX),
        Figure("index: added file -> in peer_files.log (median)", median(addTimes), "s", ADDED_FILE),
        Figure(f"index: leader VmRSS with {total} entries", memory[1].get("VmRSS", 0) / MiB, "MiB", None),
        Figure(f"index: leader VmHWM with {total} entries", memory[1].get("VmHWM", 0) / MiB, "MiB", None),
    ]
    print()
    common.printFigures(figures)
    return figures


if __name__ == "__main__":
    main()
