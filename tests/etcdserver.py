"""
A real etcd for integration tests: one member, or a cluster of three, on
free ports of 127.0.0.1, each member with a temporary data directory that
is removed when it stops.

Tests that need it check L{etcdPath} and skip with L{SKIP_REASON} when the
binary is absent.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

from twisted.trial.unittest import TestCase

from p2pfiles.demo import freePorts
from tests.support import stopProcess

SKIP_REASON = "etcd not installed (Debian package etcd-server)"

# Generous: the machine running the tests may be loaded.
DEADLINE = 30.0

# How many times a cluster is started on fresh ports if a member exits at
# once (another process took one of its ports meanwhile).
START_TRIES = 3


def etcdPath() -> Optional[str]:
    """
    The etcd binary, or L{None} if it is not installed.
    """
    found = shutil.which("etcd")
    if found is None and os.access("/usr/bin/etcd", os.X_OK):
        found = "/usr/bin/etcd"
    return found


class EtcdMember:
    """
    One etcd process.
    """

    def __init__(self, name: str, base: str, clientPort: int, peerPort: int) -> None:
        self.name = name
        self.base = base
        self.clientPort = clientPort
        self.peerPort = peerPort
        self.dataDir = os.path.join(base, name)
        self.logPath = os.path.join(base, f"{name}.log")
        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clientPort}"

    @property
    def peerURL(self) -> str:
        return f"http://127.0.0.1:{self.peerPort}"

    def start(self, initialCluster: str, token: str, fast: bool, state: str = "new") -> None:
        etcd = etcdPath()
        assert etcd is not None, SKIP_REASON
        args = [
            etcd,
            "--name", self.name,
            "--data-dir", self.dataDir,
            "--listen-client-urls", f"http://{self.address}",
            "--advertise-client-urls", f"http://{self.address}",
            "--listen-peer-urls", self.peerURL,
            "--initial-advertise-peer-urls", self.peerURL,
            "--initial-cluster", initialCluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", state,
        ]
        if fast:
            # Raft elections in about half a second instead of one or two.
            args += ["--heartbeat-interval", "50", "--election-timeout", "500"]
        # etcd reads its settings from ETCD_* too: keep ours only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self, timeout: float = 1.0) -> Optional[Dict[str, Any]]:
        """
        The member's C{/v3/maintenance/status} answer, or L{None} if it does
        not answer now.
        """
        request = urllib.request.Request(
            f"http://{self.address}/v3/maintenance/status",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def hasLeader(self) -> bool:
        status = self.status()
        return status is not None and status.get("leader", "0") != "0"

    def isRaftLeader(self) -> bool:
        status = self.status()
        return status is not None and status.get("leader") == status.get("header", {}).get("member_id")

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def pause(self) -> None:
        """
        SIGSTOP: the process keeps its ports but answers nothing.
        """
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """
        SIGKILL, and reap it.
        """
        if self.running():
            assert self.process is not None
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=DEADLINE)

    def stop(self) -> None:
        """
        SIGTERM (after SIGCONT, in case it is paused), then SIGKILL if it has
        not exited within the deadline.
        """
        if self.process is not None:
            stopProcess(self.process)

    def logTail(self, lines: int = 5) -> str:
        try:
            with open(self.logPath, "rb") as f:
                return b" | ".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"


class EtcdCluster:
    """
    C{size} etcd members forming one cluster.

    @ivar endpoints: the members' client addresses, C{HOST:PORT} each.
    """

    def __init__(self, size: int = 1, fast: bool = False) -> None:
        self.size = size
        self.fast = fast
        self.base = tempfile.mkdtemp(prefix="p2pfiles-etcd-")
        self.members: List[EtcdMember] = []

    @property
    def endpoints(self) -> List[str]:
        return [m.address for m in self.members]

    def start(self) -> None:
        """
        Start every member and wait until each answers and knows a leader.
        Blocking; raises L{AssertionError} with the members' last log lines if
        the cluster does not come up within the deadline.
        """
        for attempt in range(START_TRIES):
            ports = freePorts(2 * self.size)
            self.members = [
                EtcdMember(f"m{i}-{attempt}", self.base, ports[2 * i], ports[2 * i + 1]) for i in range(self.size)
            ]
            initial = ",".join(f"{m.name}={m.peerURL}" for m in self.members)
            token = f"p2pfiles-test-{os.getpid()}-{id(self)}-{attempt}"
            for member in self.members:
                member.start(initial, token, self.fast)
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                if not all(m.running() for m in self.members):
                    break
                if all(m.hasLeader() for m in self.members):
                    return
                time.sleep(0.05)
            tails = "; ".join(f"{m.name}: {m.logTail()}" for m in self.members)
            exited = not all(m.running() for m in self.members)
            for member in self.members:
                member.stop()
            if not exited:
                raise AssertionError(f"etcd did not come up within {DEADLINE:g}s: {tails}")
        raise AssertionError(f"etcd exited at start {START_TRIES} times: {tails}")

    def raftLeader(self) -> Optional[EtcdMember]:
        for member in self.members:
            if member.running() and member.isRaftLeader():
                return member
        return None

    def pause(self) -> None:
        for member in self.members:
            member.pause()

    def resume(self) -> None:
        for member in self.members:
            member.resume()

    def stop(self) -> None:
        """
        Stop every member and remove the data directories.
        """
        for member in self.members:
            member.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def startEtcd(testcase: TestCase, size: int = 1, fast: bool = False) -> EtcdCluster:
    """
    Start an etcd cluster of C{size} members for C{testcase}; it is stopped
    and its data removed in the test's cleanup.
    """
    cluster = EtcdCluster(size, fast)
    testcase.addCleanup(cluster.stop)
    cluster.start()
    return cluster
