"""Benchmark SFD distillation: `python -m sfd.bench distill --arch cifar10 --batch 128 --nfe 2`.

`distill` prints seconds per iteration (median of the timed iterations after warm-up), the teacher / student
split, trajectories per second and peak memory. `track` distils the same random teacher twice, in fp32 and in
a faster setting (bf16 by default), from the same seeds, and prints how far apart the two runs end up
compared with how far training moved them. `suite` times named settings in turn, `profile` shows where the
time goes, `sample` times evaluation (sampling, Inception features), `layout` counts NCHW/NHWC changes of a
forward as compiled for a GPU (on a CPU, from fake tensors) and `show` tabulates saved results. Teachers are
randomly initialised networks of the named architecture: the cost of an iteration does not depend on the
weights. `--arch tiny` runs on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import NoReturn

import torch

from sfd.compiling import maybe_compile, runs_compiled
from sfd.distill import DistillSettings, Distiller, make_student, prepare_network, sync_device
from sfd.networks.edm import GROUP_NORMS
from sfd.sampling import PRECISIONS, GridSpec, generate
from sfd.solvers import SOLVERS
from sfd.solvers import nfe as solver_nfe

TINY = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


# --arch -> the EDM network it builds (`tiny`: TINY)
ARCHS = {"cifar10": "cifar10-32x32-uncond-vp", "imagenet64": "imagenet-64x64-cond-adm",
         "ffhq64": "ffhq-64x64-uncond-vp"}


def build_arch(arch: str) -> torch.nn.Module:
    from sfd.networks.edm import EDMPrecond, build_edm

    if arch == "tiny":
        return EDMPrecond(**TINY)
    if arch not in ARCHS:
        raise SystemExit(f"error: unknown --arch {arch!r}; choose from tiny, {', '.join(ARCHS)}")
    return build_edm(ARCHS[arch])


def _peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset (each benchmark resets before its warm-up, so compile and
    cuDNN autotuning workspaces count). CPU: the process's peak RSS over its whole life, printed as such."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux -> GiB (process RSS)


def _memory_label(r: dict) -> str:
    return "peak memory" if r["device"] != "cpu" else "process peak RSS"


def _counted_tflop(net: torch.nn.Module, batch: int, backward: bool) -> float:
    """Matrix-multiply and convolution TFLOP of one forward (and backward) of `net` at `batch`, counted on
    the meta device: no memory or arithmetic spent, the same count on every card."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).to("meta").requires_grad_(backward)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device="meta")
    labels = torch.zeros(batch, net.label_dim, device="meta") if getattr(net, "label_dim", 0) else None
    with FlopCounterMode(display=False) as counter:
        out = net(x, torch.ones(batch, device="meta"), labels)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 1e12


def iteration_tflop(net: torch.nn.Module, batch: int, nfe: int, solver: str = "dpmpp3m", m: int = 3,
                    teacher_afs: bool = False) -> float:
    """Model TFLOP of one SFD iteration (Algorithm 2, AFS student grid of nfe + 2 points): the teacher's
    evaluations over the refined grid plus one forward-backward per non-AFS student step."""
    teacher_points = (nfe + 1) * (m + 1) + 1
    teacher_evals = solver_nfe(solver, teacher_points, teacher_afs)
    return teacher_evals * _counted_tflop(net, batch, False) + nfe * _counted_tflop(net, batch, True)


