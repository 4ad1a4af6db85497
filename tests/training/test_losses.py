import pytest
import torch
from pytorch_metric_learning import losses as pml

from tcm import TCMLoss
from training.config import TrainConfig
from training.losses import build_loss
from training.models import build_model
from training.optimisation import build_optimiser


def _batch():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    return emb, torch.arange(6).repeat_interleave(4)


def test_base_plus_tcm_with_the_configured_margins() -> None:
    emb, y = _batch()
    cfg = TrainConfig(dataset="digits", embedding_dim=16, m_plus=0.6, m_minus=0.1, lambda_minus=2.0)
    loss = build_loss(cfg, num_classes=6)
    expected_base = pml.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(emb, y)
    expected_tcm = TCMLoss(m_plus=0.6, m_minus=0.1, lambda_minus=2.0)(emb, y)
    assert float(expected_tcm) > 0
    assert float(loss(emb, y)) == pytest.approx(float(expected_base + expected_tcm), rel=1e-6)
    assert loss.last["tcm"] == pytest.approx(float(expected_tcm), rel=1e-6)
    without = build_loss(cfg.replace(tcm=False), num_classes=6)
    assert float(without(emb, y)) == pytest.approx(float(expected_base), rel=1e-6)
    assert "tcm" not in without.last


@pytest.mark.parametrize("name", ["multi_similarity", "contrastive", "proxy_anchor", "arcface"])
def test_proxies_get_their_own_larger_learning_rate(name: str) -> None:
    cfg = TrainConfig(
        dataset="digits", loss=name, embedding_dim=16, width=4, lr=1e-3, proxy_lr=5e-2
    )
    loss = build_loss(cfg, num_classes=6)
    opt = build_optimiser(build_model(cfg, 1), loss, cfg)
    groups = opt.param_groups
    if name in ("proxy_anchor", "arcface"):
        assert len(groups) == 2
        assert groups[1]["lr"] == 5e-2 and groups[1]["weight_decay"] == 0.0
        assert groups[1]["params"][0].shape[0 if name == "proxy_anchor" else 1] == 6
    else:
        assert len(groups) == 1
    assert groups[0]["lr"] == 1e-3
    emb, y = _batch()
    value = loss(emb.requires_grad_(), y)
    value.backward()
    assert torch.isfinite(value) and emb.grad is not None and emb.grad.abs().sum() > 0
