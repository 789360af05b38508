"""
Headless Chromium for tests and scripts: load a page, wait until its
scripts have done something, read the DOM, save a screenshot.

The browser is driven over its DevTools pipe (C{--remote-debugging-pipe}:
JSON commands on the child's fd 3, answers on its fd 4), not with
C{--dump-dom --virtual-time-budget}: virtual time stands still while a
request is open, and a live page holds its C{EventSource} open for good, so
the dump would never come.  Everything runs on the reactor; every command is
bounded by a timeout, and the browser is killed if it will not close.

Typical use, in a trial C{TestCase} (or under C{task.react} in a script)::

    browser = await Browser.start(reactor)
    try:
        await browser.open(url)
        await browser.waitFor('document.body.dataset.live === "1"', "the live page")
        html = await browser.dom()
        await browser.screenshot("docs/status-page.png")
    finally:
        await browser.close()

or, for one look, C{await dumpDom(reactor, url, until=...)} and
C{await screenshot(reactor, url, path, until=...)}.
"""

import base64
import json
import shutil
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

# Generous: the machine running the tests may be loaded.
DEADLINE = 60.0

# Enough of the browser's complaints to say why it died.
STDERR_KEPT = 16384

WINDOW = (1280, 900)

FLAGS = [
    "--headless",
    "--disable-gpu",
    # Sandboxing needs user namespaces, which containers and root lack.
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    # Nothing but the pages we load: no updates, sync, metrics, proxies or
    # name lookups that could leave the machine.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]",
]


def chromiumPath() -> Optional[str]:
    """
    The Chromium binary on C{PATH}, or None.
    """
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class BrowserError(Exception):
    """
    The browser refused a command, died, or did not answer in time.
    """


