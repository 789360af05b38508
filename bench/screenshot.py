"""
Save a screenshot of a live status page: node 2 of a real three-node
cluster, in headless Chromium.

    .venv/bin/python bench/screenshot.py                 # docs/status-page.png
    .venv/bin/python bench/screenshot.py --out page.png --dark

It starts three C{twistd -n p2pfiles} processes with C{--web} on free
loopback ports (L{tests.support.WebCluster}), shares a few files, gets one
through the leader, kills the leader with SIGKILL and starts it again (so
the timeline shows a failover and a return), then starts a slow download of
a large file held by node 2, so that the page shows it in flight.  It waits
until the page's script has rendered the members, the files, the transfer
and its rate, saves the PNG, and stops everything it started.
"""

import argparse
import os
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.python.filepath import FilePath  # noqa: E402

from p2pfiles.demo import makePNG  # noqa: E402
from tests.browser import Browser, chromiumPath  # noqa: E402
from tests.support import WebCluster, childEnvironment, cli, poll  # noqa: E402

MiB = 1024 * 1024

# Read from the slow download's stdout this often and this much: about
# 2 MiB/s, so the transfer stays in flight for half a minute.
SLOW_READ = 64 * 1024
SLOW_EVERY = 1 / 32


def files() -> Dict[int, Dict[str, bytes]]:
    notes = b"# Design notes\n\nThe leader keeps the index; members send changes.\n" * 300
    return {
        1: {"readme.txt": b"Shared from node 1, the first leader.\n" * 40, "design-notes.md": notes},
        2: {"12241300.png": makePNG(), "photos.tar": os.urandom(64 * MiB)},
        3: {"data.bin": os.urandom(4096 * 64), "design-notes.md": notes, "empty.txt": b""},
    }


class SlowDownload:
    """
    C{p2pfiles get NAME -o -} whose output is read slowly: the client, and
    so the whole relay behind it, is held back by its full pipe.
    """

    def __init__(self, name: str, address: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "p2pfiles", "get", name, "--node", address, "-o", "-"],
            env=childEnvironment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.stopping = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.process.stdout is not None
        while not self.stopping.wait(SLOW_EVERY):
            if not self.process.stdout.read(SLOW_READ):
                return

    def stop(self) -> None:
        self.stopping.set()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join()
        assert self.process.stdout is not None
        self.process.stdout.close()


async def capture(reactor: Any, cluster: WebCluster, out: str, node: int, colorScheme: Optional[str]) -> None:
    browser = await Browser.start(reactor, colorScheme=colorScheme)
    try:
        await browser.open(cluster.url(node))
        await browser.waitFor('document.body.dataset.live === "1"', "the page to go live")
        await browser.waitFor('document.body.dataset.files === "1"', "the file list")
        await browser.waitFor(
            "[...document.querySelectorAll('#transfer-rows td.num')]"
            ".some(td => /^[1-9][0-9.]* [KMG]iB\\/s$/.test(td.textContent))",
            "the transfer in flight at a measured rate",
        )
        await browser.screenshot(out)
    finally:
        await browser.close()


async def main(reactor: Any, argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "status-page.png"), help="the PNG to write")
    parser.add_argument("--node", type=int, default=2, choices=(1, 2, 3), help="whose page (default 2)")
    parser.add_argument("--dark", action="store_true", help="prefer the dark colour scheme")
    args = parser.parse_args(argv)
    if chromiumPath() is None:
        raise SystemExit("no chromium or chromium-browser on PATH (apt-get install chromium)")

    import tempfile

    base = FilePath(tempfile.mkdtemp(prefix="p2pfiles-screenshot-"))
    shared = files()
    cluster = WebCluster(base.child("cluster"), [1, 2, 3], shared)
    slow: Optional[SlowDownload] = None
    try:
        cluster.start()
        poll(lambda: cluster.agreed(1, [1, 2, 3]), "leader 1 with nodes 1, 2 and 3 alive")
        count = len({name for named in shared.values() for name in named})
        poll(lambda: len(cluster.getJSON(1, "/api/files")) == count, f"{count} files in the index")

        downloads = base.child("downloads")
        downloads.makedirs()
        result = cli("get", "12241300.png", "--node", cluster.nodes[1].address, "-o", downloads.path)
        if result.returncode != 0:
            raise SystemExit(f"p2pfiles get failed: {result.stderr.decode(errors='replace').strip()}")

        cluster.nodes[1].kill()
        poll(lambda: cluster.agreed(2, [2, 3]), "leader 2 after node 1 was killed")
        cluster.nodes[1].start()
        poll(lambda: cluster.agreed(1, [1, 2, 3]), "leader 1 again")
        poll(lambda: len(cluster.getJSON(1, "/api/files")) == count, f"{count} files in the index again")

        slow = SlowDownload("photos.tar", cluster.nodes[1].address)
        poll(lambda: cluster.getJSON(args.node, "/api/transfers") or slow.process.poll() is not None, "the transfer")
        await capture(reactor, cluster, args.out, args.node, "dark" if args.dark else "light")
    finally:
        if slow is not None:
            slow.stop()
        cluster.stop()
        base.remove()
    print(f"saved {args.out}: node {args.node}'s status page ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
