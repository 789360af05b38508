"""
Failover and start-up agreement of real p2pfiles nodes.

What is measured, and how:

  - SIGKILL of the leader (3 nodes, ids 1-3, a --cluster file listing all):
    a C{p2pfiles status --watch --json} subprocess runs against each
    survivor, started (and its first line read) before the signal; a thread
    per watch timestamps every stdout line with C{time.monotonic()} as it
    arrives.  The figure is the time from C{os.kill(leader, SIGKILL)} to the
    arrival of the last survivor's first line naming the new leader (node 2).
    No polling.  Then the killed node is started again and the round ends
    when C{p2pfiles status --json} on every node reports the same leader
    (node 1 again) and epoch with every member alive.
  - SIGSTOP of the leader: the same, with SIGSTOP; then SIGCONT and wait for
    the same agreement.  Its figure is about the leader timeout
    (--leader-timeout, 1.0 s by default), give or take a heartbeat interval
    (0.25 s): a frozen process keeps its TCP connections open, so only its
    silence reveals it.
  - How long the cluster takes to agree again after the restart / SIGCONT
    (polled with the in-process status client every 50 ms: informative).
  - N nodes (32) started together: the time from the moment the last
    C{Popen} returned until every node reports the same leader and epoch.
    This one polls: every node is asked in parallel (threads) with the
    in-process status client of L{common.directStatus}, which speaks the same
    handshake and C{status} request as C{p2pfiles status --json} over a
    plain socket; 32 CLI processes per sweep would cost ~5 s of CPU on this
    2-core machine and distort what is measured.  The agreement is checked
    again with the real CLI afterwards.  Run C{--starts} times (default 2)
    with C{--peer} to node 1 only ("seed": the rest is learned from
    heartbeats) and as often with a C{--cluster} file listing all, each time
    with fresh directories.  Also reported: when the last node first
    answered (start-up), whether agreement held for 1 s after, and the CPU
    the idle cluster uses (all nodes' utime+stime over 2 s, in cores).
  - The floor under that figure on this machine: N isolated nodes (no peers,
    so no heartbeats) started together, until all answer.  Each twistd
    process needs ~0.2 s of CPU to start, so 32 of them need ~3.2 s on 2
    cores before any election can finish.

With C{--coordinator etcd}, the same is measured a second time with the
nodes coordinated by etcd (one etcd member on 127.0.0.1, started here with
the test suite's helper, C{tests/etcdserver.py}; each cluster under a key
prefix of its own; lease TTL 2 s, the default), and both sets of figures are
printed side by side.  Both sets then also have SIGTERM rounds of the leader
(the etcd node revokes its lease as it stops).  The N-node start-up with
etcd gives the nodes no peers at all: etcd tells them the members.  Only
with etcd, C{--rounds} times each:

  - etcd SIGSTOP -> every node reports no leader (the nodes stop trusting
    their leases: expected about TTL - TTL/4 = 1.5 s after the last renewal);
  - etcd SIGCONT -> every node reports one leader again (and agrees, polled).

Usage: .venv/bin/python bench/failover.py [--rounds 5] [--nodes 32] [--starts 2] [--quick] [--coordinator etcd]
"""

import argparse
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import Cluster, Figure, Watch, median  # noqa: E402

# The lease TTL of the etcd runs, seconds (the nodes' default).
LEASE_TTL = 2.0

# Targets.
KILL_MEDIAN = 0.3
KILL_MAX = 1.0
STOP_MAX = 2.0
START_AGREE = 3.0


