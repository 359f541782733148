"""The speed options (issue 8) must not change results beyond numerical noise."""
import pytest
import torch

from sfd.bench import TINY, bench_distill, build_arch, excite, main, track_precisions
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
    d.train_step([x], 10.929, 0.67, [target], [None], None, final=False)
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


def test_channel_stats_group_norm_gives_the_same_update_eager_and_compiled():
    """The group-norm candidate for compiled channels-last runs: same teacher states and student update as
    the native norm, eager and under graph capture (which must trace it without falling back)."""
    native = _distiller()
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 80
    grid, _ = native.grids(4)
    expected_states, expected_update = native.teacher_states(z, grid, None), _one_update(native)
    for kw in ({}, dict(compile=True, compile_backend="aot_eager")):
        d = _distiller(group_norm="channel-stats", channels_last=True, **kw)
        assert {m.impl for m in d.student.modules() if hasattr(m, "impl")} == {"channel-stats"}
        torch.testing.assert_close(d.teacher_states(z, grid, None), expected_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_one_update(d), expected_update, rtol=1e-4, atol=1e-6)
        assert not getattr(d.student_fwd, "failed", False)
    with pytest.raises(ValueError, match="group_norm must be one of"):
        DistillSettings(group_norm="fast").validate()


def test_layout_census_finds_the_group_norm_transposes_and_none_with_channel_stats(capsys):
    """Traced for a GPU compile on fake CUDA tensors: the native group norm's decomposition turns each NHWC
    activation into NCHW (so the convolutions after it get NCHW inputs); channel-stats keeps every
    activation and every convolution input NHWC, up-sampling included."""
    from sfd.bench import layout_census

    native = layout_census("cifar10", "native")
    assert native["total_layout_changes"] >= 60, native
    assert native["convolutions"].get("input NCHW, weight NHWC", 0) >= 60
    stats = layout_census("cifar10", "channel-stats")
    assert stats["total_layout_changes"] == 0, stats["layout_changes"]
    assert set(stats["convolutions"]) <= {"input NHWC, weight NHWC", "input NHWC, weight any"}
    assert sum(stats["convolutions"].values()) == sum(native["convolutions"].values())
    assert layout_census("cifar10", "channel-stats", train=True)["total_layout_changes"] == 0  # dropout too
    assert main(["layout", "--arch", "tiny", "--group-norm", "channel-stats"]) == 0
    assert "NCHW<->NHWC changes of an activation" in capsys.readouterr().out


def test_benchmark_cpu_mode_runs(capsys):
    r = bench_distill("tiny", batch=4, nfe=2, warmup=1, iters=2, device="cpu")
    assert r["s_per_iter"] > 0 and r["teacher_s"] > 0 and r["student_s"] > 0
    assert r["s_per_iter"] == pytest.approx(r["teacher_s"] + r["student_s"], rel=0.5)
    assert main(["distill", "--arch", "tiny", "--batch", "2", "--nfe", "2", "--iters", "1", "--warmup", "0"]) == 0
    assert "s/iter" in capsys.readouterr().out
    assert r["compile_fell_back"] is False
    gn = bench_distill("tiny", batch=4, nfe=2, warmup=0, iters=1, device="cpu", precision="bf16",
                       channels_last=True, group_norm="channel-stats")  # FLOPs are counted on "meta": no autocast
    assert gn["group_norm"] == "channel-stats" and gn["tflop_per_iter"] == r["tflop_per_iter"]


@pytest.mark.parametrize("argv", [["distill", "--iters", "0"], ["sample", "--num", "0"], ["distill", "--nfe", "0"],
                                  ["suite", "--batch", "0"], ["profile", "--warmup", "-1"]])
