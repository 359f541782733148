"""Benchmark SFD distillation: `python -m sfd.bench distill --arch cifar10 --batch 128 --nfe 2`.

One module per tool (see `sfd.bench.cli` for the command line): `distill` prints seconds per iteration (median
of the timed iterations after warm-up), the teacher / student split, trajectories per second and peak memory.
`track` distils the same random teacher twice, in fp32 and in a faster setting (bf16 by default), from the same
seeds, and prints how far apart the two runs end up compared with how far training moved them. `suite` times
named settings in turn, `profile` shows where the time goes, `sample` times evaluation (sampling, Inception
features), `layout` counts NCHW/NHWC changes of a forward as compiled for a GPU (on a CPU, from fake tensors)
and `show` tabulates saved results. Teachers are randomly initialised networks of the named architecture: the
cost of an iteration does not depend on the weights. `--arch tiny` runs on a CPU in seconds.

The tools import only what the GPU machines they run on hold besides this checkout (PyTorch, torchvision,
numpy, tqdm, Pillow, scikit-learn, safetensors); `sample --inception` also needs torch-fidelity.
"""
from sfd.bench.cli import main
from sfd.bench.common import ARCHS, TINY, build_arch
from sfd.bench.distill import bench_distill, iteration_tflop
from sfd.bench.layout import layout_census
from sfd.bench.profile import KERNEL_KINDS, kernel_kind, profile_distill
from sfd.bench.sample import bench_sample
from sfd.bench.results import show, timing_table
from sfd.bench.suite import SUITE, run_suite
from sfd.bench.track import excite, track_precisions, without_dropout

__all__ = ["ARCHS", "KERNEL_KINDS", "SUITE", "TINY", "bench_distill", "bench_sample", "build_arch", "excite",
           "iteration_tflop", "kernel_kind", "layout_census", "main", "profile_distill", "run_suite", "show",
           "timing_table", "track_precisions", "without_dropout"]
