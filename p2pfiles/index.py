"""
The leader's cluster index ("the log") and the writer of C{peer_files.log}.

The leader gathers every live node's file list into a L{ClusterIndex}; the
index answers "who holds this file" for downloads and "what is shared" for
C{p2pfiles ls}.  L{renderLog} turns it into C{peer_files.log}, a line-based
file that other tools read, and L{LogWriter} keeps that file current on disk:
atomically (a reader never sees half a file) and coalesced (a burst of index
updates costs one write, not one per update).

This is a decision/data module: it knows nothing of protocols, transports or
the reactor.  Time and threads are handed in by the node service.
"""

import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.atomic import atomicWrite
from p2pfiles.waiting import Waiters
from p2pfiles.wire import FileEntry

LOG_FORMAT_VERSION = 1

# The keys of one data line of peer_files.log, in the order they are written.
LOG_KEYS = ("node", "address", "name", "size", "mtime", "sha256")

Holder = Tuple[int, str, FileEntry]


class ClusterIndex:
    """
    Every live node's shared files, as the leader knows them.

    Entries are kept per node so that a node leaving costs only its own files,
    with a name -> nodes map beside them so that finding the holders of a file
    does not scan the cluster.  C{version} changes whenever the content does,
    so a writer can tell whether the log needs rewriting.
    """

    def __init__(self) -> None:
        self._files: Dict[int, Dict[str, FileEntry]] = {}
        self._addresses: Dict[int, str] = {}
        self._byName: Dict[str, Set[int]] = {}
        self.version = 0

    def replaceNode(self, node: int, address: str, entries: Iterable[FileEntry]) -> None:
        """
        Set the full index of C{node}, as gathered from it.  A node with no
        files is still recorded as present.
        """
        files = {entry.name: entry for entry in entries}
        if self._files.get(node) == files and self._addresses.get(node) == address:
            return
        self._forget(node)
        self._files[node] = files
        self._addresses[node] = address
        for name in files:
            self._byName.setdefault(name, set()).add(node)
        self.version += 1

    def applyChanges(
        self, node: int, address: str, changed: Iterable[FileEntry], removed: Iterable[str]
    ) -> None:
        """
        Apply an incremental update from C{node}: C{changed} entries replace
        any of the same name, C{removed} names go.  Removing a name the node
        does not have is not an error: updates may cross a full gather.
        """
        altered = node not in self._files or self._addresses[node] != address
        files = self._files.setdefault(node, {})
        self._addresses[node] = address
        for entry in changed:
            if files.get(entry.name) != entry:
                files[entry.name] = entry
                self._byName.setdefault(entry.name, set()).add(node)
                altered = True
        for name in removed:
            if files.pop(name, None) is not None:
                self._dropHolder(name, node)
                altered = True
        if altered:
            self.version += 1

    def removeNode(self, node: int) -> None:
        """
        Forget C{node} and all its files: it left the cluster.
        """
        if node in self._files:
            self._forget(node)
            self.version += 1

    def clear(self) -> None:
        """
        Forget everything, e.g. when this node stops leading.
        """
        if self._files:
            self._files.clear()
            self._addresses.clear()
            self._byName.clear()
            self.version += 1

    def nodes(self) -> List[int]:
        return sorted(self._files)

    def hasNode(self, node: int) -> bool:
        return node in self._files

    def fileCount(self) -> int:
        return sum(len(files) for files in self._files.values())

    def holders(self, name: str, sha256: Optional[str] = None) -> List[Holder]:
        """
        Return C{(node, address, entry)} for every node holding a file named
        exactly C{name} (optionally with content C{sha256}), by node id.
        """
        result = []
        for node in sorted(self._byName.get(name, ())):
            entry = self._files[node][name]
            if sha256 is None or entry.sha256 == sha256:
                result.append((node, self._addresses[node], entry))
        return result

    def content(self, name: str, sha256: Optional[str] = None, usable: Optional[Callable[[int], bool]] = None) -> Optional[Tuple[FileEntry, List[Tuple[int, str]]]]:
        """
        The content served under C{name}, and the nodes that can send it:
        C{(entry, [(node, address), ...])}, or L{None} if nobody holds it.

        When holders disagree, the lowest id's copy names the content (the
        rule every client sees in C{ls}); any holder of that same content
        can serve it.  C{usable} narrows the holders (e.g. to live nodes).
        """
        holders = [h for h in self.holders(name, sha256) if usable is None or usable(h[0])]
        if not holders:
            return None
        entry = holders[0][2]
        return entry, [(node, address) for node, address, e in holders if e.sha256 == entry.sha256]

    def listing(self) -> List[dict]:
        """
        The C{p2pfiles ls --json} contract: one object per distinct
        C{(name, sha256)}, so that two different files under one name show as
        two rows rather than as one file with misleading holders.
        """
        groups: Dict[Tuple[str, str], dict] = {}
        for node, _, entry in self.entries():
            row = groups.get((entry.name, entry.sha256))
            if row is None:
                row = {"name": entry.name, "size": entry.size, "sha256": entry.sha256, "holders": []}
                groups[(entry.name, entry.sha256)] = row
            row["holders"].append(node)
        return [groups[key] for key in sorted(groups)]

    def snapshot(self) -> "ClusterIndex":
        """
        A copy that later changes to this index do not touch: cheap to take
        on the reactor thread, safe to render in another.
        """
        copy = ClusterIndex()
        copy._files = {node: dict(files) for node, files in self._files.items()}
        copy._addresses = dict(self._addresses)
        copy._byName = {name: set(nodes) for name, nodes in self._byName.items()}
        copy.version = self.version
        return copy

    def entries(self) -> List[Holder]:
        """
        Every C{(node, address, entry)}, sorted by name then node.
        """
        result = [
            (node, self._addresses[node], entry)
            for node, files in self._files.items()
            for entry in files.values()
        ]
        result.sort(key=lambda item: (item[2].name, item[0]))
        return result

    def _forget(self, node: int) -> None:
        for name in self._files.pop(node, {}):
            self._dropHolder(name, node)
        self._addresses.pop(node, None)

    def _dropHolder(self, name: str, node: int) -> None:
        nodes = self._byName.get(name)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self._byName[name]