def test_benchmark_refuses_bad_counts_before_work(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv + ["--arch", "tiny", "--device", "cpu"])
    assert err.value.code == 2 and "must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["distill", "--device", "gpu"], "--device 'gpu' is not a device this benchmark runs on"),
    (["distill", "--device", "cuda"], "--device cuda: this process sees 0 CUDA device(s); use --device cpu"),
    (["distill", "--solver", "bogus"], "unknown --solver 'bogus'; choose from dpm2, dpmpp3m, euler"),
    (["distill", "--m", "-1"], "--m must be at least 0, got -1"),
    (["sample", "--arch", "cifar100"], "unknown --arch 'cifar100'; choose from tiny, cifar10"),
    (["show", "/nonexistent/results.jsonl"], "show: /nonexistent/results.jsonl does not exist"),
])
def test_benchmark_refuses_bad_arguments_in_one_line_before_work(argv, message, capsys, monkeypatch):
    import sfd.bench.common
    import sfd.bench.sample

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda on a machine without CUDA
    for tool in (sfd.bench.common, sfd.bench.sample):  # where distill and sample build their networks
        monkeypatch.setattr(tool, "build_arch", lambda arch: pytest.fail("a network was built"))
    with pytest.raises(SystemExit) as err:
        main(argv)
    text = capsys.readouterr().err
    assert err.value.code == 2 and text.startswith(f"error: {message}") and text.count("\n") == 1


@pytest.mark.parametrize("group_norm", ["native", "channel-stats"])
def test_compiled_benchmark_counts_graphs_and_the_network_has_no_graph_breaks(group_norm):
    """A graph break would split the network into separately compiled pieces; the benchmark records them so a
    GPU table shows it, and neither group norm (nor autocast's dtype query in channel-stats) causes one."""
    r = bench_distill("tiny", batch=4, nfe=2, warmup=0, iters=1, device="cpu", precision="bf16", compile=True,
                      compile_backend="aot_eager", channels_last=True, group_norm=group_norm)
    assert r["graph_breaks"] == 0 and r["graphs_compiled"] >= 2  # teacher and student forwards
    assert not r["compile_fell_back"]


def test_benchmark_says_when_compile_fell_back_to_eager(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        r = bench_distill("tiny", batch=2, nfe=2, warmup=0, iters=1, device="cpu", compile=True)
    assert r["compile_fell_back"] is True


def test_compiled_sampling_benchmark_compiles_one_graph_for_a_ragged_sample_count():
    """Evaluation gives a compiled network full batches only (10 samples in batches of 4: the last batch is
    filled with two further seeds), so one graph serves every batch; the compile is timed apart."""
    from sfd.bench import bench_sample

    r = bench_sample("tiny", batch=4, nfe=2, num=10, compile=True, compile_backend="aot_eager", device="cpu")
    assert r["graphs_compiled"] == 1 and r["graph_breaks"] == 0 and not r["compile_fell_back"]
    assert r["setup_s"] >= 0 and r["sampling_images_per_s"] > 0


def test_cudagraph_outputs_are_copied_before_the_next_replay():
    """A CUDA-graph replay overwrites the previous output buffer. Simulate that with a network that always
    returns one static buffer: the multistep teacher then goes wrong unless the wrapper copies each output."""
    from sfd.compiling import _EagerFallback
    from sfd.solvers import solve

    def unit_gaussian_denoiser(x, sigma):  # exact D for data ~ N(0, I)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + s**2)

    static = torch.empty(4, 3)

    def replay(x, sigma):
        return static.copy_(unit_gaussian_denoiser(x, sigma))

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 80
    grid = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2])
    exact = solve("dpmpp3m", unit_gaussian_denoiser, x, grid, thresholding=False)
    copied = solve("dpmpp3m", _EagerFallback(replay, unit_gaussian_denoiser, cudagraphs=True), x, grid,
                   thresholding=False)
    shared = solve("dpmpp3m", _EagerFallback(replay, unit_gaussian_denoiser, cudagraphs=False), x, grid,
                   thresholding=False)
    torch.testing.assert_close(copied, exact)
    assert not torch.allclose(shared, exact, rtol=1e-3)  # the hazard is real for a multistep solver


