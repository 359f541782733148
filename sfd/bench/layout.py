"""`layout`: the memory layouts of one channels-last forward as compiled for a GPU, worked out on a CPU from fake
tensors: convolutions by (input, weight) layout and the NCHW<->NHWC changes of activations."""
from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import sfd.networks.edm as edm
from sfd.bench.common import build_arch

HELP = ("memory layouts of one channels-last forward as compiled for a GPU (runs on a CPU): convolutions by layout "
        "and NCHW<->NHWC changes")


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


def format_census(r: dict) -> str:
    mode = "train-mode (dropout on)" if r.get("train") else "eval-mode"
    lines = [f"{r['arch']}, channels-last, group norm {r['group_norm']}: one {mode} forward as traced for a GPU "
             "compile"]
    lines += [f"  {n:4d} convolutions with {k}" for k, n in sorted(r["convolutions"].items(), key=lambda kv: -kv[1])]
    lines.append(f"  {r['total_layout_changes']:4d} NCHW<->NHWC changes of an activation; with the convolutions' "
                 f"input conversions {r['changed_elements'] / 1e6:.0f}M elements rewritten at batch {r['batch']}")
    lines += [f"       {n:4d}  {k}" for k, n in sorted(r["layout_changes"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="cifar10", help="tiny | cifar10 | imagenet64 | ffhq64")
    p.add_argument("--group-norm", nargs="+", choices=edm.GROUP_NORMS, default=list(edm.GROUP_NORMS))
    p.add_argument("--batch", type=int, default=128, help="sizes only: fake tensors hold no memory")
    p.add_argument("--train", action="store_true", help="the student's train-mode forward (dropout on)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> None:
    for gn in args.group_norm:
        r = layout_census(args.arch, gn, args.batch, args.train)
        print(json.dumps(r) if args.json else format_census(r), flush=True)
