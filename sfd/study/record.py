"""What a study has recorded, read against its YAML now: the Optuna study as stored, each trial's recorded run
config, which trial a row shows (the rule the reports use too), the finished run of a row whose student another
row reads, and the checks that refuse to resume a study whose YAML no longer describes what it ran."""
from __future__ import annotations

import json
from typing import Sequence

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from sfd.config import flatten, to_dict
from sfd.metrics.names import COST_KEY, CPU_TIME_KEY
from sfd.storelock import sqlite_path

from .configs import row_config, trial_config
from .spec import StudyError, StudySpec

# Why a trial that did not fail on its own ended FAIL (user attribute `fail_reason`; `interrupted` is set too).
INTERRUPTED = "interrupted: the study process stopped during this trial"
NOT_STARTED = "interrupted: not started"
# Run-config keys that say how a run is carried out, not what it measures (results agree to rounding, or to
# dropout masks drawn in another memory order): a study may change them between trials.
EXECUTION_KEYS = ("name", "device", "threads", "precision", "compile", "compile_mode", "channels_last",
                  "group_norm", "optim.micro_batch_size", "eval.compile", "eval.batch_size", "log.every")


def interrupted(trial: FrozenTrial) -> bool:
    """A FAIL trial that did not fail for a reason of its own (stopped, its process died, not started): its row
    or point runs again."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("interrupted"))


def row_key(trial) -> tuple:
    """(row id, replicate seed) of a table study's trial: what the study runs once. (None, None) in a search."""
    return trial.user_attrs.get("row"), trial.user_attrs.get("seed")


def row_trials(trials: Sequence[FrozenTrial], key: tuple) -> list[FrozenTrial]:
    """Every trial of one (row, seed) key, in trial order."""
    return [t for t in trials if row_key(t) == key]


