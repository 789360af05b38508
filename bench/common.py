"""
Helpers shared by the p2pfiles benchmarks.

  - free ports, and a L{Cluster} of real C{twistd -n p2pfiles} processes, each
    in its own process group with its own log file, in a temporary directory;
  - asking a node for its status, either with the real CLI
    (C{p2pfiles status --json}) or with a small blocking client in this
    process (L{directStatus}: the same TLS and handshake and a C{status}
    request over a blocking socket, cheap enough to poll 32 nodes every few
    milliseconds);
  - waiting until every node reports the same leader and epoch;
  - L{Watch}: a C{p2pfiles status --watch --json} subprocess whose stdout
    lines are timestamped with C{time.monotonic()} as they arrive;
  - RSS readers (VmRSS, VmHWM from C{/proc/PID/status}) and a sampler thread;
  - a median helper, a table printer and L{Figure}, one line of a summary.

Every process started here is registered and killed (whole process group) by
L{stopAll}, which the benchmarks call in a C{finally}; SIGTERM and SIGHUP are
turned into an exception so that the C{finally} runs for them too.
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

BIN = os.path.dirname(os.path.abspath(sys.executable))
TWISTD = os.path.join(BIN, "twistd")
P2PFILES = os.path.join(BIN, "p2pfiles")
PYTHON = sys.executable
MiB = 1024 * 1024

# Every process we started and have not yet reaped: pid -> Popen.
_processes: Dict[int, subprocess.Popen] = {}
_processLock = threading.Lock()


# Processes.


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """
    Start C{argv} in a new session (so in its own process group) and
    remember it for L{stopAll}.
    """
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    # Not the source tree: "python -m p2pfiles" must import the installed package.
    kwargs.setdefault("cwd", "/")
    process = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
    with _processLock:
        _processes[process.pid] = process
    return process


def stopProcess(process: subprocess.Popen, grace: float = 10.0) -> Optional[int]:
    """
    SIGCONT then SIGTERM the process group of C{process} (so a stopped node
    can exit), wait up to C{grace} seconds, then SIGKILL it.  Returns the
    exit code.
    """
    if process.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (the leader may have exited first).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
    with _processLock:
        _processes.pop(process.pid, None)
    return process.returncode


def stopAll() -> None:
    """
    Stop every process started with L{spawn} that is still registered.
    """
    with _processLock:
        processes = list(_processes.values())
    for process in processes:
        stopProcess(process, grace=5.0)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(f"interrupted by signal {signum}")


def installSignalHandlers() -> None:
    """
    Make SIGTERM and SIGHUP raise C{SystemExit}, so that C{finally} blocks
    (which stop the processes and remove the directories) run.  Ctrl-C
    already raises C{KeyboardInterrupt}.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        signal.signal(signal.SIGHUP, _terminated)


def makeTempDir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"p2pbench-{prefix}-", dir="/tmp")


def removeTree(path: Optional[str]) -> None:
    if path and path.startswith("/tmp/") and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


# Ports.

_givenPorts: set = set()


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on now and that this
    process has not handed out before.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _givenPorts:
            _givenPorts.add(port)
            return port
    raise RuntimeError("no free port found")


def waitForPort(port: int, deadline: float) -> bool:
    """
    Wait until something accepts connections on C{port} (or the monotonic
    C{deadline} passes).
    """
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# Status.


def _sendMessage(sock: socket.socket, message: Any) -> None:
    from p2pfiles.wire import encode

    payload = encode(message)
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def _receiveExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("connection closed")
        data += more
    return data


def _receiveMessage(sock: socket.socket) -> Any:
    from p2pfiles.wire import decode

    (length,) = struct.unpack("!I", _receiveExactly(sock, 4))
    message = decode(_receiveExactly(sock, length))
    if message.type == "error":
        raise ConnectionError(f"refused: {message.reason}")
    return message