def failoverRound(cluster: Cluster, sig: int, root: str, round: int) -> Dict[str, Any]:
    """
    One round: watch the survivors, signal the leader (node 1), time until
    every survivor reports node 2 as leader, then restart / SIGCONT node 1
    and wait until all agree on it again.
    """
    leader = 1
    survivors = [i for i in sorted(cluster.nodes) if i != leader]
    newLeader = survivors[0]
    name = signal.Signals(sig).name
    watches = [Watch(cluster.nodes[i].address, os.path.join(root, f"watch-{name}-{round}-{i}.err")) for i in survivors]
    result: Dict[str, Any] = {"signal": name, "round": round}
    try:
        epochBefore = 0
        for watch in watches:
            hit = watch.waitFor(lambda s: s["leader"] == leader, timeout=15.0)
            if hit is None:
                raise RuntimeError(f"watch on {watch.address} did not report leader {leader}")
            epochBefore = max(epochBefore, hit[1]["epoch"])
        signalled = time.monotonic()
        cluster.signal(leader, sig)
        seen = []
        for watch in watches:
            hit = watch.waitFor(lambda s: s["leader"] == newLeader and s["epoch"] > epochBefore, after=signalled, timeout=10.0)
            seen.append(None if hit is None else hit[0] - signalled)
        result["perSurvivor"] = seen
        result["seconds"] = None if None in seen else max(seen)
    finally:
        for watch in watches:
            watch.stop()
    # Bring the old leader back and wait for the cluster to settle on it.
    back = time.monotonic()
    if sig in (signal.SIGKILL, signal.SIGTERM):
        cluster.stop(leader)
        cluster.start(leader)
    else:
        cluster.signal(leader, signal.SIGCONT)
    cluster.waitConverged(expectLeader=leader, useCli=False, timeout=30.0, interval=0.05)
    result["rejoin"] = time.monotonic() - back
    cluster.waitConverged(expectLeader=leader, useCli=True, timeout=30.0)
    return result


def measureFailover(
    rounds: int, root: str, signals: Sequence[int] = (signal.SIGKILL, signal.SIGSTOP), etcd: Optional[Any] = None
) -> List[Dict[str, Any]]:
    """
    C{rounds} rounds of each of C{signals}, interleaved; with C{etcd}, the
    nodes are coordinated by it.
    """
    name = "failover-etcd" if etcd is not None else "failover"
    cluster = clusterOf(3, os.path.join(root, name), "cluster", etcd)
    results = []
    try:
        cluster.startAll()
        cluster.waitListening()
        cluster.waitConverged(expectLeader=1, useCli=True, timeout=30.0)
        for round in range(1, rounds + 1):
            for sig in signals:
                result = failoverRound(cluster, sig, root, round)
                results.append(result)
                print(
                    f"  round {round} {result['signal']}: all survivors report the new leader after "
                    f"{common.fmt(result['seconds'])} s (per survivor {[common.fmt(s) for s in result['perSurvivor']]}); "
                    f"agreement again {result['rejoin']:.2f} s after restart/SIGCONT",
                    flush=True,
                )
    finally:
        cluster.stopAll()
    return results


def clusterOf(count: int, root: str, peers: str, etcd: Optional[Any]) -> Cluster:
    """
    C{count} nodes; with C{etcd}, coordinated by it under a prefix of their
    own and with no peers.
    """
    if etcd is None:
        return Cluster(count, root, peers=peers)
    arguments = [
        "--coordinator", "etcd://" + ",".join(etcd.endpoints),
        "--coordinator-prefix", "/p2pfiles-bench/" + os.path.basename(root),
        "--lease-ttl", f"{LEASE_TTL:g}",
    ]
    return Cluster(count, root, peers="none", extraArgs=arguments)


def measureEtcdOutage(rounds: int, root: str, etcd: Any) -> List[Dict[str, Any]]:
    """
    C{rounds} times: SIGSTOP etcd, time until every node reports no leader;
    SIGCONT, time until every node reports a leader again, then wait until
    all agree.
    """
    cluster = clusterOf(3, os.path.join(root, "etcd-outage"), "cluster", etcd)
    results = []
    try:
        cluster.startAll()
        cluster.waitListening()
        cluster.waitConverged(expectLeader=1, useCli=True, timeout=30.0)
        for round in range(1, rounds + 1):
            watches = [Watch(node.address, os.path.join(root, f"watch-etcd-{round}-{node.id}.err")) for node in cluster.nodes.values()]
            result: Dict[str, Any] = {"round": round}
            try:
                for watch in watches:
                    if watch.waitFor(lambda s: s["leader"] is not None, timeout=15.0) is None:
                        raise RuntimeError(f"watch on {watch.address} reported no leader")
                paused = time.monotonic()
                etcd.pause()
                hits = [watch.waitFor(lambda s: s["leader"] is None, after=paused, timeout=10.0) for watch in watches]
                result["noLeader"] = None if None in hits else max(hit[0] for hit in hits) - paused
                resumed = time.monotonic()
                etcd.resume()
                hits = [watch.waitFor(lambda s: s["leader"] is not None, after=resumed, timeout=10.0) for watch in watches]
                result["leaderAgain"] = None if None in hits else max(hit[0] for hit in hits) - resumed
            finally:
                etcd.resume()
                for watch in watches:
                    watch.stop()
            cluster.waitConverged(useCli=False, timeout=30.0, interval=0.05)
            result["agreed"] = time.monotonic() - resumed
            results.append(result)
            print(
                f"  round {round} etcd SIGSTOP: every node reports no leader after {common.fmt(result['noLeader'])} s; "
                f"SIGCONT: a leader again after {common.fmt(result['leaderAgain'])} s, all agree after {result['agreed']:.2f} s",
                flush=True,
            )
    finally:
        cluster.stopAll()
    return results


