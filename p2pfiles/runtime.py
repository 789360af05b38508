"""
How a node's process spends its time: the garbage collector and the
interpreter's thread switching, set so that the reactor thread keeps time
(heartbeats, the leader timeout) while other threads scan and hash.

Two things hold the reactor thread up that no code on it can shorten:

  - A full pass of the garbage collector holds the GIL, whichever thread
    runs it, for as long as it takes to walk every object it tracks: at
    100,000 shared files (a L{FileEntry} each) that is tens of
    milliseconds, and more with the modules, classes and functions that
    start-up loaded.  What start-up made (modules, classes, functions)
    lives for the whole run and is moved out of its sight (C{gc.freeze()}).
    So is what the first scan of the share built, once, as it ends: an
    entry per file, which lives until the file changes, and would otherwise
    be walked by every full pass for good (L{ProcessPolicy.settleScan}).
    While that scan runs, full passes wait (young and middle ones go on):
    each would walk every entry built so far, 80-300 ms with ten nodes on
    two cores, for entries the freeze then hides anyway.
    Nothing else is frozen: frozen objects are freed as usual when their count of
    references drops to zero, but a reference cycle among them is never
    reclaimed, and a node always holds some that will end (each
    connection's protocol and transport refer to each other), so a freeze
    while a flood of connections is open would keep them for good.  The one
    at the first scan keeps, once per process, what is open as it ends and
    the cycles of what ended during it after living long enough to leave
    the young generations (a tenth of a second or so while it runs).  The index's entries hold no cycles (compact
    records, L{FileEntry} slots).  The collector is never turned off: with
    it off while a scan ran (seconds, or tens of seconds on a starved
    machine), everything any thread allocated meanwhile was walked by the
    first young pass after it at once (0.1-0.5 s seen on a leader that
    gathered from nine members during its first scan); on, the passes come
    as the objects do, each short.
  - The reactor thread gives the GIL up at every system call (each send,
    each C{epoll_wait}) and, when a scan thread holds it, waits the
    interpreter's switch interval (5 ms by default) before asking for it
    back.  A tick of heartbeats makes many system calls, so it may wait that
    long many times over; on a machine where other processes keep the cores
    busy every wait also includes the time until the holder is scheduled
    again to hand it over.  A shorter interval (L{SWITCH_INTERVAL}) shortens
    every such wait.

A third thing costs every byte a transfer moves: the C allocator.  Each
read of a connection carrying file bytes makes a buffer of up to 256 KiB,
and TLS makes as large ones for what it decrypts and encrypts.  glibc gives
a block that large its own memory map (C{mmap}), which the kernel fills
with zeroed pages on first touch and takes back at C{free}: a page fault
per 4 KiB moved, more system time than the copy itself.  glibc raises that
size by itself only after a larger block was freed, which in a node happens
by chance (a hash of a large file in this process did it; one in a child
process does not).  L{tuneAllocator} sets it, and how much free memory the
heap keeps before giving it back, once and explicitly, to sizes above any
buffer we make (L{MMAP_THRESHOLD}, L{TRIM_THRESHOLD}).

Blocks freed by a thread go back to that thread's own part of the heap (an
arena: glibc gives each thread that allocates one, up to eight per core),
and the kernel gets free memory back only from the top of each part.  So
the large pieces a thread makes while it works through the whole index (the
lines of C{peer_files.log}, the maps of a scan, the hash cache file as it
is read and written) stay in the process once freed, tens of MiB of them
at 1,000,000 files.  L{trimAllocator} (C{malloc_trim}) hands every free page
of every arena back; the threads that do such work call it when done.

A node's background work (scanning its share, the keeper's lists and log)
runs in two threads of its own (L{BackgroundThreads}), not in the
reactor's pool, which keeps what must be prompt (the epoch's fsync,
received files) from waiting behind it.  They run at the node's priority:
lowered, they held the GIL while the kernel preferred other processes, and
the reactor thread waited for it (ten nodes on two cores: timer delays
median 150 ms, against 86 ms at the node's priority).

L{ProcessPolicy} applies all three to the process, times every collection
(C{gc.callbacks}) and logs those of L{LOGGED_PASS} or more, and has the
share hashed in a child process at a lower CPU priority (see
L{p2pfiles.scanworker}).  It changes process-wide settings: a node gets one
only from the twistd plugin, never in tests (see L{NoPolicy}).
"""

