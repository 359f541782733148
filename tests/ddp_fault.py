"""A torchrun target for the DDP tests: `experiments/run.py` with a fault injected on one rank.

    SFD_TEST_FAULT=raise|nan_loss SFD_TEST_FAULT_RANK=1 torchrun ... tests/ddp_fault.py <experiments/run.py args>

`raise`: that rank's third training iteration raises ZeroDivisionError (an error the other ranks cannot see);
`nan_loss`: that rank's losses turn NaN from its second iteration (only the all-reduced check can stop all ranks).
"""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sfd, as experiments/run.py does

import torch  # noqa: E402

import sfd.distill  # noqa: E402

RUN_SCRIPT = ROOT / "experiments" / "run.py"


def inject(fault: str) -> None:
    original = sfd.distill.Distiller.sfd_iteration
    calls = []

    def faulty(self, num_steps):
        calls.append(num_steps)
        if fault == "raise" and len(calls) == 3:
            raise ZeroDivisionError("injected on one rank on purpose")
        losses, *rest = original(self, num_steps)
        if fault == "nan_loss" and len(calls) >= 2:
            losses = losses * torch.nan
        return (losses, *rest)

    sfd.distill.Distiller.sfd_iteration = faulty


if int(os.environ["RANK"]) == int(os.environ["SFD_TEST_FAULT_RANK"]):
    inject(os.environ["SFD_TEST_FAULT"])
sys.argv[0] = str(RUN_SCRIPT)
runpy.run_path(str(RUN_SCRIPT), run_name="__main__")