def directConnect(
    address: str, timeout: float = 2.0, secret: bytes = b"", source: Optional[str] = None, receiveBuffer: Optional[int] = None
) -> Any:
    """
    A client connection to the node at C{address}, secured and
    authenticated as C{p2pfiles} does it, over a blocking socket from this
    process: the client's side of the handshake (see
    L{p2pfiles.protocol}).  Returns the C{OpenSSL.SSL.Connection}, ready
    for a request.  C{source}: the local address to bind (any of
    127.0.0.0/8 on Linux); C{receiveBuffer}: C{SO_RCVBUF}, set before
    connecting.  Raises C{OSError} (or C{ValueError}) when the node cannot
    answer.
    """
    from OpenSSL import SSL

    from p2pfiles import auth
    from p2pfiles.identity import fingerprintOf
    from p2pfiles.tls import EXPORTER_LABEL, EXPORTER_LENGTH, makeContext
    from p2pfiles.wire import PROTOCOL_VERSION, Message, encode

    host, port = address.rsplit(":", 1)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receiveBuffer is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
        if source is not None:
            raw.bind((source, 0))
        raw.settimeout(timeout)
        raw.connect((host, int(port)))
        # OpenSSL wants a blocking socket: bound its waits in the kernel.
        raw.settimeout(None)
        limit = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock = SSL.Connection(makeContext(None, server=False), raw)
        sock.set_connect_state()
        sock.do_handshake()
        exporter = sock.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
        mine = Message(
            "hello",
            version=PROTOCOL_VERSION,
            role="client",
            node=None,
            nonce=auth.makeNonce(),
            address=None,
            purpose="request",
            fingerprint=None,
        )
        _sendMessage(sock, mine)
        hello = _receiveMessage(sock)
        presented = sock.get_peer_certificate(as_cryptography=True)
        if hello.type != "hello" or presented is None:
            raise ConnectionError(f"bad handshake from {address}")
        from cryptography.hazmat.primitives.serialization import Encoding

        if hello.fingerprint != fingerprintOf(presented.public_bytes(Encoding.DER)):
            raise ConnectionError(f"{address}: the hello names another certificate")
        proof = _receiveMessage(sock)
        transcript = (exporter, encode(mine), encode(hello))
        if proof.type != "auth" or not auth.verify(secret, auth.LISTENER, *transcript, proof.proof):
            raise ConnectionError(f"bad proof from {address}")
        _sendMessage(sock, Message("auth", proof=auth.proof(secret, auth.CONNECTOR, *transcript)))
        _receiveMessage(sock)  # ready
        return sock
    except BaseException:
        raw.close()
        raise


def directStatus(address: str, timeout: float = 2.0, secret: bytes = b"") -> Dict[str, Any]:
    """
    What C{p2pfiles status --json} would print for the node at C{address},
    asked over a blocking TLS socket from this process (starting a CLI
    process per poll would cost more CPU than what is measured): the
    handshake of L{directConnect}, then one C{status} request.  Raises
    C{OSError} (or C{ValueError}) when the node cannot answer.
    """
    from p2pfiles.wire import Message

    sock = directConnect(address, timeout, secret)
    try:
        _sendMessage(sock, Message("status", watch=False))
        return _receiveMessage(sock).status
    finally:
        sock.close()


def directListingCount(address: str, timeout: float = 10.0, secret: bytes = b"") -> int:
    """
    How many rows C{p2pfiles ls --json} would print for the node at
    C{address} (asked as L{directStatus} asks for the status).
    """
    from p2pfiles.wire import Message

    sock = directConnect(address, timeout, secret)
    try:
        _sendMessage(sock, Message("ls"))
        count = 0
        while True:
            message = _receiveMessage(sock)
            if message.type != "listing":
                raise ConnectionError(f"{address} answered ls with {message.type}")
            count += len(message.files)
            if message.last:
                return count
    finally:
        sock.close()


def cliStatus(address: str, timeout: float = 5.0) -> Dict[str, Any]:
    """
    The output of C{p2pfiles status --json --node ADDRESS}.
    """
    result = subprocess.run(
        [P2PFILES, "status", "--json", "--node", address, "--timeout", str(timeout)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout + 10,
        start_new_session=True,
    )
    if result.returncode != 0:
        raise OSError(f"p2pfiles status exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    return json.loads(result.stdout)


def statuses(addresses: Sequence[str], useCli: bool = True, timeout: float = 2.0) -> List[Optional[Dict[str, Any]]]:
    """
    Ask every node at once; L{None} for a node that did not answer.
    """

    def one(address: str) -> Optional[Dict[str, Any]]:
        try:
            if useCli:
                return cliStatus(address, timeout)
            return directStatus(address, timeout)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    workers = min(len(addresses), 8 if useCli else 32)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, addresses))


