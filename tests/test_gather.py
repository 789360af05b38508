"""
Tests for L{p2pfiles.gather}: the leader's side of the index.

L{IndexKeeper} is a decision object: it sends through a callable and keeps
time with an injected clock.  Here the callable is L{RecordingSend}, the clock
a L{Clock}, threads run synchronously and C{peer_files.log} is a real file in
a temporary directory, so every test walks a whole leadership (request,
chunks, timeouts, changes, departures, resignation, the log on disk) without
a socket or a real second.
"""

from typing import Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.gather import FIRST_WRITE_HOLD, GATHER_TIMEOUT, IndexKeeper
from p2pfiles.index import parseLog
from p2pfiles.wire import FileEntry, Message, chunked, decode, encode

ME = 1
MY_ADDRESS = "127.0.0.1:9001"
ADDRESSES = {n: f"127.0.0.1:{9000 + n}" for n in range(2, 10)}
# LogWriter's default coalescing delay, as IndexKeeper builds it.
MIN_INTERVAL = 0.25
TIMEOUT = 5.0


def entry(name: str, digest: str = "a", size: int = 10, mtime: float = 1.5) -> FileEntry:
    return FileEntry(name, size, mtime, digest * 64)


def members(*ids: int) -> Dict[int, str]:
    return {n: ADDRESSES[n] for n in ids}


def onWire(message: Message) -> Message:
    """
    C{message} as the receiving node sees it: encoded and decoded, so a
    test cannot hand the keeper a message no peer could send.
    """
    return decode(encode(message))


def syncThread(f, *args):
    return defer.maybeDeferred(f, *args)


class RecordingSend:
    """
    The keeper's C{send}: records every message and reports a link to every
    member except those in C{down}.
    """

    def __init__(self) -> None:
        self.sent: List[Tuple[int, Message]] = []
        self.down: Set[int] = set()

    def __call__(self, member: int, message: Message) -> bool:
        self.sent.append((member, message))
        return member not in self.down

    def requests(self, member: Optional[int] = None) -> List[Tuple[int, Message]]:
        return [
            (m, message)
            for m, message in self.sent
            if message.type == "index-request" and (member is None or m == member)
        ]

    def lastRequest(self, member: int) -> Message:
        requests = self.requests(member)
        assert requests, f"no index-request sent to {member}"
        return requests[-1][1]


