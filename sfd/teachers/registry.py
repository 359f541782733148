"""Teachers by name, so configs and studies name them by string.

`teacher_spec(name)` says what a teacher is without loading it (a frozen `TeacherSpec`: source, dataset, classes,
default metric, checkpoint and data assets), so configs are checked before anything is read. `get_teacher(name)`
returns a `Teacher`: the denoiser network plus what a run needs to know about it (sample shape, classes, time range,
default metric, where real training images come from for Algorithm 1).
"""
from __future__ import annotations

import copy
import io
import pickle
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from sfd.assets import AssetError, require
from sfd.metrics.digits import load_digits_data
from sfd.networks.edm import EDM_CONFIGS, EDMPrecond, architecture_mismatch, is_step_key
from sfd.networks.mlp import MLPDenoiser
from sfd.teachers.edm_pickle import EDMPickleError, check_edm_pickle_header, load_edm_pickle
from sfd.teachers.embedded import embedded_teacher_info, load_embedded_teacher
from sfd.teachers.gmm import GaussianMixture


class TeacherError(ValueError):
    """A teacher that cannot be used as named: an unknown name, or a checkpoint that is not its network."""


@dataclass(frozen=True)
class TeacherSpec:
    """What a named teacher is, known without loading it."""

    name: str
    description: str
    source: str  # checkpoint (an EDM pickle; teacher.path applies) | embedded (shipped) | analytic (exact mixture)
    dataset: str  # the data it models: digits, gmm, cifar10, ...
    default_metric: str  # what a run reports when eval.metrics is null
    num_classes: int = 0
    checkpoint: str | None = None  # a checkpoint teacher's asset, also its EDM architecture key
    data_asset: str | None = None  # a checkpoint teacher's training images for Algorithm 1, if registered

    @property
    def has_training_images(self) -> bool:
        """Whether Algorithm 1 can draw real images (digits, mixture samples, a data asset)."""
        return self.source != "checkpoint" or self.data_asset is not None


def _edm_spec(name: str, description: str, arch: str, dataset: str, data_asset: str | None = None) -> TeacherSpec:
    return TeacherSpec(name, description, "checkpoint", dataset, "fid", num_classes=EDM_CONFIGS[arch]["label_dim"],
                       checkpoint=arch, data_asset=data_asset)


_FIXED_TEACHERS = {spec.name: spec for spec in (
    TeacherSpec("digits", "embedded: small EDM SongUNet trained on scikit-learn's 8x8 digits (unconditional)",
                "embedded", "digits", "fd_digits"),
    TeacherSpec("digits-cond", "embedded: the same, class-conditional (10 labels, label dropout for guidance)",
                "embedded", "digits", "fd_digits", num_classes=10),
    _edm_spec("cifar10-uncond", "EDM CIFAR-10 32x32 unconditional (DDPM++ VP, 56M params)",
              "edm-cifar10-32x32-uncond-vp", "cifar10", "cifar10-train"),
    _edm_spec("ffhq64-uncond", "EDM FFHQ 64x64 unconditional (DDPM++ VP)", "edm-ffhq-64x64-uncond-vp", "ffhq64"),
    _edm_spec("afhqv2-64-uncond", "EDM AFHQv2 64x64 unconditional (DDPM++ VP)", "edm-afhqv2-64x64-uncond-vp",
              "afhqv2-64"),
    _edm_spec("imagenet64-cond", "EDM ImageNet 64x64 class-conditional (ADM, 1000 classes)",
              "edm-imagenet-64x64-cond-adm", "imagenet64"),
)}
_GMM_DESCRIPTIONS = {
    "gmm-<k>": "analytic: 2-D Gaussian mixture with k components (exact denoiser)",
    "gmm-img-<k>": "analytic: 1x8x8 'image' Gaussian mixture with k components (exact denoiser)",
}
# Every teacher name (mixtures as patterns) -> its description, for listings and error messages.
TEACHERS: dict[str, str] = {
    **{name: spec.description for name, spec in _FIXED_TEACHERS.items() if spec.source == "embedded"},
    **_GMM_DESCRIPTIONS,
    **{name: spec.description for name, spec in _FIXED_TEACHERS.items() if spec.source == "checkpoint"},
}
_GMM = re.compile(r"gmm-(img-)?(\d+)$")