def shown_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """Which trial a row (one seed of it) shows, among its trials in trial order: its latest complete trial,
    else its latest trial of any state (None when it has none). A later complete trial replaces an earlier
    one; a failure never replaces a complete one."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return done[-1] if done else (trials[-1] if trials else None)


def shown_trials(spec: StudySpec, trials: Sequence[FrozenTrial], retry_failed: bool = False) -> list[FrozenTrial]:
    """The finished trials a report shows and a resume keeps, given a study's trials in trial order: each row's
    (and seed's) `shown_trial` when it completed, or failed for a reason of its own (not interrupted) and is not
    to be retried; in a search every such trial."""
    def kept(t) -> bool:
        return t.state == TrialState.COMPLETE or (
            t.state == TrialState.FAIL and not interrupted(t) and not retry_failed)

    if not spec.rows:
        return [t for t in trials if kept(t)]
    keys = list(dict.fromkeys(row_key(t) for t in trials))  # in the order rows first appear
    shown = (shown_trial(row_trials(trials, key)) for key in keys)
    return [t for t in shown if kept(t)]


def student_row_run_id(spec: StudySpec, trials: Sequence[FrozenTrial], row_id: str, target: str,
                       seed: int | None = None) -> str:
    """The MLflow run id of row `target`'s latest finished trial in this study (row `row_id` reads its student:
    as its first stage, or to evaluate it; with replicates, the trial of the same seed), or a StudyError saying
    why there is none."""
    mine = row_trials(trials, (target, seed))
    done = [t for t in mine if t.state == TrialState.COMPLETE and t.user_attrs.get("mlflow_run_id")]
    if done:
        return done[-1].user_attrs["mlflow_run_id"]
    if mine:
        last = mine[-1]
        why = f"its latest trial (#{last.number}) is {last.state.name}"
        if last.user_attrs.get("fail_reason"):
            why += f": {last.user_attrs['fail_reason'][:300]}"
    else:
        why = "it has not been run"
    raise StudyError(f"study {spec.name}, row {row_id}: it reads the student of row {target!r}, which has not finished "
                     f"({why}); rows run in YAML order, so fix that row (or --retry-failed) and run the study again")


def recorded_study(storage_url: str, study_name: str) -> optuna.Study | None:
    """The Optuna study as stored, or None when it does not exist yet. Never creates a sqlite file, a table or a
    study (Optuna creates its tables when it opens a database, so a database without them is not opened)."""
    path = sqlite_path(storage_url)
    if path is not None and not path.expanduser().exists():
        return None
    engine = sqlalchemy.create_engine(storage_url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "trials"} <= tables:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name,
                                 storage=optuna.storages.RDBStorage(storage_url, skip_table_creation=True))
    except KeyError:  # no such study in the storage
        return None


def recorded_config(cfg) -> dict:
    """A trial's run config as recorded on the trial (flat, JSON types, without EXECUTION_KEYS): what a resumed
    study compares with the config its YAML gives now."""
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in EXECUTION_KEYS}
    return json.loads(json.dumps(flat))


def check_record(spec: StudySpec, study: optuna.Study, retry_failed: bool) -> None:
    """Refuse to resume a study whose YAML no longer describes what it ran: another objective (Optuna keeps
    a study's), or a finished row whose config the YAML (or its base) now gives differently (the report would
    label the old result with the new settings)."""
    _check_objective(spec, study)
    _check_cost(spec, study)
    changed = _changed_trials(spec, study.get_trials(deepcopy=False), retry_failed)
    if changed:
        way_out = ("give each changed row a new id (the old result stays under the old id)" if spec.rows else
                   "give the YAML a new name: for a new search")
        raise StudyError(f"study {spec.name}: finished trials ran with settings the YAML no longer gives, so the "
                         f"report would show their results under settings they did not use: {', '.join(changed)}. "
                         f"To run the new settings, {way_out}; or restore the YAML"
                         + ("; a failed row also reruns with --retry-failed" if spec.rows and not retry_failed
                            else ""))


def _check_objective(spec: StudySpec, study: optuna.Study) -> None:
    def objective(metrics, directions) -> str:
        return ", ".join(f"{m} ({d})" for m, d in zip(metrics, directions))

    metrics = study.user_attrs.get("objective_metrics", spec.metrics)
    directions = [d.name.lower() for d in study.directions]
    if list(metrics) != spec.metrics or directions != spec.directions:
        raise StudyError(f"study {spec.name}: its Optuna study optimises {objective(metrics, directions)}, but the "
                         f"YAML now asks for {objective(spec.metrics, spec.directions)}; a study keeps its "
                         "objective, so give the YAML a new name: (the runs so far stay under the old one)")


def _check_cost(spec: StudySpec, study: optuna.Study) -> None:
    """A study that optimises the training cost cannot go on from trials whose cost was wall time (recorded before
    it became processor time, without CPU_TIME_KEY): the sampler would compare the two."""
    if COST_KEY not in spec.metrics:
        return
    old = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
           if t.user_attrs.get(CPU_TIME_KEY) is None]
    if old:
        raise StudyError(f"study {spec.name}: its trial(s) {old[:5]}{' ...' if len(old) > 5 else ''} recorded "
                         f"{COST_KEY} as wall time, before it became processor time; the sampler cannot compare "
                         "the two, so give the YAML a new name: for a new search (the runs so far stay under the "
                         "old one)")


def _changed_trials(spec: StudySpec, trials: Sequence[FrozenTrial], retry_failed: bool) -> list[str]:
    """The shown trials whose recorded config differs from the one the YAML gives now, each with its diff."""
    row_now: dict = {}  # once per row, not per seed
    changed = []
    for t in shown_trials(spec, trials, retry_failed):
        row = spec.row(t.user_attrs.get("row"))
        if "config" not in t.user_attrs or (spec.rows and (row is None or row["id"] in spec.skip_rows)):
            continue  # recorded before this check, or not shown (a row dropped or skipped)
        if spec.rows and row["id"] not in row_now:
            row_now[row["id"]] = recorded_config(row_config(spec, row))
        now = row_now[row["id"]] if spec.rows else recorded_config(trial_config(spec, t.params, t.number))
        then = t.user_attrs["config"]
        diff = [f"{k}: {then[k]!r} -> {now[k]!r}" for k in sorted(set(then) & set(now)) if then[k] != now[k]]
        if diff:  # (a key on one side only is a schema change between versions, not an edit)
            what = f"row {row['id']!r}" if spec.rows else f"trial {t.number}"
            changed.append(f"{what} ({'; '.join(diff)})")
    return changed
