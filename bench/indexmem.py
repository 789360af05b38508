"""
What the leader holds per entry of the cluster index, part by part, and the
speed of writing peer_files.log from it.  The headline figure for a real
leader is bench/scale.py's (a twistd process's VmRSS over an idle node's,
per entry); this is its breakdown.

Each measurement runs in a fresh child process (so that one run's freed
memory does not hide the next one's):

  - memory: N synthetic entries over K nodes (camera names like
    C{IMG_20240101_123456_0001.jpg}, sizes of a few MB, sub-second mtimes,
    random SHA-256s), held as a leader holds them.  Node 1 is the leader
    itself: its own files are its local index's state (the hash cache, as
    loaded from the file a scan writes, L{CacheItem}s; the name -> entry
    and name -> seq maps), and its map in the ClusterIndex packed from those
    entries, as the keeper packs them.  Every other node's files come as a
    gatherer gets them: C{index-delta} frames encoded by the member, decoded
    and packed frame by frame (as pullIndex does), then replaceNode.  Last,
    the encoded C{ls} answer is made (as the request context caches it
    while it is asked for).  Printed per entry of the whole index, from
    tracemalloc (Python heap retained, in a run of its own since tracing
    costs memory too): the local index, the ClusterIndex, their sum (what a
    leader holds while nobody asks ls), the ls answer; and from a separate
    run without tracing, the process's VmRSS growth per entry (ls answer
    excluded), its whole VmRSS and VmHWM (peak), and the build time.  Names
    are distinct per node unless --shared (every node holds the same names,
    as a fully replicated cluster would).
  - render: the lines per second of renderLog (the whole log in memory) and
    of peerlog.writeLog (streamed to a temporary directory, fsync included),
    checked byte for byte against renderLog; the time of
    snapshot(), of a one-entry applyChanges right after it (copy-on-write),
    of listingOf(snapshot); and the longest pause of a second thread (the
    stand-in for the reactor: it sleeps 1 ms in a loop) while the log is
    written in a thread.

--baseline REV measures p2pfiles/index.py as of REV too (loaded with
C{git show}; the index only, with writeLog and the local index of this
checkout), e.g. the commit before the compact index, for a before/after
table.

Usage: .venv/bin/python bench/indexmem.py [--entries 100000,300000,1000000]
           [--nodes 1,3,10] [--render 100000,1000000] [--baseline REV]
           [--shared] [--quick]
"""

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from itertools import chain
from typing import Any, Dict, Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This checkout's package, not the copy installed in the virtualenv.
sys.path.insert(0, ROOT)
sys.path.insert(1, HERE)

import common  # noqa: E402

from p2pfiles.wire import FileEntry  # noqa: E402

LEADER, EPOCH, NOW = 1, 7, 1764096934.123


def loadIndex(rev: Optional[str]) -> types.ModuleType:
    """
    p2pfiles.index of this checkout, or as of C{rev}.
    """
    if rev is None:
        import p2pfiles.index

        return p2pfiles.index
    source = subprocess.check_output(["git", "-C", ROOT, "show", f"{rev}:p2pfiles/index.py"])
    module = types.ModuleType("index_at_" + rev.replace("-", "_"))
    exec(compile(source, f"{rev}:p2pfiles/index.py", "exec"), module.__dict__)
    return module


def entries(node: int, count: int, shared: bool) -> Iterator[FileEntry]:
    """
    C{count} synthetic entries of C{node}: distinct names within a node;
    across nodes too unless C{shared}.
    """
    rng = random.Random(node)
    names = random.Random(0 if shared else node)
    year = 2024 if shared else 2000 + node
    for i in range(count):
        block, seq = divmod(i, 10000)
        name = f"IMG_{year:04d}{block // 28 % 12 + 1:02d}{block % 28 + 1:02d}_{names.randrange(240000):06d}_{seq:04d}.jpg"
        mtime = 1704067200 + i * 13.37 + rng.random()
        yield FileEntry(name, rng.randrange(500_000, 12_000_000), mtime, f"{rng.getrandbits(256):064x}")


