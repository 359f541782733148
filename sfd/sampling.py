"""Sampling with per-seed noise, so an image depends on its seed alone (not on batch size or device).

A student samples with Euler (+ AFS) on its own grid; a teacher samples with any registered solver. Both go
through `generate`, which batches the seeds and binds labels, the SFD-v step and classifier-free guidance.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sfd.schedules import DiscreteVP, get_schedule
from sfd.solvers import solve


@dataclass(frozen=True)
class GridSpec:
    """A sampling grid: `num_steps` timestamps (NFE = N-1, or N-2 with AFS for one-evaluation solvers)."""

    num_steps: int = 4
    afs: bool = True
    schedule: str = "polynomial"
    t_min: float = 0.006
    t_max: float = 80.0
    rho: float = 7.0
    noise_levels: DiscreteVP | None = None  # a discrete-time teacher's levels, for the `discrete` schedule

    def timestamps(self) -> torch.Tensor:
        return get_schedule(self.schedule, self.num_steps, self.t_min, self.t_max, self.rho, self.noise_levels)


def bind(net: Callable, labels: torch.Tensor | None = None, step=None) -> Callable:
    """A two-argument denoiser D(x, sigma) from a network that may take labels / an SFD-v step."""
    kwargs = {}
    if labels is not None:
        kwargs["labels"] = labels
    if step is not None:
        kwargs["step"] = step
    return (lambda x, sigma: net(x, sigma, **kwargs)) if kwargs else net


def guided(net: Callable, labels: torch.Tensor, scale: float, step=None,
           null_labels: torch.Tensor | None = None) -> Callable:
    """Classifier-free guidance in data-prediction form, D = w·D(c) + (1-w)·D(null), which equals the
    epsilon form eps~ = eps(null) + w·(eps(c) - eps(null)) because eps is affine in D. The null label is zeros
    (what EDM-style label dropout trains) unless `null_labels` gives it (a text teacher's empty-prompt
    embedding, one row broadcast over the batch). Scale 1 is the plain conditional model: one evaluation."""
    cond = bind(net, labels, step)
    if scale == 1.0:
        return cond
    null = torch.zeros_like(labels) if null_labels is None else null_labels.to(labels).expand_as(labels)
    uncond = bind(net, null, step)
    return lambda x, sigma: scale * cond(x, sigma) + (1.0 - scale) * uncond(x, sigma)


def seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(seeds), *shape]: one CPU generator per seed, so results are device- and
    batch-independent."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def seed_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """One-hot labels drawn from each seed (offset so they are independent of that seed's noise)."""
    classes = [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(s) + 2**31)))
               for s in seeds]
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


# fp32: true float32 (TF32 off, as the reference runs); tf32: float32 storage with TF32 matrix products and
# convolutions on NVIDIA GPUs since Ampere (the same as fp32 elsewhere); bf16: autocast, fp32 master weights.
PRECISIONS = ("fp32", "tf32", "bf16")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def use_precision(precision: str) -> None:
    """Set the process-wide TF32 switches for `precision`. cuDNN's own default is TF32 on, so without this an
    'fp32' run would silently convolve in TF32 on a GPU; bf16's autocast covers the convolutions itself."""
    _check_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def cudnn_autotune(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each new shape and keep the fastest (every
    iteration and every evaluation batch has the same shapes; EDM's training loop does the same). Runs and the
    benchmark go through here, so `sfd.bench` times what a run does."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast_context(device: torch.device, precision: str):
    """fp32 and tf32 run plainly; bf16 under autocast (weights stay fp32)."""
    _check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(
    net: Callable,
    grid: GridSpec,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    solver: str = "euler",
    num_classes: int = 0,
    class_labels: Sequence[int] | None = None,
    condition: Callable[[Sequence[int]], torch.Tensor] | None = None,
    null_condition: torch.Tensor | None = None,
    guidance: float = 1.0,
    step=None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    solver_opts: dict | None = None,
    progress: Callable[[int], None] | None = None,
    output_device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples for `seeds` (float32, on `output_device`) and their class indices (None when unconditional).

    `class_labels` fixes the class of every seed; otherwise each seed draws its own class. A teacher
    conditioned on something other than classes (text) takes `condition(seeds)`, each seed's conditioning
    (e.g. the embeddings of the prompts the seeds pick), and is guided against `null_condition`.
    """
    device = torch.device(device)
    use_precision(precision)
    cudnn_autotune(device)
    ts = grid.timestamps()
    seeds = [int(s) for s in seeds]
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"class_labels needs one class per seed ({len(seeds)}), got {len(class_labels)}")
    if condition is not None and num_classes:
        raise ValueError("give either num_classes (one-hot class labels) or condition, not both")
    out, classes = [], []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        x = seed_noise(chunk, shape).to(device) * grid.t_max
        denoiser = bind(net, None, step)
        if condition is not None:
            denoiser = guided(net, condition(chunk).to(device), guidance, step, null_condition)
        elif num_classes:
            if class_labels is not None:
                idx = torch.as_tensor(list(class_labels[start:start + batch_size]))
                labels = torch.nn.functional.one_hot(idx, num_classes).float()
            else:
                labels = seed_labels(chunk, num_classes)
            classes.append(labels.argmax(1))
            denoiser = guided(net, labels.to(device), guidance, step)
        with autocast_context(device, precision):
            y = solve(solver, denoiser, x, ts, afs=grid.afs, **(solver_opts or {}))
        out.append(y.float().to(output_device))
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out), (torch.cat(classes) if classes else None)
