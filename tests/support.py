"""
Helpers for integration tests: real nodes on 127.0.0.1 in this process, real
twistd processes, and polling with a deadline (never a fixed sleep).
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from p2pfiles.demo import freePorts, twistdCommand
from p2pfiles.node import Node, NodeConfig
from p2pfiles.protocol import LocalIdentity, P2PFactory
from p2pfiles.tls import TLS
from tests.channels import certificate

# Generous: the machine running the tests may be loaded.
DEADLINE = 30.0

ROOT = FilePath(__file__).parent().parent()


def poll(condition: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """
    Blocking: call C{condition} until it returns something true, sleeping
    C{interval} between calls, for tests whose nodes are other processes
    (nothing in this process needs the reactor meanwhile); fail after
    C{timeout} seconds saying C{what} was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def waitFor(condition: Callable[[], Any], what: str, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """
    Like L{poll}, for tests whose nodes run in this process: wait on the
    reactor between calls, so that the nodes keep running.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await deferLater(reactor, interval)


async def waitForAsync(
    fetch: Callable[[], Any], predicate: Callable[[Any], Any], what: str, timeout: float = DEADLINE
) -> Any:
    """
    Like L{waitFor}, for a value that takes a Deferred to get: await
    C{fetch()} until C{predicate} holds for its result.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {value!r}")
        await deferLater(reactor, 0.1)


class InProcessNode:
    """
    A node listening on a real port of 127.0.0.1, in this process.
    """

    def __init__(self, node: Node, port: Any, factory: P2PFactory) -> None:
        self.node = node
        self.port = port
        self.factory = factory
        self.running = True

    @property
    def address(self) -> str:
        return self.node.config.address

    @property
    def share(self) -> FilePath:
        return self.node.config.share

    def stop(self) -> Deferred:
        """
        Stop the node as if its process died: links, port, every connection.
        """
        if not self.running:
            return Deferred.fromCoroutine(_nothing())
        self.running = False
        return DeferredList(
            [self.node.stopService(), self.port.stopListening(), self.factory.closeAll()],
            consumeErrors=True,
        )


async def _nothing() -> None:
    return None


_clusters = itertools.count()


def startCluster(
    testcase: TestCase,
    ids: List[int],
    secret: bytes = b"",
    files: Optional[Dict[int, Dict[str, bytes]]] = None,
    peersOf: Optional[Callable[[int, Dict[int, str]], Dict[int, str]]] = None,
    shares: Optional[Dict[int, FilePath]] = None,
    etcd: Sequence[str] = (),
    leaseTTL: float = 2.0,
) -> Dict[int, InProcessNode]:
    """
    Start one in-process node per id, each knowing all the others (or those
    C{peersOf} picks), with the given files in their shares.  Every node is
    stopped in the test's cleanup.

    @param etcd: etcd endpoints: the nodes leave leadership to etcd (under a
        prefix of their own) and know no peers, only what etcd tells them.
    """
    prefix = f"/p2pfiles/test-{os.getpid()}-{next(_clusters)}"
    base = FilePath(testcase.mktemp())
    factories = {}
    ports = {}
    certificates = {node: certificate(("cluster", node)) for node in ids}
    for node in ids:
        factory = P2PFactory(LocalIdentity("node", node, None, secret), None, reactor, listening=True)
        ports[node] = reactor.listenTCP(0, TLS(certificates[node]).serverFactory(factory, reactor), interface="127.0.0.1")
        factories[node] = factory
    addresses = {node: f"127.0.0.1:{ports[node].getHost().port}" for node in ids}
    cluster = {}
    for node in ids:
        share = (shares or {}).get(node) or base.child(f"node{node}").child("files")
        share.makedirs(ignoreExistingDirectory=True)
        for name, data in (files or {}).get(node, {}).items():
            share.child(name).setContent(data)
        peers = {p: a for p, a in addresses.items() if p != node and not etcd}
        if peersOf is not None:
            peers = peersOf(node, addresses)
        config = NodeConfig(
            id=node,
            address=addresses[node],
            peers=peers,
            share=share,
            state=base.child(f"node{node}").child("state"),
            secret=secret,
            certificate=certificates[node],
            etcd=etcd,
            coordinatorPrefix=prefix,
            leaseTTL=leaseTTL,
        )
        instance = Node(config, reactor)
        instance.listeningFactory(factories[node])
        cluster[node] = InProcessNode(instance, ports[node], factories[node])
    for node in ids:
        cluster[node].node.startService()
        testcase.addCleanup(cluster[node].stop)
    return cluster


def agreed(cluster: Dict[int, InProcessNode], leader: int, count: Optional[int] = None) -> bool:
    """
    Whether every running node follows C{leader} in one epoch and sees
    C{count} live members.
    """
    running = [c.node for c in cluster.values() if c.running]
    if count is None:
        count = len(running)
    views = {(n.coordinator.election.leader, n.coordinator.election.epoch) for n in running}
    return (
        len(views) == 1
        and views.pop()[0] == leader
        and all(len(n.coordinator.election.liveMembers()) == count for n in running)
    )


# Real processes.


def childEnvironment() -> Dict[str, str]:
    """
    The environment for a child process: this checkout first on its path, so
    a child runs the code under test.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT.path] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("P2PFILES_NODE", None)
    env.pop("P2PFILES_SECRET_FILE", None)
    return env


class NodeProcess:
    """
    A C{twistd -n p2pfiles} process.
    """

    def __init__(self, base: FilePath, node: int, port: int, peers: Dict[int, int], extra: List[str] = ()) -> None:
        self.base = base
        self.id = node
        self.port = port
        self.peers = peers
        self.extra = list(extra)
        self.dir = base.child(f"node{node}")
        self.share = self.dir.child("files")
        self.share.makedirs(ignoreExistingDirectory=True)
        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = twistdCommand() + [
            "--logfile", self.dir.child("twistd.log").path,
            "--pidfile", "", "-n", "p2pfiles",
            "--id", str(self.id), "--port", str(self.port),
            "--share", self.share.path, "--state", self.dir.child("state").path,
        ]
        for peer, port in sorted(self.peers.items()):
            args += ["--peer", f"{peer}@127.0.0.1:{port}"]
        self.process = subprocess.Popen(
            args + self.extra,
            env=childEnvironment(),
            cwd=self.dir.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """
        SIGKILL, and reap it.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=DEADLINE)

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process)


