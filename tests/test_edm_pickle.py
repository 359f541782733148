"""The safe EDM-pickle loader, on pickles written in EDM's persistence format by a stand-in module."""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sfd.networks.edm import STEP_KEY_PREFIX, EDMPrecond
from sfd.teachers.edm_pickle import (
    EDMPickleError, PersistentRecord, UnsafePickleError, load_edm_pickle, read_edm_pickle,
)

# A stand-in for EDM's torch_utils/persistence.py: decorated classes pickle as
# _reconstruct_persistent_obj(meta), meta = dict(type, version, module_src, class_name, state=__dict__).
# Like EDM's, its reconstructor executes module_src, which is what makes plain pickle.load unsafe.
FAKE_PERSISTENCE = textwrap.dedent('''
    _version = 6

    def _reconstruct_persistent_obj(meta):
        exec(compile(meta["module_src"], "<persistent module>", "exec"), {})
        return None

    def persistent_class(orig_class, module_src, class_name=None):
        class Decorator(orig_class):
            _orig_module_src = module_src
            _orig_class_name = class_name or orig_class.__name__

            def __reduce__(self):
                fields = list(super().__reduce__())
                fields += [None] * max(3 - len(fields), 0)
                if fields[0] is not _reconstruct_persistent_obj:
                    meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                                class_name=self._orig_class_name, state=fields[2])
                    fields[0] = _reconstruct_persistent_obj
                    fields[1] = (meta,)
                    fields[2] = None
                return tuple(fields)

        Decorator.__name__ = orig_class.__name__
        return Decorator
''')

NETWORK_SRC = "# stands in for EDM's training/networks.py\nimport torch\n"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions crawl with 2 threads on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture
def persistence(tmp_path, monkeypatch):
    """Import the stand-in as ``torch_utils.persistence``; remove it from sys.modules afterwards."""
    pkg = tmp_path / "fakepkgs" / "torch_utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "persistence.py").write_text(FAKE_PERSISTENCE)
    monkeypatch.syspath_prepend(str(pkg.parent))
    module = importlib.import_module("torch_utils.persistence")
    yield module
    for name in ("torch_utils.persistence", "torch_utils"):
        sys.modules.pop(name, None)


class Loss:
    """Stands in for EDM's EDMLoss (a persistent plain object)."""

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


def make_persistent(net, persistence, src: str = NETWORK_SRC, class_name: str | None = None,
                    init_kwargs: dict | None = None):
    """Turn every module of ``net`` (except torch containers) into a persistent-class instance, as EDM's are."""
    cache: dict[type, type] = {}
    for module in net.modules() if isinstance(net, torch.nn.Module) else [net]:
        cls = type(module)
        if cls.__module__.startswith("torch.nn"):
            continue  # ModuleDict & co. pickle normally in EDM too
        if cls not in cache:
            cache[cls] = persistence.persistent_class(cls, src)
        module.__class__ = cache[cls]
        module._init_args, module._init_kwargs = (), {}
    if class_name:
        type(net)._orig_class_name = class_name
    net._init_kwargs = dict(init_kwargs or {})
    return net


def tiny_kwargs(**kw) -> dict:
    cfg = dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_type="SongUNet",
               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9,
               dropout=0.13, embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1])
    return {**cfg, **kw}


def randomized(kwargs: dict, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)  # non-zero everywhere, so every tensor matters to the output
    return net.eval()


def write_pickle(path, ema, persistence, protocol=pickle.DEFAULT_PROTOCOL, **extra):
    loss = make_persistent(Loss(), persistence, src="# stands in for training/loss.py\n")
    data = dict(ema=ema, loss_fn=loss, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                    use_labels=True, xflip=False, resolution=8), **extra)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    labels = F.one_hot(torch.tensor([0, 3]), 4).float()
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 7.0]), labels, augment_labels=torch.randn(2, 9, generator=g))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_roundtrip_equals_source(tmp_path, persistence, protocol):
    kwargs = tiny_kwargs()
    source = randomized(kwargs)
    expected = outputs(source)
    path = write_pickle(tmp_path / "net.pkl", make_persistent(source, persistence, init_kwargs=kwargs),
                        persistence, protocol=protocol)
    for name in ("torch_utils.persistence", "torch_utils"):
        sys.modules.pop(name, None)
    net = load_edm_pickle(path)
    assert type(net) is EDMPrecond and not net.training
    assert net.init_kwargs == {**kwargs, "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5,
                               "step_condition": False}
    torch.testing.assert_close(outputs(net), expected, rtol=0, atol=0)
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_read_records_without_running_source(tmp_path, persistence):
    kwargs = tiny_kwargs(label_dim=0)
    path = write_pickle(tmp_path / "net.pkl", make_persistent(randomized(kwargs), persistence,
                                                              init_kwargs=kwargs), persistence)
    data = read_edm_pickle(path)
    assert isinstance(data["ema"], PersistentRecord) and data["ema"].class_name == "EDMPrecond"
    assert data["ema"].module_src == NETWORK_SRC and data["ema"].version == 6
    assert data["loss_fn"].class_name == "Loss" and data["loss_fn"].state["P_std"] == 1.2
    assert data["augment_pipe"] is None and data["dataset_kwargs"]["resolution"] == 8


def test_overrides_step_condition_and_dropout(tmp_path, persistence):
    kwargs = tiny_kwargs()
    source = randomized(kwargs)
    path = write_pickle(tmp_path / "net.pkl", make_persistent(source, persistence, init_kwargs=kwargs),
                        persistence)
    student = load_edm_pickle(path, step_condition=True, dropout=0.0)
    assert student.model.enc["8x8_block0"].dropout == 0.0
    assert any(k.startswith(STEP_KEY_PREFIX) for k in student.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x, 2.0, step=5), source(x, 2.0))