def measureStartup(count: int, peers: str, root: str, attempt: int, etcd: Optional[Any] = None) -> Dict[str, Any]:
    """
    Start C{count} fresh nodes together; time until all agree on leader and
    epoch.
    """
    cluster = clusterOf(count, os.path.join(root, f"start-{peers}-{attempt}"), peers, etcd)
    addresses = cluster.addresses()
    result: Dict[str, Any] = {"peers": peers, "nodes": count}
    try:
        lastStarted = cluster.startAll()
        listening: Dict[int, float] = {}
        deadline = lastStarted + 60.0
        agreed = None
        sweeps = 0
        while time.monotonic() < deadline:
            replies = common.statuses(addresses, useCli=False, timeout=2.0)
            sweeps += 1
            now = time.monotonic()
            for node, reply in zip(sorted(cluster.nodes), replies):
                if reply is not None and node not in listening:
                    listening[node] = now
            agreed = common.agreement(replies)
            if agreed is not None:
                result["seconds"] = now - lastStarted
                break
            time.sleep(0.01)
        else:
            result["seconds"] = None
        result["sweeps"] = sweeps
        result["allAnswering"] = max(listening.values()) - lastStarted if len(listening) == count else None
        if agreed is not None:
            result["leader"], result["epoch"] = agreed
            # Does it hold?  Sweep for one more second.
            held = True
            holdUntil = time.monotonic() + 1.0
            while time.monotonic() < holdUntil:
                if common.agreement(common.statuses(addresses, useCli=False)) != agreed:
                    held = False
                time.sleep(0.05)
            result["held"] = held
            # What the idle cluster costs: CPU used by all nodes over 2 s.
            pids = [node.pid for node in cluster.nodes.values()]
            before = sum(common.cpuSeconds(pid) for pid in pids)
            time.sleep(2.0)
            result["idleCores"] = (sum(common.cpuSeconds(pid) for pid in pids) - before) / 2.0
            # And the real CLI agrees.
            cliReplies = common.statuses(addresses, useCli=True, timeout=10.0)
            result["cliAgrees"] = common.agreement(cliReplies) == agreed
    finally:
        cluster.stopAll()
    return result


def measureStartupFloor(count: int, root: str) -> float:
    """
    The floor under the start-up figure on this machine: start C{count}
    nodes that know no peers (so exchange no heartbeats) and time from the
    last start until every one answers C{status}.
    """
    cluster = Cluster(count, os.path.join(root, "start-isolated"), peers="none")
    addresses = cluster.addresses()
    try:
        lastStarted = cluster.startAll()
        deadline = lastStarted + 60.0
        while time.monotonic() < deadline:
            if all(r is not None for r in common.statuses(addresses, useCli=False)):
                return time.monotonic() - lastStarted
            time.sleep(0.01)
        return float("inf")
    finally:
        cluster.stopAll()


