"""The safe EDM-pickle loader, on pickles written as NVlabs EDM writes them (see tests/checkpoint_writers.py:
every persistent module records its real init args and kwargs, numpy float64 scalars included)."""
from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch

from checkpoint_writers import (
    adm_kwargs, check_edm_facts, edm_network, numpy1_spelling, outputs, pickle_globals, randomize,
    remove_fake_modules, song_kwargs, write_edm_pickle,
)
from sfd.networks.edm import EDMPrecond, is_step_key
from sfd.teachers.edm_pickle import (
    EDMPickleError, PersistentRecord, UnsafePickleError, load_edm_pickle, read_edm_pickle,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
NUMPY_SPELLINGS = ("numpy._core", "numpy.core")  # numpy >= 2 writes the first, numpy < 2 (EDM's 2022 files) the second


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions crawl with 2 threads on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def written(tmp_path, fakes, kwargs, *, name="net.pkl", **write):
    """(path, our source network): the source's weights pickled the way EDM's training loop pickles them."""
    source = randomize(EDMPrecond(**kwargs))
    net = edm_network(kwargs, fakes.persistence, weights_from=source)
    check_edm_facts(net)
    return write_edm_pickle(tmp_path / name, net, fakes.persistence, **write), source


ARCHS = {"song-uncond": song_kwargs(label_dim=0), "song-cond": song_kwargs(),
         "adm-uncond": adm_kwargs(label_dim=0), "adm-cond": adm_kwargs()}


@pytest.mark.parametrize("spelling", NUMPY_SPELLINGS)
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_edm_written_pickles_load_and_compute_what_was_written(tmp_path, fakes, arch, protocol, spelling):
    kwargs = ARCHS[arch]
    path, source = written(tmp_path, fakes, kwargs, protocol=protocol, numpy_spelling=spelling)
    globals_named = pickle_globals(path.read_bytes())
    assert f"{spelling}.multiarray.scalar" in globals_named and "numpy.dtype" in globals_named  # the stand-in can fail
    remove_fake_modules()  # nothing of EDM's code is importable while we load
    net = load_edm_pickle(path)
    assert type(net) is EDMPrecond and not net.training
    assert net.init_kwargs == {**kwargs, "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5,
                               "step_condition": False, "step_init": "random"}
    torch.testing.assert_close(outputs(net, kwargs), outputs(source, kwargs), rtol=0, atol=0)
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_a_protocol_4_edm_pickle_names_exactly_edms_globals(tmp_path, fakes):
    """The complete set of globals an EDM-written dict(ema, loss_fn, augment_pipe, dataset_kwargs) names (issue
    17); dnnlib.util.EasyDict is listed there too, but EDM's loop writes dataset_kwargs as a plain dict."""
    path, _ = written(tmp_path, fakes, song_kwargs())
    assert pickle_globals(path.read_bytes()) == {
        "torch_utils.persistence._reconstruct_persistent_obj", "collections.OrderedDict",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes",
        "torch.nn.modules.container.ModuleDict", "numpy._core.multiarray.scalar", "numpy.dtype"}


def test_read_records_without_running_source(tmp_path, fakes):
    path, _ = written(tmp_path, fakes, song_kwargs(label_dim=0))
    data = read_edm_pickle(path)
    ema = data["ema"]
    assert isinstance(ema, PersistentRecord) and ema.class_name == "EDMPrecond" and ema.version == 6
    assert "class EDMPrecond" in ema.module_src  # recorded, never run
    block = ema.state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["4x4_block0"]
    # the numpy scalars come back as plain numbers
    assert block.state["_init_kwargs"]["skip_scale"] == pytest.approx(np.sqrt(0.5), abs=0)
    assert type(block.state["_init_kwargs"]["init_attn"]["init_weight"]) is float
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["P_std"] == 1.2
    assert data["augment_pipe"].state["_init_kwargs"]["p"] == 0.12
    assert data["dataset_kwargs"]["resolution"] == 8


@pytest.mark.parametrize("step_init", ["random", "zero"])
def test_overrides_step_condition_and_dropout(tmp_path, fakes, step_init):
    """A teacher pickle read as an SFD-v student: every teacher tensor loaded, the new step layers initialised
    (zero `affine_step`: the student computes its teacher; random, as the reference: it does not)."""
    kwargs = song_kwargs()
    path, source = written(tmp_path, fakes, kwargs)
    torch.manual_seed(0)
    student = load_edm_pickle(path, step_condition=True, step_init=step_init, dropout=0.0)
    assert student.model.enc["8x8_block0"].dropout == 0.0
    assert any(is_step_key(k) for k in student.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        same = torch.allclose(student(x, 2.0, step=5), source(x, 2.0), rtol=0, atol=1e-6)
    assert same == (step_init == "zero")


def test_missing_key_and_wrong_class(tmp_path, fakes):
    path, _ = written(tmp_path, fakes, song_kwargs())
    with pytest.raises(EDMPickleError, match="no entry 'ema_slow'"):
        load_edm_pickle(path, key="ema_slow")
    with pytest.raises(EDMPickleError, match="only EDMPrecond"):
        load_edm_pickle(path, key="loss_fn")


def test_tensors_must_fit(tmp_path, fakes):
    kwargs = song_kwargs()
    source = randomize(EDMPrecond(**kwargs))
    net = edm_network(kwargs, fakes.persistence, weights_from=source)
    net._init_kwargs["augment_dim"] = 0
    path = write_edm_pickle(tmp_path / "net.pkl", net, fakes.persistence)
    with pytest.raises(EDMPickleError, match="unexpected.*map_augment") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value)


def test_tensors_of_another_size_name_the_file(tmp_path, fakes):
    kwargs = song_kwargs()
    net = edm_network(kwargs, fakes.persistence, weights_from=randomize(EDMPrecond(**kwargs)))
    net._init_kwargs["model_channels"] = 8
    path = write_edm_pickle(tmp_path / "net.pkl", net, fakes.persistence)
    with pytest.raises(EDMPickleError, match="shapes differ") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_pickle_is_named_as_such(tmp_path, fakes):
    path, _ = written(tmp_path, fakes, song_kwargs())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut in half
    with pytest.raises(EDMPickleError, match="is truncated or damaged .*fetch it again") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value)