def test_excite_makes_the_random_teacher_depend_on_its_input():
    torch.manual_seed(0)
    net = build_arch("tiny").eval()
    x, sigma = torch.randn(4, 1, 8, 8) * 2, torch.full((4,), 2.0)
    c_skip = 0.25 / (4 + 0.25)
    plain = (net(x, sigma) - c_skip * x).abs().max()  # EDM's zero-initialised output: D is almost c_skip·x
    excited = (excite(net)(x, sigma) - c_skip * x).abs().max()
    assert plain < 1e-3 < 0.1 < excited, (float(plain), float(excited))


def test_track_same_setting_is_deterministic_and_bf16_tracks_fp32():
    same = track_precisions("tiny", batch=8, nfe=2, iters=6, precision="fp32", samples=8, device="cpu")
    assert same["weights_apart_over_moved"] == 0 and same["samples_rmse_fast_vs_fp32"] == 0
    assert same["loss_curve_fp32"] == same["loss_curve_fast"] and len(same["loss_curve_fp32"]) == 6
    bf16 = track_precisions("tiny", batch=8, nfe=2, iters=6, precision="bf16", samples=8, device="cpu")
    assert 0 < bf16["weights_apart_over_moved"] < 0.3
    assert bf16["samples_rmse_fast_vs_fp32"] < 0.2 * bf16["samples_rmse_trained_vs_initial"]
    for a, b in zip(bf16["loss_curve_fp32"], bf16["loss_curve_fast"]):
        assert abs(a - b) < 0.02 * a


def test_track_turns_the_students_dropout_off_by_default():
    """Dropout masks depend on memory layout and on the compiler's generator, so `track` compares students
    without dropout unless asked; `without_dropout` makes a train-mode network deterministic."""
    from sfd.bench import without_dropout

    net = EDMPrecond(**{**TINY, "dropout": 0.5}).train()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    x, sigma = torch.randn(2, 1, 8, 8), torch.ones(2)
    assert not torch.equal(net(x, sigma), net(x, sigma))
    without_dropout(net)
    torch.testing.assert_close(net(x, sigma), net(x, sigma), rtol=0, atol=0)
    r = track_precisions("tiny", batch=4, nfe=2, iters=2, precision="fp32", samples=4, device="cpu")
    assert r["dropout"] is False


