"""From a study to run configs: each row's (or search point's) config, the `row:<id>` reference a row makes to the
student an earlier row trains (a second stage's first stage, a student `evaluate` samples), and the pre-flight
check of every config the study will run (validated, assets found; nothing is created)."""
from __future__ import annotations

from typing import Any, Callable

from sfd.assets import MissingAssetError, get
from sfd.config import (ROW_REF_PREFIX, SAVED_STUDENT_KEYS, TRAINING_ALGORITHMS, ConfigError, RunConfig, from_dict,
                        merge, read_yaml, validate)
from sfd.runner import (check_teacher_checkpoint, computed_metrics, missing_assets, objective_key, prepare,
                        resolve_eval, sampling_info)

from .spec import StudyError, StudySpec


def base_data(spec: StudySpec) -> dict:
    return merge(read_yaml(spec.base), spec.overrides)


def row_config(spec: StudySpec, row: dict) -> RunConfig:
    try:
        data = merge(base_data(spec), {"name": f"{spec.name}/{row['id']}", **row["params"]})
        return validate(from_dict(data))
    except ConfigError as exc:
        raise ConfigError(f"study {spec.name}, row {row['id']}: {exc}") from None


def trial_config(spec: StudySpec, params: dict, number: int) -> RunConfig:
    return validate(from_dict(merge(base_data(spec), {"name": f"{spec.name}/trial-{number}", **params})))


def _setting(params: dict, dotted: str):
    """A dotted setting as a row's params or a study's overrides give it (flat `a.b` or nested `a: {b}`)."""
    section, name = dotted.split(".")
    return params.get(dotted, (params.get(section) or {}).get(name))


def student_row(spec: StudySpec, row: dict) -> tuple[str, str] | None:
    """(config key, row id) when a row reads the student another row trains (`second_stage.first_stage:
    row:<id>` or `evaluate.student: row:<id>`, in the row or the study's overrides), else None. The loop
    replaces it by that row's finished run id."""
    for key in SAVED_STUDENT_KEYS.values():
        ref = _setting(row["params"], key)
        if ref is None:
            ref = _setting(spec.overrides, key)
        if isinstance(ref, str) and ref.startswith(ROW_REF_PREFIX):
            return key, ref[len(ROW_REF_PREFIX):].strip()
    return None


def objective_labels(spec: StudySpec, smoke: bool) -> list[str]:
    """The objective metrics as computed: a smoke run reports e.g. the teacher gap in place of FID."""
    return [objective_key(m, smoke) for m in spec.metrics]


def check_study(spec: StudySpec, smoke: bool, tracking_uri: str | None = None,
                teacher_device: str | None = None) -> tuple[dict[str, str], dict[str, Any], dict[str, list[str]]]:
    """Validate every row's config (search: the base and each categorical choice) and check its assets.
    Returns ({row id: reason} for the rows the study YAML skips (`skip_rows`), which are not checked,
    {row id (search: "base"): resolved run config}, and {missing asset: the rows that need it ("row <id>"; search:
    "base", "space.<key>=<value>")}: every asset missing anywhere, not only the first). Creates nothing. A checkpoint teacher is read
    onto `teacher_device` (default: the run's device; `cpu` when the trials run in workers, so this process holds
    no GPU memory)."""
    skipped = {row: str(reason) for row, reason in spec.skip_rows.items()}
    missing: dict[str, list[str]] = {}

    def check(make_config: Callable[[], RunConfig], where: str, student_info: dict | None = None) -> RunConfig:
        return _check_run(spec, make_config, where, smoke, tracking_uri, teacher_device, student_info, missing)

    if spec.rows:
        return skipped, _check_rows(spec, skipped, check), missing
    base = check(lambda: trial_config(spec, {}, 0), "base")
    for key, dist in spec.space.items():
        for value in space_values(dist):
            check(lambda: trial_config(spec, {key: value}, 0), f"space.{key}={value!r}")
    return skipped, {"base": base}, missing


def _check_rows(spec: StudySpec, skipped: dict[str, str], check) -> dict[str, Any]:
    """Each row not skipped, in YAML order; a row that reads another row's student checks that row's grid."""
    resolved_rows: dict[str, Any] = {}
    for row in spec.rows:
        if row["id"] in skipped:
            continue
        info = None
        ref = student_row(spec, row)
        if ref is not None:  # its saved student is an earlier row's: check that row's grid, not a model
            info = _row_student_info(spec, row["id"], ref, skipped, resolved_rows)
        resolved_rows[row["id"]] = check(lambda: row_config(spec, row), f"row {row['id']}", info)
    return resolved_rows


