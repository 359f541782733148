"""The Hugging Face libraries (diffusers, transformers), imported offline.

Stable Diffusion teachers and CLIP score are the only users. The offline switches are read when
huggingface_hub loads, so they are set here, before the imports; every loader still passes
`local_files_only=True`. Importing this module costs ~2 s, so the registry and the evaluation import the
modules that use it only when a Stable Diffusion teacher or CLIP score is asked for.
"""
from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

from diffusers import (  # noqa: E402  (after the offline switches above)
    AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

__all__ = ["AutoencoderKL", "PNDMScheduler", "StableDiffusionPipeline", "UNet2DConditionModel", "CLIPModel",
           "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer"]