def startEtcd() -> Any:
    """
    One etcd member on free ports of 127.0.0.1, with the test suite's
    helper (this checkout's C{tests/etcdserver.py}).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        # Appended: the bench itself keeps importing the installed p2pfiles.
        sys.path.append(root)
    from tests.etcdserver import SKIP_REASON, EtcdCluster, etcdPath

    if etcdPath() is None:
        raise SystemExit(f"--coordinator etcd: {SKIP_REASON}")
    etcd = EtcdCluster(1)
    etcd.start()
    return etcd


def printStartup(count: int, peers: str, result: Dict[str, Any]) -> None:
    print(
        f"  {count} nodes ({peers}): agree after {common.fmt(result['seconds'])} s from the last start "
        f"(all answering after {common.fmt(result['allAnswering'])} s; leader {result.get('leader')} "
        f"epoch {result.get('epoch')}; held 1 s: {result.get('held')}; CLI agrees: {result.get('cliAgrees')}; "
        f"idle cluster uses {common.fmt(result.get('idleCores'), 2)} cores)",
        flush=True,
    )


def main(argv: Optional[List[str]] = None) -> List[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="SIGKILL and SIGSTOP rounds each (default 5)")
    parser.add_argument("--nodes", type=int, default=32, help="nodes started together (default 32)")
    parser.add_argument("--starts", type=int, default=2, help="start-ups of N nodes per peer mode (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 8 nodes, 1 start-up per mode")
    parser.add_argument(
        "--coordinator",
        choices=("builtin", "etcd"),
        default="builtin",
        help="etcd: measure the etcd coordinator too, with SIGTERM rounds for both, and print both side by side",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.nodes, args.starts = 2, 8, 1
    common.installSignalHandlers()
    root = common.makeTempDir("failover")
    etcd = None
    try:
        signals = [signal.SIGKILL, signal.SIGSTOP]
        if args.coordinator == "etcd":
            etcd = startEtcd()
            signals.append(signal.SIGTERM)
        names = " and ".join(signal.Signals(s).name for s in signals)
        print(f"failover: 3 nodes, {args.rounds} {names} rounds of the leader", flush=True)
        rounds = measureFailover(args.rounds, root, signals)
        starts = []
        for i in range(args.starts):
            for peers in ("seed", "cluster"):
                result = measureStartup(args.nodes, peers, root, i)
                starts.append(result)
                printStartup(args.nodes, peers, result)
        floor = measureStartupFloor(args.nodes, root)
        print(f"  {args.nodes} isolated nodes (no peers, no heartbeats): all answer {floor:.3f} s after the last start", flush=True)
        if etcd is not None:
            print(f"failover with etcd (lease TTL {LEASE_TTL:g} s): 3 nodes, {args.rounds} {names} rounds of the leader", flush=True)
            etcdRounds = measureFailover(args.rounds, root, signals, etcd)
            outages = measureEtcdOutage(args.rounds, root, etcd)
            etcdStarts = []
            for i in range(args.starts):
                result = measureStartup(args.nodes, "etcd", root, i, etcd)
                etcdStarts.append(result)
                printStartup(args.nodes, "etcd", result)
    finally:
        common.stopAll()
        if etcd is not None:
            etcd.stop()
        common.removeTree(root)
    figures = report(rounds, starts, args.nodes, floor)
    if etcd is not None:
        figures += compare(rounds, starts, etcdRounds, outages, etcdStarts, args.nodes)
    return figures


def _times(values: List[Optional[float]]) -> List[float]:
    # A round that never converged counts as infinitely slow.
    return [float("inf") if v is None else v for v in values]


def report(rounds: List[Dict[str, Any]], starts: List[Dict[str, Any]], nodes: int, floor: float) -> List[Figure]:
    kills = _times([r["seconds"] for r in rounds if r["signal"] == "SIGKILL"])
    stops = _times([r["seconds"] for r in rounds if r["signal"] == "SIGSTOP"])
    killRejoin = [r["rejoin"] for r in rounds if r["signal"] == "SIGKILL"]
    stopRejoin = [r["rejoin"] for r in rounds if r["signal"] == "SIGSTOP"]
    rows = [
        ["SIGKILL leader -> all survivors report new leader", len(kills), median(kills), max(kills), f"median <= {KILL_MEDIAN}, max <= {KILL_MAX}"],
        ["SIGSTOP leader -> all survivors report new leader", len(stops), median(stops), max(stops), f"max <= {STOP_MAX}"],
        ["restart killed leader -> all agree on it again", len(killRejoin), median(killRejoin), max(killRejoin), "(info)"],
        ["SIGCONT stopped leader -> all agree on it again", len(stopRejoin), median(stopRejoin), max(stopRejoin), "(info)"],
    ]
    for peers in ("seed", "cluster"):
        mine = [s for s in starts if s["peers"] == peers]
        agree = _times([s["seconds"] for s in mine])
        answering = _times([s["allAnswering"] for s in mine])
        electing = [a - b for a, b in zip(agree, answering)]
        idle = [s.get("idleCores") or 0.0 for s in mine]
        if mine:
            rows.append([f"{nodes} nodes ({peers}): last start -> all agree", len(agree), median(agree), max(agree), f"<= {START_AGREE}"])
            rows.append([f"{nodes} nodes ({peers}): last start -> all answer status", len(answering), median(answering), max(answering), "(info)"])
            rows.append([f"{nodes} nodes ({peers}): all answer -> all agree", len(electing), median(electing), max(electing), "(info)"])
            rows.append([f"{nodes} nodes ({peers}): idle CPU, cores (not s)", len(idle), median(idle), max(idle), "(info)"])
    rows.append([f"{nodes} isolated nodes: last start -> all answer status", 1, floor, floor, "(info: the floor)"])
    print()
    common.printTable(["scenario (seconds)", "n", "median", "max", "target"], rows)
    figures = [
        Figure("failover SIGKILL median", median(kills), "s", KILL_MEDIAN),
        Figure("failover SIGKILL max", max(kills), "s", KILL_MAX),
        Figure("failover SIGSTOP max", max(stops), "s", STOP_MAX),
    ]
    for peers in ("seed", "cluster"):
        mine = [s for s in starts if s["peers"] == peers]
        agree = _times([s["seconds"] for s in mine])
        if agree:
            figures.append(Figure(f"{nodes} nodes agree ({peers}), max", max(agree), "s", START_AGREE))
            answering = _times([s["allAnswering"] for s in mine])
            figures.append(Figure(f"{nodes} nodes ({peers}): of which start-up, max", max(answering), "s", None))
            figures.append(Figure(f"{nodes} nodes ({peers}): idle CPU", median(s.get("idleCores") or 0.0 for s in mine), "cores", None))
    figures.append(Figure(f"{nodes} isolated nodes: start-up alone", floor, "s", None))
    print()
    common.printFigures(figures)
    return figures


def compare(
    rounds: List[Dict[str, Any]],
    starts: List[Dict[str, Any]],
    etcdRounds: List[Dict[str, Any]],
    outages: List[Dict[str, Any]],
    etcdStarts: List[Dict[str, Any]],
    nodes: int,
) -> List[Figure]:
    """
    The built-in election and etcd side by side; the etcd figures against
    the limits its design gives (lease TTL 2 s).
    """

    def column(values: List[Optional[float]]) -> List[Any]:
        times = _times(values)
        return [len(times), median(times), max(times)] if times else ["-", "-", "-"]

    def of(results: List[Dict[str, Any]], name: str, key: str) -> List[Optional[float]]:
        return [r[key] for r in results if r["signal"] == name]

    rows = []
    for name, what in (("SIGKILL", "killed"), ("SIGSTOP", "stopped"), ("SIGTERM", "terminated")):
        rows.append([f"{name} leader -> all survivors report new leader"] + column(of(rounds, name, "seconds")) + column(of(etcdRounds, name, "seconds")))
        back = "SIGCONT" if name == "SIGSTOP" else "restart"
        rows.append([f"{back} {what} leader -> all agree on it again"] + column(of(rounds, name, "rejoin")) + column(of(etcdRounds, name, "rejoin")))
    cluster = [s for s in starts if s["peers"] == "cluster"]
    for label, key in (("last start -> all agree", "seconds"), ("last start -> all answer status", "allAnswering"), ("idle CPU, cores (not s)", "idleCores")):
        rows.append(
            [f"{nodes} nodes (--cluster / etcd): {label}"] + column([s.get(key) for s in cluster]) + column([s.get(key) for s in etcdStarts])
        )
    none: List[Any] = ["-", "-", "-"]
    rows.append(["etcd SIGSTOP -> no node reports a leader"] + none + column([o["noLeader"] for o in outages]))
    rows.append(["etcd SIGCONT -> every node reports a leader"] + none + column([o["leaderAgain"] for o in outages]))
    rows.append(["etcd SIGCONT -> all agree"] + none + column([o["agreed"] for o in outages]))
    print()
    common.printTable(
        ["scenario (seconds)", "builtin n", "median", "max", "etcd n", "median", "max"],
        rows,
    )
    kills = _times(of(etcdRounds, "SIGKILL", "seconds"))
    terms = _times(of(etcdRounds, "SIGTERM", "seconds"))
    noLeader = _times([o["noLeader"] for o in outages])
    leaderAgain = _times([o["leaderAgain"] for o in outages])
    figures = [
        Figure("etcd: SIGKILL leader -> new leader, max", max(kills), "s", LEASE_TTL + 1.0),
        Figure("etcd: SIGTERM leader -> new leader, max", max(terms), "s", 0.5),
        Figure("etcd: SIGSTOP etcd -> no leader anywhere, max", max(noLeader), "s", LEASE_TTL),
        Figure("etcd: SIGCONT etcd -> a leader again, max", max(leaderAgain), "s", None),
    ]
    agree = _times([s["seconds"] for s in etcdStarts])
    if agree:
        figures.append(Figure(f"etcd: {nodes} nodes agree, max", max(agree), "s", START_AGREE))
    print()
    common.printFigures(figures)
    return figures


if __name__ == "__main__":
    main()
