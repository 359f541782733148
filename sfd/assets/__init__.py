"""Named assets (teacher checkpoints, FID reference statistics, feature-extractor weights, data sets).

Nothing here touches the network unless ``fetch`` is called (or ``python -m sfd.assets fetch NAME``).
Look-up is local: ``$SFD_HOME`` (default ``~/.cache/sfd``) plus any folder an asset names, e.g. torch
hub's checkpoint cache, where torchvision and torch-fidelity look for their weights. A missing asset
is a ``MissingAssetError`` that says what was searched and how to get the file.

    python -m sfd.assets list
    python -m sfd.assets path edm-cifar10-32x32-uncond-vp
    python -m sfd.assets fetch edm-cifar10-32x32-uncond-vp [--url URL] [--dest DIR]

The command line is `sfd.assets.cli` (it reads the teachers and studies to say what needs each asset).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.hub
from tqdm.auto import tqdm

__all__ = [
    "Asset", "AssetError", "UnknownAssetError", "MissingAssetError", "AssetDownloadError", "AssetChecksumError",
    "ASSETS", "FID_REFS", "register", "unregister", "get", "sfd_home", "torch_hub_checkpoints", "asset_path", "require",
    "fetch", "verify", "shipped_weights",
]

EDM_PRETRAINED = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_FID_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"
CHUNK = 1 << 20


class AssetError(Exception):
    """Base class of this module's errors; their messages are one line, fit for a CLI."""


