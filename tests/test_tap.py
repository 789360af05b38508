"""
Tests for L{p2pfiles.tap}: the twistd plugin's options, the service it
builds, the plugin itself and the example C{.tac} file.
"""

import os
import runpy
from typing import Any, Dict, List

from twisted.application.service import IService, IServiceCollection, IServiceMaker, MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from p2pfiles.address import parseAddress
from p2pfiles.node import Node
from p2pfiles.node import Incoming
from p2pfiles.protocol import P2PFactory
from p2pfiles.runtime import ProcessPolicy
from p2pfiles.scanworker import WORKER_NICE, ProcessObserver
from p2pfiles.coordinator import CoordinatorError
from p2pfiles.tap import CannotListen, Listener, NodeService, WebListener
from p2pfiles.tap import Options, isLoopback, makeService, parseCluster
from p2pfiles.identity import stateIdentity
from p2pfiles.tls import TLS, TLSServerEndpoint
from tests.channels import certificate
from p2pfiles.web import MIN_TOKEN, WebRoot

ROOT = FilePath(__file__).parent().parent()


def parse(*arguments: str) -> Options:
    """
    Parse C{arguments} as twistd would hand them to the plugin.
    """
    options = Options()
    options.parseOptions(list(arguments))
    return options


class OptionsTestCase(SynchronousTestCase):
    """
    Helpers shared by the option tests.
    """

    def assertUsageError(self, *arguments: str) -> str:
        """
        Parsing C{arguments} fails with a one-line L{usage.UsageError};
        return its message.
        """
        error = self.assertRaises(usage.UsageError, parse, *arguments)
        message = str(error)
        self.assertTrue(message, "a usage error must say what is wrong")
        self.assertNotIn("\n", message)
        return message

    def writeFile(self, content: bytes) -> str:
        """
        A fresh temporary file holding C{content}; return its path.
        """
        path = FilePath(self.mktemp())
        path.parent().makedirs(ignoreExistingDirectory=True)
        path.setContent(content)
        return path.path


class IdAndPortTests(OptionsTestCase):
    """
    C{--id} is required and a non-negative integer; C{--port} defaults to
    9000+id and must be a TCP port.
    """

    def test_idRequired(self) -> None:
        """
        Without C{--id} the options are refused, naming the option.
        """
        self.assertIn("--id", self.assertUsageError())
        self.assertIn("--id", self.assertUsageError("--port", "9001"))

    def test_idNegative(self) -> None:
        """
        A negative id is refused.
        """
        self.assertIn("non-negative", self.assertUsageError("--id", "-1"))

    def test_idNotAnInteger(self) -> None:
        """
        An id that is not an integer is refused as a usage error, not a
        traceback.
        """
        for bad in ("abc", "1.5", "", "0x10"):
            self.assertUsageError("--id", bad)

    def test_idNotAsciiDigits(self) -> None:
        """
        An id written with digits that C{int} does not read (a superscript
        two) is a usage error.
        """
        self.assertUsageError("--id", "\u00b2")

    def test_idZero(self) -> None:
        """
        Id 0 is a real id (the original treated it as "no leader"): it is
        accepted, with port 9000.
        """
        options = parse("--id", "0")
        self.assertEqual((options["id"], options["port"]), (0, 9000))

    def test_defaultPort(self) -> None:
        """
        Without C{--port} a node listens on 9000+id.
        """
        self.assertEqual(parse("--id", "7")["port"], 9007)

    def test_explicitPort(self) -> None:
        """
        C{--port} overrides the default.
        """
        self.assertEqual(parse("--id", "7", "--port", "12345")["port"], 12345)

    def test_portRange(self) -> None:
        """
        Ports outside 0..65535, given or implied by a large id, are refused;
        65535 is accepted.
        """
        self.assertEqual(parse("--id", "1", "--port", "65535")["port"], 65535)
        self.assertIn("65536", self.assertUsageError("--id", "1", "--port", "65536"))
        self.assertUsageError("--id", "1", "--port", "-1")
        self.assertUsageError("--id", "1", "--port", "http")
        self.assertIn("not a TCP port", self.assertUsageError("--id", "70000"))
        self.assertEqual(parse("--id", "70000", "--port", "9001")["port"], 9001)

    def test_peers(self) -> None:
        """
        Each C{--peer} adds one id and address; IPv6 addresses in brackets
        are accepted.
        """
        options = parse(
            "--id", "1", "--peer", "2@127.0.0.1:9002", "--peer", "3@[::1]:9003", "--peer", "0@localhost:9000"
        )
        self.assertEqual(options["peers"], {2: "127.0.0.1:9002", 3: "[::1]:9003", 0: "localhost:9000"})

    def test_noPeers(self) -> None:
        """
        A node may start knowing no peer.
        """
        self.assertEqual(parse("--id", "1")["peers"], {})

    def test_peersNotShared(self) -> None:
        """
        Two Options objects do not share one peers dict.
        """
        first = parse("--id", "1", "--peer", "2@127.0.0.1:9002")
        second = parse("--id", "1")
        self.assertEqual(second["peers"], {})
        self.assertEqual(first["peers"], {2: "127.0.0.1:9002"})

    def test_badForms(self) -> None:
        """
        A peer without C{@}, with a non-numeric id, without a host, or
        without a valid port is refused in one line naming what was given.
        """
        for bad in (
            "127.0.0.1:9002",
            "2-127.0.0.1:9002",
            "x@127.0.0.1:9002",
            "-2@127.0.0.1:9002",
            "@127.0.0.1:9002",
            "2@127.0.0.1",
            "2@127.0.0.1:",
            "2@127.0.0.1:port",
            "2@127.0.0.1:70000",
            "2@127.0.0.1:0",
            "2@:9002",
            "2@",
        ):
            message = self.assertUsageError("--id", "1", "--peer", bad)
            self.assertIn("--peer", message)
            self.assertIn(repr(bad), message)

    def test_peerIdNotAsciiDigits(self) -> None:
        """
        A peer id written with a digit C{str.isdigit} accepts but C{int}
        does not read (a superscript two) is a usage error, not a
        ValueError traceback out of twistd.
        """
        self.assertUsageError("--id", "1", "--peer", "\u00b2@127.0.0.1:9002")

    def test_ownId(self) -> None:
        """
        A peer with the node's own id is refused.
        """
        message = self.assertUsageError("--id", "1", "--peer", "1@127.0.0.1:9001")
        self.assertIn("own id 1", message)

    def test_sameTwice(self) -> None:
        """
        The same peer id given twice is refused, even with the same address.
        """
        for second in ("2@127.0.0.1:9002", "2@127.0.0.1:9012"):
            message = self.assertUsageError("--id", "1", "--peer", "2@127.0.0.1:9002", "--peer", second)
            self.assertIn("node 2 given twice", message)


