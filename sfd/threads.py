"""How many CPU threads a run computes with: the run setting `threads` (`auto` or a count >= 1).

`auto` is one thread per process on a CPU. PyTorch's intra-op threads (OpenMP) meet at a barrier after every
operator, and a small network's operators take microseconds: on idle cores two threads make a digits iteration
~1.4x faster, but as soon as another CPU-bound process holds a core, every operator waits for the thread that is
off the CPU while the others spin, and the run gets many times slower (one digits run beside one busy process:
343 s instead of 39 s; README "On a CPU"; `python -m sfd.bench threads` measures it per thread count). One thread has no barrier to wait at: it slows
down only by its share of the cores, and its CPU time does not depend on what else runs, so it can be compared
across runs (`train/device_hours`). A study uses the other cores by running rows side by side, one worker
process per core (`studies/run.py --devices auto`). On a GPU `auto` leaves PyTorch's default: the host threads
only feed the card.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from threadpoolctl import threadpool_limits

AUTO = "auto"


def is_thread_setting(value) -> bool:
    """Whether `value` is a valid `threads` setting: `auto` or an integer >= 1 (not a bool)."""
    return value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def thread_count(setting, device: torch.device) -> int | None:
    """The intra-op thread count a run with this `threads` setting uses on `device`: a count as given; `auto`: on a
    CPU $OMP_NUM_THREADS when it is set (the user's choice, and torchrun's 1 per process), else 1; elsewhere None
    (PyTorch's default)."""
    if setting != AUTO:
        return int(setting)
    if torch.device(device).type != "cpu":
        return None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) >= 1 else 1


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads and the BLAS libraries' (numpy, scipy: the Fréchet distance's matrix square
    root) set to `count` for the block, then restored; None changes nothing."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)
