"""A saved student's two files and rebuilding it from them: `student.safetensors` (the weights) and `sampling.json`
(`sfd.runner.students.sampling_info`). The network is built by its teacher's own code (sfd.teachers) and the
weights read with safetensors: nothing is unpickled. Shared by the resolver (sfd.runner.students) and the logged
model's loader (sfd.runner.logged_model)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sfd.teachers import get_teacher

STUDENT_FILE = "student.safetensors"
SAMPLING_FILE = "sampling.json"


def read_sampling_info(folder: Path) -> dict:
    """A located student's `sampling.json`."""
    return json.loads((Path(folder) / SAMPLING_FILE).read_text())


def load_student_folder(folder: Path, device, prompts: str | None = None) -> tuple[torch.nn.Module, dict, tuple]:
    """The student in a folder holding its two files, rebuilt from its teacher's architecture with its weights (eval
    mode, frozen), its `sampling_info` and the shape of one sample. The student's network is a copy of its
    teacher's, so the teacher is read (a real Stable Diffusion teacher again, ~4 GB; `prompts`: its prompts file)."""
    info = read_sampling_info(folder)
    base = get_teacher(info["teacher"], path=info.get("teacher_path"), config=info.get("teacher_config"),
                       prompts=prompts, device=device, smoke=info.get("smoke", False))
    net = base.make_student(step_condition=info.get("step_condition", False))
    net.load_state_dict(load_file(str(Path(folder) / STUDENT_FILE), device=str(device)))
    return net.to(device).eval().requires_grad_(False), info, tuple(base.shape)
