"""
File transfer throughput and memory, against a plain HTTP baseline.

For each size (default 256 and 1024 MiB) a FRESH 2-node cluster is started,
so that the leader's VmHWM (a high-water mark since process start) is a
per-size figure:

  - node 1 (the leader: smallest id) shares local-SIZE.bin,
  - node 2 (the holder) shares remote-SIZE.bin,

both random data (real blocks, not sparse).  The baseline serves a hard link
of local-SIZE.bin with C{python -m http.server --bind 127.0.0.1 PORT
--directory DIR}.  Then, in each round, in an order rotated per round so
that no method always runs first:

  - baseline: C{curl -s -o OUT http://127.0.0.1:PORT/local-SIZE.bin}
    (skipped, with no ratio, if curl is missing);
  - rsync:    C{rsync --fsync rsync://127.0.0.1:PORT/files/local-SIZE.bin OUT}
    from an C{rsync --daemon} on loopback: plaintext, like curl, but it
    checksums and fsyncs as p2pfiles does (skipped if rsync is missing);
  - local:    C{p2pfiles get local-SIZE.bin --node LEADER -o OUT --json}
    (the leader streams its own file);
  - relay:    C{p2pfiles get remote-SIZE.bin --node LEADER -o OUT --json}
    (the leader relays from node 2 as the bytes arrive).

Each is timed from C{Popen} to exit (so the client's start-up counts, as it
does for a user), and MiB/s = size / wall time; medians over the rounds.
p2pfiles verifies the SHA-256 and fsyncs before renaming the file into
place, curl does neither: the fsync the baseline skipped is timed after each
curl run and shown beside it (informative).  Outputs are deleted after each
run; the page cache is not dropped (the sources stay cached: this measures
the network path, not the disk).

Memory: while each get runs, /proc/PID/status of the client, the leader and
the holder is sampled every 20 ms (peak VmRSS and VmHWM).  The leader's
VmHWM at the end of the size's runs is its peak since start, i.e. for that
size.  Targets: local >= 1.0x baseline throughput, relay >= 0.8x; relay
>= 0.8x C{rsync --fsync}; leader and client peak <= 64 MiB; flat: at the
largest size no more than 10% above the smallest size.  Every p2pfiles
connection is TLS; curl and rsync are plaintext, measured in the same run.

C{--profile} instead runs one local get and one relayed get with the client,
the leader and the holder under cProfile, and prints where the time goes.
C{--perf} runs one relayed get with C{perf record} (user mode) on each of
the three processes and prints, per process, user and system CPU seconds
against the wall time, and the user time by group (TLS cipher, SHA-256,
copies, allocation, OpenSSL's record layer, the Python interpreter).

Usage: .venv/bin/python bench/transfer.py [--sizes 256,1024] [--rounds 3] [--quick] [--profile] [--perf]
"""

import argparse
import json
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MiB, P2PFILES, PYTHON, Cluster, Figure, RssSampler, median  # noqa: E402

# Targets.
LOCAL_RATIO = 1.0
RELAY_RATIO = 0.8
RSS_LIMIT_MIB = 64.0
FLAT_GROWTH = 0.10

METHODS = ("baseline", "rsync", "local", "relay")
RSYNC_RATIO = 0.8


def available(method: str) -> bool:
    return {"baseline": shutil.which("curl"), "rsync": shutil.which("rsync")}.get(method, True) is not None

PROFILED_TWISTD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiled_twistd.py")


