"""
The web view of real C{twistd} nodes: three processes started with
C{--web}, their C{/metrics}, JSON API and event log read over HTTP as the
cluster moves (a relayed download, the leader killed), compared with what
the C{p2pfiles} command says, and the status page followed in headless
Chromium; and C{p2pfiles demo} with its status pages.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from .browser import Browser, chromiumPath
from .support import DEADLINE, WebCluster, childEnvironment, cli, poll

# Big enough to take many writes through the relay, small enough to be quick.
RELAYED = os.urandom(3 * 1024 * 1024 + 17)

FILES = {
    1: {"readme.txt": b"Shared from node 1.\n" * 40},
    2: {"notes.txt": b"line of text\n" * 700},
    3: {"relayed.bin": RELAYED, "empty.txt": b""},
}


def sample(metrics: Dict[Any, float], name: str, **labels: str) -> float:
    """
    One sample's value, 0 if the node has not exposed it.
    """
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def startCluster(testcase: SynchronousTestCase, files: Dict[int, Dict[str, bytes]] = FILES) -> WebCluster:
    """
    Nodes 1, 2 and 3 with their web views, agreed on leader 1, with every
    file in leader 1's index; stopped in the test's cleanup.
    """
    cluster = WebCluster(FilePath(testcase.mktemp()), [1, 2, 3], files)
    testcase.addCleanup(cluster.stop)
    cluster.start()
    poll(lambda: cluster.agreed(1, [1, 2, 3]), "leader 1 with nodes 1, 2 and 3 alive")
    count = sum(len(named) for named in files.values())
    poll(lambda: len(cluster.getJSON(1, "/api/files")) == count, f"{count} files in the index")
    return cluster


class ClusterWebTests(SynchronousTestCase):
    """
    What a node's web view serves is what the node does and what the
    command-line client reports.
    """

    def test_apiMatchesTheCommand(self) -> None:
        """
        C{GET /api/status} on each node is the object C{p2pfiles status
        --json} prints for it, and C{GET /api/files} on the leader and on a
        follower is the list C{p2pfiles ls --json} prints when asked of
        that node.  C{/api/transfers} is an empty list while nothing moves.
        """
        cluster = startCluster(self)
        for node in (1, 2, 3):
            address = cluster.nodes[node].address
            result = cli("status", "--json", "--node", address)
            self.assertEqual(result.returncode, 0, result.stderr)
            printed = json.loads(result.stdout)
            served = cluster.getJSON(node, "/api/status")
            self.assertEqual(sorted(served), sorted(printed))
            # How late the node's timers ran is measured as it runs: two
            # answers moments apart may differ there, and only there.
            for status in (served, printed):
                delay = status.pop("max_timer_delay")
                self.assertTrue(isinstance(delay, (int, float)) and not isinstance(delay, bool), delay)
                self.assertGreaterEqual(delay, 0)
            self.assertEqual(served, printed)
            self.assertEqual((served["id"], served["leader"]), (node, 1))
            self.assertEqual(cluster.getJSON(node, "/api/transfers"), [])
        for node in (1, 2):
            result = cli("ls", "--json", "--node", cluster.nodes[node].address)
            self.assertEqual(result.returncode, 0, result.stderr)
            listed = json.loads(result.stdout)
            self.assertEqual(cluster.getJSON(node, "/api/files"), listed)
        names = {f["name"]: f for f in listed}
        self.assertEqual(sorted(names), ["empty.txt", "notes.txt", "readme.txt", "relayed.bin"])
        self.assertEqual((names["relayed.bin"]["size"], names["relayed.bin"]["holders"]), (len(RELAYED), [3]))

    def test_metricsAndEventsFollowTheCluster(self) -> None:
        """
        A C{p2pfiles get} of node 3's file through leader 1 adds the file's
        size to C{p2pfiles_bytes_sent_total{kind="relay"}} on node 1 and
        C{{kind="serve"}} on node 3.  Killing the leader with SIGKILL adds
        one to C{p2pfiles_leader_changes_total} and one observation to
        C{p2pfiles_failover_seconds} on each survivor, and their event logs
        gain C{member-down} for node 1 after the C{leader} event for it.
        """
        cluster = startCluster(self)
        # The leader counts its index at the heartbeat's pace.
        poll(lambda: sample(cluster.metrics(1), "p2pfiles_files_indexed") == 4, "node 1 to count 4 files")
        before = {node: cluster.metrics(node) for node in (1, 2, 3)}
        self.assertEqual([sample(before[n], "p2pfiles_is_leader") for n in (1, 2, 3)], [1, 0, 0])
        self.assertEqual([sample(before[n], "p2pfiles_members", state="alive") for n in (1, 2, 3)], [3, 3, 3])

        target = FilePath(self.mktemp())
        target.makedirs()
        result = cli("get", "relayed.bin", "--node", cluster.nodes[1].address, "-o", target.path, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["via"], [1, 3])
        self.assertEqual(target.child("relayed.bin").getContent(), RELAYED)

        def sent(node: int, kind: str) -> float:
            return sample(cluster.metrics(node), "p2pfiles_bytes_sent_total", kind=kind)

        relayed = sample(before[1], "p2pfiles_bytes_sent_total", kind="relay") + len(RELAYED)
        served = sample(before[3], "p2pfiles_bytes_sent_total", kind="serve") + len(RELAYED)
        poll(lambda: sent(1, "relay") >= relayed, "node 1 to count the relayed bytes")
        poll(lambda: sent(3, "serve") >= served, "node 3 to count the served bytes")
        self.assertEqual((sent(1, "relay"), sent(3, "serve")), (relayed, served))
        self.assertEqual(sent(1, "serve"), sample(before[1], "p2pfiles_bytes_sent_total", kind="serve"))

        for node in (2, 3):
            events = cluster.getJSON(node, "/api/events")
            self.assertIn((1, 1), [(e["leader"], e["epoch"]) for e in events if e["kind"] == "leader"])

        survivors = {node: cluster.metrics(node) for node in (2, 3)}
        cluster.nodes[1].kill()
        poll(lambda: cluster.agreed(2, [2, 3]), "leader 2 with nodes 2 and 3 alive")

        def failovers(node: int) -> float:
            return sample(cluster.metrics(node), "p2pfiles_failover_seconds_count")

        for node in (2, 3):
            count = sample(survivors[node], "p2pfiles_failover_seconds_count") + 1
            poll(lambda: failovers(node) >= count, f"a failover observed on node {node}")
            after = cluster.metrics(node)
            self.assertEqual(sample(after, "p2pfiles_failover_seconds_count"), count, f"node {node}")
            self.assertEqual(
                sample(after, "p2pfiles_leader_changes_total"),
                sample(survivors[node], "p2pfiles_leader_changes_total") + 1,
                f"node {node}",
            )
            took = sample(after, "p2pfiles_failover_seconds_sum") - sample(survivors[node], "p2pfiles_failover_seconds_sum")
            self.assertTrue(0 <= took < DEADLINE, took)
            self.assertEqual(sample(after, "p2pfiles_is_leader"), 1 if node == 2 else 0)
            self.assertEqual(sample(after, "p2pfiles_members", state="down"), 1)

            def memberDown() -> Optional[List[Dict[str, Any]]]:
                events = cluster.getJSON(node, "/api/events")
                return events if any(e["kind"] == "member-down" and e["member"] == 1 for e in events) else None

            events = poll(memberDown, f"node {node} to record member-down for node 1")
            kinds = [(e["kind"], e.get("leader", e.get("member"))) for e in events]
            self.assertLess(kinds.index(("leader", 1)), kinds.index(("member-down", 1)))
            self.assertIn(("leader", 2), kinds)


CHROMIUM = chromiumPath()

MEMBER_ROWS = "[...document.querySelectorAll('#member-rows tr')].map(r => [r.dataset.member, r.dataset.alive])"


class BrowserClusterTests(TestCase):
    """
    The status page of a live cluster in headless Chromium.
    """

    if CHROMIUM is None:
        skip = "no chromium or chromium-browser on PATH (apt-get install chromium)"

    async def test_pageFollowsFailover(self) -> None:
        """
        Node 2's page, rendered by its script from the live stream, shows
        leader 1 and all three members alive; after leader 1 is killed the
        same page, not reloaded, shows node 1 down and node 2 leading.
        """
        cluster = startCluster(self)
        browser = await Browser.start(reactor)
        self.addCleanup(browser.close)
        await browser.open(cluster.url(2))
        await browser.waitFor('document.body.dataset.live === "1"', "the page to go live")
        await browser.waitFor(
            "document.querySelectorAll('#member-rows tr[data-member]').length === 3", "three member rows"
        )
        self.assertEqual(await browser.evaluate(MEMBER_ROWS), [["1", "true"], ["2", "true"], ["3", "true"]])
        self.assertEqual(await browser.evaluate("document.getElementById('leader').textContent"), "1")
        self.assertEqual(await browser.evaluate("document.getElementById('node-id').textContent"), "2")
        await browser.waitFor('document.body.dataset.files === "1"', "the file list")
        self.assertEqual(await browser.evaluate("document.querySelectorAll('#file-rows tr[data-name]').length"), 4)
        # Gone if the page were loaded again.
        await browser.evaluate("window.sameDocument = true")

        cluster.nodes[1].kill()
        await browser.waitFor(
            "document.getElementById('leader').textContent === '2'"
            " && document.querySelector('#member-rows tr[data-member=\"1\"]').dataset.alive === 'false'",
            "node 2 leading and node 1 down on the page",
            timeout=DEADLINE,
        )
        self.assertEqual(await browser.evaluate(MEMBER_ROWS), [["1", "false"], ["2", "true"], ["3", "true"]])
        self.assertEqual(await browser.evaluate("document.getElementById('role').textContent"), "leader")
        self.assertEqual(await browser.evaluate("document.getElementById('alive-count').textContent"), "2")
        self.assertTrue(await browser.evaluate("window.sameDocument === true"))
        self.assertEqual(await browser.evaluate("document.getElementById('conn').dataset.state"), "live")
        await browser.waitFor(
            "[...document.querySelectorAll('#events li')].some(li => li.dataset.kind === 'member-down')",
            "the member-down event on the page",
        )


class DemoWebTests(SynchronousTestCase):
    """
    C{p2pfiles demo} serves each node's status page and, with C{--keep},
    stays up until Ctrl-C.
    """

    def test_keepServesUntilInterrupted(self) -> None:
        """
        C{p2pfiles demo --keep} prints each node's status page URL once,
        runs the whole story, then keeps every node running (each page
        answers, all three alive under leader 1) until SIGINT, which stops
        them and exits 0, leaving no process behind.
        """
        workspace = FilePath(self.mktemp())
        demo = subprocess.Popen(
            [sys.executable, "-m", "p2pfiles", "demo", "--keep", "--dir", workspace.path],
            env=childEnvironment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def cleanup() -> None:
            # Ctrl-C, then SIGTERM (the demo stops its nodes for both), and
            # only then SIGKILL, which would leave them running.
            for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                if demo.poll() is not None:
                    return
                demo.send_signal(stop)
                try:
                    demo.wait(timeout=DEADLINE)
                except subprocess.TimeoutExpired:
                    pass

        self.addCleanup(cleanup)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def read() -> None:
            assert demo.stdout is not None
            with demo.stdout:
                for line in demo.stdout:
                    lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()

        def readUntil(mark: str, timeout: float) -> str:
            text = ""
            deadline = time.monotonic() + timeout
            while mark not in text:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.fail(f"no {mark!r} from the demo within {timeout:g}s:\n{text}")
                if line is None:
                    self.fail(f"the demo ended before {mark!r}:\n{text}")
                text += line
            return text

        output = readUntil("Ctrl-C", 4 * DEADLINE)
        urls = [word for word in output.split() if word.startswith("http://127.0.0.1:")]
        self.assertEqual(len(urls), 3, output)
        self.assertEqual(len(set(urls)), 3, output)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def status(url: str) -> Optional[Dict[str, Any]]:
            try:
                with opener.open(url.rstrip("/") + "/api/status", timeout=10) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        def allUp() -> bool:
            statuses = [status(url) for url in urls]
            return all(
                s is not None and s["leader"] == 1 and all(m["alive"] for m in s["members"]) and len(s["members"]) == 3
                for s in statuses
            )

        poll(allUp, "every demo node up under leader 1")
        with opener.open(urls[1], timeout=10) as response:
            self.assertIn(b"p2pfiles", response.read())

        demo.send_signal(signal.SIGINT)
        rest = readUntil("all nodes stopped", DEADLINE)
        self.assertEqual(demo.wait(timeout=DEADLINE), 0, output + rest)
        for url in urls:
            self.assertEqual((output + rest).count(url), 1, url)
        self.assertEqual([status(url) for url in urls], [None, None, None])
        leftover = subprocess.run(["pgrep", "-f", workspace.path], capture_output=True)
        self.assertEqual(leftover.stdout, b"", "processes left running")