def test_a_pickle_of_another_network_is_refused_before_a_run_exists(tmp_path, fakes, monkeypatch):
    """A well-formed EDM pickle of another architecture (here 8x8 with 4 classes) given as the CIFAR-10
    teacher would be sampled and scored against CIFAR-10's FID reference: it is refused, by key, before the
    MLflow run is created (and before any network is built)."""
    from mlflow import MlflowClient

    from sfd import tracking
    from sfd.config import ConfigError, load_config
    from sfd.runner import run_experiment
    from sfd.teachers import get_teacher

    monkeypatch.setenv("SFD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, _ = written(tmp_path, fakes, song_kwargs())
    with pytest.raises(EDMPickleError) as err:
        get_teacher("cifar10-uncond", path=path)
    for text in (str(path), "is not the cifar10-uncond teacher", "img_resolution=8 (expected 32)",
                 "label_dim=4 (expected 0)", "model_channels=16 (expected 128)"):
        assert text in str(err.value), text
    cfg = load_config(os.path.join(ROOT, "experiments", "cifar10_sfd.yaml"),
                      [f"teacher.path={path}", "eval.metrics=[teacher_gap]"])
    with pytest.raises(ConfigError, match="teacher.path: .* is not the cifar10-uncond teacher"):
        run_experiment(cfg, tracker=tracking.Tracker("wrong-teacher"))
    experiment = MlflowClient(tracking.default_tracking_uri()).get_experiment_by_name("wrong-teacher")
    assert experiment is None or not MlflowClient(tracking.default_tracking_uri()).search_runs(
        [experiment.experiment_id])
    # --dry-run reads the checkpoint too, and says the same
    script = os.path.join(ROOT, "experiments", "run.py")
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
    with pytest.raises(UnsafePickleError, match=r"refusing to load '(posix|os|nt)\.system'") as err:
        load_edm_pickle(path)
    assert not marker.exists() and str(path) in str(err.value)


def test_never_executes_module_src(tmp_path, fakes):
    marker = tmp_path / "MARKER"
    evil_src = f"open({str(marker)!r}, 'w').close()\n"
    kwargs = song_kwargs()
    source = randomize(EDMPrecond(**kwargs))
    net = edm_network(kwargs, fakes.persistence, weights_from=source)
    type(net)._orig_module_src = evil_src
    path = write_edm_pickle(tmp_path / "evil.pkl", net, fakes.persistence)

    # The payload is live: a plain pickle.load with EDM-style persistence runs it.
    pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()

    # Our loader reads the network as data; the source stays a string.
    loaded = load_edm_pickle(path)
    assert not marker.exists()
    torch.testing.assert_close(outputs(loaded, kwargs), outputs(source, kwargs), rtol=0, atol=0)
    assert read_edm_pickle(path)["ema"].module_src == evil_src


def test_refuses_unlisted_torch_globals(tmp_path):
    path = tmp_path / "module.pkl"
    path.write_bytes(pickle.dumps({"ema": torch.nn.Linear(2, 2)}))
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        load_edm_pickle(path)


# ----- numpy values: numbers only ------------------------------------------------------------------------

class BigEndianFloat:
    """A float64 scalar pickled with a big-endian dtype (numpy's own reduce, spelt out)."""

    def __reduce__(self):
        return (type(np.float64(0)).__reduce__(np.float64(0))[0], (np.dtype(">f8"), np.array(2.5, ">f8").tobytes()))


@pytest.mark.parametrize("value,expected", [
    (np.float64(np.sqrt(0.2)), float(np.sqrt(0.2))), (np.float32(0.5), 0.5), (np.int64(-3), -3), (np.uint8(7), 7),
    (np.bool_(True), True), (np.float16(1.5), 1.5), (np.complex128(1 - 2j), 1 - 2j), (BigEndianFloat(), 2.5),
])
@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_numbers_are_read_as_plain_values(tmp_path, value, expected, protocol):
    path = tmp_path / "values.pkl"
    for spelling in NUMPY_SPELLINGS:
        data = pickle.dumps({"x": value}, protocol=protocol)
        path.write_bytes(numpy1_spelling(data) if spelling == "numpy.core" else data)
        x = read_edm_pickle(path)["x"]
        assert x == expected and type(x) is type(expected)


@pytest.mark.parametrize("value", [
    np.str_("text"), np.bytes_(b"ab"), np.void(b"ab"), np.datetime64("2022-01-01"), np.timedelta64(3, "s"),
    np.zeros(1, dtype=[("a", "f8")])[0], np.array([1.0, 2.0]), np.dtype("O"), np.dtype([("a", "f8")]),
])
def test_other_numpy_objects_are_refused(tmp_path, value):
    path = tmp_path / "values.pkl"
    path.write_bytes(pickle.dumps({"x": value}, protocol=4))
    with pytest.raises(UnsafePickleError) as err:
        read_edm_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_scalar_whose_bytes_do_not_fit_its_dtype_is_refused(tmp_path):
    path = tmp_path / "short.pkl"
    path.write_bytes(pickle.dumps({"x": np.float32(1.0)}, protocol=4).replace(b"\x8c\x02f4", b"\x8c\x02f8"))
    with pytest.raises(UnsafePickleError, match="4 bytes for a float64") as err:
        read_edm_pickle(path)
    assert str(path) in str(err.value)


# ----- memory and malformed input: refused before anything is allocated ------------------------------------

class RawTensor:
    """Pickles as torch._utils._rebuild_tensor_v2 over a real (tiny) storage with the geometry given."""

    def __init__(self, size, stride, offset=0, numel=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what tensors pickle
            storage = torch.zeros(numel).storage()
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


@pytest.mark.parametrize("size,stride,offset", [((2 ** 40,), (1,), 0), ((1,), (1,), 5), ((2, 2), (1, 3), 0),
                                                ((-1,), (1,), 0)])
def test_a_tensor_larger_than_its_storage_is_refused(tmp_path, size, stride, offset):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"ema": RawTensor(size, stride, offset, numel=1)}))
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(EDMPickleError, match="storage|geometry") as err:
        read_edm_pickle(path)
    assert time.perf_counter() - started < 5 and str(path) in str(err.value)


