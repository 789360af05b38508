"""
Tests for L{p2pfiles.cli}: argument handling, exit codes and one-line
errors, the readable and JSON output, against in-memory nodes on a
L{MemoryReactorClock}.
"""

import io
import json
import os
import signal
import sys
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles import __version__, cli
from p2pfiles.cli import (
    EXIT_ERROR,
    shownText,
    EXIT_AUTH,
    EXIT_CODES,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    formatListing,
    formatStatus,
    humanSize,
    run,
)
from p2pfiles.errors import CODES, P2PError
from p2pfiles.identity import stateIdentity
from p2pfiles.protocol import LocalIdentity, P2PFactory
from p2pfiles.tls import TLS
from tests.channels import certificate
from p2pfiles.wire import Message

from tests.test_node import HEARTBEAT, Harness, RecordingHandler, heartbeat

NODE = "127.0.0.1:9001"

# A HostnameEndpoint reports that its connection attempt failed when its
# next attempt would be due: this many seconds after the first.
ATTEMPT_DELAY = 0.3

def tlsListener(handler: Any, reactor: Any, secret: bytes = b"") -> Any:
    """
    A node 1 listening with TLS whose connections all go to C{handler}.
    """
    security = TLS(certificate(("node", 1)))
    identity = LocalIdentity("node", 1, NODE, secret, "request", security)
    return security.serverFactory(P2PFactory(identity, handler, reactor, listening=True), reactor)

# What `p2pfiles status --json` promises.
STATUS_KEYS = {"id", "role", "leader", "epoch", "members", "version"}
MEMBER_KEYS = {"id", "address", "alive"}


class CommandTestCase(SynchronousTestCase):
    """
    Runs commands with their output captured, in an environment without
    C{P2PFILES_*} variables.
    """

    def setUp(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("P2PFILES_")})
        self.out = io.StringIO()
        self.err = io.StringIO()
        # argparse writes --version, --help and usage errors to the real
        # streams: keep them too.
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def reset(self) -> None:
        """
        Forget what earlier commands of this test wrote.
        """
        for stream in (self.out, self.err, self.stdout, self.stderr):
            stream.seek(0)
            stream.truncate()

    def run_(self, reactor: Any, *argv: str) -> Deferred:
        return run(reactor, list(argv), self.out, self.err)

    def exitCode(self, reactor: Any, *argv: str) -> int:
        """
        Run a command that finishes without any I/O; return its exit code.
        """
        return self.successResultOf(self.run_(reactor, *argv))

    def failConnection(self, reactor: MemoryReactorClock, reason: Any = None) -> None:
        """
        Fail the command's pending connection attempt (with C{reason}, or
        "connection refused"), and let its endpoint give up.
        """
        ConnectionCompleter(reactor).failOnce(Failure(ConnectionRefusedError()) if reason is None else reason)
        reactor.advance(ATTEMPT_DELAY)

    def allOutput(self) -> str:
        return self.out.getvalue() + self.stdout.getvalue()

    def allErrors(self) -> str:
        return self.err.getvalue() + self.stderr.getvalue()

    def assertOneErrorLine(self, command: str) -> str:
        """
        The command wrote exactly one line to its error stream, starting
        C{p2pfiles COMMAND: error:}, and no traceback anywhere; return it.
        """
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, self.err.getvalue())
        self.assertTrue(lines[0].startswith(f"p2pfiles {command}: error: "), lines[0])
        self.assertNotIn("Traceback", self.allErrors() + self.allOutput())
        return lines[0]


class ExitCodeTests(SynchronousTestCase):
    """
    The CLI alone turns the system's refusal codes into the exit codes the
    README documents.
    """

    def test_everyCodeHasAnExitCode(self) -> None:
        """
        Every refusal code in L{p2pfiles.errors.CODES} has an exit code, and
        nothing else does.
        """
        self.assertEqual(sorted(EXIT_CODES), sorted(CODES))

    def test_documentedNumbers(self) -> None:
        """
        The exit codes keep the numbers the README documents, and every
        code maps to one of them.
        """
        documented = {
            "EXIT_OK": 0,
            "EXIT_ERROR": 1,
            "EXIT_USAGE": 2,
            "EXIT_UNREACHABLE": 3,
            "EXIT_AUTH": 4,
            "EXIT_TIMEOUT": 5,
            "EXIT_NOT_FOUND": 6,
            "EXIT_NO_LEADER": 7,
            "EXIT_VERIFY": 8,
            "EXIT_REFUSED": 9,
            "EXIT_LOCAL": 10,
        }
        self.assertEqual({name: getattr(cli, name) for name in documented}, documented)
        self.assertLessEqual(set(EXIT_CODES.values()), set(documented.values()) - {0})

    def test_exitCodeOfAnError(self) -> None:
        """
        L{p2pfiles.cli.exitCode} looks the error's code up; an error whose code is
        unknown (the wire's "refused" catches any code a peer invents) is
        refused, exit 9.
        """
        self.assertEqual(cli.exitCode(P2PError("not found: x", "not-found")), 6)
        self.assertEqual(cli.exitCode(P2PError("bad", "verify")), 8)
        self.assertEqual(cli.exitCode(P2PError("disk full", "io")), 10)
        invented = P2PError("who knows", "made-up")
        self.assertEqual(invented.code, "refused")
        self.assertEqual(cli.exitCode(invented), EXIT_REFUSED)


