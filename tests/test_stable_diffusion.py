"""The Stable Diffusion teacher on a tiny randomly initialised diffusers UNet / VAE / CLIP text encoder built
from config (SD v1.5's classes and layout, shrunk; no weights downloaded).

What the tests rely on from diffusers (0.42) itself, not from our code: `EulerDiscreteScheduler` keeps SD's
sigmas as sqrt((1 - alphas_cumprod) / alphas_cumprod) at its integer timesteps, scales the UNet input by
1 / sqrt(sigma² + 1) (`scale_model_input`) and, for epsilon prediction, its `step` returns
pred_original_sample = sample - sigma·eps; `DDIMScheduler.alphas_cumprod` are the levels from the config's betas.
"""
import json
import random

import pytest
import torch

from distill_helpers import record_gradients
from sfd.distill import DistillSettings, Distiller
from sfd.sampling import GridSpec, generate, seed_noise
from sfd.schedules import SD15_NOISE_LEVELS
from sfd.teachers.prompts import SMOKE_PROMPTS, PromptConditioning, load_prompts
from sfd.teachers.stable_diffusion import (SD15_T_MAX, SD15_T_MIN, StableDiffusionNotFound, load_stable_diffusion,
                                           noise_levels_from_scheduler_config, save_diffusers_folder,
                                           tiny_stable_diffusion)

diffusers = pytest.importorskip("diffusers")  # a declared dependency: skipped only in a broken environment


@pytest.fixture(scope="module")
def sd():
    return tiny_stable_diffusion(seed=0)


@pytest.fixture(scope="module")
def prompts(sd):
    return sd.prompts(load_prompts(SMOKE_PROMPTS))


def _scheduler_config():
    """SD v1.5's scheduler config (what its scheduler/scheduler_config.json says)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def test_denoiser_equals_diffusers_euler_scheduler_at_its_timesteps(sd, prompts):
    """At each of diffusers' integer timesteps t (sigma_t from its scheduler), our D(x, sigma_t) calls the UNet
    at timestep t and equals the scheduler's own x0 prediction from the same UNet."""
    sched = diffusers.EulerDiscreteScheduler.from_config(_scheduler_config())
    sched.set_timesteps(8)
    unet, emb = sd.denoiser.unet, prompts.for_seeds([0, 1])
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[i])
        x = torch.randn(2, 4, 8, 8, generator=g) * sigma
        sched._step_index = i  # the scheduler walks its steps in order; set it so each t is checked alone
        eps = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=emb).sample
        sched._step_index = i
        expected = sched.step(eps, t, x).pred_original_sample
        assert float(SD15_NOISE_LEVELS.timestep(sigma)) == pytest.approx(float(t), abs=2e-3)  # float32 sigma
        torch.testing.assert_close(sd.denoiser(x, sigma, emb), expected, rtol=1e-4, atol=1e-4)


def test_noise_levels_equal_diffusers_alphas_cumprod():
    ddim = diffusers.DDIMScheduler.from_config(_scheduler_config())
    levels = noise_levels_from_scheduler_config(_scheduler_config())
    torch.testing.assert_close(torch.tensor(levels.alphas_cumprod, dtype=torch.float64), ddim.alphas_cumprod.double(),
                               rtol=1e-6, atol=0)  # diffusers computes them in float32
    assert levels == SD15_NOISE_LEVELS
    with pytest.raises(ValueError, match="epsilon"):
        noise_levels_from_scheduler_config({**_scheduler_config(), "prediction_type": "v_prediction"})


