import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from sfd.teachers import get_teacher
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
    from sfd.networks.edm import is_step_key

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
