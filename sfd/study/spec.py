"""A study file: read, checked field by field, and held as a `StudySpec` (structure only; `configs` checks the
run config every row or search point gives)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sfd.config import ConfigError, set_value, shown
from sfd.metrics import names
from sfd.safe_yaml import YAMLInputError, read_yaml_file
from sfd.tracking import MAX_NAME_LENGTH, name_problem, project_root

STUDIES_DIR = project_root() / "studies"
KINDS = ("ablation", "comparison", "search")
SAMPLERS = ("rows", "grid", "tpe", "random", "nsga2")
DIRECTIONS = ("minimize", "maximize")
SPEC_KEYS = ("name", "kind", "description", "base", "overrides", "objective", "sampler", "n_trials", "rows",
             "space", "skip_rows", "seeds")
ROW_KEYS_REQUIRED = ("id", "params")
OBJECTIVE_KEYS = ("metric", "metrics", "direction", "directions")
SAMPLER_KEYS = ("type", "seed")
DISTRIBUTION_KEYS = {"categorical": ("choices",), "float": ("low", "high", "log"), "int": ("low", "high", "log")}
MAX_SEEDS = 100  # replicates per row (`seeds:` / --seeds); each seed is a whole run of every row
MAX_ROW_ID_LENGTH = 64  # a row id is a tag and part of its runs' names (<study>/<row id>)
MAX_SAMPLER_SEED = 2**32 - 1  # Optuna's samplers seed numpy's RandomState, which takes 32 bits
MAX_TRIALS = 10_000  # a search's n_trials (TPE's every ask reads every earlier trial)


class StudyError(ValueError):
    """A bad study definition: the message names the study, the field and what is allowed."""


@dataclass
class StudySpec:
    name: str
    kind: str
    description: str
    base: Path
    overrides: dict
    metrics: list[str]
    directions: list[str]
    sampler: str
    seed: int
    n_trials: int
    rows: list[dict] = field(default_factory=list)
    space: dict = field(default_factory=dict)
    skip_rows: dict = field(default_factory=dict)  # row id -> why it is not run (shown in the report)
    path: Path | None = None
    seeds: list[int] | None = None  # table studies: run every row once per seed (replicates)

    def replicates(self) -> list[int | None]:
        """The seeds each row runs with; [None] means once, with the seed its config gives."""
        return list(self.seeds) if self.seeds else [None]

    def experiment(self, smoke: bool) -> str:
        return f"{self.name}-smoke" if smoke else self.name

    def row(self, row_id) -> dict | None:
        """The row with this id, or None (a row the YAML no longer has)."""
        return next((r for r in self.rows if r["id"] == row_id), None)


def study_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return STUDIES_DIR / f"{name_or_path}.yaml"


def available_studies() -> list[Path]:
    """The study YAMLs shipped in the project's studies/ folder."""
    return sorted(STUDIES_DIR.glob("*.yaml"))


def _fail(where: str, message: str) -> StudyError:
    return StudyError(f"study {where}: {message}")


def load_spec(name_or_path: str) -> StudySpec:
    """Read and check a study YAML: a name in studies/ or a path (structure only; `configs.check_study` checks
    every run config)."""
    path, data = read_study_file(name_or_path)
    where = path.stem
    _check_fields(where, data)
    name = data.get("name", path.stem)
    problem = name_problem(name)
    if problem:
        raise _fail(where, f"name: {problem}; it names the MLflow experiment and the Optuna study too")
    kind = data.get("kind")
    if kind not in KINDS:
        raise _fail(where, f"kind: got {kind!r}; allowed: {', '.join(KINDS)}")
    base = _base(where, data)
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _fail(where, f"overrides: expected a mapping of config keys, got {overrides!r}")
    metrics, directions = _objective(where, data)
    stype, seed = _sampler(where, data)
    n_trials = _trials(where, data, kind, stype)
    rows, space = data.get("rows"), data.get("space")
    seeds = data.get("seeds")
    if seeds is not None:
        _check_seeds(where, seeds, rows is not None)
    skip_rows = data.get("skip_rows") or {}
    _check_skip_rows(where, skip_rows, rows)
    return StudySpec(name=name, kind=kind, description=str(data.get("description", "")).strip(), base=base,
                     overrides=overrides, metrics=metrics, directions=directions, sampler=stype, seed=seed,
                     n_trials=n_trials * len(seeds or [None]), rows=rows or [], space=space or {},
                     skip_rows=skip_rows, path=path, seeds=seeds)