def stopProcess(process: subprocess.Popen) -> None:
    """
    Stop C{process} if it runs: SIGTERM (after SIGCONT, in case it is
    paused), then SIGKILL if it has not exited within L{DEADLINE}; reaped.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)
    process.terminate()
    try:
        process.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=DEADLINE)


def startProcesses(testcase: TestCase, ids: List[int], extra: List[str] = ()) -> Dict[int, NodeProcess]:
    """
    Start one twistd node per id, each knowing all the others; every process
    is killed in the test's cleanup.
    """
    base = FilePath(testcase.mktemp())
    base.makedirs()
    ports = dict(zip(ids, freePorts(len(ids))))
    nodes = {}
    for node in ids:
        peers = {p: port for p, port in ports.items() if p != node}
        nodes[node] = NodeProcess(base, node, ports[node], peers, extra)
        testcase.addCleanup(nodes[node].stop)
        nodes[node].start()
    return nodes


def cli(*args: str, timeout: float = DEADLINE, stdin: Any = subprocess.DEVNULL, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """
    Run the p2pfiles command, as a user would, and return what it did.
    """
    return subprocess.run(
        [sys.executable, "-m", "p2pfiles"] + list(args),
        env=childEnvironment(),
        capture_output=True,
        timeout=timeout,
        stdin=stdin,
        cwd=cwd,
    )


def statusOf(address: str) -> Optional[Dict[str, Any]]:
    """
    A node's status as C{p2pfiles status --json} prints it, or None if it
    cannot be had right now.
    """
    result = cli("status", "--node", address, "--json", "--timeout", "5")
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


# Real processes with their web views.


class WebCluster:
    """
    Real C{twistd} nodes, each knowing all the others and serving its web
    view (C{--web}) on a loopback port of its own; node and web ports are
    picked free together.  Not tied to a test: a test stops it in a
    cleanup, a script in a C{finally}.
    """

    def __init__(self, base: FilePath, ids: List[int], files: Optional[Dict[int, Dict[str, bytes]]] = None) -> None:
        base.makedirs(ignoreExistingDirectory=True)
        ports = freePorts(2 * len(ids))
        nodePorts = dict(zip(ids, ports[: len(ids)]))
        self.webPorts = dict(zip(ids, ports[len(ids) :]))
        self.nodes: Dict[int, NodeProcess] = {}
        for node in ids:
            peers = {p: port for p, port in nodePorts.items() if p != node}
            web = ["--web", f"tcp:{self.webPorts[node]}:interface=127.0.0.1"]
            self.nodes[node] = NodeProcess(base, node, nodePorts[node], peers, web)
            for name, data in (files or {}).get(node, {}).items():
                self.nodes[node].share.child(name).setContent(data)
        # Proxies from the environment must not see loopback requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self) -> None:
        for node in sorted(self.nodes):
            self.nodes[node].start()

    def stop(self) -> None:
        """
        Stop every node still running (SIGTERM, then SIGKILL if it lingers).
        """
        for node in self.nodes.values():
            node.stop()

    def url(self, node: int, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.webPorts[node]}{path}"

    def get(self, node: int, path: str, timeout: float = 10.0) -> bytes:
        """
        The body of C{GET path} on C{node}'s web view (an C{OSError} if it
        cannot be had, an C{HTTPError} for an error status).
        """
        with self._opener.open(self.url(node, path), timeout=timeout) as response:
            return response.read()

    def getJSON(self, node: int, path: str) -> Any:
        return json.loads(self.get(node, path))

    def metrics(self, node: int) -> Dict[Any, float]:
        """
        Every sample of C{node}'s C{/metrics} as Prometheus parses it:
        C{(sample name, sorted labels) -> value}.
        """
        from prometheus_client.parser import text_string_to_metric_families

        text = self.get(node, "/metrics").decode("utf-8")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def statusOrNone(self, node: int) -> Optional[Dict[str, Any]]:
        try:
            return self.getJSON(node, "/api/status")
        except OSError:
            return None

    def agreed(self, leader: int, alive: List[int]) -> bool:
        """
        Whether every node in C{alive} answers, follows C{leader} in one
        epoch, and counts exactly C{alive} as alive.
        """
        statuses = [self.statusOrNone(n) for n in alive]
        if any(s is None for s in statuses):
            return False
        views = {(s["leader"], s["epoch"]) for s in statuses}
        return (
            len(views) == 1
            and views.pop()[0] == leader
            and all(sorted(m["id"] for m in s["members"] if m["alive"]) == sorted(alive) for s in statuses)
        )
