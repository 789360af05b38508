"""
The C{p2pfiles} command: C{status}, C{ls}, C{get}, C{fetch}, C{id}, C{demo}.

Every expected failure is one line on stderr and a documented exit code; a
traceback means a bug.  This module is the only place where the system's
refusal codes (L{p2pfiles.errors}) become exit codes.
"""

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.python.filepath import FilePath

from p2pfiles import __version__
from p2pfiles.auth import SecretError, readSecret
from p2pfiles.client import (
    askLeader,
    fetchInto,
    bounded,
    clientIdentity,
    connect,
    receiveListing,
    request,
)
from p2pfiles.errors import P2PError
from p2pfiles.identity import (
    CERTIFICATE_FILE,
    IdentityError,
    Pins,
    fingerprintOf,
    loadCertificate,
    parseFingerprint,
    stateIdentity,
)
from p2pfiles.protocol import LocalIdentity
from p2pfiles.names import BadName, checkName
from p2pfiles.partfile import PartialFile, StreamSink
from p2pfiles.progress import Progress, humanSize
from p2pfiles.runtime import tuneAllocator
from p2pfiles.transfer import download
from p2pfiles.wire import FileEntry, Message, WireError

DEFAULT_NODE = "127.0.0.1:9001"

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_TIMEOUT = 5
EXIT_NOT_FOUND = 6
EXIT_NO_LEADER = 7
EXIT_VERIFY = 8
EXIT_REFUSED = 9
EXIT_LOCAL = 10
# An interrupted command exits 128 + the signal's number, as a shell reports
# a command killed by it: 130 for SIGINT (Ctrl-C), 143 for SIGTERM.
EXIT_SIGNAL_BASE = 128

# Refusal codes -> exit codes.  Every code in p2pfiles.errors.CODES is here
# (a test checks it).
EXIT_CODES = {
    "auth": EXIT_AUTH,
    "version": EXIT_REFUSED,
    "protocol": EXIT_ERROR,
    "internal": EXIT_ERROR,
    "not-found": EXIT_NOT_FOUND,
    "no-leader": EXIT_NO_LEADER,
    "bad-name": EXIT_REFUSED,
    "bad-offset": EXIT_REFUSED,
    "conflict": EXIT_REFUSED,
    "busy": EXIT_REFUSED,
    "changed": EXIT_UNREACHABLE,
    "timeout": EXIT_TIMEOUT,
    "verify": EXIT_VERIFY,
    "unavailable": EXIT_UNREACHABLE,
    "unreachable": EXIT_UNREACHABLE,
    "gone": EXIT_UNREACHABLE,
    "io": EXIT_LOCAL,
    "usage": EXIT_USAGE,
    "limit": EXIT_REFUSED,
    "transfer": EXIT_ERROR,
    "refused": EXIT_REFUSED,
}


def exitCode(error: P2PError) -> int:
    """
    The exit code for C{error}.
    """
    return EXIT_CODES.get(error.code, EXIT_ERROR)


def _commonOptions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node",
        default=os.environ.get("P2PFILES_NODE", DEFAULT_NODE),
        metavar="HOST:PORT",
        help=f"the node to ask (default $P2PFILES_NODE or {DEFAULT_NODE})",
    )
    parser.add_argument(
        "--secret-file",
        # Empty means no secret, as in the tac file.
        default=os.environ.get("P2PFILES_SECRET_FILE") or None,
        metavar="F",
        help="file holding the cluster secret (default $P2PFILES_SECRET_FILE; empty: none)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the node (default 10)"
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        type=_fingerprint,
        metavar="sha256:HEX",
        help="talk only to nodes presenting this certificate fingerprint (repeatable: one per node "
        "you may be sent to)",
    )