class _DevToolsPipe(ProcessProtocol):
    """
    The DevTools protocol over the browser's fds 3 (commands) and 4 (answers
    and events), NUL-terminated JSON each way.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: Dict[int, Deferred] = {}
        self._lastId = 0
        self._stderr = b""
        self.ended: Deferred = Deferred()
        self.running = False

    def connectionMade(self) -> None:
        self.running = True

    def command(self, method: str, params: Optional[Dict[str, Any]] = None, session: Optional[str] = None) -> Deferred:
        if not self.running:
            raise BrowserError(f"the browser has exited; cannot {method}")
        self._lastId += 1
        message: Dict[str, Any] = {"id": self._lastId, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer: Deferred = Deferred()
        self._waiting[self._lastId] = answer
        self.transport.writeToChild(3, json.dumps(message).encode("utf-8") + b"\0")
        return answer

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._stderr = (self._stderr + data)[-STDERR_KEPT:]
            return
        if fd != 4:
            return
        self._buffer += data
        *messages, self._buffer = self._buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            answer = self._waiting.pop(message.get("id"), None)
            if answer is None:
                continue  # an event: nothing here listens for those
            if "error" in message:
                answer.errback(BrowserError(message["error"].get("message", repr(message["error"]))))
            else:
                answer.callback(message.get("result", {}))

    def stderrTail(self) -> str:
        lines = self._stderr.decode("utf-8", "replace").strip().splitlines()
        return "\n".join(lines[-10:])

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            answer.errback(BrowserError(f"the browser exited: {reason.value}\n{self.stderrTail()}"))
        self.ended.callback(None)


class Browser:
    """
    One headless Chromium with one page.  Start it with L{Browser.start}
    and always L{close} it.
    """

    def __init__(self, reactor: Any, pipe: _DevToolsPipe, profile: FilePath, timeout: float) -> None:
        self._reactor = reactor
        self._pipe = pipe
        self._profile = profile
        self._timeout = timeout
        self._session: Optional[str] = None

    @classmethod
    async def start(
        cls,
        reactor: Any,
        size: Tuple[int, int] = WINDOW,
        colorScheme: Optional[str] = None,
        scripts: bool = True,
        binary: Optional[str] = None,
        timeout: float = DEADLINE,
    ) -> "Browser":
        """
        Start the browser with a blank page of C{size} (CSS pixels), its
        C{prefers-color-scheme} set to C{colorScheme} ("light" or "dark")
        if given, and JavaScript off unless C{scripts}.
        """
        binary = binary or chromiumPath()
        if binary is None:
            raise BrowserError("no chromium or chromium-browser on PATH")
        profile = FilePath(tempfile.mkdtemp(prefix="p2pfiles-chromium-"))
        pipe = _DevToolsPipe()
        args = [binary, *FLAGS, f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile.path}"]
        args += ["--remote-debugging-pipe", "about:blank"]
        reactor.spawnProcess(pipe, binary, args, env=None, childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        browser = cls(reactor, pipe, profile, timeout)
        try:
            target = await browser._command("Target.createTarget", {"url": "about:blank"})
            attached = await browser._command("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
            browser._session = attached["sessionId"]
            await browser._command(
                "Emulation.setDeviceMetricsOverride",
                {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False},
            )
            if colorScheme is not None:
                await browser._command(
                    "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": colorScheme}]}
                )
            if not scripts:
                await browser._command("Emulation.setScriptExecutionDisabled", {"value": True})
            await browser._command("Page.enable")
        except BaseException:
            await browser.close()
            raise
        return browser

    def _command(self, method: str, params: Optional[Dict[str, Any]] = None) -> Deferred:
        answer = self._pipe.command(method, params, self._session)
        answer.addTimeout(self._timeout, self._reactor)

        def late(reason: Failure) -> Failure:
            reason.trap(DeferredTimeout)
            raise BrowserError(f"the browser did not answer {method} within {self._timeout:g} s")

        return answer.addErrback(late)

    async def open(self, url: str, what: Optional[str] = None) -> None:
        """
        Load C{url} and wait until the document has loaded.
        """
        result = await self._command("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        await self.waitFor('document.readyState === "complete"', what or f"{url} to load")

    async def evaluate(self, expression: str) -> Any:
        """
        The value of a JavaScript expression in the page (JSON-able).
        """
        result = await self._command("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} raised: {text}")
        return result["result"].get("value")

    async def waitFor(self, expression: str, what: str, timeout: Optional[float] = None) -> Any:
        """
        Evaluate C{expression} every 50 ms until it is true; its value, or a
        L{BrowserError} naming C{what} after C{timeout} seconds.
        """
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        last = None
        while True:
            try:
                last = await self.evaluate(expression)
            except BrowserError as e:
                if not self._pipe.running:
                    raise
                last = str(e)  # the page may be between documents
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {what}; last: {last!r}")
            await deferLater(self._reactor, 0.05)

    async def dom(self) -> str:
        """
        The page's DOM as HTML, as it is now.
        """
        return await self.evaluate("document.documentElement.outerHTML")

    async def screenshot(self, path: Any) -> None:
        """
        Save what the window shows as a PNG at C{path}.
        """
        result = await self._command("Page.captureScreenshot", {"format": "png"})
        FilePath(str(path)).setContent(base64.b64decode(result["data"]))

    async def close(self) -> None:
        """
        Close the browser (kill it if it does not go), remove its profile.
        """
        if self._pipe.running:
            self._session = None
            killer = self._reactor.callLater(10, self._kill)
            try:
                await self._command("Browser.close")
            except BrowserError:
                self._kill()
            await self._pipe.ended
            if killer.active():
                killer.cancel()
        if self._profile.exists():
            self._profile.remove()

    def _kill(self) -> None:
        if self._pipe.running:
            self._pipe.transport.signalProcess("KILL")


async def dumpDom(reactor: Any, url: str, until: Optional[str] = None, **start: Any) -> str:
    """
    The DOM of C{url} once it has loaded and, if given, the JavaScript
    expression C{until} is true.
    """
    browser = await Browser.start(reactor, **start)
    try:
        await browser.open(url)
        if until is not None:
            await browser.waitFor(until, until)
        return await browser.dom()
    finally:
        await browser.close()


async def screenshot(reactor: Any, url: str, path: Any, until: Optional[str] = None, **start: Any) -> None:
    """
    Save a PNG of C{url} (1280x900 unless C{size=} says otherwise) once it
    has loaded and, if given, C{until} is true.
    """
    browser = await Browser.start(reactor, **start)
    try:
        await browser.open(url)
        if until is not None:
            await browser.waitFor(until, until)
        await browser.screenshot(path)
    finally:
        await browser.close()

