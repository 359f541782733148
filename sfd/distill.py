"""The distillation loops: Algorithm 2 (SFD, "global"), Algorithm 1 (vanilla, "local"), SFD-v's variable
grid and the second stage (spec §5, §6, §8–10).

One loop serves all of them. The core knows nothing about tracking: it reports each iteration to a
callback with the per-step losses as a device tensor (no host sync), and the caller decides what to log.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from sfd.compiling import maybe_compile
from sfd.distributed import SINGLE, Ranks
from sfd.losses import get_loss
from sfd.networks.edm import GROUP_NORMS, set_group_norm
from sfd.sampling import GridSpec, autocast_context, bind, cudnn_autotune, use_precision
from sfd.schedules import get_schedule, refine_grid
from sfd.solvers import afs_derivative, check_solver, solve

ALGORITHMS = ("sfd", "vanilla")
# DDP without a buffer broadcast before every forward (our networks' buffers are constants, synced once at
# construction); torch 2.14 renamed the switch and warns on the old name.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the run is recorded as failed with this reason."""


@dataclass
class DistillSettings:
    """Everything the loop needs; `sfd.config` maps a run's YAML onto this."""

    algorithm: str = "sfd"
    grid: GridSpec = field(default_factory=GridSpec)
    # SFD-v: draw N from these per iteration and feed it to the student as its step condition.
    num_steps_choices: tuple[int, ...] | None = None
    teacher_solver: str = "dpmpp3m"
    teacher_opts: dict = field(default_factory=dict)
    teacher_afs: bool = False  # the paper's teacher trajectory has no AFS (spec §4)
    teacher_step: int | None = None  # second stage from an SFD-v teacher: its step condition
    m: int = 3  # intermediate teacher steps per student step (K = m + 1)
    loss: str = "l1"
    loss_opts: dict = field(default_factory=dict)
    final_loss: str | None = None  # second stage: e.g. "lpips" added on the last student step
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_decay_at: float = 0.5  # fraction of the budget after which lr is divided by lr_decay_factor (lr_at)
    lr_decay_factor: float = 10.0
    batch_size: int = 128
    # Trajectories per forward/backward pass (None: the whole batch). Smaller values accumulate each student
    # step's gradient over micro-batches before its one optimizer step (the reference accumulates SD to 128).
    micro_batch_size: int | None = None
    total_kimg: float = 200.0
    num_classes: int = 0  # >0: one random one-hot label per trajectory
    precision: str = "fp32"  # see sfd.sampling.PRECISIONS; "bf16": autocast forwards, fp32 master weights
    compile: bool = False  # torch.compile teacher and student forwards (falls back to eager on failure)
    compile_mode: str | None = None  # e.g. "max-autotune-no-cudagraphs"; None = torch's default
    compile_backend: str = "inductor"
    channels_last: bool = False  # NHWC memory format for image networks (faster convolutions on GPU)
    group_norm: str = "native"  # EDM networks' group-norm computation, see sfd.networks.edm.GROUP_NORMS
    seed: int = 0
    vanilla_data_free: bool = False  # Algorithm 1 without data: x_{n+1} from the teacher's trajectory
    nan_check_every: int = 50  # iterations between (host-syncing) divergence checks

    @property
    def total_iterations(self) -> int:
        # rounded before the ceiling: 16.1 kimg at batch 100 is 161.00000000000003 iterations in floating point
        return max(1, math.ceil(round(self.total_kimg * 1000 / self.batch_size, 6)))

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        check_solver(self.teacher_solver)
        for n in self.num_steps_choices or (self.grid.num_steps,):
            get_schedule(self.grid.schedule, n, self.grid.t_min, self.grid.t_max, self.grid.rho, self.grid.noise_levels)
            if self.grid.afs and n < 3:
                raise ValueError(f"AFS needs at least 3 student timestamps, got num_steps={n}")
        if self.group_norm not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {self.group_norm!r}")
        if self.m < 0:
            raise ValueError(f"m (intermediate teacher steps) must be >= 0, got {self.m}")
        if self.batch_size < 1 or self.total_kimg <= 0 or self.lr <= 0:
            raise ValueError("batch_size, total_kimg and lr must be positive")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(f"micro_batch_size must be between 1 and batch_size ({self.batch_size}), "
                             f"got {self.micro_batch_size!r}")