# Characters that json.dumps(ensure_ascii=False) leaves raw but that some line
# splitters (str.splitlines, JavaScript) treat as line ends, plus lone
# surrogates, which cannot be encoded as UTF-8.  They only ever occur inside
# JSON strings, where a \uXXXX escape means the same character.
_UNSAFE = re.compile("[\x85\u2028\u2029\ud800-\udfff]")


def _escapeUnsafe(match: "re.Match[str]") -> str:
    return "\\u%04x" % (ord(match.group()),)


def _logLine(node: int, address: str, entry: FileEntry) -> str:
    values = (node, address, entry.name, entry.size, entry.mtime, entry.sha256)
    text = json.dumps(dict(zip(LOG_KEYS, values)), ensure_ascii=False, separators=(", ", ": "))
    return _UNSAFE.sub(_escapeUnsafe, text)


def _timestamp(now: float) -> str:
    # Round once to milliseconds so that both forms show the same instant.
    seconds, millis = divmod(int(round(now * 1000)), 1000)
    iso = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{iso}.{millis:03d}Z ({seconds}.{millis:03d})"


def renderLog(index: ClusterIndex, leader: int, epoch: int, now: float) -> bytes:
    """
    Render C{index} as the content of C{peer_files.log}: C{#} header lines,
    then one JSON object a line, sorted by name then node.

    Every name goes through JSON escaping (see L{_UNSAFE} for the extra
    characters escaped), so no name can break a line or inject one.
    """
    entries = index.entries()
    lines = [
        f"# p2pfiles peer_files.log format {LOG_FORMAT_VERSION}",
        f"# leader: {leader}",
        f"# epoch: {epoch}",
        f"# written: {_timestamp(now)}",
        f"# nodes: {len(index.nodes())}",
        f"# files: {len(entries)}",
    ]
    lines.extend(_logLine(node, address, entry) for node, address, entry in entries)
    return ("\n".join(lines) + "\n").encode("utf-8")


_HEADER_INTS = ("leader", "epoch", "nodes", "files")


