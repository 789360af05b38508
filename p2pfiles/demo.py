"""
C{p2pfiles demo}: the original system's scenario, end to end, on three real
nodes, and what this one does beyond it.

It runs real C{twistd -n p2pfiles} processes and the real C{p2pfiles}
command, exactly as a user would, and narrates one line per step.  Each node
serves its status page on a free loopback port (C{--web}); with C{--keep}
the cluster stays up after the story, node 1 back in it, until Ctrl-C.
Every process it starts is stopped again, on success, error or Ctrl-C.
"""

import argparse
import hashlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Dict, List, Optional

DEADLINE = 30.0


def twistdCommand() -> List[str]:
    """
    How to run twistd with this Python: the C{twistd} script beside it if
    there is one, else the same entry point through C{-c}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class DemoFailed(Exception):
    """
    A step did not do what it should; the message says which and why.
    """


class NodeExited(DemoFailed):
    """
    A node process ended on its own (its port taken, say).
    """


def makePNG(width: int = 1000, height: int = 1000, seed: int = 12241300) -> bytes:
    """
    A real, viewable PNG: colour bands with noise, stored with light
    compression so it weighs about 3 MB like the original demo's picture.
    """
    import random

    rng = random.Random(seed)
    rows = []
    for y in range(height):
        noise = rng.randbytes(width * 3)
        row = bytearray(1 + width * 3)  # filter byte 0, then RGB
        for x in range(width):
            i = 1 + 3 * x
            row[i] = (x * 255 // width + noise[3 * x] // 4) & 0xFF
            row[i + 1] = (y * 255 // height + noise[3 * x + 1] // 4) & 0xFF
            row[i + 2] = ((x + y) * 127 // width + noise[3 * x + 2] // 4) & 0xFF
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 1))
        + chunk(b"IEND", b"")
    )


def freePorts(count: int) -> List[int]:
    """
    C{count} ports that were free on 127.0.0.1 a moment ago.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def portsFor(count: int, preferred: List[int]) -> List[int]:
    """
    The preferred ports if all are free, else free ones.
    """

    def free(port: int) -> bool:
        with socket.socket() as s:
            # As Twisted listens: a recent connection's TIME_WAIT does not
            # make the port busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    if all(free(p) for p in preferred):
        return preferred
    return freePorts(count)