class ClusterFileTests(OptionsTestCase):
    """
    C{--cluster FILE}: one C{ID HOST:PORT} a line, C{#} comments.
    """

    CLUSTER = (
        b"# the demo cluster\n"
        b"\n"
        b"1 127.0.0.1:9101   # the first\n"
        b"   2 127.0.0.1:9102\n"
        b"\t\n"
        b"3 [::1]:9103\n"
        b"# 4 127.0.0.1:9104\n"
    )

    def test_ownLineGivesListeningAddress(self) -> None:
        """
        The node's own line in the cluster file says where the others will
        look for it: it listens on that host and port and advertises that
        address, unless told otherwise.
        """
        cluster = FilePath(self.mktemp())
        cluster.setContent(b"1 127.0.0.5:7101\n2 127.0.0.6:7102\n")
        options = parse("--id", "1", "--cluster", cluster.path)
        self.assertEqual((options["interface"], options["port"]), ("127.0.0.5", 7101))
        self.assertEqual(options.nodeConfig().address, "127.0.0.5:7101")
        options = parse("--id", "1", "--cluster", cluster.path, "--interface", "127.0.0.1", "--port", "7200")
        self.assertEqual(options.nodeConfig().address, "127.0.0.1:7200")

    def test_ownLineSkippedAndGivesPort(self) -> None:
        """
        Comments and blank lines are ignored; the node's own line is not a
        peer and gives the port when C{--port} is absent.
        """
        path = self.writeFile(self.CLUSTER)
        options = parse("--id", "2", "--cluster", path)
        self.assertEqual(options["peers"], {1: "127.0.0.1:9101", 3: "[::1]:9103"})
        self.assertEqual(options["port"], 9102)

    def test_explicitPortWins(self) -> None:
        """
        C{--port} overrides the port of the node's own line.
        """
        path = self.writeFile(self.CLUSTER)
        self.assertEqual(parse("--id", "2", "--port", "9999", "--cluster", path)["port"], 9999)

    def test_notListed(self) -> None:
        """
        A node absent from the file gets every listed node as a peer and the
        default port.
        """
        path = self.writeFile(self.CLUSTER)
        options = parse("--id", "9", "--cluster", path)
        self.assertEqual(sorted(options["peers"]), [1, 2, 3])
        self.assertEqual(options["port"], 9009)

    def test_parseCluster(self) -> None:
        """
        L{parseCluster} returns every listed node, the node's own included.
        """
        path = self.writeFile(self.CLUSTER)
        self.assertEqual(parseCluster(path), {1: "127.0.0.1:9101", 2: "127.0.0.1:9102", 3: "[::1]:9103"})

    def test_duplicate(self) -> None:
        """
        An id listed twice is refused, naming the file and the second line.
        """
        path = self.writeFile(b"1 127.0.0.1:9001\n# x\n1 127.0.0.1:9011\n")
        message = self.assertUsageError("--id", "2", "--cluster", path)
        self.assertIn(f"{path}:3", message)
        self.assertIn("listed twice", message)

    def test_malformedLines(self) -> None:
        """
        A line that is not C{ID HOST:PORT} is refused naming file:line.
        """
        for bad in (
            b"1\n",
            b"1 127.0.0.1:9001 extra\n",
            b"x 127.0.0.1:9001\n",
            b"-1 127.0.0.1:9001\n",
            b"1 127.0.0.1\n",
            b"1 127.0.0.1:port\n",
            b"1@127.0.0.1:9001\n",
        ):
            path = self.writeFile(b"# header\n2 127.0.0.1:9002\n" + bad)
            message = self.assertUsageError("--id", "2", "--cluster", path)
            self.assertIn(f"{path}:3", message)

    def test_idNotAsciiDigits(self) -> None:
        """
        A line whose id is a digit C{str.isdigit} accepts but C{int} does
        not read (a superscript two) is a usage error naming file:line, not
        a ValueError traceback out of twistd.
        """
        path = self.writeFile("2 127.0.0.1:9002\n\u00b2 127.0.0.1:9001\n".encode("utf-8"))
        message = self.assertUsageError("--id", "2", "--cluster", path)
        self.assertIn(f"{path}:2", message)

    def test_unreadable(self) -> None:
        """
        A missing or non-UTF-8 cluster file is a usage error naming it.
        """
        missing = FilePath(self.mktemp()).path
        self.assertIn(missing, self.assertUsageError("--id", "1", "--cluster", missing))
        binary = self.writeFile(b"1 127.0.0.1:9001\n\xff\xfe\n")
        self.assertIn(binary, self.assertUsageError("--id", "1", "--cluster", binary))

    def test_withPeer(self) -> None:
        """
        C{--cluster} and C{--peer} together are refused.
        """
        path = self.writeFile(self.CLUSTER)
        message = self.assertUsageError("--id", "2", "--cluster", path, "--peer", "5@127.0.0.1:9005")
        self.assertIn("--cluster", message)
        self.assertIn("--peer", message)


class InterfaceAndSecretTests(OptionsTestCase):
    """
    A node never listens beyond loopback without a cluster secret.
    """

    def test_isLoopback(self) -> None:
        """
        Loopback means localhost, 127.0.0.0/8 or ::1; anything else
        (including names, which are not resolved) is not.
        """
        for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1"):
            self.assertTrue(isLoopback(host), host)
        for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "", "localhost.example.com"):
            self.assertFalse(isLoopback(host), host)

    def test_defaultInterface(self) -> None:
        """
        By default a node listens on 127.0.0.1, with no secret.
        """
        options = parse("--id", "1")
        self.assertEqual((options["interface"], options["secret"]), ("127.0.0.1", b""))

    def test_nonLoopbackNeedsSecret(self) -> None:
        """
        A non-loopback interface without C{--secret-file} is refused.
        """
        for interface in ("0.0.0.0", "::", "192.168.1.10"):
            message = self.assertUsageError("--id", "1", "--interface", interface)
            self.assertIn("--secret-file", message)

    def test_loopbackWithoutSecret(self) -> None:
        """
        Loopback interfaces need no secret.
        """
        for interface in ("127.0.0.1", "::1", "localhost"):
            self.assertEqual(parse("--id", "1", "--interface", interface)["interface"], interface)

    def test_nonLoopbackWithSecret(self) -> None:
        """
        With a secret file the node may listen anywhere; the secret is the
        file's content without surrounding whitespace.
        """
        path = self.writeFile(b"  s3cret \n")
        options = parse("--id", "1", "--interface", "0.0.0.0", "--secret-file", path)
        self.assertEqual(options["secret"], b"s3cret")

    def test_emptySecretFile(self) -> None:
        """
        An empty (or blank) secret file is refused, naming it.
        """
        for content in (b"", b" \n\t\n"):
            path = self.writeFile(content)
            message = self.assertUsageError("--id", "1", "--secret-file", path)
            self.assertIn(path, message)
            self.assertIn("empty", message)

    def test_unreadableSecretFile(self) -> None:
        """
        A missing secret file, or a directory, is refused naming it.
        """
        missing = FilePath(self.mktemp()).path
        self.assertIn(missing, self.assertUsageError("--id", "1", "--secret-file", missing))
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.assertIn(directory.path, self.assertUsageError("--id", "1", "--secret-file", directory.path))