def _fingerprint(text: str) -> str:
    try:
        return parseFingerprint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def makeParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pfiles", description="Talk to a p2pfiles cluster.")
    parser.add_argument("--version", action="version", version=f"p2pfiles {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    status = commands.add_parser("status", help="who a node is, who leads, who it sees")
    _commonOptions(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true", help="keep printing every change")
    status.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="with --watch: stop (exit 3) when the node goes away, instead of watching through another member",
    )

    ls = commands.add_parser("ls", help="every file the cluster shares")
    _commonOptions(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON list")

    get = commands.add_parser("get", help="download a file through the leader")
    _commonOptions(get)
    get.add_argument("name", metavar="NAME", help="the file's name")
    get.add_argument("-o", "--output", metavar="PATH", help="where to save it (default ./NAME; - for stdout)")
    get.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    get.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")

    fetch = commands.add_parser("fetch", help="have a node get a file into its own share")
    _commonOptions(fetch)
    fetch.add_argument("name", metavar="NAME", help="the file's name")
    fetch.add_argument("--overwrite", action="store_true", help="replace a different file of the same name")
    fetch.add_argument("--json", action="store_true", help="print one JSON object")

    ident = commands.add_parser("id", help="print a node's certificate fingerprint (no node needs to run)")
    where = ident.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", metavar="DIR", help="the node's state directory (node.crt is read there)")
    where.add_argument("--tls-cert", metavar="FILE", help="a PEM certificate given to a node with --tls-cert")

    demo = commands.add_parser("demo", help="run three local nodes through the original scenario")
    demo.add_argument("--dir", help="workspace directory (default: a temporary one, removed afterwards)")
    demo.add_argument("--keep", action="store_true", help="leave the nodes running")

    return parser


def _secret(args: argparse.Namespace) -> bytes:
    if not args.secret_file:
        return b""
    try:
        return readSecret(args.secret_file)
    except SecretError as e:
        raise P2PError(str(e), "usage") from None


def _identity(args: argparse.Namespace) -> LocalIdentity:
    """
    This client: its secret, TLS without a certificate, and its pins.
    """
    return clientIdentity(_secret(args), Pins(anyOf=args.pin))


def formatStatus(status: Dict[str, Any]) -> str:
    """
    The readable form of a node's status.
    """
    leader = status["leader"]
    lines = [
        "node {id} at {address}: {role}, leader {leader}, epoch {epoch}".format(
            id=status["id"],
            address=status.get("address", "?"),
            role=status["role"],
            leader="none" if leader is None else leader,
            epoch=status["epoch"],
        ),
    ]
    if status.get("fingerprint"):
        lines.append(f"  certificate {status['fingerprint']}")
    lines.append(f"  {'ID':>4}  {'ADDRESS':<24} {'ALIVE':<6} ROLE")

    for member in status["members"]:
        if member["id"] == leader:
            role = "leader"
        elif member["alive"]:
            role = "member"
        else:
            role = "-"
        lines.append(
            f"  {member['id']:>4}  {shownText(str(member['address'])):<24} {'yes' if member['alive'] else 'no':<6} {role}"
        )
    for refusal in status.get("refused", []):
        lines.append(f"  warning: node {refusal['id']} refuses this node's link: {shownText(str(refusal['reason']))}")
    for conflict in status.get("conflicts", []):
        lines.append(
            "  conflict: refused a second node {id} at {address} ({fingerprint}), {count} times".format(
                id=conflict.get("id"),
                address=shownText(str(conflict.get("address"))),
                fingerprint=shownText(str(conflict.get("fingerprint") or "no certificate")),
                count=conflict.get("count", 1),
            )
        )
    return "\n".join(lines)


def formatChange(status: Dict[str, Any], now: float) -> str:
    """
    One line for a change seen by C{status --watch}.
    """
    alive = ",".join(str(m["id"]) for m in status["members"] if m["alive"]) or "none"
    leader = "none" if status["leader"] is None else status["leader"]
    when = time.strftime("%H:%M:%S", time.localtime(now))
    return f"{when} {status['role']}, leader {leader}, epoch {status['epoch']}, alive {alive}"


def _print(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


async def statusCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    identity = _identity(args)
    address = args.node
    connection = await connect(reactor, address, b"", args.timeout, identity)
    last: Optional[tuple] = None
    while True:
        status: Optional[Dict[str, Any]] = None
        try:
            reply = await bounded(reactor, request(connection, Message("status", watch=args.watch)), args.timeout, address)
            while True:
                status = reply.status
                key = (status["id"], status["role"], status["leader"], status["epoch"], json.dumps(status["members"]))
                if key != last:
                    if args.json:
                        _print(out, json.dumps(status, sort_keys=True))
                    elif last is None:
                        _print(out, formatStatus(status))
                    else:
                        _print(out, formatChange(status, reactor.seconds()))
                    last = key
                if not args.watch:
                    return EXIT_OK
                reply = await connection.receive()
        except P2PError as e:
            if not (args.watch and e.code == "unreachable"):
                raise
            members = status["members"] if status is not None else []
        finally:
            connection.close()
        if not args.follow:
            raise P2PError(f"node {address} went away", "unreachable")
        address, connection = await _follow(reactor, args, identity, address, members, err)


async def _follow(
    reactor: Any, args: argparse.Namespace, identity: LocalIdentity, gone: str, members: List[Dict[str, Any]], err: TextIO
) -> Any:
    """
    The watched node at C{gone} went away: connect to another member it
    listed (those it saw alive first), say so in one line, and return that
    member's address and connection.
    """
    others = [m for m in members if m["address"] != gone and m["address"]]
    others.sort(key=lambda m: (not m["alive"], m["id"]))
    for member in others:
        try:
            connection = await connect(reactor, member["address"], b"", args.timeout, identity)
        except P2PError as e:
            if e.code in ("auth", "usage"):
                raise
            continue
        _print(err, f"p2pfiles status: node {gone} went away; watching node {member['id']} at {member['address']}")
        return member["address"], connection
    raise P2PError(f"node {gone} went away, and no other member it knew answered", "unreachable")


def shownText(text: str) -> str:
    """
    C{text} safe to print in a table: every character that is not
    printable (ESC, newline, NUL, bidi controls...) written as its Python
    escape (C{\\x1b}, C{\\n}), so that a name cannot colour the
    terminal or add a row.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def checkListing(files: Any) -> List[Dict[str, Any]]:
    """
    C{files} if every row is a well-formed listing row (a name, a size from
    0 to 2**63 - 1, a 64-digit sha256, holders that are ids); a
    L{P2PError} ("protocol") naming the first bad row otherwise, so that
    whatever a node sends, C{ls} prints a table or one line.
    """
    if not isinstance(files, list):
        raise P2PError("the leader sent a listing that is not a list", "protocol")
    for i, row in enumerate(files):
        if not isinstance(row, dict):
            raise P2PError(f"the leader sent a bad listing: row {i} is not an object", "protocol")
        try:
            FileEntry.fromDict({**row, "mtime": 0})
        except WireError as e:
            raise P2PError(f"the leader sent a bad listing: row {i}: {e}", "protocol") from None
        holders = row.get("holders")
        if not isinstance(holders, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in holders
        ):
            raise P2PError(f"the leader sent a bad listing: row {i}: holders are not ids", "protocol")
    return files


def formatListing(files: List[Dict[str, Any]]) -> str:
    if not files:
        return "no files shared"
    names = [shownText(f["name"]) for f in files]
    width = min(max(len(name) for name in names), 60)
    lines = [f"{'NAME':<{width}}  {'SIZE':>10}  {'HOLDERS':<12} SHA256"]
    for name, f in zip(names, files):
        holders = ",".join(str(h) for h in f["holders"])
        lines.append(f"{name:<{width}}  {humanSize(f['size']):>10}  {holders:<12} {f['sha256'][:12]}")
    return "\n".join(lines)


async def lsCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    connection, reply = await askLeader(
        reactor, args.node, b"", Message("ls"), args.timeout, _identity(args)
    )
    try:
        files = checkListing(await receiveListing(reactor, connection, reply, args.timeout, args.node))
    finally:
        connection.close()
    if args.json:
        _print(out, json.dumps(files))
    else:
        _print(out, formatListing(files))
    return EXIT_OK


def _checkedName(name: str) -> str:
    try:
        return checkName(name)
    except BadName as e:
        raise P2PError(str(e), "bad-name") from None


def _destination(name: str, output: Optional[str], overwrite: bool) -> FilePath:
    """
    Where C{get} saves C{name}: C{./NAME}; C{-o DIR} or C{-o DIR/} for
    DIR/NAME (a trailing slash always means a directory, which must exist);
    or C{-o PATH}.  An existing file is refused unless C{overwrite}; a
    missing directory is refused, not made.
    """
    if output is None:
        path = FilePath(os.getcwd()).child(name)
        shown = name
    elif output.endswith("/"):
        directory = FilePath(os.path.abspath(output))
        if not directory.isdir():
            raise P2PError(f"-o {output}: no such directory", "io")
        path = directory.child(name)
        shown = output + name
    else:
        path = FilePath(os.path.abspath(output))
        shown = output
        if path.isdir():
            path = path.child(name)
            shown = os.path.join(output, name)
    if not path.parent().isdir():
        raise P2PError(f"cannot save {shown}: no such directory {os.path.dirname(shown) or '.'}", "io")
    if (path.exists() or path.islink()) and not overwrite:
        raise P2PError(f"{shown} exists; give --overwrite to replace it", "conflict")
    return path


def _shown(path: FilePath) -> str:
    """
    C{path} as the user would type it: relative to the current directory
    when it lies inside it.
    """
    relative = os.path.relpath(path.path)
    return path.path if relative.startswith("..") else relative


async def _members(reactor: Any, args: argparse.Namespace, identity: LocalIdentity) -> Dict[str, int]:
    """
    The node the user named, then every other member it knows, by address
    with their ids: where to look for a new leader if the current one dies
    mid-transfer.
    """
    connection = await connect(reactor, args.node, b"", args.timeout, identity)
    try:
        reply = await bounded(reactor, request(connection, Message("status", watch=False)), args.timeout, args.node)
    finally:
        connection.close()
    members = {args.node: reply.status["id"]}
    for member in reply.status["members"]:
        if member["address"] and member["address"] not in members:
            members[member["address"]] = member["id"]
    return members


class Interrupted(Exception):
    """
    The command was interrupted; the string form says what it kept.
    """


async def getCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    name = _checkedName(args.name)
    toStdout = args.output == "-"
    target = None if toStdout else _destination(name, args.output, args.overwrite)
    identity = _identity(args)
    members = await _members(reactor, args, identity)
    if target is None:
        sink: Any = StreamSink(getattr(out, "buffer", out))
    else:
        sink = PartialFile(target.parent(), target.basename())
    # Not over the file itself when it goes to the same terminal.
    showing = err.isatty() and not args.json and not (toStdout and out.isatty())
    progress = Progress(reactor, err, name, members) if showing else None

    def inThread(f: Any, *a: Any) -> Deferred:
        return deferToThread(f, *a)

    try:
        summary = await download(
            reactor,
            name,
            sink,
            list(members),
            b"",
            inThread,
            identity,
            timeout=args.timeout,
            onProgress=progress,
            onStage=progress.stage if progress is not None else None,
        )
    except CancelledError:
        if target is None:
            raise Interrupted(f"{humanSize(sink.offset)} of {name} written to the output") from None
        if sink.offset == 0:
            raise Interrupted("nothing received yet") from None
        raise Interrupted(
            f"{humanSize(sink.offset)} kept in {_shown(sink.part)}; run the same command to resume"
        ) from None
    finally:
        if progress is not None:
            progress.end()
    if args.json:
        _print(out, json.dumps(summary))
        return EXIT_OK
    what = f"wrote {name} to the output" if target is None else f"saved {_shown(target)}"
    resumed = f", {humanSize(summary['resumed_from'])} not fetched again" if summary["resumed_from"] else ""
    _print(
        err,
        f"{what} ({humanSize(summary['size'])}, sha256 {summary['sha256'][:16]}..., "
        f"via leader {summary['via'][0]} from node {summary['via'][1]}{resumed})",
    )
    return EXIT_OK


async def fetchCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    name = _checkedName(args.name)
    connection = await connect(reactor, args.node, b"", args.timeout, _identity(args))
    try:
        reply = await fetchInto(reactor, connection, name, args.overwrite, args.timeout)
    finally:
        connection.close()
    result = {"name": reply.name, "size": reply.size, "sha256": reply.sha256, "already": reply.already}
    if args.json:
        _print(out, json.dumps(result))
    elif reply.already:
        _print(out, f"{args.node} already has {name} with the same content (sha256 {reply.sha256[:16]}...)")
    else:
        _print(out, f"{args.node} now has {name} ({humanSize(reply.size)}, sha256 {reply.sha256[:16]}..., verified)")
    return EXIT_OK


async def idCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Print a node's fingerprint from its files; make nothing.
    """
    try:
        if args.tls_cert is not None:
            certificate = loadCertificate(FilePath(args.tls_cert))
            _print(out, fingerprintOf(certificate.public_bytes(Encoding.DER)))
            return EXIT_OK
        state = FilePath(args.state)
        identity = stateIdentity(state, create=False)
    except IdentityError as e:
        raise P2PError(str(e), "usage") from None
    if identity is None:
        raise P2PError(
            f"no TLS identity in {state.path} (no {state.child(CERTIFICATE_FILE).basename()}): "
            "a node makes one on its first start",
            "usage",
        )
    _print(out, identity.fingerprint)
    return EXIT_OK


COMMANDS = {
    "get": getCommand,
    "fetch": fetchCommand,
    "status": statusCommand,
    "ls": lsCommand,
    "id": idCommand,
}

# What a client with no secret is told when the node wants one.
NO_SECRET = (
    "authentication failed: the node needs the cluster secret and none was given; "
    "give it with --secret-file F or $P2PFILES_SECRET_FILE"
)


class Invocation:
    """
    One run of a command.  C{done} fires with its exit code; expected
    failures are printed as one line.  L{interrupt} stops it as SIGINT or
    SIGTERM would: the command cleans up (a download keeps its part), says
    in one line what it kept, and exits 128 + the signal's number.
    """

    def __init__(self, reactor: Any, argv: List[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.signal: Optional[int] = None
        self.out = out
        self.err = err
        parser = makeParser()
        try:
            self.args = parser.parse_args(argv)
        except SystemExit as e:
            self.args = None
            self.done = Deferred.fromCoroutine(_const(int(e.code or 0)))
            return
        d = Deferred.fromCoroutine(COMMANDS[self.args.command](reactor, self.args, out, err))
        self.done = d.addErrback(self._failed)

    def interrupt(self, signum: int) -> None:
        """
        Stop the command as signal C{signum} asks.
        """
        if self.signal is None and not self.done.called:
            self.signal = signum
            self.done.cancel()

    def _failed(self, reason: Any) -> int:
        args, err = self.args, self.err
        if self.signal is not None:
            detail = f": {reason.value}" if reason.check(Interrupted) else ""
            err.write(f"p2pfiles {args.command}: interrupted{detail}\n")
            err.flush()
            return EXIT_SIGNAL_BASE + self.signal
        if reason.check(P2PError):
            error = reason.value
            text = str(error)
            if error.code == "auth" and not args.secret_file and "wrong cluster secret" in text:
                text = NO_SECRET
            err.write(f"p2pfiles {args.command}: error: {text}\n")
            err.flush()
            return exitCode(error)
        err.write(f"p2pfiles {args.command}: internal error: {reason.getErrorMessage()}\n")
        reason.printTraceback(err)
        return EXIT_ERROR


def run(reactor: Any, argv: List[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Deferred:
    """
    Run one command; fire with its exit code.  Expected failures are printed
    here as one line.
    """
    return Invocation(reactor, argv, out, err).done


async def _const(value: int) -> int:
    return value


def catchSignals(reactor: Any, invocation: Invocation, signals: Any = signal) -> None:
    """
    Make SIGINT and SIGTERM interrupt C{invocation} instead of stopping the
    reactor under it (which would end the process with exit 0 and nothing
    said).  A second signal ends the process at once, the default way.
    Call it once the reactor runs: it replaces the reactor's own handlers.
    """

    def handler(signum: int, frame: Any) -> None:
        for each in (signals.SIGINT, signals.SIGTERM):
            signals.signal(each, signals.SIG_DFL)
        reactor.callFromThread(invocation.interrupt, signum)

    for each in (signals.SIGINT, signals.SIGTERM):
        signals.signal(each, handler)


def main(argv: Optional[List[str]] = None) -> None:
    """
    The console script.
    """
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["demo"]:
        # The demo drives processes, not a reactor.
        from p2pfiles import demo

        raise SystemExit(demo.main(argv[1:]))

    # A get moves file bytes through this process as a node does.
    tuneAllocator()

    def start(reactor: Any) -> Deferred:
        invocation = Invocation(reactor, argv)
        reactor.callWhenRunning(catchSignals, reactor, invocation)
        return invocation.done.addCallback(_exitWith)

    react(start)


def _exitWith(code: int) -> None:
    if code != EXIT_OK:
        raise SystemExit(code)
