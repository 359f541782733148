"""The Hugging Face libraries (diffusers, transformers), imported offline, and the tokenizer of the tiny random
stand-ins built from config (tests and `--smoke`).

Stable Diffusion teachers and CLIP score are the only users. The offline switches are read when
huggingface_hub loads, so they are set here, before the imports; every loader still passes
`local_files_only=True`. Importing this module costs ~2 s, so the registry and the evaluation import the
modules that use it only when a Stable Diffusion teacher or CLIP score is asked for.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

from diffusers import (  # noqa: E402  (after the offline switches above)
    AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

__all__ = ["AutoencoderKL", "PNDMScheduler", "StableDiffusionPipeline", "UNet2DConditionModel", "CLIPConfig",
           "CLIPModel", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "tiny_clip_tokenizer"]


def _byte_level_alphabet() -> list[str]:
    """The 256 characters CLIP's byte-level BPE writes bytes as (GPT-2's bytes_to_unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is a token (vocabulary of 514), written to a temporary
    folder because the tokenizer reads its vocabulary from files. The tiny random Stable Diffusion and CLIP
    stand-ins share it."""
    chars = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars),
                                             "<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
