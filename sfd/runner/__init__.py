"""One run, start to end: check assets → (MLflow run) → teacher → student → distil → evaluate → log.

    result = run_experiment(load_config("experiments/digits_sfd.yaml"))

Everything that can fail on bad input (config, missing checkpoints / data / metric weights, a first-stage
model that is not there) fails before the MLflow run exists. Once it exists, any error ends it FAILED with
the reason (`sfd.error`) and propagates; a diverging loss raises `sfd.distill.DivergedError`.

By job: `preflight` (checks, the smoke budget, the teacher cache), `first_stage` (a student's saved files and
the first stage a second stage continues) and `run` (train, evaluate, log).
"""
from sfd.runner.first_stage import (SAMPLING_FILE, STUDENT_FILE, check_first_stage, first_stage_num_steps,
                                    load_first_stage, locate_first_stage, read_sampling_info, sampling_info,
                                    save_student)
from sfd.runner.outcome import RESULT_FILE_ENV, OutcomeFile, read_outcome
from sfd.runner.preflight import (SMOKE_BATCH, SMOKE_GAP_NFE, SMOKE_ITERATIONS, SMOKE_M, SMOKE_SAMPLES,
                                  check_assets, check_ddp, check_fid_files, check_objective, check_teacher_checkpoint,
                                  computed_metrics, ddp_for_launch, default_metrics, is_small_teacher, load_teacher,
                                  lpips_assets, missing_assets, needed_assets, objective_key, objective_values,
                                  prepare, resolve_device, resolve_eval, smoke_config)
from sfd.runner.run import RunResult, run_experiment, sampling_network

__all__ = [
    "RESULT_FILE_ENV", "SAMPLING_FILE", "STUDENT_FILE", "SMOKE_BATCH", "SMOKE_GAP_NFE",
    "SMOKE_ITERATIONS", "SMOKE_M", "SMOKE_SAMPLES", "OutcomeFile", "RunResult", "check_assets", "check_ddp",
    "check_fid_files", "check_first_stage", "check_objective", "check_teacher_checkpoint", "computed_metrics",
    "ddp_for_launch", "default_metrics", "first_stage_num_steps", "is_small_teacher",
    "load_first_stage", "load_teacher", "locate_first_stage", "lpips_assets", "missing_assets", "needed_assets",
    "objective_key", "objective_values",
    "prepare", "read_outcome", "read_sampling_info", "resolve_device", "resolve_eval", "run_experiment", "sampling_info",
    "sampling_network", "save_student", "smoke_config",
]
