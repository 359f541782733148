"""The bad-input table (issue 18): malformed run configs, study files, overrides, options, stores and shipped
weights, given to the three scripts (`experiments/run.py`, `studies/run.py`, `reports/build.py`) the way a user
would. Each case must end with exit status 2 and ONE line on stderr that names the field or file and says what is
allowed (`expect`: fragments of that line), having created nothing: the folder it runs in (which holds the runs
folder, `$SFD_RUNS_DIR`, and the case's own input files) is hashed before and after.

`tests/test_bad_input.py` runs every case in-process (the scripts' `main`, under `sfd.signals.run_script` as their
`__main__` does). `python tests/bad_inputs.py [--repo DIR] [--jobs N]` runs each as a real process of the checkout
at DIR (default: this one) and prints the figures the issue asks for: tried, clear one-line errors, tracebacks,
files created. Runs a `--repo` of an older checkout to give the figures before a change.

Where a case damages a file the package ships (the digits teacher's or the digits classifier's weights), it
truncates a copy of the real file, as a cut-short copy or download would be, and points the module at the copy
(`patch`); nothing in the checkout is touched.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"run": "experiments/run.py", "study": "studies/run.py", "report": "reports/build.py"}
TINY = {"optim.batch_size": 16, "optim.total_kimg": 0.032, "eval.num_samples": 16, "eval.batch_size": 16,
        "log.every": 1}

Maker = Callable[[Path, Path], None]  # (the case's folder, the checkout) -> writes an input file


@dataclass(frozen=True)
class Case:
    name: str
    script: str  # a key of SCRIPTS
    args: tuple[str, ...]  # `{root}`: the case's folder; `{repo}`: the checkout
    expect: tuple[str, ...]  # fragments of the one error line
    files: tuple[tuple[str, Maker], ...] = ()  # inputs made in the case's folder before it runs
    patch: tuple[tuple[str, str, str], ...] = ()  # (module, attribute, folder under root) set before it runs
    # unchecked, it allocates gigabytes, runs for hours or writes outside its folder (the findings):
    # `--skip-harmful` leaves it out, for an older checkout
    harmful: bool = False


# ----- input files ----------------------------------------------------------------------------------------------

def text(content: str) -> Maker:
    return lambda root, repo: (root / "in").write_text(content.replace("{repo}", str(repo)))


def raw(content: bytes) -> Maker:
    return lambda root, repo: (root / "in").write_bytes(content)


def folder() -> Maker:
    return lambda root, repo: (root / "in").mkdir()


def truncated(*shipped: str) -> Maker:
    """Copies of shipped weights and their JSON records, the weights cut to half their size."""
    def make(root: Path, repo: Path) -> None:
        (root / "in").mkdir()
        for name in shipped:
            src = repo / name
            shutil.copyfile(src.with_suffix(".json"), root / "in" / src.with_suffix(".json").name)
            data = src.read_bytes()
            (root / "in" / src.name).write_bytes(data[:len(data) // 2])
    return make


def billion_laughs(levels: int = 9) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def flow_bomb(levels: int = 9) -> str:
    """The same bomb inside one flow value (an override's value)."""
    inner = "&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    parts = [inner] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(parts) + "]"


def study(**fields) -> str:
    """A tiny digits table study (or, with `space`, a search) with `fields` replaced."""
    spec = {"name": "bad_study", "kind": "ablation", "description": "a bad-input case",
            "base": "{repo}/experiments/digits_sfd.yaml", "overrides": dict(TINY),
            "objective": {"metric": "fd_digits", "direction": "minimize"}, "sampler": {"type": "rows", "seed": 0},
            "rows": [{"id": "a", "params": {}}]}
    if "space" in fields:
        spec.update(kind="search", sampler={"type": "tpe", "seed": 0}, n_trials=2)
        del spec["rows"]
    spec.update(fields)
    return yaml.safe_dump(spec, sort_keys=False)


DIGITS = "{repo}/experiments/digits_sfd.yaml"
GMM = "{repo}/experiments/gmm_sfd.yaml"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))
GARBAGE = bytes((i * 37 + 11) % 256 for i in range(4096))
TEACHER_WEIGHTS = (("sfd.teachers.embedded", "WEIGHTS_DIR", "in"),)
CLASSIFIER_WEIGHTS = (("sfd.metrics.digits", "WEIGHTS_DIR", "in"),)
STUDY_IN = ("{root}/in",)

