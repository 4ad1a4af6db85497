import pytest
import torch

from tests.training.conftest import DIGITS
from training.config import load_config
from training.trainer import fit, load_checkpoint


def test_resume_equals_uninterrupted(tmp_path) -> None:
    cfg = load_config(None, [*DIGITS, "augment=true", "epochs=3", "steps_per_epoch=8"])
    fit(cfg, tmp_path / "straight", progress=False)
    fit(cfg, tmp_path / "split", progress=False, stop_after_epoch=1)  # "interrupted"
    assert load_checkpoint(tmp_path / "split")["epoch"] == 1
    fit(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "split")
    assert b["epoch"] == 3
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert [h["loss"] for h in a["history"]] == pytest.approx(
        [h["loss"] for h in b["history"]], rel=1e-5
    )


def test_resume_from_another_config_is_refused(tmp_path) -> None:
    cfg = load_config(None, [*DIGITS, "epochs=1", "steps_per_epoch=2"])
    fit(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"another config .*loss"):
        fit(cfg.replace(loss="contrastive"), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"no checkpoint\.pt"):
        fit(cfg, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("loss", ["contrastive", "proxy_anchor", "arcface"])
def test_each_base_loss_trains_with_and_without_tcm(tmp_path, loss: str) -> None:
    for tcm in (True, False):
        cfg = load_config(
            None, [*DIGITS, f"loss={loss}", f"tcm={tcm}", "epochs=1", "steps_per_epoch=4"]
        )
        out = fit(cfg, tmp_path / f"{loss}-{tcm}", progress=False)
        assert torch.isfinite(torch.tensor(out["history"][0]["loss"]))
        saved = load_checkpoint(tmp_path / f"{loss}-{tcm}")
        if loss in ("proxy_anchor", "arcface"):
            # proxies are trained (their own optimiser group) and checkpointed
            assert len(saved["optimiser"]["param_groups"]) == 2 and saved["loss"]