class Setup:
    """
    One size's cluster, files and HTTP server.
    """

    def __init__(self, sizeMiB: int, root: str, leaderPrefix: List[str] = (), holderPrefix: List[str] = ()) -> None:
        self.size = sizeMiB * MiB
        self.root = root
        self.local = f"local-{sizeMiB}.bin"
        self.remote = f"remote-{sizeMiB}.bin"
        self.out = os.path.join(root, "out")
        self.httpDir = os.path.join(root, "http")
        os.makedirs(self.out)
        os.makedirs(self.httpDir)
        self.cluster = Cluster(2, os.path.join(root, "cluster"))
        self.leader = self.cluster.nodes[1]
        self.holder = self.cluster.nodes[2]
        common.writeRandomFile(os.path.join(self.leader.share, self.local), self.size)
        common.writeRandomFile(os.path.join(self.holder.share, self.remote), self.size)
        os.link(os.path.join(self.leader.share, self.local), os.path.join(self.httpDir, self.local))
        self.httpPort = common.freePort()
        self.http: Optional[subprocess.Popen] = None
        self.rsyncPort = common.freePort()
        self.rsync: Optional[subprocess.Popen] = None
        self.leaderPrefix = list(leaderPrefix)
        self.holderPrefix = list(holderPrefix)

    def start(self) -> None:
        self.cluster.start(1, self.leaderPrefix)
        self.cluster.start(2, self.holderPrefix)
        self.cluster.waitListening()
        self.cluster.waitConverged(expectLeader=1, useCli=True, timeout=30.0)
        # Both files hashed and in the leader's index.
        deadline = time.monotonic() + 300.0
        while time.monotonic() < deadline:
            try:
                with open(self.leader.peerFilesLog, "rb") as f:
                    if b"# files: 2\n" in f.read(1024):
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        else:
            raise TimeoutError("the leader's index never listed both files")
        if shutil.which("curl"):
            with open(os.path.join(self.root, "http.log"), "ab") as log:
                self.http = common.spawn(
                    [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(self.httpPort), "--directory", self.httpDir],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if not common.waitForPort(self.httpPort, time.monotonic() + 15.0):
                raise TimeoutError("http.server did not start")
        if available("rsync"):
            config = os.path.join(self.root, "rsyncd.conf")
            with open(config, "w") as f:
                f.write(
                    f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                    f"pid file = {os.path.join(self.root, 'rsyncd.pid')}\n"
                    f"[files]\npath = {self.httpDir}\nread only = yes\n"
                )
            with open(os.path.join(self.root, "rsync.log"), "ab") as log:
                self.rsync = common.spawn(
                    ["rsync", "--daemon", "--no-detach", f"--config={config}", "--address=127.0.0.1", f"--port={self.rsyncPort}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if not common.waitForPort(self.rsyncPort, time.monotonic() + 15.0):
                raise TimeoutError("rsync --daemon did not start")

    def stop(self) -> None:
        for server in (self.http, self.rsync):
            if server is not None:
                common.stopProcess(server)
        self.cluster.stopAll()

    def command(self, method: str, output: str, prefix: List[str] = ()) -> List[str]:
        """
        The download command; with a C{prefix} (e.g. C{python -m cProfile
        -o F}) the client runs as C{PREFIX -m p2pfiles ...}.
        """
        if method == "baseline":
            return ["curl", "-s", "-o", output, f"http://127.0.0.1:{self.httpPort}/{self.local}"]
        if method == "rsync":
            return ["rsync", "--fsync", f"rsync://127.0.0.1:{self.rsyncPort}/files/{self.local}", output]
        client = list(prefix) + ["-m", "p2pfiles"] if prefix else [P2PFILES]
        name = self.local if method == "local" else self.remote
        return client + ["get", name, "--node", self.leader.address, "-o", output, "--json", "--timeout", "30"]

    def run(self, method: str, prefix: List[str] = ()) -> Dict[str, Any]:
        """
        Run one download; return its wall time, throughput and memory peaks.
        """
        output = os.path.join(self.out, f"{method}.out")
        server = {"baseline": self.http, "rsync": self.rsync}.get(method, self.leader.process)
        assert server is not None
        cpuBefore = {"server": common.cpuSeconds(server.pid), "holder": common.cpuSeconds(self.holder.pid)}
        childrenBefore = resource.getrusage(resource.RUSAGE_CHILDREN)
        leaderSampler = RssSampler(self.leader.pid)
        holderSampler = RssSampler(self.holder.pid)
        started = time.monotonic()
        process = common.spawn(self.command(method, output, prefix), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        clientSampler = RssSampler(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=600)
            seconds = time.monotonic() - started
        finally:
            common.stopProcess(process)
        for sampler in (leaderSampler, holderSampler, clientSampler):
            sampler.stop()
        childrenAfter = resource.getrusage(resource.RUSAGE_CHILDREN)
        clientCpu = (childrenAfter.ru_utime + childrenAfter.ru_stime) - (childrenBefore.ru_utime + childrenBefore.ru_stime)
        if process.returncode != 0:
            raise RuntimeError(f"{method} exited {process.returncode}: {stderr.decode(errors='replace').strip()}")
        result: Dict[str, Any] = {
            "method": method,
            "seconds": seconds,
            "mibps": self.size / MiB / seconds,
            "clientHwm": clientSampler.maxHwm,
            "leaderRss": leaderSampler.maxRss,
            "holderRss": holderSampler.maxRss,
            # CPU seconds used during the run: the client (curl or p2pfiles),
            # the server (http.server or the leader) and the holder.
            "cpuClient": clientCpu,
            "cpuServer": common.cpuSeconds(server.pid) - cpuBefore["server"],
            "cpuHolder": common.cpuSeconds(self.holder.pid) - cpuBefore["holder"],
        }
        got = os.path.getsize(output)
        if got != self.size:
            raise RuntimeError(f"{method} wrote {got} bytes, expected {self.size}")
        if method == "baseline":
            # The fsync curl skipped and p2pfiles does (informative).
            syncStarted = time.monotonic()
            fd = os.open(output, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            result["fsync"] = time.monotonic() - syncStarted
        elif method != "rsync":
            summary = json.loads(stdout)
            expectedVia = [1, 1] if method == "local" else [1, 2]
            if summary["via"] != expectedVia:
                raise RuntimeError(f"{method} went via {summary['via']}, expected {expectedVia}")
            result["inProcess"] = summary["seconds"]
        os.unlink(output)
        return result


def measureSize(sizeMiB: int, rounds: int, root: str) -> Dict[str, Any]:
    setup = Setup(sizeMiB, os.path.join(root, f"size-{sizeMiB}"))
    runs: List[Dict[str, Any]] = []
    methods = [m for m in METHODS if available(m)]
    try:
        setup.start()
        for round in range(rounds):
            order = methods[round % len(methods):] + methods[: round % len(methods)]
            for method in order:
                result = setup.run(method)
                result["round"] = round + 1
                runs.append(result)
                extra = (
                    f", fsync after it {result['fsync']:.3f} s" if "fsync" in result
                    else f", in-process {result['inProcess']:.3f} s" if "inProcess" in result else ""
                )
                print(
                    f"  {sizeMiB} MiB round {round + 1} {method:8}: {result['seconds']:.3f} s = {result['mibps']:.0f} MiB/s{extra}; "
                    f"client peak {result['clientHwm'] / MiB:.1f} MiB, leader RSS peak {result['leaderRss'] / MiB:.1f} MiB; "
                    f"CPU s client {result['cpuClient']:.2f} server {result['cpuServer']:.2f} holder {result['cpuHolder']:.2f}",
                    flush=True,
                )
        leaderHwm = common.procStatus(setup.leader.pid).get("VmHWM", 0)
        holderHwm = common.procStatus(setup.holder.pid).get("VmHWM", 0)
    finally:
        setup.stop()
        common.removeTree(setup.root)
    return {"size": sizeMiB, "runs": runs, "leaderHwm": leaderHwm, "holderHwm": holderHwm}


def summarise(measured: List[Dict[str, Any]]) -> List[Figure]:
    rows = []
    figures: List[Figure] = []
    for m in measured:
        size = m["size"]
        byMethod = {method: [r for r in m["runs"] if r["method"] == method] for method in METHODS}
        baseline = median(r["mibps"] for r in byMethod["baseline"]) if byMethod["baseline"] else None
        # The baseline charged with the fsync it skipped (p2pfiles pays it).
        synced = (
            median(size / (r["seconds"] + r["fsync"]) for r in byMethod["baseline"]) if byMethod["baseline"] else None
        )
        rsync = median(r["mibps"] for r in byMethod["rsync"]) if byMethod["rsync"] else None
        for method in METHODS:
            runs = byMethod[method]
            if not runs:
                rows.append([size, method, f"skipped (no {'curl' if method == 'baseline' else method})", "-", "-", "-", "-", "-", "-", "-"])
                continue
            mibps = median(r["mibps"] for r in runs)
            ratio = None if baseline is None else mibps / baseline
            target = {"baseline": None, "rsync": None, "local": LOCAL_RATIO, "relay": RELAY_RATIO}[method]
            verdict = "-" if target is None or ratio is None else ("PASS" if ratio >= target else "MISS")
            if method == "baseline":
                note = f"+fsync {median(r['fsync'] for r in runs):.2f} s"
            elif method == "rsync":
                note = "plaintext, checksummed, fsynced"
            else:
                note = f"TLS; in-process {median(r['inProcess'] for r in runs):.2f} s"
            rows.append(
                [
                    size,
                    method,
                    f"{mibps:.0f}",
                    f"{median(r['seconds'] for r in runs):.2f}",
                    "-" if ratio is None else f"{ratio:.2f}" + ("" if target is None else f" (>= {target:g})"),
                    "-" if synced is None else f"{mibps / synced:.2f}",
                    "-" if rsync is None else f"{mibps / rsync:.2f}",
                    f"{max(r['clientHwm'] for r in runs) / MiB:.1f}",
                    note,
                    verdict,
                ]
            )
            if method in ("local", "relay"):
                figures.append(
                    Figure(f"transfer {size} MiB: {method} get MiB/s", mibps, "MiB/s", target, kind="min", baseline=baseline)
                )
            if method == "relay" and rsync is not None:
                figures.append(
                    Figure(
                        f"transfer {size} MiB: relay get vs rsync --fsync", mibps, "MiB/s", RSYNC_RATIO, kind="min",
                        baseline=rsync,
                    )
                )
        relays = byMethod["relay"]
        clientPeak = max(r["clientHwm"] for r in m["runs"] if r["method"] in ("local", "relay")) / MiB
        m["clientPeak"] = clientPeak
        rows.append(
            [size, "memory", "-", "-", "-", "-", "-", "-",
             f"leader VmHWM {m['leaderHwm'] / MiB:.1f} MiB (RSS peak in relay {max(r['leaderRss'] for r in relays) / MiB:.1f}), "
             f"holder VmHWM {m['holderHwm'] / MiB:.1f} MiB", ""]
        )
        figures.append(Figure(f"transfer {size} MiB: leader VmHWM", m["leaderHwm"] / MiB, "MiB", RSS_LIMIT_MIB))
        figures.append(Figure(f"transfer {size} MiB: client peak VmHWM", clientPeak, "MiB", RSS_LIMIT_MIB))
    print()
    common.printTable(
        ["MiB", "method", "MiB/s (median)", "s (median)", "ratio to baseline", "ratio to baseline+fsync", "ratio to rsync", "client peak MiB", "note", "verdict"],
        rows,
    )
    cpuRows = []
    for m in measured:
        for method in METHODS:
            runs = [r for r in m["runs"] if r["method"] == method]
            if runs:
                perGiB = 1024 / m["size"]
                cpuRows.append(
                    [m["size"], method]
                    + [median(r[key] for r in runs) * perGiB for key in ("cpuClient", "cpuServer", "cpuHolder")]
                    + [median(r["seconds"] for r in runs) * perGiB]
                )
    print()
    print("CPU seconds per GiB (median); server = http.server for the baseline, the rsync daemon for rsync, the leader otherwise; 2 cores in all:")
    common.printTable(["MiB", "method", "client", "server", "holder", "wall"], cpuRows)
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        for who, key in (("leader VmHWM", "leaderHwm"), ("client peak", "clientPeak")):
            a, b = small[key], large[key]
            if key == "leaderHwm":
                a, b = a / MiB, b / MiB
            figures.append(
                Figure(f"transfer: {who} {large['size']} vs {small['size']} MiB", b / a, "x", 1 + FLAT_GROWTH,
                       note=f"{a:.1f} -> {b:.1f} MiB")
            )
    print()
    common.printFigures(figures)
    return figures


def profile(sizeMiB: int, root: str) -> None:
    """
    One local and one relayed get with the client, leader and holder under
    cProfile; print the top functions of each.
    """
    files = {who: os.path.join(root, f"{who}.prof") for who in ("leader", "holder", "client-local", "client-relay")}
    setup = Setup(
        sizeMiB,
        os.path.join(root, "profile"),
        leaderPrefix=[PYTHON, PROFILED_TWISTD, files["leader"]],
        holderPrefix=[PYTHON, PROFILED_TWISTD, files["holder"]],
    )
    try:
        setup.start()
        for method in ("local", "relay"):
            result = setup.run(method, prefix=[PYTHON, "-m", "cProfile", "-o", files[f"client-{method}"]])
            print(f"  profiled {method} get of {sizeMiB} MiB: {result['seconds']:.2f} s wall ({result['mibps']:.0f} MiB/s, slowed by cProfile)")
    finally:
        setup.stop()
    for who, path in files.items():
        print(f"\n=== {who}: top 14 by own time ===")
        if not os.path.exists(path):
            print("  (no profile written)")
            continue
        stats = pstats.Stats(path)
        stats.sort_stats("tottime").print_stats(25)
    common.removeTree(setup.root)


# What a sampled symbol is for, by its name (and library): first match wins.
PERF_GROUPS = (
    ("TLS cipher (AES-GCM)", ("aes", "gcm", "ghash", "chacha", "poly1305")),
    # hashlib uses the system's libcrypto; pyOpenSSL the OpenSSL inside
    # cryptography's _rust module.
    ("SHA-256 (hashlib's libcrypto)", ("sha256", "libcrypto")),
    ("memory copies", ("memcpy", "memmove", "memset")),
    ("malloc/free", ("malloc", "free", "_int_", "realloc", "calloc", "pymalloc", "obmalloc")),
    ("TLS records, BIO (pyOpenSSL's OpenSSL)", ("_rust", "libssl")),
    ("cffi (pyOpenSSL calls)", ("_cffi", "cffi")),
    ("Python interpreter and objects", ("python", "libpython")),
)


def perfGroup(dso: str, symbol: str) -> str:
    text = f"{symbol} {dso}".lower()
    for group, keys in PERF_GROUPS:
        if any(key in text for key in keys):
            return group
    return f"other ({os.path.basename(dso)})"


def perfReport(path: str, top: List[str]) -> Dict[str, float]:
    """
    Percent of the user-mode samples in C{path} per L{PERF_GROUPS} group;
    the first few symbols are appended to C{top}.
    """
    report = subprocess.run(
        ["perf", "report", "-i", path, "--no-children", "--sort", "dso,sym", "--stdio", "-q"],
        capture_output=True,
        text=True,
    ).stdout
    groups: Dict[str, float] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%"):
            continue
        percent = float(parts[0].rstrip("%"))
        dso, symbol = parts[1], " ".join(parts[3:])
        group = perfGroup(dso, symbol)
        if len(top) < 12:
            top.append(f"{percent:5.1f}%  {os.path.basename(dso)}  {symbol}")
        groups[group] = groups.get(group, 0.0) + percent
    return groups


def perfProfile(sizeMiB: int, root: str) -> None:
    """
    One relayed get with C{perf record} (user mode) on the client, the
    leader and the holder; print, per process, CPU seconds (user, system)
    against the wall time and the user-mode samples per group.
    """
    setup = Setup(sizeMiB, os.path.join(root, "perf"))
    files = {who: os.path.join(root, f"{who}.perf") for who in ("client", "leader", "holder")}
    try:
        setup.start()
        setup.run("relay")  # warm up: connections, page cache
        pids = {"leader": setup.leader.pid, "holder": setup.holder.pid}
        before = {who: _cpuSplit(pid) for who, pid in pids.items()}
        recorders = {
            who: common.spawn(["perf", "record", "-q", "-e", "cpu-clock:u", "-F", "2000", "-o", files[who], "-p", str(pid)])
            for who, pid in pids.items()
        }
        time.sleep(0.5)
        output = os.path.join(setup.out, "perf.out")
        argv = setup.command("relay", output)
        started = time.monotonic()
        client = subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock:u", "-F", "2000", "-o", files["client"], "--"]
            + ["/usr/bin/time", "-f", "%U %S", "-o", files["client"] + ".time"]
            + argv,
            capture_output=True,
            cwd="/",
        )
        wall = time.monotonic() - started
        after = {who: _cpuSplit(pid) for who, pid in pids.items()}
        for recorder in recorders.values():
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
        if client.returncode != 0:
            raise RuntimeError(f"relay get failed: {client.stderr.decode(errors='replace')}")
        os.unlink(output)
    finally:
        setup.stop()
    with open(files["client"] + ".time") as f:
        user, system = (float(x) for x in f.read().split()[-2:])
    cpu = {"client": (user, system)}
    for who in pids:
        cpu[who] = (after[who][0] - before[who][0], after[who][1] - before[who][1])
    print(f"relayed get of {sizeMiB} MiB under perf: {wall:.2f} s wall ({sizeMiB / wall:.0f} MiB/s)")
    for who in ("client", "leader", "holder"):
        user, system = cpu[who]
        idle = max(wall - user - system, 0.0)
        print(
            f"\n=== {who}: user {user:.2f} s ({100 * user / wall:.0f}% of wall), "
            f"system {system:.2f} s ({100 * system / wall:.0f}%), not running {idle:.2f} s ({100 * idle / wall:.0f}%)"
        )
        top: List[str] = []
        groups = perfReport(files[who], top)
        for group, percent in sorted(groups.items(), key=lambda item: -item[1]):
            if percent >= 0.5:
                print(f"  {percent:5.1f}% of user time  {group}")
        print("  top symbols:")
        for line in top:
            print(f"    {line}")


def _cpuSplit(pid: int) -> tuple:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main(argv: Optional[List[str]] = None) -> List[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="file sizes in MiB, comma separated (default 256,1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 round")
    parser.add_argument("--profile", action="store_true", help="profile one local and one relayed get instead")
    parser.add_argument("--perf", action="store_true", help="sample one relayed get with perf (per process, by group) instead")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = "64", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    common.installSignalHandlers()
    root = common.makeTempDir("transfer")
    try:
        if args.profile:
            profile(sizes[-1], root)
            return []
        if args.perf:
            perfProfile(sizes[-1], root)
            return []
        if not shutil.which("curl"):
            print("curl is not installed: no baseline, no ratios")
        measured = []
        for size in sizes:
            print(f"transfer: {size} MiB, {args.rounds} rounds of {', '.join(METHODS)} (interleaved)", flush=True)
            measured.append(measureSize(size, args.rounds, root))
    finally:
        common.stopAll()
        common.removeTree(root)
    return summarise(measured)


if __name__ == "__main__":
    main()