def test_missing_key_and_wrong_class(tmp_path, persistence):
    kwargs = tiny_kwargs()
    path = write_pickle(tmp_path / "net.pkl", make_persistent(randomized(kwargs), persistence,
                                                              class_name="VPPrecond", init_kwargs=kwargs),
                        persistence)
    with pytest.raises(EDMPickleError, match="only EDMPrecond"):
        load_edm_pickle(path)
    with pytest.raises(EDMPickleError, match="no entry 'ema_slow'"):
        load_edm_pickle(path, key="ema_slow")


def test_tensors_must_fit(tmp_path, persistence):
    kwargs = tiny_kwargs()
    net = make_persistent(randomized(kwargs), persistence, init_kwargs={**kwargs, "augment_dim": 0})
    path = write_pickle(tmp_path / "net.pkl", net, persistence)
    with pytest.raises(EDMPickleError, match="unexpected.*map_augment"):
        load_edm_pickle(path)


def test_a_truncated_pickle_is_named_as_such(tmp_path, persistence):
    kwargs = tiny_kwargs()
    path = write_pickle(tmp_path / "net.pkl", make_persistent(randomized(kwargs), persistence, init_kwargs=kwargs),
                        persistence)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut in half
    with pytest.raises(EDMPickleError, match="is truncated or damaged .*fetch it again") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value)


def test_tensors_of_another_size_name_the_file(tmp_path, persistence):
    kwargs = tiny_kwargs()
    net = make_persistent(randomized(kwargs), persistence, init_kwargs={**kwargs, "model_channels": 8})
    path = write_pickle(tmp_path / "net.pkl", net, persistence)
    with pytest.raises(EDMPickleError, match="size mismatch") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value)


def test_a_pickle_of_another_network_is_refused_before_a_run_exists(tmp_path, persistence, monkeypatch):
    """A well-formed EDM pickle of another architecture (here 8x8 with 4 classes) given as the CIFAR-10
    teacher would be sampled and scored against CIFAR-10's FID reference: it is refused, by key, before the
    MLflow run is created."""
    from mlflow import MlflowClient

    from sfd import tracking
    from sfd.config import ConfigError, load_config
    from sfd.runner import run_experiment
    from sfd.teachers import get_teacher

    monkeypatch.setenv("SFD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    kwargs = tiny_kwargs()
    path = write_pickle(tmp_path / "net.pkl", make_persistent(randomized(kwargs), persistence, init_kwargs=kwargs),
                        persistence)
    with pytest.raises(EDMPickleError) as err:
        get_teacher("cifar10-uncond", path=path)
    for text in (str(path), "is not the cifar10-uncond teacher", "img_resolution=8 (expected 32)",
                 "label_dim=4 (expected 0)", "model_channels=16 (expected 128)"):
        assert text in str(err.value), text
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "cifar10_sfd.yaml"),
                      [f"teacher.path={path}", "eval.metrics=[teacher_gap]"])
    with pytest.raises(ConfigError, match="teacher.path: .* is not the cifar10-uncond teacher"):
        run_experiment(cfg, tracker=tracking.Tracker("wrong-teacher"))
    experiment = MlflowClient(tracking.default_tracking_uri()).get_experiment_by_name("wrong-teacher")
    assert experiment is None or not MlflowClient(tracking.default_tracking_uri()).search_runs(
        [experiment.experiment_id])
    # --dry-run reads the checkpoint too, and says the same
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "run.py")
    spec = importlib.util.spec_from_file_location("experiments_run", script)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert runner.main([script.replace("run.py", "cifar10_sfd.yaml"), f"teacher.path={path}",
                        "eval.metrics=[teacher_gap]", "--dry-run"]) == 2


def test_torch_save_archive_is_explained(tmp_path):
    path = tmp_path / "net.pt"
    torch.save({"a": torch.ones(1)}, path)
    with pytest.raises(EDMPickleError, match="torch.save zip archive"):
        load_edm_pickle(path)


class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_os_system_payload(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": SystemCall(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load '(posix|os|nt)\.system'"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_never_executes_module_src(tmp_path, persistence):
    marker = tmp_path / "MARKER"
    evil_src = f"open({str(marker)!r}, 'w').close()\n"
    kwargs = tiny_kwargs()
    source = randomized(kwargs)
    expected = outputs(source)

    # The payload is live: a plain pickle.load with EDM-style persistence runs it.
    evil_class = make_persistent(randomized(kwargs), persistence, src=evil_src, class_name="Payload",
                                 init_kwargs=kwargs)
    bad = write_pickle(tmp_path / "bad.pkl", evil_class, persistence)
    pickle.loads(bad.read_bytes())
    assert marker.exists()
    marker.unlink()

    # Our loader refuses the unknown class and runs nothing, even with torch_utils importable.
    with pytest.raises(EDMPickleError, match="Payload; only EDMPrecond"):
        load_edm_pickle(bad)
    assert not marker.exists()

    # An EDMPrecond whose recorded source is malicious loads as data; the source stays a string.
    good_name = write_pickle(tmp_path / "named.pkl", make_persistent(source, persistence, src=evil_src,
                                                                     init_kwargs=kwargs), persistence)
    net = load_edm_pickle(good_name)
    assert not marker.exists()
    torch.testing.assert_close(outputs(net), expected, rtol=0, atol=0)
    assert read_edm_pickle(good_name)["ema"].module_src == evil_src


def test_refuses_unlisted_torch_globals(tmp_path):
    path = tmp_path / "module.pkl"
    path.write_bytes(pickle.dumps({"ema": torch.nn.Linear(2, 2)}))
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        load_edm_pickle(path)
