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
