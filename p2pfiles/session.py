"""
One request connection, from its handshake to its close: L{RequestSession}.

A client (the command-line client, or a node acting as one) opens a request
connection and asks: C{status} (optionally watching), C{ls}, C{lookup},
C{get} (the file is served from disk or relayed from a holder) or C{fetch}
(the node downloads the file into its own share).  The session is an
explicit state machine::

    idle --status(watch)--> watching --close--> closed
    idle --get (mine)-----> serving  --done---> idle
    idle --get (relayed)--> relaying --done---> idle
    idle --fetch----------> fetching --done---> idle
    idle --index-since----> sending-index --done---> idle
    idle --ls-------------> sending-listing --done-> idle

It owns its producer or relay and its watch, and L{connectionClosed} (an
input in every state) cleans them up in one place.  It reaches the node only
through L{IRequestContext}: it never sees the node object.
"""

from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from p2pfiles.errors import P2PError
from p2pfiles.indexstream import IndexSender
from p2pfiles.names import nameProblem
from p2pfiles.protocol import IConnectionHandler, P2PProtocol, ProtocolViolation
from p2pfiles.transfer import CHUNK_SIZE, FileProducer, Relay
from p2pfiles.wire import FileEntry, Message, encode, splitListing

# How often a client waiting for a fetch hears that the node is at work.
PROGRESS_INTERVAL = 1.0

IDLE = "idle"
WATCHING = "watching"
SERVING = "serving"
RELAYING = "relaying"
FETCHING = "fetching"
SENDING_INDEX = "sending-index"
SENDING_LISTING = "sending-listing"
CLOSED = "closed"


class IRequestContext(Interface):
    """
    What a request session may know of and ask of its node.
    """

    me = Attribute("this node's id")
    clock = Attribute("the reactor, for timeouts")

    def isLeader():
        """
        True if this node leads right now.
        """

    def leaderId():
        """
        The leader's id, or None.
        """

    def leaderAddress():
        """
        The leader's address, or None.
        """

    def status():
        """
        What C{status --json} prints.
        """

    def watchStatus(callback):
        """
        Call C{callback(status)} on every change of the status; return a
        callable that stops the watch.
        """

    def listing():
        """
        The cluster's files as C{ls --json} prints them (leader only).
        """

    def listingFrames():
        """
        The same listing as the encoded C{listing} frames of an C{ls}
        answer (see L{encodeListing}), one sequence shared by every reader
        while the index does not change (leader only).
        """

    def content(name, sha256, everyone=False):
        """
        C{(entry, [(node, address), ...])} for C{name}: the holders that can
        send it (live nodes other than this one), or with C{everyone} all
        nodes the index names; None if nobody holds it (leader only).
        """

    def nextRelay(count):
        """
        Where in a list of C{count} holders the next relay starts, so that
        relays are spread over the holders.
        """

    def localEntry(name):
        """
        This node's own L{FileEntry} for C{name}, or None.
        """

    def openShared(entry, offset):
        """
        Open this node's copy of C{entry} at C{offset} for reading; raise
        L{P2PError}.
        """

    def openUpstream(address):
        """
        Connect to the node at C{address} as a request connection; fire with
        a L{p2pfiles.client.ClientConnection}.
        """

    def fetch(name, overwrite):
        """
        Download C{name} into this node's share; fire with the C{fetched}
        reply, or fail with L{P2PError}.  Concurrent fetches of one name
        share one download.
        """

    def indexSince(incarnation, since):
        """
        This node's L{p2pfiles.indexstream.Changes} since change C{since}
        of C{incarnation} (all of it if that is not its own); a Deferred.
        """

    def fetchProgress(name):
        """
        C{(bytes, size)} of the fetch of C{name} so far.
        """

    def transferStarted(session, what, name, peer, size):
        """
        A transfer began on C{session}; return a callable to report its
        end with the number of bytes or a L{Failure}.
        """


