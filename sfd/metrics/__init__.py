"""Sample-quality metrics: Fréchet distance with pluggable feature extractors, reference statistics.

- `fd`: FeatureStats (float64 running mean/covariance), frechet_distance, EDM-format .npz stats files.
- `inception`: FID features (Inception-v3 2015-12-05 weights from a local file, via torch-fidelity).
- `digits`: an embedded metric for the offline sklearn-digits teacher (small CNN classifier).
- `names`: every metric a run can compute, once: its logged keys, direction, smoke substitute, fit to a teacher.
- `evaluate`: one evaluation entry (sample seeds, fold into running statistics, score).
- `prdc`: precision, recall, density, coverage (k-NN in any feature space: Inception, digits classifier).
- `clip_score`: CLIP score of text-to-image samples (transformers CLIP from a local folder).

Re-exports resolve lazily (PEP 562), so `import sfd.metrics` stays light and
`python -m sfd.metrics.digits` does not import its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "frechet_distance": "fd",
    "FeatureStats": "fd",
    "save_stats": "fd",
    "load_stats": "fd",
    "InceptionFeatures": "inception",
    "to_uint8": "inception",
    "fd_digits": "digits",
    "pixel_fd": "digits",
    "class_accuracy": "digits",
    "load_digits_classifier": "digits",
    "load_digits_data": "digits",
    "digits_prdc": "prdc",
    "CLIPScorer": "clip_score",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sfd.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sfd.metrics.{_EXPORTS[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
