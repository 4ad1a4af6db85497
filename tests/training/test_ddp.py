"""Two gloo processes under torchrun compute what one process computes on the same global batch.

SGD (not Adam, which is nearly blind to a gradient's scale) so that a wrong world-size scaling of
the gradients, or of the proxies' gradients outside DDP, changes the weights and fails the test.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import DIGITS
from training.config import load_config
from training.models import build_model
from training.trainer import load_checkpoint, seed_everything

SETTINGS = [
    *DIGITS,
    "norm=group",
    "epochs=1",
    "steps_per_epoch=6",
    "augment=true",
    "optimizer=sgd",
    "lr=0.05",
    "proxy_lr=0.5",
]


def _fit(out, settings: list[str], launcher: list[str]) -> dict:
    args = [a for s in settings for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            *launcher,
            "-m",
            "training.cli",
            "fit",
            "-o",
            str(out),
            "--no-evaluate",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return load_checkpoint(out)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["multi_similarity", "proxy_anchor"])
def test_ddp_two_cpu_processes_match_single_process(tmp_path, loss: str) -> None:
    settings = [*SETTINGS, f"loss={loss}"]
    a = _fit(tmp_path / "single", settings, [])
    b = _fit(
        tmp_path / "ddp",
        settings,
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )
    seed_everything(0)
    init = build_model(load_config(None, settings), in_channels=1).state_dict()
    moved = max(float((a["model"][k] - v).abs().max()) for k, v in init.items())
    assert moved > 1e-2  # trained, so equal weights are not just two untouched inits
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    for k, v in a["loss"].items():  # the proxies of proxy_anchor
        torch.testing.assert_close(b["loss"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    assert b["history"][0]["loss"] == pytest.approx(a["history"][0]["loss"], rel=1e-5)
