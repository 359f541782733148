"""How the report writes values: numbers, the paper's numbers, flags, run ids, and the display names of solvers,
losses and methods; plus the small conversions every other report module reads tracked values with (MLflow
keeps params and tags as strings).

The first module of the report builder (``reports/build.py``): it imports nothing from the other ``reports``
modules."""
from __future__ import annotations

import math
import re
from typing import Any

from sfd.metrics.names import HIGHER_IS_BETTER
from sfd.solvers import PAPER_NAMES

LOSS_NAMES = {"l1": "L1", "l2": "L2", "pseudo_huber": "Pseudo-Huber", "lpips": "LPIPS"}
METHOD_NAMES = {"sfd": "SFD", "vanilla": "Vanilla", "sfd-v": "SFD-v", "second-stage": "SFD second stage"}
# Synonyms folded together when a row has no paper_key and is matched to the paper by its labels.
_CANON_ALIASES = {"dpm2": "dpm2s", "dpmsolver2": "dpm2s", "ddim": "euler", "dpmsolverpp3m": "dpmpp3m",
                  "secondstage": "sfdsecondstage", "sfd2ndstage": "sfdsecondstage", "pseudohuber": "pseudohuber",
                  "amed": "amedplugin", "baseline": "solver"}


# ----- reading tracked values ------------------------------------------------------------------------------

def canon(value: Any) -> str:
    """A label normalised for matching: 'DPM++(3M)' == 'dpmpp3m', 'DPM(2S)' == 'dpm2', 'L1' == 'l1'."""
    if value is None:
        return ""
    s = re.sub(r"[^a-z0-9.]", "", str(value).lower().replace("++", "pp"))
    return _CANON_ALIASES.get(s, s)


def to_bool(value: Any) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "yes", "1", "on"):
        return True
    if s in ("false", "no", "0", "off"):
        return False
    return None


def to_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def to_int(value: Any) -> int | None:
    f = to_float(value)
    return None if f is None else int(round(f))


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value))


def uniq(values) -> list[str]:
    """The distinct set values as strings, in first-seen order."""
    out = []
    for v in values:
        if v not in (None, "", "None", "null") and str(v) not in out:
            out.append(str(v))
    return out


def slug(s: str) -> str:
    """A file name for a row id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_.") or "row"  # never "." or "..": one path component


def lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER


def solver_name(name: Any) -> Any:
    """A solver by the paper's name ('dpmpp3m' -> 'DPM++(3M)'); anything else as given."""
    return PAPER_NAMES.get(str(name).lower(), name)


# ----- writing values --------------------------------------------------------------------------------------

def fmt_value(value: Any) -> str:
    """How a measured number is written in the tables (tests format expected values with this too)."""
    if not is_num(value):
        return "—"
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return str(int(v)) if v.is_integer() else f"{v:.1f}"
    return f"{v:.4g}"


def fmt_paper(value: Any) -> str:
    """The paper's numbers as the paper prints them (two decimals)."""
    return "—" if not is_num(value) else f"{float(value):.2f}"


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def fmt_delta(value: Any) -> str:
    return "—" if not is_num(value) else ("+" if value > 0 else "") + fmt_value(value)


def fmt_hours(value: Any) -> str:
    if not is_num(value):
        return "—"
    v = float(value)
    if v == 0:
        return "0"
    return f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def fmt_afs(value: Any) -> str:
    b = to_bool(value)
    return "–" if b is None else ("yes" if b else "no")


def fmt_tmin(value: Any) -> str:
    f = to_float(value)
    return "—" if f is None else f"{f:g}"


def fmt_run_id(run_id: str, url: str | None = None) -> str:
    """A run id as code, linked to its page in the MLflow UI when there is one (the id stays readable)."""
    return f"[`{run_id}`]({url})" if url else f"`{run_id}`"
