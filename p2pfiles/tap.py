"""
The twistd plugin's options and service: C{twistd -n p2pfiles --id 1 ...}.
"""

import atexit
import ipaddress
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from p2pfiles.auth import SecretError, readSecret
from p2pfiles.address import formatAddress, parseAddress, serverEndpoint
from p2pfiles.coordinator import CoordinatorError
from p2pfiles.etcd import DEFAULT_PREFIX, DEFAULT_TTL, checkPrefix
from p2pfiles.heartbeat import EpochStore
from p2pfiles.identity import IdentityError, NodeCertificate, Pins, loadIdentity, parseFingerprint, stateIdentity
from p2pfiles.node import Node, NodeConfig
from p2pfiles.runtime import ProcessPolicy
from p2pfiles.scanworker import WORKER_NICE
from p2pfiles.web import TokenError, makeWebRoot, readToken


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a positive number")
    return value


def _atLeastOne(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number, at least 1")
    return value


def _niceness(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be a whole number from 0 to 19")
    return value


def _leaseTTL(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 1):
        raise ValueError("must be at least 1 (second)")
    return value


def parseCoordinator(text: str) -> List[str]:
    """
    The etcd endpoints of C{--coordinator etcd://HOST:PORT[,HOST:PORT...]},
    or an empty list for C{builtin}.
    """
    if text == "builtin":
        return []
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "etcd":
        raise usage.UsageError(f"--coordinator {text!r}: expected 'builtin' or etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = rest.split(",")
    for endpoint in endpoints:
        try:
            parseAddress(endpoint)
        except ValueError as e:
            raise usage.UsageError(f"--coordinator {text!r}: {e}") from None
    if len(set(endpoints)) != len(endpoints):
        raise usage.UsageError(f"--coordinator {text!r}: an endpoint is given twice")
    return endpoints


def _nodeId(text: str) -> Optional[int]:
    # isdecimal() alone accepts digits int() may not; keep to ASCII.
    return int(text) if text.isascii() and text.isdecimal() else None


def isLoopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def readCluster(path: str) -> Tuple[Dict[int, str], Dict[int, str]]:
    """
    Read a cluster file: one C{ID HOST:PORT [FINGERPRINT]} a line, C{#}
    comments.  Return the addresses and the pinned fingerprints, by id.
    """
    try:
        lines = FilePath(path).getContent().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"cannot read cluster file {path}: {e}") from None
    nodes: Dict[int, str] = {}
    pins: Dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or _nodeId(parts[0]) is None:
            raise usage.UsageError(f"{path}:{number}: expected 'ID HOST:PORT [sha256:FINGERPRINT]', got {line!r}")
        try:
            parseAddress(parts[1])
            fingerprint = parseFingerprint(parts[2]) if len(parts) == 3 else None
        except ValueError as e:
            raise usage.UsageError(f"{path}:{number}: {e}") from None
        node = int(parts[0])
        if node in nodes:
            raise usage.UsageError(f"{path}:{number}: node {node} is listed twice")
        nodes[node] = parts[1]
        if fingerprint is not None:
            pins[node] = fingerprint
    return nodes, pins


def parseCluster(path: str) -> Dict[int, str]:
    """
    The addresses of a cluster file, by id (see L{readCluster}).
    """
    return readCluster(path)[0]


def parsePeer(text: str) -> Tuple[int, str, Optional[str]]:
    """
    Split C{ID@HOST:PORT} or C{ID@HOST:PORT=FINGERPRINT} into id, address
    and pinned fingerprint (or None).
    """
    node, sep, rest = text.partition("@")
    if not sep or _nodeId(node) is None:
        raise usage.UsageError(f"--peer {text!r}: expected ID@HOST:PORT[=sha256:FINGERPRINT]")
    address, pinned, fingerprint = rest.partition("=")
    try:
        parseAddress(address)
        return int(node), address, parseFingerprint(fingerprint) if pinned else None
    except ValueError as e:
        raise usage.UsageError(f"--peer {text!r}: {e}") from None


class Options(usage.Options):
    """
    Options of C{twistd p2pfiles}.
    """

    synopsis = "--id N [--port P] [--peer ID@HOST:PORT ...] [options]"

    optParameters = [
        ["id", None, None, "This node's id: a non-negative integer, unique in the cluster (required).", int],
        ["port", None, None, "TCP port to listen on (default 9000+id).", int],
        [
            "interface",
            None,
            None,
            "Address to listen on (default: the host of this node's --cluster line, else 127.0.0.1). "
            "A non-loopback address needs --secret-file.",
        ],
        ["advertise", None, None, "HOST:PORT other nodes use to reach this one (default INTERFACE:PORT)."],
        [
            "cluster",
            None,
            None,
            "File listing the cluster: one 'ID HOST:PORT [sha256:FINGERPRINT]' a line, '#' comments.",
        ],
        ["share", None, None, "Directory whose files this node shares (default node<ID>/files)."],
        ["state", None, None, "Directory for this node's state and peer_files.log (default node<ID>/state)."],
        ["secret-file", None, None, "File holding the cluster secret shared by every node and client."],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate this node presents (default: STATE/node.crt, made on first start).",
        ],
        ["tls-key", None, None, "PEM private key of --tls-cert (default: STATE/node.key, made on first start)."],
        ["heartbeat", None, 0.25, "Seconds between heartbeats.", _positive],
        ["leader-timeout", None, 1.0, "Seconds of silence after which a member counts as down.", _positive],
        [
            "start-grace",
            None,
            5.0,
            "Seconds a starting node waits to hear from every known peer before it may lead without them "
            "(at least --leader-timeout), so that nodes started together do not each lead in turn.",
            _positive,
        ],
        ["max-connections", None, 512, "Most incoming connections open at once; more are refused.", _atLeastOne],
        [
            "max-connections-per-address",
            None,
            64,
            "Most incoming connections open at once from one host; more are refused.",
            _atLeastOne,
        ],
        ["max-members", None, 64, "Most members this node knows and links to; more are not learned.", _atLeastOne],
        [
            "forget-after",
            None,
            600.0,
            "Seconds after which a learned member (not one given with --peer or --cluster) that has not been "
            "alive is forgotten and no longer linked to.",
            _positive,
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Seconds an authenticated request connection may stay open with no request in flight.",
            _positive,
        ],
        [
            "coordinator",
            None,
            "builtin",
            "Who decides membership and leadership: 'builtin' (the nodes, by heartbeats) or "
            "etcd://HOST:PORT[,HOST:PORT...] (an etcd cluster; --peer and --cluster become optional).",
        ],
        [
            "coordinator-prefix",
            None,
            None,
            f"With etcd: the key prefix this cluster keeps its members and leader under (default {DEFAULT_PREFIX}).",
        ],
        [
            "lease-ttl",
            None,
            None,
            f"With etcd: seconds a node's lease lives without renewal, at least 1 (default {DEFAULT_TTL:g}).",
            _leaseTTL,
        ],
        [
            "web",
            None,
            None,
            "Serve the status page, JSON API and /metrics on this Twisted server endpoint "
            "(e.g. tcp:9101:interface=127.0.0.1); off when absent. A non-loopback endpoint needs --web-token-file.",
        ],
        ["web-token-file", None, None, "File holding the bearer token every web request must carry."],
        [
            "scan-nice",
            None,
            WORKER_NICE,
            "How much lower than the node's own the CPU priority of the process that hashes the share is, "
            "0 to 19: the higher, the surer heartbeats go out on time while hashing on a busy machine.",
            _niceness,
        ],
        [
            "part-max-age",
            None,
            7.0,
            "Days after which an abandoned partial download in the share is removed (at start, then daily).",
            _positive,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peers"] = {}
        self["pins"] = {}
        self["etcd"] = []

    def opt_peer(self, value: str) -> None:
        """
        Another node known at start, as ID@HOST:PORT, or
        ID@HOST:PORT=sha256:FINGERPRINT to pin its certificate (repeatable).
        """
        node, address, fingerprint = parsePeer(value)
        if node in self["peers"]:
            raise usage.UsageError(f"--peer: node {node} given twice")
        self["peers"][node] = address
        if fingerprint is not None:
            self["pins"][node] = fingerprint

    def postOptions(self) -> None:
        node = self["id"]
        if node is None:
            raise usage.UsageError("--id is required")
        if node < 0:
            raise usage.UsageError("--id must be a non-negative integer")
        if self["cluster"] is not None and self["peers"]:
            raise usage.UsageError("give either --cluster or --peer, not both")
        if self["cluster"] is not None:
            peers, self["pins"] = readCluster(self["cluster"])
            own = peers.pop(node, None)
            if own is not None:
                # The node's own line says where the others expect it.
                host, port = parseAddress(own)
                if self["port"] is None:
                    self["port"] = port
                if self["interface"] is None:
                    self["interface"] = host
                if self["advertise"] is None and self["port"] == port:
                    self["advertise"] = own
            self["peers"] = peers
        if self["interface"] is None:
            self["interface"] = "127.0.0.1"
        if node in self["peers"]:
            raise usage.UsageError(f"--peer names this node's own id {node}")
        if self["port"] is None:
            self["port"] = 9000 + node
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError(f"--port {self['port']} is not a TCP port")
        if self["port"] == 0 and self["advertise"] is None:
            raise usage.UsageError("--port 0 needs --advertise: other nodes could not reach this one")
        if self["leader-timeout"] < 2 * self["heartbeat"]:
            raise usage.UsageError(
                "--leader-timeout must be at least twice --heartbeat, or members would flap between up and down"
            )
        self._checkCoordinator()
        if self["advertise"] is not None:
            try:
                parseAddress(self["advertise"])
            except ValueError as e:
                raise usage.UsageError(f"--advertise: {e}") from None
        self["secret"] = b""
        if self["secret-file"] is not None:
            try:
                self["secret"] = readSecret(self["secret-file"])
            except SecretError as e:
                raise usage.UsageError(str(e)) from None
        elif not isLoopback(self["interface"]):
            raise usage.UsageError(
                f"--interface {self['interface']} is not loopback: refusing to listen without --secret-file"
            )
        self["web-token"] = None
        if self["web-token-file"] is not None:
            try:
                self["web-token"] = readToken(self["web-token-file"])
            except TokenError as e:
                raise usage.UsageError(str(e)) from None
        if self["web"] is not None:
            where = webInterface(self["web"])
            checkServerDescription(self["web"])
            if where is not None and not isLoopback(where) and self["web-token"] is None:
                raise usage.UsageError(
                    f"--web {self['web']} is not loopback: refusing to serve it without --web-token-file"
                )
        for name in ("share", "state"):
            if self[name] is None:
                self[name] = f"node{node}/{'files' if name == 'share' else 'state'}"
        try:
            EpochStore(FilePath(self["state"])).load()
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot use --state {self['state']}: {e}") from None
        self["certificate"] = self._certificate()
        self._checkPins()

    def _checkCoordinator(self) -> None:
        self["etcd"] = parseCoordinator(self["coordinator"])
        if not self["etcd"]:
            for name in ("coordinator-prefix", "lease-ttl"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} applies only to --coordinator etcd://...")
            return
        if self["coordinator-prefix"] is None:
            self["coordinator-prefix"] = DEFAULT_PREFIX
        try:
            checkPrefix(self["coordinator-prefix"])
        except ValueError as e:
            raise usage.UsageError(f"--coordinator-prefix: {e}") from None
        if self["lease-ttl"] is None:
            self["lease-ttl"] = DEFAULT_TTL

    def _certificate(self) -> Optional[NodeCertificate]:
        """
        The node's TLS identity: the operator's files, or those in the state
        directory; None if there are none yet (the node makes them when it
        starts: parsing options writes nothing).  Files that are there but
        unusable are refused here, in one line.
        """
        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("give both --tls-cert and --tls-key, or neither")
        try:
            if cert is not None:
                return loadIdentity(FilePath(cert), FilePath(key))
            return stateIdentity(FilePath(self["state"]), create=False)
        except IdentityError as e:
            raise usage.UsageError(str(e)) from None

    def _checkPins(self) -> None:
        pins = self["pins"]
        own = pins.pop(self["id"], None)
        if own is None:
            return
        certificate = self["certificate"]
        if certificate is None:
            raise usage.UsageError(
                f"{own} is pinned for this node (node {self['id']}), but it has no certificate yet: "
                "give it --tls-cert and --tls-key, or start it once without its pin"
            )
        if own != certificate.fingerprint:
            raise usage.UsageError(
                f"this node's certificate is {certificate.fingerprint}, but {own} is pinned for node {self['id']}"
            )

    def pins(self) -> Pins:
        """
        What this node pins.  When every other member it was given has a
        pin, the membership is closed: nodes with other ids are refused.
        """
        pins = self["pins"]
        closed = bool(pins) and set(pins) >= set(self["peers"])
        return Pins(pins, closed=closed)

    def nodeConfig(self, port: Optional[int] = None) -> NodeConfig:
        port = self["port"] if port is None else port
        address = self["advertise"] or formatAddress(self["interface"], port)
        return NodeConfig(
            id=self["id"],
            address=address,
            peers=self["peers"],
            share=FilePath(self["share"]),
            state=FilePath(self["state"]),
            secret=self["secret"],
            heartbeat=self["heartbeat"],
            leaderTimeout=self["leader-timeout"],
            startGrace=self["start-grace"],
            partMaxAge=self["part-max-age"] * 86400,
            certificate=self["certificate"],
            pins=self.pins(),
            etcd=self["etcd"],
            coordinatorPrefix=self["coordinator-prefix"] or DEFAULT_PREFIX,
            leaseTTL=self["lease-ttl"] or DEFAULT_TTL,
            maxConnections=self["max-connections"],
            maxConnectionsPerAddress=self["max-connections-per-address"],
            idleTimeout=self["idle-timeout"],
            maxMembers=self["max-members"],
            forgetAfter=self["forget-after"],
        )


class CannotListen(SystemExit):
    """
    The node's port could not be had; the string form is one line.

    It is a L{SystemExit} carrying that line: raised while twistd starts the
    application, it ends the process with status 1 and the line alone on
    standard error (which twistd sends to its log), not a traceback.
    """

    def __str__(self) -> str:
        return str(self.code)


class Listener(Service):
    """
    The node's listening port.  It listens when the service starts (before
    twistd drops privileges), and a port that cannot be had stops the start
    with L{CannotListen}.
    """

    def __init__(self, endpoint: Any, factory: Any, where: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.where = where
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        # TCP endpoints answer at once.
        if not outcome:
            raise CannotListen(f"cannot listen on {self.where}: no answer from the endpoint")
        if isinstance(outcome[0], Failure):
            reason = outcome[0].value
            detail = getattr(reason, "socketError", None) or reason
            text = getattr(detail, "strerror", None) or str(detail)
            raise CannotListen(f"cannot listen on {self.where}: {text.lower() if text else detail}")
        self.port = outcome[0]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def exitStatusAfterTwistd(status: int) -> None:
    """
    Make the process exit with C{status} once twistd is done.

    twistd exits 0 whenever its reactor stopped, and offers no exit status
    of its own: so, once twistd has stopped its services, removed its pid
    file and logged its last line, an exit handler flushes the standard
    streams and ends the process with C{status}.
    """

    def exit() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit)


class NodeService(MultiService):
    """
    The node and its ports, as twistd runs them.  If the node cannot join
    its cluster (its id is taken, or etcd does not answer), that is one
    line in the log, the reactor stops, and the process exits with status 1.
    """

    log = Logger()

    def __init__(self, node: Node, reactor: Any, exitStatus: Callable[[int], None] = exitStatusAfterTwistd) -> None:
        super().__init__()
        self.node = node
        self.reactor = reactor
        self.exitStatus = exitStatus

    def startService(self) -> None:
        super().startService()
        self.node.whenJoined().addErrback(self._cannotJoin)

    def _cannotJoin(self, reason: Failure) -> None:
        if not self.running:
            # Stopped while joining: nothing went wrong.
            return
        if reason.check(CoordinatorError):
            self.log.critical("node {id} cannot start: {why}", id=self.node.id, why=reason.getErrorMessage())
        else:
            self.log.failure("node {id} cannot start", reason, id=self.node.id)
        self.exitStatus(1)
        self.reactor.callWhenRunning(self.reactor.stop)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    The node and the port it listens on, as one service.
    """
    if reactor is None:
        from twisted.internet import reactor
    node = Node(options.nodeConfig(), reactor, policy=ProcessPolicy(reactor, scanNice=options["scan-nice"]))
    endpoint = serverEndpoint(reactor, options["interface"], options["port"], node.security)
    listener = Listener(endpoint, node.listeningFactory(), formatAddress(options["interface"], options["port"]))
    top = NodeService(node, reactor)
    listener.setServiceParent(top)
    node.setServiceParent(top)
    if options["web"] is not None:
        from twisted.internet.endpoints import serverFromString
        from twisted.web.server import Site

        root = makeWebRoot(node.board, node.board.metrics.registry, options["web-token"], reactor)
        site = Site(root, reactor=reactor)
        site.noisy = False
        WebListener(serverFromString(reactor, options["web"]), site, options["web"], root).setServiceParent(top)
    return top


class WebListener(Listener):
    """
    The web view's port.  Its live streams never end by themselves: they are
    closed when it stops.
    """

    def __init__(self, endpoint: Any, factory: Any, where: str, root: Any) -> None:
        super().__init__(endpoint, factory, where)
        self.root = root

    def stopService(self) -> Deferred:
        self.root.closeStreams()
        return super().stopService()


def webInterface(description: str) -> Optional[str]:
    """
    The address a server endpoint description listens on (C{"0.0.0.0"}
    when it names none), or None for a kind that has no address (a UNIX
    socket).  Raises L{usage.UsageError} for a description that is not one.
    """
    # Colons inside a value (an IPv6 address) are escaped as "\\:".
    parts = [part.replace("\0", ":") for part in description.replace("\\:", "\0").split(":")]
    kind = parts[0].lower() if len(parts) > 1 else "tcp"
    if kind == "unix":
        return None
    interface = "::" if kind == "tcp6" else "0.0.0.0"
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "interface":
            interface = value.replace("\\", "")
    if kind not in ("tcp", "tcp6", "ssl"):
        raise usage.UsageError(f"--web {description}: use a tcp:, tcp6:, ssl: or unix: endpoint")
    return interface


def checkServerDescription(description: str) -> None:
    """
    Raise L{usage.UsageError}, in one line, if C{description} is not a
    server endpoint Twisted can build here (a bad port or parameter, or
    C{ssl:} without pyOpenSSL).  Nothing listens: the endpoint is built
    without a reactor and dropped.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise usage.UsageError(f"--web {description}: not a usable server endpoint ({reason})") from None

