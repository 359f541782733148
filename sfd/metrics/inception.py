"""FID features: Inception-v3 pool3 (2048-d) with the TensorFlow 2015-12-05 weights, from a local file.

The network is torch-fidelity's port (`FeatureExtractorInceptionV3`), which reproduces the TF graph
(TF-style bilinear resize to 299, (x - 128)/128 scaling) and takes uint8 images as the protocol saves
them (spec §1: uint8 = clip(x·127.5 + 128, 0, 255)). Its weights file is a plain PyTorch state dict
(`torch.save(state_dict)`), e.g. torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`; it is
located through `sfd.assets.require("inception-2015-12-05")` and never downloaded here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfd.assets import require
from sfd.metrics.fd import FeatureStats, save_stats

INCEPTION_ASSET = "inception-2015-12-05"
FEATURE_DIM = 2048

__all__ = ["InceptionFeatures", "to_uint8", "compute_reference_stats", "build_reference_stats", "INCEPTION_ASSET",
           "check_inception_weights", "image_batches", "collect_features"]


def to_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[-1, 1] float images -> uint8 exactly as the protocol saves them (clip, then truncate like EDM)."""
    x = torch.as_tensor(x)
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class InceptionFeatures:
    """Callable: uint8 images [B, 1 or 3, H, W] -> float32 pool3 features [B, 2048], on the extractor's
    device (FeatureStats accumulates there, so evaluation never waits on a host copy per batch)."""

    dim = FEATURE_DIM

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.weights_path = Path(require(INCEPTION_ASSET, path=weights_path))
        self.device = torch.device(device)
        self.net = _build_network(self.weights_path).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8:
            raise TypeError(f"Inception features take uint8 images (use to_uint8 on [-1, 1] floats), got {x.dtype}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: same value in R, G, B
        with _float32_matmuls():
            (features,) = self.net(x.to(self.device, non_blocking=True))
        return features.float()


@contextlib.contextmanager
def _float32_matmuls():
    """FID's Inception runs in true float32 whatever the run's precision: a `tf32` run leaves the process-wide
    TF32 switches on (sfd.sampling.use_precision), which would change the features on an NVIDIA GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _format_error(path: Path, e: Exception) -> ValueError:
    return ValueError(
        f"{path}: cannot load as Inception-v3 2015-12-05 weights. Expected a PyTorch state dict saved with "
        f"torch.save (torch-fidelity's weights-inception-2015-12-05-6726825d.pth format); "
        f"the NVlabs .pkl/.pt TorchScript files are a different format. Cause: {type(e).__name__}: {e}"
    )


def check_inception_weights(path: str | os.PathLike) -> None:
    """Raise ValueError naming `path` unless the network loads from it (checked before a run trains; the run then
    builds its network from the same read of the file)."""
    _build_network(Path(path))


@functools.lru_cache(maxsize=1)
def _read_weights(path: str, size: int, mtime_ns: int) -> bytes:
    """The weights file read once, safely (`torch.load(weights_only=True)`: tensors only, no code runs), and
    written back as bytes of plain tensors. Keyed by the file's version, so the pre-flight check and the run share
    one read, and a replaced file is read again."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _format_error(Path(path), e) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _format_error(Path(path), TypeError(f"file holds a {type(state).__name__}, not a dict of tensors"))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _build_network(path: Path) -> torch.nn.Module:
    # Imported here on purpose: `sfd.bench sample` times sampling through sfd.metrics.evaluate on GPU machines that
    # hold PyTorch but not torch-fidelity; only Inception features (FID, `sample --inception`) need the package.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    stat = path.stat()
    weights = _read_weights(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    # torch-fidelity's constructor unpickles what it is given with weights_only=False: it gets the tensors read
    # safely above, never the file itself (checkpoints are data, not code)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=io.BytesIO(weights))
    except Exception as e:  # wrong keys or shapes
        raise _format_error(path, e) from None


# ------------------------------------------------------------------------------------ reference stats

_IMAGE_SUFFIXES = (".png",)


def _to_nchw(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W], [N,H,W,C] or [N,C,H,W] (C in 1, 3) -> uint8 [N,C,H,W]."""
    x = torch.as_tensor(batch)
    if x.dtype != torch.uint8:
        raise TypeError(f"reference images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected images [N,H,W,C] or [N,C,H,W], got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3):
        return x
    if x.shape[-1] in (1, 3):
        return x.permute(0, 3, 1, 2)
    raise ValueError(f"cannot find a 1- or 3-channel axis in image shape {tuple(x.shape)}")


def _folder_batches(folder: Path, batch_size: int) -> Iterator[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG images found under {folder}")
    for i in range(0, len(files), batch_size):
        arrays = []
        for f in files[i : i + batch_size]:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))  # grayscale PNGs become 3 equal channels
        yield _to_nchw(np.stack(arrays))


def _array_batches(images: np.ndarray | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    x = _to_nchw(images)
    if x.shape[0] == 0:
        raise ValueError("no images given")
    yield from x.split(batch_size)


def image_batches(images_or_folder: np.ndarray | torch.Tensor | str | os.PathLike,
                  batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 [B, C, H, W] batches of an image array or of a folder of PNGs (read lazily)."""
    if isinstance(images_or_folder, (str, os.PathLike)):
        folder = Path(images_or_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        return _folder_batches(folder, batch_size)
    return _array_batches(images_or_folder, batch_size)


def collect_features(images_or_folder: np.ndarray | torch.Tensor | str | os.PathLike,
                     extractor: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Every image's `extractor` features, float32 [N, D] on the CPU (what PRDC compares, unlike FID's stats)."""
    return torch.cat([extractor(batch).float().cpu() for batch in image_batches(images_or_folder, batch_size)])


def compute_reference_stats(
    images_or_folder: np.ndarray | torch.Tensor | str | os.PathLike,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of `extractor` features over uint8 images (array or a folder of PNGs, read lazily)."""
    stats = FeatureStats()
    for batch in image_batches(images_or_folder, batch_size):
        stats.update(extractor(batch))
    return stats.mu, stats.sigma


def build_reference_stats(
    source: np.ndarray | torch.Tensor | str | os.PathLike,
    out_npz: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Inception reference statistics of `source`, written to `out_npz` in EDM's fid-refs format."""
    if Path(out_npz).suffix != ".npz":  # fail before the (long) feature pass, not after it
        raise ValueError(f"statistics file must end in .npz, got {out_npz}")
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_dir():
        raise FileNotFoundError(f"image folder not found: {source}")
    extractor = InceptionFeatures(weights_path, device=device)
    mu, sigma = compute_reference_stats(source, extractor, batch_size)
    save_stats(out_npz, mu, sigma)
    return mu, sigma
