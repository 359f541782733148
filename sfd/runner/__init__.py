"""One run, start to end: check assets → (MLflow run) → teacher → student → distil → evaluate → log.

    result = run_experiment(load_config("experiments/digits_sfd.yaml"))

Everything that can fail on bad input (config, missing checkpoints / data / metric weights, a saved student that
is not there or does not fit) fails before the MLflow run exists. Once it exists, any error ends it FAILED with
the reason (`sfd.error`) and propagates; a diverging loss raises `sfd.distill.DivergedError`.

By job: `preflight` (checks, the smoke budget, the teacher cache), `students` (a saved student: the files a
training run writes; finding, checking and loading one, ours or a reference snapshot), `first_stage` (what a
second stage checks about its first stage) and `run` (train, evaluate, log).
"""
from sfd.runner.first_stage import check_first_stage, first_stage_num_steps
from sfd.runner.outcome import RESULT_FILE_ENV, OutcomeFile, read_outcome
from sfd.runner.preflight import (SMOKE_BATCH, SMOKE_GAP_NFE, SMOKE_ITERATIONS, SMOKE_M, SMOKE_SAMPLES,
                                  check_assets, check_ddp, check_fid_files, check_objective, check_teacher_checkpoint,
                                  computed_metrics, ddp_for_launch, default_metrics, is_small_teacher, load_teacher,
                                  lpips_assets, missing_assets, needed_assets, objective_key, objective_values,
                                  prepare, resolve_device, resolve_eval, smoke_config)
from sfd.runner.run import EVALUATED_STUDENT_FILE, RunResult, run_experiment, sampling_network
from sfd.runner.students import (REFERENCE_ALGORITHM, SAMPLING_FILE, STUDENT_FILE, check_evaluated_student,
                                 load_reference, load_saved_student, locate_student, read_sampling_info,
                                 sampling_info, save_student, saved_student_info)

__all__ = [
    "EVALUATED_STUDENT_FILE", "REFERENCE_ALGORITHM", "RESULT_FILE_ENV", "SAMPLING_FILE", "STUDENT_FILE", "SMOKE_BATCH",
    "SMOKE_GAP_NFE", "SMOKE_ITERATIONS", "SMOKE_M", "SMOKE_SAMPLES", "OutcomeFile", "RunResult", "check_assets",
    "check_ddp", "check_evaluated_student", "check_fid_files", "check_first_stage", "check_objective",
    "check_teacher_checkpoint", "computed_metrics", "ddp_for_launch", "default_metrics", "first_stage_num_steps",
    "is_small_teacher", "load_reference", "load_saved_student", "load_teacher", "locate_student", "lpips_assets",
    "missing_assets", "needed_assets", "objective_key", "objective_values", "prepare", "read_outcome",
    "read_sampling_info", "resolve_device", "resolve_eval", "run_experiment", "sampling_info", "sampling_network", "save_student", "saved_student_info",
    "smoke_config",
]
