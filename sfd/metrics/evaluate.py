"""One evaluation entry for every row of the paper's tables: a distilled student at its NFE, or a teacher
sampled with a named solver (the "solver-based methods" rows).

Seeds 0..n-1 each draw their own noise (and class), so sample i is the same image whatever the batch size.
Samples are produced batch by batch and folded into running statistics, so 50k CIFAR samples never sit in
memory at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image
from torchvision.utils import make_grid

from sfd import solvers
from sfd.assets import FID_REFS, require
from sfd.compiling import runs_compiled
from sfd.distributed import SINGLE, Ranks
from sfd.metrics import digits
from sfd.metrics.fd import FeatureStats, frechet_distance, load_stats
from sfd.metrics.gap import GAP_NFE, GAP_SOLVER, per_sample_rmse, reference_grid, teacher_reference
from sfd.metrics.inception import FEATURE_DIM, InceptionFeatures, to_uint8
from sfd.metrics.names import unfit_reason
from sfd.progress import Bars
from sfd.sampling import GridSpec, generate

FID_NUM_SAMPLES = 50_000
SMALL_NUM_SAMPLES = 1_000


class NonFiniteSamplesError(ValueError):
    """Some samples are NaN or inf: every metric of them would be meaningless (FID would score NaN as black)."""


@dataclass
class Sampler:
    """What to sample: a network, a grid and the solver that walks it (Euler for a student)."""

    net: Callable
    grid: GridSpec
    solver: str = "euler"
    step: int | None = None  # SFD-v step condition
    guidance: float = 1.0
    num_classes: int = 0
    solver_opts: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample; guidance != 1 evaluates the model twice per call."""
        n = solvers.nfe(self.solver, self.grid.num_steps, self.grid.afs)
        return 2 * n if (self.num_classes and self.guidance != 1.0) else n

    def sample(self, seeds, shape, *, device, batch_size: int, precision: str = "fp32", class_labels=None):
        """Samples stay on `device`: metrics accumulate there without a host copy per batch."""
        return generate(self.net, self.grid, seeds, shape, solver=self.solver, num_classes=self.num_classes,
                        class_labels=class_labels, guidance=self.guidance, step=self.step,
                        batch_size=batch_size, device=device, precision=precision, solver_opts=self.solver_opts,
                        output_device=device)


def student_sampler(net, grid: GridSpec, *, step: int | None = None, guidance: float = 1.0,
                    num_classes: int = 0) -> Sampler:
    return Sampler(net=net, grid=grid, solver="euler", step=step, guidance=guidance, num_classes=num_classes)


def solver_sampler(net, solver: str, nfe: int, *, afs: bool = False, schedule: str = "polynomial",
                   t_min: float = 0.002, t_max: float = 80.0, rho: float = 7.0, guidance: float = 1.0,
                   num_classes: int = 0, solver_opts: dict | None = None) -> Sampler:
    """A teacher sampled with `solver` on the grid that costs exactly `nfe` evaluations."""
    grid = GridSpec(num_steps=solvers.num_steps_for_nfe(solver, nfe, afs), afs=afs, schedule=schedule,
                    t_min=t_min, t_max=t_max, rho=rho)
    return Sampler(net=net, grid=grid, solver=solver, guidance=guidance, num_classes=num_classes,
                   solver_opts=dict(solver_opts or {}))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    grid_image: "object"  # PIL.Image.Image
    num_samples: int
    seconds: float


def default_num_samples(teacher, metrics) -> int:
    return FID_NUM_SAMPLES if "fid" in metrics else SMALL_NUM_SAMPLES


def check_metrics(metrics, teacher, sampler: Sampler | None = None) -> None:
    """Clear errors before sampling: unknown names, digits metrics on other data, accuracy without classes."""
    for m in metrics:
        reason = unfit_reason(m, teacher.name, teacher.dataset, teacher.num_classes)
        if reason:
            raise ValueError(reason)


class _FID:
    """Inception pool3 statistics of the samples vs the dataset's reference statistics (EDM's fid-refs)."""

    def __init__(self, teacher, device, weights_path=None, ref_path=None):
        if teacher.dataset not in FID_REFS:
            raise ValueError(f"no FID reference statistics are registered for dataset {teacher.dataset!r}")
        self.ref = load_stats(require(FID_REFS[teacher.dataset], path=ref_path))
        self.features = InceptionFeatures(weights_path, device=device)
        self.stats = FeatureStats()
        self.device = device

    def update(self, samples: torch.Tensor) -> None:
        self.stats.update(self.features(to_uint8(samples)))

    def all_reduce(self, ranks: Ranks) -> None:
        self.stats.all_reduce(ranks, FEATURE_DIM, self.device)

    def result(self) -> float:
        return frechet_distance(self.stats.mu, self.stats.sigma, *self.ref)


