"""
Tests for L{p2pfiles.runtime}: the collector and thread-switch settings a
node applies to its process, with a fake collector (the tests' own process
is never changed).
"""

import os
import threading
from typing import Any, Callable, List, Tuple

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pfiles.runtime import (
    ARENA_MAX,
    BackgroundThreads,
    GC_THRESHOLDS, LOGGED_PASS, MMAP_THRESHOLD, NO_FULL_PASSES, SWITCH_INTERVAL, TRIM_THRESHOLD, NoPolicy, ProcessPolicy, trimAllocator, tuneAllocator,
)
from p2pfiles.scanworker import WORKER_NICE, ProcessObserver


class FakeGC:
    """
    The functions of L{gc} a policy uses, recording what it is asked.
    """

    def __init__(self) -> None:
        self.callbacks: List[Callable[[str, dict], None]] = []
        self.thresholds: Tuple[int, ...] = (700, 10, 10)
        self.freezes = 0
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def set_threshold(self, *thresholds: int) -> None:
        self.thresholds = thresholds

    def freeze(self) -> None:
        self.freezes += 1

    def collect(self, generation: int, seconds: float, timer: "FakeTimer") -> None:
        """
        A pass of C{generation} that lasts C{seconds}, as the collector
        reports it to its callbacks.
        """
        for callback in list(self.callbacks):
            callback("start", {"generation": generation})
        timer.now += seconds
        for callback in list(self.callbacks):
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})