def read_study_file(name_or_path: str) -> tuple[Path, dict]:
    """The study file and its mapping as written, or a StudyError naming what is wrong with it (no study there, a
    folder, not YAML, not a mapping). `load_spec` checks the fields; a report of recorded runs reads them as
    written, since a study's file may no longer pass today's checks (a `--seeds` copy names its base by an
    absolute path of the machine that ran it)."""
    path = study_path(name_or_path)
    if path.is_dir():
        raise StudyError(f"{name_or_path!r} is a folder; name a study (see --list) or a study YAML file")
    if not path.exists():
        names = [p.stem for p in available_studies()]
        close = difflib.get_close_matches(str(name_or_path), names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known studies: {', '.join(names)}"
        raise StudyError(f"no study {name_or_path!r} ({path} does not exist); {hint}")
    where = path.stem
    try:
        data = read_yaml_file(path)
    except YAMLInputError as exc:
        raise _fail(where, f"{path}: {exc}") from None
    if data is None:
        raise _fail(where, f"{path} is empty; a study YAML needs name, kind, base, objective and rows or space")
    if not isinstance(data, dict):
        raise _fail(where, "the file must be a mapping")
    return path, data


def _check_fields(where: str, data: dict) -> None:
    for key in data:
        if not isinstance(key, str):
            raise _fail(where, f"field names are words, got {key!r}; allowed: {', '.join(SPEC_KEYS)}")
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=2)
            raise _fail(where, f"unknown field {key!r}" + (f"; did you mean {' or '.join(close)}?" if close
                                                          else f"; allowed: {', '.join(SPEC_KEYS)}"))


def _base(where: str, data: dict) -> Path:
    """The run config the rows start from; a relative path is relative to the project root."""
    if "base" not in data:
        raise _fail(where, "base: missing; name an experiments/*.yaml file to start from")
    if not isinstance(data["base"], str) or not data["base"].strip():
        raise _fail(where, f"base: got {shown(data['base'])}; the path of an experiments/*.yaml file")
    base = Path(data["base"])
    base = base if base.is_absolute() else project_root() / base
    if not base.is_file():
        raise _fail(where, f"base: {data['base']!r} " + ("is a folder; name an experiments/*.yaml file"
                                                        if base.is_dir() else "does not exist"))
    return base


def _objective(where: str, data: dict) -> tuple[list[str], list[str]]:
    objective = _section(where, data, "objective", OBJECTIVE_KEYS)
    metrics = objective.get("metrics", objective.get("metric"))
    directions = objective.get("directions", objective.get("direction", "minimize"))
    metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
    directions = [directions] * len(metrics) if isinstance(directions, str) else list(directions)
    if not metrics:
        raise _fail(where, "objective.metric: missing; name the metric(s) to optimise, e.g. fd_digits")
    for m in metrics:
        if m not in names.OBJECTIVE_KEYS:
            raise _fail(where, f"objective.metric: got {m!r}; allowed: {', '.join(names.OBJECTIVE_KEYS)}")
    if len(directions) != len(metrics) or any(d not in DIRECTIONS for d in directions):
        raise _fail(where, f"objective.direction: got {directions!r}; one of {', '.join(DIRECTIONS)} per metric")
    return metrics, directions


def _sampler(where: str, data: dict) -> tuple[str, int]:
    sampler = _section(where, data, "sampler", SAMPLER_KEYS)
    stype = sampler.get("type", "rows" if "rows" in data else "tpe")
    if stype not in SAMPLERS:
        raise _fail(where, f"sampler.type: got {stype!r}; allowed: {', '.join(SAMPLERS)}")
    seed = sampler.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SAMPLER_SEED:
        raise _fail(where, f"sampler.seed: got {shown(seed)}; an integer in 0..2**32-1 (samplers are always seeded, "
                    "through numpy)")
    return stype, seed


