import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from tcm import map_at_r, recall_at_k, retrieval_metrics
from tests.tcm.reference import clustered, cosine_matrix

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _bruteforce(x: np.ndarray, y: list, ks: tuple[int, ...]) -> dict[str, float]:
    sim = cosine_matrix(x)
    yy = np.asarray(y)
    hits = {k: 0 for k in ks}
    aps, nq = 0.0, 0
    for i in range(len(y)):
        r = int((yy == yy[i]).sum()) - 1
        if r == 0:
            continue
        nq += 1
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        rel = [yy[j] == yy[i] for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
        ap, seen = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                seen += 1
                ap += seen / (pos + 1)
        aps += ap / r
    out = {f"recall_at_{k}": hits[k] / nq for k in ks}
    out["map_at_r"] = aps / nq
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_bruteforce(device: str, seed: int) -> None:
    x, y = clustered(seed, num_classes=9, per_class=5, spread=1.5, sizes=[5] * 8 + [1])
    got = retrieval_metrics(torch.as_tensor(x, device=device), y, ks=(1, 3), block_size=7)
    ref = _bruteforce(x, y, (1, 3))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12)
    assert got["num_queries"] == 40  # the singleton is not a query
    assert 0 < got["recall_at_1"] < 1


def test_matches_pytorch_metric_learning() -> None:
    x, y = clustered(4, num_classes=12, per_class=8, spread=1.2)
    x32 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        avg_of_avgs=False,
        k="max_bin_count",
    )
    theirs = calc.get_accuracy(torch.as_tensor(x32), torch.as_tensor(y))
    ours = retrieval_metrics(x32, y, ks=(1,))
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_shortcuts_and_validation() -> None:
    x, y = clustered(1)
    full = retrieval_metrics(x, y, ks=(2,))
    assert recall_at_k(x, y, k=2) == full["recall_at_2"]
    assert map_at_r(x, y) == full["map_at_r"]
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, y, ks=(0,))
    with pytest.raises(ValueError, match="undefined"):
        retrieval_metrics(x[:3], [0, 1, 2])