class ArgumentTests(CommandTestCase):
    """
    Bad arguments are usage errors (exit 2), never tracebacks.
    """

    def test_badArguments(self) -> None:
        """
        No command, an unknown command or option, a missing file name, or a
        non-numeric timeout: exit code 2 with a usage message, no traceback,
        and no connection attempted.
        """
        reactor = MemoryReactorClock()
        for argv in (
            [],
            ["bogus"],
            ["status", "--nope"],
            ["get"],
            ["fetch"],
            ["status", "--timeout", "soon"],
            ["ls", "extra"],
        ):
            self.reset()
            self.assertEqual(self.exitCode(reactor, *argv), EXIT_USAGE, argv)
            self.assertIn("usage:", self.allErrors())
            self.assertNotIn("Traceback", self.allErrors())
        self.assertEqual(reactor.tcpClients, [])

    def test_version(self) -> None:
        """
        C{--version} prints the version and exits 0.
        """
        self.assertEqual(self.exitCode(MemoryReactorClock(), "--version"), EXIT_OK)
        self.assertEqual(self.allOutput().strip(), f"p2pfiles {__version__}")

    def test_help(self) -> None:
        """
        C{--help} lists every command and exits 0.
        """
        self.assertEqual(self.exitCode(MemoryReactorClock(), "--help"), EXIT_OK)
        for command in ("status", "ls", "get", "fetch"):
            self.assertIn(command, self.allOutput())

    def test_badNodeAddress(self) -> None:
        """
        A C{--node} that is not HOST:PORT is a usage error in one line,
        with no connection attempted.
        """
        reactor = MemoryReactorClock()
        self.assertEqual(self.exitCode(reactor, "status", "--node", "localhost"), EXIT_USAGE)
        self.assertIn("localhost", self.assertOneErrorLine("status"))
        self.assertEqual(reactor.tcpClients, [])

    def test_missingSecretFile(self) -> None:
        """
        A secret file that cannot be read is a usage error in one line,
        before any connection.
        """
        reactor = MemoryReactorClock()
        missing = FilePath(self.mktemp()).path
        self.assertEqual(self.exitCode(reactor, "status", "--node", NODE, "--secret-file", missing), EXIT_USAGE)
        self.assertIn(missing, self.assertOneErrorLine("status"))
        self.assertEqual(reactor.tcpClients, [])

    def test_secretFileFromEnvironment(self) -> None:
        """
        C{$P2PFILES_SECRET_FILE} is the default secret file.
        """
        reactor = MemoryReactorClock()
        missing = FilePath(self.mktemp()).path
        os.environ["P2PFILES_SECRET_FILE"] = missing
        self.assertEqual(self.exitCode(reactor, "status", "--node", NODE), EXIT_USAGE)
        self.assertIn(missing, self.assertOneErrorLine("status"))

    def test_nodeFromEnvironment(self) -> None:
        """
        C{$P2PFILES_NODE} is the default node.
        """
        reactor = MemoryReactorClock()
        os.environ["P2PFILES_NODE"] = "127.0.0.1:9555"
        d = self.run_(reactor, "status")
        [(host, port, *_)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 9555))
        self.failConnection(reactor)
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn("127.0.0.1:9555", self.assertOneErrorLine("status"))


class BadNameTests(CommandTestCase):
    """
    C{get} and C{fetch} check the name before connecting anywhere.
    """

    def test_getTraversal(self) -> None:
        """
        C{get ../secret} exits 9 with one error line and no connection.
        """
        reactor = MemoryReactorClock()
        self.assertEqual(self.exitCode(reactor, "get", "../secret", "--node", NODE), EXIT_REFUSED)
        line = self.assertOneErrorLine("get")
        self.assertIn("../secret", line)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(self.allOutput(), "")

    def test_otherBadNames(self) -> None:
        """
        Hidden names, paths, empty and over-long names are refused the same
        way by C{get} and C{fetch}.
        """
        for command in ("get", "fetch"):
            for name in (".hidden", "a/b", "a\\b", "", "x" * 256, "/etc/passwd"):
                reactor = MemoryReactorClock()
                self.reset()
                self.assertEqual(self.exitCode(reactor, command, name, "--node", NODE), EXIT_REFUSED, (command, name))
                self.assertOneErrorLine(command)
                self.assertEqual(reactor.tcpClients, [])