def _sample_grid(samples: torch.Tensor, n: int = 64):
    x = samples[:n]
    grid = make_grid(to_uint8(x), nrow=int(len(x) ** 0.5 + 0.999), padding=1, pad_value=0)
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def evaluate(
    sampler: Sampler,
    teacher,
    metrics,
    num_samples: int | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: Bars | None = None,
    gap_solver: str = GAP_SOLVER,
    gap_nfe: int = GAP_NFE,
    inception_weights=None,
    fid_ref=None,
    class_labels=None,
    reference_cache: dict | None = None,
    ranks: Ranks = SINGLE,
) -> EvalResult:
    """Sample seeds 0..num_samples-1 and compute `metrics` (names of sfd.metrics.names.METRICS). Returns the
    metrics and a grid image. `progress` (sfd.progress): a bar over the samples (rank 0's); None: silent.

    `reference_cache`: a dict shared by evaluations of one teacher (e.g. an SFD-v student at each NFE); the
    teacher-gap reference of a batch of seeds is solved once and reused wherever its inputs are the same.

    `ranks` (a DDP run, see `sfd.distributed`): batch k of seeds is sampled by rank k mod world_size, so every
    batch, and so every sample, is the one a single process draws. FID statistics are float64 sums all-reduced;
    the digits samples, their classes and the teacher-gap values are gathered to rank 0 in seed order; rank 0
    computes the metrics and sends them to every rank. The grid image (the first batch) is rank 0's; other ranks
    get None.
    """
    metrics = list(metrics)
    check_metrics(metrics, teacher, sampler)
    num_samples = num_samples or default_num_samples(teacher, metrics)
    fid = _FID(teacher, device, inception_weights, fid_ref) if "fid" in metrics else None  # fails early
    start = time.perf_counter()
    kept, classes, gaps, first = [], [], [], None  # kept, classes, gaps: (first seed, values) per batch
    nonfinite = torch.zeros((), dtype=torch.long, device=device)  # counted on the device: no sync per batch
    mine = range(0, num_samples, batch_size)[ranks.rank::ranks.world_size]
    bar = (progress(f"evaluate (NFE {sampler.nfe})", sum(min(batch_size, num_samples - lo) for lo in mine), "sample")
           if progress and ranks.is_main else None)
    for lo in mine:
        seeds = list(range(lo, min(lo + batch_size, num_samples)))
        labels = None if class_labels is None else class_labels[lo:lo + len(seeds)]
        samples, cls = sample_batch(sampler, seeds, teacher.shape, device, batch_size, precision, labels)
        nonfinite += (~torch.isfinite(samples)).flatten(1).any(1).sum()
        samples = samples.clamp(-1, 1)  # keeps NaN, which the uint8 conversion would turn into black pixels
        if lo == 0:
            first = samples.cpu()
        if fid is not None:
            fid.update(samples)
        if teacher.dataset == "digits":
            kept.append((lo, samples.cpu()))
        if cls is not None:
            classes.append((lo, cls.cpu()))
        if "teacher_gap" in metrics:
            key = (reference_grid(sampler.grid, gap_solver, gap_nfe), gap_solver, tuple(seeds), sampler.num_classes,
                   sampler.guidance, None if labels is None else tuple(int(c) for c in labels), precision)
            cache = reference_cache if reference_cache is not None else {}
            if key not in cache:
                cache[key] = teacher_reference(teacher.net, sampler.grid, seeds, teacher.shape, solver=gap_solver,
                                               nfe=gap_nfe, num_classes=sampler.num_classes,
                                               guidance=sampler.guidance, class_labels=labels,
                                               batch_size=batch_size, device=device, precision=precision,
                                               output_device=device)
            ref = cache[key]
            gaps.append((lo, per_sample_rmse(samples, ref.clamp(-1, 1))))
        if bar is not None:
            bar.update(len(seeds))
    if bar is not None:
        bar.close()
    if int(ranks.sum_(nonfinite)):  # every rank raises alike
        raise NonFiniteSamplesError(f"{int(nonfinite)} of {num_samples} samples contain NaN or inf (the sampler "
                                    f"diverged at NFE {sampler.nfe}); no metric is computed from them")
    if fid is not None:
        fid.all_reduce(ranks)
    kept, classes, gaps = _in_seed_order(ranks, kept, classes, [(lo, g.cpu()) for lo, g in gaps])
    results = _finish(metrics, fid, kept, classes, gaps) if ranks.is_main else None
    return EvalResult(metrics=ranks.broadcast(results), grid_image=_sample_grid(first) if ranks.is_main else None,
                      num_samples=num_samples, seconds=time.perf_counter() - start)


def _in_seed_order(ranks: Ranks, *pieces: list) -> list[list[torch.Tensor]]:
    """Each list of (first seed, tensor) pieces, gathered from every rank to rank 0 and put in seed order; other
    ranks get empty lists."""
    gathered = ranks.gather(pieces)
    if gathered is None:
        return [[] for _ in pieces]
    return [[t for _, t in sorted((p for rank_pieces in gathered for p in rank_pieces[i]), key=lambda p: p[0])]
            for i in range(len(pieces))]


def sample_batch(sampler: Sampler, seeds: list[int], shape, device, batch_size: int, precision: str, labels):
    """One batch of samples. A compiled network is given full batches only, since a ragged last batch would
    compile a second graph: the batch is filled with the seeds that follow and their samples dropped (each
    seed has its own noise, so the kept samples are the same either way)."""
    n = len(seeds)
    if n < batch_size and runs_compiled(sampler.net):
        seeds = seeds + list(range(seeds[-1] + 1, seeds[-1] + 1 + batch_size - n))
        labels = None if labels is None else [int(c) for c in labels] + [0] * (batch_size - n)
    samples, cls = sampler.sample(seeds, shape, device=device, batch_size=batch_size, precision=precision,
                                  class_labels=labels)
    return samples[:n], (None if cls is None else cls[:n])


def _finish(metrics, fid, kept, classes, gaps) -> dict[str, float]:
    out: dict[str, float] = {}
    if fid is not None:
        out["fid"] = fid.result()
    if kept:
        images = torch.cat(kept)
        if "fd_digits" in metrics:
            out["fd_digits"] = digits.fd_digits(images)
        if "pixel_fd" in metrics:
            out["pixel_fd"] = digits.pixel_fd(images)
        if "class_accuracy" in metrics:
            out["class_accuracy"] = digits.class_accuracy(images, torch.cat(classes))
    if gaps:
        rmse = torch.cat(gaps).cpu()
        out["teacher_gap_mean"] = float(rmse.mean())
        out["teacher_gap_std"] = float(rmse.std()) if len(rmse) > 1 else 0.0
    return out