def parseLog(data: bytes) -> Tuple[dict, List[dict]]:
    """
    Parse C{peer_files.log} content into its header fields and its rows.
    Lines are split on C{\\n} only, as the format defines them.  Raises
    L{ValueError} on anything malformed.

    The header dict has C{format}, C{leader}, C{epoch}, C{nodes}, C{files}
    (ints), C{written} (the ISO-8601 text) and C{time} (epoch seconds).
    """
    text = data.decode("utf-8")
    if not text.endswith("\n"):
        raise ValueError("log does not end with a newline")
    header: dict = {}
    rows: List[dict] = []
    prefix = "# p2pfiles peer_files.log format "
    for line in text[:-1].split("\n"):
        if line.startswith(prefix):
            header["format"] = int(line[len(prefix) :])
        elif line.startswith("# "):
            key, sep, value = line[2:].partition(": ")
            if not sep:
                raise ValueError(f"malformed header line {line[:80]!r}")
            if key == "written":
                iso, _, seconds = value.partition(" ")
                header["written"] = iso
                header["time"] = float(seconds.strip("()"))
            elif key in _HEADER_INTS:
                header[key] = int(value)
            else:
                header[key] = value
        else:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"log line is not a JSON object: {line[:80]!r}")
            rows.append(row)
    if "format" not in header:
        raise ValueError("log has no format line")
    return header, rows


def _buildAndWrite(path: FilePath, data: Any) -> None:
    if callable(data):
        data = data()
    atomicWrite(path, data)


class LogWriter:
    """
    Keep C{peer_files.log} current without writing it once per update.

    A change schedules a write C{minInterval} later; further changes until
    then ride along, and the content is rendered when the write starts, so
    the latest state is what lands on disk.  Changes during a write schedule
    exactly one more.  Writes run in a thread (they fsync) and replace the
    file atomically.
    """

    log = Logger()

    def __init__(
        self,
        path: FilePath,
        clock: IReactorTime,
        runInThread: Callable[..., Deferred],
        minInterval: float = 0.25,
    ) -> None:
        self._path = path
        self._clock = clock
        self._runInThread = runInThread
        self._minInterval = minInterval
        self._render: Optional[Callable[[], bytes]] = None
        self._timer: Optional[IDelayedCall] = None
        self._writing: Optional[Deferred] = None
        self._idleWaiters = Waiters()
        self._stopped = False
        self.writes = 0

    def changed(self, render: Callable[[], Any]) -> None:
        """
        Something in the index changed: write the output of C{render} soon.

        C{render} is called on the reactor thread when the write starts.  It
        returns the bytes to write, or, for output that is slow to build, a
        callable that builds them, which then runs in the writer's thread
        with the write itself.
        """
        if self._stopped:
            return
        self._render = render
        if self._writing is None and self._timer is None:
            self._timer = self._clock.callLater(self._minInterval, self._write)

    def flush(self) -> Deferred:
        """
        Write now if a change is pending (after any write under way), and
        return a Deferred that fires when the file is current.
        """
        if self._writing is not None:
            waiter = self._waitIdle()
            waiter.addCallback(lambda _: self.flush())
            return waiter
        if self._render is None:
            return succeed(None)
        self._cancelTimer()
        return self._write()

    def stop(self) -> Deferred:
        """
        Stop writing: cancel any scheduled write and wait for a running one.
        A pending change is dropped; call L{flush} first to keep it.
        """
        self._stopped = True
        self._render = None
        self._cancelTimer()
        if self._writing is not None:
            return self._waitIdle()
        return succeed(None)

    def _write(self) -> Deferred:
        """
        Render and start one write; the result fires (with L{None}, never an
        error) once it has ended either way.
        """
        self._timer = None
        render, self._render = self._render, None
        assert render is not None
        try:
            data = render()
        except Exception:
            self.log.failure("could not render {path}", path=self._path.path)
            return succeed(None)
        writing = maybeDeferred(self._runInThread, _buildAndWrite, self._path, data)
        self._writing = writing
        writing.addCallbacks(self._succeeded, self._failed)
        writing.addCallback(self._written)
        return writing

    def _succeeded(self, _: object) -> None:
        self.writes += 1

    def _failed(self, reason: Failure) -> None:
        self.log.error(
            "could not write {path}: {reason}",
            path=self._path.path,
            reason=reason.getErrorMessage(),
        )

    def _written(self, _: None) -> None:
        self._writing = None
        if self._render is not None and not self._stopped:
            self._timer = self._clock.callLater(self._minInterval, self._write)
        self._idleWaiters.fire(None)

    def _waitIdle(self) -> Deferred:
        return self._idleWaiters.wait()

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
