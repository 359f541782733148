"""Reference statistics from a folder of local images, for datasets whose statistics are not a download
(Stable Diffusion's FID-30k against MS-COCO val2014):

    python -m sfd.metrics.reference build IMAGES_DIR OUT.npz [--resolution 512] [--max-images 30000]

Every .jpg / .jpeg / .png under IMAGES_DIR (sorted by path, the first --max-images) is converted to RGB,
centre-cropped to a square and resized to --resolution x --resolution with PIL's bicubic filter, the size SD v1.5
samples at, then scored by the Inception network FID uses. MS-COCO images vary in size (mostly 640 x 480), so
some resize is unavoidable; this crop-and-resize is this project's choice (the usual one for COCO FID-30k, as in
clean-fid and GigaGAN's evaluation), not read from the SFD reference's code. The file holds `mu` and `sigma`
(EDM's fid-refs layout) and `features`, the first PRDC_MAX_SAMPLES images' features, which PRDC compares with.
Point `eval.reference` at the file, or put it where `python -m sfd.assets path fid-ref-coco2014-30k` says.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from sfd.metrics.fd import FeatureStats, save_stats
from sfd.metrics.inception import InceptionFeatures
from sfd.metrics.prdc import PRDC_MAX_SAMPLES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SD_RESOLUTION = 512
COCO_30K = 30_000

__all__ = ["reference_image", "image_files", "build_reference", "main"]


def reference_image(path: Path, resolution: int) -> np.ndarray:
    """One image as uint8 [resolution, resolution, 3]: RGB, centre-cropped to a square, bicubic resize."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im)


def image_files(folder: Path, max_images: int | None) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {folder}")
    return files[:max_images]


def _batches(files: list[Path], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(files), batch_size):
        arrays = [reference_image(f, resolution) for f in files[i:i + batch_size]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def build_reference(folder: str | os.PathLike, out_npz: str | os.PathLike, *, resolution: int = SD_RESOLUTION,
                    max_images: int | None = COCO_30K, weights_path=None, batch_size: int = 64,
                    device: str | torch.device = "cpu", extractor=None) -> Path:
    """Write the statistics (and the first PRDC_MAX_SAMPLES features) of the folder's images to `out_npz`.
    `extractor` (uint8 [B, 3, H, W] -> features) defaults to the FID Inception network."""
    if Path(out_npz).suffix != ".npz":  # fail before the (long) feature pass, not after it
        raise ValueError(f"statistics file must end in .npz, got {out_npz}")
    files = image_files(Path(folder), max_images)
    extractor = extractor or InceptionFeatures(weights_path, device=device)
    stats, kept = FeatureStats(), []
    for batch in _batches(files, resolution, batch_size):
        features = extractor(batch).float()
        stats.update(features)
        if sum(len(k) for k in kept) < PRDC_MAX_SAMPLES:
            kept.append(features.cpu())
    features = torch.cat(kept)[:PRDC_MAX_SAMPLES].numpy()
    return save_stats(out_npz, stats.mu, stats.sigma, features)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfd.metrics.reference", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="statistics (+ PRDC features) of a folder of images")
    build.add_argument("images", help="folder of .jpg/.jpeg/.png reference images (searched recursively)")
    build.add_argument("out", help="the .npz file to write")
    build.add_argument("--resolution", type=int, default=SD_RESOLUTION)
    build.add_argument("--max-images", type=int, default=COCO_30K, help="the first N images by path")
    build.add_argument("--inception", default=None, help="Inception weights file (default: the asset)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        out = build_reference(args.images, args.out, resolution=args.resolution, max_images=args.max_images,
                              weights_path=args.inception, batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
