"""The files a run reads, as MLflow dataset inputs with their digests: the teacher's weights, the real images it
trains on or is scored against (the embedded digits data), the FID reference statistics and the weights of the
networks its metrics and losses use (Inception, the digits classifier, LPIPS). Two runs on different files are then told apart in the UI's "Datasets used"
column and by `search_runs`, however the files were named.

Each input is a `mlflow.entities.Dataset` of source type `local` (its URI), digest = the first 32 hex digits of the
file's SHA-256 (MLflow's digest column holds 36 characters; the whole hash and the size are in its profile), and the
tag `mlflow.data.context` saying what the run uses it for. A file is hashed once per process."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sklearn.datasets
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from sfd.assets import FID_REFS, asset_path
from sfd.config import RunConfig
from sfd.metrics.digits import WEIGHTS_DIR as CLASSIFIER_DIR
from sfd.metrics.digits import WEIGHTS_NAME as DIGITS_CLASSIFIER
from sfd.metrics.names import METRICS
from sfd.runner.preflight import INCEPTION, default_metrics, lpips_assets, needed_assets
from sfd.teachers.embedded import WEIGHTS_DIR
from sfd.teachers.registry import teacher_spec

DIGEST_LENGTH = 32
DIGITS_DATA = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"  # scikit-learn's 8x8 digits
_HASHES: dict[tuple, tuple[str, int]] = {}


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, read in 1 MiB blocks, kept per (path, mtime, size)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = (digest.hexdigest(), stat.st_size)
    return _HASHES[key]


def input_files(cfg: RunConfig) -> list[tuple[str, str, Path]]:
    """(context, name, path) of every file the run reads that exists here. A smoke run's checkpoint teacher is a
    random network: it reads no teacher file."""
    spec = teacher_spec(cfg.teacher.name)
    files: list[tuple[str, str, Path | None]] = []
    if spec.source == "embedded":
        files.append(("teacher", f"{spec.name} teacher", WEIGHTS_DIR / f"{spec.name}.safetensors"))
    elif spec.source == "checkpoint" and not cfg.smoke:
        path = Path(cfg.teacher.path).expanduser() if cfg.teacher.path else asset_path(spec.checkpoint)
        files.append(("teacher", f"{spec.name} teacher", path))
    metrics = [METRICS[m] for m in cfg.eval.metrics or default_metrics(cfg.teacher.name) if m in METRICS]
    vanilla_data = cfg.algorithm == "vanilla" and cfg.vanilla.data == "dataset"
    if spec.dataset == "digits" and (vanilla_data or any(m.digits_only for m in metrics)):
        files.append(("data", "sklearn digits", DIGITS_DATA))  # Algorithm 1's images; the digits metrics' reference
    if any(m.needs_classifier for m in metrics):
        files.append(("metric", DIGITS_CLASSIFIER, CLASSIFIER_DIR / f"{DIGITS_CLASSIFIER}.safetensors"))
    contexts = {INCEPTION: "metric", **{name: "loss" for name in lpips_assets(cfg).values()},
                **{name: "fid_reference" for name in FID_REFS.values()}}
    for name in needed_assets(cfg):
        if name in contexts:
            files.append((contexts[name], name, asset_path(name)))
        elif name == spec.data_asset:
            files.append(("data", name, asset_path(name)))
    return [(c, n, p) for c, n, p in files if p is not None and p.is_file()]


def dataset_inputs(cfg: RunConfig) -> list[DatasetInput]:
    """The run's `input_files` as MLflow dataset inputs (see the module docstring)."""
    out = []
    for context, name, path in input_files(cfg):
        sha, size = file_sha256(path)
        dataset = Dataset(name=name, digest=sha[:DIGEST_LENGTH], source_type="local",
                          source=json.dumps({"uri": path.resolve().as_uri()}),
                          profile=json.dumps({"sha256": sha, "bytes": size}))
        out.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out