class UnknownAssetError(AssetError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingAssetError(AssetError, FileNotFoundError):
    pass


class AssetDownloadError(AssetError, ConnectionError):
    pass


class AssetChecksumError(AssetError, ValueError):
    pass


def sfd_home() -> Path:
    """The asset folder: ``$SFD_HOME``, else ``~/.cache/sfd`` (read at call time, not import time)."""
    return Path(os.environ.get("SFD_HOME") or "~/.cache/sfd").expanduser()


def torch_hub_checkpoints() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where torchvision and torch-fidelity look for their weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class Asset:
    """One downloadable file. Checksums and sizes are given only where known for sure; else None."""

    name: str
    filename: str
    url: str
    description: str = ""
    sha256: str | None = None
    sha256_prefix: str | None = None  # torch hub convention: name-<sha256 prefix>.ext, checked by torchvision
    md5: str | None = None
    size: int | None = None
    subdir: str = ""  # folder under $SFD_HOME
    extra_dirs: tuple[Callable[[], Path], ...] = ()  # more folders to search, e.g. torch hub's cache
    default_dir: Callable[[], Path] | None = None  # where fetch puts it; None: $SFD_HOME/subdir
    how_to_get: str = ""  # extra manual instructions

    @property
    def checkable(self) -> bool:
        """Whether a local copy can be told whole or not: the asset knows its size or a checksum."""
        return self.size is not None or bool(self.sha256 or self.sha256_prefix or self.md5)

    def home_dir(self) -> Path:
        return sfd_home() / self.subdir if self.subdir else sfd_home()

    def fetch_dir(self) -> Path:
        return self.default_dir() if self.default_dir is not None else self.home_dir()

    def search_paths(self) -> list[Path]:
        dirs = [self.home_dir(), sfd_home(), *(d() for d in self.extra_dirs)]
        if self.default_dir is not None:
            dirs.append(self.default_dir())
        paths: list[Path] = []
        for d in dirs:
            p = d / self.filename
            if p not in paths:
                paths.append(p)
        return paths


ASSETS: dict[str, Asset] = {}


def register(asset: Asset, *, replace: bool = False) -> Asset:
    if asset.name in ASSETS and not replace:
        raise ValueError(f"asset {asset.name!r} is already registered")
    ASSETS[asset.name] = asset
    return asset


def unregister(name: str) -> None:
    ASSETS.pop(name, None)


def get(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def _edm(name: str, what: str) -> Asset:
    return Asset(name=name, filename=f"{name}.pkl", url=EDM_PRETRAINED + f"{name}.pkl", subdir="edm",
                 description=f"EDM teacher: {what} (NVlabs pickle; loaded safely by sfd.teachers.load_edm_pickle)")


def _fid_ref(dataset: str) -> Asset:
    return Asset(name=f"fid-ref-{dataset}", filename=f"{dataset}.npz", url=EDM_FID_REFS + f"{dataset}.npz",
                 subdir="fid-refs", description=f"FID reference statistics (mu, sigma) for {dataset}, EDM's")


for _asset in (
    _edm("edm-cifar10-32x32-uncond-vp", "CIFAR-10 32x32 unconditional, DDPM++ (SongUNet)"),
    _edm("edm-ffhq-64x64-uncond-vp", "FFHQ 64x64 unconditional, DDPM++ (SongUNet)"),
    _edm("edm-afhqv2-64x64-uncond-vp", "AFHQv2 64x64 unconditional, DDPM++ (SongUNet)"),
    _edm("edm-imagenet-64x64-cond-adm", "ImageNet 64x64 class-conditional, ADM (DhariwalUNet)"),
    _fid_ref("cifar10-32x32"),
    _fid_ref("imagenet-64x64"),
    _fid_ref("ffhq-64x64"),
    _fid_ref("afhqv2-64x64"),
    Asset(name="inception-2015-12-05", filename="weights-inception-2015-12-05-6726825d.pth",
          url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
              "weights-inception-2015-12-05-6726825d.pth",
          description="Inception-v3 FID weights (TF 2015-12-05) as torch-fidelity loads them",
          default_dir=torch_hub_checkpoints,
          how_to_get="torch-fidelity looks for it in torch hub's checkpoints folder"),
    Asset(name="lpips-vgg16", filename="vgg16-397923af.pth",
          url="https://download.pytorch.org/models/vgg16-397923af.pth",
          description="torchvision VGG16 ImageNet weights, the LPIPS-VGG trunk", sha256_prefix="397923af",
          default_dir=torch_hub_checkpoints,
          how_to_get="torchvision looks for it in torch hub's checkpoints folder"),
    Asset(name="lpips-alexnet", filename="alexnet-owt-7be5be79.pth",
          url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
          description="torchvision AlexNet ImageNet weights, the LPIPS-Alex trunk", sha256_prefix="7be5be79",
          default_dir=torch_hub_checkpoints,
          how_to_get="torchvision looks for it in torch hub's checkpoints folder"),
    Asset(name="cifar10-train", filename="cifar-10-python.tar.gz",
          url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", subdir="datasets",
          description="CIFAR-10 (python version): training images (the vanilla rows of the ablation draw x0 from them; also FID reference statistics)",
          md5="c58f30108f718f92721af3b95e74349a", size=170498071),
    Asset(name="sd-v1-5", filename="v1-5-pruned-emaonly.safetensors",
          url="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
              "v1-5-pruned-emaonly.safetensors", subdir="stable-diffusion",
          description="Stable Diffusion v1.5 as one checkpoint file (EMA weights, ~4 GB; its configs and tokenizer "
                      "come from a diffusers folder, see sfd.teachers.stable_diffusion)",
          how_to_get="a diffusers folder of its configs and tokenizer goes with it; the README's Stable Diffusion "
                     "section gives the command that downloads that folder, weights included"),
    Asset(name="coco-30k-captions", filename="MS-COCO_val2014_30k_captions.csv",
          url="https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/"
              "MS-COCO_val2014_30k_captions.csv", subdir="prompts",
          description="the MS-COCO val2014 30k captions SD's FID-30k and CLIP score use (columns image_id, text)"),
):
    register(_asset)
del _asset

# FID reference statistics by the dataset a teacher models (sfd.teachers.TeacherSpec.dataset).
FID_REFS = {"cifar10": "fid-ref-cifar10-32x32", "imagenet64": "fid-ref-imagenet-64x64",
            "ffhq64": "fid-ref-ffhq-64x64", "afhqv2-64": "fid-ref-afhqv2-64x64"}


# ----------------------------------------------------------------------------------------------------------
# Look-up.

def asset_path(name: str) -> Path | None:
    """The first existing file among the asset's search paths, or None."""
    for path in get(name).search_paths():
        if path.is_file():
            return path
    return None


def _how_to_get(asset: Asset) -> str:
    extra = f" ({asset.how_to_get})" if asset.how_to_get else ""
    return (f"get it with `python -m sfd.assets fetch {asset.name}`, or download {asset.url} by hand into "
            f"{asset.fetch_dir()}{extra}; set SFD_HOME to use another asset folder")


def require(name: str, path: str | os.PathLike | None = None) -> Path:
    """The asset's local file. With ``path`` (a file, or a folder holding the file) only that is checked.
    Where the asset knows its size or checksum, a file that does not match (a truncated copy) is refused."""
    asset = get(name)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / asset.filename
        if p.is_file():
            return _verified(asset, p)
        raise MissingAssetError(f"asset '{name}' ({asset.filename}) not found at the given path {p}; "
                                + _how_to_get(asset))
    found = asset_path(name)
    if found is not None:
        return _verified(asset, found)
    searched = ", ".join(str(p) for p in asset.search_paths())
    raise MissingAssetError(f"asset '{name}' ({asset.filename}) not found; searched: {searched}; "
                            + _how_to_get(asset))


def file_version(path: Path) -> tuple:
    """(resolved path, size, mtime): what a once-per-process check of a file is keyed by, so a file that is
    replaced or rewritten is checked again."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


_VERIFIED: set[tuple] = set()  # versions of files found whole: each is hashed once per process


def _verified(asset: Asset, path: Path) -> Path:
    if not asset.checkable:
        return path
    key = file_version(path)
    if key not in _VERIFIED:
        try:
            verify(asset, path)
        except AssetChecksumError as e:
            raise AssetChecksumError(f"{e}; delete it and run `python -m sfd.assets fetch {asset.name}` (or fetch "
                                     "with --force)") from None
        _VERIFIED.add(key)
    return path


def shipped_weights(weights: Path, record: Path, remedy: str) -> dict:
    """The JSON `record` written beside a weights file the package ships (the embedded digits teachers, the digits
    classifier), once `weights` is there and its SHA-256 is the one the record gives; else a MissingAssetError or
    AssetChecksumError (one line naming the file, then `remedy`). Checked before a run exists, and again by the
    loader: a truncated copy failed inside the run, or after training. Hashing the 0.7 MB file takes ~1 ms."""
    for path in (weights, record):
        if not path.is_file():
            raise MissingAssetError(f"{path} is missing; {remedy}")
    try:
        info = json.loads(record.read_text())
        expected = info["sha256"]
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, not a mapping, no checksum
        raise AssetChecksumError(f"{record} is not the record of {weights.name} ({type(exc).__name__}); "
                                 f"{remedy}") from None
    if hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
        raise AssetChecksumError(f"{weights} is not the file {record.name} records (its SHA-256 differs: a truncated "
                                 f"or modified copy); {remedy}")
    return info


# ----------------------------------------------------------------------------------------------------------
# Download.

def verify(asset: Asset, path: Path) -> None:
    """Check size and checksums where the asset knows them; raise AssetChecksumError on a mismatch."""
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        raise AssetChecksumError(f"{path}: size {size} bytes, expected {asset.size} for asset '{asset.name}'")
    sha = hashlib.sha256() if asset.sha256 or asset.sha256_prefix else None
    md5 = hashlib.md5() if asset.md5 else None
    if sha is None and md5 is None:
        return
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in (sha, md5):
                if h is not None:
                    h.update(chunk)
    problems = []
    if asset.sha256 and sha.hexdigest() != asset.sha256:
        problems.append(f"sha256 {sha.hexdigest()} != expected {asset.sha256}")
    if asset.sha256_prefix and not sha.hexdigest().startswith(asset.sha256_prefix):
        problems.append(f"sha256 {sha.hexdigest()} does not start with {asset.sha256_prefix}")
    if asset.md5 and md5.hexdigest() != asset.md5:
        problems.append(f"md5 {md5.hexdigest()} != expected {asset.md5}")
    if problems:
        raise AssetChecksumError(f"{path}: {'; '.join(problems)} (asset '{asset.name}')")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "sfd-assets/1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _download(asset: Asset, url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append the rest of ``url`` to ``part``, resuming with an HTTP Range request where a part exists."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part is already complete (or junk)
            return
        raise
    with resp:
        if offset and resp.status != 206:  # server ignored the range: start over
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else asset.size
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=asset.filename, disable=not progress) as bar:
            received = 0
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if length is not None and received < int(length):
        raise AssetDownloadError(f"download of {url} stopped after {offset + received} bytes of {total}; "
                                 f"run the fetch again to resume from {part}")
    if length is None and not asset.checkable:
        warnings.warn(f"{url} sent no length and asset '{asset.name}' has no registered size or checksum: "
                      f"nothing can tell whether the {offset + received} bytes received are the whole file")


def _resume_note(part: Path) -> str:
    if part.is_file() and part.stat().st_size:
        return f"; the next fetch resumes from {part} ({part.stat().st_size} bytes)"
    return ""


def fetch(name: str, dest_dir: str | os.PathLike | None = None, url: str | None = None, *,
          progress: bool = True, timeout: float = 60.0, force: bool = False) -> Path:
    """Download an asset to ``dest_dir`` (default: where the asset is looked for) and return its path.

    Writes ``<file>.part`` first, resumes a partial ``.part`` with a Range request, checks size and
    checksum where known (a mismatch deletes the part), then renames atomically.
    """
    asset = get(name)
    url = url or asset.url
    dest = Path(dest_dir).expanduser() if dest_dir is not None else asset.fetch_dir()
    final = dest / asset.filename
    if final.is_file() and not force:
        try:
            verify(asset, final)
        except AssetChecksumError as e:
            raise AssetChecksumError(f"{e}; delete it, or fetch with --force, to download it again") from None
        return final
    dest.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    try:
        _download(asset, url, part, progress, timeout)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        if isinstance(e, AssetError):
            raise
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise AssetDownloadError(f"could not download asset '{name}' from {url}: {reason}; without network access, "
                                 f"download it on another machine and copy it to {final} (or pass its path "
                                 f"explicitly); --url takes a mirror{_resume_note(part)}") from None
    try:
        verify(asset, part)
    except AssetChecksumError as e:
        part.unlink(missing_ok=True)
        raise AssetChecksumError(f"refused the download of '{name}' from {url}: {e}; the partial file was "
                                 "deleted") from None
    os.replace(part, final)
    return final
