"""Everything a study invocation checks before it creates anything: its options, the study file, every run
config and asset, the stores' addresses, and what the study recorded so far against its YAML now."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from sfd import tracking as T
from sfd.storelock import backend, without_password

from .configs import check_study, missing_assets_error
from .lock import PEER_BACKENDS
from .peers import HEARTBEAT_S
from .record import check_record, recorded_study
from .spec import StudyError, StudySpec, load_spec, with_seeds
from .workers import AUTO, SERIAL, DeviceError, auto_devices, resolve_devices


@dataclass
class CheckedStudy:
    spec: StudySpec
    spec_text: str | None  # the YAML of a `--seeds` study, written only when it runs
    tracking_uri: str
    storage_url: str
    devices: list[str] | None
    skipped: dict[str, str]
    configs: dict[str, Any]  # row id (search: "base") -> resolved run config
    recorded: optuna.Study | None = None  # the Optuna study as stored before this run (None: a new study)
    heartbeat_s: int = HEARTBEAT_S  # the study's own (recorded when it was created), else the one asked for
    heartbeat_ignored: bool = False  # another heartbeat was asked for than the study's
    missing: Exception | None = None  # every asset the study needs that is not here (a MissingAssetError), if any


def check_everything(name_or_path: str, smoke: bool, storage: str | None, tracking_uri: str | None,
                     n_trials: int | None, seeds: list[int] | None, devices: list[str] | None,
                     retry_failed: bool, heartbeat_s: int | None = None) -> CheckedStudy:
    """The study, its options, every row's config and assets, the stores (reachable, of a kind a study can use)
    and what the study recorded so far, checked; creates nothing. `devices` comes back as the worker devices
    (None: this process), `auto` decided. Missing assets are all gathered in `missing`: a run refuses to start
    with it, a dry run shows its plan, then it."""
    if n_trials is not None and n_trials < 1:
        raise StudyError(f"n_trials: got {n_trials}; a positive integer (leave it out to run every trial left)")
    if heartbeat_s is not None and (isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, int)
                                    or heartbeat_s < 1):
        raise StudyError(f"heartbeat: got {heartbeat_s!r}; a whole number of seconds >= 1")
    chosen = devices not in (None, [AUTO], [SERIAL])  # named by the user: their trials run in workers
    if chosen:
        try:
            devices = resolve_devices(devices)
        except DeviceError as exc:
            raise StudyError(str(exc)) from None
    spec = load_spec(name_or_path)
    spec_text = None
    if seeds is not None:
        spec, spec_text = with_seeds(spec, seeds)
    tracking_uri = tracking_uri or T.default_tracking_uri()
    storage_url = storage or T.default_optuna_storage()
    problems = {f"MLflow tracking URI {without_password(tracking_uri)!r} (--tracking-uri)":
                T.tracking_uri_problem(tracking_uri, connect=True),
                f"Optuna storage {without_password(storage_url)!r} (--storage)": _storage_problem(storage_url)}
    for what, problem in problems.items():
        if problem:
            raise StudyError(f"{what}: {problem}")
    skipped, configs, missing = check_study(spec, smoke, tracking_uri, teacher_device="cpu" if chosen else None)
    if chosen and any(d.startswith("cuda") for d in devices) and any(c.ddp > 1 for c in configs.values()):
        raise StudyError("--devices: a row with ddp > 1 runs under torchrun on that many GPUs, but a worker sees one "
                         "GPU; run the study with --devices serial (each ddp run then sees every GPU of the process)")
    if devices == [AUTO]:
        devices = auto_devices(bool(spec.rows), configs.values(), len(configs) * len(spec.replicates()))
    elif devices == [SERIAL]:
        devices = None
    study = recorded_study(storage_url, spec.experiment(smoke))
    if study is not None:
        check_record(spec, study, retry_failed)
    recorded_heartbeat = study.user_attrs.get("heartbeat_s") if study is not None else None
    return CheckedStudy(spec, spec_text, tracking_uri, storage_url, devices, skipped, configs, study,
                        recorded_heartbeat or heartbeat_s or HEARTBEAT_S,
                        recorded_heartbeat is not None and heartbeat_s not in (None, recorded_heartbeat),
                        missing_assets_error(spec, missing, len(configs) if spec.rows else 0) if missing else None)


def _storage_problem(url: str) -> str | None:
    """Why a study cannot keep its trials at `url`: it is no database SQLAlchemy can use, not one a study runs on
    (sqlite for one process, PostgreSQL for peers), or a database server that does not answer."""
    unusable = T.database_url_problem(url)
    if unusable:
        return unusable
    kind = backend(url)
    if kind != "sqlite" and kind not in PEER_BACKENDS:
        return (f"a {kind} database; a study keeps its trials in sqlite (sqlite:///FILE, one process per study) or "
                "PostgreSQL (postgresql://..., shared by peers on many machines)")
    return T.database_url_problem(url, connect=True)
