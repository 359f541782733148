"""Progress bars over long work (training iterations, evaluation samples), drawn by whoever owns the terminal.

`Bars` is any callable `bars(desc, total, unit) -> bar` whose bar has `update(n)` and `close()`. The library takes
one, or None for silence, and never decides whether to draw: the scripts do (`wanted`: on a terminal, not under
`--quiet`), and hand over `terminal_bars` (tqdm: count, rate and ETA). A study's worker process shares the
terminal with the study process and the other workers, so it draws nothing itself: `SentBars` sends its counts
(`("progress", desc, n, total, unit)`, at most a few times a second) to the study process, whose `BarBoard`
draws one line per worker.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Hashable, Iterator, Protocol

from tqdm import tqdm

SEND_EVERY_S = 0.5  # how often a worker's bar reports its count (and always at the end)


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


Bars = Callable[[str, int, str], Bar]


def wanted(quiet: bool = False, stream=None) -> bool:
    """Whether to show progress: not under --quiet, and only on a terminal (a log or a pipe gets none)."""
    stream = sys.stderr if stream is None else stream
    return not quiet and stream.isatty()


def terminal_bars(desc: str, total: int, unit: str = "it", position: int | None = None) -> tqdm:
    """A tqdm bar on stderr that clears itself when closed."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, position=position)


def say(text: str) -> None:
    """Print a line on stdout without tearing the bars drawn on the terminal (tqdm.write redraws them below it)."""
    tqdm.write(text, file=sys.stdout)


@contextlib.contextmanager
def counting(bars: Bars | None, desc: str, total: int, unit: str,
             callback: Callable | None = None) -> Iterator[Callable | None]:
    """`callback` wrapped so that each call (one per item) also advances a bar of `bars`, closed when the block
    ends; without bars, `callback` itself."""
    if bars is None:
        yield callback
        return
    bar = bars(desc, total, unit)

    def counted(*args) -> None:
        if callback is not None:
            callback(*args)
        bar.update(1)

    try:
        yield counted
    finally:
        bar.close()


class SentBar:
    """A worker's bar: its count goes to the study process (see the module docstring)."""

    def __init__(self, send: Callable[[tuple], None], desc: str, total: int, unit: str):
        self.send, self.desc, self.total, self.unit = send, desc, total, unit
        self.n, self.sent_at = 0, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.sent_at >= SEND_EVERY_S or self.n >= self.total:
            self.sent_at = now
            self.send(("progress", self.desc, self.n, self.total, self.unit))

    def close(self) -> None:
        """Nothing to clear here: the study process closes the worker's line when the trial ends."""


class SentBars:
    """`Bars` for a worker process: `send` is its pipe's send."""

    def __init__(self, send: Callable[[tuple], None]):
        self.send = send

    def __call__(self, desc: str, total: int, unit: str = "it") -> SentBar:
        return SentBar(self.send, desc, total, unit)


class BarBoard:
    """The study process's drawing of its workers' bars: one line per busy worker, labelled with its trial."""

    def __init__(self):
        self.bars: dict[Hashable, tuple[tuple, int, tqdm]] = {}  # worker -> ((label, desc, total), line, its bar)

    def show(self, worker: Hashable, label: str, desc: str, n: int, total: int, unit: str) -> None:
        """`worker` has done `n` of `total` of `desc` for the trial `label`."""
        key = (label, desc, total)
        if worker not in self.bars or self.bars[worker][0] != key:
            self.clear(worker)
            taken = {line for _, line, _ in self.bars.values()}
            line = min(set(range(len(taken) + 1)) - taken)
            self.bars[worker] = (key, line, terminal_bars(f"{label}: {desc}", total, unit, position=line))
        bar = self.bars[worker][2]
        bar.update(n - bar.n)

    def clear(self, worker: Hashable) -> None:
        if worker in self.bars:
            self.bars.pop(worker)[2].close()

    def close(self) -> None:
        for worker in list(self.bars):
            self.clear(worker)