CASES: list[Case] = [
    # ----- experiments/run.py: the config file
    Case("config: binary file", "run", ("{root}/in",), ("{root}/in", "a binary file"), (("in", raw(PNG)),)),
    Case("config: not UTF-8", "run", ("{root}/in",), ("{root}/in", "not UTF-8 text"),
         (("in", raw("name: caf\xe9\n".encode("latin-1"))),)),
    Case("config: larger than 1 MiB", "run", ("{root}/in",), ("{root}/in", "larger than 1,048,576 bytes"),
         (("in", text("# padding\n" * 110_000)),)),
    Case("config: a device, not a file", "run", ("/dev/zero",), ("/dev/zero", "not a regular file")),
    Case("config: missing", "run", ("{root}/nowhere.yaml",), ("nowhere.yaml", "does not exist")),
    Case("config: billion laughs", "run", ("{root}/in",), ("{root}/in", "more than 100,000 values"),
         (("in", text("name: x\n" + billion_laughs())),)),
    Case("config: billion laughs inside a field", "run", ("{root}/in",), ("{root}/in", "more than 100,000 values"),
         (("in", text(billion_laughs() + "eval: {metrics: *l9}\n")),), harmful=True),
    Case("config: recursive alias", "run", ("{root}/in",), ("{root}/in", "alias refers to a value that contains"),
         (("in", text("eval: &a {metrics: [*a]}\n")),)),
    Case("config: nested 60 deep", "run", ("{root}/in",), ("{root}/in", "nested more than 50 levels"),
         (("in", text("name: " + "[" * 60 + "]" * 60 + "\n")),)),
    Case("config: duplicated key", "run", ("{root}/in",), ("{root}/in", "key 'nfe' is given twice"),
         (("in", text("student: {nfe: 2, nfe: 3}\n")),)),
    Case("config: python tag", "run", ("{root}/in",), ("{root}/in", "could not determine a constructor"),
         (("in", text("name: !!python/object/apply:os.system ['true']\n")),)),
    Case("config: 5,000-digit integer", "run", ("{root}/in",), ("{root}/in", "cannot be read"),
         (("in", text("seed: " + "9" * 5000 + "\n")),)),
    Case("config: a list, not a mapping", "run", ("{root}/in",), ("in", "expected a mapping"),
         (("in", text("- student\n- nfe\n")),)),
    Case("config: unknown key", "run", (DIGITS, "student.nfee=3"), ("student.nfee", "did you mean student.nfe")),
    # ----- overrides
    Case("override: bomb", "run", (DIGITS, f"eval.metrics={flow_bomb()}"), ("eval.metrics", "100,000 values"),
         harmful=True),
    Case("override: undefined alias", "run", (DIGITS, "student.nfe=*x"), ("student.nfe", "undefined alias")),
    Case("override: no '='", "run", (DIGITS, "student"), ("override 'student'", "key=value")),
    # ----- bounds
    Case("student.nfe = 10^9", "run", (DIGITS, "student.nfe=1000000000"), ("student.nfe", "1..1000"), harmful=True),
    Case("solver.m = 10^8", "run", (DIGITS, "solver.m=100000000"), ("solver.m", "0..100"), harmful=True),
    Case("eval.num_samples = 10^12", "run", (DIGITS, "eval.num_samples=1000000000000"),
         ("eval.num_samples", "1..1,000,000"), harmful=True),
    Case("optim.total_kimg = 1e12", "run", (DIGITS, "optim.total_kimg=1e12"), ("optim.total_kimg", "at most 200,000"),
         harmful=True),
    Case("optim.batch_size = 10^9", "run", (DIGITS, "optim.batch_size=1000000000"),
         ("optim.batch_size", "at most 65,536"), harmful=True),
    Case("eval.gap_nfe = 10^9", "run", (DIGITS, "eval.gap_nfe=1000000000"), ("eval.gap_nfe", "at most 1,000"),
         harmful=True),
    Case("ddp = 10^5", "run", (DIGITS, "ddp=100000"), ("ddp", "at most 256"), harmful=True),
    Case("seed = 2^64", "run", (DIGITS, "seed=18446744073709551616"), ("seed", "[0, 2**63)")),
    Case("name of 300 characters", "run", (DIGITS, "name=" + "n" * 300), ("name", "300 characters", "1 to 200")),
    Case("a string of 5,000 characters", "run", (DIGITS, "teacher.path=" + "p" * 5000),
         ("teacher.path", "5,000 characters", "at most 4,096")),
    Case("a list of 2,000 items", "run", (DIGITS, "optim.betas=[" + ", ".join(["0.5"] * 2000) + "]"),
         ("optim.betas", "2,000 items", "at most 1,000")),
    # ----- metrics that do not fit the teacher
    Case("class_accuracy on the unconditional digits teacher", "run", (DIGITS, "eval.metrics=[class_accuracy]"),
         ("eval.metrics[0]", "class-conditional")),
    Case("fd_digits on a mixture teacher", "run", (GMM, "eval.metrics=[fd_digits]"),
         ("eval.metrics[0]", "digits teachers only")),
    # ----- names that become paths
    Case("--experiment ../../../escaped", "run", (DIGITS, "--experiment", "../../../escaped"),
         ("--experiment", "no '/' and no '..'"), harmful=True),
    Case("--experiment of 300 characters", "run", (DIGITS, "--experiment", "e" * 300), ("--experiment", "at most 128")),
    Case("--tag without '='", "run", (DIGITS, "--tag", "novalue"), ("--tag", "KEY=VALUE")),
    # ----- stores
    Case("--tracking-uri /etc/passwd", "run", (DIGITS, "--tracking-uri", "/etc/passwd"),
         ("/etc/passwd", "not a folder")),
    Case("--tracking-uri sqlite:////etc/passwd", "run", (DIGITS, "--tracking-uri", "sqlite:////etc/passwd"),
         ("/etc/passwd", "not an SQLite database")),
    Case("--tracking-uri a folder", "run", (DIGITS, "--tracking-uri", "sqlite:///{root}/in"),
         ("{root}/in", "is a folder"), (("in", folder()),)),
    Case("--tracking-uri a garbage file", "run", (DIGITS, "--tracking-uri", "sqlite:///{root}/in"),
         ("{root}/in", "not an SQLite database"), (("in", raw(GARBAGE)),)),
    Case("--tracking-uri under a file", "run", (DIGITS, "--tracking-uri", "sqlite:////etc/passwd/mlflow.db"),
         ("/etc/passwd", "is not a folder")),
    # ----- shipped weights
    Case("truncated digits.safetensors", "run", (DIGITS,), ("digits.safetensors", "SHA-256"),
         (("in", truncated("sfd/teachers/weights/digits.safetensors")),), TEACHER_WEIGHTS),
    Case("truncated digits.safetensors, --dry-run", "run", (DIGITS, "--dry-run"), ("digits.safetensors", "SHA-256"),
         (("in", truncated("sfd/teachers/weights/digits.safetensors")),), TEACHER_WEIGHTS),
    Case("truncated digits classifier", "run", (DIGITS,), ("digits_classifier.safetensors", "SHA-256"),
         (("in", truncated("sfd/metrics/weights/digits_classifier.safetensors")),), CLASSIFIER_WEIGHTS),
    # ----- studies/run.py: the study file
    Case("study: binary file", "study", STUDY_IN, ("in", "a binary file"), (("in", raw(PNG)),)),
    Case("study: duplicated key", "study", STUDY_IN, ("in", "key 'kind' is given twice"),
         (("in", text(study() + "kind: search\n")),)),
    Case("study: billion laughs in its rows", "study", STUDY_IN, ("in", "more than 100,000 values"),
         (("in", text(billion_laughs() + study(rows=[{"id": "a", "params": {}}]).replace(
             "rows:\n- id: a\n  params: {}\n", "rows: *l9\n"))),)),
    Case("study: seeds [[0]]", "study", STUDY_IN, ("seeds: got [[0]]", "distinct integers"),
         (("in", text(study(seeds=[[0]]))),)),
    Case("study: seeds past 2^63", "study", STUDY_IN, ("seeds", "[0, 2**63)"), (("in", text(study(seeds=[2**64]))),)),
    Case("study: a 300-character name", "study", STUDY_IN, ("name", "at most 128"),
         (("in", text(study(name="s" * 300))),)),
    Case("study: name ../../escaped", "study", STUDY_IN, ("name", "no '/' and no '..'"),
         (("in", text(study(name="../../escaped"))),)),
    Case("study: base is a list", "study", STUDY_IN, ("base", "the path of an experiments"),
         (("in", text(study(base=["experiments/digits_sfd.yaml"]))),)),
    Case("study: a row id of 65 characters", "study", STUDY_IN, ("rows[0]", "at most 64"),
         (("in", text(study(rows=[{"id": "r" * 65, "params": {}}]))),)),
    Case("study: a row's NFE 10^9", "study", STUDY_IN, ("row a", "student.nfe", "1..1000"),
         (("in", text(study(rows=[{"id": "a", "params": {"student.nfe": 10**9}}]))),), harmful=True),
    Case("study: overrides solver.m 10^8", "study", STUDY_IN, ("solver.m", "0..100"),
         (("in", text(study(overrides={**TINY, "solver.m": 10**8}))),), harmful=True),
    Case("study: class_accuracy on digits", "study", STUDY_IN, ("eval.metrics[0]", "class-conditional"),
         (("in", text(study(overrides={**TINY, "eval.metrics": ["class_accuracy"]},
                            objective={"metric": "class_accuracy", "direction": "maximize"}))),)),
    Case("search: NFE range up to 10^12", "study", STUDY_IN, ("student.nfe", "1..1000"),
         (("in", text(study(space={"student.nfe": {"type": "int", "low": 1, "high": 10**12}}))),), harmful=True),
    Case("search: n_trials 10^9", "study", STUDY_IN, ("n_trials", "1..10,000"),
         (("in", text(study(space={"student.nfe": {"type": "int", "low": 2, "high": 3}}, n_trials=10**9))),),
         harmful=True),
    Case("search: sampler seed 2^40", "study", STUDY_IN, ("sampler.seed", "0..2**32-1"),
         (("in", text(study(space={"student.nfe": {"type": "int", "low": 2, "high": 3}},
                            sampler={"type": "tpe", "seed": 2**40}))),)),
    Case("search: a list among the choices", "study", STUDY_IN, ("space.loss.name.choices", "Optuna's choices"),
         (("in", text(study(space={"loss.name": {"type": "categorical", "choices": [["l1", "l2"]]}}))),)),
    # ----- studies/run.py: options and stores
    Case("--seeds 2^64", "study", ("ablation_digits", "--seeds", "18446744073709551616"),
         ("seeds: got [18446744073709551616]", "[0, 2**63)")),
    Case("--seeds 0..120", "study", ("ablation_digits", "--seeds", *map(str, range(121))), ("seeds", "1 to 100"),
         harmful=True),
    Case("--seeds making a 130-character name", "study",
         ("ablation_digits", "--seeds", *map(str, range(1_000_000_000_000, 1_000_000_000_008))),
         ("--seeds", "at most 128"), harmful=True),
    Case("--storage /etc/passwd", "study", ("ablation_digits", "--storage", "/etc/passwd"),
         ("--storage", "Could not parse")),
    Case("--storage sqlite:////etc/passwd", "study", ("ablation_digits", "--storage", "sqlite:////etc/passwd"),
         ("--storage", "/etc/passwd", "not an SQLite database"), harmful=True),
    Case("--storage a folder", "study", ("ablation_digits", "--storage", "sqlite:///{root}/in"),
         ("--storage", "is a folder"), (("in", folder()),)),
    Case("--storage a garbage file", "study", ("ablation_digits", "--storage", "sqlite:///{root}/in"),
         ("--storage", "not an SQLite database"), (("in", raw(GARBAGE)),)),
    Case("--tracking-uri /etc/passwd (study)", "study", ("ablation_digits", "--tracking-uri", "/etc/passwd"),
         ("--tracking-uri", "not a folder")),
    Case("truncated digits.safetensors (study)", "study", ("ablation_digits",), ("digits.safetensors", "SHA-256"),
         (("in", truncated("sfd/teachers/weights/digits.safetensors")),), TEACHER_WEIGHTS),
    Case("truncated digits.safetensors (study --dry-run)", "study", ("ablation_digits", "--dry-run"),
         ("digits.safetensors", "SHA-256"),
         (("in", truncated("sfd/teachers/weights/digits.safetensors")),), TEACHER_WEIGHTS),
    Case("truncated digits classifier (study)", "study", ("ablation_digits",),
         ("digits_classifier.safetensors", "SHA-256"),
         (("in", truncated("sfd/metrics/weights/digits_classifier.safetensors")),), CLASSIFIER_WEIGHTS),
    # ----- reports/build.py
    Case("report: --storage a garbage file", "report",
         ("ablation_digits", "--storage", "sqlite:///{root}/in", "--out", "{root}/out"),
         ("--storage", "not an SQLite database"), (("in", raw(GARBAGE)),)),
    Case("report: study ../../escaped", "report", ("../../escaped",), ("study", "no '/' and no '..'")),
    Case("report: --tracking-uri /etc/passwd", "report",
         ("ablation_digits", "--tracking-uri", "/etc/passwd", "--out", "{root}/out"), ("/etc/passwd", "not a folder")),
]