def sha256Of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Demo:
    def __init__(self, workspace: str, keep: bool, out: Any) -> None:
        self.workspace = workspace
        self.keep = keep
        self.out = out
        self.processes: Dict[int, subprocess.Popen] = {}
        self.ports: Dict[int, int] = {}
        self.webPorts: Dict[int, int] = {}
        self.secretFile = os.path.join(workspace, "cluster.secret")
        self.step = 0
        self.counts: Dict[int, int] = {}

    # Narration.

    def say(self, text: str) -> None:
        self.step += 1
        self.out.write(f"[{self.step}] {text}\n")
        self.out.flush()

    def detail(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            self.out.write(f"      {line}\n")
        self.out.flush()

    # Nodes and commands.

    def address(self, node: int) -> str:
        return f"127.0.0.1:{self.ports[node]}"

    def webURL(self, node: int) -> str:
        return f"http://127.0.0.1:{self.webPorts[node]}/"

    def nodeDir(self, node: int) -> str:
        return os.path.join(self.workspace, f"node{node}")

    def startNode(self, node: int) -> None:
        args = twistdCommand() + [
            "--logfile", os.path.join(self.nodeDir(node), "node.log"),
            "--pidfile", "",
            "-n", "p2pfiles",
            "--id", str(node), "--port", str(self.ports[node]),
            "--share", os.path.join(self.nodeDir(node), "files"),
            "--state", os.path.join(self.nodeDir(node), "state"),
            "--secret-file", self.secretFile,
            "--web", f"tcp:{self.webPorts[node]}:interface=127.0.0.1",
        ]
        for peer in sorted(self.ports):
            if peer != node:
                args += ["--peer", f"{peer}@{self.address(peer)}"]
        self.processes[node] = subprocess.Popen(
            args, cwd=self.nodeDir(node), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def p2pfiles(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "p2pfiles", *args, "--secret-file", self.secretFile],
            capture_output=True, text=True, timeout=DEADLINE * 4, stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise DemoFailed(f"p2pfiles {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def fingerprint(self, node: int) -> str:
        """
        The node's certificate fingerprint, read from its state directory.
        """
        result = subprocess.run(
            [sys.executable, "-m", "p2pfiles", "id", "--state", os.path.join(self.nodeDir(node), "state")],
            capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise DemoFailed(f"p2pfiles id for node {node} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def status(self, node: int) -> Optional[Dict[str, Any]]:
        result = self.p2pfiles("status", "--node", self.address(node), "--json", "--timeout", "3", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def waitForAgreement(self, nodes: List[int], leader: int) -> Dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while True:
            for node in nodes:
                if self.processes[node].poll() is not None:
                    raise NodeExited(f"node {node} exited (status {self.processes[node].returncode})")
            statuses = [self.status(n) for n in nodes]
            if all(s is not None for s in statuses):
                views = {(s["leader"], s["epoch"]) for s in statuses}
                alive = all(
                    sum(m["alive"] for m in s["members"]) == len(nodes) for s in statuses
                )
                if len(views) == 1 and views.pop()[0] == leader and alive:
                    return statuses[0]
            if time.monotonic() > deadline:
                raise DemoFailed(f"nodes {nodes} did not agree on leader {leader} within {DEADLINE:g}s")
            time.sleep(0.1)

    def stopAll(self) -> None:
        """
        Stop every node: SIGTERM, then SIGKILL for one still running after
        10 s, or for all that are left at once if Ctrl-C comes again.
        """
        for node, process in self.processes.items():
            if process.poll() is None:
                process.terminate()
        hurry = False
        for node, process in self.processes.items():
            try:
                if not hurry:
                    process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                hurry = True
            if process.poll() is None:
                process.kill()
                process.wait()

    # The story.

    def pickWebPorts(self) -> None:
        """
        Free loopback ports for the nodes' status pages, none of them a
        node's port.
        """
        while True:
            ports = freePorts(3)
            if not set(ports) & set(self.ports.values()):
                self.webPorts = dict(zip([1, 2, 3], ports))
                return

    def startCluster(self) -> Dict[str, Any]:
        """
        Start nodes 1-3 on ports 9001-9003, or on free ports if those are
        taken (also if another program takes one between our check and the
        node's start), each with its status page on a free port, and wait
        until they agree on leader 1.
        """
        preferred = [9001, 9002, 9003]
        self.ports = dict(zip([1, 2, 3], portsFor(3, preferred)))
        self.pickWebPorts()
        for attempt in range(3):
            for node in (1, 2, 3):
                self.startNode(node)
            try:
                return self.waitForAgreement([1, 2, 3], 1)
            except NodeExited:
                self.stopAll()
                self.ports = dict(zip([1, 2, 3], freePorts(3)))
                self.pickWebPorts()
        raise DemoFailed("the nodes could not start: see node*/node.log in the workspace")

    def run(self) -> None:
        self.prepare()
        started = time.monotonic()
        status = self.startCluster()
        self.say(
            f"started nodes 1, 2, 3 on ports {', '.join(str(self.ports[n]) for n in (1, 2, 3))}; "
            f"they elected leader: {status['leader']}, epoch {status['epoch']} "
            f"in {time.monotonic() - started:.1f}s"
        )
        self.say("every connection is TLS; each node made its certificate on its first start:")
        self.detail("\n".join(f"node {n}: {self.fingerprint(n)}" for n in (1, 2, 3)))
        self.detail(self.p2pfiles("status", "--node", self.address(3)).stdout)
        self.detail("\n".join(f"node {n} status page: {self.webURL(n)}" for n in (1, 2, 3)))
        self.showLog(1, expectFiles=sum(self.counts.values()))
        self.fetchAndCompare()
        self.failover()

    def keepRunning(self) -> None:
        """
        After the story (C{--keep}): node 1 back in the cluster, then wait
        for Ctrl-C.  Nothing here is part of the story, so an interrupt
        from the first line on is a normal stop, not a failed demo.
        """
        if self.keep:
            self.startNode(1)
            status = self.waitForAgreement([1, 2, 3], 1)
            self.say(f"restarted node 1: it leads again, epoch {status['epoch']}")
            self.say("nodes left running (--keep): their status pages are above; talk to them with:")
            self.detail(
                f"p2pfiles status --node {self.address(2)} --secret-file {self.secretFile}\n"
                f"p2pfiles ls --node {self.address(2)} --secret-file {self.secretFile}"
            )
            self.out.write("press Ctrl-C to stop them\n")
            self.out.flush()
            self.waitForInterrupt()

    def waitForInterrupt(self) -> None:
        """
        Return only by Ctrl-C (or SIGTERM): a L{KeyboardInterrupt}.
        """
        while True:
            signal.pause()

    def prepare(self) -> None:
        os.makedirs(self.workspace, exist_ok=True)
        with open(self.secretFile, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.chmod(self.secretFile, 0o600)
        files = {
            1: {"readme.txt": b"Shared from node 1, the first leader.\n" * 40},
            2: {"12241300.png": makePNG(), "notes.txt": ("line of text\n" * 700).encode()},
            3: {"data.bin": os.urandom(4096 * 64), "empty.txt": b""},
        }
        for node, named in files.items():
            share = os.path.join(self.nodeDir(node), "files")
            os.makedirs(share, exist_ok=True)
            for name, data in named.items():
                with open(os.path.join(share, name), "wb") as f:
                    f.write(data)
        self.counts = {node: len(named) for node, named in files.items()}
        png = os.path.getsize(os.path.join(self.nodeDir(2), "files", "12241300.png"))
        self.say(
            f"workspace {self.workspace}: 3 node directories, {sum(self.counts.values())} files, "
            f"12241300.png ({png / 1e6:.1f} MB, a real PNG) on node 2"
        )

    def showLog(self, leader: int, expectFiles: int) -> None:
        path = os.path.join(self.nodeDir(leader), "state", "peer_files.log")
        deadline = time.monotonic() + DEADLINE
        text = ""
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if f"# files: {expectFiles}\n" in text and f"# leader: {leader}\n" in text:
                    break
            time.sleep(0.1)
        else:
            raise DemoFailed(f"node {leader}'s peer_files.log never listed {expectFiles} files")
        self.say(f"leader {leader}'s {path}:")
        self.detail(text)

    def fetchAndCompare(self) -> None:
        started = time.monotonic()
        result = self.p2pfiles("fetch", "12241300.png", "--node", self.address(3), "--json")
        took = time.monotonic() - started
        original = sha256Of(os.path.join(self.nodeDir(2), "files", "12241300.png"))
        fetched = sha256Of(os.path.join(self.nodeDir(3), "files", "12241300.png"))
        reply = json.loads(result.stdout)
        self.say(f"node 3 fetched 12241300.png ({reply['size']} bytes) through leader 1 from node 2 in {took:.2f}s")
        self.detail(f"node 2: {original}\nnode 3: {fetched}")
        if original != fetched:
            raise DemoFailed("the SHA-256 sums differ")
        self.detail("the SHA-256 sums match")

    def failover(self) -> None:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "p2pfiles", "status", "--watch", "--json",
             "--node", self.address(3), "--secret-file", self.secretFile],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        )
        lines: "queue.Queue[tuple]" = queue.Queue()

        def read() -> None:
            assert watcher.stdout is not None
            for line in watcher.stdout:
                lines.put((time.monotonic(), line))

        threading.Thread(target=read, daemon=True).start()
        try:
            arrived, line = lines.get(timeout=DEADLINE)  # the current state
            killed = time.monotonic()
            self.processes[1].send_signal(signal.SIGKILL)
            self.processes[1].wait()
            while True:
                remaining = killed + DEADLINE - time.monotonic()
                if remaining <= 0:
                    raise DemoFailed("node 2 did not take over")
                arrived, line = lines.get(timeout=remaining)
                state = json.loads(line)
                if state["leader"] == 2:
                    break
        finally:
            watcher.terminate()
            watcher.wait()
        self.say(
            f"killed leader 1 with SIGKILL: node 2 took over in epoch {state['epoch']}, "
            f"{(arrived - killed) * 1000:.0f} ms later (seen by node 3)"
        )
        # Node 3 now holds the PNG too; node 1's files are gone with it.
        self.showLog(2, expectFiles=sum(self.counts.values()) - self.counts[1] + 1)
        target = os.path.join(self.workspace, "downloads")
        os.makedirs(target, exist_ok=True)
        result = self.p2pfiles("get", "data.bin", "--node", self.address(2), "-o", target, "--json")
        summary = json.loads(result.stdout)
        same = sha256Of(os.path.join(target, "data.bin")) == sha256Of(os.path.join(self.nodeDir(3), "files", "data.bin"))
        self.say(
            f"got data.bin ({summary['size']} bytes) through new leader {summary['via'][0]} "
            f"from node {summary['via'][1]}: {'identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise DemoFailed("data.bin differs from the original")


def main(argv: Optional[List[str]] = None, out: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pfiles demo", description="Run three local nodes through the original scenario.")
    parser.add_argument("--dir", help="workspace directory (default: a new temporary one, removed afterwards)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the nodes and their status pages running until Ctrl-C"
    )
    args = parser.parse_args(argv)
    out = out or sys.stdout
    workspace = args.dir or tempfile.mkdtemp(prefix="p2pfiles-demo-")
    demo = Demo(os.path.abspath(workspace), args.keep, out)
    started = time.monotonic()
    # Ctrl-C and SIGTERM stop the demo the same way, even if this process
    # was started with SIGINT ignored (in the background, by a shell).
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    took: Optional[float] = None
    try:
        demo.run()
        took = time.monotonic() - started
        demo.keepRunning()
    except KeyboardInterrupt:
        if took is None:
            out.write("interrupted: stopping the nodes\n")
            return 130
        out.write("stopping the nodes\n")
        out.flush()
    except DemoFailed as e:
        out.write(f"demo failed: {e}\n")
        return 1
    finally:
        demo.stopAll()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.dir is None:
            shutil.rmtree(workspace, ignore_errors=True)
    out.write(f"demo finished in {took:.1f}s: every step succeeded; all nodes stopped\n")
    return 0