def _trials(where: str, data: dict, kind: str, stype: str) -> int:
    """Check `rows:` (a table study) or `space:` (a search) and return how many trials the study has (one per
    row, or `n_trials`: by default the grid's size)."""
    rows, space = data.get("rows"), data.get("space")
    if (rows is None) == (space is None):
        raise _fail(where, "give either rows: (a table study) or space: (a search study), not both or neither")
    if (rows is not None) != (kind != "search"):
        raise _fail(where, f"kind: {kind!r} " + ("searches a space:; a study with rows: is an ablation or a "
                                                  "comparison" if kind == "search" else
                                                  "is a table study with rows:; a space: is searched by kind "
                                                  "'search'"))
    if rows is not None:
        if stype != "rows":
            raise _fail(where, f"sampler.type: a study with rows: uses 'rows', got {stype!r}")
        if "n_trials" in data:
            raise _fail(where, "n_trials: a table study runs each of its rows once; to run fewer now, pass "
                        "--n-trials N")
        _check_rows(where, rows)
        return len(rows)
    if stype == "rows":
        raise _fail(where, "sampler.type: 'rows' needs rows:; a space: is searched with grid, tpe, random or nsga2")
    _check_space(where, space, stype)
    n_trials = data.get("n_trials") or (math.prod(len(s["choices"]) for s in space.values())
                                        if stype == "grid" else None)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or not 1 <= n_trials <= MAX_TRIALS:
        raise _fail(where, f"n_trials: got {shown(data.get('n_trials'))}; an integer in 1..{MAX_TRIALS:,}")
    return n_trials


def _section(where: str, data: dict, name: str, allowed: tuple[str, ...]) -> dict:
    """A mapping field of the study (objective, sampler) whose keys are all known: a typo would be ignored."""
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise _fail(where, f"{name}: expected a mapping with keys {', '.join(allowed)}, got {section!r}")
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise _fail(where, f"{name}: unknown key {key!r}" + (f"; did you mean {close[0]}?" if close
                                                                 else f"; allowed: {', '.join(allowed)}"))
    return section


def _check_skip_rows(where: str, skip_rows, rows) -> None:
    """`skip_rows` maps ids of this study's rows to reasons; an unknown id names the close ones."""
    if not isinstance(skip_rows, dict):
        raise _fail(where, f"skip_rows: expected a mapping of row ids to reasons, got {skip_rows!r}")
    if skip_rows and rows is None:
        raise _fail(where, "skip_rows: skipping is for table studies (rows:); a search has no row ids")
    ids = [str(r["id"]) for r in rows or []]
    for row_id in skip_rows:
        if str(row_id) not in ids:
            close = difflib.get_close_matches(str(row_id), ids, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise _fail(where, f"skip_rows: {row_id!r} is not a row id of this study; {hint}rows: {', '.join(ids)}")


def _check_seeds(where: str, seeds, table: bool) -> None:
    if not table:
        raise _fail(where, "seeds: replicates are for table studies (rows:); a search varies its own trials")
    ok = (isinstance(seeds, list) and 0 < len(seeds) <= MAX_SEEDS  # each seed a run's `seed`: [0, 2**63)
          and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in seeds))
    if not ok or len(set(seeds)) != len(seeds):
        raise _fail(where, f"seeds: got {shown(seeds)}; 1 to {MAX_SEEDS} distinct integers in [0, 2**63), e.g. "
                    "[0, 1, 2]")


