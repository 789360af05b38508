"""
What C{p2pfiles get} shows while it downloads: L{Progress}, a one-line
progress bar on a terminal, and L{humanSize}.

This module imports nothing else of the package but L{p2pfiles.units}.
"""

from typing import Any, Dict, Optional, TextIO

from tqdm import tqdm
from twisted.internet.task import LoopingCall
from p2pfiles.units import humanSize


class Bar(tqdm):
    """
    tqdm's bar without its monitor thread: the reactor redraws a stalled
    bar (L{Progress}).
    """

    monitor_interval = 0




class Progress:
    """
    The progress display of C{get} on a terminal: one self-overwriting
    line (drawn by tqdm) with the file's name, percentage, bytes, rate, ETA
    and the resumed portion, and a "stalled" state when no byte came for
    L{STALL_AFTER} seconds or while the download resumes through another
    node.  It is made only when its stream is a terminal.

    @param nodes: node ids by address, to name the node waited for.
    """

    STALL_AFTER = 2.0
    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{rate_fmt}, ETA {remaining}{postfix}]"

    def __init__(self, reactor: Any, stream: TextIO, name: str, nodes: Dict[str, int]) -> None:
        self.reactor = reactor
        self.stream = stream
        self.name = name
        self.nodes = nodes
        self.bar: Any = None
        self.resumed = 0
        self.sender = ""
        self.stall: Optional[str] = None
        self.lost = False
        self.lastByte = reactor.seconds()
        self.watch = LoopingCall(self._check)
        self.watch.clock = reactor
        self.watch.start(0.5, now=False)

    def _node(self, address: str) -> str:
        node = self.nodes.get(address)
        return f"node {node}" if node is not None else address

    def stage(self, stage: str, detail: Any) -> None:
        """
        L{download}'s C{onStage}.
        """
        if stage == "receiving":
            header = detail
            if self.bar is None:
                self.bar = Bar(
                    total=header.size,
                    initial=header.offset,
                    desc=self.name,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self.stream,
                    leave=False,
                    dynamic_ncols=True,
                    mininterval=0.2,
                    bar_format=self.FORMAT,
                )
            if not self.resumed and header.offset:
                self.resumed = header.offset
            self.sender = (
                f"node {header.holder}" if header.holder == header.leader else f"node {header.holder} via {header.leader}"
            )
            self.lost = False
            self.lastByte = self.reactor.seconds()
            self._set(None)
        elif stage == "lost":
            self.lost = True
            self._set("stalled \u2014 connection lost, resuming")
        elif stage == "asking" and self.lost:
            self._set(f"stalled \u2014 resuming through {self._node(detail)}")

    def __call__(self, done: int, total: int) -> None:
        """
        L{download}'s C{onProgress}.
        """
        self.lastByte = self.reactor.seconds()
        if self.bar is None:
            return
        if self.stall is not None:
            self._set(None)
        self.bar.update(done - self.bar.n)

    def _check(self) -> None:
        if self.bar is None or self.lost or self.stall is not None:
            return
        if self.reactor.seconds() - self.lastByte >= self.STALL_AFTER:
            self._set(f"stalled \u2014 waiting for {self.sender}")

    def _set(self, stall: Optional[str]) -> None:
        self.stall = stall
        if self.bar is None:
            return
        parts = []
        if self.resumed:
            parts.append(f"resumed {humanSize(self.resumed)}")
        if stall is not None:
            parts.append(stall)
        self.bar.set_postfix_str(", ".join(parts))

    def end(self) -> None:
        """
        Take the bar off the terminal, leaving the cursor at the start of a
        clean line.
        """
        if self.watch.running:
            self.watch.stop()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        # Also wipes a "^C" the terminal echoed.
        self.stream.write("\r\x1b[K")
        self.stream.flush()