def agreement(
    replies: Sequence[Optional[Dict[str, Any]]], expectLeader: Optional[int] = None, allAlive: bool = False
) -> Optional[Tuple[int, int]]:
    """
    C{(leader, epoch)} if every reply names the same non-null leader and the
    same epoch (and the expected leader, and every member alive, if asked);
    else L{None}.
    """
    if not replies or any(r is None for r in replies):
        return None
    views = {(r["leader"], r["epoch"]) for r in replies}
    if len(views) != 1:
        return None
    leader, epoch = views.pop()
    if leader is None or (expectLeader is not None and leader != expectLeader):
        return None
    if allAlive:
        for r in replies:
            members = r["members"]
            if len(members) != len(replies) or not all(m["alive"] for m in members):
                return None
    return leader, epoch


def waitConverged(
    addresses: Sequence[str],
    timeout: float = 30.0,
    expectLeader: Optional[int] = None,
    allAlive: bool = True,
    useCli: bool = True,
    interval: float = 0.05,
) -> Tuple[int, int, float]:
    """
    Poll until every node agrees (see L{agreement}); return C{(leader,
    epoch, seconds waited)}.  Raises C{TimeoutError} after C{timeout}.
    """
    started = time.monotonic()
    deadline = started + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = statuses(addresses, useCli=useCli)
        agreed = agreement(last, expectLeader, allAlive)
        if agreed is not None:
            return agreed[0], agreed[1], time.monotonic() - started
        time.sleep(interval)
    views = [None if r is None else (r["id"], r["leader"], r["epoch"]) for r in (last or [])]
    raise TimeoutError(f"no agreement within {timeout:g}s: (id, leader, epoch) = {views}")


