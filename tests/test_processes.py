"""
Integration tests with real processes: twistd nodes killed, hung, restarted,
and the p2pfiles command as a user runs it.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.support import DEADLINE, NodeProcess, childEnvironment, cli, freePorts, poll, startProcesses, statusOf
from p2pfiles.demo import twistdCommand


def agreement(nodes, leader):
    """
    The common epoch if every node in C{nodes} follows C{leader} and sees
    all of them alive, else None.
    """
    statuses = [statusOf(n.address) for n in nodes]
    if any(s is None for s in statuses):
        return None
    views = {(s["leader"], s["epoch"]) for s in statuses}
    if len(views) != 1:
        return None
    seenLeader, epoch = views.pop()
    ids = {n.id for n in nodes}
    for s in statuses:
        if {m["id"] for m in s["members"] if m["alive"]} != ids:
            return None
    return epoch if seenLeader == leader else None


class ElectionProcessTests(SynchronousTestCase):
    """
    The election across real processes.
    """

    def test_killAndRestartLeader(self):
        """
        kill -9 of the leader: the survivors agree on the next smallest id in
        a new epoch.  Restarted, the old leader takes over again in a higher
        epoch still (its epoch survived on disk), and the cluster stays put.
        """
        nodes = startProcesses(self, [1, 2, 3])
        first = poll(lambda: agreement(nodes.values(), 1), "leader 1")
        nodes[1].kill()
        second = poll(lambda: agreement([nodes[2], nodes[3]], 2), "leader 2")
        self.assertGreater(second, first)
        nodes[1].start()
        third = poll(lambda: agreement(nodes.values(), 1), "leader 1 again")
        self.assertGreater(third, second)
        saved = int(nodes[1].dir.child("state").child("epoch").getContent())
        self.assertGreaterEqual(saved, third)
        for _ in range(5):
            self.assertEqual(agreement(nodes.values(), 1), third)

    def test_hungLeader(self):
        """
        SIGSTOP of the leader: the others agree on the next smallest id once
        it has been silent for the leader timeout.  SIGCONT: it learns the new
        epoch, then takes over with a higher one, and nobody flaps after.
        """
        nodes = startProcesses(self, [1, 2, 3])
        first = poll(lambda: agreement(nodes.values(), 1), "leader 1")
        nodes[1].signal(signal.SIGSTOP)
        second = poll(lambda: agreement([nodes[2], nodes[3]], 2), "leader 2 while 1 is hung")
        self.assertGreater(second, first)
        nodes[1].signal(signal.SIGCONT)
        third = poll(lambda: agreement(nodes.values(), 1), "leader 1 after SIGCONT")
        self.assertGreater(third, second)
        for _ in range(5):
            self.assertEqual(agreement(nodes.values(), 1), third)


class CommandTests(SynchronousTestCase):
    """
    The p2pfiles command against real nodes.
    """

    def test_statusAndErrors(self):
        """
        status --json prints the contract fields (and the node's own:
        address, fingerprint, refused links, which coordinator it runs and
        how late its timers ran); a wrong secret, an unreachable node, an
        unknown file and a traversal name are each one line on stderr with
        their documented exit codes, and create nothing.
        """
        secret = FilePath(self.mktemp())
        secret.setContent(b"s3cret\n")
        nodes = startProcesses(self, [1, 2], extra=["--secret-file", secret.path])
        wrong = FilePath(self.mktemp())
        wrong.setContent(b"nope\n")

        def status():
            result = cli("status", "--node", nodes[2].address, "--json", "--secret-file", secret.path)
            return json.loads(result.stdout) if result.returncode == 0 else None

        got = poll(lambda: (s := status()) and s["leader"] == 1 and s, "leader 1")
        self.assertEqual(
            set(got),
            {
                "id", "address", "role", "leader", "epoch", "members", "version", "fingerprint", "refused",
                "conflicts", "coordinator", "max_timer_delay",
            },
        )
        self.assertEqual(got["conflicts"], [])
        self.assertEqual((got["id"], got["role"], got["coordinator"]), (2, "follower", "builtin"))
        # How late the node's timers ran in the last minute, in seconds.
        delay = got["max_timer_delay"]
        self.assertTrue(isinstance(delay, (int, float)) and not isinstance(delay, bool), delay)
        self.assertGreaterEqual(delay, 0)
        # The node's own fingerprint is the one `p2pfiles id` reads from its
        # state, and its peer's is the one it saw on their link.
        own = cli("id", "--state", nodes[2].dir.child("state").path)
        self.assertEqual(got["fingerprint"], own.stdout.decode().strip())
        other = cli("id", "--state", nodes[1].dir.child("state").path).stdout.decode().strip()
        self.assertEqual({m["id"]: m.get("fingerprint") for m in got["members"]}, {1: other, 2: None})

        result = cli("status", "--node", nodes[1].address, "--secret-file", wrong.path)
        self.assertEqual(result.returncode, 4)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

        [closed] = freePorts(1)
        result = cli("status", "--node", f"127.0.0.1:{closed}")
        self.assertEqual(result.returncode, 3)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

        out = FilePath(self.mktemp())
        out.makedirs()
        result = cli("get", "nothing.here", "--node", nodes[2].address, "--secret-file", secret.path, cwd=out.path)
        self.assertEqual(result.returncode, 6)
        self.assertEqual(result.stderr.decode().strip(), "p2pfiles get: error: not found: nothing.here")
        result = cli("get", "../secret", "--node", nodes[2].address, "--secret-file", secret.path, cwd=out.path)
        self.assertEqual(result.returncode, 9)
        self.assertEqual(out.listdir(), [])

    def test_badOptionsExitNonZero(self):
        """
        A node started without --id, or with a peer naming its own id, exits
        non-zero with a one-line reason.
        """
        cases = [
            (["--port", "0"], b"--id is required"),
            (["--id", "1", "--peer", "1@127.0.0.1:9"], b"names this node's own id 1"),
            (["--id", "-3"], b"--id must be a non-negative integer"),
            (["--id", "1", "--interface", "0.0.0.0"], b"refusing to listen without --secret-file"),
        ]
        for args, reason in cases:
            result = subprocess.run(
                twistdCommand() + ["-n", "p2pfiles"] + args,
                env=childEnvironment(),
                capture_output=True,
                timeout=DEADLINE,
                stdin=subprocess.DEVNULL,
            )
            self.assertNotEqual(result.returncode, 0, args)
            # twistd prints the usage, then the reason on a line of its own.
            [line] = [l for l in (result.stdout + result.stderr).splitlines() if reason in l]
            self.assertTrue(line.startswith(b"/") or line.startswith(b"twistd"), line)

    def test_getSurvivesLeaderKill(self):
        """
        kill -9 of the leader in the middle of a large relayed get: the
        client finds the new leader among the members it learned at the start
        and resumes; the file arrives identical.
        """
        nodes = startProcesses(self, [1, 2, 3])
        data = os.urandom(24 * 1024 * 1024)
        nodes[3].share.child("big.bin").setContent(data)
        poll(lambda: agreement(nodes.values(), 1), "leader 1")

        def listed():
            result = cli("ls", "--node", nodes[1].address, "--json")
            return result.returncode == 0 and any(f["name"] == "big.bin" for f in json.loads(result.stdout))

        poll(listed, "big.bin in the index")
        # Write to a pipe we read slowly, so the transfer is in flight when
        # the leader dies.
        client = subprocess.Popen(
            [sys.executable, "-m", "p2pfiles", "get", "big.bin", "--node", nodes[1].address, "-o", "-"],
            env=childEnvironment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: client.poll() is None and client.kill())
        received = client.stdout.read(1024 * 1024)
        nodes[1].kill()
        received += client.stdout.read()
        client.wait(timeout=DEADLINE)
        self.assertEqual(client.returncode, 0, client.stderr.read())
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(len(received), len(data))
        # It resumed: the new leader relayed only the rest of the file, from
        # where the first leader's relay stopped.
        relays = [
            line
            for line in nodes[2].dir.child("twistd.log").getContent().decode("utf-8", "replace").splitlines()
            if "relay of big.bin" in line and "bytes in" in line
        ]
        self.assertEqual(len(relays), 1, relays)
        relayed = int(relays[0].split(": ")[-1].split(" bytes")[0])
        self.assertGreater(relayed, 0)
        self.assertLess(relayed, len(data))


class Valve:
    """
    A TCP forwarder on 127.0.0.1 that passes at most C{budget} bytes from
    the node to the client on each connection, then holds the rest: a
    transfer that stops half-way while both ends stay connected.
    """

    def __init__(self, target: int, budget: int) -> None:
        import socket
        import threading

        self.target = target
        self.budget = budget
        self.sockets: list = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            outside = socket.create_connection(("127.0.0.1", self.target), timeout=DEADLINE)
            outside.settimeout(None)
            self.sockets += [inside, outside]
            threading.Thread(target=self.pipe, args=(inside, outside, None), daemon=True).start()
            threading.Thread(target=self.pipe, args=(outside, inside, self.budget), daemon=True).start()

    def pipe(self, source, sink, budget) -> None:
        try:
            while budget is None or budget > 0:
                data = source.recv(min(65536, budget) if budget is not None else 65536)
                if not data:
                    break
                sink.sendall(data)
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass

    def stop(self) -> None:
        self.listener.close()
        for each in self.sockets:
            each.close()


def holdsLock(path: FilePath) -> bool:
    """
    Whether another process holds the lock on C{path} (a download holds its
    part's).
    """
    import fcntl

    try:
        fd = os.open(path.path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sizeOf(path: FilePath) -> int:
    """
    The size of C{path} now (L{FilePath} caches what it last saw), 0 if absent.
    """
    try:
        return os.path.getsize(path.path)
    except OSError:
        return 0


class InterruptionTests(SynchronousTestCase):
    """
    A real C{p2pfiles get} interrupted by SIGTERM and SIGINT, and the run
    that resumes after it.
    """

    def test_interruptedGetKeepsPart(self):
        """
        SIGTERM, then SIGINT, to a download stuck half-way: each exits 143
        and 130, says in one line how much it kept and where, and keeps the
        part.  The same command then resumes it: the file arrives whole,
        C{resumed_from} is what the part held, and on a stderr that is not a
        terminal the one summary line is all it writes there.
        """
        from p2pfiles.cli import humanSize

        nodes = startProcesses(self, [1])
        data = os.urandom(6 * 1024 * 1024)
        nodes[1].share.child("big.bin").setContent(data)

        def listed():
            result = cli("ls", "--node", nodes[1].address, "--json")
            return result.returncode == 0 and any(f["name"] == "big.bin" for f in json.loads(result.stdout))

        poll(listed, "big.bin in the index")
        out = FilePath(self.mktemp())
        out.makedirs()
        part = out.child(".big.bin.part")
        kept = 0
        for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            valve = Valve(nodes[1].port, 1024 * 1024)
            self.addCleanup(valve.stop)
            client = subprocess.Popen(
                [sys.executable, "-m", "p2pfiles", "get", "big.bin", "--node", f"127.0.0.1:{valve.port}",
                 "--timeout", "60"],
                env=childEnvironment(),
                cwd=out.path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            self.addCleanup(lambda c=client: c.poll() is None and c.kill())
            # Held by the download, and fed with more than it held before.
            poll(lambda: holdsLock(part) and sizeOf(part) > kept + 512 * 1024, "the download to stall half-way")
            client.send_signal(signum)
            stdout, stderr = client.communicate(timeout=DEADLINE)
            valve.stop()
            self.assertEqual(client.returncode, code, stderr)
            kept = sizeOf(part)
            self.assertEqual(
                stderr.decode(),
                f"p2pfiles get: interrupted: {humanSize(kept)} kept in .big.bin.part; run the same command to resume\n",
            )
            self.assertEqual(stdout, b"")
            self.assertEqual(part.getContent(), data[:kept])
            self.assertFalse(out.child("big.bin").exists())
        result = cli("get", "big.bin", "--node", nodes[1].address, cwd=out.path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(out.child("big.bin").getContent(), data)
        self.assertFalse(part.exists())
        lines = result.stderr.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("saved big.bin (6.0 MiB, sha256 "), lines[0])
        self.assertTrue(lines[0].endswith(f", {humanSize(kept)} not fetched again)"), lines[0])
        # The same again is refused: the file is there.
        again = cli("get", "big.bin", "--node", nodes[1].address, "--json", cwd=out.path)
        self.assertEqual(again.returncode, 9)
        # With --overwrite it is fetched whole; a part of it resumed.
        part.setContent(data[:1000])
        again = cli("get", "big.bin", "--node", nodes[1].address, "--json", "--overwrite", cwd=out.path)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(json.loads(again.stdout)["resumed_from"], 1000)
        self.assertEqual(again.stderr, b"")


class ListenTests(SynchronousTestCase):
    """
    twistd starting a node whose port is taken.
    """

    def test_portInUse(self):
        """
        A node whose port another socket holds ends at once with a non-zero
        status and one line, C{cannot listen on 127.0.0.1:PORT: address
        already in use}, not a traceback.
        """
        import socket

        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        base = FilePath(self.mktemp())
        base.makedirs()
        result = subprocess.run(
            twistdCommand() + ["-n", "--pidfile=", "p2pfiles", "--id", "1", "--port", str(port)],
            env=childEnvironment(),
            cwd=base.path,
            capture_output=True,
            timeout=DEADLINE,
            stdin=subprocess.DEVNULL,
        )
        self.assertNotEqual(result.returncode, 0)
        output = (result.stdout + result.stderr).decode()
        self.assertNotIn("Traceback", output)
        [line] = [l for l in output.splitlines() if "cannot listen" in l]
        self.assertTrue(line.endswith(f" cannot listen on 127.0.0.1:{port}: address already in use"), line)


class DemoTests(SynchronousTestCase):
    """
    The README's first command.
    """

    def test_demoRunsEndToEnd(self):
        """
        p2pfiles demo exits 0, says the fetched PNG's sums match and that
        node 2 took over, and leaves no node running.
        """
        workspace = FilePath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "p2pfiles", "demo", "--dir", workspace.path],
            env=childEnvironment(),
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("the SHA-256 sums match", result.stdout)
        self.assertIn("node 2 took over", result.stdout)
        png = workspace.child("node3").child("files").child("12241300.png").getContent()
        self.assertEqual(png, workspace.child("node2").child("files").child("12241300.png").getContent())
        self.assertTrue(png.startswith(b"\x89PNG\r\n\x1a\n"))
        leftover = subprocess.run(["pgrep", "-f", workspace.path], capture_output=True)
        self.assertEqual(leftover.stdout, b"", "processes left running")

    def test_demoMovesOffATakenPort(self):
        """
        A port that looked free but is taken by the time a node starts (by
        another program, or a second demo) makes the demo start its nodes on
        free ports instead, not hang or fail.
        """
        import io
        import socket

        from p2pfiles import demo

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        ports = [taken.getsockname()[1]] + freePorts(2)
        self.patch(demo, "portsFor", lambda count, preferred: ports)
        self.patch(os, "environ", childEnvironment())
        out = io.StringIO()
        workspace = FilePath(self.mktemp())
        code = demo.main(["--dir", workspace.path], out=out)
        self.assertEqual(code, 0, out.getvalue())
        self.assertNotIn(f"ports {ports[0]},", out.getvalue())
        self.assertIn("every step succeeded", out.getvalue())


class Forwarder:
    """
    A byte-for-byte TCP forwarder on 127.0.0.1 (not an attacker: it only
    passes bytes on), keeping a copy of everything it forwarded.
    """

    def __init__(self, target: int) -> None:
        import socket
        import threading

        self.target = target
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        self.threads = [threading.Thread(target=self.accept, daemon=True)]
        self.threads[0].start()

    def accept(self) -> None:
        import socket
        import threading

        while not self.stopped:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            outside = socket.create_connection(("127.0.0.1", self.target), timeout=DEADLINE)
            for a, b in ((inside, outside), (outside, inside)):
                thread = threading.Thread(target=self.pipe, args=(a, b), daemon=True)
                thread.start()
                self.threads.append(thread)

    def pipe(self, source, sink) -> None:
        import socket

        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()


class TLSProcessTests(SynchronousTestCase):
    """
    TLS between real processes.
    """

    def test_forwardedGetIsOpaque(self):
        """
        Three twistd nodes with a secret; the CLI gets a file held by node 3
        through leader 1 via a byte-for-byte TCP forwarder in front of the
        leader.  The download works (a forwarder is not an attacker), and
        what the forwarder carried holds none of the file's bytes and none
        of the protocol's JSON: it was TLS all the way.
        """
        secret = FilePath(self.mktemp())
        secret.setContent(b"s3cret\n")
        nodes = startProcesses(self, [1, 2, 3], extra=["--secret-file", secret.path])
        marker = b"p2pfiles plaintext marker " * 40
        data = marker + os.urandom(3 * 1024 * 1024) + marker
        nodes[3].share.child("secret-plans.bin").setContent(data)

        def listed():
            result = cli("ls", "--node", nodes[1].address, "--json", "--secret-file", secret.path)
            return result.returncode == 0 and "secret-plans.bin" in result.stdout.decode()

        poll(listed, "the file in the index")
        forwarder = Forwarder(nodes[1].port)
        self.addCleanup(forwarder.stop)
        out = FilePath(self.mktemp())
        out.makedirs()
        result = cli(
            "get", "secret-plans.bin", "--node", f"127.0.0.1:{forwarder.port}", "--secret-file", secret.path,
            "--json", cwd=out.path,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(out.child("secret-plans.bin").getContent(), data)
        seen = bytes(forwarder.seen)
        self.assertGreater(len(seen), len(data))
        for needle in (marker[:64], data[len(marker) + 4096 : len(marker) + 4096 + 32], b"secret-plans",
                       b'"type"', b"hello", b"sha256"):
            self.assertNotIn(needle, seen)

    def test_pinnedCluster(self):
        """
        A cluster whose nodes pin each other's fingerprints (learned with
        C{p2pfiles id} after a first start) comes up again; a node whose pin
        for a peer is wrong refuses that peer's links and logs a line naming
        both fingerprints, and the peer is not alive to it.
        """
        nodes = startProcesses(self, [1, 2])
        poll(lambda: agreement(nodes.values(), 1), "leader 1")
        fingerprints = {
            n: cli("id", "--state", nodes[n].dir.child("state").path).stdout.decode().strip() for n in nodes
        }
        for node in nodes.values():
            node.stop()
        wrong = "sha256:" + "ab" * 32
        nodes[1].peers = {}
        nodes[1].extra = ["--peer", f"2@127.0.0.1:{nodes[2].port}={fingerprints[2]}"]
        nodes[2].peers = {}
        nodes[2].extra = ["--peer", f"1@127.0.0.1:{nodes[1].port}={fingerprints[1]}"]
        for node in nodes.values():
            node.start()
        poll(lambda: agreement(nodes.values(), 1), "leader 1 with pins")
        for node in nodes.values():
            node.stop()
        nodes[2].extra = ["--peer", f"1@127.0.0.1:{nodes[1].port}={wrong}"]
        for node in nodes.values():
            node.start()
        log = nodes[2].dir.child("twistd.log")

        def refused():
            text = log.getContent().decode() if log.exists() else ""
            return [l for l in text.splitlines() if wrong in l and fingerprints[1] in l]

        lines = poll(refused, "node 2 to refuse node 1's certificate")
        self.assertIn("refused before authentication", lines[0])
        status = poll(lambda: statusOf(nodes[2].address), "node 2's status")
        self.assertFalse({m["id"]: m["alive"] for m in status["members"]}[1])


class DuplicateIdProcessTests(SynchronousTestCase):
    """
    Two processes started with the same id, across real TLS connections.
    """

    def test_secondNodeOneRefused(self):
        """
        Nodes 1 and 2 agree that 1 leads; a second process started as node
        1 on another port, knowing node 2, is refused by node 2: node 2
        lists it under C{conflicts} (its address and certificate), keeps
        node 1 at its own address and certificate, and both nodes keep the
        same leader and epoch; the second node 1 shows node 2's refusal.
        """
        base = FilePath(self.mktemp())
        base.makedirs()
        elsewhere = FilePath(self.mktemp())
        elsewhere.makedirs()
        first, second, third = freePorts(3)
        holder = NodeProcess(base, 1, first, {2: second})
        node2 = NodeProcess(base, 2, second, {1: first})
        impostor = NodeProcess(elsewhere, 1, third, {2: second})
        for node in (holder, node2):
            self.addCleanup(node.stop)
            node.start()
        epoch = poll(lambda: agreement([holder, node2], 1), "leader 1")
        holderPrint = statusOf(holder.address)["fingerprint"]
        self.addCleanup(impostor.stop)
        impostor.start()

        def conflicts():
            status = statusOf(node2.address)
            return status if status is not None and status["conflicts"] else None

        status = poll(conflicts, "node 2 to refuse the second node 1")
        impostorStatus = poll(lambda: statusOf(impostor.address), "the second node 1 to answer")
        (conflict,) = status["conflicts"]
        self.assertEqual(
            (conflict["id"], conflict["address"], conflict["fingerprint"]),
            (1, impostor.address, impostorStatus["fingerprint"]),
        )
        self.assertNotEqual(impostorStatus["fingerprint"], holderPrint)
        self.assertLessEqual(conflict["since"], conflict["seen"])
        members = {m["id"]: m for m in status["members"]}
        self.assertEqual((members[1]["address"], members[1]["fingerprint"]), (holder.address, holderPrint))

        def refusedBy2():
            status = statusOf(impostor.address)
            return status if status is not None and [r for r in status["refused"] if r["id"] == 2] else None

        refused = poll(refusedBy2, "the second node 1 to show node 2's refusal")
        self.assertFalse([m for m in refused["members"] if m["id"] == 2 and m["alive"]])
        for _ in range(3):
            self.assertEqual(agreement([holder, node2], 1), epoch)