def test_a_storage_that_declares_more_bytes_than_it_holds_is_refused(tmp_path):
    data = pickle.dumps({"ema": torch.zeros(3)})
    header = (3).to_bytes(8, "little") + bytes(12)  # 3 elements, then their 12 bytes
    assert data.count(header) == 1
    path = tmp_path / "short-storage.pkl"
    path.write_bytes(data.replace(header, (2 ** 40).to_bytes(8, "little") + bytes(12)))
    with pytest.raises(EDMPickleError, match="storage") as err:
        read_edm_pickle(path)
    assert str(path) in str(err.value)


def _persistent_edm_precond(persistence, state: dict):
    """A persistent EDMPrecond record with any state: what a crafted file can claim."""

    class EDMPrecond:
        pass

    cls = persistence.persistent_class(EDMPrecond, module_src="")
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@pytest.mark.parametrize("kwargs,why", [
    (dict(img_resolution=32, img_channels=3, model_type="SongUNet", model_channels=10 ** 6), "model_channels"),
    (dict(img_resolution=32, img_channels=3, model_type="SongUNet", channel_mult=[2] * 100), "channel_mult"),
    # within every bound, yet 299 GiB of parameters in float32: the file holds none of them
    (dict(img_resolution=64, img_channels=3, model_type="DhariwalUNet", model_channels=1536,
          channel_mult=[4, 4, 4, 4], num_blocks=8), "holds 0 of the"),
    (dict(img_resolution=32, img_channels=3, model_type="Unknown"), "model_type"),
    (dict(img_resolution="32", img_channels=3), "img_resolution"),
    (dict(img_resolution=32, img_channels=3, surprise=1), "surprise"),
])
def test_recorded_kwargs_are_checked_before_a_network_is_built(tmp_path, fakes, kwargs, why):
    state = {"_init_args": (), "_init_kwargs": kwargs, "_parameters": {}, "_buffers": {}, "_modules": {}}
    path = tmp_path / "kwargs-bomb.pkl"
    path.write_bytes(pickle.dumps({"ema": _persistent_edm_precond(fakes.persistence, state)}))
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(EDMPickleError, match=why) as err:
        load_edm_pickle(path)
    assert time.perf_counter() - started < 20 and str(path) in str(err.value) and "\n" not in str(err.value)