import ctypes
import gc
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from p2pfiles.scanworker import WORKER_NICE, ProcessObserver

__all__ = [
    "ARENA_MAX", "BackgroundThreads", "GC_THRESHOLDS", "LOGGED_PASS", "MMAP_THRESHOLD", "NO_FULL_PASSES", "NoPolicy", "ProcessPolicy", "SWITCH_INTERVAL",
    "TRIM_THRESHOLD", "trimAllocator", "tuneAllocator",
]

# Seconds a thread that wants the GIL waits before asking for it.  Python's
# default is 5 ms; a heartbeat tick makes tens of system calls, each one a
# chance for a scan thread to take the GIL back.
SWITCH_INTERVAL = 0.0005

# The collector's thresholds: objects allocated (net) before a young pass,
# then young passes per middle pass, middle passes per full pass.  A larger
# first one means fewer passes and fewer short-lived objects promoted to
# live through a full one; but a middle pass walks up to the first times
# the second objects, and a scan that keeps two per file fills it: at
# 10,000 those passes held the GIL 60-190 ms on nodes sharing two cores.
# Python's default is (700, 10, 10).
GC_THRESHOLDS = (2_000, 10, 10)

# The oldest generation's threshold while the first scan runs: more middle
# passes than any scan makes.
NO_FULL_PASSES = 1 << 30

# A pass at least this long is logged.
LOGGED_PASS = 0.05

# Blocks smaller than this come from the heap, not from a memory map of
# their own: four times the largest buffer a transfer makes (256 KiB reads,
# as large TLS records in one piece).
MMAP_THRESHOLD = 4 << 20

# Free memory at the top of the heap kept for the next blocks rather than
# given back to the kernel at once: two of the largest blocks.
TRIM_THRESHOLD = 8 << 20

# Arenas (heaps) at most: the main one and one shared by every other thread.
# glibc gives each thread that allocates while another holds an arena one
# of its own, up to eight per core, and each keeps freed memory of its own:
# a node's threads (the reactor's pool, the background ones) each held
# megabytes nobody else could reuse.  (Measured: 4-5 MiB less for a node
# with 20,000 files under a flood of connections.)
ARENA_MAX = 2

# mallopt()'s parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


_libc: Any = None


def _cLibrary() -> Any:
    """
    The C library this process runs on (looked up once), or L{None} if it
    cannot be loaded.
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
        except OSError:
            _libc = False
    return _libc or None


def tuneAllocator(libc: Any = None) -> bool:
    """
    Set the C allocator's memory-map and trim thresholds to
    L{MMAP_THRESHOLD} and L{TRIM_THRESHOLD} (see the module's text), and
    its arenas to at most L{ARENA_MAX}.  Call it before threads start.
    Returns whether it could: only glibc has C{mallopt}; elsewhere the
    allocator is left as it is.

    @param libc: the C library (by default, the one this process runs on),
        or a fake with a C{mallopt} function.
    """
    mallopt = getattr(libc if libc is not None else _cLibrary(), "mallopt", None)
    if mallopt is None:
        return False
    # mallopt() returns 1 on success, 0 on error.
    return all(
        [
            bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)),
            bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)),
            bool(mallopt(_M_ARENA_MAX, ARENA_MAX)),
        ]
    )


def trimAllocator(libc: Any = None) -> bool:
    """
    Give the kernel back every free page of the C heap, in every arena
    (C{malloc_trim(0)}).  Blocks for a few milliseconds at a large heap,
    without the GIL: call it in a thread, after work that freed much.
    Returns whether it could: only glibc has C{malloc_trim}.

    @param libc: the C library (by default, the one this process runs on),
        or a fake with a C{malloc_trim} function.
    """
    trim = getattr(libc if libc is not None else _cLibrary(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


class BackgroundThreads:
    """
    Threads for a node's background work (scanning its share, the keeper's
    lists and log), at most C{threads}, apart from the reactor's pool, at
    the node's own priority (see the module's text).
    """

    def __init__(self, reactor: Any, threads: int = 2) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="p2pfiles-background")
        self._trigger: Any = None

    def runInThread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run C{f(*args)} in one of these threads; the Deferred fires with its
        result on the reactor thread.
        """
        if self._trigger is None:
            self.pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def stop(self) -> None:
        """
        Stop the threads (at the reactor's shutdown, or when told), once
        what was handed to them has run.
        """
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # it is what is running
            self.pool.stop()


