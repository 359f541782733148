"""The study engine: a study YAML (a table of rows, or a search space) run as an Optuna study whose every trial
is one tracked SFD run (an MLflow child of the study's parent run). Resumable, checked before anything is
created, serially or one worker process per device, by one process (sqlite) or by peers on many machines
(PostgreSQL).

The public front is this module's `__all__`; the modules below it are the engine's own, read straight down:

    spec       the study file: `StudySpec`, `load_spec`, its checks
    lock       who may run a study: one process per sqlite study; peers set a PostgreSQL study up one at a time
    peers      what the processes running a study share through Optuna: storage, heartbeats, atomic claims
    configs    study -> run configs, the `row:<id>` first-stage reference, the pre-flight check of every config
    record     what a study recorded: recorded configs, which trial a row shows, resume checks
    plan       what is left to run, and the one rule for which trial may start next
    jobs       a trial's run as a picklable job
    workers    the per-device worker processes
    preflight  every check of an invocation, before anything is created
    loop       Optuna bookkeeping (claim, tell finish / fail / interrupt), each trial's run, settling dead trials
    serial     launcher: one trial after another in this process
    devices    launcher: one trial per device at once, in the workers
    run        `run_study`: set up or resume the stores, then launch
    dry_run    `plan_study`: what a run would do now
"""
from .configs import objective_labels
from .dry_run import StudyPlan, plan_study
from .peers import HEARTBEAT_S
from .record import row_key, shown_trial, shown_trials
from .run import StudyOutcome, run_study
from .spec import StudyError, StudySpec, available_studies, load_spec, read_study_file

__all__ = [
    "HEARTBEAT_S", "StudyError", "StudyOutcome", "StudyPlan", "StudySpec", "available_studies", "load_spec",
    "objective_labels", "plan_study", "read_study_file", "row_key", "run_study", "shown_trial", "shown_trials",
]
