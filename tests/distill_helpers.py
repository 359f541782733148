"""Shared by the distillation tests: what a Distiller's optimizer is handed at each step."""
import torch


def record_gradients(distiller, shape) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run one iteration of `distiller`; return the flattened gradient at each optimizer step and the
    iteration's per-step losses. Adam's update is scale-free, so gradients (not updated weights) show whether
    accumulation weighted the micro-batches right."""
    grads, stats = [], []
    step = distiller.opt.step

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten().clone() for p in distiller.params if p.grad is not None]))
        return step(*args, **kwargs)

    distiller.opt.step = recording_step
    distiller.callback = stats.append
    distiller.s.total_kimg = distiller.s.batch_size / 1000  # one iteration
    distiller.run(shape)
    return grads, stats[0].step_losses