class KeeperTestCase(SynchronousTestCase):
    """
    A keeper for node C{ME} with a recording send, a L{Clock} and a real
    log file.
    """

    gatherTimeout = TIMEOUT

    def setUp(self) -> None:
        self.clock = Clock()
        self.send = RecordingSend()
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.logPath = directory.child("peer_files.log")
        self.keeper = IndexKeeper(
            ME, MY_ADDRESS, self.logPath, self.clock, syncThread, self.send, gatherTimeout=self.gatherTimeout
        )

    def answer(
        self,
        member: int,
        entries: Iterable[FileEntry],
        size: int = 500,
        request: Optional[int] = None,
        epoch: Optional[int] = None,
    ) -> None:
        """
        Have C{member} answer its last index-request as a node does: its
        entries in chunks of C{size}, the last one marked.
        """
        asked = self.send.lastRequest(member)
        parts = chunked(sorted(entries, key=lambda e: e.name), size)
        for i, part in enumerate(parts):
            self.keeper.chunkReceived(
                member,
                onWire(
                    Message(
                        "index-chunk",
                        epoch=asked.epoch if epoch is None else epoch,
                        request=asked.request if request is None else request,
                        entries=part,
                        last=i == len(parts) - 1,
                    )
                ),
            )

    def update(
        self, member: int, epoch: int, changed: Iterable[FileEntry] = (), removed: Iterable[str] = ()
    ) -> None:
        self.keeper.updateReceived(
            member,
            ADDRESSES[member],
            onWire(Message("index-update", epoch=epoch, entries=list(changed), removed=list(removed))),
        )

    def files(self, node: int) -> List[FileEntry]:
        """
        The entries the index holds for C{node}, by name.
        """
        return [e for n, _, e in self.keeper.index.entries() if n == node]

    def readLog(self) -> Tuple[dict, List[dict]]:
        return parseLog(self.logPath.getContent())

    def logged(self, rows: List[dict]) -> List[Tuple[int, str]]:
        return [(row["node"], row["name"]) for row in rows]

    def stopKeeper(self) -> None:
        self.successResultOf(self.keeper.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LeadTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.lead}.
    """

    def test_requestPerMember(self) -> None:
        """
        C{lead} sends exactly one index-request to each live member, tagged
        with the epoch, each with a request id not used before; none goes to
        the leader itself.
        """
        self.keeper.lead(7, [], members(2, 3, 4))
        requests = self.send.requests()
        self.assertEqual(sorted(m for m, _ in requests), [2, 3, 4])
        self.assertEqual(len(self.send.sent), 3)
        self.assertEqual({message.epoch for _, message in requests}, {7})
        ids = [message.request for _, message in requests]
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(self.keeper.epoch, 7)
        for member in (2, 3, 4):
            self.assertTrue(self.keeper.isGathering(member))

    def test_freshRequestIds(self) -> None:
        """
        Every request, in this epoch or the next, has an id never used
        before, so an answer to an old one cannot pass for a new one.
        """
        self.keeper.lead(1, [], members(2, 3))
        self.keeper.lead(2, [], members(2, 3))
        self.keeper.gather(2, ADDRESSES[2])
        ids = [message.request for _, message in self.send.requests()]
        self.assertEqual(len(ids), 5)
        self.assertEqual(len(set(ids)), 5)

    def test_ownFilesAtOnce(self) -> None:
        """
        The leader's own files are in the index as soon as C{lead} returns,
        before any member answers.
        """
        own = [entry("a.txt"), entry("b.txt", "b")]
        self.keeper.lead(3, own, members(2))
        self.assertEqual(self.keeper.index.nodes(), [ME])
        self.assertEqual(self.files(ME), own)
        self.assertEqual(self.keeper.index.holders("a.txt"), [(ME, MY_ADDRESS, own[0])])
        self.assertFalse(self.keeper.index.hasNode(2))

    def test_firesWhenAllAnswered(self) -> None:
        """
        C{lead}'s Deferred fires with the sorted ids of the members gathered,
        once the last of them has answered, without waiting for a timeout.
        """
        d = self.keeper.lead(3, [entry("own")], members(2, 3))
        self.answer(3, [entry("three")])
        self.assertNoResult(d)
        self.answer(2, [entry("two")])
        self.assertEqual(self.successResultOf(d), [2, 3])
        self.assertEqual(self.keeper.index.nodes(), [ME, 2, 3])
        self.assertEqual(self.keeper.index.holders("two"), [(2, ADDRESSES[2], entry("two"))])
        self.assertFalse(self.keeper.isGathering(2))
        self.assertFalse(self.keeper.isGathering(3))
        self.assertEqual(self.clock.seconds(), 0)
        self.stopKeeper()

    def test_noMembers(self) -> None:
        """
        A leader alone fires C{lead}'s Deferred at once with no members.
        """
        d = self.keeper.lead(1, [entry("own")], {})
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(self.send.sent, [])
        self.assertEqual(self.keeper.index.nodes(), [ME])

    def test_memberWithNoFiles(self) -> None:
        """
        A member whose index is empty answers with one empty last chunk and
        is recorded as present with no files.
        """
        d = self.keeper.lead(1, [], members(2))
        self.answer(2, [])
        self.assertEqual(self.successResultOf(d), [2])
        self.assertTrue(self.keeper.index.hasNode(2))
        self.assertEqual(self.files(2), [])

    def test_gatherWhileNotLeading(self) -> None:
        """
        C{gather} refuses to run when no epoch is led, and sends nothing.
        """
        self.assertRaises(RuntimeError, self.keeper.gather, 2, ADDRESSES[2])
        self.assertEqual(self.send.sent, [])


class ChunkTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.chunkReceived}.
    """

    def test_severalChunks(self) -> None:
        """
        A member answering in several chunks ends up with all its entries;
        until the last chunk it is still being gathered and none of its
        entries is in the index.
        """
        entries = [entry(f"f{i}", str(i)) for i in range(5)]
        d = self.keeper.lead(2, [], members(2))
        asked = self.send.lastRequest(2)
        parts = chunked(entries, 2)
        self.assertEqual(len(parts), 3)
        for part in parts[:-1]:
            self.keeper.chunkReceived(
                2, Message("index-chunk", epoch=2, request=asked.request, entries=part, last=False)
            )
        self.assertTrue(self.keeper.isGathering(2))
        self.assertFalse(self.keeper.index.hasNode(2))
        self.assertNoResult(d)
        self.keeper.chunkReceived(
            2, Message("index-chunk", epoch=2, request=asked.request, entries=parts[-1], last=True)
        )
        self.assertEqual(self.successResultOf(d), [2])
        self.assertEqual(self.files(2), entries)

    def test_wrongRequestIgnored(self) -> None:
        """
        A chunk whose request id is not the one outstanding for that member
        is ignored, even if marked last; the right one still completes.
        """
        d = self.keeper.lead(2, [], members(2, 3))
        asked = self.send.lastRequest(2)
        other = self.send.lastRequest(3)
        self.answer(2, [entry("bogus")], request=asked.request + 100)
        self.answer(2, [entry("theirs")], request=other.request)
        self.assertTrue(self.keeper.isGathering(2))
        self.assertFalse(self.keeper.index.hasNode(2))
        self.answer(2, [entry("good")])
        self.answer(3, [])
        self.assertEqual(self.successResultOf(d), [2, 3])
        self.assertEqual(self.files(2), [entry("good")])

    def test_wrongEpochIgnored(self) -> None:
        """
        A chunk tagged with another epoch is ignored, even with the right
        request id, and its entries do not leak into the real answer.
        """
        d = self.keeper.lead(4, [], members(2))
        self.answer(2, [entry("old")], epoch=3)
        self.answer(2, [entry("new")], epoch=5)
        self.assertTrue(self.keeper.isGathering(2))
        self.assertNoResult(d)
        self.answer(2, [entry("right")])
        self.assertEqual(self.successResultOf(d), [2])
        self.assertEqual(self.files(2), [entry("right")])

    def test_unaskedMemberIgnored(self) -> None:
        """
        A chunk from a member that was never asked changes nothing.
        """
        self.keeper.lead(4, [], members(2))
        request = self.send.lastRequest(2).request
        self.keeper.chunkReceived(
            9, Message("index-chunk", epoch=4, request=request, entries=[entry("x")], last=True)
        )
        self.assertFalse(self.keeper.index.hasNode(9))
        self.assertEqual(self.keeper.index.holders("x"), [])