class Watch:
    """
    C{p2pfiles status --watch --json} against one node.  A thread reads its
    stdout and stamps every line with C{time.monotonic()} on arrival.
    """

    def __init__(self, address: str, stderrPath: str) -> None:
        self.address = address
        self.lines: List[Tuple[float, Dict[str, Any]]] = []
        self._condition = threading.Condition()
        self._stderr = open(stderrPath, "ab")
        self.process = spawn(
            [P2PFILES, "status", "--watch", "--json", "--node", address],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, b""):
            arrived = time.monotonic()
            try:
                status = json.loads(line)
            except ValueError:
                continue
            with self._condition:
                self.lines.append((arrived, status))
                self._condition.notify_all()
        with self._condition:
            self._condition.notify_all()

    def waitFor(
        self, predicate: Callable[[Dict[str, Any]], bool], after: float = 0.0, timeout: float = 10.0
    ) -> Optional[Tuple[float, Dict[str, Any]]]:
        """
        The first line that arrived at or after C{after} and satisfies
        C{predicate}, waiting up to C{timeout}; L{None} if none came.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for arrived, status in self.lines:
                    if arrived >= after and predicate(status):
                        return arrived, status
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    return None
                self._condition.wait(min(remaining, 0.1))

    def stop(self) -> None:
        stopProcess(self.process, grace=2.0)
        self._reader.join(2.0)
        self._stderr.close()


# A cluster of real nodes.


class NodeProcess:
    """
    One node: its id, port, directories, log and (while running) process.
    """

    def __init__(self, id: int, port: int, root: str) -> None:
        self.id = id
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.share = os.path.join(root, f"node{id}", "share")
        self.state = os.path.join(root, f"node{id}", "state")
        self.log = os.path.join(root, f"node{id}", "twistd.log")
        self.output = os.path.join(root, f"node{id}", "stdout.log")
        self.process: Optional[subprocess.Popen] = None
        os.makedirs(self.share, exist_ok=True)
        os.makedirs(self.state, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def peerFilesLog(self) -> str:
        return os.path.join(self.state, "peer_files.log")


class Cluster:
    """
    N nodes with ids C{1..N} (the leader is node 1, the smallest id), in a
    temporary directory under /tmp.

    @param peers: C{"cluster"}: every node gets a C{--cluster} file listing
        all; C{"seed"}: every node but the first gets C{--peer} to node 1 only
        (and node 1 none), so the rest is learned from heartbeats; C{"none"}:
        no peers at all (isolated nodes, to time bare process start-up).
    """

    def __init__(self, count: int, root: str, peers: str = "cluster", extraArgs: Sequence[str] = ()) -> None:
        self.root = root
        self.peers = peers
        self.extraArgs = list(extraArgs)
        self.nodes: Dict[int, NodeProcess] = {}
        for id in range(1, count + 1):
            self.nodes[id] = NodeProcess(id, freePort(), root)
        self.clusterFile = os.path.join(root, "cluster.txt")
        with open(self.clusterFile, "w") as f:
            for node in self.nodes.values():
                f.write(f"{node.id} {node.address}\n")

    def addresses(self, ids: Optional[Iterable[int]] = None) -> List[str]:
        ids = sorted(self.nodes) if ids is None else ids
        return [self.nodes[i].address for i in ids]

    def argv(self, id: int, prefix: Sequence[str] = ()) -> List[str]:
        node = self.nodes[id]
        argv = list(prefix) + [TWISTD, "-n", "--pidfile", "", "-l", node.log, "p2pfiles", "--id", str(id)]
        argv += ["--port", str(node.port), "--share", node.share, "--state", node.state]
        if self.peers == "cluster":
            argv += ["--cluster", self.clusterFile]
        elif self.peers == "seed" and id != min(self.nodes):
            first = self.nodes[min(self.nodes)]
            argv += ["--peer", f"{first.id}@{first.address}"]
        return argv + self.extraArgs

    def start(self, id: int, prefix: Sequence[str] = ()) -> subprocess.Popen:
        """
        Start node C{id} (C{prefix} goes before twistd, e.g. a profiler).
        """
        node = self.nodes[id]
        with open(node.output, "ab") as out:
            node.process = spawn(self.argv(id, prefix), stdout=out, stderr=subprocess.STDOUT)
        return node.process

    def startAll(self) -> float:
        """
        Start every node, smallest id first; return the C{time.monotonic()}
        at which the last C{Popen} returned.
        """
        for id in sorted(self.nodes):
            self.start(id)
        return time.monotonic()

    def waitListening(self, timeout: float = 30.0, ids: Optional[Iterable[int]] = None) -> None:
        deadline = time.monotonic() + timeout
        for id in sorted(self.nodes) if ids is None else ids:
            node = self.nodes[id]
            if not waitForPort(node.port, deadline):
                raise TimeoutError(f"node {id} is not listening on {node.port} after {timeout:g}s; see {node.log}")

    def signal(self, id: int, sig: int) -> None:
        os.kill(self.nodes[id].pid, sig)

    def stop(self, id: int, grace: float = 15.0) -> Optional[int]:
        node = self.nodes[id]
        if node.process is None:
            return None
        code = stopProcess(node.process, grace)
        node.process = None
        return code

    def stopAll(self, grace: float = 15.0) -> None:
        # Signal them all first, so that a large cluster stops in parallel.
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(node.process.pid, sig)
                    except ProcessLookupError:
                        pass
        for id in sorted(self.nodes):
            self.stop(id, grace)

    def waitConverged(self, ids: Optional[Iterable[int]] = None, **kwargs: Any) -> Tuple[int, int, float]:
        return waitConverged(self.addresses(ids), **kwargs)


# Memory.


def procStatus(pid: int) -> Dict[str, int]:
    """
    The C{Vm*} lines of C{/proc/PID/status}, in bytes (empty if it is gone).
    """
    result = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Vm") and line.rstrip().endswith("kB"):
                    key, value = line.split(":", 1)
                    result[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return result


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU time used so far by C{pid} (0 if it is gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """
    Sample VmRSS and VmHWM of C{pid} every C{interval} seconds in a thread;
    keep the largest of each.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.maxRss = 0
        self.maxHwm = 0
        self.samples = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            status = procStatus(self.pid)
            if not status:
                break
            self.samples += 1
            self.maxRss = max(self.maxRss, status.get("VmRSS", 0))
            self.maxHwm = max(self.maxHwm, status.get("VmHWM", 0))
            self._stopping.wait(self.interval)

    def stop(self) -> "RssSampler":
        self._stopping.set()
        self._thread.join(5)
        return self


