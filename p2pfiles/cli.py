"""
The C{p2pfiles} command: C{status}, C{ls}, C{get}, C{fetch}, C{id}, C{demo}.

Every expected failure is one line on stderr and a documented exit code; a
traceback means a bug.  This module is the only place where the system's
refusal codes (L{p2pfiles.errors}) become exit codes.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from twisted.internet.defer import Deferred
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
from p2pfiles.transfer import download
from p2pfiles.wire import Message

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
        default=os.environ.get("P2PFILES_SECRET_FILE"),
        metavar="F",
        help="file holding the cluster secret (default $P2PFILES_SECRET_FILE)",
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

    ls = commands.add_parser("ls", help="every file the cluster shares")
    _commonOptions(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON list")

    get = commands.add_parser("get", help="download a file through the leader")
    _commonOptions(get)
    get.add_argument("name", metavar="NAME", help="the file's name")
    get.add_argument("-o", "--output", metavar="PATH", help="where to save it (default ./NAME; - for stdout)")
    get.add_argument("--json", action="store_true", help="print one JSON summary at the end")

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
    if args.secret_file is None:
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
            f"  {member['id']:>4}  {member['address']:<24} {'yes' if member['alive'] else 'no':<6} {role}"
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
    connection = await connect(reactor, args.node, b"", args.timeout, _identity(args))
    # Ctrl-C or SIGTERM stops the reactor, which closes the connection: that
    # is the user leaving, not the node going away.
    # (The trigger can stay: the command ends the process when it returns.)
    leaving: List[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", leaving.append, True)
    try:
        reply = await bounded(reactor, request(connection, Message("status", watch=args.watch)), args.timeout, args.node)
        last = None
        while True:
            status = reply.status
            key = (status["role"], status["leader"], status["epoch"], json.dumps(status["members"]))
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
        if leaving:
            return EXIT_OK
        if args.watch and e.code == "unreachable":
            raise P2PError(f"node {args.node} went away", "unreachable") from None
        raise
    finally:
        connection.close()


def humanSize(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Judge by the rounded figure, so 1048575 is "1.0 MiB", not "1024.0 KiB".
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def formatListing(files: List[Dict[str, Any]]) -> str:
    if not files:
        return "no files shared"
    width = min(max(len(f["name"]) for f in files), 60)
    lines = [f"{'NAME':<{width}}  {'SIZE':>10}  {'HOLDERS':<12} SHA256"]
    for f in files:
        holders = ",".join(str(h) for h in f["holders"])
        lines.append(f"{f['name']:<{width}}  {humanSize(f['size']):>10}  {holders:<12} {f['sha256'][:12]}")
    return "\n".join(lines)


async def lsCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    connection, reply = await askLeader(
        reactor, args.node, b"", Message("ls"), args.timeout, _identity(args)
    )
    try:
        files = await receiveListing(reactor, connection, reply, args.timeout, args.node)
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


def _destination(name: str, output: Optional[str]) -> FilePath:
    """
    Where C{get} saves C{name}: C{-o PATH}, or into PATH if it is a
    directory, or C{./NAME}.
    """
    if output is None:
        return FilePath(os.getcwd()).child(name)
    path = FilePath(os.path.abspath(output))
    if path.isdir():
        return path.child(name)
    return path


class Progress:
    """
    Bytes, rate and ETA on one self-overwriting line of a terminal.
    """

    def __init__(self, reactor: Any, stream: TextIO) -> None:
        self.reactor = reactor
        self.stream = stream
        self.started = reactor.seconds()
        self.shown = 0.0
        self.first: Optional[int] = None

    def __call__(self, done: int, total: int) -> None:
        now = self.reactor.seconds()
        if self.first is None:
            self.first = done
        if now - self.shown < 0.2 and done < total:
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        rate = (done - self.first) / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        self.stream.write(
            f"\r{humanSize(done)} / {humanSize(total)}  {humanSize(int(rate))}/s  ETA {eta:.0f}s   "
        )
        self.stream.flush()

    def end(self) -> None:
        if self.first is not None:
            self.stream.write("\n")
            self.stream.flush()


async def _memberAddresses(reactor: Any, args: argparse.Namespace, identity: LocalIdentity) -> List[str]:
    """
    The node the user named, then every other member it knows: where to
    look for a new leader if the current one dies mid-transfer.
    """
    connection = await connect(reactor, args.node, b"", args.timeout, identity)
    try:
        reply = await bounded(reactor, request(connection, Message("status", watch=False)), args.timeout, args.node)
    finally:
        connection.close()
    others = [m["address"] for m in reply.status["members"] if m["address"] != args.node]
    return [args.node] + others


async def getCommand(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    name = _checkedName(args.name)
    identity = _identity(args)
    addresses = await _memberAddresses(reactor, args, identity)
    toStdout = args.output == "-"
    if toStdout:
        sink: Any = StreamSink(getattr(out, "buffer", out))
    else:
        target = _destination(name, args.output)
        sink = PartialFile(target.parent(), target.basename())
    progress = Progress(reactor, err) if (not toStdout or not out.isatty()) and err.isatty() and not args.json else None

    def inThread(f: Any, *a: Any) -> Deferred:
        return deferToThread(f, *a)

    try:
        summary = await download(
            reactor, name, sink, addresses, b"", inThread, identity, timeout=args.timeout, onProgress=progress
        )
    finally:
        if progress is not None:
            progress.end()
    if args.json:
        _print(out, json.dumps(summary))
    elif not toStdout:
        _print(
            err,
            f"saved {sink.final.path} ({humanSize(summary['size'])}, sha256 {summary['sha256'][:16]}..., "
            f"via leader {summary['via'][0]} from node {summary['via'][1]})",
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


def run(reactor: Any, argv: List[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Deferred:
    """
    Run one command; fire with its exit code.  Expected failures are printed
    here as one line.
    """
    parser = makeParser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return Deferred.fromCoroutine(_const(int(e.code or 0)))

    def failed(reason: Any) -> int:
        if reason.check(P2PError):
            err.write(f"p2pfiles {args.command}: error: {reason.value}\n")
            err.flush()
            return exitCode(reason.value)
        err.write(f"p2pfiles {args.command}: internal error: {reason.getErrorMessage()}\n")
        reason.printTraceback(err)
        return EXIT_ERROR

    d = Deferred.fromCoroutine(COMMANDS[args.command](reactor, args, out, err))
    return d.addErrback(failed)


async def _const(value: int) -> int:
    return value


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

    def start(reactor: Any) -> Deferred:
        return run(reactor, argv).addCallback(_exitWith)

    react(start)


def _exitWith(code: int) -> None:
    if code != EXIT_OK:
        raise SystemExit(code)