class TimeoutTests(KeeperTestCase):
    """
    Each member's gather is bounded by C{gatherTimeout} on the injected clock.
    """

    def test_defaultTimeout(self) -> None:
        """
        Without an explicit bound, a gather waits L{GATHER_TIMEOUT}.
        """
        keeper = IndexKeeper(
            ME, MY_ADDRESS, self.logPath, self.clock, syncThread, self.send
        )
        self.assertEqual(keeper.gatherTimeout, GATHER_TIMEOUT)
        d = keeper.lead(1, [], members(2))
        self.clock.advance(GATHER_TIMEOUT - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), [])

    def test_slowMemberDoesNotHoldUpOthers(self) -> None:
        """
        While one member stays silent, the others' files are in the index at
        once and in the log when the first-write hold ends, well before the
        timeout; C{lead}'s Deferred fires at the timeout with only the
        members that answered, and the silent one is no longer being
        gathered.
        """
        d = self.keeper.lead(6, [entry("own")], members(2, 3, 4))
        self.answer(2, [entry("two")])
        self.answer(4, [entry("four")])
        self.assertEqual(self.keeper.index.nodes(), [ME, 2, 4])
        self.clock.advance(FIRST_WRITE_HOLD - 0.001)
        self.assertFalse(self.logPath.exists())
        self.clock.advance(0.001)
        header, rows = self.readLog()
        self.assertEqual(header["nodes"], 3)
        self.assertEqual(self.logged(rows), [(4, "four"), (ME, "own"), (2, "two")])
        self.assertNoResult(d)
        self.assertTrue(self.keeper.isGathering(3))

        with capturedLogs() as events:
            self.clock.advance(TIMEOUT - FIRST_WRITE_HOLD - 0.001)
            self.assertNoResult(d)
            self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), [2, 4])
        self.assertFalse(self.keeper.isGathering(3))
        self.assertFalse(self.keeper.index.hasNode(3))
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("node 3 sent no index", warnings[0])

    def test_reconcileAsksAgain(self) -> None:
        """
        After a member's gather times out, the next C{reconcile} asks it
        again with a new request id, and not the members already gathered;
        its answer to the new request puts its files in the index.
        """
        self.keeper.lead(6, [], members(2, 3))
        first = self.send.lastRequest(3)
        self.answer(2, [entry("two")])
        self.keeper.reconcile(members(2, 3))
        self.assertEqual(len(self.send.requests()), 2, "asked again before the timeout")
        self.clock.advance(TIMEOUT)
        self.keeper.reconcile(members(2, 3))
        self.assertEqual(len(self.send.requests(2)), 1)
        self.assertEqual(len(self.send.requests(3)), 2)
        second = self.send.lastRequest(3)
        self.assertEqual(second.epoch, 6)
        self.assertNotEqual(second.request, first.request)
        self.assertTrue(self.keeper.isGathering(3))
        self.answer(3, [entry("three")])
        self.assertEqual(self.files(3), [entry("three")])

    def test_lateChunkIgnored(self) -> None:
        """
        An answer to a request that timed out is ignored, both before the
        member is asked again and after, while the answer to the new
        request is taken.
        """
        self.keeper.lead(6, [], members(3))
        first = self.send.lastRequest(3)
        self.clock.advance(TIMEOUT)
        self.answer(3, [entry("late")], request=first.request)
        self.assertFalse(self.keeper.index.hasNode(3))
        self.keeper.reconcile(members(3))
        self.answer(3, [entry("later")], request=first.request)
        self.assertFalse(self.keeper.index.hasNode(3))
        self.assertTrue(self.keeper.isGathering(3))
        self.answer(3, [entry("fresh")])
        self.assertEqual(self.files(3), [entry("fresh")])

    def test_answerCancelsTimeout(self) -> None:
        """
        Once every member has answered no gather timer is left on the
        clock, and the members' files stay past the old deadline.
        """
        self.keeper.lead(6, [], members(2, 3))
        self.answer(2, [entry("two")])
        self.answer(3, [entry("three")])
        self.clock.advance(MIN_INTERVAL)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.keeper.index.nodes(), [ME, 2, 3])


