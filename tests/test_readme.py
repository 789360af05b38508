"""
The README's commands, run as written: its node commands start three nodes
from one directory on ports 9001-9003, its client examples work against
them, and its tac command starts a node too.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from typing import Dict, List

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import DEADLINE, ROOT, childEnvironment, poll

README = ROOT.child("README.md")


def shellLines(text: str) -> List[str]:
    """
    Every command line of the C{```sh} blocks of C{text}, in order.
    """
    lines = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        lines += [line for line in block.splitlines() if line.strip()]
    return lines


def nodeCommands(text: str) -> Dict[int, str]:
    """
    The README's commands that start the local nodes, by id.
    """
    commands = {}
    for line in shellLines(text):
        if line.startswith("twistd ") and " p2pfiles " in line and "--peer" in line:
            words = shlex.split(line)
            commands[int(words[words.index("--id") + 1])] = line
    return commands


def clientCommands(text: str) -> List[str]:
    """
    The README's examples of the p2pfiles command that end by themselves.
    """
    return [
        line
        for line in shellLines(text)
        if line.startswith("p2pfiles ") and "--watch" not in line and not line.startswith("p2pfiles demo")
    ]


def portsFree(ports: List[int]) -> bool:
    """
    Whether a node could listen on each of C{ports} of 127.0.0.1 now.
    """
    for port in ports:
        probe = socket.socket()
        # As the node does: a connection of an earlier run in TIME_WAIT
        # does not stop it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            probe.close()
    return True


def environment() -> Dict[str, str]:
    """
    A shell as the README asks for one: the virtualenv's commands first on
    the PATH (what C{. .venv/bin/activate} does), this checkout's code.
    """
    env = childEnvironment()
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


class Shell:
    """
    One README line running in C{sh}, in its own process group, its output
    in a file.
    """

    def __init__(self, case: SynchronousTestCase, line: str, cwd: FilePath, log: FilePath) -> None:
        self.log = log
        self.output = open(log.path, "wb")
        self.process = subprocess.Popen(
            ["sh", "-c", line],
            cwd=cwd.path,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        case.addCleanup(self.stop)

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self.output.close()


def run(line: str, cwd: FilePath) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", line], cwd=cwd.path, env=environment(), capture_output=True, timeout=DEADLINE,
        stdin=subprocess.DEVNULL,
    )


def status(port: int) -> Dict:
    result = run(f"p2pfiles status --node 127.0.0.1:{port} --json --timeout 5", ROOT)
    return json.loads(result.stdout) if result.returncode == 0 else {}


class ReadmeTextTests(SynchronousTestCase):
    """
    What the README's commands look like.
    """

    def test_oneForm(self) -> None:
        """
        The README's commands use one form: bare C{twistd} and C{p2pfiles}
        after activating the virtualenv, never C{.venv/bin/...}; every node
        command writes no pid file, so that several start from one directory.
        """
        text = README.getContent().decode("utf-8")
        lines = shellLines(text)
        self.assertIn("make && . .venv/bin/activate", lines)
        self.assertEqual([line for line in lines if line.startswith(".venv/bin/")], [])
        starts = [line for line in lines if re.search(r"(^|\s)twistd\s", line) and "--help" not in line]
        self.assertGreaterEqual(len(starts), 5, starts)
        for line in starts:
            self.assertIn(" --pidfile= ", line)
        self.assertEqual(sorted(nodeCommands(text)), [1, 2, 3])


class ReadmeCommandTests(SynchronousTestCase):
    """
    The README's node, client and tac commands, run as written.
    """

    # The README's first port is BASE + 1.
    BASE = 9000

    def test_asWritten(self) -> None:
        """
        The three node commands, started from one directory, all come up and
        agree on leader 1; every client example that ends by itself exits 0
        against them; Ctrl-C stops a node cleanly; the tac command then
        starts node 2 again from the same directory.
        """
        base = self.BASE
        if not portsFree([base + 1, base + 2, base + 3]):
            raise SkipTest(f"the README's nodes use ports {base + 1}-{base + 3}, and one of them is taken")
        text = self.readme()
        here = FilePath(self.mktemp())
        png = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
        here.child("node3").child("files").makedirs()
        here.child("node3").child("files").child("12241300.png").setContent(png)
        nodes = {
            node: Shell(self, line, here, here.child(f"node{node}.out"))
            for node, line in sorted(nodeCommands(text).items())
        }

        def agreed() -> bool:
            statuses = [status(base + node) for node in nodes]
            return all(
                s and s["leader"] == 1 and sum(m["alive"] for m in s["members"]) == 3 for s in statuses
            )

        poll(agreed, "the README's three nodes to agree on leader 1")

        def listed() -> bool:
            result = run(f"p2pfiles ls --node 127.0.0.1:{base + 1} --json", here)
            return result.returncode == 0 and "12241300.png" in result.stdout.decode()

        poll(listed, "the README's file in the index")
        commands = clientCommands(text)
        self.assertTrue(any(c.startswith("p2pfiles get ") for c in commands), commands)
        for number, line in enumerate(commands):
            if line.startswith("p2pfiles get "):
                # Each download example on its own, into an empty directory
                # (with the pics/ directory its -o example names).
                cwd = here.child(f"get{number}")
                cwd.child("pics").makedirs()
            else:
                cwd = here
            result = run(line, cwd)
            self.assertEqual(result.returncode, 0, (line, result.stdout, result.stderr))
            if line.startswith("p2pfiles get ") and "--json" not in line:
                saved = [p for p in cwd.walk() if p.basename() == "12241300.png"]
                self.assertEqual([p.getContent() for p in saved], [png], line)

        # Ctrl-C stops a node cleanly; the others carry on.
        nodes[3].signal(signal.SIGINT)
        nodes[3].process.wait(timeout=DEADLINE)
        self.assertIn(b"Main loop terminated.", nodes[3].log.getContent())
        self.assertNotIn(b"Traceback", nodes[3].log.getContent())
        nodes[2].stop()
        [tac] = [line for line in shellLines(text) if "tac/p2pfiles.tac" in line]
        here.child("tac").makedirs()
        ROOT.child("tac").child("p2pfiles.tac").copyTo(here.child("tac").child("p2pfiles.tac"))
        Shell(self, tac, here, here.child("tac.out"))

        def back() -> bool:
            s = status(base + 2)
            return bool(s) and s["id"] == 2 and s["leader"] == 1

        poll(back, "node 2 started by the README's tac command")

    def readme(self) -> str:
        return README.getContent().decode("utf-8")