def counts(total: int, nodes: int) -> List[int]:
    return [total // nodes + (1 if k < total % nodes else 0) for k in range(nodes)]


def build(module: types.ModuleType, total: int, nodes: int, shared: bool) -> Any:
    index = module.ClusterIndex()
    for k, count in enumerate(counts(total, nodes)):
        # In name order, as a node's scan lists them and members send them.
        index.replaceNode(k + 1, f"127.0.0.1:{9001 + k}", sorted(entries(k + 1, count, shared), key=lambda e: e.name))
    assert index.fileCount() == total, (index.fileCount(), total)
    return index


def cacheFileOf(count: int) -> bytes:
    """
    The hash cache file of the leader's own C{count} files, as a scan
    writes it.
    """
    from twisted.python.filepath import FilePath

    from p2pfiles.sharescan import CacheItem, ShareScanner

    cache = {}
    for inode, entry in enumerate(entries(1, count, False), 1_000_000):
        cache[entry.name] = CacheItem(entry.size, int(entry.mtime * 1e9), inode, entry.sha256)
    directory = tempfile.mkdtemp(prefix="indexmem-")
    try:
        scanner = ShareScanner(FilePath(directory), FilePath(os.path.join(directory, "hashcache.json")))
        scanner.writeCache(cache)
        with open(scanner.cacheFile.path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(directory)


def buildLocal(data: bytes) -> Any:
    """
    The leader's own local index as its first scan leaves it, from its hash
    cache file: the cache, and the name -> entry and name -> seq maps, every
    map keyed by one string per name.
    """
    from p2pfiles.sharescan import ShareState, parseCacheLines

    cache = parseCacheLines(data)
    own = {name: FileEntry(name, item.size, item.mtime_ns / 1e9, item.sha256) for name, item in cache.items()}
    return ShareState(own, dict.fromkeys(own, 1), {}, 1, 0, cache, {})


def memberFrames(node: int, count: int, shared: bool) -> List[bytes]:
    # What member node sends a gatherer: its whole list, encoded, in name
    # order as a node's scan lists it.
    from p2pfiles.wire import deltaFrames

    return list(deltaFrames("incarnation", 1, True, sorted(entries(node, count, shared), key=lambda e: e.name), []))


def pulled(frames: List[bytes], module: types.ModuleType) -> Any:
    # What pullIndex makes of a full answer: decoded and packed frame by
    # frame (into a PackedFiles, or a dict for an index from before them).
    from p2pfiles.index import packEntry
    from p2pfiles.packed import PackedBuilder
    from p2pfiles.wire import decode

    packed = hasattr(module, "packFiles")
    builder = PackedBuilder()
    files: Dict[str, bytes] = {}
    add = builder.add if packed else files.__setitem__
    for frame in frames:
        for entry in decode(frame).entries:
            add(entry.name, packEntry(entry))
    return builder.build() if packed else files


def rss() -> Dict[str, int]:
    return common.procStatus(os.getpid())


def childMemory(args: argparse.Namespace) -> Dict[str, Any]:
    """
    Build what a leader holds (see the module's text), measuring each part
    as it is added: tracemalloc's retained bytes with --trace, else VmRSS.
    What the member nodes send is encoded beforehand and not counted.
    """
    from p2pfiles.index import listingChunks
    from p2pfiles.session import encodeListing

    module = loadIndex(args.rev)
    sizes = counts(args.total, args.k)
    cacheFile = cacheFileOf(sizes[0])
    gc.collect()
    if args.trace:
        tracemalloc.start()

    def measure() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] if args.trace else rss()["VmRSS"]

    result: Dict[str, Any] = {}
    before = measure()
    started = time.perf_counter()
    local = buildLocal(cacheFile)
    del cacheFile
    afterLocal = measure()
    index = module.ClusterIndex()
    if hasattr(module, "packFiles"):
        own, refused = module.packFiles(local.entries.values())
    else:
        own = {}
        module.packEntries(local.entries.values(), own)
    index.replaceNode(1, "127.0.0.1:9001", own)
    del own
    for k, count in enumerate(sizes[1:], 2):
        # The member's frames are freed once read, as a gatherer's are.
        frames = memberFrames(k, count, args.shared)
        files = pulled(frames, module)
        del frames
        index.replaceNode(k, f"127.0.0.1:{9000 + k}", files)
        del files
    result["seconds"] = time.perf_counter() - started
    assert index.fileCount() == args.total, (index.fileCount(), args.total)
    afterIndex = measure()
    result.update(local=afterLocal - before, index=afterIndex - afterLocal)
    if args.trace:
        frames = encodeListing(chain.from_iterable(listingChunks(index.snapshot())))
        result["listing"] = measure() - afterIndex
        del frames
    else:
        status = rss()
        result.update(rssDelta=afterIndex - before, rss=status["VmRSS"], hwm=status["VmHWM"])
    del index, local
    return result


def longestPause(work: Any) -> float:
    """
    Run C{work} in a thread; the longest gap between the wake-ups of this
    thread, which sleeps 1 ms at a time meanwhile.
    """
    done = threading.Event()
    failure: List[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:
            failure.append(e)
        done.set()

    thread = threading.Thread(target=run)
    last = time.perf_counter()
    worst = 0.0
    thread.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    thread.join()
    if failure:
        raise failure[0]
    return worst


def childRender(args: argparse.Namespace) -> Dict[str, Any]:
    module = loadIndex(args.rev)
    index = build(module, args.total, args.k, args.shared)
    gc.collect()
    result: Dict[str, Any] = {}
    started = time.perf_counter()
    expected = module.renderLog(index, LEADER, EPOCH, NOW)
    result["render"] = time.perf_counter() - started
    result["bytes"] = len(expected)
    started = time.perf_counter()
    snapshot = index.snapshot()
    result["snapshot"] = time.perf_counter() - started
    started = time.perf_counter()
    index.applyChanges(1, "127.0.0.1:9001", [FileEntry("IMG_new.jpg", 1, 1.5, "ab" * 32)], [])
    result["applyAfterSnapshot"] = time.perf_counter() - started
    directory = tempfile.mkdtemp(prefix="indexmem-")
    try:
        path = os.path.join(directory, "peer_files.log")
        if hasattr(module, "listingOf"):
            from twisted.python.filepath import FilePath

            from p2pfiles.peerlog import writeLog

            target = FilePath(path)
            started = time.perf_counter()
            writeLog(target, snapshot, LEADER, EPOCH, NOW)
            result["write"] = time.perf_counter() - started
            with open(path, "rb") as f:
                result["identical"] = f.read() == expected
            result["pause"] = longestPause(lambda: writeLog(target, snapshot, LEADER, EPOCH, NOW))
            started = time.perf_counter()
            module.listingOf(snapshot)
            result["listing"] = time.perf_counter() - started
        else:
            from p2pfiles.atomic import atomicWrite
            from twisted.python.filepath import FilePath

            result["pause"] = longestPause(lambda: atomicWrite(FilePath(path), module.renderLog(snapshot, LEADER, EPOCH, NOW)))
            started = time.perf_counter()
            index.listing()
            result["listing"] = time.perf_counter() - started
    finally:
        shutil.rmtree(directory)
    return result


def runChild(kind: str, rev: Optional[str], total: int, nodes: int, shared: bool, trace: bool = False) -> Dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind, "--total", str(total), "--k", str(nodes)]
    if rev is not None:
        argv += ["--rev", rev]
    if shared:
        argv.append("--shared")
    if trace:
        argv.append("--trace")
    output = subprocess.run(argv, check=True, stdout=subprocess.PIPE, cwd=ROOT).stdout
    return json.loads(output.decode("utf-8").strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Memory per entry of the cluster index, and log writing speed.")
    parser.add_argument("--entries", default="100000,300000,1000000", help="comma-separated entry counts (memory)")
    parser.add_argument("--nodes", default="1,3,10", help="comma-separated node counts")
    parser.add_argument("--render", default="100000,1000000", help="comma-separated entry counts (render speed, over 3 nodes)")
    parser.add_argument("--baseline", default=None, help="also measure p2pfiles/index.py as of this git revision")
    parser.add_argument("--shared", action="store_true", help="every node holds the same names")
    parser.add_argument("--quick", action="store_true", help="100,000 entries over 1 and 3 nodes only")
    parser.add_argument("--child", choices=("memory", "render"), help=argparse.SUPPRESS)
    parser.add_argument("--rev", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = (childMemory if args.child == "memory" else childRender)(args)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.entries, args.nodes, args.render = "100000", "1,3", "100000"
    sizes = [int(n) for n in args.entries.split(",") if n]
    nodeCounts = [int(n) for n in args.nodes.split(",") if n]
    renders = [int(n) for n in args.render.split(",") if n]
    revisions: List[Optional[str]] = ([args.baseline] if args.baseline else []) + [None]

    rows = []
    for rev in revisions:
        for total in sizes:
            for nodes in nodeCounts:
                traced = runChild("memory", rev, total, nodes, args.shared, trace=True)
                measured = runChild("memory", rev, total, nodes, args.shared)
                rows.append(
                    [
                        (rev or "current"),
                        total,
                        nodes,
                        round(traced["local"] / total),
                        round(traced["index"] / total),
                        round((traced["local"] + traced["index"]) / total),
                        round(traced["listing"] / total),
                        round(measured["rssDelta"] / total),
                        round(measured["rss"] / common.MiB),
                        round(measured["hwm"] / common.MiB),
                        measured["seconds"],
                    ]
                )
                print("memory", rows[-1], file=sys.stderr, flush=True)
    print(f"What a leader holds, per entry of the whole index ({'shared' if args.shared else 'distinct'} names per node; node 1's are its own)")
    common.printTable(
        [
            "code", "entries", "nodes", "local index B", "ClusterIndex B", "both B", "ls answer B",
            "RSS B (both)", "RSS MiB", "peak MiB", "build s",
        ],
        rows,
    )
    print()

    rows = []
    for rev in revisions:
        for total in renders:
            r = runChild("render", rev, total, 3, args.shared)
            rows.append(
                [
                    (rev or "current"),
                    total,
                    round(total / r["render"]),
                    round(total / r["write"]) if "write" in r else None,
                    r.get("identical"),
                    r["snapshot"] * 1000,
                    r["applyAfterSnapshot"] * 1000,
                    r["listing"],
                    r["pause"] * 1000,
                    round(r["bytes"] / total),
                ]
            )
            print("render", rows[-1], file=sys.stderr, flush=True)
    print("Writing peer_files.log (3 nodes)")
    common.printTable(
        [
            "code",
            "entries",
            "renderLog lines/s",
            "writeLog lines/s",
            "same bytes",
            "snapshot ms",
            "apply after snapshot ms",
            "listing s",
            "longest pause ms",
            "B/line",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
