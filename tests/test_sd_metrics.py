"""The new metrics as a run computes them (sfd.metrics.evaluate): PRDC for the digits (classifier features) and
mixture (data space) teachers, CLIP score of decoded SD samples against each seed's prompt, the local reference
statistics builder (`python -m sfd.metrics.reference build`), and their one-line errors before a run exists.
Each metric is checked against a direct computation on the same samples (sfd.metrics.prdc / clip_score are
tested against hand computations in test_prdc.py / test_clip_score.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd.assets import MissingAssetError
from sfd.config import ConfigError, load_config
from sfd.metrics.clip_score import clip_score, tiny_clip_scorer
from sfd.metrics.evaluate import evaluate, student_sampler
from sfd.metrics.prdc import digits_prdc, prdc
from sfd.metrics.reference import main as reference_main
from sfd.metrics.reference import build_reference
from sfd.runner.preflight import prepare
from sfd.sampling import GridSpec, generate
from sfd.tracking import TAG_SMOKE_NOTE
from sfd.teachers import get_teacher
from sfd.teachers.prompts import SMOKE_PROMPTS
from sfd.teachers.stable_diffusion import save_diffusers_folder, tiny_stable_diffusion

ROOT = Path(__file__).resolve().parents[1]
SD15 = ROOT / "experiments" / "sd15_sfd.yaml"
GRID = GridSpec(num_steps=4, afs=True)


@pytest.mark.parametrize("name", ["digits", "gmm-4"])
def test_prdc_of_a_run_equals_the_direct_computation(name):
    teacher = get_teacher(name)
    result = evaluate(student_sampler(teacher.net, GRID), teacher, ["prdc"], 40, batch_size=16, progress=False)
    samples, _ = generate(teacher.net, GRID, range(40), teacher.shape, batch_size=40)
    samples = samples.clamp(-1, 1)
    if name == "digits":
        expected = digits_prdc(samples)
    else:  # as many mixture samples as fakes, from generator seed 0, in the data space
        expected = prdc(teacher.net.sample(40, torch.Generator().manual_seed(0)), samples)
    assert result.metrics == pytest.approx(expected, abs=1e-12)
    assert 0 < result.metrics["precision"] <= 1 and 0 < result.metrics["coverage"] <= 1


def test_clip_score_of_a_run_scores_decoded_samples_against_each_seeds_prompt():
    teacher = get_teacher("sd-v1-5", smoke=True)
    scorer = tiny_clip_scorer(seed=0)
    grid = GridSpec(num_steps=3, afs=False, schedule="discrete", t_min=0.1, t_max=14.6146, rho=1.0)
    sampler = student_sampler(teacher.net, grid, guidance=2.0, prompts=teacher.condition)
    result = evaluate(sampler, teacher, ["clip_score"], 5, batch_size=2, progress=False, clip_scorer=scorer)
    latents, _ = sampler.sample(range(5), teacher.shape, device="cpu", batch_size=5)
    images = teacher.decode(latents)
    assert images.shape == (5, 3, 16, 16)
    expected = clip_score(scorer, images, teacher.condition.prompts_for_seeds(range(5)))
    assert result.metrics["clip_score"] == pytest.approx(expected, rel=1e-4)
    assert result.grid_image.size[0] > 16  # the grid shows decoded 16x16 images, not 8x8 latents


def test_reference_builder_crops_resizes_and_keeps_features(tmp_path):
    """Images of three sizes; a stand-in extractor (per-channel means) makes the expected statistics exact."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 48), (40, 60), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    def extractor(batch):
        return batch.float().mean((2, 3))
    out = build_reference(tmp_path, tmp_path / "ref.npz", resolution=16, extractor=extractor, batch_size=2)
    expected = []
    for i in range(3):
        with Image.open(tmp_path / f"{i}.png") as im:
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((16, 16), Image.BICUBIC)
            expected.append(np.asarray(im, dtype=np.float64).mean((0, 1)))
    expected = np.stack(expected)
    with np.load(out) as data:
        np.testing.assert_allclose(data["mu"], expected.mean(0), rtol=1e-6)
        np.testing.assert_allclose(data["sigma"], np.cov(expected, rowvar=False), rtol=1e-5)
        np.testing.assert_allclose(data["features"], expected, rtol=1e-6)


def test_reference_builder_refuses_a_missing_folder(tmp_path, capsys):
    assert reference_main(["build", str(tmp_path / "none"), str(tmp_path / "x.npz")]) == 2
    assert capsys.readouterr().err.startswith("error: image folder not found:")


@pytest.mark.parametrize("config,overrides,message", [
    ("digits_sfd", ["eval.metrics=[clip_score]"], r"clip_score needs a text-conditioned teacher"),
])
def test_metrics_that_do_not_fit_the_teacher_are_refused(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "experiments" / f"{config}.yaml", overrides)


def test_missing_clip_weights_or_reference_statistics_are_one_line_errors(tmp_path, monkeypatch):
    """A complete (tiny) diffusers folder and the prompts are there; CLIP weights and the COCO statistics are not."""
    monkeypatch.setenv("SFD_HOME", str(tmp_path / "home"))
    folder = save_diffusers_folder(tiny_stable_diffusion(seed=0), tmp_path / "sd")
    base = [f"teacher.path={folder}", f"teacher.prompts={SMOKE_PROMPTS}", "device=cpu"]
    with pytest.raises(ConfigError, match=r"^eval.clip_model: no CLIP model at .*home/clip/CLIP-ViT-g-14-laion2B-"
                                          r"s34B-b88K \(no config.json\); get it with `huggingface-cli download"):
        prepare(load_config(SD15, [*base, "eval.metrics=[clip_score]"]))
    with pytest.raises(MissingAssetError, match=r"fid-ref-coco2014-30k.*build it from the local MS-COCO val2014 "
                                                r"images with `python -m sfd.metrics.reference build"):
        prepare(load_config(SD15, [*base, "eval.metrics=[fid]"]))


def test_smoke_runs_keep_offline_prdc_and_substitute_image_prdc():
    cfg, notes = prepare(load_config(ROOT / "experiments" / "digits_sfd.yaml", ["eval.metrics=[prdc]"]), smoke=True)
    assert cfg.eval.metrics == ["prdc"]
    cfg, notes = prepare(load_config(ROOT / "experiments" / "cifar10_sfd.yaml", ["eval.metrics=[fid,prdc]"]),
                         smoke=True)
    assert cfg.eval.metrics == ["teacher_gap"] and "prdc needs Inception weights" in notes[f"{TAG_SMOKE_NOTE}metric.prdc"]
