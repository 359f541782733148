"""What a study's MLflow parent run and experiment show beyond the tags `sfd.study.run` sets: the study's settings as
params, its best row's objective as a metric, a description built from what was measured, the experiment's
description and primary metric, and a status that follows the study's trials."""
from __future__ import annotations

import json
from typing import Collection, Sequence

import optuna
from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from optuna.trial import FrozenTrial, TrialState

from sfd import tracking as T

from .configs import objective_labels
from .record import shown_trials
from .spec import StudySpec

BEST_ALIAS = "best"  # the registered model version of the best row's student (models:/<study>@best)
TAG_BEST_ROW = "sfd.best_row"  # on the parent: the row (search: trial) whose objective `best/<metric>` holds
TAG_BEST_RUN = "sfd.best_run_id"
BEST_PREFIX = "best/"


def study_params(spec: StudySpec, smoke: bool) -> dict[str, str]:
    """The study's settings as flat params (`study.*`, `overrides.*`): what the parent run's params tab shows."""
    params = {"study.name": spec.name, "study.kind": spec.kind, "study.base": str(spec.base),
              "study.objective": ",".join(objective_labels(spec, smoke)), "study.directions": ",".join(spec.directions),
              "study.sampler": spec.sampler, "study.sampler_seed": spec.seed, "study.smoke": str(smoke).lower(),
              "study.rows": len(spec.rows) if spec.rows else None, "study.n_trials": None if spec.rows else spec.n_trials,
              "study.seeds": ",".join(map(str, spec.seeds)) if spec.seeds else None,
              **{f"overrides.{k}": v for k, v in spec.overrides.items()}}
    return {k: T._param_value(v) for k, v in params.items() if v is not None}


def log_study_params(client, run_id: str, spec: StudySpec, smoke: bool) -> None:
    """Log `study_params` on the parent run. MLflow keeps a param's first value (changing it is an error): a
    resumed study logs only the params the run lacks (the settings that change what a trial measures cannot change
    on a resume: `sfd.study.record.check_record` refuses the YAML first)."""
    have = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in study_params(spec, smoke).items() if k not in have]
    for chunk in T._chunks(new, T.MAX_BATCH_PARAMS):
        client.log_batch(run_id, params=chunk)


def describe_experiment(client, experiment: str, spec: StudySpec, smoke: bool) -> None:
    """The experiment's description (the study's own) and its primary metric: the trials' `objective`."""
    exp_id = T.get_or_create_experiment(client, experiment)
    labels = objective_labels(spec, smoke)
    note = f"Study {spec.name} ({spec.kind}): {spec.description.strip()} Objective: " + ", ".join(
        f"{m} ({d})" for m, d in zip(labels, spec.directions)) + " (metric `objective` on each trial's run)."
    for key, value in {T.TAG_NOTE: note, T.TAG_PRIMARY_METRIC: T.OBJECTIVE_KEY,
                       T.TAG_PRIMARY_METRIC_GREATER_IS_BETTER: str(spec.directions[0] == "maximize")
                       .lower()}.items():
        client.set_experiment_tag(exp_id, key, value)


def _counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def best_trial(spec: StudySpec, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The shown complete trial with the best first objective (None with none, or with several objectives: a
    Pareto front has no single best)."""
    if len(spec.metrics) != 1:
        return None
    done = [t for t in shown_trials(spec, trials) if t.state == TrialState.COMPLETE and t.values]
    if not done:
        return None
    pick = max if spec.directions[0] == "maximize" else min
    return pick(done, key=lambda t: t.values[0])


def log_study_summary(client, run_id: str, spec: StudySpec, study: optuna.Study, smoke: bool,
                      seconds: float | None = None) -> None:
    """The parent's best-row metric (`best/<objective>`, its row and run as tags) and its description: the study's
    own, then the trials' states and this invocation's tracked wall time, all as measured now."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(spec, trials)
    label = objective_labels(spec, smoke)[0]
    if best is not None:
        client.log_metric(run_id, f"{BEST_PREFIX}{label}", best.values[0])
        client.set_tag(run_id, TAG_BEST_ROW, best.user_attrs.get("row") or f"trial-{best.number}")
        if best.user_attrs.get("mlflow_run_id"):
            client.set_tag(run_id, TAG_BEST_RUN, best.user_attrs["mlflow_run_id"])
            register_best(client, study.study_name, best.user_attrs["mlflow_run_id"])
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(_counts(trials).items()))
    lines = [spec.description.strip(), "", f"Trials: {counts or 'none yet'}."]
    if best is not None:
        lines.append(f"Best so far: {best.user_attrs.get('row') or f'trial {best.number}'}, {label} = "
                     f"{best.values[0]:.4g}.")
    if seconds is not None:
        lines.append(f"Last invocation: {seconds / 60:.1f} min wall time (metric invocation/wall_s).")
    client.set_tag(run_id, T.TAG_NOTE, "\n".join(lines)[:T.MAX_TAG_LENGTH])