def teacher_spec(name: str) -> TeacherSpec:
    """The spec of a teacher name (see TEACHERS), or a TeacherError."""
    if name in _FIXED_TEACHERS:
        return _FIXED_TEACHERS[name]
    match = _GMM.match(name)
    if match is None:
        raise TeacherError(f"unknown teacher {name!r}; choose one of {sorted(TEACHERS)}")
    pattern = "gmm-img-<k>" if match.group(1) else "gmm-<k>"
    return TeacherSpec(name, _GMM_DESCRIPTIONS[pattern], "analytic", "gmm", "teacher_gap")


@dataclass
class Teacher:
    name: str
    net: torch.nn.Module
    shape: tuple[int, ...]
    num_classes: int = 0
    t_min: float = 0.006
    t_max: float = 80.0
    dataset: str = "gmm"
    default_metric: str = "teacher_gap"
    smoke: bool = False
    init_kwargs: dict | None = None  # EDMPrecond kwargs, to build SFD-v students
    data_fn: Callable[[int, int], Iterator] | None = field(default=None, repr=False)
    student_fn: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)  # non-copy students
    description: str = ""

    def make_student(self, step_condition: bool = False, step_init: str = "random") -> torch.nn.Module:
        """A trainable copy of the teacher (train mode). With `step_condition`, an SFD-v student: the same
        network plus the step layers (initialised as `step_init` says), every other weight from the teacher."""
        if step_condition:
            return make_step_conditioned(self.net, self.init_kwargs, step_init)
        if self.student_fn is not None:
            return self.student_fn().requires_grad_(True).train()
        student = copy.deepcopy(self.net)
        return student.requires_grad_(True).train()

    def data(self, batch_size: int, seed: int = 0) -> Iterator:
        """Real images for Algorithm 1, as an endless iterator of batches (images, labels or None)."""
        if self.data_fn is None:
            raise ValueError(f"teacher {self.name!r} has no training-image source for Algorithm 1")
        return self.data_fn(batch_size, seed)


def make_step_conditioned(net: torch.nn.Module, init_kwargs: dict | None, step_init: str = "random") -> torch.nn.Module:
    if init_kwargs is None:
        raise ValueError("SFD-v needs an EDM network whose init kwargs are known")
    kwargs = {**init_kwargs, "step_condition": True, "step_init": step_init}
    student = EDMPrecond(**kwargs).to(next(net.parameters()).device)
    result = student.load_state_dict(net.state_dict(), strict=False)
    unexpected_new = [k for k in result.missing_keys if not is_step_key(k)]
    if result.unexpected_keys or unexpected_new:
        raise RuntimeError(f"teacher weights do not fit the SFD-v student: missing {unexpected_new}, "
                           f"unexpected {result.unexpected_keys}")
    return student.requires_grad_(True).train()


# ----- data sources -------------------------------------------------------------------------------------