class DirectoryAndTimingTests(OptionsTestCase):
    """
    C{--share}, C{--state}, C{--advertise}, C{--heartbeat} and
    C{--leader-timeout}.
    """

    def test_directoryDefaults(self) -> None:
        """
        Share and state default to C{node<ID>/files} and C{node<ID>/state}.
        """
        options = parse("--id", "4")
        self.assertEqual((options["share"], options["state"]), ("node4/files", "node4/state"))
        options = parse("--id", "0")
        self.assertEqual((options["share"], options["state"]), ("node0/files", "node0/state"))

    def test_connectionLimits(self) -> None:
        """
        C{--max-connections} (default 512) and
        C{--max-connections-per-address} (default 64) and C{--idle-timeout}
        (default 60 s) reach the node's config; zero or negative values are
        refused.
        """
        config = parse("--id", "4").nodeConfig()
        self.assertEqual((config.maxConnections, config.maxConnectionsPerAddress), (512, 64))
        config = parse("--id", "4", "--max-connections", "10", "--max-connections-per-address", "3").nodeConfig()
        self.assertEqual((config.maxConnections, config.maxConnectionsPerAddress), (10, 3))
        self.assertEqual(parse("--id", "4").nodeConfig().idleTimeout, 60.0)
        self.assertEqual(parse("--id", "4").nodeConfig().maxMembers, 64)
        self.assertEqual(parse("--id", "4", "--max-members", "5").nodeConfig().maxMembers, 5)
        self.assertEqual(parse("--id", "4", "--idle-timeout", "2.5").nodeConfig().idleTimeout, 2.5)
        for option in ("--max-connections", "--max-connections-per-address", "--idle-timeout"):
            for bad in ("0", "-1", "x"):
                self.assertUsageError("--id", "4", option, bad)

    def test_forgetAfter(self) -> None:
        """
        C{--forget-after} (default 600 s) reaches the node's config and its
        membership; zero, negative and non-numbers are refused, and
        C{--help} names it.
        """
        self.assertEqual(parse("--id", "4").nodeConfig().forgetAfter, 600.0)
        config = parse("--id", "4", "--forget-after", "30").nodeConfig()
        self.assertEqual(config.forgetAfter, 30.0)
        for bad in ("0", "-1", "x", "nan"):
            self.assertUsageError("--id", "4", "--forget-after", bad)
        self.assertIn("--forget-after", str(parse("--id", "4")))

    def test_directoriesGiven(self) -> None:
        """
        Given directories are kept as they are.
        """
        options = parse("--id", "4", "--share", "/srv/share", "--state", "/var/lib/p2p")
        self.assertEqual((options["share"], options["state"]), ("/srv/share", "/var/lib/p2p"))

    def test_advertise(self) -> None:
        """
        C{--advertise} must be HOST:PORT; it becomes the node's address.
        Without it the address is INTERFACE:PORT, bracketed for IPv6.
        """
        options = parse("--id", "1", "--advertise", "127.1.2.3:7001")
        self.assertEqual(options.nodeConfig().address, "127.1.2.3:7001")
        self.assertEqual(parse("--id", "1").nodeConfig().address, "127.0.0.1:9001")
        self.assertEqual(parse("--id", "1", "--interface", "::1").nodeConfig().address, "[::1]:9001")
        for bad in ("127.1.2.3", "127.1.2.3:", ":7001", "127.1.2.3:0", "127.1.2.3:99999", "host:port"):
            self.assertIn("--advertise", self.assertUsageError("--id", "1", "--advertise", bad))

    def test_corruptEpochFile(self) -> None:
        """
        A state directory whose C{epoch} file is not a number is refused at
        start with a one-line reason naming it, not a traceback.
        """
        state = FilePath(self.mktemp())
        state.makedirs()
        state.child("epoch").setContent(b"garbage\n")
        message = self.assertUsageError("--id", "1", "--state", state.path)
        self.assertIn("does not hold an epoch number", message)

    def test_leaderTimeoutCoversTwoHeartbeats(self) -> None:
        """
        A leader timeout shorter than two heartbeats would mark live members
        down between heartbeats: refused with the reason.
        """
        self.assertIn("twice --heartbeat", self.assertUsageError("--id", "1", "--heartbeat", "0.6"))
        options = parse("--id", "1", "--heartbeat", "0.5", "--leader-timeout", "1.0")
        self.assertEqual((options["heartbeat"], options["leader-timeout"]), (0.5, 1.0))

    def test_scanNice(self) -> None:
        """
        C{--scan-nice} is a niceness, 0 to 19, default L{WORKER_NICE}; other
        values are refused.
        """
        state = FilePath(self.mktemp()).path
        self.assertEqual(parse("--id", "1", "--state", state)["scan-nice"], WORKER_NICE)
        self.assertEqual(parse("--id", "1", "--state", state, "--scan-nice", "0")["scan-nice"], 0)
        self.assertEqual(parse("--id", "1", "--state", state, "--scan-nice", "19")["scan-nice"], 19)
        for bad in ("-1", "20"):
            self.assertIn("0 to 19", self.assertUsageError("--id", "1", "--state", state, "--scan-nice", bad))
        for bad in ("1.5", "x"):
            self.assertUsageError("--id", "1", "--state", state, "--scan-nice", bad)

    def test_portZeroNeedsAdvertise(self) -> None:
        """
        Port 0 picks a port at start, which no peer could be told in
        advance: it needs --advertise.
        """
        self.assertIn("--advertise", self.assertUsageError("--id", "1", "--port", "0"))

    def test_timingDefaults(self) -> None:
        """
        Heartbeats every 0.25s, members down after 1s of silence.
        """
        options = parse("--id", "1")
        self.assertEqual((options["heartbeat"], options["leader-timeout"]), (0.25, 1.0))

    def test_startGrace(self) -> None:
        """
        A starting node waits 5 s by default to hear from its peers before
        leading without them; C{--start-grace} sets it and reaches the
        node's config; it must be positive and finite like the others.
        """
        self.assertEqual(parse("--id", "1")["start-grace"], 5.0)
        options = parse("--id", "1", "--start-grace", "12.5")
        self.assertEqual(options.nodeConfig(port=9001).startGrace, 12.5)
        for bad in ("0", "-1", "nan", "inf", "soon"):
            self.assertUsageError("--id", "1", "--start-grace", bad)

    def test_timingGiven(self) -> None:
        """
        Fractional seconds are accepted for both.
        """
        options = parse("--id", "1", "--heartbeat", "0.1", "--leader-timeout", "2.5")
        self.assertEqual((options["heartbeat"], options["leader-timeout"]), (0.1, 2.5))

    def test_timingMustBePositive(self) -> None:
        """
        Zero, negative, NaN or non-numeric values are refused for both.
        """
        for option in ("--heartbeat", "--leader-timeout"):
            for bad in ("0", "-1", "-0.5", "nan", "soon"):
                self.assertUsageError("--id", "1", option, bad)

    def test_timingMustBeFinite(self) -> None:
        """
        Infinity is not a usable interval: with C{--heartbeat inf} the node
        would send one heartbeat and never tick again (and a reactor with
        only that timer asks epoll to wait beyond C{time_t}).
        """
        for option in ("--heartbeat", "--leader-timeout"):
            self.assertUsageError("--id", "1", option, "inf")


