"""Every case of the bad-input table (tests/bad_inputs.py) through the scripts' own `main`, in-process, as their
`__main__` runs it (`sfd.signals.run_script`): exit status 2, one `error:` line on stderr naming the field or file
and what is allowed, no traceback, and nothing created or changed in the folder it ran from (which holds the runs
folder and the case's inputs) or in the checkout's report folder. `python tests/bad_inputs.py` runs the same
cases as real processes and prints the figures."""
import contextlib
import importlib
import importlib.util
import io
import signal
import sys
from pathlib import Path

import pytest
import yaml

from bad_inputs import CASES, ROOT, Case, Outcome, changes, fill, prepare, snapshot
from study_runner import load_study_script

sys.path.insert(0, str(ROOT))  # `reports` lives at the repo root
from reports import build as report_script  # noqa: E402
from sfd.signals import run_script  # noqa: E402


def _experiment_script():
    name = "sfd_experiments_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


MAINS = {"run": lambda: _experiment_script().main, "study": lambda: load_study_script().main,
         "report": lambda: report_script.main}


def run_in_process(case: Case, root: Path, monkeypatch) -> Outcome:
    prepare(case, root, ROOT)
    for module, attribute, where in case.patch:
        monkeypatch.setattr(importlib.import_module(module), attribute, root / where)
    monkeypatch.setenv("SFD_RUNS_DIR", str(root / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SFD_RESULT_FILE", raising=False)
    monkeypatch.chdir(root)
    before = snapshot(root, ROOT)
    main, argv = MAINS[case.script](), [fill(a, root, ROOT) for a in case.args]
    err, handlers = io.StringIO(), (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    traceback = False
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = run_script(lambda: main(argv))
    except SystemExit as exc:  # argparse
        status = exc.code
    except Exception as exc:  # noqa: BLE001 - what would have been a traceback
        status, traceback = 1, True
        err.write(f"Traceback (most recent call last): {type(exc).__name__}: {exc}\n")
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return Outcome(status, err.getvalue(), traceback, changes(before, snapshot(root, ROOT)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_creates_nothing(case, tmp_path, monkeypatch):
    root = tmp_path / "case"
    root.mkdir()
    outcome = run_in_process(case, root, monkeypatch)
    assert not outcome.traceback, outcome.stderr
    assert outcome.status == 2 and outcome.one_line() is not None, outcome.stderr
    line = outcome.one_line()
    for fragment in case.expect:
        assert fill(fragment, root, ROOT) in line, line
    assert len(line) < 600, line  # quotes what it refuses, cut short
    assert outcome.created == [], outcome.created


GMM_TINY = ["teacher.name=gmm-img-4", "optim.batch_size=16", "optim.total_kimg=0.032", "eval.num_samples=16",
            "eval.gap_nfe=10", "log.every=1"]
ESCAPES = ("../../../escaped", "..", "/tmp/escaped-absolute", "a/../../../escaped")
RUN_NAMES = ESCAPES[:2]


def _outside(folder: Path, allowed: tuple[str, ...]) -> list[str]:
    """Every file under `folder` that is not under one of its `allowed` sub-folders."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).parts[0] not in allowed)


@pytest.mark.slow
def test_whatever_the_names_nothing_is_written_outside_the_runs_folder(tmp_path, monkeypatch):
    """A run named like a path, an experiment named like a path, a study whose rows are named like paths, and its
    report: the run and the study (its trials, artifacts, student weights, lock, report) write only under the runs
    folder and the report's folder; the experiment name that would lead out of the artifacts folder (`--experiment
    ../../../escaped` wrote the run's config, figures and student outside it) is refused, and so is its library
    call."""
    from sfd.tracking import artifact_location

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SFD_RUNS_DIR", str(work / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = _experiment_script().main
    config = str(ROOT / "experiments" / "gmm_sfd.yaml")
    for name in RUN_NAMES:  # a run's name is its MLflow run name, never a path
        assert run_script(lambda: run([config, *GMM_TINY, f"name={name}", "--save-student"])) == 0
    for name in ESCAPES:
        assert run_script(lambda: run([config, *GMM_TINY, "--experiment", name])) == 2
        with pytest.raises(ValueError, match="outside"):
            artifact_location(f"sqlite:///{work / 'runs' / 'mlflow.db'}", name)
    study = work / "inputs" / "escape.yaml"
    study.parent.mkdir()
    study.write_text(yaml.safe_dump({
        "name": "escape", "kind": "ablation", "base": config, "overrides": {k: yaml.safe_load(v) for k, v in (a.split("=") for a in GMM_TINY)},
        "objective": {"metric": "teacher_gap_mean"},
        "rows": [{"id": row_id, "params": {"student.nfe": 2}} for row_id in RUN_NAMES]}))
    studies = load_study_script().main  # its row ids name its runs and the report's sample grids
    assert run_script(lambda: studies([str(study), "--seeds", "0", "--no-report"])) == 0
    report_script.build_report("escape-seeds-0", out_dir=work / "report", execute_notebook=False)
    assert (work / "report" / "figures" / "samples" / "escaped.png").is_file()
    assert _outside(tmp_path, ("work",)) == []
    assert _outside(work, ("runs", "report", "inputs")) == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-absolute").exists()