def _endless(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int) -> Iterator:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield images[idx], (labels[idx] if labels is not None else None)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickled dicts of numpy arrays: allow exactly what rebuilds those."""

    # _codecs.encode only turns a string into bytes: protocol-2 pickles written by Python 3 need it.
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch asks for {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def load_cifar10_train(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 50,000 CIFAR-10 training images in [-1, 1] [N, 3, 32, 32] and labels, from cifar-10-python.tar.gz."""
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        for i in range(1, 6):
            member = tar.extractfile(f"cifar-10-batches-py/data_batch_{i}")
            batch = _CifarUnpickler(io.BytesIO(member.read()), encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
    x = torch.from_numpy(np.concatenate(images)).float() / 127.5 - 1.0
    return x, torch.tensor(labels)


# ----- construction -------------------------------------------------------------------------------------

def _gmm_teacher(spec: TeacherSpec, device) -> Teacher:
    """An analytic mixture; its student is a small MLP denoiser (there is no network to copy)."""
    match = _GMM.match(spec.name)
    k, image = int(match.group(2)), bool(match.group(1))
    shape = (1, 8, 8) if image else (2,)
    gmm = GaussianMixture.random(k, shape, spread=0.7, std=0.05 if image else 0.08, seed=k).to(device)
    return Teacher(name=spec.name, net=gmm, shape=shape, dataset=spec.dataset, default_metric=spec.default_metric,
                   description=spec.description,
                   student_fn=lambda: MLPDenoiser(shape, hidden=128, depth=3).to(device),
                   data_fn=lambda b, s: _endless(gmm.sample(max(4096, b), torch.Generator().manual_seed(s)),
                                                 None, b, s))


def _digits_teacher(spec: TeacherSpec, device) -> Teacher:
    net = load_embedded_teacher(spec.name, device=device)
    images, labels = load_digits_data()
    cond = spec.num_classes > 0
    return Teacher(name=spec.name, net=net, shape=(1, 8, 8), num_classes=spec.num_classes, dataset=spec.dataset,
                   default_metric=spec.default_metric, init_kwargs=getattr(net, "init_kwargs", None),
                   description=spec.description, data_fn=lambda b, s: _endless(images, labels if cond else None, b, s))


def _edm_teacher(spec: TeacherSpec, path, device, smoke: bool) -> Teacher:
    arch = spec.checkpoint
    kwargs = dict(EDM_CONFIGS[arch])
    if smoke:
        torch.manual_seed(0)
        net = EDMPrecond(**kwargs)
    else:
        file = require(arch, path=path)
        # the architecture is checked on the recorded kwargs, before any network is built
        net = load_edm_pickle(file, check_kwargs=lambda recorded: _check_architecture(spec.name, arch, recorded, file))
        kwargs = net.init_kwargs
    net = net.to(device).eval().requires_grad_(False)
    shape = (kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])

    def data_fn(batch_size: int, seed: int) -> Iterator:
        if smoke:  # random stand-in images: the smoke run proves the wiring, not the numbers
            g = torch.Generator().manual_seed(seed)
            return _endless(torch.rand(64, *shape, generator=g) * 2 - 1, None, batch_size, seed)
        if spec.data_asset is None:
            raise ValueError(f"no training-image asset is registered for {spec.name}; Algorithm 1 cannot run on it")
        images, _ = load_cifar10_train(require(spec.data_asset))
        return _endless(images, None, batch_size, seed)

    return Teacher(name=spec.name, net=net, shape=shape, num_classes=kwargs.get("label_dim", 0), dataset=spec.dataset,
                   default_metric=spec.default_metric, smoke=smoke, init_kwargs=kwargs, data_fn=data_fn,
                   description=spec.description)


def _check_architecture(name: str, arch: str, kwargs: dict, file) -> None:
    """A pickle of another network (say ImageNet's ADM given as the CIFAR-10 teacher) would be sampled and
    scored against the wrong dataset's FID reference: refuse it by name."""
    diff = architecture_mismatch(arch, kwargs)
    if diff:
        found = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (want, got) in diff.items())
        raise EDMPickleError(f"{file} is not the {name} teacher ({arch}.pkl): its network has {found}; "
                             f"give teacher.path the {arch}.pkl checkpoint, or the teacher name that matches it")


def teacher_architecture(name: str) -> dict | None:
    """A teacher network's EDMPrecond init kwargs, known without loading its weights (None: analytic)."""
    spec = teacher_spec(name)
    if spec.source == "checkpoint":
        return dict(EDM_CONFIGS[spec.checkpoint])
    if spec.source == "embedded":
        return dict(embedded_teacher_info(name)["network_kwargs"])
    return None


def check_teacher_assets(name: str, path=None, needs_data: bool = False) -> None:
    """Raise MissingAssetError (asset, paths searched, fetch command) or TeacherError (a file that is not this
    teacher's checkpoint, or embedded weights that are not the ones shipped) before any run is created."""
    spec = teacher_spec(name)
    if spec.source == "embedded":
        try:
            embedded_teacher_info(name)  # checks the weights against the SHA-256 recorded beside them
        except AssetError as exc:
            raise TeacherError(f"teacher {name}: {exc}") from None
        return
    if spec.source != "checkpoint":
        return
    try:  # a few header bytes: a wrong file fails here, not with an UnpicklingError once the run exists
        check_edm_pickle_header(require(spec.checkpoint, path=path))
    except EDMPickleError as exc:
        raise TeacherError(f"teacher.path: got {str(path)!r}; {exc}" if path is not None else str(exc)) from None
    if needs_data:
        if spec.data_asset is None:
            raise TeacherError(f"no training-image asset is registered for {name}; Algorithm 1 cannot run on it")
        require(spec.data_asset)


def get_teacher(name: str, *, path=None, device: str | torch.device = "cpu", smoke: bool = False) -> Teacher:
    """A teacher by name (see TEACHERS). `path` overrides where an EDM checkpoint is looked for; `smoke`
    gives a randomly initialised network of the teacher's architecture (no asset needed)."""
    spec = teacher_spec(name)
    if spec.source == "analytic":
        return _gmm_teacher(spec, device)
    if spec.source == "embedded":
        return _digits_teacher(spec, device)
    return _edm_teacher(spec, path, device, smoke)