def _fresh_compiler_state(device: torch.device) -> None:
    """Each configuration starts clean, eager ones included: no compiled graphs, recompile budget or CUDA-graph
    memory pools left by the setting before (they would count in this one's peak memory), and graph counters
    that count this configuration only."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bench_distiller(arch: str, batch: int, nfe: int, solver: str, m: int, device: torch.device,
                     **speed) -> tuple[torch.nn.Module, Distiller]:
    """A random teacher of `arch` and a Distiller for it, set up the way every benchmark times it."""
    # TF32 and cuDNN's autotuner are set by the Distiller, as in a run (sfd.sampling.use_precision, cudnn_autotune)
    _fresh_compiler_state(device)
    torch.manual_seed(0)
    teacher = build_arch(arch).to(device).eval().requires_grad_(False)
    settings = DistillSettings(grid=GridSpec(num_steps=nfe + 2, afs=True), teacher_solver=solver, m=m,
                               batch_size=batch, total_kimg=1e6, num_classes=getattr(teacher, "label_dim", 0),
                               **speed)
    d = Distiller(teacher, make_student(teacher), settings, device=device)
    d.shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    return teacher, d


def bench_distill(arch: str, batch: int, nfe: int, *, solver: str = "dpmpp3m", m: int = 3,
                  precision: str = "fp32", compile: bool = False, compile_mode: str | None = None,
                  channels_last: bool = False, group_norm: str = "native", warmup: int = 2, iters: int = 5,
                  device: str | None = None, compile_backend: str = "inductor") -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, d = _bench_distiller(arch, batch, nfe, solver, m, device, precision=precision, compile=compile,
                                  compile_mode=compile_mode, compile_backend=compile_backend,
                                  channels_last=channels_last, group_norm=group_norm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for i in range(warmup + iters):
        _, _, t_teacher, t_student = d.sfd_iteration(nfe + 2)
        if i >= warmup:
            records.append((t_teacher + t_student, t_teacher, t_student))
    total = statistics.median(r[0] for r in records)
    tflop = iteration_tflop(teacher, batch, nfe, solver, m)
    return {
        "arch": arch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "nfe": nfe, "num_steps": nfe + 2, "teacher_solver": solver, "m": m,
        "precision": precision, "compile": compile, "channels_last": channels_last,
        "compile_mode": compile_mode, "group_norm": group_norm,
        "compile_fell_back": compile and not (runs_compiled(d.teacher_fwd) and runs_compiled(d.student_fwd)),
        **(_graph_counts() if compile else {}),
        "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "s_per_iter": total, "teacher_s": statistics.median(r[1] for r in records),
        "student_s": statistics.median(r[2] for r in records), "trajectories_per_s": batch / total,
        "peak_memory_gb": _peak_memory_gb(device), "timed_iters": iters,
        "s_per_iter_min": min(r[0] for r in records), "s_per_iter_max": max(r[0] for r in records),
        "tflop_per_iter": tflop, "achieved_tflops": tflop / total,
    }


def bench_sample(arch: str, batch: int, nfe: int, num: int, *, precision: str = "fp32", channels_last: bool = False,
                 group_norm: str = "native", compile: bool = False, compile_mode: str | None = None,
                 compile_backend: str = "inductor", inception: str | None = None, device: str | None = None,
                 warm_cache: bool = False) -> dict:
    """Time evaluation's two halves as `sfd.metrics.evaluate` runs them: a student of `arch` sampling `num` seeds
    with Euler + AFS at `nfe` in batches of `batch`, and (given a weights file) Inception features folded into
    running statistics. One warm-up batch first (with `compile`, the compile: its time is reported apart, since
    a run pays it once); each half is synchronised separately to split the time.

    A compile reuses what the compiler cached on disk in earlier processes, so its time depends on that
    history: it is timed against a fresh, empty cache (a first run on a machine) unless `warm_cache`."""
    if compile and not warm_cache:
        with _fresh_compiler_cache():
            return bench_sample(arch, batch, nfe, num, precision=precision, channels_last=channels_last,
                                group_norm=group_norm, compile=compile, compile_mode=compile_mode,
                                compile_backend=compile_backend, inception=inception, device=device,
                                warm_cache=True) | {"compile_cache": "cold"}
    from sfd.metrics.evaluate import sample_batch, student_sampler
    from sfd.metrics.fd import FeatureStats
    from sfd.metrics.inception import InceptionFeatures, to_uint8
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _fresh_compiler_state(device)
    torch.manual_seed(0)
    net = build_arch(arch).to(device).eval().requires_grad_(False)
    prepare_network(net, channels_last=channels_last, group_norm=group_norm)
    fn = maybe_compile(net, compile, compile_mode, compile_backend)
    sampler = student_sampler(fn, GridSpec(num_steps=nfe + 2, afs=True), num_classes=getattr(net, "label_dim", 0))
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    features = InceptionFeatures(inception, device=device) if inception else None
    stats = FeatureStats()
    timed = {"sampling": 0.0, "features": 0.0}

    def one_batch(seeds, record: bool) -> float:
        t0 = time.perf_counter()
        samples, _ = sample_batch(sampler, list(seeds), shape, device, batch, precision, None)
        sync_device(device)
        t1 = time.perf_counter()
        if features is not None:
            stats.update(features(to_uint8(samples.clamp(-1, 1))))
            sync_device(device)
        if record:
            timed["sampling"] += t1 - t0
            timed["features"] += time.perf_counter() - t1
        return t1 - t0

    if device.type == "cuda":  # as `distill` does: the warm-up (compile, autotuning) counts
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = one_batch(range(min(batch, num)), record=False)
    for lo in range(0, num, batch):
        one_batch(range(lo, min(lo + batch, num)), record=True)
    sample_rate = num / timed["sampling"]
    feature_rate = num / timed["features"] if features is not None else None
    return {
        "arch": arch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "nfe": nfe, "num_samples": num, "precision": precision, "compile": compile,
        "compile_mode": compile_mode, "channels_last": channels_last, "group_norm": group_norm,
        "sampling_images_per_s": sample_rate, "features_images_per_s": feature_rate,
        "peak_memory_gb": _peak_memory_gb(device),
        # the warm-up batch less a timed batch's share: the one-off compile (and first-call set-up) cost
        "setup_s": max(warmup_s - min(batch, num) / sample_rate, 0.0),
        **({"compile_fell_back": not runs_compiled(fn), "compile_cache": "warm", **_graph_counts()}
           if compile else {}),
        # 50k samples (the FID protocol) at the measured rates: an extrapolation, labelled as one when printed.
        "extrapolated_50k_s": 50_000 / sample_rate + (50_000 / feature_rate if feature_rate else 0.0),
    }


@contextlib.contextmanager
def _fresh_compiler_cache():
    """Inductor's and Triton's on-disk caches in a new empty folder for the duration (then removed)."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="sfd-bench-compile-cache-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = tmp, os.path.join(tmp, "triton")
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _format_sample(r: dict) -> str:
    feats = (f"Inception features {r['features_images_per_s']:.0f} images/s" if r["features_images_per_s"]
             else "Inception features not timed (no --inception weights file)")
    cache = {"cold": "empty compiler cache", "warm": "compiler cache as found"}.get(r.get("compile_cache"), "")
    setup = (f"; first batch's extra (compile, {cache}) {r['setup_s']:.1f} s, paid once per process"
             if r["compile"] else "")
    return (f"{r['arch']} on {r['device']}: {r['num_samples']} samples at NFE {r['nfe']} (Euler + AFS), batch "
            f"{r['batch']}, {_describe_speed(r)}\n"
            f"  sampling {r['sampling_images_per_s']:.0f} images/s; {feats}; {_memory_label(r)} "
            f"{r['peak_memory_gb']:.2f} GiB{setup}\n"
            f"  50k samples at these rates (extrapolated, not timed): {r['extrapolated_50k_s']:.0f} s"
            f"{'' if r['features_images_per_s'] else ' of sampling'}")