def register_best(client, name: str, run_id: str) -> int | None:
    """Register the student of the best row's run (its logged model) under the study's experiment name, with alias
    `best` on its version (`models:/<study>@best`); a version is added only when the best row changes. Returns the
    version, or None when that run logged no model (a baseline, a smoke run's large random student)."""
    outputs = client.get_run(run_id).outputs
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    if not model_ids:
        return None
    try:
        current = client.get_model_version_by_alias(name, BEST_ALIAS)
    except Exception:  # noqa: BLE001 - no such model or alias yet (MLflow raises its own RESOURCE_DOES_NOT_EXIST)
        current = None
    if current is not None and current.run_id == run_id:
        version = current
    else:
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description=f"The best row's student of study {name}, by its "
                                                             "objective.")
        # the model's artifact location, not models:/<id>: MLflow's SQL registry looks a models:/ source up in the
        # process-wide tracking store, not this client's (its own TODO in SqlAlchemyStore.create_model_version)
        location = client.get_logged_model(model_ids[0]).artifact_location
        version = client.create_model_version(name, source=location, run_id=run_id, model_id=model_ids[0])
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    # what mlflow.register_model records on the logged model (the UI's "Model versions" on the model's page)
    listed = json.loads(client.get_logged_model(model_ids[0]).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    entry = {"name": name, "version": str(version.version)}
    if entry not in listed:
        client.set_logged_model_tags(model_ids[0], {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [entry])})
    return int(version.version)


def parent_status(trials: Sequence[FrozenTrial], *, stopped: bool = False, error: bool = False) -> str:
    """The status the study's parent run takes when an invocation ends: RUNNING while a trial runs (in another
    process) or is queued; else KILLED when this invocation was stopped, FAILED when it ended on an error or every
    trial failed, FINISHED otherwise."""
    counts = _counts(trials)
    if counts.get("RUNNING"):
        return "RUNNING"
    if stopped:
        return "KILLED"
    if error:
        return "FAILED"
    if counts.get("WAITING"):
        return "RUNNING"
    if counts.get("FAIL") and not counts.get("COMPLETE"):
        return "FAILED"
    return "FINISHED"


def end_invocation(client, run_id: str, study: optuna.Study, *, stopped: bool = False, error: str | None = None,
                   mine: Collection[int] = ()) -> str:
    """Set the parent run's status (`parent_status`) when an invocation ends, with the error that ended it as tag
    `sfd.error`; returns the status. RUNNING leaves the run open (no end time), for the next invocation or the
    process still running trials. `mine`: the numbers of this process's trials, which a trial left RUNNING by
    it (an error while its result was told) does not keep running: the next start settles it."""
    if error is not None:
        client.set_tag(run_id, T.TAG_ERROR, error[:T.MAX_TAG_LENGTH])
    elif T.TAG_ERROR in client.get_run(run_id).data.tags:  # an earlier invocation's error, not this one's
        client.delete_tag(run_id, T.TAG_ERROR)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number not in mine or t.state != TrialState.RUNNING]
    status = parent_status(trials, stopped=stopped, error=error is not None)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)
    return status