# ----- running a case -------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int
    stderr: str
    traceback: bool  # a traceback reached the user
    created: list[str]  # paths (relative to the case's folder, or in the checkout) that the case created or changed

    def one_line(self) -> str | None:
        lines = self.stderr.splitlines()
        return lines[0] if len(lines) == 1 and lines[0].startswith("error: ") else None

    def clear(self, case: Case, root: Path) -> bool:
        line = self.one_line()
        return (self.status == 2 and line is not None and not self.traceback
                and all(fill(e, root, ROOT) in line for e in case.expect))


def fill(text: str, root: Path, repo: Path) -> str:
    return text.replace("{root}", str(root)).replace("{repo}", str(repo))


def snapshot(root: Path, repo: Path) -> dict[str, str]:
    """Every file and folder under `root`, with a hash of each file; and what the checkout's report folder holds."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    out = repo / "reports" / "out"
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        state[f"{{repo}}/reports/out/{path.name}"] = "entry"
    return state


def prepare(case: Case, root: Path, repo: Path) -> None:
    for _, make in case.files:
        make(root, repo)


def changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def run_process(case: Case, root: Path, repo: Path, python: str = sys.executable) -> Outcome:
    """The case as a real process of the checkout `repo`, from `root`, with the runs folder in `root`."""
    prepare(case, root, repo)
    before = snapshot(root, repo)
    script = str(repo / SCRIPTS[case.script])
    args = [fill(a, root, repo) for a in case.args]
    patches = [(m, a, str(root / p)) for m, a, p in case.patch]
    code = ("import importlib, pathlib, runpy, sys\n"
            f"for module, attribute, value in {patches!r}:\n"
            "    setattr(importlib.import_module(module), attribute, pathlib.Path(value))\n"
            f"sys.argv = [{script!r}, *{args!r}]\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SFD_RESULT_FILE")}
    env.update(SFD_RUNS_DIR=str(root / "runs"), PYTHONPATH=str(repo), MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([python, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    return Outcome(proc.returncode, proc.stderr, "Traceback (most recent call last)" in proc.stderr,
                   changes(before, snapshot(root, repo)))


def figures(repo: Path, jobs: int, skip_harmful: bool) -> int:
    """Run every case as a process of `repo`; print one line per case and the totals."""
    cases = [c for c in CASES if not (skip_harmful and c.harmful)]
    def one(case: Case) -> tuple[Case, Outcome, Path]:
        root = Path(tempfile.mkdtemp(prefix="sfd-bad-input-"))
        try:
            return case, run_process(case, root, repo), root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, cases))
    clear = tracebacks = created = 0
    print(f"{'case':<52} {'exit':>4}  {'result':<10} first line of stderr")
    for case, outcome, root in results:
        ok = outcome.clear(case, root)
        clear += ok
        tracebacks += outcome.traceback
        created += bool(outcome.created)
        result = "clear" if ok else "TRACEBACK" if outcome.traceback else "CREATED" if outcome.created else "UNCLEAR"
        first = (outcome.stderr.strip().splitlines() or [""])[-1 if outcome.traceback else 0]
        print(f"{case.name[:52]:<52} {outcome.status:>4}  {result:<10} {first.replace(str(root), '{root}')[:150]}")
        if outcome.created:
            print(f"{'':<52} {'':>4}  created: {', '.join(outcome.created[:5])}")
    print(f"\n{len(cases)} bad inputs tried on {repo}: {clear} clear one-line errors (exit 2, naming the field or "
          f"file), {tracebacks} tracebacks, {created} that created or changed files; "
          f"{time.perf_counter() - t0:.0f} s")
    if len(cases) < len(CASES):
        print(f"not tried (--skip-harmful): {len(CASES) - len(cases)} cases that, unchecked, allocate gigabytes, run "
              "for hours or write outside their folder")
    return 0 if clear == len(cases) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose scripts run (default: this one)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--skip-harmful", action="store_true",
                        help="leave out the cases that, unchecked, allocate gigabytes, run for hours or write outside "
                             "their folder (for an older checkout)")
    options = parser.parse_args()
    sys.exit(figures(options.repo.resolve(), options.jobs, options.skip_harmful))
