"""Stable Diffusion v1.5 (or any epsilon-prediction latent text-to-image model in diffusers' layout) as a teacher.

The diffusers components (`UNet2DConditionModel`, `AutoencoderKL`, CLIP text encoder and tokenizer) are loaded
from a local diffusers folder or from a single checkpoint file, never downloaded (`local_files_only`, and the
Hugging Face libraries are put offline before they load anything). The UNet becomes the project's one denoiser
interface in latent space, as the reference's `CFGPrecond` converts it (spec §14):

    D(x, sigma, labels) = x - sigma·eps(x / sqrt(sigma² + 1), c, labels),   c = M·T(sigma) - 1,

with T(sigma) the discrete-time model time of `sfd.schedules.DiscreteVP` (fractional timesteps between the M
training levels), sigma_min = sigma(T=1e-3), sigma_max = sigma(1). `labels` carries the text conditioning (CLIP
prompt embeddings [B, 77, 768] for SD v1.5). Distillation uses the conditional branch only (omega = 1, one
forward); sampling guides against the empty prompt's embedding (`sfd.sampling.guided` with `null_labels`).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sfd.hf import (
    AutoencoderKL, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PNDMScheduler, StableDiffusionPipeline,
    UNet2DConditionModel, tiny_clip_tokenizer,
)
from sfd.schedules import DiscreteVP
from sfd.teachers.prompts import PromptConditioning

# Spec §11: Stable Diffusion v1.5's distillation range (t_max is its sigma_max = 14.61464, rounded).
SD15_T_MIN = 0.1
SD15_T_MAX = 14.6146
SD15_HF_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_SINGLE_FILE = "v1-5-pruned-emaonly.safetensors"
_FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DECODE_BATCH = 8  # latents the VAE decodes at once

__all__ = ["SD15_T_MIN", "SD15_T_MAX", "LatentTextDenoiser", "TextEncoder", "StableDiffusion",
           "noise_levels_from_scheduler_config", "check_stable_diffusion", "load_stable_diffusion",
           "tiny_stable_diffusion", "save_diffusers_folder", "StableDiffusionNotFound"]


class StableDiffusionNotFound(FileNotFoundError):
    """The model files are not where they were looked for; the message says what to get and how."""


class LatentTextDenoiser(torch.nn.Module):
    """An epsilon-prediction `UNet2DConditionModel` as D(x, sigma, labels=None, step=None) -> x0_hat in latent
    space (EDM's VE form). `sigma` is a Python float (as solvers pass it) or a tensor [B] / scalar; the UNet gets
    the fractional timestep c = M·T(sigma) - 1 computed in float64. Only the UNet is a submodule, so a student
    (a copy of this module) copies the UNet and nothing else."""

    def __init__(self, unet: torch.nn.Module, noise_levels: DiscreteVP):
        super().__init__()
        self.unet = unet
        self.noise_levels = noise_levels
        self.sigma_min = noise_levels.sigma_min
        self.sigma_max = noise_levels.sigma_max

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None, step=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("a text-conditioned denoiser needs labels: the prompt embeddings [B, tokens, dim]")
        if step is not None:
            raise ValueError("the Stable Diffusion denoiser has no SFD-v step condition")
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        timestep = self.noise_levels.timestep(sigma).float()
        s = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
        dtype = self.unet.dtype  # float16 weights take float16 inputs; under autocast this is float32 anyway
        eps = self.unet((x / (s * s + 1).sqrt()).to(dtype), timestep,
                        encoder_hidden_states=labels.to(x.device, dtype)).sample
        return x - s * eps.to(x.dtype)


class TextEncoder:
    """CLIP tokenizer + text encoder: prompts -> the last hidden state [B, 77, dim], what SD v1 conditions on
    (prompts padded to the encoder's 77 positions and truncated there)."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.max_length = text_encoder.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]


@dataclass
class StableDiffusion:
    """The loaded components: the latent denoiser (the teacher network), the VAE, the text encoder and the
    noise levels the `discrete` schedule needs."""

    denoiser: LatentTextDenoiser
    vae: torch.nn.Module
    text_encoder: TextEncoder
    noise_levels: DiscreteVP
    source: str = ""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def prompts(self, prompts) -> PromptConditioning:
        """`prompts` (a list of strings) encoded by this model's text encoder, per seed or at random."""
        return PromptConditioning(prompts, self.text_encoder)

    def make_student(self) -> LatentTextDenoiser:
        """A trainable copy of the denoiser (its UNet), in train mode."""
        return copy.deepcopy(self.denoiser).requires_grad_(True).train()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] [B, 3, H, W] (float32): the VAE decodes latents / scaling_factor,
        DECODE_BATCH latents at a time (SD's decoder holds ~1 GB of activations per 512x512 image)."""
        vae = self.vae
        images = [vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor).sample.float()
                  for chunk in latents.split(DECODE_BATCH)]
        return torch.cat(images).clamp(-1, 1)

    def to(self, device) -> "StableDiffusion":
        self.denoiser.to(device)
        self.vae.to(device)
        self.text_encoder.text_encoder.to(device)
        return self


def noise_levels_from_scheduler_config(config: dict) -> DiscreteVP:
    """The teacher's noise levels from its diffusers scheduler config (`scheduler/scheduler_config.json`):
    `trained_betas`, or `scaled_linear` / `linear` betas between beta_start and beta_end."""
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"only epsilon-prediction teachers are supported, the scheduler says prediction_type="
                         f"{config['prediction_type']!r}")
    if config.get("trained_betas") is not None:
        return DiscreteVP.from_betas(config["trained_betas"])
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    num = config.get("num_train_timesteps", 1000)
    kind = config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return DiscreteVP.scaled_linear(start, end, num)
    if kind == "linear":
        return DiscreteVP.from_betas(torch.linspace(start, end, num, dtype=torch.float64))
    raise ValueError(f"unsupported beta_schedule {kind!r} (supported: scaled_linear, linear, trained_betas)")


