import pytest
import torch
from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from tcm import TCMLoss

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

ORACLE_EMB = [[0.0, 1.0], [0.43, 0.9], [1.0, 0.0], [0.5, 0.5]]
ORACLE_LABELS = [0, 0, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_spec_oracle(device: str, dtype: torch.dtype) -> None:
    emb = torch.tensor(ORACLE_EMB, dtype=dtype, device=device)
    labels = torch.tensor(ORACLE_LABELS, device=device)
    loss = TCMLoss()(emb, labels)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 5e-3
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.517876, abs=tol)


def test_oracle_terms_by_hand() -> None:
    emb = torch.tensor(ORACLE_EMB)
    labels = torch.tensor(ORACLE_LABELS)
    # positive pairs: (0,1) cos = 0.9/|(0.43,0.9)| = 0.90231 > 0.9 (easy); (2,3) cos = 0.70711
    pos = 0.9 - 0.5**0.5
    # negative pairs >= 0.5: (0,3) = 0.70711, (1,3) = 0.665/(0.99745*0.70711) = 0.94285
    n13 = (0.43 * 0.5 + 0.9 * 0.5) / ((0.43**2 + 0.81) ** 0.5 * 0.5**0.5)
    neg = ((0.5**0.5 - 0.5) + (n13 - 0.5)) / 2
    assert TCMLoss(lambda_minus=0.0)(emb, labels).item() == pytest.approx(pos, abs=1e-6)
    assert TCMLoss(lambda_plus=0.0)(emb, labels).item() == pytest.approx(neg, abs=1e-6)
    assert pos == pytest.approx(0.192893, abs=1e-6)
    assert neg == pytest.approx(0.324983, abs=1e-6)
    weighted = TCMLoss(lambda_plus=2.0, lambda_minus=0.5)(emb, labels).item()
    assert weighted == pytest.approx(2 * pos + 0.5 * neg, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.6, 0.2), (0.95, 0.8)])
def test_equals_pml_without_reference_set(seed: int, margins: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 16, generator=g)
    labels = torch.randint(0, 8, (64,), generator=g)
    ours = TCMLoss(m_plus=margins[0], m_minus=margins[1], lambda_plus=0.7, lambda_minus=1.3)
    pml = ThresholdConsistentMarginLoss(
        margin_plus=margins[0], margin_minus=margins[1], lambda_plus=0.7, lambda_minus=1.3
    )
    assert ours(emb, labels).item() == pytest.approx(pml(emb, labels).item(), abs=1e-6)


def test_equals_pml_with_miner_indices() -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(48, 8, generator=g)
    labels = torch.randint(0, 6, (48,), generator=g)
    pairs = MultiSimilarityMiner(epsilon=0.2)(emb, labels)
    ours = TCMLoss()(emb, labels, indices_tuple=pairs).item()
    theirs = ThresholdConsistentMarginLoss()(emb, labels, indices_tuple=pairs).item()
    assert ours == pytest.approx(theirs, abs=1e-6)


def _bruteforce_ref(emb, labels, ref, ref_labels, m_plus=0.9, m_minus=0.5) -> float:
    q = torch.nn.functional.normalize(emb.double(), dim=1)
    r = torch.nn.functional.normalize(ref.double(), dim=1)
    pos, neg = [], []
    for i in range(len(q)):
        for j in range(len(r)):
            s = float(q[i] @ r[j])
            if labels[i] == ref_labels[j]:
                if s <= m_plus:
                    pos.append(m_plus - s)
            elif s >= m_minus:
                neg.append(s - m_minus)
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return mean(pos) + mean(neg)


@pytest.mark.parametrize("seed", range(3))
def test_reference_set_bruteforce(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 6, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    ref = torch.randn(20, 6, generator=g)
    ref_labels = torch.randint(0, 3, (20,), generator=g)
    got = TCMLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels).item()
    assert got == pytest.approx(_bruteforce_ref(emb, labels, ref, ref_labels), abs=1e-6)


def test_reference_set_differs_from_pml_bug() -> None:
    # PML 2.7-2.9 indexes the query tensor with reference indices; with queries that differ from
    # the references the two disagree, and ours matches the brute force above.
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(10, 4, generator=g)
    labels = torch.randint(0, 2, (10,), generator=g)
    ref = torch.randn(10, 4, generator=g)
    ref_labels = torch.randint(0, 2, (10,), generator=g)
    ours = TCMLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels).item()
    assert ours == pytest.approx(_bruteforce_ref(emb, labels, ref, ref_labels), abs=1e-6)
    import pytorch_metric_learning

    if pytorch_metric_learning.__version__.startswith(("2.7", "2.8", "2.9")):
        theirs = ThresholdConsistentMarginLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
        assert abs(theirs.item() - ours) > 1e-3


def test_gradients_flow_only_through_hard_pairs() -> None:
    # rows 0,1 form an easy positive pair (cos 0.99) and are far from class 1 (easy negatives);
    # rows 2,3 are a hard positive pair (cos 0). Only rows 2 and 3 may receive gradient.
    emb = torch.tensor(
        [[1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True
    )
    labels = torch.tensor([0, 0, 1, 1])
    loss = TCMLoss(m_plus=0.9, m_minus=0.5)(emb, labels)
    loss.backward()
    assert loss.item() == pytest.approx(0.9, abs=1e-6)  # pos term only: 0.9 - 0
    assert torch.all(emb.grad[:2] == 0)
    assert emb.grad[2:].abs().sum() > 0


def test_no_hard_pair_gives_zero_with_grad() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = TCMLoss()(emb, labels)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(emb.grad == 0)


def test_usable_beside_pml_base_loss() -> None:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (32,), generator=g)
    base, tcm = MultiSimilarityLoss(), TCMLoss()
    total = base(emb, labels) + tcm(emb, labels)
    total.backward()
    assert torch.isfinite(total) and emb.grad is not None


@pytest.mark.parametrize(
    "kwargs", [{"m_plus": 1.5}, {"m_minus": -2.0}, {"lambda_plus": -1.0}, {"lambda_minus": -0.1}]
)
def test_bad_margins_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TCMLoss(**kwargs)


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        TCMLoss()(torch.randn(4), torch.arange(4))
    with pytest.raises(ValueError, match="one label per embedding"):
        TCMLoss()(torch.randn(4, 2), torch.arange(3))
    with pytest.raises(ValueError, match="together"):
        TCMLoss()(torch.randn(4, 2), torch.arange(4), ref_emb=torch.randn(3, 2))


def test_ties_at_the_margins_are_hard_pairs() -> None:
    """SPEC: hard pairs are ``s <= m_plus`` and ``s >= m_minus`` (inclusive). A pair exactly at
    the margin adds 0 to its term's sum but 1 to its count, so the mean halves here; excluding
    ties (``<``/``>``) would give 1.0 instead."""
    # one class: positive pairs at s = 0 (x0-x1, x1-x2; exactly, with these unit vectors) and
    # s = -1 (x0-x2); m_plus = 0 puts four ordered pairs on the tie, two below it
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    loss = TCMLoss(m_plus=0.0, m_minus=0.5)(pos, torch.tensor([0, 0, 0]))
    assert loss.item() == pytest.approx(1.0 / 3.0, abs=1e-7)
    # negatives at s = 0 (x0-x1) and s = 1 (x0-x2), m_minus = 0: two on the tie, two above
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss = TCMLoss(m_plus=-1.0, m_minus=0.0)(neg, torch.tensor([0, 1, 1]))
    assert loss.item() == pytest.approx(0.5, abs=1e-7)