class NoPolicy:
    """
    Leaves the process as it is: what a node uses unless given a
    L{ProcessPolicy} (tests run many nodes in one process and must not
    change its collector).
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def scanObserver(self) -> None:
        """
        No child process: the share is hashed in the scan thread.
        """
        return None

    def backgroundThreads(self) -> None:
        """
        No threads of its own: background work runs where the node's other
        thread work does.
        """
        return None

    def settleScan(self, first: bool) -> ContextManager[None]:
        return nullcontext()


class ProcessPolicy:
    """
    The collector, switch-interval and allocator settings of a node's
    process, and the timing of its collections.

    @param clock: the reactor: what a collection (which may run in any
        thread) asks for, a freeze or a log line, is done on its thread,
        through C{callFromThread}.
    @param gcModule: L{gc}, or a fake with the same functions.
    @param setSwitchInterval: L{sys.setswitchinterval}, or a fake.
    @param timer: measures a pass: L{time.perf_counter}, or a fake.
    @param allocator: tunes the C allocator at start: L{tuneAllocator}, or
        a fake.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        gcModule: Any = gc,
        setSwitchInterval: Callable[[float], None] = sys.setswitchinterval,
        timer: Callable[[], float] = time.perf_counter,
        thresholds: Tuple[int, int, int] = GC_THRESHOLDS,
        switchInterval: float = SWITCH_INTERVAL,
        scanNice: int = WORKER_NICE,
        allocator: Callable[[], Any] = tuneAllocator,
    ) -> None:
        self.clock = clock
        self.gc = gcModule
        self.setSwitchInterval = setSwitchInterval
        self.timer = timer
        self.thresholds = thresholds
        self.switchInterval = switchInterval
        self.scanNice = scanNice
        self.allocator = allocator
        self.freezes = 0
        self._started: Optional[float] = None
        self._running = False

    def start(self) -> None:
        """
        Apply the settings, freeze what start-up made and time every
        collection from now on.
        """
        self._running = True
        self.allocator()
        self.setSwitchInterval(self.switchInterval)
        self.gc.set_threshold(*self.thresholds)
        self.gc.callbacks.append(self._collection)
        self._freeze()

    def stop(self) -> None:
        """
        Stop timing collections (the settings stay: the process is ending).
        """
        self._running = False
        if self._collection in self.gc.callbacks:
            self.gc.callbacks.remove(self._collection)

    def scanObserver(self) -> ProcessObserver:
        """
        The child process that hashes the share, at a lower priority.
        """
        return ProcessObserver(self.scanNice)

    def backgroundThreads(self) -> BackgroundThreads:
        """
        The threads of the node's background work.
        """
        return BackgroundThreads(self.clock)

    @contextmanager
    def settleScan(self, first: bool) -> Iterator[None]:
        """
        Run a scan (in the scan thread); if it is the C{first} scan of the
        share and it succeeds, freeze what exists as it ends: the entry of
        every shared file is then out of every later pass's sight (see the
        module's text for what that costs).
        """
        if not (first and self._running):
            yield
            return
        # No full pass while the first scan builds an entry per file: each
        # would walk all built so far (100-300 ms seen with ten nodes on
        # two cores), only for the freeze to put them out of sight anyway.
        # Young passes go on as usual.
        self.gc.set_threshold(self.thresholds[0], self.thresholds[1], NO_FULL_PASSES)
        try:
            yield
            self._freeze()
        finally:
            self.gc.set_threshold(*self.thresholds)

    def _collection(self, phase: str, info: Dict[str, Any]) -> None:
        # Called by the collector, in whichever thread allocated: keep it
        # short, and touch the reactor only through callFromThread.
        if phase == "start":
            self._started = self.timer()
            return
        if self._started is None:
            return
        pause = self.timer() - self._started
        self._started = None
        generation = info.get("generation")
        if pause >= LOGGED_PASS:
            self.clock.callFromThread(self._logPause, generation, pause)

    def _logPause(self, generation: Any, pause: float) -> None:
        self.log.info("a pass of the garbage collector (generation {generation}) took {ms:.0f} ms", generation=generation, ms=pause * 1000)

    def _freeze(self) -> None:
        self.gc.freeze()
        self.freezes += 1