class FakeTimer:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeReactor:
    """
    Queues what is called from another thread, to run it when the test
    says.
    """

    def __init__(self) -> None:
        self.queued: List[Tuple[Callable[..., Any], Tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.queued.append((f, args))

    def runQueued(self) -> None:
        queued, self.queued = self.queued, []
        for f, args in queued:
            f(*args)


class ProcessPolicyTests(SynchronousTestCase):
    """
    L{ProcessPolicy} with a fake collector, switch interval and timer.
    """

    def setUp(self) -> None:
        self.gc = FakeGC()
        self.timer = FakeTimer()
        self.reactor = FakeReactor()
        self.switch: List[float] = []
        self.events: List[dict] = []
        self.tuned: List[bool] = []
        self.policy = ProcessPolicy(self.reactor, self.gc, self.switch.append, self.timer, allocator=lambda: self.tuned.append(True))
        self.policy.log = Logger(observer=self.events.append)

    def test_start(self) -> None:
        """
        Starting tunes the allocator, applies the thresholds and the switch interval, freezes
        what start-up made, and times collections; stopping stops timing
        them.
        """
        self.assertEqual(self.tuned, [])
        self.policy.start()
        self.assertEqual(self.tuned, [True])
        self.assertEqual(self.gc.thresholds, GC_THRESHOLDS)
        self.assertEqual(self.switch, [SWITCH_INTERVAL])
        self.assertEqual(self.gc.freezes, 1)
        self.assertEqual(len(self.gc.callbacks), 1)
        self.policy.stop()
        self.assertEqual(self.gc.callbacks, [])

    def test_noFreezeAfterStart(self) -> None:
        """
        Only start-up's objects are frozen: a long full pass (however
        long) freezes nothing more, so that the cycles of connections that
        end later are still collected.
        """
        self.policy.start()
        for _ in range(3):
            self.gc.collect(2, 1.0, self.timer)
        self.reactor.runQueued()
        self.assertEqual(self.gc.freezes, 1)

    def test_longPassLogged(self) -> None:
        """
        A pass of L{LOGGED_PASS} or more is logged with its generation and
        length; a shorter one is not.
        """
        self.policy.start()
        self.gc.collect(0, LOGGED_PASS / 2, self.timer)
        self.gc.collect(1, 0.125, self.timer)
        self.reactor.runQueued()
        self.assertEqual(
            [(e["generation"], round(e["ms"])) for e in self.events],
            [(1, 125)],
        )

    def test_settleScan(self) -> None:
        """
        C{settleScan(first=True)} freezes what exists as the scan ends,
        once; not if the scan failed, nor for a later scan; the collector
        is never turned off, and only its full passes wait while a first
        scan runs.
        """
        self.policy.start()
        with self.policy.settleScan(True):
            self.assertEqual((self.gc.enabled, self.gc.freezes), (True, 1))
            self.assertEqual(self.gc.thresholds, (GC_THRESHOLDS[0], GC_THRESHOLDS[1], NO_FULL_PASSES))
        self.assertEqual((self.gc.enabled, self.gc.freezes, self.gc.thresholds), (True, 2, GC_THRESHOLDS))
        with self.assertRaises(ZeroDivisionError):
            with self.policy.settleScan(True):
                1 / 0
        self.assertEqual(self.gc.thresholds, GC_THRESHOLDS)
        with self.policy.settleScan(False):
            self.assertEqual(self.gc.thresholds, GC_THRESHOLDS)
        self.assertEqual((self.gc.enabled, self.gc.freezes), (True, 2))

    def test_settleScanOnlyWhileRunning(self) -> None:
        """
        A policy that is not running freezes nothing.
        """
        with self.policy.settleScan(True):
            pass
        self.assertEqual(self.gc.freezes, 0)

    def test_scanObserver(self) -> None:
        """
        The policy hashes in a child process at its niceness; L{NoPolicy}
        in the scan thread, and changes nothing.
        """
        observer = self.policy.scanObserver()
        self.assertIsInstance(observer, ProcessObserver)
        self.assertEqual(observer.command[-1], str(WORKER_NICE))
        self.assertEqual(ProcessPolicy(self.reactor, self.gc, scanNice=3).scanObserver().command[-1], "3")
        none = NoPolicy()
        none.start()
        none.stop()
        self.assertIsNone(none.scanObserver())


class FakeLibc:
    """
    The C library's C{mallopt}, recording what it was asked.
    """

    def __init__(self, answer: int = 1) -> None:
        self.answer = answer
        self.calls: List[Tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


class TuneAllocatorTests(SynchronousTestCase):
    """
    L{tuneAllocator} sets glibc's memory-map and trim thresholds.
    """

    def test_setsBothThresholds(self) -> None:
        """
        The memory-map threshold (M_MMAP_THRESHOLD, -3) and the trim
        threshold (M_TRIM_THRESHOLD, -1) are set, the second above the
        first, both above the largest buffer a transfer makes; and the
        arenas (M_ARENA_MAX, -8) to two.
        """
        libc = FakeLibc()
        self.assertTrue(tuneAllocator(libc))
        self.assertEqual(libc.calls, [(-3, MMAP_THRESHOLD), (-1, TRIM_THRESHOLD), (-8, ARENA_MAX)])
        self.assertGreater(MMAP_THRESHOLD, 256 << 10)
        self.assertGreater(TRIM_THRESHOLD, MMAP_THRESHOLD)

    def test_refused(self) -> None:
        """
        An allocator that refuses the setting is reported as not tuned.
        """
        self.assertFalse(tuneAllocator(FakeLibc(answer=0)))

    def test_noMallopt(self) -> None:
        """
        A C library without C{mallopt} (not glibc) is left as it is.
        """
        self.assertFalse(tuneAllocator(object()))


class TrimAllocatorTests(SynchronousTestCase):
    """
    L{trimAllocator} gives every free page of the C heap back to the kernel.
    """

    def test_trims(self) -> None:
        """
        C{malloc_trim(0)} is called once: no padding kept at the top of the
        heap.
        """
        libc = FakeLibc()
        self.assertTrue(trimAllocator(libc))
        self.assertEqual(libc.calls, [("trim", 0)])

    def test_noMallocTrim(self) -> None:
        """
        A C library without C{malloc_trim} (not glibc) is left as it is.
        """
        self.assertFalse(trimAllocator(object()))

    def test_thisProcess(self) -> None:
        """
        With no C library given, the process's own is asked, and on glibc
        it answers (the call is harmless: the heap only gives back what is
        free).
        """
        import ctypes

        expected = hasattr(ctypes.CDLL(None), "malloc_trim")
        self.assertEqual(trimAllocator(), expected)


class BackgroundThreadsTests(TestCase):
    """
    L{BackgroundThreads} runs work in threads of its own, at the node's
    priority.
    """

    def test_ownThreadsSamePriority(self) -> None:
        """
        The work runs in another thread whose nice value is the process's,
        and its result reaches the Deferred; the threads stop when told.
        """
        from twisted.internet import reactor

        background = BackgroundThreads(reactor)
        self.addCleanup(background.stop)
        here = threading.get_native_id()
        base = os.getpriority(os.PRIO_PROCESS, here)

        def where() -> Tuple[int, int]:
            me = threading.get_native_id()
            return me, os.getpriority(os.PRIO_PROCESS, me)

        def check(result: Tuple[int, int]) -> None:
            thread, nice = result
            self.assertNotEqual(thread, here)
            self.assertEqual(nice, base)
            self.assertEqual(os.getpriority(os.PRIO_PROCESS, here), base)

        return background.runInThread(where).addCallback(check)

    def test_noThreadsWithoutPolicy(self) -> None:
        """
        L{NoPolicy} gives no threads of its own; L{ProcessPolicy} gives two,
        at the node's own priority (lowered, they made the reactor wait for
        the GIL they held).
        """
        self.assertIsNone(NoPolicy().backgroundThreads())
        background = ProcessPolicy(FakeReactor(), FakeGC(), scanNice=4).backgroundThreads()
        self.assertIsInstance(background, BackgroundThreads)
        self.assertEqual(background.pool.max, 2)
