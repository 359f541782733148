"""The speed options (issue 8) must not change results beyond numerical noise."""
import pytest
import torch

from sfd.bench import TINY, bench_distill, main
from sfd.distill import DistillSettings, Distiller, make_student
from sfd.networks.edm import EDMPrecond
from sfd.sampling import GridSpec


def _distiller(precision="fp32", **kw):
    torch.manual_seed(0)
    teacher = EDMPrecond(**TINY).eval().requires_grad_(False)
    student = make_student(teacher).eval()  # dropout is 0 in TINY; eval keeps the comparison exact
    settings = DistillSettings(grid=GridSpec(num_steps=4, afs=True), batch_size=16, total_kimg=1, lr=1e-4,
                               precision=precision, **kw)
    d = Distiller(teacher, student, settings)
    d.shape = (1, 8, 8)
    return d


def _one_update(d):
    """Gradients and the Adam update of one student step from a fixed state against a fixed target."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g) * 10.9
    target = torch.randn(16, 1, 8, 8, generator=g) * 0.67
    before = [p.detach().clone() for p in d.params]
    d.train_step(x, 10.929, 0.67, target, None, None, final=False)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(d.params, before)])


def test_bf16_and_fp32_updates_agree():
    """bf16 autocast forward/backward with fp32 master weights gives the same update as fp32 up to bf16
    rounding: Adam's first step is ~lr*sign(g), so we compare signs (>= 97% equal) and the update's cosine."""
    u32 = _one_update(_distiller("fp32"))
    u16 = _one_update(_distiller("bf16"))
    cos = torch.nn.functional.cosine_similarity(u32, u16, dim=0)
    same_sign = (torch.sign(u32) == torch.sign(u16)).double().mean()
    assert cos > 0.95 and same_sign > 0.97, (float(cos), float(same_sign))


def test_bf16_teacher_trajectory_tracks_fp32():
    d32, d16 = _distiller("fp32"), _distiller("bf16")
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 80
    grid, _ = d32.grids(4)
    a, b = d32.teacher_states(z, grid, None), d16.teacher_states(z, grid, None)
    rel = (a[-1] - b[-1]).norm() / a[-1].norm()
    assert rel < 0.05, float(rel)


def test_compiled_and_eager_networks_agree():
    """Graph capture (dynamo + AOT autograd; CI has no time for inductor's C++ build) gives the same
    teacher states and the same student update as eager."""
    eager, compiled = _distiller(), _distiller(compile=True, compile_backend="aot_eager")
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 80
    grid, _ = eager.grids(4)
    torch.testing.assert_close(compiled.teacher_states(z, grid, None), eager.teacher_states(z, grid, None),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_one_update(compiled), _one_update(eager), rtol=1e-4, atol=1e-6)  # 1% of lr: Adam step of near-zero grads
    assert not compiled.student_fwd.failed


def test_channels_last_matches():
    a, b = _distiller(), _distiller(channels_last=True)
    torch.testing.assert_close(_one_update(b), _one_update(a), rtol=1e-4, atol=1e-6)  # 1% of lr: Adam step of near-zero grads


def test_benchmark_cpu_mode_runs(capsys):
    r = bench_distill("tiny", batch=4, nfe=2, warmup=1, iters=2, device="cpu")
    assert r["s_per_iter"] > 0 and r["teacher_s"] > 0 and r["student_s"] > 0
    assert r["s_per_iter"] == pytest.approx(r["teacher_s"] + r["student_s"], rel=0.5)
    assert main(["distill", "--arch", "tiny", "--batch", "2", "--nfe", "2", "--iters", "1", "--warmup", "0"]) == 0
    assert "s/iter" in capsys.readouterr().out
