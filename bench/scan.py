"""
How fast a node indexes its own share (L{p2pfiles.localindex.LocalIndex}),
against C{sha256sum} on the same files, and how long the reactor is held up
while it does.

Setup: --files (100,000) files of random bytes, each of a random size from 1
to 8 KiB, written once into a temporary directory (removed at the end).  Then
--rounds (3) times:

  - baseline: C{find SHARE -type f -print0 | xargs -0 sha256sum > /dev/null},
    timed: files per second.
  - cold scan: a L{LocalIndex} over the share with an empty state directory
    (no hash cache), on the real reactor with its thread pool; the time from
    C{start()} to its Deferred firing: files per second, and its ratio to the
    baseline of the same round (target >= 0.8).  The index is then stopped,
    which waits for C{hashcache.json} to be written.
  - warm restart: a second index over the same share and state directory,
    C{start()} timed (the hash cache is read from C{hashcache.json}).
  - warm rescan: C{rescan()} on that running index (every hash in the cache).

During each index phase (the cold one until its cache write is done) a 10 ms
C{LoopingCall} runs on the reactor and records the longest gap between two of
its calls: the longest stall of the reactor (a gap of 10 ms is no stall at
all).  The longest full pass of the garbage collector meanwhile is printed
beside it: such a pass holds the GIL for its whole length, whichever thread
runs it, and its length grows with the objects alive in the process.  The
same gap is measured over 2 s of an idle reactor, for the noise floor of a
shared machine.  The figures are medians over the rounds.

Both readers find the files in the page cache (they were just written, and
each round reads them all): this compares CPU cost per file, not the disk.
The benchmark imports p2pfiles from this checkout (not the installed copy),
so that it measures the code beside it.  It runs the global reactor, so it
runs once per process.

Usage: .venv/bin/python bench/scan.py [--files 100000] [--rounds 3] [--quick] [--worker NICE]
"""

import argparse
import gc
import os
import random
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
from common import Figure, median  # noqa: E402

# Target: cold hashing rate relative to sha256sum over the same files.
COLD_RATIO = 0.8

TICK = 0.01

PHASES = ("cold", "restart", "warm")

# Seconds of an idle reactor measured each round, for the noise floor.
IDLE = 2.0


def makeShare(path: str, files: int, seed: int = 1) -> int:
    """
    Write C{files} files of 1-8 KiB of random bytes; return the bytes written.
    """
    sizes = random.Random(seed)
    total = 0
    for k in range(files):
        size = sizes.randint(1024, 8192)
        with open(os.path.join(path, f"f{k:06d}.dat"), "wb") as f:
            f.write(os.urandom(size))
        total += size
    return total


def baseline(share: str) -> float:
    """
    Seconds for C{find | xargs sha256sum} to hash every file in C{share}.
    """
    started = time.monotonic()
    subprocess.run(
        f"find {share} -type f -print0 | xargs -0 sha256sum > /dev/null",
        shell=True, check=True,
    )
    return time.monotonic() - started


