"""torch.compile with a clean fallback: a network compiled when asked and available, eager otherwise.

Training (`sfd.distill`), evaluation (`sfd.metrics.evaluate` through `sfd.runner`) and the benchmark share it.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def maybe_compile(net: Callable, enabled: bool, mode: str | None = None, backend: str = "inductor") -> Callable:
    """`torch.compile(net)` when asked and available; on any compile failure warn once and run eager."""
    if not enabled or not isinstance(net, torch.nn.Module):
        return net
    try:
        compiled = torch.compile(net, mode=mode, backend=backend)
    except Exception as err:  # compile unsupported on this platform/build
        warnings.warn(f"torch.compile unavailable ({err}); running eager")
        return net
    return _EagerFallback(compiled, net, cudagraphs=mode in CUDAGRAPH_MODES)


class _EagerFallback:
    """Calls the compiled network; if compilation fails on first use, switches to eager for good.

    Under CUDA graphs a replay writes its output into the same static buffer as the previous replay, but the
    solvers keep earlier denoiser outputs (multistep history) and the student keeps its step output for the
    loss. So each call starts a new graph step and returns a copy of the output (one image batch per call).
    """

    def __init__(self, compiled: Callable, eager: Callable, cudagraphs: bool = False):
        self.compiled, self.eager, self.cudagraphs, self.failed = compiled, eager, cudagraphs, False

    def __call__(self, x, sigma, **kwargs):
        if not self.failed:
            if not isinstance(sigma, torch.Tensor):  # a Python float would be baked in: one graph per timestamp
                sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                    return self.compiled(x, sigma, **kwargs).clone()
                return self.compiled(x, sigma, **kwargs)
            except Exception as err:  # inductor/toolchain problems surface at the first call
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); running eager")
                self.failed = True
        return self.eager(x, sigma, **kwargs)


def runs_compiled(fn: Callable) -> bool:
    """True when `fn` came from `maybe_compile` and has not fallen back to eager."""
    return isinstance(fn, _EagerFallback) and not fn.failed