class GetDestinationTests(CommandTestCase):
    """
    Where C{get} saves, checked before it connects anywhere: an existing
    file needs C{--overwrite} (as C{fetch} does), and a directory that does
    not exist is refused, not made and not taken for a file name.
    """

    def setUp(self) -> None:
        super().setUp()
        self.here = FilePath(self.mktemp())
        self.here.makedirs()
        cwd = os.getcwd()
        os.chdir(self.here.path)
        self.addCleanup(os.chdir, cwd)

    def test_refusesToOverwrite(self) -> None:
        """
        C{get NAME} when ./NAME exists exits 9 with one line naming it and
        the flag, connects nowhere and leaves the file alone.
        """
        self.here.child("a.txt").setContent(b"mine")
        reactor = MemoryReactorClock()
        self.assertEqual(self.exitCode(reactor, "get", "a.txt", "--node", NODE), EXIT_REFUSED)
        line = self.assertOneErrorLine("get")
        self.assertTrue(line.endswith("a.txt exists; give --overwrite to replace it"), line)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(self.here.child("a.txt").getContent(), b"mine")

    def test_refusesToOverwriteOutput(self) -> None:
        """
        The same for C{-o PATH} and for C{-o DIR} holding NAME, each named
        as the user wrote it.
        """
        self.here.child("out").makedirs()
        self.here.child("out").child("a.txt").setContent(b"mine")
        self.here.child("other.txt").setContent(b"mine")
        for output, shown in (("other.txt", "other.txt"), ("out", "out/a.txt"), ("out/", "out/a.txt")):
            self.reset()
            reactor = MemoryReactorClock()
            self.assertEqual(self.exitCode(reactor, "get", "a.txt", "--node", NODE, "-o", output), EXIT_REFUSED)
            self.assertIn(f" {shown} exists", self.assertOneErrorLine("get"))

    def test_overwriteConnects(self) -> None:
        """
        With C{--overwrite}, or with only a part of NAME present (a resume),
        C{get} goes ahead and asks the node.
        """
        self.here.child("a.txt").setContent(b"mine")
        self.here.child(".b.txt.part").setContent(b"half")
        for argv in (["a.txt", "--overwrite"], ["b.txt"]):
            reactor = MemoryReactorClock()
            d = self.run_(reactor, "get", *argv, "--node", NODE)
            self.assertEqual(len(reactor.tcpClients), 1, argv)
            self.failConnection(reactor)
            self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)

    def test_missingDirectoryWithSlash(self) -> None:
        """
        C{-o nodir/} for a directory that does not exist exits 10 with one
        line naming it, and saves nothing (not a file called nodir).
        """
        reactor = MemoryReactorClock()
        self.assertEqual(self.exitCode(reactor, "get", "a.txt", "--node", NODE, "-o", "nodir/"), EXIT_LOCAL)
        self.assertTrue(self.assertOneErrorLine("get").endswith("-o nodir/: no such directory"))
        self.assertEqual(self.here.listdir(), [])
        self.assertEqual(reactor.tcpClients, [])

    def test_missingParent(self) -> None:
        """
        C{-o nodir/x.txt} names the missing directory, and does not make it.
        """
        reactor = MemoryReactorClock()
        self.assertEqual(self.exitCode(reactor, "get", "a.txt", "--node", NODE, "-o", "nodir/x.txt"), EXIT_LOCAL)
        self.assertTrue(self.assertOneErrorLine("get").endswith("cannot save nodir/x.txt: no such directory nodir"))
        self.assertEqual(self.here.listdir(), [])


class SecretMessageTests(CommandTestCase):
    """
    What a client is told about the cluster secret.
    """

    def test_noSecret(self) -> None:
        """
        A client without a secret, against a node that has one, is told the
        secret is missing and how to give it: exit 4, one line.
        """
        reactor = MemoryReactorClock()
        reactor.listenTCP(9001, tlsListener(RecordingHandler(), reactor, secret=b"cluster"))
        d = self.run_(reactor, "status", "--node", NODE)
        ConnectionCompleter(reactor).succeedOnce().flush()
        self.assertEqual(self.successResultOf(d), EXIT_AUTH)
        line = self.assertOneErrorLine("status")
        self.assertEqual(line, "p2pfiles status: error: " + cli.NO_SECRET)
        self.assertIn("--secret-file F", line)
        self.assertIn("$P2PFILES_SECRET_FILE", line)
        self.assertNotIn("wrong", line)

    def test_emptyVariableMeansNoSecret(self) -> None:
        """
        C{P2PFILES_SECRET_FILE=} (empty) means no secret, as in the tac
        file: no "cannot read ''" usage error; the node is asked.
        """
        os.environ["P2PFILES_SECRET_FILE"] = ""
        reactor = MemoryReactorClock()
        reactor.listenTCP(9001, tlsListener(RecordingHandler(), reactor, secret=b"cluster"))
        d = self.run_(reactor, "status", "--node", NODE)
        ConnectionCompleter(reactor).succeedOnce().flush()
        self.assertEqual(self.successResultOf(d), EXIT_AUTH)
        self.assertIn("none was given", self.assertOneErrorLine("status"))