# What to download: the diffusers folder without the repo's other copies of the weights (.ckpt, .bin, fp16, the
# single files) and without the safety checker, which SFD does not use.
SD15_DOWNLOAD = (f"huggingface-cli download {SD15_HF_REPO} --local-dir DIR --exclude '*.ckpt' '*.bin' '*fp16*' "
                 f"'v1-5-pruned*' 'safety_checker/*'")


def _how_to_get(path: Path) -> str:
    return (f"get the diffusers folder with `{SD15_DOWNLOAD}` (or the single file {SD15_SINGLE_FILE}, "
            f"`python -m sfd.assets fetch sd-v1-5`, with such a folder as `config` for its configs and tokenizer) on "
            f"a machine with network access and give its path")


def _check_folder(folder: Path) -> None:
    missing = [part for part in _FOLDER_PARTS if not (folder / part).is_dir()]
    if missing:
        raise StableDiffusionNotFound(f"{folder} is not a complete diffusers Stable Diffusion folder: no "
                                      f"{', '.join(f'{p}/' for p in missing)}; {_how_to_get(folder)}")


def _scheduler_config(folder: Path) -> dict:
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise StableDiffusionNotFound(f"{file} not found; {_how_to_get(folder)}")
    return json.loads(file.read_text())


def check_stable_diffusion(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """The folder that holds the model's configs and tokenizer (`path` itself, or `config` for a single file),
    or a StableDiffusionNotFound saying what is missing and how to get it; reads no weights (a run checks this
    before it starts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise StableDiffusionNotFound(f"Stable Diffusion not found at {path}; {_how_to_get(path)}")
    if path.is_dir():
        _check_folder(path)
        folder = path
    else:
        if config is None or not Path(config).expanduser().is_dir():
            raise StableDiffusionNotFound(f"{path} is a single checkpoint file: its configs and tokenizer come from a "
                                          f"diffusers folder given as `config` (got {config!r}); {_how_to_get(path)}")
        folder = Path(config).expanduser()
        _check_folder(folder)
    _scheduler_config(folder)
    return folder


def load_stable_diffusion(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Stable Diffusion from `path`: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), or a single checkpoint file (.safetensors / .ckpt, e.g. v1-5-pruned-emaonly.safetensors) whose
    configs and tokenizer come from `config`, a diffusers folder (weights not needed there). Never downloads."""
    path = Path(path).expanduser()
    folder = check_stable_diffusion(path, config)
    if path.is_dir():
        unet, vae, text_encoder, tokenizer = _load_folder(path, dtype)
    else:
        unet, vae, text_encoder, tokenizer = _load_single_file(path, folder, dtype)
    levels = noise_levels_from_scheduler_config(_scheduler_config(folder))
    denoiser = LatentTextDenoiser(unet.to(device), levels).eval().requires_grad_(False)
    return StableDiffusion(denoiser=denoiser, vae=vae.to(device).eval().requires_grad_(False),
                           text_encoder=TextEncoder(tokenizer, text_encoder.to(device)), noise_levels=levels,
                           source=str(path))


def _load_folder(folder: Path, dtype: torch.dtype):
    opts = dict(local_files_only=True)
    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **opts),
            AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **opts),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **opts),
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **opts))


def _load_single_file(file: Path, config: Path, dtype: torch.dtype):
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True,
                                                    torch_dtype=dtype, safety_checker=None,
                                                    requires_safety_checker=False)
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer


# ----- a tiny randomly initialised stand-in (tests and --smoke): the same classes, built from config -------------

def tiny_stable_diffusion(seed: int = 0, device: str | torch.device = "cpu") -> StableDiffusion:
    """SD v1.5's layout shrunk for a CPU: a 2-level UNet2DConditionModel on 4x8x8 latents (cross-attention to
    16-dim text states), a 2-level AutoencoderKL (16x16 RGB images), a 2-layer CLIP text encoder over 77
    positions, SD v1.5's noise levels; random weights from `seed`. It proves wiring, not image quality."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    levels = DiscreteVP.scaled_linear()
    denoiser = LatentTextDenoiser(unet, levels).eval().requires_grad_(False)
    return StableDiffusion(denoiser=denoiser, vae=vae.eval().requires_grad_(False),
                           text_encoder=TextEncoder(tokenizer, text), noise_levels=levels,
                           source="tiny (random, built from config)").to(device)


def save_diffusers_folder(model: StableDiffusion, folder: str | os.PathLike) -> Path:
    """Write `model` (with SD v1.5's noise levels) as a diffusers folder, laid out as SD v1.5's own: each part's
    `save_pretrained`, and the PNDM scheduler config SD v1.5 ships (scaled_linear betas 0.00085 -> 0.012)."""
    if model.noise_levels != DiscreteVP.scaled_linear():
        raise ValueError("save_diffusers_folder writes SD v1.5's scheduler config; this model has other noise levels")
    folder = Path(folder)
    model.denoiser.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    model.text_encoder.text_encoder.save_pretrained(folder / "text_encoder")
    model.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