class CoordinatorOptionTests(OptionsTestCase):
    """
    C{--coordinator builtin} (the default) or C{etcd://HOST:PORT[,...]},
    with C{--coordinator-prefix} and C{--lease-ttl} for etcd.
    """

    def test_builtinByDefault(self) -> None:
        """
        Without C{--coordinator} the nodes elect among themselves: no etcd
        endpoint reaches the node's configuration.
        """
        for arguments in ((), ("--coordinator", "builtin")):
            options = parse("--id", "1", *arguments)
            self.assertEqual((options["coordinator"], options["etcd"]), ("builtin", []))
            self.assertEqual(options.nodeConfig().etcd, ())

    def test_etcd(self) -> None:
        """
        C{etcd://} with one or more endpoints; the prefix defaults to
        C{/p2pfiles/default} and the lease TTL to 2 seconds.  No C{--peer}
        or C{--cluster} is needed.
        """
        options = parse("--id", "1", "--coordinator", "etcd://127.0.0.1:2379,[::1]:2379,etcd.example:2379")
        self.assertEqual(options["etcd"], ["127.0.0.1:2379", "[::1]:2379", "etcd.example:2379"])
        config = options.nodeConfig()
        self.assertEqual(
            (config.etcd, config.coordinatorPrefix, config.leaseTTL, config.peers),
            (("127.0.0.1:2379", "[::1]:2379", "etcd.example:2379"), "/p2pfiles/default", 2.0, {}),
        )

    def test_etcdSettings(self) -> None:
        """
        The prefix and the lease TTL (fractional, at least one second) are
        carried to the node.
        """
        options = parse(
            "--id", "1", "--coordinator", "etcd://127.0.0.1:2379",
            "--coordinator-prefix", "/teams/blue", "--lease-ttl", "1.5",
        )
        config = options.nodeConfig()
        self.assertEqual((config.coordinatorPrefix, config.leaseTTL), ("/teams/blue", 1.5))
        self.assertEqual(parse("--id", "1", "--coordinator", "etcd://127.0.0.1:2379", "--lease-ttl", "1").nodeConfig().leaseTTL, 1.0)

    def test_badCoordinator(self) -> None:
        """
        Anything but C{builtin} or C{etcd://} with valid, distinct
        C{HOST:PORT} endpoints is refused in one line naming the option.
        """
        for bad in (
            "", "etcd", "Builtin", "zookeeper://127.0.0.1:2181", "http://127.0.0.1:2379", "etcd://",
            "etcd://127.0.0.1", "etcd://127.0.0.1:2379,", "etcd://127.0.0.1:0", "etcd://127.0.0.1:2379,127.0.0.1:2379",
        ):
            self.assertIn("--coordinator", self.assertUsageError("--id", "1", "--coordinator", bad))

    def test_badPrefix(self) -> None:
        """
        A prefix that is not an absolute key path of printable ASCII is
        refused with etcd's reason.
        """
        for bad in ("p2pfiles", "/", "/p2pfiles/", "/with space", "/" + "x" * 200):
            message = self.assertUsageError(
                "--id", "1", "--coordinator", "etcd://127.0.0.1:2379", "--coordinator-prefix", bad
            )
            self.assertIn("--coordinator-prefix", message)

    def test_badLeaseTTL(self) -> None:
        """
        A lease shorter than a second (etcd counts whole seconds), or not a
        finite number, is refused.
        """
        for bad in ("0.5", "0", "-2", "nan", "inf", "soon"):
            self.assertUsageError("--id", "1", "--coordinator", "etcd://127.0.0.1:2379", "--lease-ttl", bad)

    def test_etcdSettingsNeedEtcd(self) -> None:
        """
        A prefix or a lease TTL without etcd would be silently ignored: it
        is refused instead.
        """
        self.assertIn("--coordinator-prefix", self.assertUsageError("--id", "1", "--coordinator-prefix", "/x"))
        self.assertIn("--lease-ttl", self.assertUsageError("--id", "1", "--lease-ttl", "3"))


class JoinedNode:
    """
    What L{NodeService} asks of its node.
    """

    id = 4

    def __init__(self, joined: Deferred) -> None:
        self.joined = joined

    def whenJoined(self) -> Deferred:
        return self.joined


