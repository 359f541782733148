"""One run on several processes (torchrun + DistributedDataParallel): where this process stands among the run's
ranks, the few collectives training and evaluation need, and one view of a failure on every rank.

torchrun describes the group in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
`process_group` joins it (NCCL with one device per local rank on CUDA, gloo on CPU) and yields a `Ranks`. A
single process is `SINGLE`, whose collectives do nothing, so the training loop and the evaluation read the same
either way.

Failures. A collective waits for every rank, so a rank that stops alone would leave the others waiting. Symmetric
stops (a diverged loss, non-finite samples) are decided on all-reduced values, so every rank raises at the same
point. Anything else that raises inside `Ranks.failures()` is first published in torchrun's store with its time;
the earliest failure of any rank is the run's reason: a rank whose collective broke because a peer exited
raises `RankFailed("rank 1: ...")` naming that peer's error. From the first failure on SIGTERM is ignored, so
torchrun's stop signal to the surviving ranks cannot cut short the end of the MLflow run. A rank that hangs is
found by the collective timeout (`SFD_DDP_TIMEOUT_S`, default 600 s).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from sfd.signals import Terminated

TIMEOUT_ENV = "SFD_DDP_TIMEOUT_S"
PARENT_ENV = "SFD_STOP_WITH_PARENT"  # the pid of the process that launched this run and whose death stops it
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEFAULT_TIMEOUT_S = 600.0
_ERROR_KEY = "sfd/failure/rank{}"
_MAX_REASON = 4000


class RankFailed(RuntimeError):
    """Another rank of the run failed first; the message names it and its error."""


class RankStopped(Terminated):
    """Another rank of the run was stopped (Ctrl-C, SIGTERM) first: this run is stopped, not broken."""


# ----- what torchrun put in the environment -------------------------------------------------------------

def launched_world_size() -> int:
    """The number of processes torchrun started for this run (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun numbered it (0 outside torchrun), readable before the group exists."""
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this machine (torchrun's --nproc-per-node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(launched_world_size())))


def torchrun_command(nproc: int, script: str, args: list[str]) -> list[str]:
    """`script args` as torchrun runs it on `nproc` local processes, with this interpreter (single machine:
    `--standalone` picks a free port, so several runs can start side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), script, *args]


def stop_with_parent() -> None:
    """When $SFD_STOP_WITH_PARENT names this process's parent (a study that launched this run), have Linux send
    this process SIGTERM when that parent dies, however it dies (SIGKILL included): prctl(PR_SET_PDEATHSIG),
    which is kept across the exec into torchrun, whose SIGTERM handling then stops every rank (their run ends
    KILLED). The variable is removed so that the ranks do not inherit it. Elsewhere than on Linux: nothing."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # best effort: the launcher still stops the run on its own stops
    if os.getppid() != int(parent):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s global torch generator (its dropout masks): rank 0 keeps the run's seed, so one
    process draws what it always drew; other ranks get independent streams derived from (seed, rank)."""
    return seed if rank == 0 else random.Random(f"sfd-rank/{seed}/{rank}").getrandbits(63)


# ----- this process among the ranks ------------------------------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    """This process's place in a run's process group; `SINGLE` (one process) makes every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that talks to MLflow and reports the run's outcome."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device of this rank: `cuda` becomes this rank's own card, `cuda:<local rank>`."""
        device = torch.device(device)
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.distributed else device

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of `n` rows (n divisible by the world size)."""
        if n % self.world_size:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world_size} ranks")
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place, on every rank (no host sync)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks, on every rank (gloo has no AVG: a sum, divided)."""
        if not self.distributed:
            return tensor
        return self.sum_(tensor.clone()) / self.world_size

    def gather(self, obj: Any) -> list | None:
        """Every rank's `obj` (picklable; keep tensors on the CPU), in rank order, on rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def weight_spread(self, module: torch.nn.Module) -> float:
        """max |w - w_rank0| over every parameter and rank: 0.0 when the ranks hold the same weights, as DDP
        should leave them (one broadcast of the weights)."""
        if not self.distributed:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        spread = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        return float(spread)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Publish an error raised inside the block and raise the run's root cause in its place (see the module
        docstring). A single process passes errors through untouched."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except (Exception, KeyboardInterrupt) as exc:
            cause = self._root_cause(exc)
            if cause is exc:
                raise
            raise cause from exc

    def _root_cause(self, exc: BaseException) -> BaseException:
        if isinstance(exc, (RankFailed, RankStopped)):  # already attributed by an inner block
            return exc
        _ignore_sigterm()
        store = _store()
        if store is None:
            return exc
        reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        try:
            key = _ERROR_KEY.format(self.rank)
            if not store.check([key]):
                record = {"time": time.time(), "stop": isinstance(exc, KeyboardInterrupt), "reason": reason}
                store.set(key, json.dumps(record))
            first_rank, first = min(_published(store, self.world_size), key=lambda item: item[1]["time"])
        except Exception:  # noqa: BLE001 - the store went away with torchrun: this rank's own error stands
            return exc
        if first_rank == self.rank or first["reason"] == reason:  # this rank's, or one every rank met alike
            return exc
        if first["stop"]:
            return RankStopped(f"rank {first_rank} was stopped first ({first['reason']})")
        return RankFailed(f"rank {first_rank}: {first['reason']}")


SINGLE = Ranks()


def _store():
    """torchrun's key-value store, which outlives the worker processes (None when unreachable)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default group, or a torch without it
        return None


def _published(store, world_size: int) -> list[tuple[int, dict]]:
    keys = [(r, _ERROR_KEY.format(r)) for r in range(world_size)]
    return [(r, json.loads(store.get(key))) for r, key in keys if store.check([key])]


def _ignore_sigterm() -> None:
    """torchrun answers one rank's exit with SIGTERM to the others: a rank already handling the failure finishes
    ending its run instead (torchrun still kills it if it takes longer than its grace period)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


@contextlib.contextmanager
def process_group(world_size: int, device: torch.device) -> Iterator[Ranks]:
    """Join the process group torchrun set up for `world_size` processes (SINGLE for 1): NCCL with this rank's
    card on CUDA, gloo otherwise. A group this call created is destroyed after a clean exit; after an error it is
    left to the process's exit (destroying an NCCL group whose peers are gone can hang)."""
    if world_size == 1:
        yield SINGLE
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = not dist.is_initialized()
    if created:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=collective_timeout(), device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=collective_timeout())
    yield Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
    if created:
        dist.destroy_process_group()
