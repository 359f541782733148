"""Test-wide settings: one torch thread and one BLAS thread (tiny networks run faster and deterministically
that way on the 2-core CI machine, and OpenBLAS's spinning threads made a 2048-d Fréchet distance ~10x slower
under load), offline MLflow; shared fixtures (a throwaway PostgreSQL and `mlflow server` for the many-process tests)."""
import importlib.util
import os

import pytest
import torch
from servers import IN_CI, MlflowServer, Postgres, postgres_bin
from threadpoolctl import threadpool_limits  # installed with scikit-learn

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(1)
threadpool_limits(limits=1, user_api="blas")

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # the asset's file name


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """EDM's `torch_utils.persistence` and `dnnlib.util` stand-ins (tests/checkpoint_writers.py), importable
    while the test runs."""
    from checkpoint_writers import install_fake_modules, remove_fake_modules

    yield install_fake_modules(tmp_path / "fakepkgs", monkeypatch)
    remove_fake_modules()


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """A private runs/ folder (MLflow + Optuna) for one test; the usual tracking URI variable is cleared."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("SFD_RUNS_DIR", str(runs))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return runs


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """Random Inception-v3 weights in the file format torch-fidelity's loader expects (the real 2015-12-05
    file is a download). Convolutions are He-initialised: torch's default init shrinks activations layer by
    layer to pool3 features of ~1e-7, where a Fréchet distance says little."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        # Build the network without its (downloaded) weights: skip the URL fetch and the load.
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def unavailable(reason: str):
    """Skip a test whose server cannot be had here, saying why; in CI (CI=true) fail instead: CI installs it."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must run this test (.ci/run installs what it needs)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session (tests/servers.py)."""
    if importlib.util.find_spec("psycopg") is None:  # SQLAlchemy's driver for postgresql:// URLs
        unavailable("psycopg (PostgreSQL's Python driver) is not installed: pip install -e '.[dev]'")
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    server = Postgres(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A throwaway `mlflow server` on 127.0.0.1 for the session: sqlite backend, proxied artifacts."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