class NodeServiceTests(SynchronousTestCase):
    """
    L{NodeService}: a node that cannot join its cluster ends the process,
    with one line and exit status 1.
    """

    def service(self, joined: Deferred) -> "tuple[NodeService, MemoryReactorClock, List[int], List[dict]]":
        reactor = MemoryReactorClock()
        statuses: List[int] = []
        events: List[dict] = []
        self.patch(NodeService, "log", Logger(observer=events.append))
        service = NodeService(JoinedNode(joined), reactor, statuses.append)  # type: ignore[arg-type]
        return service, reactor, statuses, events

    def test_joined(self) -> None:
        """
        A node that joins runs on: nothing logged, no exit status, the
        reactor left alone.
        """
        joined: Deferred = Deferred()
        service, reactor, statuses, events = self.service(joined)
        service.startService()
        joined.callback(None)
        self.assertEqual((statuses, events, reactor.whenRunningHooks), ([], [], []))

    def test_refused(self) -> None:
        """
        A refusal by the coordinator (the id is taken; etcd does not answer)
        is one critical line with its reason, exit status 1, and the
        reactor stopped once it runs.
        """
        error = CoordinatorError("conflict", "node id 4 is already registered in etcd by 127.0.0.1:9999")
        service, reactor, statuses, events = self.service(fail(error))
        service.startService()
        self.assertEqual([formatEvent(e) for e in events], [f"node 4 cannot start: {error}"])
        self.assertEqual(events[0]["log_level"].name, "critical")
        self.assertEqual(statuses, [1])
        self.assertEqual(reactor.whenRunningHooks, [(reactor.stop, (), {})])

    def test_unexpected(self) -> None:
        """
        Any other failure is logged with its traceback, and still exits 1.
        """
        service, reactor, statuses, events = self.service(fail(RuntimeError("bug")))
        service.startService()
        self.assertEqual(statuses, [1])
        self.assertEqual(reactor.whenRunningHooks, [(reactor.stop, (), {})])
        self.assertIn("log_failure", events[0])

    def test_stoppedWhileJoining(self) -> None:
        """
        A join that fails because the service was stopped meanwhile (SIGTERM
        during the start) is no failure: nothing logged, no exit status.
        """
        joined: Deferred = Deferred()
        service, reactor, statuses, events = self.service(joined)
        service.startService()
        service.stopService()
        joined.errback(CoordinatorError("unavailable", "stopped before joining etcd"))
        self.assertEqual((statuses, events), ([], []))


class MakeServiceTests(OptionsTestCase):
    """
    L{makeService} builds the node and its listening port as one service.
    """

    def build(self, *arguments: str) -> "tuple[MultiService, Listener, Node, MemoryReactorClock]":
        reactor = MemoryReactorClock()
        base = FilePath(self.mktemp())
        options = parse(
            "--share", base.child("files").path, "--state", base.child("state").path, *arguments
        )
        top = makeService(options, reactor=reactor)
        services = list(top)
        listeners = [s for s in services if isinstance(s, Listener)]
        nodes = [s for s in services if isinstance(s, Node)]
        self.assertEqual((len(services), len(listeners), len(nodes)), (2, 1, 1))
        return top, listeners[0], nodes[0], reactor

    def test_tree(self) -> None:
        """
        The service is a L{MultiService} holding a
        L{Listener} and a L{Node}, neither running.
        """
        top, listener, node, reactor = self.build("--id", "1")
        self.assertIsInstance(top, MultiService)
        self.assertTrue(IService.providedBy(top))
        self.assertFalse(top.running or listener.running or node.running)
        self.assertEqual(reactor.tcpServers, [])

    def test_nodeConfig(self) -> None:
        """
        The node is configured from the options: id, address, peers,
        directories, secret and timings, and uses the given reactor.
        """
        secret = self.writeFile(b"cluster-secret\n")
        top, listener, node, reactor = self.build(
            "--id", "3", "--port", "9333",
            "--peer", "1@127.0.0.1:9001", "--peer", "2@127.0.0.1:9002",
            "--secret-file", secret, "--heartbeat", "0.5", "--leader-timeout", "3",
        )
        config = node.config
        self.assertEqual(config.id, 3)
        self.assertEqual(node.id, 3)
        self.assertEqual(config.address, "127.0.0.1:9333")
        self.assertEqual(config.peers, {1: "127.0.0.1:9001", 2: "127.0.0.1:9002"})
        self.assertTrue(config.share.path.endswith("files"))
        self.assertTrue(config.state.path.endswith("state"))
        self.assertEqual(config.secret, b"cluster-secret")
        self.assertEqual((config.heartbeat, config.leaderTimeout), (0.5, 3.0))
        self.assertIs(node.reactor, reactor)
        self.assertEqual(
            (node.identity.role, node.identity.node, node.identity.address, node.identity.secret, node.identity.purpose),
            ("node", 3, "127.0.0.1:9333", b"cluster-secret", "control"),
        )

    def test_processPolicy(self) -> None:
        """
        The node gets the process policy (collector, thread switching, and
        hashing in a child process at C{--scan-nice}); nothing is applied
        before the node starts.
        """
        top, listener, node, reactor = self.build("--id", "1", "--scan-nice", "4")
        self.assertIsInstance(node.policy, ProcessPolicy)
        self.assertIs(node.policy.clock, reactor)
        self.assertEqual(node.policy.freezes, 0)
        self.assertIsInstance(node.scanObserver, ProcessObserver)
        self.assertEqual(node.scanObserver.command[-1], "4")
        self.assertEqual(node.scanObserver.pids(), [])

    def test_coordinator(self) -> None:
        """
        The node's coordinator is the one the options name: the built-in
        election by default, etcd with C{--coordinator etcd://}; and the
        top service watches the node's start.
        """
        top, listener, node, reactor = self.build("--id", "1")
        self.assertEqual(node.coordinator.name, "builtin")
        self.assertIsInstance(top, NodeService)
        self.assertIs(top.node, node)
        top, listener, node, reactor = self.build("--id", "1", "--coordinator", "etcd://127.0.0.1:2379")
        self.assertEqual(node.coordinator.name, "etcd")
        self.assertEqual(node.config.etcd, ("127.0.0.1:2379",))

    def test_advertisedAddress(self) -> None:
        """
        C{--advertise} is the address the node gives others.
        """
        top, listener, node, reactor = self.build("--id", "1", "--advertise", "node1.example:7001")
        self.assertEqual(node.config.address, "node1.example:7001")

    def test_listener(self) -> None:
        """
        The port listens on the options' port and interface, with TLS, with
        the node's listening factory: each connection gets a fresh
        L{Incoming} router.
        """
        top, listener, node, reactor = self.build("--id", "2", "--port", "9222")
        self.assertIsInstance(listener.endpoint, TLSServerEndpoint)
        self.assertIsInstance(listener.endpoint.wrapped, TCP4ServerEndpoint)
        self.assertIs(listener.endpoint.security, node.security)
        factory = listener.factory
        self.assertIsInstance(factory, P2PFactory)
        self.assertIn(factory, node.factories)
        self.assertIs(factory.identity, node.identity)
        self.assertIs(factory.clock, reactor)
        self.assertTrue(factory.listening)
        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        self.assertIsInstance(first.handler, Incoming)
        self.assertIsNot(first.handler, second.handler)

    def test_listenerIPv6(self) -> None:
        """
        An IPv6 interface gets an IPv6 endpoint on that interface.
        """
        top, listener, node, reactor = self.build("--id", "2", "--interface", "::1")
        self.assertIsInstance(listener.endpoint.wrapped, TCP6ServerEndpoint)
        listener.privilegedStartService()
        self.addCleanup(lambda: self.successResultOf(listener.stopService()))
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9002, "::1"))

    def test_listenerStarts(self) -> None:
        """
        Started on a memory reactor, the listener asks for the configured
        port and interface with the node's factory behind TLS, and lets go
        of it when stopped.  The node's certificate is made then, in its
        state directory, not when the service was built.
        """
        top, listener, node, reactor = self.build("--id", "2", "--port", "9222")
        key = node.config.state.child("node.key")
        self.assertFalse(key.exists())
        listener.privilegedStartService()
        listener.startService()
        self.addCleanup(lambda: self.successResultOf(listener.stopService()))
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9222, "127.0.0.1"))
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertIs(factory.wrappedFactory, listener.factory)
        self.assertTrue(key.exists())
        self.assertEqual(node.security.fingerprint, stateIdentity(node.config.state, create=False).fingerprint)

    def test_portTakenFailsAtStart(self) -> None:
        """
        A port another socket holds stops the start with one line naming
        the address and the reason, and nothing listens.
        """
        import socket

        from twisted.internet import reactor as realReactor

        from p2pfiles.address import serverEndpoint

        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        endpoint = serverEndpoint(realReactor, "127.0.0.1", port, TLS(certificate("tap")))
        listener = Listener(endpoint, P2PFactory(None, None, None, True), f"127.0.0.1:{port}")
        error = self.assertRaises(CannotListen, listener.privilegedStartService)
        self.assertEqual(str(error), f"cannot listen on 127.0.0.1:{port}: address already in use")
        self.assertIsNone(listener.port)
        # A SystemExit carrying the line: twistd ends with it, exit status 1,
        # and no traceback.
        self.assertIsInstance(error, SystemExit)
        self.assertEqual(error.code, str(error))