def test_denoiser_takes_fractional_timesteps_and_per_sample_sigmas(sd, prompts):
    """Between levels the UNet gets c = 1000·T(sigma) - 1 unrounded, and a tensor of sigmas is per sample."""
    seen = []
    hook = sd.denoiser.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        x, emb = torch.randn(3, 4, 8, 8), prompts.for_seeds([0, 1, 2])
        sigmas = torch.tensor([0.1, 1.0, 14.6146])
        batched = sd.denoiser(x, sigmas, emb)
        singles = torch.cat([sd.denoiser(x[i:i + 1], float(sigmas[i]), emb[i:i + 1]) for i in range(3)])
    finally:
        hook.remove()
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-4)  # eps rounding (per batch shape) times sigma
    torch.testing.assert_close(seen[0], SD15_NOISE_LEVELS.timestep(sigmas.double()).float())
    assert seen[0][0] % 1 != 0 and seen[0][2] == pytest.approx(999.0, abs=1e-3)
    with pytest.raises(ValueError, match="prompt embeddings"):
        sd.denoiser(x, 1.0)


def test_guidance_at_sampling_equals_the_formula(sd, prompts):
    """One Euler step guided with omega = 7.5 against the empty prompt: x' = x + (t1 - t0)·eps~ with
    eps~ = eps_uncond + omega·(eps_cond - eps_uncond), each eps straight from the UNet."""
    grid = GridSpec(num_steps=2, afs=False, schedule="discrete", t_min=SD15_T_MIN, t_max=SD15_T_MAX, rho=1.0)
    seeds = [3, 4]
    out, classes = generate(sd.denoiser, grid, seeds, sd.latent_shape, condition=prompts.for_seeds,
                            null_condition=prompts.null(), guidance=7.5)
    assert classes is None
    x = seed_noise(seeds, sd.latent_shape) * SD15_T_MAX
    c = torch.full((2,), float(SD15_NOISE_LEVELS.timestep(SD15_T_MAX)))
    x_in = x / (SD15_T_MAX**2 + 1) ** 0.5
    eps_c = sd.denoiser.unet(x_in, c, encoder_hidden_states=prompts.for_seeds(seeds)).sample
    eps_u = sd.denoiser.unet(x_in, c, encoder_hidden_states=prompts.null().expand(2, -1, -1)).sample
    expected = x + (SD15_T_MIN - SD15_T_MAX) * (eps_u + 7.5 * (eps_c - eps_u))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    plain, _ = generate(sd.denoiser, grid, seeds, sd.latent_shape, condition=prompts.for_seeds,
                        null_condition=prompts.null(), guidance=1.0)
    torch.testing.assert_close(plain, x + (SD15_T_MIN - SD15_T_MAX) * eps_c, rtol=1e-4, atol=1e-4)


def _latent_settings(**kw):
    grid = GridSpec(num_steps=4, afs=True, schedule="discrete", t_min=SD15_T_MIN, t_max=SD15_T_MAX, rho=1.0,
                    noise_levels=SD15_NOISE_LEVELS)
    return DistillSettings(grid=grid, teacher_solver="dpmpp3m", m=1, loss="l1", lr=1e-4, batch_size=4,
                           total_kimg=0.004, seed=0, **kw)


def test_one_sfd_iteration_in_latent_space_with_text_conditioning(sd, prompts):
    """Algorithm 2 on the latent teacher: the drawn prompts' embeddings condition every teacher and student
    call of the iteration (the conditional branch only: no empty-prompt call), the student's UNet changes, the
    teacher's does not."""
    drawn, seen = [], []
    conditioning = lambda n, rng: drawn.append(prompts.draw(n, rng)) or drawn[-1]  # noqa: E731
    student = sd.make_student()
    hooks = [net.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]),
                                                with_kwargs=True) for net in (sd.denoiser, student)]
    teacher_before = [p.clone() for p in sd.denoiser.parameters()]
    student_before = [p.clone() for p in student.parameters()]
    losses = []
    try:
        Distiller(sd.denoiser, student, _latent_settings(), conditioning=conditioning,
                  callback=losses.append).run(sd.latent_shape)
    finally:
        for h in hooks:
            h.remove()
    assert len(drawn) == 1 and drawn[0].shape == (4, 77, 16)
    # teacher: DPM++(3M) on 7 points = 6 calls; student: 2 non-AFS steps
    assert len(seen) == 8 and all(torch.equal(e, drawn[0]) for e in seen)
    assert len(losses) == 1 and torch.isfinite(losses[0].step_losses).all() and len(losses[0].step_losses) == 2
    assert all(torch.equal(p, q) for p, q in zip(sd.denoiser.parameters(), teacher_before))
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), student_before))


