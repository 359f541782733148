"""Images of a run: a sample grid made readable, and the strip of samples logged every so often during training
(MLflow's image history: `log_image(key="samples", step=iteration)`, which the UI shows with a step slider), so a
student can be seen to converge. The strip is drawn from the training callback (the distillation core knows
nothing of it): the student in eval mode, fixed seeds, on the grid the run evaluates on, without touching the
training's random streams (each seed has its own generator)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from torchvision.utils import make_grid

from sfd.config import RunConfig, grid_spec
from sfd.metrics.evaluate import student_sampler
from sfd.metrics.inception import to_uint8
from sfd.runner.preflight import is_small_teacher
from sfd.teachers import Teacher
from sfd.teachers.registry import teacher_spec

# samples.png is enlarged to at least this many pixels on its longer side (a digits grid is 73 pixels wide).
SAMPLES_MIN_SIDE = 512
STRIP_KEY = "samples"  # the image history's key
STRIP_SEEDS = 8  # samples per strip, seeds 0..7 (the first of the evaluation's seeds)
STRIPS = 8  # strips per run: about every 1/8 of training, and after its first and last iterations


def readable(image: Image.Image) -> Image.Image:
    """A small sample grid enlarged by a whole factor, nearest neighbour (each pixel a sharp square block), to at
    least SAMPLES_MIN_SIDE pixels on its longer side; a grid that large already is returned as it is."""
    factor = math.ceil(SAMPLES_MIN_SIDE / max(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def strip_iterations(total: int, strips: int = STRIPS) -> list[int]:
    """The iterations (0-based) after which a strip is logged: the first (MLflow's image chart opens at step 0),
    every ceil(total / strips)-th, and the last."""
    every = max(1, math.ceil(total / strips))
    return sorted({0, *range(every - 1, total, every), total - 1}) if total > 0 else []


def draws_strips(cfg: RunConfig, teacher: Teacher) -> bool:
    """Images only: a teacher of pixel images (not a point mixture) whose samples `student_sampler` draws; not in a
    smoke run of a large random network (a wiring test, whose student is not kept either)."""
    shape = tuple(teacher.shape)
    return (len(shape) == 3 and shape[0] in (1, 3) and not (cfg.smoke and not is_small_teacher(cfg.teacher.name))
            and teacher_spec(cfg.teacher.name).source in ("embedded", "checkpoint", "analytic"))


def strip_image(samples: torch.Tensor) -> Image.Image:
    """One row of samples ([-1, 1]), one pixel apart, enlarged by `readable`."""
    grid = make_grid(to_uint8(samples.clamp(-1, 1).cpu()), nrow=len(samples), padding=1, pad_value=0)
    arr = grid.permute(1, 2, 0).numpy()
    return readable(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr))


def strip_callback(cfg: RunConfig, teacher: Teacher, student: torch.nn.Module, step_condition: bool, device,
                   log: Callable[[Image.Image, int], None], total: int) -> Callable:
    """A training callback that logs `log(strip, iteration)` at `strip_iterations(total)`: the student (trained in
    place by sfd.distill) sampled in eval mode at seeds 0..STRIP_SEEDS-1, then put back in train mode."""
    at = set(strip_iterations(total))
    n = cfg.num_steps
    sampler = student_sampler(student, grid_spec(cfg, n), step=n if step_condition else None,
                              guidance=cfg.student.guidance, num_classes=teacher.num_classes)

    def callback(stats) -> None:
        if stats.iteration not in at:
            return
        was_training = student.training
        student.eval()
        try:
            samples, _ = sampler.sample(list(range(STRIP_SEEDS)), teacher.shape, device=device,
                                        batch_size=STRIP_SEEDS, precision=cfg.precision)
        finally:
            student.train(was_training)
        log(strip_image(samples), stats.iteration)

    return callback


def both(first: Callable | None, second: Callable | None) -> Callable | None:
    """One callback calling `first` then `second` (either may be None)."""
    if first is None or second is None:
        return first or second

    def callback(stats) -> None:
        first(stats)
        second(stats)

    return callback
