"""Text prompts for text-conditioned teachers: read from a file, picked per seed or drawn per trajectory.

Two file layouts are read:
- a CSV with a `text` column, one prompt per row: the MS-COCO val2014 30k captions the paper evaluates Stable
  Diffusion on (text2image-benchmark's `MS-COCO_val2014_30k_captions.csv`, columns `image_id,text`, which the
  reference implementation reads with `csv.DictReader` and `row['text']`);
- a plain text file, one prompt per non-empty line (the small `SMOKE_PROMPTS` file shipped here).

As in the reference, sample `seed` gets prompt number `seed` (FID-30k samples seeds 0..29999 on the 30k
captions), and distillation draws a random prompt per trajectory.
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

SMOKE_PROMPTS = Path(__file__).resolve().parent / "data" / "smoke_prompts.txt"

__all__ = ["SMOKE_PROMPTS", "load_prompts", "PromptConditioning"]


def load_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a captions CSV (its `text` column) or of a text file (one per line), in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}; give a CSV with a 'text' column (e.g. the MS-COCO "
                                f"val2014 30k captions) or a text file with one prompt per line")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "text" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a captions CSV needs a 'text' column, found columns {reader.fieldnames}")
            prompts = [row["text"] for row in reader]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


class PromptConditioning:
    """Prompts plus the text encoder that turns them into the conditioning a text teacher's denoiser takes.

    - `for_seeds(seeds)`: the embeddings of prompt `seed % len(prompts)` for each seed (for `sfd.sampling.generate`'s
      `condition`);
    - `draw(n, rng)`: the embeddings of n prompts drawn at random (for `sfd.distill`'s `conditioning`), without
      replacement where the file has n prompts (the reference's `random.sample`);
    - `null()`: the empty prompt's embedding [1, ...], what classifier-free guidance contrasts with.
    """

    def __init__(self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]):
        if not prompts:
            raise ValueError("PromptConditioning needs at least one prompt")
        self.prompts = list(prompts)
        self.encode = encode

    def prompts_for_seeds(self, seeds: Sequence[int]) -> list[str]:
        return [self.prompts[int(s) % len(self.prompts)] for s in seeds]

    def for_seeds(self, seeds: Sequence[int]) -> torch.Tensor:
        return self.encode(self.prompts_for_seeds(seeds))

    def draw(self, n: int, rng: random.Random) -> torch.Tensor:
        picked = rng.sample(self.prompts, n) if n <= len(self.prompts) else rng.choices(self.prompts, k=n)
        return self.encode(picked)

    def null(self) -> torch.Tensor:
        return self.encode([""])