def test_accumulated_latent_iteration_equals_the_full_batch(sd, prompts):
    """Micro-batches of 1 (text embeddings split with their trajectories) give the full batch's gradient at
    every optimizer step (Adam's update is scale-free, so the gradients themselves are compared)."""
    def run(micro):
        d = Distiller(sd.denoiser, sd.make_student(), _latent_settings(micro_batch_size=micro),
                      conditioning=prompts.draw)
        return record_gradients(d, sd.latent_shape)

    (full_grads, full_losses), (acc_grads, acc_losses) = run(None), run(1)
    torch.testing.assert_close(acc_losses, full_losses, rtol=1e-5, atol=1e-6)
    assert len(full_grads) == 2  # one optimizer step per non-AFS student step
    for full, acc in zip(full_grads, acc_grads):
        torch.testing.assert_close(acc, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))


def test_diffusers_folder_round_trip_and_decode(sd, tmp_path):
    folder = save_diffusers_folder(sd, tmp_path / "sd")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "scaled_linear"
    loaded = load_stable_diffusion(folder)
    assert loaded.noise_levels == SD15_NOISE_LEVELS and loaded.latent_shape == (4, 8, 8)
    x, emb = torch.randn(2, 4, 8, 8) * 3, sd.text_encoder(["a cat", "a dog"])
    torch.testing.assert_close(loaded.text_encoder(["a cat", "a dog"]), emb)
    torch.testing.assert_close(loaded.denoiser(x, 3.0, emb), sd.denoiser(x, 3.0, emb))
    images = loaded.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    expected = sd.vae.decode(x / sd.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)


def test_missing_or_incomplete_model_names_what_to_get(tmp_path):
    with pytest.raises(StableDiffusionNotFound, match=r"not found at .*nowhere.*huggingface-cli download"):
        load_stable_diffusion(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(StableDiffusionNotFound, match=r"no vae/, text_encoder/, tokenizer/, scheduler/"):
        load_stable_diffusion(tmp_path / "partial")
    single = tmp_path / "v1-5-pruned-emaonly.safetensors"
    single.write_bytes(b"")
    with pytest.raises(StableDiffusionNotFound, match="single checkpoint file.*config"):
        load_stable_diffusion(single)


def test_prompt_files(tmp_path):
    """The MS-COCO 30k captions CSV layout (text2image-benchmark: columns image_id,text; captions may hold
    commas and quotes), a plain text file, seed -> prompt, and random draws."""
    csv_file = tmp_path / "MS-COCO_val2014_30k_captions.csv"
    csv_file.write_text('image_id,text\n9,"A man, riding a ""horse"""\n25,a bus\n30,two cats\n')
    assert load_prompts(csv_file) == ['A man, riding a "horse"', "a bus", "two cats"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,caption\n1,x\n")
    with pytest.raises(ValueError, match="'text' column"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(tmp_path / "none.csv")
    assert len(load_prompts(SMOKE_PROMPTS)) == 16
    pc = PromptConditioning(load_prompts(csv_file), encode=lambda p: p)
    assert pc.for_seeds([0, 1, 2, 3]) == ['A man, riding a "horse"', "a bus", "two cats", 'A man, riding a "horse"']
    assert sorted(pc.draw(3, random.Random(0))) == sorted(load_prompts(csv_file))  # without replacement
    assert len(pc.draw(5, random.Random(0))) == 5 and pc.null() == [""]
