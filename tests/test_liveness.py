"""
Liveness never waits for bulk work: a node sending its whole file list keeps
heartbeating on time, because the list travels on a request connection of
its own, one frame at a time as the reader takes them, and nothing of it
ever queues on a control link.
"""

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.localindex import Changes
from p2pfiles.wire import FileEntry, Message

from tests.test_node import HEARTBEAT, LEADER_TIMEOUT, Harness, heartbeat

ENTRIES = 100_000


class BulkIndexTests(SynchronousTestCase):
    """
    A gather of 100,000 entries interleaved with heartbeats.
    """

    def test_heartbeatsKeepTheirPaceWhileAHugeListIsSent(self) -> None:
        """
        While node 1 sends 100,000 entries to node 2 (the reader taking one
        frame per heartbeat interval), every heartbeat interval puts exactly
        one heartbeat on the control link, no index frame ever appears
        there, node 2 stays alive to node 1 and node 1 keeps leading; each
        step writes at most one index frame, and the reader gets every
        entry, in order, with the last frame marked.
        """
        harness = Harness(self, node=1).start()
        entries = [FileEntry(f"IMG_{i:07d}.jpg", i, 1.5, "ab" * 32) for i in range(ENTRIES)]
        self.patch(
            harness.node.localIndex,
            "changesSince",
            lambda incarnation, since: succeed(Changes("inc1", 7, True, entries, [])),
        )
        control = harness.peer(2)
        control.send(heartbeat(2, 1, 1))
        request = harness.peer(2, purpose="request")
        request.client.sendMessage(Message("index-since", incarnation=None, since=0))
        received = []
        steps = 0
        while not (received and received[-1].last):
            steps += 1
            self.assertLess(steps, 2000, "the list never ended")
            before = len(control.handler.of("heartbeat"))
            harness.reactor.advance(HEARTBEAT)
            control.pump.flush()
            control.send(heartbeat(2, 1, 1))
            self.assertEqual(len(control.handler.of("heartbeat")), before + 1)
            # The reader takes what one pump moves: at most one new frame.
            frames = len(request.handler.of("index-delta"))
            request.pump.pump()
            received = request.handler.of("index-delta")
            self.assertLessEqual(len(received) - frames, 1)
            self.assertEqual(harness.node.status()["role"], "leader")
            self.assertTrue(harness.node.coordinator.isLive(2))
        self.assertGreater(steps, 100, "the list went in more frames than heartbeats")
        self.assertEqual([m.type for m in control.handler.messages if m.type.startswith("index-d")], [])
        got = [e for frame in received for e in frame.entries]
        self.assertEqual(len(got), ENTRIES)
        self.assertEqual(got[0], entries[0])
        self.assertEqual(got[-1], entries[-1])
        self.assertEqual({(f.incarnation, f.seq, f.full) for f in received}, {("inc1", 7, True)})
        self.assertLess(harness.node.maxTimerDelay(), LEADER_TIMEOUT)