# Files.


def writeRandomFile(path: str, size: int, block: int = MiB, distinct: int = 16) -> None:
    """
    Write C{size} bytes of random data: C{distinct} random blocks of
    C{block} bytes, repeated.  Real bytes on disk (not sparse), as costly to
    hash and to send as any other data.
    """
    blocks = [os.urandom(block) for _ in range(distinct)]
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            data = blocks[i % distinct][: size - written]
            f.write(data)
            written += len(data)
            i += 1


# Numbers and tables.


def logHeader(path: str) -> Dict[str, int]:
    """
    The integer header fields of peer_files.log ({} if there is none yet).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1024).decode("utf-8", "replace")
    except FileNotFoundError:
        return {}
    header = {}
    for line in head.split("\n"):
        match = re.match(r"# (epoch|files|nodes|leader): (\d+)$", line)
        if match:
            header[match.group(1)] = int(match.group(2))
    return header


def versionOf(path: str) -> Tuple[int, int]:
    """
    Which version of C{path} is there: its inode and mtime (a file replaced
    by rename has a new inode); (0, 0) if there is none.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)


def waitForVersion(
    path: str, accept: Callable[[str], bool], deadline: float, seen: Tuple[int, int] = (0, 0), poll: float = 0.01
) -> Optional[float]:
    """
    Look at C{path} every C{poll} seconds until a version of it other than
    C{seen} (see L{versionOf}) is one that C{accept(path)} takes; return the
    monotonic time that version was first seen, or None at C{deadline}.
    Each version is read once.
    """
    while time.monotonic() < deadline:
        version = versionOf(path)
        if version != (0, 0) and version != seen:
            noticed = time.monotonic()
            seen = version
            if accept(path):
                return noticed
        time.sleep(poll)
    return None


def dataLines(path: str) -> int:
    """
    How many entries (non-header lines) peer_files.log holds.
    """
    with open(path, "rb") as f:
        return sum(1 for line in f if not line.startswith(b"#"))


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def printTable(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: Any = None) -> None:
    out = out or sys.stdout
    rows = [[fmt(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out.write(line.rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    out.flush()


class Figure:
    """
    One measured figure against its target, for the summary table.

    @param ratio: measured relative to the baseline where there is one, else
        to the target (computed so that >= 1 means the target is met for
        "at least" targets and <= 1 for "at most" targets).
    """

    def __init__(
        self,
        name: str,
        measured: Optional[float],
        unit: str,
        target: Optional[float],
        kind: str = "max",
        baseline: Optional[float] = None,
        note: str = "",
    ) -> None:
        self.name = name
        self.measured = measured
        self.unit = unit
        self.target = target
        self.kind = kind  # "max": measured <= target; "min": measured >= target
        self.baseline = baseline
        self.note = note

    @property
    def ratio(self) -> Optional[float]:
        if self.measured is None:
            return None
        reference = self.baseline if self.baseline is not None else self.target
        if not reference:
            return None
        return self.measured / reference

    @property
    def passed(self) -> Optional[bool]:
        if self.target is None:
            return None
        if self.measured is None or self.measured != self.measured:
            return False
        value = self.ratio if self.baseline is not None else self.measured
        if value is None:
            return False
        return value <= self.target if self.kind == "max" else value >= self.target

    def targetText(self) -> str:
        if self.target is None:
            return "(info)"
        sign = "<=" if self.kind == "max" else ">="
        if self.baseline is not None:
            return f"{sign} {self.target:g}x baseline"
        return f"{sign} {self.target:g} {self.unit}"

    def verdict(self) -> str:
        passed = self.passed
        return "-" if passed is None else ("PASS" if passed else "MISS")

    def row(self) -> List[Any]:
        measured = "-" if self.measured is None else f"{fmt(self.measured)} {self.unit}"
        ratio = self.ratio
        return [self.name, self.targetText(), measured, "-" if ratio is None else f"{ratio:.2f}", self.verdict()]


FIGURE_HEADERS = ["figure", "target", "measured", "ratio", "verdict"]


def printFigures(figures: Sequence[Figure], out: Any = None) -> None:
    printTable(FIGURE_HEADERS, [f.row() for f in figures], out)
