"""Issue 19: progress on long work. On a terminal a lone run and a study draw tqdm bars (count, rate, ETA) over the
training iterations and the evaluation samples, and a study says which trial of how many has started; in a pipe (a
log, CI) and under --quiet there is none of it, and a study still prints one line per finished trial.

The terminal is a real pseudo-terminal (`pty`) with a window size: tqdm sizes its bar from the terminal's columns
and draws an empty bar on a terminal of width 0, which is what a bare pty reports."""
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from mlflow import MlflowClient

from sfd import tracking as T
from sfd.progress import SentBars
from study_runner import RUN_PY, write_digits_study

ROOT = Path(__file__).resolve().parents[1]
RUN_ONE = ROOT / "experiments" / "run.py"
GMM = ROOT / "experiments" / "gmm_sfd.yaml"
GMM_SHORT = ["optim.total_kimg=0.64", "eval.num_samples=64", "eval.gap_nfe=10"]  # 10 iterations of batch 64
BAR = "it/s"  # tqdm's rate field, in every bar it draws ("?it/s" before the first update)


def _env(runs: Path) -> dict:
    env = {**os.environ, "SFD_RUNS_DIR": str(runs), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def on_terminal(cmd: list[str], env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr on a 120x40 pseudo-terminal; (exit status, everything it wrote)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no output for {timeout} s from {cmd}")
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child side closed, every process on it has ended
                break
            if not data:
                break
            out += data
    finally:
        os.close(main)
        proc.wait(timeout=60)
    return proc.returncode, out.decode(errors="replace")


def in_a_pipe(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_lone_run_draws_bars_on_a_terminal_only_and_is_named_after_its_overrides(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(RUN_ONE), str(GMM), *GMM_SHORT]
    code, out = on_terminal(cmd, _env(runs))
    assert code == 0, out[-3000:]
    assert "train:" in out and "evaluate (NFE 2):" in out and BAR in out and "sample/s" in out
    # the training bar counts iterations (its total; tqdm redraws at most every 0.1 s and a bar that clears itself
    # on close may never draw its last count on a fast run)
    assert "0/10 [" in out
    quiet_code, quiet = on_terminal(cmd + ["--quiet"], _env(runs))
    assert quiet_code == 0 and BAR not in quiet and "train:" not in quiet
    piped = in_a_pipe(cmd, _env(runs))
    assert piped.returncode == 0 and BAR not in piped.stdout + piped.stderr and "\r" not in piped.stderr
    # runs of one YAML with overrides can be told apart: the run name and a tag carry them
    name = "gmm_sfd " + " ".join(GMM_SHORT)
    assert f"({name}) FINISHED" in piped.stdout
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("experiments").experiment_id])
    assert len(found) == 3 and {r.info.run_name for r in found} == {name}
    assert {r.data.tags[T.TAG_OVERRIDES] for r in found} == {" ".join(GMM_SHORT)}


def test_a_study_says_which_trial_starts_and_draws_its_workers_bars_on_a_terminal_only(tmp_path):
    """One worker process (`--devices cpu`): its bars reach the terminal through the study process."""
    rows = [{"id": "first", "params": {}}, {"id": "second", "params": {"loss.name": "l2"}}]
    path = write_digits_study(tmp_path, "progress", rows)
    cmd = [sys.executable, str(RUN_PY), str(path), "--no-report", "--devices", "cpu"]
    code, out = on_terminal(cmd, _env(tmp_path / "tty-runs"))
    assert code == 0, out[-3000:]
    assert "[0] first: started (1 of 2) on cpu" in out and "[1] second: started (2 of 2) on cpu" in out
    assert "first: train:" in out and "second: evaluate (NFE 2):" in out and BAR in out
    assert "[0] first: teacher_gap_mean=" in out and "[1] second: teacher_gap_mean=" in out
    piped = in_a_pipe(cmd, _env(tmp_path / "pipe-runs"))
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "started" not in piped.stdout and BAR not in piped.stdout + piped.stderr
    assert "[0] first: teacher_gap_mean=" in piped.stdout and "[1] second: teacher_gap_mean=" in piped.stdout


def test_a_worker_sends_its_count_a_few_times_a_second_and_always_the_last():
    sent = []
    bar = SentBars(sent.append)("train", 1000, "it")
    for _ in range(1000):
        bar.update(1)
    assert sent[0] == ("progress", "train", 1, 1000, "it") and sent[-1] == ("progress", "train", 1000, 1000, "it")
    assert len(sent) < 100  # not one message per iteration (the loop above takes far less than 50 s)
