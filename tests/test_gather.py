"""
Tests for L{p2pfiles.gather}: the cluster index kept by the leader and the
standby, brought up to date by sequence numbers.

L{IndexKeeper} opens request connections through a callable; here each one
is a L{FakeUpstream} whose answers the test gives by hand, the clock is a
L{Clock}, threads run synchronously and C{peer_files.log} is a real file in
a temporary directory.  No socket, no real second.
"""

from typing import Dict, List

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.errors import P2PError
from p2pfiles import gather, indexstream
from p2pfiles.gather import FIRST_WRITE_HOLD, GATHER_TIMEOUT, IndexKeeper
from p2pfiles.index import parseLog
from p2pfiles.wire import FileEntry, Message, decode, encode

ME = 1
MY_ADDRESS = "127.0.0.1:9001"
ADDRESSES = {n: f"127.0.0.1:{9000 + n}" for n in range(2, 10)}
MIN_INTERVAL = 0.25


def entry(name: str, digest: str = "a", size: int = 10, mtime: float = 1.5) -> FileEntry:
    return FileEntry(name, size, mtime, digest * 64)


def members(*ids: int) -> Dict[int, str]:
    return {n: ADDRESSES[n] for n in ids}


def syncThread(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeUpstream:
    """
    A request connection to one member: records what the keeper sends and
    hands it the replies the test gives.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent: List[Message] = []
        self.waiting: List[defer.Deferred] = []
        self.closed = False

    def send(self, message: Message) -> None:
        self.sent.append(decode(encode(message)))

    def receive(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        return d

    def answer(self, incarnation: str, seq: int, full: bool, entries=(), removed=(), last: bool = True) -> None:
        reply = decode(
            encode(
                Message(
                    "index-delta",
                    incarnation=incarnation,
                    seq=seq,
                    full=full,
                    entries=list(entries),
                    removed=list(removed),
                    last=last,
                )
            )
        )
        self.waiting.pop(0).callback(reply)

    def close(self) -> None:
        self.closed = True


class Network:
    """
    The keeper's way to open request connections: each open is a Deferred
    the test completes with a L{FakeUpstream} (or fails).
    """

    def __init__(self) -> None:
        self.opening: List[tuple] = []
        self.upstreams: Dict[str, List[FakeUpstream]] = {}

    def open(self, address: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.opening.append((address, d))
        return d

    def connect(self, member: int) -> FakeUpstream:
        """
        Complete the oldest pending open to C{member}.
        """
        address = ADDRESSES[member]
        for i, (a, d) in enumerate(self.opening):
            if a == address:
                del self.opening[i]
                upstream = FakeUpstream(address)
                self.upstreams.setdefault(address, []).append(upstream)
                d.callback(upstream)
                return upstream
        raise AssertionError(f"no connection being opened to node {member}")

    def pending(self, member: int) -> int:
        return sum(1 for a, _ in self.opening if a == ADDRESSES[member])


class KeeperCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = Network()
        self.state = FilePath(self.mktemp())
        self.state.makedirs()
        self.logPath = self.state.child("peer_files.log")
        self.keeper = IndexKeeper(ME, MY_ADDRESS, self.logPath, self.clock, syncThread, self.network.open)

    def tearDown(self) -> None:
        d = self.keeper.stop()
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def names(self, member: int) -> List[str]:
        return sorted(e.name for n, _, e in self.keeper.index.entries() if n == member)

    def request(self, upstream: FakeUpstream) -> Message:
        [message] = [m for m in upstream.sent if m.type == "index-since"]
        return message


class LeadTests(KeeperCase):
    """
    A new leader asks each live member for what it lacks.
    """

    def test_firstLeadAsksEveryMemberForEverything(self) -> None:
        """
        Knowing nothing yet, the keeper asks each live member for all of
        its files (no incarnation, since 0), on a request connection of its
        own, and its own files are in the index at once.
        """
        self.keeper.lead(3, [entry("mine")], members(2, 3))
        self.assertEqual(self.names(ME), ["mine"])
        for member in (2, 3):
            upstream = self.network.connect(member)
            request = self.request(upstream)
            self.assertEqual((request.incarnation, request.since), (None, 0))

    def test_leadFiresOnceAllAnswered(self) -> None:
        """
        C{lead} fires with the members gathered once each answered, and the
        log is written then, before the hold runs out.
        """
        d = self.keeper.lead(3, [], members(2, 3))
        a = self.network.connect(2)
        b = self.network.connect(3)
        a.answer("i2", 4, True, [entry("a")])
        self.assertNoResult(d)
        b.answer("i3", 9, True, [entry("b"), entry("c")], last=False)
        self.assertNoResult(d)
        b.answer("i3", 9, True, [entry("d")])
        self.assertEqual(self.successResultOf(d), [2, 3])
        self.assertEqual(self.names(3), ["b", "c", "d"])
        self.assertTrue(a.closed and b.closed)
        self.clock.advance(MIN_INTERVAL)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual((header["epoch"], header["files"]), (3, 4))

    def test_unreachableMemberDoesNotHoldUpTheOthers(self) -> None:
        """
        A member that cannot be reached counts as not gathered; the others'
        files are in, and the next reconcile asks it again.
        """
        d = self.keeper.lead(3, [], members(2, 3))
        self.network.connect(2).answer("i2", 1, True, [entry("a")])
        [(address, opening)] = [(a, o) for a, o in self.network.opening if a == ADDRESSES[3]]
        self.network.opening.remove((address, opening))
        with capturedLogs() as events:
            opening.errback(P2PError("cannot connect", "unreachable"))
        self.assertEqual(self.successResultOf(d), [2])
        self.assertIn("could not get node 3's files: cannot connect", [formatEvent(e) for e in events])
        self.keeper.reconcile(members(2, 3))
        self.assertEqual(self.network.pending(3), 1)
        self.assertEqual(self.network.pending(2), 0)

    def test_silentMemberTimesOut(self) -> None:
        """
        A member that stops sending its list for longer than the gather
        timeout is given up on for now (and asked again later).
        """
        d = self.keeper.lead(3, [], members(2))
        upstream = self.network.connect(2)
        upstream.answer("i2", 5, True, [entry("a")], last=False)
        self.clock.advance(GATHER_TIMEOUT - 0.1)
        self.assertNoResult(d)
        with capturedLogs():
            self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), [])
        self.assertTrue(upstream.closed)
        self.assertFalse(self.keeper.index.hasNode(2))

    def test_badNamesAreDropped(self) -> None:
        """
        Entries whose names no node would accept never enter the index.
        """
        self.keeper.lead(3, [], members(2))
        with capturedLogs() as events:
            self.network.connect(2).answer("i2", 1, True, [entry("good"), entry(".hidden"), entry("a/b")])
        self.assertEqual(self.names(2), ["good"])
        self.assertTrue(any("2 entries with unacceptable names" in formatEvent(e) for e in events))

    def test_entriesOutOfOrderAreDropped(self) -> None:
        """
        A full list comes in name order (members send it so); an entry out
        of that order, or a name again, is dropped and counted in the one
        warning, and the rest is packed whole.
        """
        self.keeper.lead(3, [], members(2))
        upstream = self.network.connect(2)
        with capturedLogs() as events:
            upstream.answer("i2", 1, True, [entry("b"), entry("d"), entry("c"), entry("d", "b"), entry("e")], last=False)
            upstream.answer("i2", 1, True, [entry("a"), entry("f")])
        self.assertEqual(self.names(2), ["b", "d", "e", "f"])
        self.assertEqual(self.keeper.index.nodeFiles(2).changeCount, 0)
        self.assertEqual(self.keeper.index.holders("d")[0][2], entry("d"))
        self.assertTrue(any("ignored 3 entries" in formatEvent(e) and "out of name order" in formatEvent(e) for e in events))

    def test_listLargerThanTheCapIsRefused(self) -> None:
        """
        A member listing more files than the cap is refused with one line,
        and nothing of that list enters the index.
        """
        keeper = IndexKeeper(ME, MY_ADDRESS, self.logPath, self.clock, syncThread, self.network.open, maxEntries=2)
        self.addCleanup(lambda: self.successResultOf(keeper.stop()))
        keeper.lead(3, [], members(2))
        with capturedLogs() as events:
            self.network.connect(2).answer("i2", 1, True, [entry("a"), entry("b"), entry("c")])
        self.assertFalse(keeper.index.hasNode(2))
        self.assertTrue(any("more than 2 files" in formatEvent(e) for e in events))


class OwnFilesTests(KeeperCase):
    """
    A node that leads before its own first scan is done holds its first log
    for its own files.
    """

    def test_firstLogWaitsForOwnFiles(self) -> None:
        """
        Until its own files are listed, a new leader writes no log, however
        long past C{FIRST_WRITE_HOLD}; once they are, and the gather is
        done, it writes one complete log, once.
        """
        self.keeper.awaitOwnFiles()
        self.keeper.lead(3, [], members(2))
        self.network.connect(2).answer("i2", 7, True, [entry("a"), entry("b")])
        self.clock.advance(FIRST_WRITE_HOLD * 5)
        self.assertFalse(self.logPath.exists())
        self.keeper.ownListed([entry("mine")])
        self.clock.advance(0)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual((header["epoch"], header["files"], header["nodes"]), (3, 3, 2))
        self.assertEqual(self.keeper.writer.writes, 1)

    def test_holdCountsFromOwnFiles(self) -> None:
        """
        With a member that does not answer, the first log is written
        C{FIRST_WRITE_HOLD} after the own files are listed.
        """
        self.keeper.awaitOwnFiles()
        self.keeper.lead(3, [], members(2))
        self.network.connect(2)
        self.clock.advance(2)
        self.keeper.ownListed([entry("mine")])
        self.clock.advance(FIRST_WRITE_HOLD - 0.01)
        self.assertFalse(self.logPath.exists())
        self.clock.advance(0.01)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual(header["files"], 1)


class DeltaTests(KeeperCase):
    """
    Once it holds a member's files, the keeper only asks for changes.
    """

    def gathered(self) -> None:
        self.keeper.lead(3, [], members(2))
        self.network.connect(2).answer("i2", 7, True, [entry("a"), entry("b")])

    def test_noticeAsksOnlyForTheChange(self) -> None:
        """
        An C{index-changed} notice with a newer change number makes the
        keeper ask for the changes since the number it holds, and apply
        them: changed entries replace, removed names go.
        """
        self.gathered()
        self.keeper.noticed(2, "i2", 9)
        upstream = self.network.connect(2)
        request = self.request(upstream)
        self.assertEqual((request.incarnation, request.since), ("i2", 7))
        upstream.answer("i2", 9, False, [entry("c"), entry("a", digest="b")], ["b"])
        self.assertEqual(self.names(2), ["a", "c"])
        [(_, _, a)] = self.keeper.index.holders("a")
        self.assertEqual(a.sha256, "b" * 64)

    def test_noticeOfWhatIsHeldAsksNothing(self) -> None:
        """
        A notice of a change number the keeper already holds asks nothing.
        """
        self.gathered()
        self.keeper.noticed(2, "i2", 7)
        self.assertEqual(self.network.pending(2), 0)

    def test_newIncarnationGetsEverything(self) -> None:
        """
        A member that restarted (a new incarnation) is asked with the old
        incarnation and answers in full; its list replaces the old one.
        """
        self.gathered()
        self.keeper.noticed(2, "j2", 1)
        upstream = self.network.connect(2)
        self.assertEqual(self.request(upstream).incarnation, "i2")
        upstream.answer("j2", 1, True, [entry("z")])
        self.assertEqual(self.names(2), ["z"])
        self.assertEqual(self.network.pending(2), 0)

    def test_noticeDuringAPullAsksAgainAfterIt(self) -> None:
        """
        Changes announced while a pull is under way are asked for right
        after it, never by a second pull at the same time.
        """
        self.gathered()
        self.keeper.noticed(2, "i2", 8)
        first = self.network.connect(2)
        self.keeper.noticed(2, "i2", 9)
        self.assertEqual(self.network.pending(2), 0)
        first.answer("i2", 8, False, [entry("c")])
        second = self.network.connect(2)
        self.assertEqual(self.request(second).since, 8)
        second.answer("i2", 9, False, [entry("d")])
        self.assertEqual(self.names(2), ["a", "b", "c", "d"])

    def test_lostLinkAsksWhatChanged(self) -> None:
        """
        A control link that closed may have taken a notice with it: the
        keeper asks what changed since what it holds.
        """
        self.gathered()
        self.keeper.lost(2)
        upstream = self.network.connect(2)
        self.assertEqual(self.request(upstream).since, 7)
        upstream.answer("i2", 7, False)
        self.assertEqual(self.names(2), ["a", "b"])
        self.assertEqual(self.network.pending(2), 0, "nothing changed: asked once")


class FailoverTests(KeeperCase):
    """
    A keeper keeps what it knows across a change of role.
    """

    def test_standbyTakingOverFetchesOnlyTheDelta(self) -> None:
        """
        A standby that gathered a member's files, on becoming leader, asks
        only for what changed since, and its first log is complete as soon
        as that small answer is in.
        """
        self.keeper.standBy([entry("mine")], members(2))
        self.network.connect(2).answer("i2", 50, True, [entry(f"f{i:04d}") for i in range(1000)])
        self.assertFalse(self.logPath.exists())
        d = self.keeper.lead(4, [entry("mine")], members(2))
        self.assertEqual(self.network.pending(2), 0, "nothing new was announced: nothing to ask")
        self.assertEqual(self.successResultOf(d), [])
        self.clock.advance(MIN_INTERVAL)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual((header["epoch"], header["files"]), (4, 1001))

    def test_largeDeltaAppliedInAThread(self) -> None:
        """
        A delta of more than L{indexstream.LARGE_DELTA} names is checked and
        applied to the keeper's copy in a thread, not on the reactor; bad
        names are left out and counted; the copy kept beside it is not
        touched.
        """
        self.patch(indexstream, "LARGE_DELTA", 2)
        threaded: list = []

        def runInThread(f, *args):
            threaded.append(f.__name__)
            return syncThread(f, *args)

        keeper = IndexKeeper(ME, MY_ADDRESS, self.logPath, self.clock, runInThread, self.network.open)
        self.addCleanup(lambda: self.successResultOf(keeper.stop()))
        keeper.lead(3, [], members(2))
        self.network.connect(2).answer("i2", 5, True, [entry("a"), entry("b"), entry("c")])
        before = keeper.index.nodeFiles(2)
        self.assertNotIn("deltaApplied", threaded)
        keeper.noticed(2, "i2", 6)
        with capturedLogs() as events:
            self.network.connect(2).answer("i2", 6, False, [entry("b", "b"), entry("d"), entry(".bad")], ["a"])
        self.assertEqual(threaded.count("deltaApplied"), 1)
        self.assertEqual(sorted(keeper.index.nodeFiles(2)), ["b", "c", "d"])
        self.assertEqual(keeper.index.holders("b")[0][2], entry("b", "b"))
        self.assertEqual(sorted(before), ["a", "b", "c"])
        self.assertTrue(any("ignored 1 entries" in formatEvent(e) for e in events))
        # A small one is applied on the reactor, as before.
        keeper.noticed(2, "i2", 7)
        self.network.connect(2).answer("i2", 7, False, [entry("e")], [])
        self.assertEqual((threaded.count("deltaApplied"), sorted(keeper.index.nodeFiles(2))), (1, ["b", "c", "d", "e"]))

    def test_resignKeepsTheIndex(self) -> None:
        """
        A leader that resigns stops writing the log but keeps the index, so
        that leading again starts from it.
        """
        self.keeper.lead(3, [], members(2))
        self.network.connect(2).answer("i2", 5, True, [entry("a")])
        self.keeper.resign()
        self.assertIsNone(self.keeper.epoch)
        self.assertEqual(self.names(2), ["a"])
        self.keeper.idle()
        self.keeper.noticed(2, "i2", 6)
        self.assertEqual(self.network.pending(2), 0, "an idle keeper asks nothing")
        self.keeper.lead(5, [], members(2))
        upstream = self.network.connect(2)
        self.assertEqual(self.request(upstream).since, 5)

    def test_departedMemberLeavesTheIndex(self) -> None:
        """
        A member that is no longer live leaves the index (its pull, if any,
        is cancelled); coming back it is gathered afresh.
        """
        self.keeper.lead(3, [], members(2, 3))
        self.network.connect(2).answer("i2", 5, True, [entry("a")])
        third = self.network.connect(3)
        self.keeper.reconcile(members(2))
        self.assertFalse(self.keeper.index.hasNode(3))
        self.assertTrue(third.closed)
        self.keeper.reconcile(members(2, 3))
        self.assertEqual(self.request(self.network.connect(3)).incarnation, None)


class StopTests(KeeperCase):
    """
    Stopping leaves nothing behind.
    """

    def test_stopCancelsPulls(self) -> None:
        """
        Pulls under way are cancelled and their connections closed.
        """
        self.keeper.lead(3, [], members(2))
        upstream = self.network.connect(2)
        d = self.keeper.stop()
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertTrue(upstream.closed)


class KeptViewTests(KeeperCase):
    """
    The keeper writes its copies when it stops and reads them back when it
    starts, and keeps the copy of a member that left: a member that kept
    its incarnation is then asked only what changed.
    """

    def setUp(self) -> None:
        super().setUp()
        self.viewPath = self.state.child("keeper.view")
        self.keeper = self.makeKeeper()

    def makeKeeper(self, runInThread=syncThread) -> IndexKeeper:
        return IndexKeeper(ME, MY_ADDRESS, self.logPath, self.clock, runInThread, self.network.open, viewPath=self.viewPath)

    def gatherAndStop(self) -> None:
        """
        Lead, gather members 2 (two files) and 3 (1000 files), stop.
        """
        self.successResultOf(self.keeper.start())
        self.keeper.lead(3, [entry("mine")], members(2, 3))
        self.network.connect(2).answer("i2", 7, True, [entry("a"), entry("b")])
        self.network.connect(3).answer("i3", 4, True, [entry(f"f{i:04d}") for i in range(1000)])
        d = self.keeper.stop()
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertTrue(self.viewPath.exists())
        self.logPath.remove()

    def test_restartAsksOnlyForTheDelta(self) -> None:
        """
        A keeper started over the view file of the last stop asks each
        member what changed since the change it held; empty answers make
        the first log complete, with every member's files.
        """
        self.gatherAndStop()
        self.keeper = self.makeKeeper()
        self.successResultOf(self.keeper.start())
        d = self.keeper.lead(5, [entry("mine")], members(2, 3))
        two, three = self.network.connect(2), self.network.connect(3)
        self.assertEqual((self.request(two).incarnation, self.request(two).since), ("i2", 7))
        self.assertEqual((self.request(three).incarnation, self.request(three).since), ("i3", 4))
        self.assertEqual(self.keeper.index.nodes(), [ME], "a copy enters the index only once confirmed")
        two.answer("i2", 8, False, [entry("c")], ["a"])
        three.answer("i3", 4, False)
        self.assertEqual(self.successResultOf(d), [2, 3])
        self.assertEqual(self.names(2), ["b", "c"])
        self.assertEqual(len(self.names(3)), 1000)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual((header["epoch"], header["files"]), (5, 1003))

    def test_copyOfAnotherIncarnationReplaced(self) -> None:
        """
        A member that restarted with a new incarnation answers in full; its
        old copy never reaches the index.
        """
        self.gatherAndStop()
        self.keeper = self.makeKeeper()
        self.successResultOf(self.keeper.start())
        self.keeper.lead(5, [], members(2))
        self.network.connect(2).answer("j2", 1, True, [entry("z")])
        self.assertEqual(self.names(2), ["z"])

    def test_leadWaitsForTheLoad(self) -> None:
        """
        Leading before the copies are read asks nobody until they are, then
        asks for the delta.
        """
        self.gatherAndStop()
        calls: list = []

        def runInThread(f, *args):
            d = defer.Deferred()
            calls.append((f, args, d))
            return d

        self.keeper = self.makeKeeper(runInThread)
        started = self.keeper.start()
        d = self.keeper.lead(5, [], members(2))
        self.keeper.reconcile(members(2))
        self.assertEqual(self.network.pending(2), 0)
        self.assertNoResult(d)
        f, args, loading = calls.pop(0)
        loading.callback(f(*args))
        self.successResultOf(started)
        upstream = self.network.connect(2)
        self.assertEqual(self.request(upstream).since, 7)
        self.assertEqual(self.network.pending(2), 0, "asked once")
        upstream.answer("i2", 7, False)
        self.assertEqual(self.successResultOf(d), [2])
        stopped = self.keeper.stop()
        self.clock.advance(10)
        while calls:
            f, args, running = calls.pop(0)
            running.callback(f(*args))
        self.successResultOf(stopped)
        self.keeper = self.makeKeeper()

    def test_unusableViewIgnored(self) -> None:
        """
        A view file that is corrupt, cut short, of another format or of
        another node is ignored with one warning: everything is asked for.
        """
        self.gatherAndStop()
        good = self.viewPath.getContent()
        for data in [good[:-1] + bytes([good[-1] ^ 1]), good[: len(good) // 2], b"something else\n", b""]:
            self.viewPath.setContent(data)
            keeper = self.makeKeeper()
            with capturedLogs() as events:
                self.successResultOf(keeper.start())
            warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
            self.assertEqual(len(warnings), 1, warnings)
            self.assertIn("keeper.view", warnings[0])
            keeper.lead(5, [], members(2))
            self.assertIsNone(self.request(self.network.connect(2)).incarnation)
            self.successResultOf(keeper.stop())
        other = IndexKeeper(ME + 1, MY_ADDRESS, self.logPath, self.clock, syncThread, self.network.open, viewPath=self.viewPath)
        self.viewPath.setContent(good)
        with capturedLogs() as events:
            self.successResultOf(other.start())
        self.assertTrue(any("not by this node" in formatEvent(e) for e in events))
        self.assertEqual(other.departed, {})

    def test_departedMemberComesBackWithItsIncarnation(self) -> None:
        """
        The copy of a member that left is kept: when it is live again at the
        same address, it is asked only what changed since.
        """
        self.successResultOf(self.keeper.start())
        self.keeper.lead(3, [], members(2))
        self.network.connect(2).answer("i2", 7, True, [entry("a")])
        self.keeper.reconcile({})
        self.assertFalse(self.keeper.index.hasNode(2))
        self.keeper.reconcile(members(2))
        upstream = self.network.connect(2)
        self.assertEqual((self.request(upstream).incarnation, self.request(upstream).since), ("i2", 7))
        upstream.answer("i2", 7, False)
        self.assertEqual(self.names(2), ["a"])


class OwnCopyTests(KeeperCase):
    """
    The keeper keeps this node's own files in its view with their change
    numbers; after a restart they stand in for the first scan when the
    local index vouches for exactly that change.
    """

    def setUp(self) -> None:
        super().setUp()
        self.viewPath = self.state.child("keeper.view")
        self.numbers = ("0123456789abcdef", 5)
        self.keeper = self.makeKeeper()

    def makeKeeper(self) -> IndexKeeper:
        return IndexKeeper(
            ME, MY_ADDRESS, self.logPath, self.clock, syncThread, self.network.open,
            viewPath=self.viewPath, ownNumbers=lambda: self.numbers,
        )

    def restarted(self) -> IndexKeeper:
        """
        Lead with own files and member 2's, stop, and start a new keeper
        whose own first scan is not done.
        """
        self.successResultOf(self.keeper.start())
        self.keeper.lead(3, [entry("mine"), entry("mine2")], members(2))
        self.network.connect(2).answer("i2", 7, True, [entry("a")])
        d = self.keeper.stop()
        self.clock.advance(10)
        self.successResultOf(d)
        self.logPath.remove()
        self.keeper = self.makeKeeper()
        self.keeper.awaitOwnFiles()
        self.successResultOf(self.keeper.start())
        return self.keeper

    def test_vouchedOwnFilesStandIn(self) -> None:
        """
        When the local index vouches for the change the view kept, the kept
        own files make the first log complete before the first scan; the
        scan's list then replaces them.
        """
        keeper = self.restarted()
        self.successResultOf(keeper.ownVouched(self.numbers))
        keeper.lead(4, [], members(2))
        self.network.connect(2).answer("i2", 7, False)
        self.clock.advance(0)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual((header["epoch"], header["files"]), (4, 3))
        keeper.ownListed([entry("mine"), entry("mine3")])
        self.clock.advance(1)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual(sorted(r["name"] for r in rows), ["a", "mine", "mine3"])

    def test_standInKeptAcrossAnotherRestart(self) -> None:
        """
        A keeper stopped while its kept own files still stand in (its scan
        never listed them) keeps them, at the same change, for the next
        start.
        """
        keeper = self.restarted()
        self.successResultOf(keeper.ownVouched(self.numbers))
        d = keeper.stop()
        self.clock.advance(10)
        self.successResultOf(d)
        self.keeper = self.makeKeeper()
        self.keeper.awaitOwnFiles()
        self.successResultOf(self.keeper.start())
        with capturedLogs() as events:
            self.successResultOf(self.keeper.ownVouched(self.numbers))
        self.assertTrue(any("standing in for this node's files: 2" in formatEvent(e) for e in events))

    def noStandIn(self, numbers) -> None:
        keeper = self.restarted()
        self.successResultOf(keeper.ownVouched(numbers))
        keeper.lead(4, [], members(2))
        self.network.connect(2).answer("i2", 7, False)
        self.clock.advance(5)
        self.assertFalse(self.logPath.exists())
        keeper.ownListed([entry("mine")])
        self.clock.advance(0)
        header, rows = parseLog(self.logPath.getContent())
        self.assertEqual(header["files"], 2)

    def test_otherChangeDoesNotStandIn(self) -> None:
        """
        A local index vouching for another change leaves the first log
        waiting for the scan.
        """
        self.noStandIn(("0123456789abcdef", 6))

    def test_nothingVouchedDoesNotStandIn(self) -> None:
        """
        A local index that vouches for nothing leaves the first log waiting
        for the scan.
        """
        self.noStandIn(None)

    def test_staleOwnCopyNotKept(self) -> None:
        """
        Own changes missed while not gathering make the own copy stale: it
        is not written, and nothing stands in after the restart.
        """
        self.successResultOf(self.keeper.start())
        self.keeper.lead(3, [entry("mine")], members(2))
        self.network.connect(2).answer("i2", 7, True, [entry("a")])
        self.keeper.idle()
        self.keeper.ownChanges([entry("new")], [])
        self.numbers = ("0123456789abcdef", 6)
        d = self.keeper.stop()
        self.clock.advance(10)
        self.successResultOf(d)
        self.keeper = self.makeKeeper()
        self.keeper.awaitOwnFiles()
        with capturedLogs() as events:
            self.successResultOf(self.keeper.start())
            self.successResultOf(self.keeper.ownVouched(self.numbers))
        self.assertFalse(any("standing in" in formatEvent(e) for e in events))


class OwnPackingTests(SynchronousTestCase):
    """
    The first scan's list is packed in a thread, not on the reactor.
    """

    def setUp(self) -> None:
        # Every call to runInThread, held until the test fires it.
        self.calls: list = []
        self.state = FilePath(self.mktemp())
        self.state.makedirs()

    def runInThread(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def keeper(self, clock: Clock) -> IndexKeeper:
        return IndexKeeper(ME, MY_ADDRESS, self.state.child("peer_files.log"), clock, self.runInThread, Network().open)

    def test_changesWaitForThePackedList(self) -> None:
        """
        The own list is packed by C{runInThread}; own changes meanwhile are
        applied after it, in order; a later lead does not pack the list
        again.
        """
        keeper = self.keeper(Clock())
        keeper.awaitOwnFiles()
        keeper.standBy([], {})
        listed = keeper.ownListed([entry("a"), entry("b")])
        keeper.ownChanges([entry("c")], ["a"])
        self.assertEqual(dict(keeper.index.nodeFiles(ME)), {})
        [(f, args, d)] = self.calls
        self.assertEqual(f.__name__, "packFiles")
        d.callback(f(*args))
        self.successResultOf(listed)
        self.assertEqual(sorted(keeper.index.nodeFiles(ME)), ["b", "c"])
        keeper.lead(2, [entry("stale")], {})
        self.assertEqual(sorted(keeper.index.nodeFiles(ME)), ["b", "c"], "current: not replaced")

    def test_longOwnListPackedInAThread(self) -> None:
        """
        A long own list handed to C{lead} (or C{standBy}) is packed in a
        thread too: own changes wait for it and the log is not written
        without it; if the scan's list comes meanwhile, that one wins.
        """
        self.patch(gather, "PACK_HERE", 1)
        calls = self.calls
        clock = Clock()
        keeper = self.keeper(clock)
        keeper.lead(1, [entry("a"), entry("b")], {})
        keeper.ownChanges([entry("c")], ["a"])
        clock.advance(10)
        self.assertFalse(keeper.index.hasNode(ME))
        self.assertEqual([f.__name__ for f, args, d in calls], ["packFiles"])
        f, args, d = calls.pop()
        d.callback(f(*args))
        self.assertEqual(sorted(keeper.index.nodeFiles(ME)), ["b", "c"])
        self.assertTrue(all(f.__name__ != "packFiles" for f, args, d in calls))
        keeper.resign()

        # Superseded: the scan's list arrives while the lead's is packed.
        calls.clear()
        other = self.keeper(clock)
        other.awaitOwnFiles()
        other.standBy([entry("old1"), entry("old2")], {})
        listed = other.ownListed([entry("new")])
        packing = [(f, args, d) for f, args, d in calls if f.__name__ == "packFiles"]
        self.assertEqual(len(packing), 2)
        (f2, args2, d2) = packing[1]
        d2.callback(f2(*args2))
        self.successResultOf(listed)
        (f1, args1, d1) = packing[0]
        d1.callback(f1(*args1))
        self.assertEqual(sorted(other.index.nodeFiles(ME)), ["new"])