class NoLinkTests(KeeperTestCase):
    """
    C{send} returning C{False} means there is no link to the member now.
    """

    def test_gatherFiresNoneAtOnce(self) -> None:
        """
        A member that cannot be asked has its gather fire L{None} at once,
        is not left pending, and sets no timer.
        """
        self.send.down.add(3)
        self.keeper.lead(6, [], {})
        d = self.keeper.gather(3, ADDRESSES[3])
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.keeper.isGathering(3))
        # lead() with no members to gather wrote its log at once; the
        # failed gather scheduled nothing.
        self.assertTrue(self.logPath.exists())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_leadNotHeldUp(self) -> None:
        """
        C{lead} does not wait for a member it could not ask: it fires as
        soon as the reachable ones answer, without the clock moving.
        """
        self.send.down.add(3)
        d = self.keeper.lead(6, [], members(2, 3))
        self.answer(2, [entry("two")])
        self.assertEqual(self.successResultOf(d), [2])
        self.assertEqual(self.clock.seconds(), 0)

    def test_reconcileAsksAgain(self) -> None:
        """
        Once the link is back, C{reconcile} asks the member that could not
        be asked, and its answer is taken.
        """
        self.send.down.add(3)
        self.keeper.lead(6, [], members(3))
        self.keeper.reconcile(members(3))
        self.assertEqual(len(self.send.requests(3)), 2, "reconcile asks while the link is down too")
        self.assertFalse(self.keeper.isGathering(3))
        self.send.down.discard(3)
        self.keeper.reconcile(members(3))
        self.assertEqual(len(self.send.requests(3)), 3)
        self.assertTrue(self.keeper.isGathering(3))
        self.answer(3, [entry("three")])
        self.assertEqual(self.files(3), [entry("three")])


