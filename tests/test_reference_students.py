"""Students the SFD reference implementation saved (network-snapshot-NNNNNN.pkl), written as its training loop
writes them (tests/checkpoint_writers.py), read safely into our EDMPrecond with their sampling settings."""
from __future__ import annotations

import pickle

import pytest
import torch

from checkpoint_writers import (
    REFERENCE_TRAINING_KWARGS, adm_kwargs, outputs, pickle_globals, randomize, reference_network,
    remove_fake_modules, song_kwargs, write_reference_snapshot,
)
from sfd.networks.edm import EDMPrecond, is_step_key
from sfd.sampling import GridSpec
from sfd.teachers.edm_pickle import EDMPickleError
from sfd.teachers.reference import read_reference_student


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(tmp_path, fakes, kwargs, *, sfdv=False, persistent=False, protocol=pickle.DEFAULT_PROTOCOL,
             name="network-snapshot-000200.pkl", **training):
    """(path, our step-conditioned source network) for a reference student of the tiny architecture `kwargs`."""
    source = randomize(EDMPrecond(**kwargs, step_condition=True), seed=5)
    tk = {**REFERENCE_TRAINING_KWARGS, "use_step_condition": sfdv, **training}
    net = reference_network(kwargs, fakes.persistence, source, tk, fakes.dnnlib_util, persistent=persistent)
    return write_reference_snapshot(tmp_path / name, net, protocol=protocol), source


def plain_outputs(source, kwargs):
    """What a plain reference student computes: its network without the (unused) step layers."""
    plain = EDMPrecond(**kwargs)
    plain.load_state_dict({k: v for k, v in source.state_dict().items() if not is_step_key(k)})
    return outputs(plain.eval(), kwargs)


@pytest.mark.parametrize("fmt", ["plain-4", "plain-2", "persistent"])
@pytest.mark.parametrize("sfdv", [False, True], ids=["sfd", "sfd-v"])
@pytest.mark.parametrize("make", [song_kwargs, adm_kwargs], ids=["song", "adm"])
def test_reference_snapshots_load_with_their_sampling_settings(tmp_path, fakes, make, sfdv, fmt):
    kwargs = make()
    path, source = snapshot(tmp_path, fakes, kwargs, sfdv=sfdv, persistent=fmt == "persistent",
                            protocol=2 if fmt == "plain-2" else pickle.DEFAULT_PROTOCOL)
    names = pickle_globals(path.read_bytes())
    if fmt != "persistent":  # what the reference's loop writes: its classes by name, numpy scalars, EasyDict
        assert {"models.networks_edm.EDMPrecond", "models.networks_edm.UNetBlock", "dnnlib.util.EasyDict"} <= names
        assert "numpy._core.multiarray.scalar" in names and not any(n.startswith("torch_utils") for n in names)
    remove_fake_modules()
    student = read_reference_student(path, architecture=kwargs)
    assert student.teacher == "cifar10-uncond" and student.step_condition is sfdv and student.nfe == 2
    assert student.grid == GridSpec(num_steps=4, afs=True, schedule="polynomial", t_min=0.006, t_max=80.0, rho=7.0)
    assert student.training_kwargs["sampler_tea"] == "dpmpp" and student.teacher_solver == "dpmpp3m"
    net = student.net
    assert not net.training and net.step_condition is sfdv and any(map(is_step_key, net.state_dict())) is sfdv
    assert (net.sigma_min, net.sigma_max, net.use_fp16, net.model.enc["8x8_block0"].dropout) == (
        0.006, 80.0, True, kwargs["dropout"])
    if sfdv:
        for step in (4, 7):
            x = torch.randn(2, 3, 8, 8)
            with torch.no_grad():
                torch.testing.assert_close(net(x, 1.5, step=step), source.eval()(x, 1.5, step=step), rtol=0, atol=0)
    else:
        torch.testing.assert_close(outputs(net, kwargs), plain_outputs(source, kwargs), rtol=0, atol=0)


def test_a_second_stage_snapshot_says_so(tmp_path, fakes):
    kwargs = song_kwargs()
    path, _ = snapshot(tmp_path, fakes, kwargs, num_steps=3, M=2, is_second_stage=True)
    student = read_reference_student(path, architecture=kwargs)
    assert student.nfe == 1 and "second stage" in student.describe()


def _refused(path, why, **read):
    with pytest.raises(EDMPickleError, match=why) as err:
        read_reference_student(path, **read)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("training,why", [
    (dict(model_source="ldm"), "only students of EDM networks"),
    (dict(schedule_type="discrete"), "schedule_type='discrete'"),
    (dict(num_steps="4"), "num_steps='4'"),
    (dict(afs=True, num_steps=2), "unusable grid"),
    (dict(sigma_min=90.0), "unusable grid"),
    (dict(dataset_name="mnist"), "neither one of the reference's EDM datasets"),
])
def test_unusable_training_kwargs_are_refused(tmp_path, fakes, training, why):
    kwargs = song_kwargs()
    path, _ = snapshot(tmp_path, fakes, kwargs, **training)
    _refused(path, why, architecture=kwargs)


def test_a_snapshot_must_fit_its_architecture(tmp_path, fakes):
    kwargs = song_kwargs()
    path, _ = snapshot(tmp_path, fakes, kwargs)
    _refused(path, "holds 0 of|missing|shapes differ")  # no architecture given: the reference's CIFAR-10 network
    _refused(path, "shapes differ", architecture=song_kwargs(model_channels=32))
    persistent, _ = snapshot(tmp_path, fakes, kwargs, persistent=True, name="persistent.pkl")
    _refused(persistent, r"not the teacher's: model_channels=16 \(expected 32\)",
             architecture=song_kwargs(model_channels=32))


def test_a_step_conditioned_student_needs_its_step_layers(tmp_path, fakes):
    kwargs = song_kwargs()
    source = randomize(EDMPrecond(**kwargs, step_condition=True), seed=5)
    tk = {**REFERENCE_TRAINING_KWARGS, "use_step_condition": True}
    net = reference_network(kwargs, fakes.persistence, source, tk, fakes.dnnlib_util)
    for block in (m for m in net.modules() if type(m).__name__ == "UNetBlock"):
        del block._modules["affine_step"]
    path = write_reference_snapshot(tmp_path / "no-steps.pkl", net)
    _refused(path, "missing .*affine_step", architecture=kwargs)


def test_a_snapshot_without_training_kwargs_is_not_a_reference_student(tmp_path, fakes):
    kwargs = song_kwargs()
    source = randomize(EDMPrecond(**kwargs, step_condition=True))
    net = reference_network(kwargs, fakes.persistence, source, REFERENCE_TRAINING_KWARGS, fakes.dnnlib_util)
    del net.__dict__["training_kwargs"]
    path = write_reference_snapshot(tmp_path / "bare.pkl", net)
    _refused(path, "no training_kwargs", architecture=kwargs)
    path.write_bytes(pickle.dumps({"ema": 1}))
    _refused(path, "no entry 'model'", architecture=kwargs)