def _graph_counts() -> dict:
    """Graphs compiled and graph breaks since the configuration was set up: a graph break splits the network
    into pieces compiled apart, which costs fusion across the break and a return to Python at each."""
    counters = torch._dynamo.utils.counters
    return {"graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# Kernel (GPU) or operator (CPU) name fragments -> what the time is spent on, first match wins.
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "foreach")),
    ("gradient guard", ("nan_to_num",)),
    ("convolution", ("conv", "cudnn", "implicit", "xmma", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "cutlass", "nvjet", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("fused (inductor)", ("triton",)),
    ("normalisation", ("norm",)),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "contiguous")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts)), "other elementwise")


def profile_distill(arch: str, batch: int, nfe: int, *, solver: str = "dpmpp3m", m: int = 3, warmup: int = 2,
                    iters: int = 2, top: int = 20, device: str | None = None, **speed) -> str:
    """Profile `iters` SFD iterations after warm-up: time per phase, per kind of kernel, and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, d = _bench_distiller(arch, batch, nfe, solver, m, device, **speed)
    for _ in range(warmup):
        d.sfd_iteration(nfe + 2)
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(iters):
            d.sfd_iteration(nfe + 2)
    events = prof.key_averages()
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    measured = [e for e in events if (e.device_type == DeviceType.CUDA) == on_gpu and self_time(e) > 0
                and not e.key.startswith(("sfd/", "ProfilerStep"))]
    total = sum(self_time(e) for e in measured)
    kinds: dict[str, float] = {}
    for e in measured:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + self_time(e)
    unit = "GPU kernel" if on_gpu else "CPU operator"
    lines = [f"{arch}, batch {batch}, NFE {nfe}, {speed}: {iters} profiled iterations, "
             f"{total / iters / 1e3:.1f} ms of {unit} time per iteration"]
    # The teacher range holds all its kernels. Backward kernels are launched from autograd's own thread, outside
    # the student-step range, so the student's share is the rest of the iteration's kernel time.
    teacher = next((e for e in events if e.key == "sfd/teacher_trajectory"), None)
    if teacher is not None:
        spent = teacher.device_time_total if on_gpu else teacher.cpu_time_total
        lines.append(f"  teacher trajectory: {spent / iters / 1e3:.1f} ms per iteration; student steps (forward, "
                     f"backward, optimizer) and the rest: {(total - spent) / iters / 1e3:.1f} ms")
    lines.append(f"  by kind ({unit} self time):")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:18s} {t / iters / 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    lines.append(f"  top {top} by self time:")
    for e in sorted(measured, key=lambda e: -self_time(e))[:top]:
        lines.append(f"    {self_time(e) / iters / 1e3:8.2f} ms  {e.count // iters:5d}x  {e.key[:110]}")
    return "\n".join(lines)


def _memory_layout(t) -> str | None:
    """NCHW or NHWC for a dense 4-D image tensor; None where the layout does not matter (one channel, or
    H·W = 1: per-channel vectors, 1×1 kernels) or the tensor is a strided view."""
    if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        return None
    if t.is_contiguous():
        return "NCHW"
    return "NHWC" if t.is_contiguous(memory_format=torch.channels_last) else None


def _attention_stand_in(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The shape and layout of `multihead_attention`'s output (layout census only)."""
    fmt = torch.channels_last if _memory_layout(qkv) == "NHWC" else torch.contiguous_format
    return qkv[:, : qkv.shape[1] // 3].clone(memory_format=fmt)


def layout_census(arch: str, group_norm: str = "native", batch: int = 128, train: bool = False) -> dict:
    """Memory layouts in one channels-last forward as the compiler sees it on a GPU, worked out on a CPU.

    The network's forward is traced on fake CUDA tensors (shapes and strides, no data, no GPU) through
    Inductor's decompositions, where group norm becomes the reference decomposition that makes non-CPU inputs
    contiguous. Counts convolutions by (input, weight) layout and the ops that turn an NHWC activation into
    NCHW or back: each is a transposing copy of a whole activation on the GPU (or a transposed read or write
    fused into a neighbouring kernel), as is an NCHW input to a convolution with NHWC weights. Attention is left
    out (a stand-in returns its input's layout): without a GPU it would trace as plain matmuls over [N, heads,
    pixels, channels], where a GPU compile keeps one fused kernel. The backward is not traced: autograd needs a
    real device.
    """
    from unittest import mock

    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import sfd.networks.edm as edm

    net = edm.set_group_norm(build_arch(arch), group_norm).train(train)  # train: the student's dropout
    stand_in = mock.patch.object(edm, "multihead_attention", _attention_stand_in)
    with FakeTensorMode(allow_non_fake_inputs=True), stand_in:
        def fake_cuda(v: torch.Tensor) -> torch.Tensor:
            t = torch.empty(v.shape, dtype=v.dtype, device="cuda")
            return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t

        state = {k: fake_cuda(v) for k, v in [*net.named_parameters(), *net.named_buffers()]}
        size = (batch, net.img_channels, net.img_resolution, net.img_resolution)
        x = torch.empty(size, device="cuda").contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(batch, net.label_dim, device="cuda") if getattr(net, "label_dim", 0) else None
        graph = make_fx(lambda st, x, s: torch.func.functional_call(net, st, (x, s, labels)),
                        decomposition_table=select_decomp_table())(state, x, torch.ones(batch, device="cuda")).graph
    convs: dict[str, int] = {}
    changes: dict[str, int] = {}
    moved = 0  # elements rewritten in the other layout, by the ops counted and by convolutions' input conversions
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [_memory_layout(a.meta.get("val")) for a in node.all_input_nodes]
        if "convolution" in str(node.target):
            key = f"input {inputs[0] or 'any'}, weight {inputs[1] or 'any'}"
            convs[key] = convs.get(key, 0) + 1
            if inputs[0] == "NCHW" and inputs[1] == "NHWC":  # the convolution converts its input first
                moved += node.all_input_nodes[0].meta["val"].numel()
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.returns and schema.returns[0].alias_info is not None:
            continue  # a view (permute, slice, ...) copies nothing
        out = _memory_layout(node.meta.get("val"))
        if out and any(i and i != out for i in inputs):
            key = f"{node.target} {'NCHW' if out == 'NHWC' else 'NHWC'} -> {out}"
            changes[key] = changes.get(key, 0) + 1
            moved += node.meta["val"].numel()
    return {"arch": arch, "group_norm": group_norm, "batch": batch, "train": train, "convolutions": convs,
            "layout_changes": changes, "total_layout_changes": sum(changes.values()),
            "changed_elements": moved}


def _format_census(r: dict) -> str:
    mode = "train-mode (dropout on)" if r.get("train") else "eval-mode"
    lines = [f"{r['arch']}, channels-last, group norm {r['group_norm']}: one {mode} forward as traced for a GPU "
             "compile"]
    lines += [f"  {n:4d} convolutions with {k}" for k, n in sorted(r["convolutions"].items(), key=lambda kv: -kv[1])]
    lines.append(f"  {r['total_layout_changes']:4d} NCHW<->NHWC changes of an activation; with the convolutions' "
                 f"input conversions {r['changed_elements'] / 1e6:.0f}M elements rewritten at batch {r['batch']}")
    lines += [f"       {n:4d}  {k}" for k, n in sorted(r["layout_changes"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def excite(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give EDM's zero-initialised layers (each block's last conv, attention projections, the output conv)
    random weights, so a freshly initialised teacher is a non-trivial function of its input rather than
    almost exactly c_skip·x."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and float(p.abs().max()) < 1e-3:
                fan_in = p[0].numel()
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * math.sqrt(1 / fan_in))
    return net


def _flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in net.parameters()])


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def without_dropout(net: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of an EDM network (block dropout, label dropout) to 0; returns `net`."""
    for module in net.modules():
        for name in ("dropout", "label_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return net


def _distil_once(teacher, settings: DistillSettings, device: torch.device,
                 dropout: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    # Each run starts the global generator (eager dropout masks) where a run does (sfd.runner): otherwise the
    # second run would draw other masks than the first merely by coming second.
    torch.manual_seed(settings.seed)
    student = make_student(teacher) if dropout else without_dropout(make_student(teacher))
    losses = []
    d = Distiller(teacher, student, settings, device=device, callback=lambda st: losses.append(st.step_losses.mean()))
    d.run((teacher.img_channels, teacher.img_resolution, teacher.img_resolution))
    return student, torch.stack(losses).cpu()


def track_precisions(arch: str, batch: int, nfe: int, iters: int, *, precision: str = "bf16",
                     compile: bool = False, compile_mode: str | None = None, channels_last: bool = False,
                     group_norm: str = "native", dropout: bool = False, lr: float = 5e-5, samples: int = 64,
                     seed: int = 0, device: str | None = None) -> dict:
    """Distil one excited random teacher in fp32 eager and in the given setting; compare the two runs.

    The students train without dropout unless `dropout`: masks are drawn in memory order (and by the compiler's
    own generator when compiled), so channels-last or compiled runs would draw other masks than the fp32 eager
    reference, and the comparison would measure that as well as the arithmetic.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    teacher = excite(build_arch(arch), seed).to(device).eval().requires_grad_(False)
    initial = _flat_params(teacher)
    common = dict(grid=GridSpec(num_steps=nfe + 2, afs=True), batch_size=batch, total_kimg=iters * batch / 1000,
                  lr=lr, seed=seed, num_classes=getattr(teacher, "label_dim", 0))
    ref, ref_losses = _distil_once(teacher, DistillSettings(**common), device, dropout)
    fast, fast_losses = _distil_once(teacher, DistillSettings(**common, precision=precision, compile=compile,
                                                              compile_mode=compile_mode,
                                                              channels_last=channels_last,
                                                              group_norm=group_norm), device, dropout)
    moved = (_flat_params(ref) - initial).norm()
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    draw = dict(grid=common["grid"], seeds=range(samples), shape=shape, device=device,
                num_classes=common["num_classes"], output_device=device)
    x_init, _ = generate(teacher, **draw)
    x_ref, _ = generate(ref.eval(), **draw)
    x_fast, _ = generate(fast.eval(), **draw, precision=precision)  # each student samples as its run would
    tail = max(1, iters // 5)
    return {
        "arch": arch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "nfe": nfe, "iters": iters, "precision": precision, "compile": compile,
        "channels_last": channels_last, "group_norm": group_norm, "dropout": dropout, "lr": lr,
        "loss_fp32_last_fifth": float(ref_losses[-tail:].mean()), "loss_fast_last_fifth": float(fast_losses[-tail:].mean()),
        "loss_fp32_first": float(ref_losses[0]), "loss_fast_first": float(fast_losses[0]),
        "weights_apart_over_moved": float((_flat_params(fast) - _flat_params(ref)).norm() / moved),
        "samples_rmse_fast_vs_fp32": _rmse(x_fast, x_ref), "samples_rmse_trained_vs_initial": _rmse(x_ref, x_init),
        "loss_curve_fp32": ref_losses.tolist(), "loss_curve_fast": fast_losses.tolist(),
    }


def _describe_speed(r: dict) -> str:
    """The speed setting of a result in words, e.g. "bf16, compiled reduce-overhead, channels-last"."""
    words = [r["precision"]]
    if r["compile"]:
        words.append("compiled" + (f" {r['compile_mode']}" if r.get("compile_mode") else "")
                     + (" (FELL BACK TO EAGER)" if r.get("compile_fell_back") else "")
                     + (f" ({r['graph_breaks']} GRAPH BREAKS)" if r.get("graph_breaks") else ""))
    if r["channels_last"]:
        words.append("channels-last")
    if r.get("group_norm", "native") != "native":
        words.append(f"group norm {r['group_norm']}")
    return ", ".join(words)


def _format_track(r: dict) -> str:
    setting = _describe_speed(r)
    return (f"{r['arch']} on {r['device']}: {r['iters']} SFD iterations, batch {r['batch']}, NFE {r['nfe']}, "
            f"fp32 eager vs {setting}, student dropout {'on' if r.get('dropout', True) else 'off'}\n"
            f"  mean step loss, first iteration: {r['loss_fp32_first']:.5f} vs {r['loss_fast_first']:.5f}; "
            f"last fifth: {r['loss_fp32_last_fifth']:.5f} vs {r['loss_fast_last_fifth']:.5f}\n"
            f"  students' weights apart / fp32 training's move: {r['weights_apart_over_moved']:.3f}\n"
            f"  samples RMSE, {setting} vs fp32 student: {r['samples_rmse_fast_vs_fp32']:.5f} "
            f"(fp32 student vs the untrained copy: {r['samples_rmse_trained_vs_initial']:.5f})")


def _format(r: dict) -> str:
    return (f"{r['arch']} on {r['device']}: batch {r['batch']}, NFE {r['nfe']} (N={r['num_steps']}, AFS, "
            f"M={r['m']}, {r['teacher_solver']} teacher), {_describe_speed(r)}\n"
            f"  {r['s_per_iter']:.4f} s/iter (median of {r['timed_iters']}) = teacher {r['teacher_s']:.4f} s"
            f" + student {r['student_s']:.4f} s; {r['trajectories_per_s']:.1f} trajectories/s; "
            f"{_memory_label(r)} {r['peak_memory_gb']:.2f} GiB; {r['params_m']:.1f}M params; "
            f"{r['tflop_per_iter']:.3g} model TFLOP/iter = {r['achieved_tflops']:.3g} TFLOP/s")


# Named speed settings for `suite`: the baseline and each option added in turn, so one run on a card shows
# what every option buys there.
SUITE = {
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "bf16-cl": dict(precision="bf16", channels_last=True),
    "bf16-compile": dict(precision="bf16", compile=True),
    "bf16-cl-compile": dict(precision="bf16", channels_last=True, compile=True),
    "bf16-cl-cudagraphs": dict(precision="bf16", channels_last=True, compile=True, compile_mode="reduce-overhead"),
    # Candidates after the first H100 profile (group norm that keeps channels-last; Inductor's autotuning):
    "bf16-cl-gn": dict(precision="bf16", channels_last=True, group_norm="channel-stats"),
    "bf16-cl-compile-gn": dict(precision="bf16", channels_last=True, compile=True, group_norm="channel-stats"),
    "bf16-cl-cudagraphs-gn": dict(precision="bf16", channels_last=True, compile=True, compile_mode="reduce-overhead",
                                  group_norm="channel-stats"),
    "bf16-cl-autotune": dict(precision="bf16", channels_last=True, compile=True,
                             compile_mode="max-autotune-no-cudagraphs"),
}


def run_suite(arch: str, batch: int, nfes: list[int], configs: list[str], *, device: str | None = None,
              warmup: int = 2, iters: int = 5) -> list[dict]:
    """`bench_distill` for each named setting and NFE; a setting that fails is reported and the rest still run."""
    unknown = [c for c in configs if c not in SUITE]
    if unknown:
        raise SystemExit(f"error: unknown suite setting(s) {unknown}; choose from {', '.join(SUITE)}")
    results = []
    for name in configs:
        for nfe in nfes:
            try:
                r = bench_distill(arch, batch, nfe, warmup=warmup, iters=iters, device=device, **SUITE[name])
            except Exception as err:  # e.g. out of memory or a compiler error: record it, go on
                r = {"arch": arch, "batch": batch, "nfe": nfe, "error": f"{type(err).__name__}: {err}"}
            results.append({"setting": name, **r})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def timing_table(rows: list[dict]) -> str:
    """A markdown table of `distill`/`suite` results (JSON objects), one line per setting and NFE."""
    head = ("| device | setting | NFE | s/iter (min–max) | teacher s | student s | trajectories/s | peak GiB "
            "| TFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        name = r.get("setting") or r.get("precision", "?")
        if "error" in r:
            lines.append(f"| {r.get('device', '?')} | {name} | {r['nfe']} | failed: {r['error'][:80]} | | | | | |")
            continue
        if r.get("compile_fell_back"):
            name += " (fell back to eager)"
        if r.get("graph_breaks"):
            name += f" ({r['graph_breaks']} graph breaks)"
        lines.append(f"| {r['device']} | {name} | {r['nfe']} | {r['s_per_iter']:.3f} "
                     f"({r['s_per_iter_min']:.3f}–{r['s_per_iter_max']:.3f}) | {r['teacher_s']:.3f} "
                     f"| {r['student_s']:.3f} | {r['trajectories_per_s']:.0f} | {r['peak_memory_gb']:.1f} "
                     f"| {r['achieved_tflops']:.3g} |")
    return "\n".join(lines)


def show(paths: list[str]) -> str:
    """Read JSON lines written by `--json` runs: a timing table for distill/suite rows, then `track` and `sample`
    summaries."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip().startswith("{")]
    timings = [r for r in rows if "s_per_iter" in r or "error" in r]
    tracks = [r for r in rows if "weights_apart_over_moved" in r]
    samples = [r for r in rows if "sampling_images_per_s" in r]
    parts = [timing_table(timings)] if timings else []
    parts += [_format_track(r) for r in tracks] + [_format_sample(r) for r in samples]
    if not parts:
        raise SystemExit(f"error: no benchmark results (JSON lines from --json) in {', '.join(paths)}")
    return "\n\n".join(parts)


def _add_common_options(p: argparse.ArgumentParser, default_nfe: list[int]) -> None:
    p.add_argument("--arch", default="tiny", help="tiny | cifar10 | imagenet64 | ffhq64")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nfe", type=int, nargs="+", default=default_nfe)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")


def _add_speed_options(p: argparse.ArgumentParser, default_precision: str) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=default_precision)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--group-norm", choices=GROUP_NORMS, default="native",
                   help="channel-stats: group statistics from per-channel ones (for compiled channels-last)")


def _add_timing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)


def _refuse(message: str) -> NoReturn:
    """A bad argument: one line on stderr and exit status 2, before anything is built or timed."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_counts(args: argparse.Namespace) -> None:
    """Counts must be positive (warm-up and --m may be 0)."""
    for name in ("batch", "iters", "num", "samples", "top"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _refuse(f"--{name} must be at least 1, got {value}")
    for name in ("warmup", "m"):
        if getattr(args, name, 0) < 0:
            _refuse(f"--{name} must be at least 0, got {getattr(args, name)}")
    if any(n < 1 for n in getattr(args, "nfe", None) or []):
        _refuse(f"--nfe must be at least 1, got {args.nfe}")


def _check_device(name: str | None) -> None:
    """cpu, or a CUDA device this process sees: torch would otherwise fail mid-setup with a traceback."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        _refuse(f"--device {name!r} is not a device this benchmark runs on; use cpu, cuda or cuda:<index>")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        _refuse(f"--device {name}: this process sees {count} CUDA device(s); use --device cpu"
                + (f" or cuda:0 to cuda:{count - 1}" if count else ""))


def _check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work, each failure a one-line error (exit 2)."""
    _check_counts(args)
    if getattr(args, "arch", "tiny") not in ("tiny", *ARCHS):
        _refuse(f"unknown --arch {args.arch!r}; choose from tiny, {', '.join(ARCHS)}")
    _check_device(getattr(args, "device", None))
    if getattr(args, "solver", None) is not None and args.solver not in SOLVERS:
        _refuse(f"unknown --solver {args.solver!r}; choose from {', '.join(sorted(SOLVERS))}")
    for path in getattr(args, "files", None) or []:
        if not os.path.isfile(path):
            _refuse(f"show: {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}; "
                    "pass files holding the JSON lines that --json runs print")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sfd.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="time SFD iterations")
    _add_common_options(d, [2])
    _add_speed_options(d, "fp32")
    _add_timing_options(d)
    d.add_argument("--solver", default="dpmpp3m")
    d.add_argument("--m", type=int, default=3)
    t = sub.add_parser("track", help="distil in fp32 and in a faster setting; show the runs track each other")
    _add_common_options(t, [2])
    _add_speed_options(t, "bf16")
    t.add_argument("--iters", type=int, default=100)
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--samples", type=int, default=64)
    t.add_argument("--dropout", action="store_true",
                   help="keep the student's dropout (its masks then differ between the two runs' layouts)")
    u = sub.add_parser("suite", help="time the baseline and each speed option in turn, on one card")
    _add_common_options(u, [2, 4])
    _add_timing_options(u)
    u.add_argument("--configs", nargs="+", default=list(SUITE), help=f"any of {', '.join(SUITE)}")
    f = sub.add_parser("profile", help="where an iteration's time goes: per phase, per kind of kernel, top kernels")
    _add_common_options(f, [2])
    _add_speed_options(f, "fp32")
    _add_timing_options(f)
    f.add_argument("--top", type=int, default=20)
    e = sub.add_parser("sample", help="evaluation speed: student sampling and Inception features, images/s")
    _add_common_options(e, [2])
    e.set_defaults(batch=1024)
    _add_speed_options(e, "fp32")
    e.add_argument("--num", type=int, default=10_000, help="samples to time (after one warm-up batch)")
    e.add_argument("--inception", default=None, help="Inception-v3 2015-12-05 weights file: also time features")
    e.add_argument("--warm-cache", action="store_true",
                   help="with --compile: use the compiler's on-disk cache as found (default: time a cold compile)")
    c = sub.add_parser("layout", help="memory layouts of one channels-last forward as compiled for a GPU (runs "
                                      "on a CPU): convolutions by layout and NCHW<->NHWC changes")
    c.add_argument("--arch", default="cifar10", help="tiny | cifar10 | imagenet64 | ffhq64")
    c.add_argument("--group-norm", nargs="+", choices=GROUP_NORMS, default=list(GROUP_NORMS))
    c.add_argument("--batch", type=int, default=128, help="sizes only: fake tensors hold no memory")
    c.add_argument("--train", action="store_true", help="the student's train-mode forward (dropout on)")
    c.add_argument("--json", action="store_true")
    w = sub.add_parser("show", help="a markdown table of results saved with --json")
    w.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    _check_args(args)
    if args.command in ("profile", "distill", "track"):
        speed = dict(precision=args.precision, compile=args.compile, compile_mode=args.compile_mode,
                     channels_last=args.channels_last, group_norm=args.group_norm, device=args.device)
    if args.command == "profile":
        for nfe in args.nfe:
            print(profile_distill(args.arch, args.batch, nfe, warmup=args.warmup, iters=args.iters, top=args.top,
                                  **speed), flush=True)
        return 0
    if args.command == "sample":
        for nfe in args.nfe:
            r = bench_sample(args.arch, args.batch, nfe, args.num, precision=args.precision,
                             channels_last=args.channels_last, group_norm=args.group_norm, compile=args.compile,
                             compile_mode=args.compile_mode, inception=args.inception, device=args.device,
                             warm_cache=args.warm_cache)
            print(json.dumps(r) if args.json else _format_sample(r), flush=True)
        return 0
    if args.command == "layout":
        for gn in args.group_norm:
            r = layout_census(args.arch, gn, args.batch, args.train)
            print(json.dumps(r) if args.json else _format_census(r), flush=True)
        return 0
    if args.command == "show":
        print(show(args.files))
        return 0
    if args.command == "suite":
        for r in run_suite(args.arch, args.batch, args.nfe, args.configs, device=args.device,
                           warmup=args.warmup, iters=args.iters):
            text = f"[{r['setting']}] NFE {r['nfe']}: {r['error']}" if "error" in r else f"[{r['setting']}] {_format(r)}"
            print(json.dumps(r) if args.json else text, flush=True)
        return 0
    for nfe in args.nfe:
        if args.command == "distill":
            r = bench_distill(args.arch, args.batch, nfe, solver=args.solver, m=args.m, warmup=args.warmup,
                              iters=args.iters, **speed)
            print(json.dumps(r) if args.json else _format(r), flush=True)
        else:
            r = track_precisions(args.arch, args.batch, nfe, args.iters, lr=args.lr, samples=args.samples,
                                 dropout=args.dropout, **speed)
            print(json.dumps(r) if args.json else _format_track(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
