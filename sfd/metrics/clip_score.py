"""CLIP score of text-to-image samples: 100 · cos(image embedding, prompt embedding), averaged over samples.

As the reference's `clip_score.py` computes it (100 · the dot product of the L2-normalised embeddings, no clamp
at 0; it uses open_clip's ViT-g-14 LAION-2B model, whose transformers port is `laion/CLIP-ViT-g-14-laion2B-s34B-b88K`),
here with transformers' `CLIPModel` from a local folder (config.json, weights, tokenizer files,
preprocessor_config.json), never downloaded. Images are preprocessed on their device like CLIP's processor:
[-1, 1] -> [0, 1], bicubic resize of the short side to the crop size (antialiased), centre crop, normalise
with the processor's mean and std (OpenAI's where the folder has no preprocessor config). Torch's bicubic
resize is not PIL's, so scores can differ from a PIL pipeline in the last digits.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from sfd.assets import CLIP_DOWNLOAD, CLIP_SCORE_HF_REPO, default_clip_folder
from sfd.hf import CLIPConfig, CLIPModel, CLIPTokenizer, tiny_clip_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIPScorer", "clip_score", "tiny_clip_scorer", "default_clip_folder", "CLIP_SCORE_HF_REPO",
           "CLIP_DOWNLOAD"]


class CLIPScorer:
    """Per-sample CLIP scores of images [B, 3, H, W] in [-1, 1] against their prompts."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, crop_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.crop_size = crop_size or model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.mean = torch.tensor(mean).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std).reshape(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CLIPScorer":
        """Load a transformers CLIP folder (e.g. a local copy of `CLIP_SCORE_HF_REPO`), offline."""
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP weights not found: no config.json in {folder}; get a transformers CLIP "
                                    f"folder with `huggingface-cli download {CLIP_SCORE_HF_REPO} --local-dir DIR` on a "
                                    f"machine with network access and give its path")
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, **_processor_settings(folder))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score takes RGB images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = (images.to(self.device, torch.float32).clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.crop_size / min(h, w)
        size = (max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2
        x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 · cos(image, prompt) per sample, float32 [B] on the model's device."""
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: {len(images)} images, {len(prompts)} prompts")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        image_emb = _embedding(self.model.get_image_features(pixel_values=self.preprocess(images)))
        text_emb = _embedding(self.model.get_text_features(input_ids=ids))
        return 100.0 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns the projected embedding inside an output object (`pooler_output`), 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _processor_settings(folder: Path) -> dict:
    """crop size, mean and std from the folder's preprocessor_config.json (CLIP's defaults where absent)."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    cfg = json.loads(file.read_text())
    crop = cfg.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return {"crop_size": crop, "mean": cfg.get("image_mean", OPENAI_CLIP_MEAN),
            "std": cfg.get("image_std", OPENAI_CLIP_STD)}


def clip_score(scorer: CLIPScorer, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> float:
    """The mean CLIP score of `images` against their `prompts` (the metric the paper reports for SD)."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        total += scorer.scores(batch, prompts[start:start + batch_size]).double().sum().cpu()
    return float(total / len(images))


def tiny_clip_scorer(seed: int = 0, device: str | torch.device = "cpu") -> CLIPScorer:
    """A randomly initialised CLIP of transformers' classes, shrunk for a CPU (2-layer text and vision towers of
    width 16, 32x32 crops, 8-d projections), built from config: what a smoke run scores with in place of local
    CLIP weights, so the CLIP-score wiring runs; its numbers mean nothing."""
    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    return CLIPScorer(model.to(device), tokenizer)