# Rows per listing frame: small frames (some 4 KB) keep what a reader that
# does not read leaves in this node's buffers small: the transport pauses
# the listing once it holds its threshold (4 KiB on an accepted
# connection, see p2pfiles.tls), plus the frames being gathered.
LISTING_ROWS_PER_FRAME = 25


def encodeListing(files: Iterable[Dict[str, Any]]) -> List[bytes]:
    """
    The C{ls} answer for C{files}: the encoded C{listing} frames, the last
    one marked, ready to be sent to any number of readers.  C{files} is
    read as it goes (a generator of rows costs one frame's rows at a time).
    """
    rows = iter(files)
    frames: List[bytes] = []
    held: List[Dict[str, Any]] = []
    while True:
        chunk = list(islice(rows, LISTING_ROWS_PER_FRAME))
        parts = splitListing(chunk, count=LISTING_ROWS_PER_FRAME) if chunk else []
        if held and parts:
            frames.append(encode(Message("listing", files=held, last=False)))
        if not parts:
            frames.append(encode(Message("listing", files=held, last=True)))
            return frames
        for part in parts[:-1]:
            frames.append(encode(Message("listing", files=part, last=False)))
        held = parts[-1]


@implementer(IPushProducer)
class ListingSender:
    """
    Send a listing, as frames already encoded (L{encodeListing}), on
    C{connection}, registered as a streaming producer: frames are written
    until the transport pauses it (its buffer is full), and resume when it
    asks, so that a reader that does not read stops the listing instead of
    growing this node's memory.  The frames are shared: a paused sender
    holds its place in them, not a copy.

    @ivar done: fires with the number of frames sent, or fails if the
        connection went away first.
    """

    def __init__(self, connection: Any, frames: Sequence[bytes]) -> None:
        self.connection = connection
        self.frames = 0
        self.paused = False
        self.done: Deferred = Deferred()
        self._parts = frames

    def start(self) -> Deferred:
        self.connection.transport.registerProducer(self, True)
        self.resumeProducing()
        return self.done

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done.called:
            last = self.frames == len(self._parts) - 1
            self.connection.sendEncoded(self._parts[self.frames])
            self.frames += 1
            if last:
                self.connection.transport.unregisterProducer()
                self.done.callback(self.frames)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.errback(P2PError(f"connection lost after {self.frames} listing frames", "gone"))