def test_track_cli_prints_the_comparison(capsys):
    assert main(["track", "--arch", "tiny", "--batch", "4", "--iters", "2", "--samples", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fp32 eager vs bf16" in out and "weights apart" in out


def test_suite_refuses_unknown_settings_and_records_a_failing_one(monkeypatch):
    import sfd.bench.suite as bench

    with pytest.raises(SystemExit, match="unknown suite setting"):
        bench.run_suite("tiny", 4, [2], ["fp32", "fp64"], device="cpu")
    real = bench.bench_distill

    def flaky(arch, batch, nfe, **kw):
        if kw.get("channels_last"):
            raise RuntimeError("out of memory")
        return real(arch, batch, nfe, **kw)

    monkeypatch.setattr(bench, "bench_distill", flaky)
    rows = bench.run_suite("tiny", 4, [2], ["bf16-cl", "fp32"], device="cpu", warmup=0, iters=1)
    assert [r["setting"] for r in rows] == ["bf16-cl", "fp32"]
    assert rows[0]["error"] == "RuntimeError: out of memory" and rows[1]["s_per_iter"] > 0


def test_iteration_flops_count_teacher_forwards_and_student_forward_backwards():
    """NFE 2 with M = 3: a DPM++(3M) teacher spends 12 evaluations on the 13-point refined grid; the AFS
    student trains 2 steps. The cifar10 forward count is a golden value (EDM's SongUNet, batch 128)."""
    from sfd.bench.distill import _counted_tflop, iteration_tflop

    net = build_arch("cifar10")
    fwd, fwd_bwd = _counted_tflop(net, 128, False), _counted_tflop(net, 128, True)
    assert fwd == pytest.approx(5.42503, rel=1e-4)
    assert 2.9 < fwd_bwd / fwd < 3.1  # backward = two products per forward product
    assert iteration_tflop(net, 128, 2) == pytest.approx(12 * fwd + 2 * fwd_bwd)
    assert iteration_tflop(net, 128, 4) == pytest.approx(20 * fwd + 4 * fwd_bwd)
    assert iteration_tflop(net, 128, 2, solver="heun") == pytest.approx(24 * fwd + 2 * fwd_bwd)  # 2 per step
    assert next(net.parameters()).device.type == "cpu"  # counting used a copy


def test_profile_and_show(tmp_path, capsys):
    from sfd.bench import profile_distill, show

    text = profile_distill("tiny", 4, 2, iters=1, warmup=1, device="cpu", precision="bf16")
    assert "teacher trajectory:" in text and "student steps" in text
    shares = [float(line.split()[-1].rstrip("%")) for line in text.splitlines() if line.endswith("%")]
    assert shares and sum(shares) == pytest.approx(100, abs=0.5)
    path = tmp_path / "suite.jsonl"
    assert main(["suite", "--arch", "tiny", "--batch", "2", "--nfe", "2", "--configs", "fp32", "--iters", "1",
                 "--warmup", "0", "--device", "cpu", "--json"]) == 0
    path.write_text(capsys.readouterr().out)
    table = show([str(path)]).splitlines()
    assert table[0].startswith("| device | setting |") and table[2].startswith("| cpu | fp32 | 2 |")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no benchmark results"):
        show([str(tmp_path / "empty.jsonl")])


def test_prepare_network_sets_the_layout_both_ways():
    """A study's trials share one cached teacher: a trial without channels-last must not inherit the NHWC
    weights an earlier trial gave it, nor its group norm."""
    from sfd.distill import prepare_network

    from sfd.networks.edm import GroupNorm

    net = build_arch("tiny")
    prepare_network(net, channels_last=True, group_norm="channel-stats")
    assert {m.impl for m in net.modules() if isinstance(m, GroupNorm)} == {"channel-stats"}
    convs = [p for p in net.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    prepare_network(net, channels_last=False, group_norm="native")
    assert all(p.is_contiguous() for p in net.parameters())
    assert {m.impl for m in net.modules() if isinstance(m, GroupNorm)} == {"native"}


def test_runs_and_the_benchmark_turn_on_cudnn_autotuning_on_cuda_only(monkeypatch):
    """The H100 figures were taken with cuDNN's autotuner on while runs left it off; both now go through one
    switch, which the Distiller and sampling call with their device."""
    import sfd.distill
    import sfd.sampling

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    sfd.sampling.cudnn_autotune(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    sfd.sampling.cudnn_autotune(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    devices = []
    monkeypatch.setattr(sfd.distill, "cudnn_autotune", devices.append)
    _distiller()
    assert devices == [torch.device("cpu")]


def test_track_with_dropout_draws_the_same_masks_for_the_same_setting(monkeypatch):
    """Each of track's two runs seeds the global generator as a run does: fp32 against fp32 with dropout on is
    then identical (the second run used to continue the first one's stream and draw other masks)."""
    import sfd.bench.track

    monkeypatch.setattr(sfd.bench.track, "build_arch", lambda arch: EDMPrecond(**{**TINY, "dropout": 0.2}))
    r = track_precisions("tiny", batch=8, nfe=2, iters=4, precision="fp32", samples=8, dropout=True, device="cpu")
    assert r["weights_apart_over_moved"] == 0 and r["samples_rmse_fast_vs_fp32"] == 0
    assert r["loss_curve_fp32"] == r["loss_curve_fast"] and len(r["loss_curve_fp32"]) == 4