WEB_TOKEN = b"web-token-0123456789"


class WebOptionsTests(OptionsTestCase):
    """
    C{--web ENDPOINT} serves the status page; an endpoint reachable beyond
    loopback needs C{--web-token-file}, refused in one line without it.
    """

    def test_offByDefault(self) -> None:
        """
        Without C{--web} there is no web view and no token.
        """
        options = parse("--id", "1")
        self.assertEqual((options["web"], options["web-token"]), (None, None))

    def test_loopbackWithoutToken(self) -> None:
        """
        Endpoints on a loopback interface, or on a UNIX socket, are
        accepted without a token.
        """
        for description in (
            "tcp:9101:interface=127.0.0.1",
            "tcp:9101:interface=127.0.0.53",
            "tcp:0:interface=localhost",
            "tcp6:9101:interface=\\:\\:1",
            "unix:/run/p2pfiles/web.sock",
        ):
            options = parse("--id", "1", "--web", description)
            self.assertEqual((options["web"], options["web-token"]), (description, None))

    def test_notLoopbackNeedsToken(self) -> None:
        """
        An endpoint on another interface, on every interface, or naming no
        interface at all (which means every one) is refused without
        C{--web-token-file}, naming the endpoint and the option.
        """
        for description in (
            "tcp:9101",
            "tcp:9101:interface=0.0.0.0",
            "tcp:9101:interface=192.0.2.7",
            "tcp6:9101",
            "tcp6:9101:interface=\\:\\:",
            "tcp:9101:interface=example.com",
        ):
            message = self.assertUsageError("--id", "1", "--web", description)
            self.assertIn(f"--web {description}", message)
            self.assertIn("--web-token-file", message)

    def test_notLoopbackWithToken(self) -> None:
        """
        With a token file any interface is accepted, and the token is the
        file's content without surrounding whitespace.
        """
        path = self.writeFile(b"  " + WEB_TOKEN + b"\n")
        options = parse("--id", "1", "--web", "tcp:9101", "--web-token-file", path)
        self.assertEqual((options["web"], options["web-token"]), ("tcp:9101", WEB_TOKEN))

    def test_tokenWithLoopback(self) -> None:
        """
        A token may guard a loopback endpoint too.
        """
        path = self.writeFile(WEB_TOKEN)
        options = parse("--id", "1", "--web", "tcp:9101:interface=127.0.0.1", "--web-token-file", path)
        self.assertEqual(options["web-token"], WEB_TOKEN)

    def test_tokenFileProblems(self) -> None:
        """
        A token file that is missing, a directory, empty, too short, too
        large, or holds characters a header cannot carry is a one-line
        usage error naming the file, even on an endpoint that would not
        need it.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        bad = [
            FilePath(self.mktemp()).path,
            directory.path,
            self.writeFile(b""),
            self.writeFile(b" \n\t\n"),
            self.writeFile(b"x" * (MIN_TOKEN - 1)),
            self.writeFile(b"x" * 5000),
            self.writeFile(b"web token with spaces in it"),
            self.writeFile("t\u00f6ken-0123456789abcdef".encode("utf-8")),
        ]
        for path in bad:
            for description in ("tcp:9101", "tcp:9101:interface=127.0.0.1"):
                message = self.assertUsageError("--id", "1", "--web", description, "--web-token-file", path)
                self.assertIn(path, message)

    def test_badEndpoints(self) -> None:
        """
        A description Twisted cannot build a server endpoint from, or an
        endpoint kind that does not serve HTTP here, is a one-line usage
        error naming it, not a traceback when the node starts.
        """
        for description in (
            "9101",
            "tcp:web:interface=127.0.0.1",
            "tcp:9101:interface=127.0.0.1:colour=blue",
            "tcp:9101:interface=127.0.0.1:backlog=many",
            "udp:9101:interface=127.0.0.1",
            "stdio:",
        ):
            message = self.assertUsageError("--id", "1", "--web", description)
            self.assertIn(f"--web {description}", message)


class WebServiceTests(OptionsTestCase):
    """
    With C{--web}, L{makeService} adds a L{WebListener} serving the node's
    web view.
    """

    def build(self, *arguments: str) -> "tuple[MultiService, WebListener, Node, MemoryReactorClock]":
        reactor = MemoryReactorClock()
        base = FilePath(self.mktemp())
        options = parse(
            "--id", "2", "--port", "9222",
            "--share", base.child("files").path, "--state", base.child("state").path, *arguments,
        )
        top = makeService(options, reactor=reactor)
        services = list(top)
        webs = [s for s in services if isinstance(s, WebListener)]
        nodes = [s for s in services if isinstance(s, Node)]
        self.assertEqual((len(services), len(webs), len(nodes)), (3, 1, 1))
        return top, webs[0], nodes[0], reactor

    def start(self, listener: WebListener) -> None:
        listener.privilegedStartService()
        listener.startService()
        self.addCleanup(lambda: listener.running and self.successResultOf(listener.stopService()))

    def request(self, listener: WebListener, path: str, headers: Dict[str, str] = {}) -> StringTransport:
        """
        Send one GET to the listener's site over an in-memory connection;
        the transport holds the answer.
        """
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9102), peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)
        )
        channel = listener.factory.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1:9102"] + [f"{k}: {v}" for k, v in headers.items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        return transport

    def test_noWebNoListener(self) -> None:
        """
        Without C{--web} nothing but the node's own port listens.
        """
        reactor = MemoryReactorClock()
        base = FilePath(self.mktemp())
        top = makeService(parse("--id", "1", "--state", base.child("state").path), reactor=reactor)
        self.assertEqual([type(s) for s in top if isinstance(s, Listener)], [Listener])

    def test_listensOnTheEndpoint(self) -> None:
        """
        Started on a memory reactor, the web listener asks for the
        endpoint's port and interface with a L{Site} whose root is the web
        view, on the given reactor (its connections' timers too), and lets
        go when stopped.
        """
        top, web, node, reactor = self.build("--web", "tcp:9102:interface=127.0.0.1")
        self.assertIsInstance(web.endpoint, TCP4ServerEndpoint)
        self.start(web)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9102, "127.0.0.1"))
        self.assertIsInstance(factory, Site)
        self.assertIs(factory, web.factory)
        self.assertIsInstance(factory.resource, WebRoot)
        self.assertIs(factory.reactor, reactor)
        self.assertIsNotNone(web.port)
        self.successResultOf(web.stopService())
        self.assertIsNone(web.port)

    def test_ipv6Endpoint(self) -> None:
        """
        A C{tcp6:} endpoint listens on its IPv6 interface.
        """
        top, web, node, reactor = self.build("--web", "tcp6:9102:interface=\\:\\:1")
        self.assertIsInstance(web.endpoint, TCP6ServerEndpoint)
        self.start(web)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9102, "::1"))

    def test_servesTheNodesStatus(self) -> None:
        """
        The site answers C{/api/status} with this node's status.
        """
        top, web, node, reactor = self.build("--web", "tcp:9102:interface=127.0.0.1")
        self.start(web)
        raw = self.request(web, "/api/status").value()
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b'"id": 2', body)
        self.assertIn(b'"address": "127.0.0.1:9222"', body)

    def test_tokenRequired(self) -> None:
        """
        With C{--web-token-file}, the site refuses a request without the
        token and answers one with it.
        """
        path = self.writeFile(WEB_TOKEN + b"\n")
        top, web, node, reactor = self.build("--web", "tcp:9102", "--web-token-file", path)
        self.start(web)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9102, ""))
        self.assertTrue(self.request(web, "/api/status").value().startswith(b"HTTP/1.1 401 "))
        answer = self.request(web, "/api/status", {"Authorization": "Bearer " + WEB_TOKEN.decode()}).value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_stopClosesLiveStreams(self) -> None:
        """
        Stopping the web listener drops every open C{/api/watch} stream (they
        never end by themselves) and stops listening; other connections
        are left to finish.
        """
        top, web, node, reactor = self.build("--web", "tcp:9102:interface=127.0.0.1")
        self.start(web)
        streams = [self.request(web, "/api/watch") for n in range(2)]
        for stream in streams:
            self.assertIn(b"event: status", stream.value())
            self.assertFalse(stream.disconnecting)
        idle = StringTransport()
        web.factory.buildProtocol(None).makeConnection(idle)
        self.successResultOf(web.stopService())
        self.assertEqual([s.disconnecting for s in streams], [True, True])
        self.assertFalse(idle.disconnecting)
        self.assertIsNone(web.port)
        self.assertFalse(web.running)


class PluginTests(SynchronousTestCase):
    """
    The twistd plugin in C{twisted/plugins/p2pfiles_plugin.py}.
    """

    def assertIsOurPlugin(self, plugin: Any) -> None:
        self.assertTrue(IServiceMaker.providedBy(plugin))
        self.assertEqual(plugin.tapname, "p2pfiles")
        self.assertTrue(plugin.description)
        self.assertIs(plugin.options, Options)
        self.assertIs(plugin.makeService, makeService)

    def test_importable(self) -> None:
        """
        C{twisted.plugins.p2pfiles_plugin.p2pfiles} is an L{IServiceMaker}
        named C{p2pfiles} whose options are L{p2pfiles.tap.Options}.
        """
        from twisted.plugins.p2pfiles_plugin import p2pfiles

        self.assertIsOurPlugin(p2pfiles)

    def test_repositoryFile(self) -> None:
        """
        The plugin file in this checkout (not only an installed copy)
        defines the same service maker.
        """
        path = ROOT.child("twisted").child("plugins").child("p2pfiles_plugin.py")
        namespace = runpy.run_path(path.path)
        self.assertIsOurPlugin(namespace["p2pfiles"])

    def test_noPackageInit(self) -> None:
        """
        Neither C{twisted/} nor C{twisted/plugins/} has an C{__init__.py}:
        one would hide every other Twisted plugin.
        """
        self.assertFalse(ROOT.child("twisted").child("__init__.py").exists())
        self.assertFalse(ROOT.child("twisted").child("plugins").child("__init__.py").exists())


class TacTests(SynchronousTestCase):
    """
    C{tac/p2pfiles.tac} builds the plugin's service from environment
    variables.
    """

    def load(self, environment: Dict[str, str]) -> Node:
        """
        Run the tac file with exactly C{environment} as C{os.environ};
        return the one L{Node} in its application.
        """
        self.patch(os, "environ", dict(environment))
        namespace = runpy.run_path(ROOT.child("tac").child("p2pfiles.tac").path)
        application = namespace["application"]
        top = list(IServiceCollection(application))
        self.assertEqual(len(top), 1)
        self.top = list(top[0])
        nodes: List[Node] = [s for s in top[0] if isinstance(s, Node)]
        listeners = [s for s in top[0] if type(s) is Listener]
        self.assertEqual((len(nodes), len(listeners)), (1, 1))
        self.assertFalse(nodes[0].running)
        self.assertFalse(listeners[0].running)
        self.assertIn(listeners[0].factory, nodes[0].factories)
        return nodes[0]

    def test_environment(self) -> None:
        """
        Id, port, peers (the node's own entry skipped), share and state come
        from the C{P2PFILES_*} variables.
        """
        base = FilePath(self.mktemp())
        node = self.load(
            {
                "P2PFILES_ID": "2",
                "P2PFILES_PORT": "9502",
                "P2PFILES_PEERS": "1@127.0.0.1:9501 2@127.0.0.1:9502 3@127.0.0.1:9503",
                "P2PFILES_SHARE": base.child("files").path,
                "P2PFILES_STATE": base.child("state").path,
            }
        )
        config = node.config
        self.assertEqual(config.id, 2)
        self.assertEqual(config.address, "127.0.0.1:9502")
        self.assertEqual(config.peers, {1: "127.0.0.1:9501", 3: "127.0.0.1:9503"})
        self.assertEqual(config.share, base.child("files"))
        self.assertEqual(config.state, base.child("state"))
        self.assertEqual(config.secret, b"")
        self.assertFalse(base.exists(), "loading the tac must not create directories")

    def test_defaults(self) -> None:
        """
        Without variables the tac describes node 1 of the three-node demo
        cluster on ports 9001-9003.
        """
        node = self.load({})
        config = node.config
        self.assertEqual((config.id, config.address), (1, "127.0.0.1:9001"))
        self.assertEqual(config.peers, {2: "127.0.0.1:9002", 3: "127.0.0.1:9003"})
        self.assertEqual((config.share.basename(), config.state.basename()), ("files", "state"))
        self.assertEqual(config.share.parent().basename(), "node1")

    def test_portFollowsId(self) -> None:
        """
        Without C{P2PFILES_PORT} the port is 9000+id.
        """
        base = FilePath(self.mktemp())
        node = self.load(
            {
                "P2PFILES_ID": "3",
                "P2PFILES_SHARE": base.child("f").path,
                "P2PFILES_STATE": base.child("s").path,
            }
        )
        self.assertEqual(node.config.address, "127.0.0.1:9003")
        self.assertEqual(node.config.peers, {1: "127.0.0.1:9001", 2: "127.0.0.1:9002"})

    def test_secretFile(self) -> None:
        """
        C{P2PFILES_SECRET_FILE} names the cluster secret.
        """
        base = FilePath(self.mktemp())
        base.makedirs()
        secret = base.child("secret")
        secret.setContent(b"tac-secret\n")
        node = self.load(
            {
                "P2PFILES_ID": "1",
                "P2PFILES_PEERS": "",
                "P2PFILES_SHARE": base.child("f").path,
                "P2PFILES_STATE": base.child("s").path,
                "P2PFILES_SECRET_FILE": secret.path,
            }
        )
        self.assertEqual(node.config.secret, b"tac-secret")
        self.assertEqual(node.config.peers, {})

    def test_everyPluginOption(self) -> None:
        """
        Every option of the plugin has its C{P2PFILES_*} variable: interface,
        advertise, cluster (whose own line gives the port), heartbeat,
        leader timeout, web, part age; an empty variable counts as unset.
        """
        base = FilePath(self.mktemp())
        base.makedirs()
        cluster = base.child("cluster")
        cluster.setContent(b"1 127.0.0.1:9601\n2 127.0.0.2:9602\n")
        node = self.load(
            {
                "P2PFILES_ID": "2",
                "P2PFILES_CLUSTER": cluster.path,
                "P2PFILES_INTERFACE": "127.0.0.3",
                "P2PFILES_ADVERTISE": "127.0.0.2:9602",
                "P2PFILES_SHARE": base.child("f").path,
                "P2PFILES_STATE": base.child("s").path,
                "P2PFILES_HEARTBEAT": "0.5",
                "P2PFILES_LEADER_TIMEOUT": "3",
                "P2PFILES_PART_MAX_AGE": "2",
                "P2PFILES_SECRET_FILE": "",
                "P2PFILES_TLS_CERT": "",
            }
        )
        config = node.config
        self.assertEqual(config.peers, {1: "127.0.0.1:9601"})
        self.assertEqual(config.address, "127.0.0.2:9602")
        self.assertEqual((config.heartbeat, config.leaderTimeout, config.partMaxAge), (0.5, 3.0, 2 * 86400))
        self.assertEqual(config.secret, b"")
        listener = [s for s in self.top if isinstance(s, Listener)][0]
        self.assertEqual(listener.where, "127.0.0.3:9602")

    def test_web(self) -> None:
        """
        C{P2PFILES_WEB} turns the web view on, as C{--web} does.
        """
        base = FilePath(self.mktemp())
        self.load(
            {
                "P2PFILES_WEB": "tcp:0:interface=127.0.0.1",
                "P2PFILES_SHARE": base.child("f").path,
                "P2PFILES_STATE": base.child("s").path,
            }
        )
        self.assertEqual([s.where for s in self.top if isinstance(s, WebListener)], ["tcp:0:interface=127.0.0.1"])

    def test_arguments(self) -> None:
        """
        C{P2PFILES_ARGS} adds plugin options, split as a shell would.
        """
        base = FilePath(self.mktemp())
        node = self.load(
            {
                "P2PFILES_ARGS": f"--share '{base.child('a b').path}' --heartbeat 0.1",
                "P2PFILES_STATE": base.child("s").path,
            }
        )
        self.assertEqual(node.config.share, base.child("a b"))
        self.assertEqual(node.config.heartbeat, 0.1)

    def test_badOption(self) -> None:
        """
        A bad value ends the tac with one line naming the file and the
        plugin's reason, not a traceback.
        """
        self.patch(os, "environ", {"P2PFILES_ID": "-1"})
        error = self.assertRaises(SystemExit, runpy.run_path, ROOT.child("tac").child("p2pfiles.tac").path)
        self.assertEqual(error.code, "p2pfiles.tac: --id must be a non-negative integer")