@implementer(IPushProducer)
class StatusWatch:
    """
    A status watch as its transport sees it: a streaming producer, paused
    while the reader does not read.  Only the latest status is kept back
    then (and while the watch has given the transport to another answer),
    so a reader that never reads costs one status, not a queue of them.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.paused = False
        self.attached = False
        self.held: Optional[Dict[str, Any]] = None

    def changed(self, status: Dict[str, Any]) -> None:
        self.held = status
        self.flush()

    def flush(self) -> None:
        if self.held is not None and self.attached and not self.paused:
            status, self.held = self.held, None
            self.connection.sendMessage(Message("state", status=status))

    def attach(self) -> None:
        """
        Take the transport (register as its producer) and send what is held.
        """
        if not self.attached:
            self.attached = True
            self.connection.transport.registerProducer(self, True)
            self.flush()

    def detach(self) -> None:
        """
        Give the transport up to another producer; changes are held.
        """
        if self.attached:
            self.attached = False
            if self.connection.transport is not None:
                self.connection.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.flush()

    def stopProducing(self) -> None:
        self.paused = True
        self.attached = False


@implementer(IConnectionHandler)
class RequestSession:
    """
    The handler of one authenticated request connection.
    """

    log = Logger()

    def __init__(self, context: IRequestContext, idleTimeout: Optional[float] = None) -> None:
        """
        @param idleTimeout: seconds an authenticated connection may stay
            with no request in flight (idle, not watching, nothing sent or
            fetched) before it is closed; None to keep it open for good.
        """
        self.context = context
        self.idleTimeout = idleTimeout
        self._idleTimer: Any = None
        self._lastActive = 0.0
        self.state = IDLE
        self.connection: Optional[P2PProtocol] = None
        self._stopWatching: Optional[Callable[[], None]] = None
        self._transfer: Any = None
        self._pending: Optional[Deferred] = None
        self._relayCount = 0
        self._watch: Optional[StatusWatch] = None
        self.handlers: Dict[str, Callable[[Message], None]] = {
            "status": self.status,
            "ls": self.ls,
            "lookup": self.lookup,
            "get": self.get,
            "fetch": self.fetch,
            "index-since": self.indexSince,
            "error": self.error,
        }

    # IConnectionHandler

    def connectionReady(self, connection: P2PProtocol) -> None:
        self.connection = connection
        if self.idleTimeout is not None:
            self._lastActive = self.context.clock.seconds()
            self._idleTimer = self.context.clock.callLater(self.idleTimeout, self._idleCheck)

    def _busy(self) -> bool:
        """
        True while a request is in flight: a watch, a transfer, an index
        or a listing being sent, a fetch.
        """
        return self.state != IDLE or self._transfer is not None or self._pending is not None

    def _idleCheck(self) -> None:
        self._idleTimer = None
        if self.state == CLOSED or self.connection is None or self.idleTimeout is None:
            return
        now = self.context.clock.seconds()
        if self._busy():
            self._lastActive = now
        idle = now - self._lastActive
        if idle >= self.idleTimeout:
            self.log.info(
                "closing {peer}: no request for {seconds:g} seconds",
                peer=self.connection.describePeer(),
                seconds=idle,
            )
            self.connection.close()
            return
        self._idleTimer = self.context.clock.callLater(self.idleTimeout - idle, self._idleCheck)

    def messageReceived(self, connection: P2PProtocol, message: Message) -> None:
        self._lastActive = self.context.clock.seconds()
        handler = self.handlers.get(message.type)
        if handler is None:
            raise ProtocolViolation(f"{message.type} is not accepted on a request connection")
        if message.type != "error" and self.state == SENDING_LISTING:
            raise ProtocolViolation(f"{message.type} sent while a listing is being sent")
        if message.type != "error" and self.state in (SERVING, RELAYING, SENDING_INDEX):
            # File bytes are on the way: no frame, not even the refusal,
            # may land in them.
            connection.drop(f"{message.type} sent during a transfer", tell=False)
            return
        if message.type != "error" and self.state == FETCHING:
            raise ProtocolViolation(f"{message.type} sent during a transfer")
        if message.type == "get" and self.state == WATCHING:
            raise ProtocolViolation("get on a connection that is watching status")
        handler(message)

    def rawDataReceived(self, connection: P2PProtocol, data: bytes) -> None:
        raise ProtocolViolation("unexpected raw data")

    def rawDataFinished(self, connection: P2PProtocol) -> None:
        pass

    def connectionClosed(self, connection: P2PProtocol, reason: Failure) -> None:
        """
        The one place where a session's resources are let go, in every
        state.
        """
        self.state = CLOSED
        self._watch = None
        timer, self._idleTimer = self._idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._stopWatching is not None:
            stop, self._stopWatching = self._stopWatching, None
            stop()
        transfer, self._transfer = self._transfer, None
        if isinstance(transfer, Relay):
            transfer.downstreamLost()
        elif isinstance(transfer, (FileProducer, IndexSender, ListingSender)):
            transfer.stopProducing()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    # Requests.

    def error(self, message: Message) -> None:
        assert self.connection is not None
        self.log.warn(
            "{peer} reports an error: {reason} ({code})",
            peer=self.connection.describePeer(),
            reason=message.reason,
            code=message.code,
        )

    def status(self, message: Message) -> None:
        self._send(Message("state", status=self.context.status()))
        if message.watch and self._stopWatching is None:
            self.state = WATCHING
            self._watch = StatusWatch(self.connection)
            self._stopWatching = self.context.watchStatus(self._watch.changed)
            self._watch.attach()

    def ls(self, message: Message) -> None:
        if not self.context.isLeader():
            self._redirect()
            return
        assert self.connection is not None
        self._detachWatch()
        self.state = SENDING_LISTING
        sender = ListingSender(self.connection, self.context.listingFrames())
        self._transfer = sender

        def sent(result: Any) -> None:
            self._transfer = None
            if self.state == CLOSED:
                return
            self.state = self._restingState()
            self._attachWatch()
            if isinstance(result, Failure) and not result.check(P2PError):
                self.log.failure("cannot send the listing", result)

        sender.start().addBoth(sent)

    def lookup(self, message: Message) -> None:
        name = message.name
        if not self._nameOk(name):
            return
        if not self.context.isLeader():
            self._redirect()
            return
        found = self.context.content(name, None, everyone=True)
        if found is None:
            self._refuse("not-found", f"not found: {name}")
            return
        entry, holders = found
        self._send(
            Message(
                "found",
                name=name,
                size=entry.size,
                sha256=entry.sha256,
                holders=[node for node, _ in holders],
            )
        )

    def get(self, message: Message) -> None:
        name = message.name
        if not self._nameOk(name):
            return
        assert self.connection is not None and self.connection.peer is not None
        peer = self.connection.peer
        context = self.context
        entry = context.localEntry(name)
        mine = entry is not None and message.sha256 in (None, entry.sha256)
        if mine and (context.isLeader() or peer.role == "node"):
            self._serve(entry, message.offset)
            return
        if not context.isLeader():
            if peer.role == "node" and peer.node == context.leaderId():
                # Our leader relaying from us: it should look elsewhere.
                self._refuse("not-found", f"not found: {name} (node {context.me} does not have it)")
            else:
                self._redirect()
            return
        found = context.content(name, message.sha256)
        if found is None:
            self._refuse("not-found", f"not found: {name}")
            return
        content, holders = found
        if message.offset > content.size:
            self._refuse(
                "bad-offset", f"offset {message.offset} is beyond the size of {name} ({content.size} bytes)"
            )
            return
        self._relay(content, holders, message.offset)

    def fetch(self, message: Message) -> None:
        name = message.name
        if not self._nameOk(name):
            return
        self.state = FETCHING
        self._pending = self.context.fetch(name, message.overwrite)
        ticker = LoopingCall(self._fetchProgress, name)
        ticker.clock = self.context.clock
        ticker.start(PROGRESS_INTERVAL, now=False)

        def stopTicking(result: Any) -> Any:
            if ticker.running:
                ticker.stop()
            return result

        def fetched(reply: Message) -> None:
            self._pending = None
            self.state = self._restingState()
            self._send(reply)

        def failed(reason: Failure) -> None:
            self._pending = None
            if self.state == CLOSED:
                return
            self.state = self._restingState()
            if reason.check(P2PError):
                self._refuse(reason.value.code, str(reason.value))
            else:
                self.log.failure("fetch of {name} failed", reason, name=name)
                self._refuse("internal", f"fetch of {name} failed: {reason.getErrorMessage()}")

        self._pending.addBoth(stopTicking)
        self._pending.addCallbacks(fetched, failed)

    def _fetchProgress(self, name: str) -> None:
        done, size = self.context.fetchProgress(name)
        self._send(Message("progress", name=name, bytes=done, size=size))

    def indexSince(self, message: Message) -> None:
        """
        Send this node's files, or what changed in them, as C{index-delta}
        frames written with back-pressure.
        """
        assert self.connection is not None
        connection = self.connection
        self.state = SENDING_INDEX
        self._pending = self.context.indexSince(message.incarnation, message.since)

        def send(changes: Any) -> Deferred:
            self._pending = None
            self._detachWatch()
            sender = IndexSender(connection, changes)
            self._transfer = sender
            return sender.start()

        def sent(result: Any) -> None:
            self._transfer = None
            self._pending = None
            if self.state == CLOSED:
                return
            self.state = self._restingState()
            self._attachWatch()
            if isinstance(result, Failure) and not result.check(CancelledError):
                if result.check(P2PError) and result.value.code == "gone":
                    # The reader went away: nothing to tell it.
                    return
                if result.check(P2PError):
                    self._refuse(result.value.code, str(result.value))
                else:
                    self.log.failure("cannot send the index", result)
                    self._refuse("internal", "cannot send the index")

        self._pending.addCallback(send).addBoth(sent)

    # Transfers.

    def _serve(self, entry: FileEntry, offset: int) -> None:
        assert self.connection is not None
        try:
            f = self.context.openShared(entry, offset)
        except P2PError as e:
            self._refuse(e.code, str(e))
            return
        connection = self.connection
        leader = self.context.leaderId()
        self._send(
            Message(
                "file",
                name=entry.name,
                size=entry.size,
                sha256=entry.sha256,
                offset=offset,
                holder=self.context.me,
                leader=leader if leader is not None else self.context.me,
            )
        )
        if connection.channel is not None:
            connection.channel.carryBulk(CHUNK_SIZE)
        producer = FileProducer(f, entry.size - offset, connection.transport)
        self._begin(SERVING, producer, "serve", entry.name, entry.size - offset)
        done = producer.start()

        def failed(reason: Failure) -> Failure:
            # Mid-file no frame can say why: close, so that the receiver
            # notices at once and resumes (or the relay fails over).
            if not (reason.check(P2PError) and reason.value.code == "gone"):
                connection.abort()
            return reason

        done.addErrback(failed)
        self._track(done)

    def _relay(self, content: FileEntry, holders: List[Any], offset: int) -> None:
        assert self.connection is not None
        # Spread relays over the holders.
        start = self.context.nextRelay(len(holders))
        relay = Relay(
            self.connection,
            content.name,
            content.sha256,
            content.size,
            offset,
            holders[start:] + holders[:start],
            self.context.openUpstream,
            self.context.me,
            clock=self.context.clock,
        )
        self._begin(RELAYING, relay, "relay", content.name, content.size - offset)
        self._track(relay.start())

    def _begin(self, state: str, transfer: Any, direction: str, name: str, size: int) -> None:
        assert self.connection is not None
        self.state = state
        self._transfer = transfer
        self._ended = self.context.transferStarted(self, direction, name, self.connection.describePeer(), size)

    def _track(self, done: Deferred) -> None:
        def ended(result: Any) -> None:
            # Reported first: whoever records the end reads progress().
            self._ended(result)
            self._transfer = None
            if self.state != CLOSED:
                self.state = self._restingState()

        done.addBoth(ended)

    def _detachWatch(self) -> None:
        # The transport takes one producer: a watch gives way to a sender.
        if self._watch is not None:
            self._watch.detach()

    def _attachWatch(self) -> None:
        if self._watch is not None and self.state != CLOSED:
            self._watch.attach()

    def _restingState(self) -> str:
        """
        Where a session returns when a request is done: still watching if
        it watches.  The idle timeout counts from here.
        """
        self._lastActive = self.context.clock.seconds()
        return WATCHING if self._stopWatching is not None else IDLE

    def progress(self) -> int:
        """
        Bytes moved so far by the transfer in flight (0 if none).
        """
        transfer = self._transfer
        if isinstance(transfer, Relay):
            return transfer.relayed
        if isinstance(transfer, FileProducer):
            return transfer.sent
        return 0

    # Answers.

    def _send(self, message: Message) -> None:
        if self.connection is not None and self.state != CLOSED:
            self.connection.sendMessage(message)

    def _refuse(self, code: str, reason: str) -> None:
        if self.connection is not None and self.state != CLOSED:
            self.connection.sendError(code, reason)

    def _nameOk(self, name: str) -> bool:
        problem = nameProblem(name)
        if problem is not None:
            self._refuse("bad-name", f"bad file name {name!r}: {problem}")
            return False
        return True

    def _redirect(self) -> None:
        """
        Point the client at the leader, or tell it there is none right now.
        """
        leader = self.context.leaderId()
        address = self.context.leaderAddress()
        if leader is None or address is None:
            self._refuse("no-leader", "no leader elected right now; try again shortly")
        else:
            self._send(Message("redirect", leader=leader, address=address))
