"""
Run every p2pfiles benchmark and print one summary table.

Runs bench/failover.py, bench/index.py and bench/transfer.py in this process
(each module's C{main} returns its figures; each cleans up its own processes
and directories), then prints: figure, target, measured, ratio (to the
baseline where there is one, else to the target) and PASS/MISS.  A benchmark
that fails is reported as ERROR and the others still run.

  .venv/bin/python bench/run.py            # full: about 2.5 minutes here
  .venv/bin/python bench/run.py --quick    # smoke run: about 25 seconds
  make bench BENCH_ARGS=--quick

Full: each script's defaults, but transfer with --rounds 5 (the machine is
noisy).  --quick: transfer 64 MiB x 1 round, index 1,000 files per node
(64 MiB big file, 1 warm restart), failover 2 rounds and 8 nodes.
"""

import argparse
import os
import sys
import time
import traceback
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import failover  # noqa: E402
import index  # noqa: E402
import transfer  # noqa: E402

BENCHMARKS = {
    "failover": failover.main,
    "index": index.main,
    "transfer": transfer.main,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the p2pfiles benchmarks and summarise them.")
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds, for a smoke run")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    common.installSignalHandlers()
    # Full runs: more rounds than each script's default where the machine's
    # noise calls for it (transfer), still well under 15 minutes in all.
    benchArgs = {
        "failover": ["--quick"] if args.quick else [],
        "index": ["--quick"] if args.quick else [],
        "transfer": ["--quick"] if args.quick else ["--rounds", "5"],
    }
    figures: List[common.Figure] = []
    errors: List[str] = []
    started = time.monotonic()
    try:
        for name in args.only.split(","):
            print(f"\n##### {name} {' '.join(benchArgs[name])}\n", flush=True)
            began = time.monotonic()
            try:
                figures.extend(BENCHMARKS[name](benchArgs[name]))
            except Exception as e:
                traceback.print_exc()
                errors.append(f"{name}: {e}")
            print(f"\n({name} took {time.monotonic() - began:.0f} s)", flush=True)
    finally:
        common.stopAll()
    print(f"\n##### summary ({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s)\n")
    rows = [f.row() for f in figures] + [[e, "-", "-", "-", "ERROR"] for e in errors]
    common.printTable(common.FIGURE_HEADERS, rows)
    missed = sum(1 for f in figures if f.passed is False)
    print(f"\n{sum(1 for f in figures if f.passed)} PASS, {missed} MISS, {len(errors)} ERROR")
    # Misses are results, not failures of the benchmark itself.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
