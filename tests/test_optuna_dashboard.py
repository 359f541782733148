"""optuna-dashboard (the README's command) serves a finished digits study from the study's own Optuna storage: the
real dashboard, started on loopback, answers its JSON API with the study's trials, values and row attributes."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna
from study_runner import write_digits_study

from sfd import study as studies

DASHBOARD = Path(sys.executable).with_name("optuna-dashboard")
START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.skipif(not DASHBOARD.exists() and shutil.which("optuna-dashboard") is None,
                    reason="optuna-dashboard is a dev dependency (pip install -e .[dev]); not installed here")
def test_optuna_dashboard_serves_a_finished_digits_study(tmp_path, stores):
    rows = [{"id": "sfd-l1", "params": {"loss.name": "l1"}}, {"id": "sfd-l2", "params": {"loss.name": "l2"}}]
    out = studies.run_study(str(write_digits_study(tmp_path, "dash", rows)), quiet=True)
    assert not out.failed
    expected = {t.number: t for t in optuna.load_study(study_name="dash", storage=out.storage).get_trials()}

    port = _free_port()
    command = [str(DASHBOARD) if DASHBOARD.exists() else "optuna-dashboard", out.storage, "--host", "127.0.0.1",
               "--port", str(port), "--quiet"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                listed = _get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within a minute"
                time.sleep(0.5)
        (study,) = listed["study_summaries"]  # (optuna-dashboard's name for the list of studies)
        assert study["study_name"] == "dash" and study["directions"] == ["minimize"]
        assert {a["key"]: a["value"] for a in study["user_attrs"]}["mlflow_parent_run_id"] == out.parent_run_id
        detail = _get(f"{base}/api/studies/{study['study_id']}?after=0")
        trials = {t["number"]: t for t in detail["trials"]}
        assert set(trials) == set(expected) == {0, 1}
        for number, trial in trials.items():
            assert trial["state"] == "Complete" and trial["values"] == [expected[number].value]
            attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            assert attrs["row"] == expected[number].user_attrs["row"]
            assert attrs["mlflow_run_id"] == expected[number].user_attrs["mlflow_run_id"]
    finally:
        server.terminate()
        server.wait(timeout=30)