def _row_student_info(spec: StudySpec, row_id: str, ref: tuple[str, str], skipped: dict[str, str],
                      resolved_rows: dict[str, Any]) -> dict:
    """The `sampling_info` the student of row `ref[1]` (checked earlier) will have, for row `row_id` that names
    it by `ref[0]`; a StudyError if that row is not an earlier training row."""
    key, target = ref
    first = resolved_rows.get(target)
    if first is None:
        order = [r["id"] for r in spec.rows]
        why = ("is skipped by the study (skip_rows)" if target in skipped else
               "comes later in the YAML (rows run in YAML order)" if target in order else
               f"is not a row of this study (rows: {', '.join(order)})")
        raise StudyError(f"study {spec.name}, row {row_id}: {key} names row {target!r}, which {why}")
    if first.algorithm not in TRAINING_ALGORITHMS:  # it saves no student to read
        raise StudyError(f"study {spec.name}, row {row_id}: {key} names row {target!r}, which trains no student "
                         f"(algorithm={first.algorithm}); name a training row, or give a saved student's run id or "
                         "path")
    return sampling_info(first, 0, step_condition=first.algorithm == "sfd-v")


def _check_run(spec: StudySpec, make_config: Callable[[], RunConfig], where: str, smoke: bool,
               tracking_uri: str | None, teacher_device: str | None, student_info: dict | None,
               missing: dict[str, list[str]]) -> RunConfig:
    """One run config as the run would resolve it, its assets and teacher checkpoint found, and the study's
    objective among the metrics it computes; a ConfigError names the study and the row. Assets that are not
    there are added to `missing` (asset -> rows), and the config is resolved without them."""
    try:
        resolved, _ = prepare(make_config(), smoke=smoke, tracking_uri=tracking_uri, student_info=student_info)
        check_teacher_checkpoint(resolved, teacher_device)  # kept for trials run in this process
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(f"study {spec.name},") else
                          f"study {spec.name}, {where}: {text}") from None
    except MissingAssetError as exc:
        resolved = resolve_eval(make_config())  # validated by prepare before it looked for files
        names = [] if smoke else missing_assets(resolved)
        if not names:  # a file named by path (teacher.path), or a first stage, rather than an asset in its folder
            raise MissingAssetError(f"study {spec.name}, {where}: {exc}") from None
        for name in names:
            missing.setdefault(name, []).append(where)
    missing_metrics = [m for m in spec.metrics if objective_key(m, smoke) not in computed_metrics(resolved)]
    if missing_metrics:
        raise ConfigError(f"study {spec.name}, {where}: objective {missing_metrics} is not among the metrics the "
                          f"run computes (eval.metrics={resolved.eval.metrics}); add it to eval.metrics")
    return resolved


def missing_assets_error(spec: StudySpec, missing: dict[str, list[str]], rows: int) -> MissingAssetError:
    """One error naming every asset the study needs that is not here, with the rows that need each (`rows`: how
    many rows were checked, so that "every row" can be said; 0 in a search), where they were looked for and how
    to get them."""
    def needed_by(where: list[str]) -> str:
        return "every row" if len(where) == rows > 1 else ", ".join(where)

    folders = sorted({str(path.parent) for name in missing for path in get(name).search_paths()})
    return MissingAssetError(
        f"study {spec.name}: {len(missing)} asset(s) it needs are not here: "
        + "; ".join(f"asset '{name}' ({needed_by(where)})" for name, where in missing.items())
        + f". Searched: {', '.join(folders)}. Get each with `python -m sfd.assets fetch NAME` (`python -m sfd.assets "
          "list` shows every asset, where it is looked for and what needs it; SFD_HOME moves the asset folder)")


def space_values(dist: dict) -> list:
    """The values of a distribution that the checks try: every choice, every value of an int range of up to
    64 (some settings allow only some NFEs), else the two ends."""
    if dist["type"] == "categorical":
        return list(dist["choices"])
    if dist["type"] == "int" and dist["high"] - dist["low"] < 64:
        return list(range(dist["low"], dist["high"] + 1))
    return [dist["low"], dist["high"]]