def with_seeds(spec: StudySpec, seeds: list[int]) -> tuple[StudySpec, str]:
    """The table study replicated over `seeds` (`--seeds`), as a study of its own: its name says the seeds,
    so its runs never mix with the single-seed study's. Returns it and the YAML that defines it (the original
    plus `name` and `seeds`), which `run_study` saves beside the stores once every check has passed."""
    _check_seeds(spec.name, list(seeds), bool(spec.rows))
    name = f"{spec.name}-seeds-{'-'.join(str(x) for x in seeds)}"
    if len(name) > MAX_NAME_LENGTH:
        raise _fail(spec.name, f"--seeds: the replicated study's name would be {len(name)} characters "
                    f"({shown(name, 40)}); at most {MAX_NAME_LENGTH}: give fewer or smaller seeds")
    data = read_yaml_file(spec.path) if spec.path else {}  # read and checked by load_spec a moment ago
    data.update(name=name, seeds=list(seeds), base=str(spec.base))  # base made absolute: the copy lives elsewhere
    replicated = dataclasses.replace(spec, name=name, seeds=list(seeds),
                                     n_trials=len(spec.rows) * len(seeds), path=None)
    return replicated, yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check_rows(where: str, rows) -> None:
    if not isinstance(rows, list) or not rows:
        raise _fail(where, "rows: expected a non-empty list")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS_REQUIRED):
            raise _fail(where, f"rows[{i}]: each row needs {' and '.join(ROW_KEYS_REQUIRED)}, got {row!r}")
        if not isinstance(row["id"], str) or not row["id"].strip():
            raise _fail(where, f"rows[{i}]: id must be a non-empty string, got {shown(row['id'])} (quote it: "
                        f"id: '{row['id']}')")
        if len(row["id"]) > MAX_ROW_ID_LENGTH:
            raise _fail(where, f"rows[{i}]: id {shown(row['id'], 40)} has {len(row['id'])} characters; at most "
                        f"{MAX_ROW_ID_LENGTH}")
        if row["id"] in seen:
            raise _fail(where, f"rows[{i}]: duplicate id {row['id']!r}")
        if not isinstance(row["params"], dict):
            raise _fail(where, f"rows[{i}] ({row['id']}): params must map config keys to values")
        seen.add(row["id"])


def _check_space(where: str, space, sampler: str) -> None:
    if not isinstance(space, dict) or not space:
        raise _fail(where, "space: expected a mapping of config keys to distributions")
    for key, dist in space.items():
        try:
            set_value({}, key, None)
        except ConfigError as exc:
            raise _fail(where, f"space: {exc}") from None
        kind = dist.get("type") if isinstance(dist, dict) else None
        if kind not in DISTRIBUTION_KEYS:
            raise _fail(where, f"space.{key}: type must be categorical, float or int, got {dist!r}")
        unknown = [k for k in dist if k != "type" and k not in DISTRIBUTION_KEYS[kind]]
        if unknown:
            raise _fail(where, f"space.{key}: unknown key {unknown[0]!r} for a {kind} distribution; allowed: "
                        f"type, {', '.join(DISTRIBUTION_KEYS[kind])}")
        if kind == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise _fail(where, f"space.{key}: categorical needs a non-empty choices list, got "
                            f"{shown(dist.get('choices'))}")
            odd = [c for c in dist["choices"] if c is not None and not isinstance(c, (bool, int, float, str))]
            if odd:  # Optuna refuses them only when the first trial asks, after the study exists
                raise _fail(where, f"space.{key}.choices: got {shown(odd[0])}; Optuna's choices are null, true/false, "
                            "numbers or strings")
            continue
        _check_range(where, key, dist, kind, sampler)


def _check_range(where: str, key: str, dist: dict, kind: str, sampler: str) -> None:
    """A float / int distribution: numeric ends, low < high, a boolean `log`; the grid takes none."""
    if sampler == "grid":
        raise _fail(where, f"space.{key}: the grid sampler takes categorical choices only")
    if not all(k in dist for k in ("low", "high")):
        raise _fail(where, f"space.{key}: {kind} needs low and high, got {dist!r}")
    dist["low"], dist["high"] = (_bound(where, f"space.{key}.{k}", dist[k], kind) for k in ("low", "high"))
    if not dist["low"] < dist["high"]:
        raise _fail(where, f"space.{key}: {kind} needs low < high, got {dist!r}")
    if not isinstance(dist.get("log", False), bool):
        raise _fail(where, f"space.{key}.log: got {dist['log']!r}; true or false")


def _bound(where: str, key: str, value, kind: str) -> float | int:
    """An end of a float / int range as a number. YAML reads `2e-3` (no dot) as a string; it means 0.002."""
    if kind == "float" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, (int, float)) if kind == "float" else isinstance(value, int)) and \
        not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise _fail(where, f"{key}: got {value!r}; a finite {'number' if kind == 'float' else 'integer'}")
    return float(value) if kind == "float" else value
