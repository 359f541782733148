#!/usr/bin/env python
"""The README's cluster recipe on one machine, over loopback: a throwaway PostgreSQL and `mlflow server` (the tests'
own, tests/servers.py), then N peers running the same `studies/run.py` command, each with its own runs folder and
working directory as a separate machine would have; then `optuna-dashboard` on the same storage, if installed.

    python experiments/peers_loopback.py STUDY N [N ...] [-- extra studies/run.py options]

For each N (fresh databases each time) it prints the wall time until every peer ended, each peer's tracked
`invocation/wall_s` (on the study's parent run) and trial count, and the exit codes. Needs PostgreSQL's server
binaries (Debian: apt-get install postgresql). Every peer gets OMP_NUM_THREADS=1, so N peers use N cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from mlflow import MlflowClient  # noqa: E402
from servers import MlflowServer, Postgres, free_port, postgres_bin  # noqa: E402

from sfd.study import load_spec  # noqa: E402


def run_peers(study: str, n: int, postgres: Postgres, folder: Path, extra: list[str]) -> dict:
    storage = postgres.new_database(f"optuna_{n}")
    server = MlflowServer(folder / "server", backend_uri=postgres.new_database(f"mlflow_{n}")).start()
    try:
        cmd = [sys.executable, str(ROOT / "studies" / "run.py"), study, "--storage", storage,
               "--tracking-uri", server.url, "--no-report", *extra]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        start, procs = time.time(), []
        for i in range(n):
            machine = folder / f"peer{i}"
            machine.mkdir(parents=True)
            procs.append(subprocess.Popen(cmd, cwd=machine, env={**env, "SFD_RUNS_DIR": str(machine / "runs")},
                                          stdout=open(machine / "out.log", "w"), stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        wall = time.time() - start
        client = MlflowClient(server.url)
        experiment = load_spec(study).experiment("--smoke" in extra)
        parent = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                    "tags.`sfd.role` = 'study'")[0]
        history = client.get_metric_history(parent.info.run_id, "invocation/wall_s")
        trials = client.get_metric_history(parent.info.run_id, "invocation/trials_run")
        return {"peers": n, "wall_s": round(wall, 1), "exit_codes": codes, "parent_run": parent.info.run_id,
                "tracked_invocation_wall_s": sorted(round(m.value, 1) for m in history),
                "trials_per_peer": sorted(int(m.value) for m in trials), "dashboard": dashboard_studies(storage)}
    finally:
        server.stop()


def dashboard_studies(storage: str) -> list[str] | str:
    """The studies `optuna-dashboard` lists on the storage (started once the study exists), or why not."""
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    if not Path(exe).exists():
        return "optuna-dashboard is not installed"
    port = free_port()
    proc = subprocess.Popen([exe, storage, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as reply:
                    return [s["study_name"] for s in json.load(reply)["study_summaries"]]
            except OSError:
                time.sleep(1)
        return "optuna-dashboard did not answer in 60 s"
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    study, counts = argv[0], [int(n) for n in argv[1:]]
    bin_dir = postgres_bin()
    if bin_dir is None:
        print("error: PostgreSQL's server binaries (initdb, pg_ctl) are not installed", file=sys.stderr)
        return 2
    postgres = Postgres(bin_dir).start()
    folder = Path(tempfile.mkdtemp(prefix="sfd-peers-"))
    try:
        for n in counts:
            print(json.dumps(run_peers(study, n, postgres, folder / f"n{n}", extra)), flush=True)
    finally:
        postgres.stop()
    print(f"peers' outputs: {folder}/n<N>/peer<i>/out.log")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
