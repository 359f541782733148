"""Stable Diffusion through the RUNNER (not only sfd.distill): the `sd-v1-5` teacher under `--smoke` is the tiny
random SD built from config (sfd.teachers.stable_diffusion.tiny_stable_diffusion: 4x8x8 latents, 16x16 images),
distilled with a random prompt embedding per trajectory at guidance 1 and sampled with per-seed prompts at any
guidance against the empty prompt. Bad SD settings are one-line ConfigErrors before a run exists.

What the checks rely on: a run's student is what `sfd.distill.distill` returns for the same settings and the
same conditioning callback (the runner seeds the global generator with cfg.seed before building the student);
guidance is D = w·D(c) + (1 - w)·D(∅) (spec §11), ∅ the empty prompt's embedding.
"""
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from sfd.config import ConfigError, load_config, to_settings
from sfd.distill import distill
from sfd.metrics.evaluate import student_sampler
from sfd.runner import STUDENT_FILE, run_experiment
from sfd.runner.preflight import load_teacher, prepare
from sfd.sampling import GridSpec, seed_noise
from sfd.solvers import solve
from sfd.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
SD15 = ROOT / "experiments" / "sd15_sfd.yaml"
CPU = ["device=cpu", "precision=fp32", "eval.metrics=[teacher_gap]"]


def test_one_sfd_iteration_in_latent_space_with_text_conditioning_through_the_runner(tmp_path, stores):
    """The smoke run: one iteration of batch 2 accumulated one trajectory at a time (optim.micro_batch_size=1),
    a random prompt per trajectory; the logged student equals a direct distill() with the teacher's prompts."""
    result = run_experiment(load_config(SD15, CPU), tracker=Tracker("sd"), smoke=True, save_student=True)
    assert result.status == "FINISHED" and result.metrics["nfe"] == 4
    cfg = result.config
    assert (cfg.optim.batch_size, cfg.optim.micro_batch_size, cfg.student.schedule) == (2, 1, "discrete")
    client = MlflowClient(Tracker("sd").tracking_uri)
    logged = load_file(str(Path(client.download_artifacts(result.run_id, f"student/{STUDENT_FILE}", str(tmp_path)))))

    teacher = load_teacher(cfg, torch.device("cpu"))
    assert teacher.shape == (4, 8, 8) and teacher.condition is not None and len(teacher.condition.prompts) > 2
    torch.manual_seed(cfg.seed)
    student = distill(teacher.net, teacher.make_student(), to_settings(cfg), teacher.shape,
                      conditioning=teacher.condition.draw)
    changed = 0
    for name, value in student.state_dict().items():
        torch.testing.assert_close(logged[name], value, rtol=0, atol=0)
        changed += not torch.equal(value, teacher.net.state_dict()[name])
    assert changed > 0  # the iteration trained the UNet


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_guides_each_seeds_prompt_against_the_empty_prompt(guidance):
    cfg, _ = prepare(load_config(SD15, [*CPU, f"student.guidance={guidance}"]), smoke=True)
    teacher = load_teacher(cfg, torch.device("cpu"))
    prompts = teacher.condition
    grid = GridSpec(num_steps=4, afs=False, schedule="discrete", t_min=0.1, t_max=14.6146, rho=1.0)
    sampler = student_sampler(teacher.net, grid, guidance=guidance, prompts=prompts)
    assert sampler.nfe == (3 if guidance == 1 else 6)
    seeds = [0, 1, len(prompts.prompts) + 1]  # the last seed wraps round to prompt 1
    samples, classes = sampler.sample(seeds, teacher.shape, device="cpu", batch_size=2)
    assert classes is None

    cond = prompts.encode([prompts.prompts[0], prompts.prompts[1], prompts.prompts[1]])
    null = prompts.encode([""]).expand_as(cond)

    def formula(x, sigma):
        d_cond, d_null = teacher.net(x, sigma, labels=cond), teacher.net(x, sigma, labels=null)
        return guidance * d_cond + (1 - guidance) * d_null

    x = seed_noise(seeds, teacher.shape) * grid.t_max
    expected = solve("euler", formula, x, grid.timestamps(), afs=False)
    # batches of 2 + 1 against one of 3: float32 rounding of latents of size ~15 (a wrong prompt or guidance is O(1))
    torch.testing.assert_close(samples, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(samples[1], samples[2])  # same prompt, other noise


@pytest.mark.parametrize("overrides,message", [
    (["teacher.prompts=/nonexistent/captions.csv"], r"^teacher.prompts: got '/nonexistent/captions.csv'; the file"),
    (["teacher.path=/nonexistent/sd"], r"^teacher.path: got '/nonexistent/sd'; the file or folder does not exist$"),
    (["student.t_max=80.0"], r"^student.t_min / student.t_max: .* defined on its discrete noise levels from 0.1 to "
                             r"14.6146 only"),
    (["optim.micro_batch_size=256"], r"^optim.micro_batch_size: got 256; .* between 1 and the batch of one process "
                                     r"\(128\)"),
])
def test_bad_stable_diffusion_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SD15, [*CPU, *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["teacher.prompts=p.txt"], r"^teacher.prompts: got 'p.txt'; teacher 'digits' is not text-conditioned"),
    (["teacher.config=folder"], r"^teacher.config: got 'folder'; it names the diffusers folder"),
    (["student.schedule=discrete"], r"^student.schedule: got 'discrete'; .* 'digits' is a continuous-time one"),
])
def test_text_and_discrete_settings_on_other_teachers_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "experiments" / "digits_sfd.yaml", overrides)


def test_a_real_run_without_the_model_names_what_to_get_before_a_run_exists(tmp_path, stores, monkeypatch):
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "empty"))
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "unet").mkdir()
    cfg = load_config(SD15, [*CPU, f"teacher.path={folder}", f"teacher.prompts={ROOT / 'sfd/teachers/data/smoke_prompts.txt'}"])
    with pytest.raises(ConfigError, match=r"^teacher.path: .* is not a complete diffusers Stable Diffusion folder: "
                                          r"no vae/, text_encoder/, tokenizer/, scheduler/; get the diffusers folder"):
        run_experiment(cfg, tracker=Tracker("sd"))
    assert not (stores / "mlflow.db").exists() or not MlflowClient(Tracker("sd").tracking_uri).search_experiments(
        filter_string="name = 'sd'")
