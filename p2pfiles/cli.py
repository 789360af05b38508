"""
The C{p2pfiles} command: C{status}, C{ls}, C{get}, C{fetch}, C{demo}.

Every expected failure is one line on stderr and a documented exit code (see
L{p2pfiles.client}); a traceback means a bug.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import react

from p2pfiles import __version__
from p2pfiles.auth import SecretError, readSecret
from p2pfiles.client import (
    EXIT_ERROR,
    EXIT_NO_LEADER,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ClientError,
    connect,
    request,
)
from p2pfiles.wire import Message

DEFAULT_NODE = "127.0.0.1:9001"


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


def makeParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pfiles", description="Talk to a p2pfiles cluster.")
    parser.add_argument("--version", action="version", version=f"p2pfiles {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    status = commands.add_parser("status", help="who a node is, who leads, who it sees")
    _commonOptions(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true", help="keep printing every change")

    return parser


def _secret(args: argparse.Namespace) -> bytes:
    if args.secret_file is None:
        return b""
    try:
        return readSecret(args.secret_file)
    except SecretError as e:
        raise ClientError(str(e), EXIT_USAGE) from None


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
        f"  {'ID':>4}  {'ADDRESS':<24} {'ALIVE':<6} ROLE",
    ]
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


def _print(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


async def statusCommand(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    connection = await connect(reactor, args.node, _secret(args), args.timeout)
    try:
        reply = await _bounded(reactor, request(connection, Message("status", watch=args.watch)), args)
        last = None
        while True:
            status = reply.status
            key = (status["role"], status["leader"], status["epoch"], json.dumps(status["members"]))
            if key != last:
                last = key
                if args.json:
                    _print(out, json.dumps(status, sort_keys=True))
                else:
                    _print(out, formatStatus(status))
            if not args.watch:
                return EXIT_OK
            reply = await connection.receive()
    except ClientError as e:
        if args.watch and e.code == EXIT_UNREACHABLE:
            raise ClientError(f"node {args.node} went away", EXIT_UNREACHABLE) from None
        raise
    finally:
        connection.close()


def _bounded(reactor: Any, d: Deferred, args: argparse.Namespace) -> Deferred:
    def timedOut(reason: Any) -> Any:
        if reason.check(DeferredTimeout):
            raise ClientError(f"no answer from {args.node} within {args.timeout:g}s", EXIT_TIMEOUT)
        return reason

    d.addTimeout(args.timeout, reactor)
    return d.addErrback(timedOut)


COMMANDS = {
    "status": statusCommand,
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
        if reason.check(ClientError):
            err.write(f"p2pfiles {args.command}: error: {reason.value}\n")
            err.flush()
            return reason.value.code
        err.write(f"p2pfiles {args.command}: internal error: {reason.getErrorMessage()}\n")
        reason.printTraceback(err)
        return EXIT_ERROR

    d = Deferred.fromCoroutine(COMMANDS[args.command](reactor, args, out))
    return d.addErrback(failed)


async def _const(value: int) -> int:
    return value


def main(argv: Optional[List[str]] = None) -> None:
    """
    The console script.
    """
    if argv is None:
        argv = sys.argv[1:]

    def start(reactor: Any) -> Deferred:
        return run(reactor, argv).addCallback(_exitWith)

    react(start)


def _exitWith(code: int) -> None:
    if code != EXIT_OK:
        raise SystemExit(code)