class InterruptTests(CommandTestCase):
    """
    SIGINT and SIGTERM: the command stops, says so in one line and exits
    128 + the signal's number.
    """

    def test_interruptWatch(self) -> None:
        """
        An interrupted C{status --watch} exits 130 (SIGINT) with one line,
        and closes its connection.
        """
        reactor = MemoryReactorClock()
        handler = RecordingHandler()
        reactor.listenTCP(9001, tlsListener(handler, reactor))
        invocation = cli.Invocation(reactor, ["status", "--node", NODE, "--watch"], self.out, self.err)
        pump = ConnectionCompleter(reactor).succeedOnce()
        pump.flush()
        self.assertNoResult(invocation.done)
        invocation.interrupt(signal.SIGINT)
        pump.flush()
        self.assertEqual(self.successResultOf(invocation.done), 130)
        self.assertEqual(self.err.getvalue(), "p2pfiles status: interrupted\n")
        self.assertEqual(handler.closed, 1)

    def test_terminateWhileConnecting(self) -> None:
        """
        SIGTERM while connecting exits 143 with one line.
        """
        reactor = MemoryReactorClock()
        invocation = cli.Invocation(reactor, ["ls", "--node", NODE], self.out, self.err)
        invocation.interrupt(signal.SIGTERM)
        self.assertEqual(self.successResultOf(invocation.done), 143)
        self.assertEqual(self.err.getvalue(), "p2pfiles ls: interrupted\n")

    def test_catchSignals(self) -> None:
        """
        L{cli.catchSignals} replaces the handlers of SIGINT and SIGTERM (the
        reactor's, which would stop it under the command and exit 0); the
        first signal interrupts the command from the reactor's thread and
        puts the default handlers back, so that a second one ends the
        process at once.
        """
        installed: dict = {}
        interrupted: List[int] = []

        class Signals:
            SIGINT, SIGTERM, SIG_DFL = signal.SIGINT, signal.SIGTERM, signal.SIG_DFL

            @staticmethod
            def signal(number: int, handler: Any) -> None:
                installed[number] = handler

        class Reactor:
            def callFromThread(self, f: Any, *args: Any) -> None:
                f(*args)

        class Command:
            def interrupt(self, number: int) -> None:
                interrupted.append(number)

        cli.catchSignals(Reactor(), Command(), Signals)
        self.assertEqual(set(installed), {signal.SIGINT, signal.SIGTERM})
        installed[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual(interrupted, [signal.SIGINT])
        self.assertEqual(installed, {signal.SIGINT: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL})


class TerminalStream(io.StringIO):
    """
    A stream that says it is a terminal.
    """

    def isatty(self) -> bool:
        return True


class ProgressTests(SynchronousTestCase):
    """
    The progress display of C{get}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stream = TerminalStream()
        self.progress = cli.Progress(
            self.clock, self.stream, "big.bin", {"127.0.0.1:9001": 1, "127.0.0.1:9002": 2}
        )
        self.addCleanup(self.progress.end)

    def shown(self) -> str:
        """
        What the terminal shows now: the last redraw of the line.
        """
        return self.stream.getvalue().split("\r")[-1]

    def header(self, offset: int, holder: int = 3) -> Message:
        return Message("file", name="big.bin", size=4096, sha256="0" * 64, offset=offset, holder=holder, leader=1)

    def test_bar(self) -> None:
        """
        The line names the file and shows the percentage, bytes, rate, ETA
        and the part resumed.
        """
        self.progress.stage("receiving", self.header(1024))
        self.clock.advance(1)
        self.progress(2048, 4096)
        self.progress.bar.refresh()
        line = self.shown()
        self.assertTrue(line.startswith("big.bin:  50%|"), line)
        self.assertIn("2.00kB/4.00kB", line)
        self.assertIn("ETA", line)
        self.assertIn("resumed 1.0 KiB", line)

    def test_stalled(self) -> None:
        """
        No byte for two seconds shows "stalled", naming the node waited
        for; the next byte takes it away.
        """
        self.progress.stage("receiving", self.header(0))
        self.progress(1024, 4096)
        self.clock.advance(1.5)
        self.assertNotIn("stalled", self.shown())
        self.clock.advance(1)
        self.assertIn("stalled \u2014 waiting for node 3 via 1", self.shown())
        self.progress(2048, 4096)
        self.progress.bar.refresh()
        self.assertNotIn("stalled", self.shown())

    def test_resuming(self) -> None:
        """
        A lost connection shows "stalled" at once, then the node the
        download resumes through; its first bytes end the stall.
        """
        self.progress.stage("receiving", self.header(0))
        self.progress(1024, 4096)
        self.progress.stage("lost", "connection to 127.0.0.1:9001 lost")
        self.assertIn("stalled \u2014 connection lost", self.shown())
        self.progress.stage("asking", "127.0.0.1:9002")
        self.assertIn("stalled \u2014 resuming through node 2", self.shown())
        self.progress.stage("receiving", self.header(1024, holder=2))
        self.assertNotIn("stalled", self.shown())
        self.assertEqual(self.progress.bar.n, 1024)

    def test_end(self) -> None:
        """
        At the end the bar is wiped, the cursor left at the start of a clean
        line, and no timer is left.
        """
        self.progress.stage("receiving", self.header(0))
        self.progress(4096, 4096)
        self.progress.end()
        self.assertTrue(self.stream.getvalue().endswith("\r\x1b[K"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdTests(CommandTestCase):
    """
    C{p2pfiles id}: a node's fingerprint, read from its files alone.
    """

    def test_state(self) -> None:
        """
        C{id --state DIR} prints the fingerprint of the identity in DIR.
        """
        state = FilePath(self.mktemp())
        identity = stateIdentity(state)
        self.assertEqual(self.exitCode(MemoryReactorClock(), "id", "--state", state.path), EXIT_OK)
        self.assertEqual(self.out.getvalue(), identity.fingerprint + "\n")

    def test_certificateFile(self) -> None:
        """
        C{id --tls-cert FILE} prints the fingerprint of that certificate.
        """
        cert = FilePath(self.mktemp())
        cert.setContent(certificate("id").certificatePEM())
        self.assertEqual(self.exitCode(MemoryReactorClock(), "id", "--tls-cert", cert.path), EXIT_OK)
        self.assertEqual(self.out.getvalue(), certificate("id").fingerprint + "\n")

    def test_absent(self) -> None:
        """
        A state directory without an identity is one line and exit 2, and
        nothing is created.
        """
        state = FilePath(self.mktemp())
        self.assertEqual(self.exitCode(MemoryReactorClock(), "id", "--state", state.path), EXIT_USAGE)
        self.assertIn("no TLS identity", self.assertOneErrorLine("id"))
        self.assertFalse(state.exists())

    def test_corrupt(self) -> None:
        """
        A corrupt certificate is one line, not a traceback.
        """
        cert = FilePath(self.mktemp())
        cert.setContent(b"not a certificate")
        self.assertEqual(self.exitCode(MemoryReactorClock(), "id", "--tls-cert", cert.path), EXIT_USAGE)
        self.assertOneErrorLine("id")


class FormatTests(SynchronousTestCase):
    """
    The readable forms of a status and a listing.
    """

    STATUS = {
        "id": 2,
        "address": "127.0.0.1:9002",
        "role": "follower",
        "leader": 1,
        "epoch": 3,
        "members": [
            {"id": 1, "address": "127.0.0.1:9001", "alive": True},
            {"id": 2, "address": "127.0.0.1:9002", "alive": True},
            {"id": 3, "address": "127.0.0.1:9003", "alive": False},
        ],
        "version": __version__,
    }

    def rows(self, text: str) -> List[List[str]]:
        return [line.split() for line in text.splitlines()[2:]]

    def test_status(self) -> None:
        """
        The first line says who the node is, its role, leader and epoch; a
        header follows, then one row per member with the leader marked and
        dead members shown as not alive.
        """
        text = formatStatus(self.STATUS)
        lines = text.splitlines()
        self.assertEqual(lines[0], "node 2 at 127.0.0.1:9002: follower, leader 1, epoch 3")
        self.assertEqual(lines[1].split(), ["ID", "ADDRESS", "ALIVE", "ROLE"])
        self.assertEqual(
            self.rows(text),
            [
                ["1", "127.0.0.1:9001", "yes", "leader"],
                ["2", "127.0.0.1:9002", "yes", "member"],
                ["3", "127.0.0.1:9003", "no", "-"],
            ],
        )

    def test_statusColumnsAligned(self) -> None:
        """
        Rows line up under the header.
        """
        lines = formatStatus(self.STATUS).splitlines()[1:]
        column = lines[0].index("ALIVE")
        for line in lines[1:]:
            self.assertIn(line[column : column + 3], ("yes", "no "))

    def test_statusNoLeader(self) -> None:
        """
        With no leader the first line says C{leader none} and nobody is
        marked leader.
        """
        status = dict(self.STATUS, role="candidate", leader=None)
        text = formatStatus(status)
        self.assertIn("candidate, leader none, epoch 3", text.splitlines()[0])
        self.assertNotIn("leader", [row[-1] for row in self.rows(text)])

    def test_statusLeaderZero(self) -> None:
        """
        Node 0 as leader is shown as leader 0, not as none.
        """
        status = dict(
            self.STATUS,
            leader=0,
            members=[{"id": 0, "address": "127.0.0.1:9000", "alive": True}] + self.STATUS["members"],
        )
        text = formatStatus(status)
        self.assertIn("leader 0,", text.splitlines()[0])
        self.assertEqual(self.rows(text)[0], ["0", "127.0.0.1:9000", "yes", "leader"])

    def test_statusConflicts(self) -> None:
        """
        Each node refused for claiming a held id is one line under the
        table: its id, address, certificate and how often it tried, with
        control characters escaped.
        """
        conflict = {
            "id": 1,
            "address": "127.0.0.1:9101",
            "fingerprint": "sha256:" + "ab" * 32,
            "reason": "node id 1 is configured at 127.0.0.1:9001",
            "since": 1.0,
            "seen": 2.0,
            "count": 3,
        }
        text = formatStatus(dict(self.STATUS, conflicts=[conflict, dict(conflict, address="\x1b[31mx", fingerprint=None)]))
        self.assertEqual(
            text.splitlines()[-2:],
            [
                f"  conflict: refused a second node 1 at 127.0.0.1:9101 (sha256:{'ab' * 32}), 3 times",
                "  conflict: refused a second node 1 at \\x1b[31mx (no certificate), 3 times",
            ],
        )

    def test_statusWithoutAddress(self) -> None:
        """
        A status without its own address (an older node) still renders.
        """
        status = {k: v for k, v in self.STATUS.items() if k != "address"}
        self.assertTrue(formatStatus(status).startswith("node 2 at ?: follower"))

    def test_listingEmpty(self) -> None:
        """
        An empty listing says so.
        """
        self.assertEqual(formatListing([]), "no files shared")

    def test_listing(self) -> None:
        """
        A listing shows a header, then each file's name, human size,
        holders joined by commas and the first 12 hex digits of its hash.
        """
        files = [
            {"name": "a.png", "size": 2048, "sha256": "ab" * 32, "holders": [2, 3]},
            {"name": "notes with spaces.txt", "size": 17, "sha256": "0123456789" * 6 + "abcd", "holders": [1]},
        ]
        lines = formatListing(files).splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "SIZE", "HOLDERS", "SHA256"])
        self.assertTrue(lines[1].startswith("a.png "))
        self.assertEqual(lines[1].split()[1:], ["2.0", "KiB", "2,3", "abababababab"])
        self.assertTrue(lines[2].startswith("notes with spaces.txt "))
        self.assertEqual(lines[2].split()[-4:], ["17", "B", "1", "012345678901"])
        self.assertEqual(len(lines), 3)

    def test_shownText(self) -> None:
        """
        Printable text is shown as it is; every non-printable character
        (control characters, line separators) as its Python escape.
        """
        self.assertEqual(shownText("notes with spaces é.txt"), "notes with spaces é.txt")
        self.assertEqual(shownText("a\x1b[31mb\nc\x00\u2028\t"), "a\\x1b[31mb\\nc\\x00\\u2028\\t")

    def test_humanSize(self) -> None:
        """
        Bytes below 1 KiB are whole; above, one decimal in the largest unit
        that keeps the number below 1024.
        """
        for size, text in [
            (0, "0 B"),
            (1, "1 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1024**2, "1.0 MiB"),
            (5 * 1024**2 + 1024**2 // 2, "5.5 MiB"),
            (1024**3, "1.0 GiB"),
            (1024**4, "1.0 TiB"),
            (1024**5, "1024.0 TiB"),
        ]:
            self.assertEqual(humanSize(size), text, size)

    def test_humanSizeJustBelowUnit(self) -> None:
        """
        A size just below the next unit never shows as C{1024.0} of the
        smaller unit (rounding must not outgrow the unit it picked).
        """
        for power in (2, 3, 4):
            for size in (1024**power - 1, 1024**power - 1024 ** (power - 2)):
                shown = humanSize(size)
                self.assertFalse(shown.startswith("1024"), f"humanSize({size}) == {shown!r}")


class UnreachableTests(CommandTestCase):
    """
    Failing to reach a node is exit 3 (or 5 on a timeout) with one line.
    """

    def test_refused(self) -> None:
        """
        A refused connection ends C{status} with exit 3 and one line naming
        the node.
        """
        reactor = MemoryReactorClock()
        d = self.run_(reactor, "status", "--node", NODE)
        self.assertNoResult(d)
        [(host, port, factory, timeout, bindAddress)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9001, 10.0))
        self.failConnection(reactor, Failure(ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn(f"cannot connect to {NODE}", self.assertOneErrorLine("status"))
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_connectTimeout(self) -> None:
        """
        A connection attempt that times out is exit 5, and C{--timeout} is
        the connection timeout.
        """
        reactor = MemoryReactorClock()
        d = self.run_(reactor, "status", "--node", NODE, "--timeout", "2.5")
        self.assertEqual(reactor.tcpClients[0][3], 2.5)
        self.failConnection(reactor, Failure(TimeoutError()))
        self.assertEqual(self.successResultOf(d), EXIT_TIMEOUT)
        self.assertIn("timed out", self.assertOneErrorLine("status"))


class LiveNodeTests(CommandTestCase):
    """
    Commands against a listening node in memory: the CLI's pending
    C{connectTCP} is completed with L{ConnectionCompleter}.
    """

    def startNode(self, **kwargs: Any) -> Harness:
        """
        A started node 1 listening on 127.0.0.1:9001 of its memory reactor.
        """
        harness = Harness(self, node=1, tls=True, **kwargs).start()
        harness.reactor.listenTCP(
            9001, harness.node.security.serverFactory(harness.factory, harness.reactor), interface="127.0.0.1"
        )
        return harness

    def connectCLI(self, harness: Harness) -> IOPump:
        """
        Join the CLI's pending connection to the node and run the exchange.
        """
        return harness.complete()

    def test_statusJSON(self) -> None:
        """
        C{status --json} prints one JSON object with the contract's keys:
        id, role, leader, epoch, members (each id, address, alive) and
        version, matching the node's status.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE, "--json")
        self.assertNoResult(d)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        status = json.loads(lines[0])
        self.assertTrue(STATUS_KEYS <= set(status), sorted(status))
        # The node adds its own address, which the table shows, its
        # certificate's fingerprint, the links refused to it, the
        # coordinator it runs and how late its timers ran.
        self.assertEqual(
            set(status) - STATUS_KEYS,
            {"address", "fingerprint", "refused", "conflicts", "coordinator", "max_timer_delay"},
        )
        self.assertEqual(status["conflicts"], [])
        self.assertEqual(status["coordinator"], "builtin")
        self.assertEqual(status["refused"], [])
        self.assertEqual(status["fingerprint"], harness.node.security.fingerprint)
        self.assertEqual(status["coordinator"], "builtin")
        self.assertEqual(status["max_timer_delay"], harness.node.status()["max_timer_delay"])
        for member in status["members"]:
            self.assertEqual(set(member), MEMBER_KEYS)
        self.assertEqual(
            (status["id"], status["role"], status["leader"], status["epoch"], status["version"]),
            (1, "leader", 1, 1, __version__),
        )
        self.assertEqual(status["members"], [{"id": 1, "address": NODE, "alive": True}])
        self.assertEqual(status, harness.node.status())
        self.assertEqual(self.err.getvalue(), "")

    def test_statusTable(self) -> None:
        """
        C{status} without C{--json} prints the table of L{formatStatus}.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.out.getvalue(), formatStatus(harness.node.status()) + "\n")
        self.assertTrue(self.out.getvalue().startswith("node 1 at 127.0.0.1:9001: leader, leader 1, epoch 1"))

    def test_statusWatch(self) -> None:
        """
        C{status --watch --json --no-follow} prints the status, one more
        line at each change, and ends with exit 3 and one line when the node
        goes away.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE, "--json", "--watch", "--no-follow")
        self.connectCLI(harness)
        self.assertNoResult(d)
        self.assertEqual(len(self.out.getvalue().splitlines()), 1)
        peer = harness.peer(2)
        harness.flush()
        peer.send(heartbeat(2, 1, 1))
        harness.flush()
        shown = [json.loads(line) for line in self.out.getvalue().splitlines()]
        self.assertEqual([[m["alive"] for m in s["members"]] for s in shown], [[True], [True, False], [True, True]])
        harness.advance(HEARTBEAT)
        self.assertEqual(len(self.out.getvalue().splitlines()), 3)
        stopped = harness.node.stopService()
        harness.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn("went away", self.assertOneErrorLine("status"))

    def test_statusWatchTable(self) -> None:
        """
        Without C{--json}, C{status --watch} prints the table once, then one
        line per change: time, role, leader, epoch and who is alive.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE, "--watch")
        self.connectCLI(harness)
        self.assertNoResult(d)
        table = self.out.getvalue().splitlines()
        self.assertIn("leader 1", table[0])
        peer = harness.peer(2)
        harness.flush()
        peer.send(heartbeat(2, 1, 1))
        harness.flush()
        changes = self.out.getvalue().splitlines()[len(table):]
        self.assertEqual(len(changes), 2)
        self.assertRegex(changes[-1], r"^\d\d:\d\d:\d\d leader, leader 1, epoch 1, alive 1,2$")
        stopped = self.stopNode(harness)
        self.successResultOf(stopped)
        # It tries the member it learned, which does not answer either.
        self.assertNoResult(d)
        self.assertEqual([(host, port) for host, port, *_ in harness.reactor.tcpClients[-1:]], [("127.0.0.1", 9002)])
        self.failConnection(harness.reactor)
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn("no other member it knew answered", self.assertOneErrorLine("status"))

    def test_statusWatchFollows(self) -> None:
        """
        When the watched node goes away, C{status --watch} says so in one
        line and carries on watching through a live member it learned:
        it asks that member to watch, and prints its changes.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE, "--json", "--watch")
        self.connectCLI(harness)
        peer = harness.peer(2)
        harness.flush()
        peer.send(heartbeat(2, 1, 1))
        harness.flush()
        shown = len(self.out.getvalue().splitlines())
        other = RecordingHandler()
        harness.reactor.listenTCP(9002, tlsListener(other, harness.reactor), interface="127.0.0.1")
        stopped = self.stopNode(harness)
        self.successResultOf(stopped)
        pump = ConnectionCompleter(harness.reactor).succeedOnce()
        pump.flush()
        self.assertNoResult(d)
        self.assertEqual(
            self.err.getvalue(), "p2pfiles status: node 127.0.0.1:9001 went away; watching node 2 at 127.0.0.1:9002\n"
        )
        self.assertEqual(other.messages, [Message("status", watch=True)])
        status = {"id": 2, "role": "leader", "leader": 2, "epoch": 2, "version": __version__,
                  "members": [{"id": 1, "address": NODE, "alive": False}, {"id": 2, "address": "127.0.0.1:9002", "alive": True}]}
        self.sendState(pump, status)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), shown + 1)
        self.assertEqual(json.loads(lines[-1])["leader"], 2)
        # That one goes away too, and the only other member, node 1, is gone.
        self.closeFollowed(pump)
        self.failConnection(harness.reactor)
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn("no other member it knew answered", self.err.getvalue().splitlines()[-1])

    def stopNode(self, harness: Harness) -> Deferred:
        """
        Stop the node, and forget the connection attempts it left pending
        in the memory reactor (cancelled: it has stopped), so that the
        CLI's next attempt is the first.
        """
        before = len(harness.reactor.tcpClients)
        stopped = harness.node.stopService()
        harness.flush()
        del harness.reactor.tcpClients[:before]
        return stopped

    def sendState(self, pump: IOPump, status: Any) -> None:
        """
        Answer the CLI from the listening end joined by C{pump} with a
        C{state} message.
        """
        self.serverProtocol(pump).sendMessage(Message("state", status=status))
        pump.flush()

    def serverProtocol(self, pump: IOPump) -> Any:
        """
        The P2P protocol of the listening end of C{pump}, under its TLS layer.
        """
        return pump.server.wrappedProtocol

    def closeFollowed(self, pump: IOPump) -> None:
        self.serverProtocol(pump).transport.loseConnection()
        pump.flush()

    def test_statusRefused(self) -> None:
        """
        Members that refuse the node's link are listed in C{status --json}
        under C{refused} (id and reason), and the table warns of each in
        one line.
        """
        harness = self.startNode()
        harness.node.membership.refused[3] = "authentication failed: wrong cluster secret, or a relayed connection"
        d = self.run_(harness.reactor, "status", "--node", NODE, "--json")
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        status = json.loads(self.out.getvalue())
        self.assertEqual(
            status["refused"],
            [{"id": 3, "reason": "authentication failed: wrong cluster secret, or a relayed connection"}],
        )
        self.assertEqual(
            formatStatus(status).splitlines()[-1],
            "  warning: node 3 refuses this node's link: "
            "authentication failed: wrong cluster secret, or a relayed connection",
        )

    def test_ls(self) -> None:
        """
        C{ls} against the leader prints its listing; C{ls --json} the list
        itself.
        """
        harness = self.startNode(files={"a.txt": b"hello", "big.bin": b"\0" * 3000})
        d = self.run_(harness.reactor, "ls", "--node", NODE)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        lines = self.out.getvalue().splitlines()
        self.assertEqual([line.split()[0] for line in lines], ["NAME", "a.txt", "big.bin"])
        self.assertEqual(lines[2].split()[1:4], ["2.9", "KiB", "1"])
        self.reset()
        d = self.run_(harness.reactor, "ls", "--node", NODE, "--json")
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        files = json.loads(self.out.getvalue())
        self.assertEqual([(f["name"], f["size"], f["holders"]) for f in files], [("a.txt", 5, [1]), ("big.bin", 3000, [1])])

    def test_lsHostileRows(self) -> None:
        """
        Whatever listing rows a leader sends (a size of 10**400 or of the
        wrong type, a missing field, holders that are not ids, a row that
        is not an object), C{ls} and C{ls --json} exit 1 with one line
        and no traceback.
        """
        good = {"name": "a", "size": 1, "sha256": "ab" * 32, "holders": [1]}
        bad = [
            {**good, "size": 10**400},
            {**good, "size": 2**63},
            {**good, "size": "1"},
            {**good, "size": True},
            {**good, "size": 1.5},
            {k: v for k, v in good.items() if k != "sha256"},
            {k: v for k, v in good.items() if k != "name"},
            {**good, "holders": ["x"]},
            {**good, "holders": None},
            "a row",
        ]
        harness = self.startNode(files={"a.txt": b"hello"})
        for row in bad:
            for extra in ([], ["--json"]):

                async def listing(*args: Any) -> list:
                    return [good, row]

                self.patch(cli, "receiveListing", listing)
                self.reset()
                d = self.run_(harness.reactor, "ls", "--node", NODE, *extra)
                self.connectCLI(harness)
                self.assertEqual(self.successResultOf(d), EXIT_ERROR, row)
                self.assertIn("bad listing", self.assertOneErrorLine("ls"))
                self.assertEqual(self.out.getvalue(), "")

    def test_lsEscapesNames(self) -> None:
        """
        A name holding ESC and a newline is printed escaped in the table
        (one row, no escape byte), and unchanged in C{ls --json}.
        """
        name = "x\x1b[31mred\nfake 1 B 9 " + "00" * 6
        row = {"name": name, "size": 1, "sha256": "ab" * 32, "holders": [1]}

        async def listing(*args: Any) -> list:
            return [row]

        self.patch(cli, "receiveListing", listing)
        harness = self.startNode(files={"a.txt": b"hello"})
        d = self.run_(harness.reactor, "ls", "--node", NODE)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertNotIn("\x1b", self.out.getvalue())
        self.assertTrue(lines[1].startswith("x\\x1b[31mred\\nfake 1 B 9 "), lines[1])
        self.reset()
        d = self.run_(harness.reactor, "ls", "--node", NODE, "--json")
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(json.loads(self.out.getvalue()), [row])

    def test_wrongSecret(self) -> None:
        """
        A client with a secret the node does not share fails
        authentication: exit 4, one line.
        """
        harness = self.startNode()
        secret = FilePath(self.mktemp())
        secret.setContent(b"not the cluster's\n")
        d = self.run_(harness.reactor, "status", "--node", NODE, "--secret-file", secret.path)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_AUTH)
        self.assertIn("authentication failed", self.assertOneErrorLine("status"))

    def test_pinned(self) -> None:
        """
        C{--pin} with the node's fingerprint talks to it; with another, the
        client refuses the node before proving anything: exit 4, one line
        naming both fingerprints.
        """
        harness = self.startNode()
        own = harness.node.security.fingerprint
        d = self.run_(harness.reactor, "status", "--node", NODE, "--json", "--pin", own)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.reset()
        other = "sha256:" + "ab" * 32
        d = self.run_(harness.reactor, "status", "--node", NODE, "--pin", other)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_AUTH)
        line = self.assertOneErrorLine("status")
        self.assertIn(own, line)
        self.assertIn(other, line)

    def test_statusTableCertificate(self) -> None:
        """
        The status table names the node's certificate on its second line.
        """
        harness = self.startNode()
        d = self.run_(harness.reactor, "status", "--node", NODE)
        self.connectCLI(harness)
        self.assertEqual(self.successResultOf(d), EXIT_OK)
        self.assertEqual(self.out.getvalue().splitlines()[1].split(), ["certificate", harness.node.security.fingerprint])

    def test_noAnswer(self) -> None:
        """
        A node that authenticates but never answers makes C{status} give up
        after C{--timeout} seconds with exit 5 and one line.
        """
        reactor = MemoryReactorClock()
        silent = RecordingHandler()
        reactor.listenTCP(9001, tlsListener(silent, reactor))
        d = self.run_(reactor, "status", "--node", NODE, "--timeout", "3")
        pump = ConnectionCompleter(reactor).succeedOnce()
        pump.flush()
        self.assertEqual(silent.messages, [Message("status", watch=False)])
        reactor.advance(2.9)
        self.assertNoResult(d)
        reactor.advance(0.1)
        pump.flush()
        self.assertEqual(self.successResultOf(d), EXIT_TIMEOUT)
        self.assertIn("no answer from 127.0.0.1:9001 within 3s", self.assertOneErrorLine("status"))
        self.assertEqual(silent.closed, 1)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_closedDuringHandshake(self) -> None:
        """
        A node that hangs up before the handshake ends is exit 3, one line.
        """
        reactor = MemoryReactorClock()
        listener = RecordingHandler()
        tls = tlsListener(listener, reactor)
        factory = tls.wrappedFactory
        reactor.listenTCP(9001, tls)
        d = self.run_(reactor, "status", "--node", NODE)
        pump = ConnectionCompleter(reactor).succeedOnce(greet=False)
        (server,) = factory.protocols
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.successResultOf(d), EXIT_UNREACHABLE)
        self.assertIn("before the connection was secured", self.assertOneErrorLine("status"))
        self.assertEqual(reactor.getDelayedCalls(), [])
