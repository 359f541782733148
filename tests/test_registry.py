import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sfd.assets import FID_REFS
from sfd.networks.edm import EDM_CONFIGS, is_step_key
from sfd.teachers import TEACHERS, TeacherError, get_teacher, teacher_spec
from sfd.teachers.registry import load_cifar10_train


def _add(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _fake_cifar(path, batch=lambda i: {b"data": np.full((2, 3072), i, np.uint8), b"labels": [i, i]}):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            _add(tar, f"cifar-10-batches-py/data_batch_{i}", pickle.dumps(batch(i), protocol=2))


def test_cifar10_batches_load_as_images_in_range(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar(path)
    x, y = load_cifar10_train(path)
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert x[0, 0, 0, 0].item() == pytest.approx(1 / 127.5 - 1)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


def test_cifar10_batch_that_calls_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar(path, batch=lambda i: {b"data": _Evil(), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_cifar10_train(path)
    assert not (tmp_path / "MARKER").exists()


def test_step_conditioned_student_loads_every_teacher_weight():
    teacher = get_teacher("digits")
    student = teacher.make_student(step_condition=True)
    assert student.training and student.step_condition
    for key, value in teacher.net.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    assert all(map(is_step_key, set(student.state_dict()) - set(teacher.net.state_dict())))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        # the reference's random step layers change the output from the start; zero ones do not
        assert not torch.allclose(student.eval()(x, 2.0, step=5), teacher.net(x, 2.0), atol=1e-4)
        zero = teacher.make_student(step_condition=True, step_init="zero").eval()
        torch.testing.assert_close(zero(x, 2.0, step=5), teacher.net(x, 2.0))


@pytest.mark.parametrize("name", ["digits", "digits-cond", "gmm-8", "gmm-img-4", "cifar10-uncond"])
def test_a_teachers_spec_says_what_loading_it_gives(name):
    """Configs are checked against the spec alone; it must agree with the loaded teacher (an EDM teacher in
    smoke mode: a random network of its architecture, no checkpoint needed)."""
    spec = teacher_spec(name)
    teacher = get_teacher(name, smoke=True)
    assert (spec.dataset, spec.default_metric, spec.num_classes, spec.description) == (
        teacher.dataset, teacher.default_metric, teacher.num_classes, teacher.description)
    assert spec.has_training_images == (teacher.data_fn is not None)


def test_edm_specs_take_their_classes_and_checkpoints_from_the_architecture_table():
    for name in ("cifar10-uncond", "ffhq64-uncond", "afhqv2-64-uncond", "imagenet64-cond"):
        spec = teacher_spec(name)
        assert spec.source == "checkpoint" and spec.checkpoint in EDM_CONFIGS and spec.default_metric == "fid"
        assert spec.num_classes == EDM_CONFIGS[spec.checkpoint]["label_dim"]
        assert spec.dataset in FID_REFS  # FID can score every checkpoint teacher
    assert teacher_spec("imagenet64-cond").num_classes == 1000
    assert [n for n in TEACHERS if teacher_spec(n.replace("<k>", "3")).has_training_images] == [
        "digits", "digits-cond", "gmm-<k>", "gmm-img-<k>", "cifar10-uncond"]


def test_an_unknown_teacher_is_a_teacher_error_naming_the_choices():
    with pytest.raises(TeacherError, match=r"unknown teacher 'gmm-x'; choose one of \[.*'digits'"):
        teacher_spec("gmm-x")
