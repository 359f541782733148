"""Shared by the DDP tests: a real 2-rank gloo process group in spawned subprocesses (`run_ranks`), and what each
rank runs in it. Every case is also run in one process by the tests, which compare the two.

Each rank joins with `torch.distributed.init_process_group("gloo", init_method="file://...")` (a FileStore, so
no port is needed), runs one function with its `sfd.distributed.Ranks`, and saves what it returns with
`torch.save` for the test to read.
"""
from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

import sfd.metrics.evaluate
from sfd.distill import DistillSettings, Distiller, DivergedError
from sfd.distributed import SINGLE, Ranks
from sfd.metrics.evaluate import evaluate, student_sampler
from sfd.metrics.fd import FeatureStats, save_stats
from sfd.metrics.inception import FEATURE_DIM
from sfd.networks.edm import EDMPrecond
from sfd.sampling import GridSpec
from sfd.teachers import get_teacher


# ----- the process group ------------------------------------------------------------------------------------

def run_ranks(fn, tmp_path: Path, *args, world: int = 2, timeout: float = 240.0) -> list:
    """`fn(ranks, *args)` on `world` spawned processes joined in one gloo group; their results in rank order.
    A rank that raises fails the call; ranks still running after `timeout` s are killed (a hang is a failure)."""
    out = Path(tmp_path) / f"ranks-{time.monotonic_ns()}"
    out.mkdir()
    context = torch.multiprocessing.start_processes(_rank_main, args=(fn, world, str(out), args), nprocs=world,
                                                    join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks still running after {timeout} s (a hang)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank_main(rank: int, fn, world: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)  # as the test process: same kernels, so per-batch results match bit for bit
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(fn(Ranks(rank, world, rank), *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ----- evaluation sharded by seed ----------------------------------------------------------------------------

class PixelFeatures:
    """Stands in for `InceptionFeatures` where only the statistics' sharding is under test: the same interface
    (uint8 images [B, C, H, W] -> float32 features [B, 2048]), features a fixed random projection of the pixels,
    so a test needs no 100 MB network."""

    def __init__(self, weights_path=None, device="cpu"):
        self.projection = torch.randn(64, FEATURE_DIM, generator=torch.Generator().manual_seed(5)).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1).float() / 255.0) @ self.projection


def eval_cases(fid_ref: Path) -> dict:
    """name -> (sampler, teacher, metrics, evaluate kwargs). Batch sizes leave ragged last batches and ranks
    with unequal numbers of batches."""
    gmm = get_teacher("gmm-img-4")
    digits = get_teacher("digits-cond")
    image_gmm = dataclasses.replace(gmm, dataset="cifar10")  # a dataset with FID statistics
    grid = GridSpec(num_steps=4, afs=True)
    return {
        "gap": (student_sampler(gmm.net, grid), gmm, ["teacher_gap"], dict(num_samples=10, batch_size=3, gap_nfe=8)),
        "digits": (student_sampler(digits.net, grid, num_classes=10), digits, ["fd_digits", "pixel_fd", "class_accuracy"],
                   dict(num_samples=24, batch_size=5)),
        "fid": (student_sampler(gmm.net, grid), image_gmm, ["fid"], dict(num_samples=9, batch_size=2, fid_ref=fid_ref)),
    }


def write_fid_reference(path: Path) -> Path:
    """Reference statistics for the `fid` case: PixelFeatures of uint8 noise images."""
    noise = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    stats = FeatureStats()
    stats.update(PixelFeatures()(noise))
    return save_stats(path, stats.mu, stats.sigma)


def evaluate_cases(ranks: Ranks, fid_ref: Path) -> dict:
    """Every `eval_cases` entry evaluated with `ranks`: metrics and the grid image (None off rank 0). FID's
    features come from `sfd.metrics.evaluate.InceptionFeatures`, which the caller replaces by PixelFeatures."""
    out = {}
    for name, (sampler, teacher, metrics, kwargs) in eval_cases(fid_ref).items():
        result = evaluate(sampler, teacher, metrics, progress=False, ranks=ranks, **kwargs)
        out[name] = result.metrics
        out[f"{name}/grid"] = None if result.grid_image is None else np.asarray(result.grid_image)
    return out


def evaluate_on_rank(ranks: Ranks, fid_ref: Path) -> dict:
    """In a spawned rank, in one spawn (a process start costs seconds): `shard_statistics`, and `evaluate_cases`
    with PixelFeatures for Inception (in that process only)."""
    sfd.metrics.evaluate.InceptionFeatures = PixelFeatures
    return {"statistics": shard_statistics(ranks), "evaluate": evaluate_cases(ranks, fid_ref)}


def shard_statistics(ranks: Ranks) -> dict:
    """FeatureStats of 37 float64 feature rows split 20/17 over two ranks, and of all rows on rank 0 alone
    (rank 1 saw none), each all-reduced."""
    features = torch.randn(37, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    split = FeatureStats()
    split.update(features[:20] if ranks.rank == 0 else features[20:])
    split.all_reduce(ranks, 16, "cpu")
    one_rank = FeatureStats()
    if ranks.rank == 0:
        one_rank.update(features)
    one_rank.all_reduce(ranks, 16, "cpu")
    return {"split": (split.num, split.mu, split.sigma), "one_rank": (one_rank.num, one_rank.mu, one_rank.sigma)}


# ----- training on several ranks -------------------------------------------------------------------------------

GMM_SETTINGS = dict(batch_size=8, total_kimg=0.04, lr=1e-3, m=1, seed=3, nan_check_every=1,
                    grid=GridSpec(num_steps=4, afs=True))  # 5 iterations


def train_gmm(ranks: Ranks = SINGLE, micro_batch_size: int | None = None, nan_grad_rank: int | None = None) -> dict:
    """A few SFD iterations of the MLP student on an analytic mixture: the final weights, the gradient handed to
    the optimizer at each student step of the first iteration, and N and the logged per-step losses of every
    iteration. `nan_grad_rank`: that rank's gradient of the first layer's weight is NaN in the second student
    step."""
    teacher = get_teacher("gmm-img-4")
    torch.manual_seed(0)
    student = teacher.make_student()
    seen, grads = [], []
    distiller = Distiller(teacher.net, student, DistillSettings(micro_batch_size=micro_batch_size, **GMM_SETTINGS),
                          callback=lambda s: seen.append((s.num_steps, s.step_losses.clone())), ranks=ranks)
    step = distiller.opt.step

    def recording_step(*args, **kwargs):
        if not seen:  # the first iteration
            grads.append(torch.cat([p.grad.flatten().clone() for p in distiller.params]))
        return step(*args, **kwargs)

    distiller.opt.step = recording_step
    if nan_grad_rank == ranks.rank:
        calls = []

        def nan_in_second_step(grad):
            calls.append(1)
            return grad * torch.nan if len(calls) == 2 else grad

        student.net[0].weight.register_hook(nan_in_second_step)
    distiller.run(teacher.shape)
    return {"state": {k: v.clone() for k, v in student.state_dict().items()}, "seen": seen, "grads": grads,
            "spread": ranks.weight_spread(student), "frozen": distiller.frozen}


def tiny_edm(step_condition: bool) -> EDMPrecond:
    """A 1x8x8 SongUNet with an augmentation-label layer (as EDM's CIFAR-10 network has), which distillation
    never feeds: DDP would fail on it unless it is frozen."""
    torch.manual_seed(1)
    return EDMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[], dropout=0.1, augment_dim=9, step_condition=step_condition)


def train_sfdv_with_unused_layer(ranks: Ranks) -> dict:
    """SFD-v (N drawn per iteration) on `tiny_edm`: N per iteration, frozen parameter names, the weights."""
    teacher = tiny_edm(False).eval().requires_grad_(False)
    student = tiny_edm(True)
    student.load_state_dict(teacher.state_dict(), strict=False)
    settings = DistillSettings(batch_size=4, total_kimg=0.012, m=0, seed=1, num_steps_choices=(4, 5, 6),
                               grid=GridSpec(num_steps=4, afs=True))
    steps = []
    distiller = Distiller(teacher, student, settings, callback=lambda s: steps.append(s.num_steps), ranks=ranks)
    distiller.run((1, 8, 8))
    return {"steps": steps, "frozen": distiller.frozen, "spread": ranks.weight_spread(student),
            "state": {k: v.clone() for k, v in student.state_dict().items()}}


def diverge_on_one_rank(ranks: Ranks, bad_rank: int) -> str:
    """`bad_rank`'s losses turn NaN from its second iteration (nan_check_every=2): what each rank raises."""
    teacher = get_teacher("gmm-img-4")
    torch.manual_seed(0)
    distiller = Distiller(teacher.net, teacher.make_student(), DistillSettings(**{**GMM_SETTINGS, "nan_check_every": 2}),
                          ranks=ranks)
    if ranks.rank == bad_rank:
        original, calls = distiller.sfd_iteration, []

        def nan_after_first(num_steps):
            calls.append(num_steps)
            losses, *rest = original(num_steps)
            return (losses * torch.nan if len(calls) > 1 else losses, *rest)

        distiller.sfd_iteration = nan_after_first
    try:
        distiller.run(teacher.shape)
    except DivergedError as exc:
        return f"DivergedError: {exc}"
    return "finished"


def distill_cases(ranks: Ranks) -> dict:
    """Every training case on `ranks`, in one spawn (a process start costs seconds)."""
    return {"gmm": train_gmm(ranks, micro_batch_size=2), "nan_grad": train_gmm(ranks, nan_grad_rank=1),
            "sfdv": train_sfdv_with_unused_layer(ranks), "diverge": diverge_on_one_rank(ranks, bad_rank=1)}