class StallMeter:
    """
    A C{LoopingCall} every L{TICK} seconds that remembers the longest gap
    between two of its calls, and the longest full (generation 2) pass of
    the garbage collector meanwhile, which holds the GIL throughout.
    """

    def __init__(self, reactor: Any) -> None:
        from twisted.internet.task import LoopingCall

        self.longest = 0.0
        self.longestCollection = 0.0
        self._last = time.monotonic()
        self._collecting = 0.0
        self._call = LoopingCall(self._tick)
        self._call.clock = reactor

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self._last)
        self._last = now

    def _collection(self, phase: str, info: Dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._collecting = time.monotonic()
        else:
            self.longestCollection = max(self.longestCollection, time.monotonic() - self._collecting)

    def start(self) -> None:
        self.longest = self.longestCollection = 0.0
        self._last = time.monotonic()
        gc.callbacks.append(self._collection)
        self._call.start(TICK, now=False)

    def stop(self) -> Dict[str, float]:
        self._tick()
        self._call.stop()
        gc.callbacks.remove(self._collection)
        return {"stall": self.longest, "gc": self.longestCollection}


async def indexPhases(reactor: Any, share: str, state: str, worker: Optional[int] = None) -> Dict[str, Any]:
    """
    Cold scan, warm restart and warm rescan of an index over C{share}, with
    a new state directory C{state}.  Each phase is timed until its Deferred
    fires; its stall figures run on until what it started (the hash cache
    write after a cold scan) is done.  With C{worker} (a niceness), the
    files are hashed in a child process at that niceness, as a node does.
    """
    from twisted.python.filepath import FilePath

    from p2pfiles.localindex import LocalIndex
    from p2pfiles.scanworker import ProcessObserver

    observer = None if worker is None else ProcessObserver(worker)

    meter = StallMeter(reactor)
    result: Dict[str, Any] = {}

    index = LocalIndex(FilePath(share), FilePath(state), reactor, observer=observer)
    meter.start()
    started = time.monotonic()
    await index.start()
    seconds = time.monotonic() - started
    result["files"] = len(index.entries)
    await index.stop()  # waits for hashcache.json to be written
    result["cold"] = dict(meter.stop(), seconds=seconds)
    del index  # a node holds one index: let the full GC passes below see one


    again = LocalIndex(FilePath(share), FilePath(state), reactor, observer=observer)
    meter.start()
    started = time.monotonic()
    await again.start()
    result["restart"] = dict(meter.stop(), seconds=time.monotonic() - started)

    meter.start()
    started = time.monotonic()
    await again.rescan()
    result["warm"] = dict(meter.stop(), seconds=time.monotonic() - started)
    await again.stop()
    if observer is not None:
        observer.close()
    return result


async def measure(reactor: Any, args: argparse.Namespace, share: str, root: str) -> List[Dict[str, Any]]:
    from twisted.internet.task import deferLater

    rounds = []
    for k in range(args.rounds):
        r: Dict[str, Any] = {"baseline": baseline(share)}
        # The noise floor: the longest gap while the reactor has nothing to do.
        meter = StallMeter(reactor)
        meter.start()
        await deferLater(reactor, IDLE, lambda: None)
        r["idle"] = meter.stop()
        r.update(await indexPhases(reactor, share, os.path.join(root, f"state-{k}"), args.worker))
        baseRate = args.files / r["baseline"]
        rate = args.files / r["cold"]["seconds"]
        print(
            f"  round {k + 1}: sha256sum {baseRate:,.0f} files/s ({r['baseline']:.2f} s); "
            f"cold scan {rate:,.0f} files/s ({r['cold']['seconds']:.2f} s, ratio {rate / baseRate:.2f}); "
            f"warm restart {r['restart']['seconds']:.2f} s; warm rescan {r['warm']['seconds']:.2f} s\n"
            f"    longest reactor stall (longest full GC pass), ms: "
            + "; ".join(f"{p} {r[p]['stall'] * 1000:.0f} ({r[p]['gc'] * 1000:.0f})" for p in PHASES),
            flush=True,
        )
        if r["files"] != args.files:
            print(f"  WARNING: the index listed {r['files']} files, expected {args.files}")
        rounds.append(r)
    return rounds


def main(argv: Optional[List[str]] = None) -> List[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10,000 files, 1 round")
    parser.add_argument(
        "--worker", type=int, metavar="NICE", help="hash in a child process at this niceness, as a node does (default: in the scan thread)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.rounds = 10_000, 1

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    common.installSignalHandlers()
    root = common.makeTempDir("scan")
    outcome: Dict[str, Any] = {}
    try:
        share = os.path.join(root, "share")
        os.makedirs(share)
        started = time.monotonic()
        size = makeShare(share, args.files)
        print(f"scan: {args.files:,} files, {size / common.MiB:.0f} MiB, written in {time.monotonic() - started:.1f} s", flush=True)

        def run() -> None:
            d = Deferred.fromCoroutine(measure(reactor, args, share, root))
            d.addBoth(lambda result: (outcome.__setitem__("result", result), reactor.stop()))

        reactor.callWhenRunning(run)
        reactor.run(installSignalHandlers=False)
    finally:
        common.removeTree(root)
    rounds = outcome.get("result")
    if not isinstance(rounds, list):
        raise SystemExit(f"scan benchmark failed: {rounds}")

    files = args.files

    def m(phase: str, what: str) -> float:
        return median(r[phase][what] for r in rounds)

    baseRate = median(files / r["baseline"] for r in rounds)
    ratio = median((files / r["cold"]["seconds"]) / (files / r["baseline"]) for r in rounds)
    rows = [["sha256sum (find | xargs)", len(rounds), baseRate, median(r["baseline"] for r in rounds), "-", "-"]]
    for phase, name in [
        ("cold", "cold scan (no hash cache)"),
        ("restart", "warm restart (hashcache.json)"),
        ("warm", "warm rescan (cache in memory)"),
        ("idle", "idle reactor (noise floor)"),
    ]:
        seconds = IDLE if phase == "idle" else m(phase, "seconds")
        rate = "-" if phase == "idle" else files / seconds
        rows.append([name, len(rounds), rate, seconds, m(phase, "stall") * 1000, m(phase, "gc") * 1000])
    print()
    common.printTable(
        ["phase (medians)", "n", "files/s", "seconds", "longest stall ms", "longest full GC ms"], rows
    )
    figures = [
        Figure(f"scan: cold rate / sha256sum rate, {files} files (median)", ratio, "x", COLD_RATIO, kind="min"),
        Figure("scan: cold rate", files / m("cold", "seconds"), "files/s", None),
        Figure("scan: warm restart", m("restart", "seconds"), "s", None),
        Figure("scan: warm rescan", m("warm", "seconds"), "s", None),
        Figure("scan: longest reactor stall, any phase (median)",
               median(max(r[p]["stall"] for p in PHASES) for r in rounds) * 1000, "ms", None),
        Figure("scan: longest reactor stall, idle (median)", m("idle", "stall") * 1000, "ms", None),
    ]
    print()
    common.printFigures(figures)
    return figures


if __name__ == "__main__":
    main()