class NameCheckTests(KeeperTestCase):
    """
    Names from members are checked again before they enter the index.
    """

    def test_badNamesDropped(self) -> None:
        """
        Entries whose names no node would accept (a path, a leading dot) are
        left out of a gathered index and of an update, with one warning
        each time; the good entries go in.
        """
        self.keeper.lead(5, [entry("own")], members(2))
        with capturedLogs() as events:
            self.keeper.chunkReceived(
                2,
                Message(
                    "index-chunk",
                    epoch=5,
                    request=self.send.lastRequest(2).request,
                    entries=[entry("../escape"), entry("fine"), entry(".hidden")],
                    last=True,
                ),
            )
            self.keeper.updateReceived(
                2, ADDRESSES[2], Message("index-update", epoch=5, entries=[entry("a/b"), entry("ok")], removed=[])
            )
        self.assertEqual(self.files(2), [entry("fine"), entry("ok")])
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            warnings,
            [
                "ignored 2 entries with unacceptable names from node 2",
                "ignored 1 entries with unacceptable names from node 2",
            ],
        )


class UpdateTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.updateReceived} and L{IndexKeeper.ownChanges}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.led = self.keeper.lead(5, [entry("own")], members(2, 3))
        self.answer(2, [entry("keep"), entry("gone"), entry("edit")])

    def test_staleEpochIgnored(self) -> None:
        """
        An index-update from an older epoch changes nothing and is logged
        as ignored.
        """
        version = self.keeper.index.version
        with capturedLogs() as events:
            self.update(2, 4, [entry("edit", "e"), entry("new")], ["gone"])
        self.assertEqual(self.files(2), [entry("edit"), entry("gone"), entry("keep")])
        self.assertEqual(self.keeper.index.version, version)
        messages = [formatEvent(e) for e in events]
        self.assertEqual(len(messages), 1)
        self.assertIn("ignored index changes", messages[0])
        self.assertIn("node 2", messages[0])

    def test_currentEpochApplied(self) -> None:
        """
        An index-update for the epoch being led applies its changed entries
        (new and replaced) and its removed names, and reaches the log.
        """
        self.update(2, 5, [entry("edit", "e", size=99), entry("new")], ["gone", "never-had"])
        self.assertEqual(self.files(2), [entry("edit", "e", size=99), entry("keep"), entry("new")])
        self.assertEqual(self.keeper.index.holders("gone"), [])
        # Member 3 has not answered: the first log waits for the hold.
        self.clock.advance(FIRST_WRITE_HOLD)
        _, rows = self.readLog()
        self.assertEqual(
            self.logged(rows), [(2, "edit"), (2, "keep"), (2, "new"), (ME, "own")]
        )
        self.assertEqual([row["size"] for row in rows if row["name"] == "edit"], [99])

    def test_notYetGatheredIgnored(self) -> None:
        """
        An update from a member whose whole index is still on its way is
        ignored: the full answer wins.  So is one from a member never asked.
        """
        self.assertTrue(self.keeper.isGathering(3))
        self.update(3, 5, [entry("early")])
        self.update(9, 5, [entry("stranger")])
        self.assertFalse(self.keeper.index.hasNode(3))
        self.assertFalse(self.keeper.index.hasNode(9))
        self.answer(3, [entry("whole")])
        self.assertEqual(self.files(3), [entry("whole")])
        self.assertEqual(self.successResultOf(self.led), [2, 3])

    def test_afterTimeoutIgnored(self) -> None:
        """
        An update from a member whose gather timed out is ignored until it
        has been gathered again.
        """
        self.clock.advance(TIMEOUT)
        self.update(3, 5, [entry("partial")])
        self.assertFalse(self.keeper.index.hasNode(3))

    def test_ownChanges(self) -> None:
        """
        The leader's own changes apply to its entry in the index.
        """
        self.keeper.ownChanges([entry("mine")], ["own"])
        self.assertEqual(self.files(ME), [entry("mine")])
        self.assertEqual(self.keeper.index.holders("mine"), [(ME, MY_ADDRESS, entry("mine"))])


class MembershipTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.memberGone} and L{IndexKeeper.reconcile}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.led = self.keeper.lead(5, [entry("own")], members(2, 3))
        self.answer(2, [entry("two"), entry("shared")])
        self.answer(3, [entry("three"), entry("shared")])
        self.clock.advance(MIN_INTERVAL)

    def test_memberGone(self) -> None:
        """
        A member that leaves has its files dropped from the index and from
        the next log write.
        """
        self.keeper.memberGone(2)
        self.assertEqual(self.keeper.index.nodes(), [ME, 3])
        self.assertEqual([h[0] for h in self.keeper.index.holders("shared")], [3])
        self.clock.advance(MIN_INTERVAL)
        header, rows = self.readLog()
        self.assertEqual((header["nodes"], header["files"]), (2, 3))
        self.assertEqual(self.logged(rows), [(ME, "own"), (3, "shared"), (3, "three")])

    def test_memberGoneWhileGathering(self) -> None:
        """
        A member that leaves while being gathered stops being gathered at
        once (no timer left for it), and its late answer is ignored.
        """
        self.keeper.gather(4, ADDRESSES[4])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d = self.keeper.gather(5, ADDRESSES[5])
        self.keeper.memberGone(5)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.keeper.isGathering(5))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.answer(5, [entry("five")])
        self.assertFalse(self.keeper.index.hasNode(5))

    def test_memberGoneUnknown(self) -> None:
        """
        C{memberGone} for a member that is not in the index changes nothing
        and schedules no write.
        """
        version = self.keeper.index.version
        self.keeper.memberGone(9)
        self.assertEqual(self.keeper.index.version, version)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconcile(self) -> None:
        """
        C{reconcile} drops the members no longer live and gathers the live
        ones not yet in the index, leaving the rest alone.
        """
        self.keeper.reconcile(members(3, 4))
        self.assertEqual(self.keeper.index.nodes(), [ME, 3])
        self.assertEqual(len(self.send.requests(3)), 1)
        self.assertEqual(len(self.send.requests(2)), 1)
        self.assertTrue(self.keeper.isGathering(4))
        self.assertEqual(self.send.lastRequest(4).epoch, 5)
        self.answer(4, [entry("four")])
        self.assertEqual(self.keeper.index.nodes(), [ME, 3, 4])
        self.clock.advance(MIN_INTERVAL)
        _, rows = self.readLog()
        self.assertEqual(self.logged(rows), [(4, "four"), (ME, "own"), (3, "shared"), (3, "three")])

    def test_reconcileDropsDepartedWhileGathering(self) -> None:
        """
        A member that is no longer live while its gather is still pending is
        dropped by C{reconcile} like one already gathered: its gather is
        cancelled (no timer left for it) and an answer it sends afterwards
        does not put its files in the index.
        """
        d = self.keeper.gather(4, ADDRESSES[4])
        self.keeper.reconcile(members(2, 3))
        self.assertFalse(self.keeper.isGathering(4))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.answer(4, [entry("four")])
        self.assertEqual(self.keeper.index.nodes(), [ME, 2, 3])

    def test_reconcileKeepsLeader(self) -> None:
        """
        The leader is never dropped or asked for its own index, whether or
        not the live members passed in name it.
        """
        self.keeper.reconcile({})
        self.keeper.reconcile({ME: MY_ADDRESS})
        self.assertEqual(self.keeper.index.nodes(), [ME])
        self.assertEqual(self.send.requests(ME), [])
        self.assertEqual(self.files(ME), [entry("own")])

    def test_reconcileWhileNotLeading(self) -> None:
        """
        C{reconcile} does nothing when no epoch is led.
        """
        self.keeper.resign()
        sent = len(self.send.sent)
        self.keeper.reconcile(members(2, 3, 4))
        self.assertEqual(len(self.send.sent), sent)
        self.assertEqual(self.keeper.index.nodes(), [])


class ResignTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.resign}.
    """

    def test_resign(self) -> None:
        """
        Resigning cancels every pending gather (their timers go), forgets
        the index and the epoch; after the writer stops too, nothing is
        left on the clock.
        """
        d = self.keeper.lead(5, [entry("own")], members(2, 3))
        self.answer(2, [entry("two")])
        self.keeper.resign()
        self.assertEqual(self.successResultOf(d), [2])
        self.assertIsNone(self.keeper.epoch)
        self.assertEqual(self.keeper.index.nodes(), [])
        self.assertEqual(self.keeper.index.fileCount(), 0)
        self.assertFalse(self.keeper.isGathering(3))
        self.successResultOf(self.keeper.writer.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pendingWriteKeepsLastState(self) -> None:
        """
        A log write pending when the leader resigns still writes the last
        leadership's full index, not an empty one.
        """
        self.keeper.lead(5, [entry("own")], members(2, 3))
        self.answer(2, [entry("two")])
        self.answer(3, [entry("three")])
        self.assertEqual(self.keeper.writer.writes, 1)
        self.update(3, 5, [entry("more")])
        self.keeper.resign()
        self.clock.advance(MIN_INTERVAL)
        header, rows = self.readLog()
        self.assertEqual((header["leader"], header["epoch"]), (ME, 5))
        self.assertEqual((header["nodes"], header["files"]), (3, 4))
        self.assertEqual(self.logged(rows), [(3, "more"), (ME, "own"), (3, "three"), (2, "two")])
        self.assertEqual(self.keeper.writer.writes, 2)

    def test_ignoresAfterResign(self) -> None:
        """
        After resigning, chunks, updates and own changes change nothing and
        schedule no write.
        """
        self.keeper.lead(5, [], members(2, 3))
        asked = self.send.lastRequest(2)
        self.answer(3, [entry("three")])
        self.keeper.resign()
        self.clock.advance(MIN_INTERVAL)
        writes = self.keeper.writer.writes
        self.keeper.chunkReceived(
            2, Message("index-chunk", epoch=5, request=asked.request, entries=[entry("two")], last=True)
        )
        self.update(3, 5, [entry("more")])
        self.keeper.ownChanges([entry("mine")], [])
        self.assertEqual(self.keeper.index.nodes(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(MIN_INTERVAL)
        self.assertEqual(self.keeper.writer.writes, writes)


class LogTests(KeeperTestCase):
    """
    C{peer_files.log} as the keeper keeps it.
    """

    def test_logAfterGather(self) -> None:
        """
        A new leader writes no partial first log: it writes the log as soon
        as the last member is gathered.  Its header names the leader, the
        epoch, the node and file counts, and its rows list the leader's own
        files beside the members'.
        """
        self.keeper.lead(9, [entry("mine", "c", size=3)], members(2, 3))
        self.answer(2, [entry("a"), entry("b")])
        self.clock.advance(0.5)
        self.assertFalse(self.logPath.exists())
        self.answer(3, [])
        header, rows = self.readLog()
        self.assertEqual(header["leader"], ME)
        self.assertEqual(header["epoch"], 9)
        self.assertEqual(header["nodes"], 3)
        self.assertEqual(header["files"], 3)
        self.assertEqual(header["time"], 0.5)
        self.assertEqual(
            rows,
            [
                {"node": 2, "address": ADDRESSES[2], "name": "a", "size": 10, "mtime": 1.5, "sha256": "a" * 64},
                {"node": 2, "address": ADDRESSES[2], "name": "b", "size": 10, "mtime": 1.5, "sha256": "a" * 64},
                {"node": ME, "address": MY_ADDRESS, "name": "mine", "size": 3, "mtime": 1.5, "sha256": "c" * 64},
            ],
        )

    def test_burstIsOneWrite(self) -> None:
        """
        After the first log, changes arriving within C{minInterval} cost one
        write, which shows the latest state.
        """
        self.keeper.lead(9, [entry("mine")], members(2, 3))
        self.answer(2, [entry("a")])
        self.answer(3, [entry("b")])
        self.assertEqual(self.keeper.writer.writes, 1)
        self.update(2, 9, [entry("c")])
        self.update(3, 9, [], ["b"])
        self.update(3, 9, [entry("b")])
        self.clock.advance(MIN_INTERVAL)
        self.assertEqual(self.keeper.writer.writes, 2)
        _, rows = self.readLog()
        self.assertEqual(self.logged(rows), [(2, "a"), (3, "b"), (2, "c"), (ME, "mine")])

    def test_noChangeNoWrite(self) -> None:
        """
        Messages that leave the index as it was (an identical update, a
        repeated own change) schedule no write.
        """
        self.keeper.lead(9, [entry("mine")], members(2))
        self.answer(2, [entry("a")])
        self.clock.advance(MIN_INTERVAL)
        self.update(2, 9, [entry("a")])
        self.keeper.ownChanges([entry("mine")], [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.keeper.writer.writes, 1)


class NewEpochTests(KeeperTestCase):
    """
    A new C{lead} starts from scratch.
    """

    def test_newLeadForgetsMembers(self) -> None:
        """
        Leading a new epoch drops every member's entries from the last one
        until they are gathered again, asks them again tagged with the new
        epoch, and ignores answers to the old epoch's requests.
        """
        self.keeper.lead(1, [entry("own")], members(2, 3))
        old = self.send.lastRequest(2)
        self.answer(3, [entry("three")])
        self.clock.advance(MIN_INTERVAL)

        d = self.keeper.lead(2, [entry("own2")], members(2, 3))
        self.assertEqual(self.keeper.index.nodes(), [ME])
        self.assertEqual(self.files(ME), [entry("own2")])
        self.assertEqual(self.send.lastRequest(2).epoch, 2)
        self.assertEqual(self.send.lastRequest(3).epoch, 2)
        self.keeper.chunkReceived(
            2, Message("index-chunk", epoch=1, request=old.request, entries=[entry("stale")], last=True)
        )
        self.assertFalse(self.keeper.index.hasNode(2))
        self.update(3, 1, [entry("old-change")])
        self.assertFalse(self.keeper.index.hasNode(3))

        self.clock.advance(FIRST_WRITE_HOLD)
        header, rows = self.readLog()
        self.assertEqual((header["epoch"], header["nodes"]), (2, 1))
        self.assertEqual(self.logged(rows), [(ME, "own2")])

        self.answer(2, [entry("two")])
        self.answer(3, [entry("three")])
        self.assertEqual(self.successResultOf(d), [2, 3])
        self.assertEqual(self.keeper.index.nodes(), [ME, 2, 3])

    def test_newLeadCancelsOldGathers(self) -> None:
        """
        The last epoch's gathers are cancelled by a new C{lead}, including
        that of a member the new epoch does not ask: the old Deferred fires
        with what it had, and only the new epoch's timers remain.
        """
        first = self.keeper.lead(1, [], members(2, 3, 4))
        self.answer(2, [])
        self.keeper.lead(2, [], members(2, 3))
        self.assertEqual(self.successResultOf(first), [2])
        self.assertFalse(self.keeper.isGathering(4))
        # Two gather timers and one log write.
        self.assertEqual(len(self.clock.getDelayedCalls()), 3)
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTests(KeeperTestCase):
    """
    Tests for L{IndexKeeper.stop}.
    """

    def test_stopFlushes(self) -> None:
        """
        C{stop} writes a pending change at once, without waiting for the
        clock, and leaves no timer behind.
        """
        self.keeper.lead(3, [entry("own")], members(2))
        self.answer(2, [])
        self.update(2, 3, [entry("two")])
        _, rows = self.readLog()
        self.assertEqual(self.logged(rows), [(ME, "own")])
        self.stopKeeper()
        header, rows = self.readLog()
        self.assertEqual((header["epoch"], header["nodes"]), (3, 2))
        self.assertEqual(self.logged(rows), [(ME, "own"), (2, "two")])

    def test_stopCancelsGathers(self) -> None:
        """
        C{stop} cancels pending gathers: C{lead}'s Deferred fires and no
        gather timer is left on the clock.
        """
        d = self.keeper.lead(3, [entry("own")], members(2, 3))
        self.answer(3, [])
        self.stopKeeper()
        self.assertEqual(self.successResultOf(d), [3])
        self.assertFalse(self.keeper.isGathering(2))

    def test_nothingPending(self) -> None:
        """
        C{stop} with nothing to write writes nothing.
        """
        self.stopKeeper()
        self.assertFalse(self.logPath.exists())
        self.assertEqual(self.keeper.writer.writes, 0)