@dataclass
class IterationStats:
    iteration: int
    kimg: float
    lr: float
    num_steps: int
    step_losses: torch.Tensor  # [trained student steps], detached, on the training device
    teacher_seconds: float
    student_seconds: float
    step_indices: tuple[int, ...] = ()  # the grid step (t_n -> t_n+1) each loss belongs to


def sanitize_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """NaN -> 0, +-inf -> +-1e5, in place and without a host sync (reference behaviour, spec §8)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


def prepare_network(net, *, channels_last: bool, group_norm: str):
    """Group-norm computation and memory format, set on an image network itself (before compiling it);
    anything that is not a torch module (an analytic teacher) is returned untouched."""
    if isinstance(net, torch.nn.Module):
        set_group_norm(net, group_norm)
        # both ways: a study's trials share one cached teacher, which an earlier trial may have made NHWC
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return net


def conditional_branch_only(net: torch.nn.Module) -> torch.nn.Module:
    """Switch off classifier-free label dropout (spec §11: distil with ω = 1, the conditional branch only): a
    train-mode student would otherwise see the null label on some trajectories whose targets the conditional
    teacher made. Ordinary dropout stays on."""
    for module in net.modules():
        if getattr(module, "label_dropout", 0):
            module.label_dropout = 0.0
    return net


def make_student(teacher: torch.nn.Module) -> torch.nn.Module:
    """The default student: a trainable full copy of the teacher network, in train mode (dropout on)."""
    student = copy.deepcopy(teacher)
    student.requires_grad_(True).train()
    return student


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work: twice per iteration, to time the teacher and student phases apart."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_hot_labels(n: int, num_classes: int, generator: torch.Generator, device) -> torch.Tensor | None:
    if not num_classes:
        return None
    idx = torch.randint(num_classes, (n,), generator=generator, device=generator.device)
    return torch.nn.functional.one_hot(idx, num_classes).float().to(device)


def _chunks(x: torch.Tensor | None, size: int, count: int) -> list:
    """`x` split into micro-batches of `size` along the batch axis (`count` Nones for no labels)."""
    return [None] * count if x is None else list(x.split(size))


class Distiller:
    """Runs Algorithm 1 or 2 for `settings.total_iterations` iterations, training `student` in place.

    `conditioning(n, rng)`, where given, draws the conditioning of n trajectories (e.g. the text embeddings of
    n random prompts) in place of `settings.num_classes` one-hot labels; `rng` is the loop's random.Random.

    `ranks` (see `sfd.distributed`): with several, the student is wrapped in DistributedDataParallel and the
    global batch `settings.batch_size` is split over the ranks. Every rank draws the whole batch's noise, labels,
    data and N from the run's seed and keeps its own rows, so teacher targets and the averaged gradient are the
    one-process ones up to floating-point reduction order. The per-step losses are averaged over the ranks each
    iteration, so the logged loss is the global batch's and the divergence check stops every rank together.
    """

    def __init__(self, teacher, student: torch.nn.Module, settings: DistillSettings, *,
                 device: str | torch.device = "cpu", data: Iterable | None = None,
                 callback: Callable[[IterationStats], None] | None = None,
                 conditioning: Callable[[int, random.Random], torch.Tensor] | None = None,
                 ranks: Ranks = SINGLE):
        settings.validate()
        if settings.batch_size % ranks.world_size:
            raise ValueError(f"batch_size {settings.batch_size} does not split evenly over {ranks.world_size} ranks")
        if settings.algorithm == "vanilla" and data is None and not settings.vanilla_data_free:
            raise ValueError("Algorithm 1 (vanilla) needs a data source, or vanilla_data_free=True")
        self.s = settings
        self.device = torch.device(device)
        self.teacher = teacher
        if isinstance(teacher, torch.nn.Module):
            teacher.eval().requires_grad_(False)
        self.student = conditional_branch_only(student.to(self.device).train())
        use_precision(settings.precision)
        cudnn_autotune(self.device)
        for net in (teacher, self.student):
            prepare_network(net, channels_last=settings.channels_last, group_norm=settings.group_norm)
        compile_args = (settings.compile, settings.compile_mode, settings.compile_backend)
        self.teacher_fwd = maybe_compile(teacher, *compile_args)
        self.student_fwd = maybe_compile(self.student, *compile_args)
        self.ranks = ranks
        self.ddp: DistributedDataParallel | None = None  # wrapped at the start of run(), once shapes are known
        self.frozen: list[str] = []  # parameters no student step uses, frozen before wrapping
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(self.params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                    fused=fused or None)
        self.loss_fn = self._to_device(get_loss(settings.loss, **settings.loss_opts))
        self.final_loss_fn = self._to_device(get_loss(settings.final_loss)) if settings.final_loss else None
        self.callback = callback
        self.conditioning = conditioning
        self.data = data
        self._data_iter: Iterator | None = None
        self.gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        self.shape: tuple[int, ...] | None = None

    def _to_device(self, fn):
        return fn.to(self.device) if isinstance(fn, torch.nn.Module) else fn

    # ----- several ranks ---------------------------------------------------------------------------------
    def _wrap_ddp(self) -> None:
        """DistributedDataParallel around the student (its construction gives every rank rank 0's weights).
        Parameters that no student step uses (EDM's augmentation-label layer: distillation passes no augment
        labels) are frozen first, as DDP expects every trained parameter to get a gradient in each backward;
        a single process leaves them untouched too, since they never get a gradient (Adam skips them)."""
        unused = self._unused_parameters()
        for p in unused.values():
            p.requires_grad_(False)
        self.frozen = sorted(unused)
        self.params = [p for p in self.params if p.requires_grad]
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.student, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)
        compile_args = (self.s.compile, self.s.compile_mode, self.s.compile_backend)
        self.student_fwd = maybe_compile(self.ddp, *compile_args)

    def _unused_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters that one student call, conditioned as the loop conditions it, leaves without a
        gradient. The probe keeps the random streams untouched (dropout draws from the global generator)."""
        named = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        x = torch.zeros(1, *self.shape, device=self.device)
        if self.conditioning is not None:
            labels = self.conditioning(1, random.Random(0)).to(self.device)
        else:
            labels = _one_hot_labels(1, self.s.num_classes, torch.Generator(device=self.device), self.device)
        step = self.s.num_steps_choices[0] if self.s.num_steps_choices else None
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = bind(self.student, labels, step)(x, float(self.s.grid.t_max))
            grads = torch.autograd.grad(out.float().sum(), list(named.values()), allow_unused=True)
        return {n: p for (n, p), g in zip(named.items(), grads) if g is None}

    def _grad_sync(self, last: bool):
        """Micro-batches accumulate locally; only the last one's backward all-reduces the gradient."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def _mine(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's rows of a tensor drawn for the whole global batch."""
        return None if x is None else x[self.ranks.rows(x.shape[0])]

    # ----- grids -------------------------------------------------------------------------------------
    def grids(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher grid, student grid); the student grid is every (m+1)-th teacher timestamp, exactly."""
        g = self.s.grid
        teacher_grid = refine_grid(g.schedule, num_steps, g.t_min, g.t_max, g.rho, self.s.m, g.noise_levels)
        return teacher_grid, teacher_grid[:: self.s.m + 1]

    def draw_num_steps(self) -> int:
        return self.rng.choice(self.s.num_steps_choices) if self.s.num_steps_choices else self.s.grid.num_steps

    # ----- pieces ------------------------------------------------------------------------------------
    def lr_at(self, iteration: int) -> float:
        """The reference's schedule (spec §14): after each iteration it compares the trajectories seen *before*
        that iteration with the decay point, then lowers lr for the iterations that follow. So iteration k (from
        0) runs at lr / factor iff k >= 1 and (k - 1)·batch >= lr_decay_at · budget in trajectories (200 kimg at
        batch 128: from iteration 783)."""
        seen_before_previous = (iteration - 1) * self.s.batch_size
        decayed = iteration >= 1 and seen_before_previous >= self.s.lr_decay_at * self.s.total_kimg * 1000
        return self.s.lr / self.s.lr_decay_factor if decayed else self.s.lr

    def draw_labels(self, n: int) -> torch.Tensor | None:
        """The conditioning of n new trajectories (the global batch; this rank keeps its rows): drawn by
        `conditioning`, else random one-hot classes."""
        if self.conditioning is not None:
            return self._mine(self.conditioning(n, self.rng).to(self.device))
        return self._mine(_one_hot_labels(n, self.s.num_classes, self.gen, self.device))

    @property
    def micro_batch(self) -> int:
        return self.s.micro_batch_size or self.s.batch_size // self.ranks.world_size

    def teacher_denoiser(self, labels):
        return bind(self.teacher_fwd, labels, self.s.teacher_step)

    @torch.no_grad()
    def teacher_states(self, x: torch.Tensor, teacher_grid: torch.Tensor, labels) -> torch.Tensor:
        with autocast_context(self.device, self.s.precision):
            traj = solve(self.s.teacher_solver, self.teacher_denoiser(labels), x, teacher_grid,
                         afs=self.s.teacher_afs, return_trajectory=True, **self.s.teacher_opts)
        return traj.float()

    def student_step(self, x: torch.Tensor, t: float, t_next: float, labels, step) -> torch.Tensor:
        """One Euler step of the student; gradients flow through this step only (x is detached)."""
        with autocast_context(self.device, self.s.precision):
            denoised = bind(self.student_fwd, labels, step)(x, t)
        return x + (t_next - t) * (x - denoised.float()) / t

    def train_step(self, xs: list[torch.Tensor], t: float, t_next: float, targets: list[torch.Tensor], labels: list,
                   step, final: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Zero grads; per micro-batch one student step, loss vs the teacher state, backward; then sanitize and
        one optimizer step. Each micro-batch's loss (a batch mean) is weighted by its share of the batch, so the
        accumulated gradient and the returned loss are those of the whole batch (as the reference, which
        backpropagates loss.sum() / batch for each round)."""
        self.opt.zero_grad(set_to_none=True)
        total = sum(len(x) for x in xs)
        outputs, batch_loss = [], None
        for i, (x, target, lab) in enumerate(zip(xs, targets, labels)):
            with self._grad_sync(last=i == len(xs) - 1):
                x_next = self.student_step(x, t, t_next, lab, step)
                loss = self.loss_fn(x_next, target)
                if final and self.final_loss_fn is not None:
                    loss = loss + self.final_loss_fn(x_next, target)
                loss = loss * (len(x) / total)
                loss.backward()
            outputs.append(x_next.detach())
            batch_loss = loss.detach() if batch_loss is None else batch_loss + loss.detach()
        sanitize_gradients(self.params)
        self.opt.step()
        return outputs, batch_loss

    def noise(self) -> torch.Tensor:
        """This rank's rows of the global batch's initial noise z ~ N(0, t_max² I)."""
        z = torch.randn(self.s.batch_size, *self.shape, generator=self.gen, device=self.device) * self.s.grid.t_max
        z = self._mine(z)
        return z.contiguous(memory_format=torch.channels_last) if self.s.channels_last and z.ndim == 4 else z

    # ----- the two algorithms ----------------------------------------------------------------------
    def sfd_iteration(self, num_steps: int) -> tuple[torch.Tensor, tuple[int, ...], float, float]:
        """Algorithm 2: one teacher trajectory, then the student follows it step by step from its own state."""
        teacher_grid, student_grid = self.grids(num_steps)
        ts = student_grid.tolist()
        labels = self.draw_labels(self.s.batch_size)
        step = num_steps if self.s.num_steps_choices else None
        z = self.noise()
        xs = list(z.split(self.micro_batch))  # micro-batches: the same trajectories as the whole batch
        labels = _chunks(labels, self.micro_batch, len(xs))
        t0 = time.perf_counter()
        with torch.profiler.record_function("sfd/teacher_trajectory"):  # named ranges in profiler traces
            targets = [self.teacher_states(x, teacher_grid, lab)[:: self.s.m + 1] for x, lab in zip(xs, labels)]
        sync_device(self.device)
        t1 = time.perf_counter()
        losses = []
        for n in range(num_steps - 1):
            if n == 0 and self.s.grid.afs:  # analytical first step: no loss, no update
                xs = [x + (ts[1] - ts[0]) * afs_derivative(x, ts[0]) for x in xs]
                continue
            final = n == num_steps - 2
            with torch.profiler.record_function("sfd/student_step"):
                xs, loss = self.train_step(xs, ts[n], ts[n + 1], [tgt[n + 1] for tgt in targets], labels, step,
                                           final)
            losses.append(loss)
        sync_device(self.device)
        first = 1 if self.s.grid.afs else 0
        return torch.stack(losses), tuple(range(first, num_steps - 1)), t1 - t0, time.perf_counter() - t1

    def next_data(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        try:
            batch = next(self._data_iter)
        except StopIteration:
            self._data_iter = iter(self.data)
            batch = next(self._data_iter)
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if labels is not None and self.s.num_classes and labels.ndim == 1:
            labels = torch.nn.functional.one_hot(labels.long(), self.s.num_classes).float()
        return images.to(self.device, torch.float32), (labels.to(self.device) if labels is not None else None)

    def vanilla_iteration(self, num_steps: int) -> tuple[torch.Tensor, tuple[int, ...], float, float]:
        """Algorithm 1: a random student step n; student and teacher both start from the same x_n."""
        teacher_grid, student_grid = self.grids(num_steps)
        k = self.s.m + 1
        n = self.rng.randrange(1 if self.s.grid.afs else 0, num_steps - 1)
        t, t_next = float(student_grid[n]), float(student_grid[n + 1])
        step = num_steps if self.s.num_steps_choices else None
        t0 = time.perf_counter()
        if self.s.vanilla_data_free:
            labels = self.draw_labels(self.s.batch_size)
            x_n = self.teacher_states(self.noise(), teacher_grid[: k * n + 1], labels)[-1] if n else self.noise()
        else:
            x0, labels = self.next_data()  # the global batch: every rank reads the same stream
            labels = self.draw_labels(x0.shape[0]) if labels is None else self._mine(labels)
            x_n = self._mine(x0 + t * torch.randn(x0.shape, generator=self.gen, device=self.device))
        xs = list(x_n.split(self.micro_batch))
        labels = _chunks(labels, self.micro_batch, len(xs))
        targets = [self.teacher_states(x, teacher_grid[k * n: k * (n + 1) + 1], lab)[-1] for x, lab in zip(xs, labels)]
        sync_device(self.device)
        t1 = time.perf_counter()
        _, loss = self.train_step(xs, t, t_next, targets, labels, step, final=n == num_steps - 2)
        sync_device(self.device)
        return loss[None], (n,), t1 - t0, time.perf_counter() - t1

    # ----- driver ------------------------------------------------------------------------------------
    def run(self, shape: tuple[int, ...]) -> torch.nn.Module:
        """Train for the whole budget; `shape` is one sample's shape (e.g. (3, 32, 32))."""
        self.shape = tuple(shape)
        if self.ranks.distributed and self.ddp is None:
            self._wrap_ddp()
        iteration_fn = self.sfd_iteration if self.s.algorithm == "sfd" else self.vanilla_iteration
        recent = []
        for it in range(self.s.total_iterations):
            lr = self.lr_at(it)
            for group in self.opt.param_groups:
                group["lr"] = lr
            num_steps = self.draw_num_steps()  # the same N on every rank: the same seed, the same draws
            losses, steps, t_teacher, t_student = iteration_fn(num_steps)
            losses = self.ranks.mean(losses)  # the global batch's loss, the same on every rank
            recent.append(losses)
            if (it + 1) % self.s.nan_check_every == 0 or it + 1 == self.s.total_iterations:
                self._check_finite(recent, it)
                recent = []
            if self.callback is not None:
                kimg = (it + 1) * self.s.batch_size / 1000
                self.callback(IterationStats(it, kimg, lr, num_steps, losses, t_teacher, t_student, steps))
        return self.student

    @staticmethod
    def _check_finite(recent: list[torch.Tensor], iteration: int) -> None:
        if recent and not bool(torch.isfinite(torch.cat(recent)).all()):
            raise DivergedError(f"loss became non-finite by iteration {iteration}")


def distill(teacher, student: torch.nn.Module, settings: DistillSettings, shape: tuple[int, ...], *,
            device: str | torch.device = "cpu", data: Iterable | None = None,
            callback: Callable[[IterationStats], None] | None = None,
            conditioning: Callable[[int, random.Random], torch.Tensor] | None = None,
            ranks: Ranks = SINGLE) -> torch.nn.Module:
    """Distil `teacher` into `student` (trained in place and returned). See `Distiller`."""
    return Distiller(teacher, student, settings, device=device, data=data, callback=callback,
                     conditioning=conditioning, ranks=ranks).run(shape)