SMALL = dict(img_resolution=8, img_channels=3)


@pytest.mark.parametrize("state,why", [
    ({"_init_args": (), "_init_kwargs": [1, 2]}, "init kwargs"),
    ({"_init_args": (), "_init_kwargs": SMALL, "_parameters": [1]}, "_parameters"),
    ({"_init_args": (), "_init_kwargs": SMALL, "_parameters": {"w": 3}}, "not a tensor"),
    ({"_init_args": (), "_init_kwargs": {}}, "img_resolution"),
    ({"_init_args": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), "_init_kwargs": {}}, "init args"),
])
def test_odd_records_are_one_line_refusals(tmp_path, fakes, state, why):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"ema": _persistent_edm_precond(fakes.persistence, state)}))
    with pytest.raises(EDMPickleError, match=why) as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_deeply_nested_modules_are_refused(tmp_path, fakes):
    """A chain of submodules far deeper than any network: refused by name, not a RecursionError."""
    leaf = {"_parameters": {}, "_buffers": {}, "_modules": {}}
    for _ in range(60):
        leaf = {"_parameters": {}, "_buffers": {}, "_modules": {"m": _persistent_edm_precond(fakes.persistence, leaf)}}
    state = {"_init_args": (), "_init_kwargs": SMALL, **leaf}
    path = tmp_path / "deep.pkl"
    path.write_bytes(pickle.dumps({"ema": _persistent_edm_precond(fakes.persistence, state)}))
    with pytest.raises(EDMPickleError, match="nested deeper") as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value)


def test_a_damaged_stream_is_one_line(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"\x80\x04}\x94(\xff\xfe" + os.urandom(64))
    with pytest.raises(EDMPickleError) as err:
        load_edm_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_an_edm_written_cifar10_checkpoint_is_distilled_by_experiments_run(tmp_path, fakes, stores):
    """The headline use (issue 17): EDM's CIFAR-10 teacher as EDM's code writes it (the full 55.7M-parameter
    DDPM++ network, numpy scalars recorded in every block, numpy < 2's spelling as in the published 2022 file)
    given as teacher.path; experiments/run.py distils two iterations from it and evaluates the student."""
    from mlflow import MlflowClient

    from sfd.tracking import default_tracking_uri

    # init kwargs as EDM records them for edm-cifar10-32x32-uncond-vp.pkl (tests/data/edm_keys/cifar10-32x32.txt)
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet", embedding_type="positional",
                  encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                  model_channels=128, channel_mult=[2, 2, 2], dropout=0.13, augment_dim=9)
    torch.manual_seed(0)
    source = EDMPrecond(**kwargs).eval()  # EDM's own initialisation: finite through all 30 blocks
    net = edm_network(kwargs, fakes.persistence, weights_from=source)
    check_edm_facts(net)
    path = write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", net, fakes.persistence,
                            numpy_spelling="numpy.core", resolution=32)
    del net
    remove_fake_modules()
    script = os.path.join(ROOT, "experiments", "run.py")
    spec = importlib.util.spec_from_file_location("experiments_run_cifar", script)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert runner.main([os.path.join(ROOT, "experiments", "cifar10_sfd.yaml"), f"teacher.path={path}",
                        "precision=fp32", "compile=false", "channels_last=false", "optim.batch_size=2",
                        "optim.total_kimg=0.004", "solver.m=0", "log.every=1", "eval.metrics=[teacher_gap]",
                        "eval.num_samples=2", "eval.batch_size=2", "eval.gap_nfe=1", "--experiment", "edm"]) == 0
    client = MlflowClient(default_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("edm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["teacher.path"] == str(path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kimg")] == [0, 1]
    assert np.isfinite(run.data.metrics["teacher_gap_mean"]) and run.data.metrics["nfe"] == 2
