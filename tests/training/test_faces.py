"""LFW verification: the official pair files parsed exactly, and the report on real LFW."""

import json

import numpy as np
import pytest

from tests.training.conftest import DATA_DIR
from training.config import load_config
from training.faces import parse_pairs, verification_report
from training.pipeline import train_evaluate_export

TWO_FOLDS = """2\t1
Ann\t1\t2
Ann\t1\tBob\t3
Cid\t2\t4
Dee\t1\tEve\t1
"""


def test_parse_pairs_folds_and_sides() -> None:
    p = parse_pairs(TWO_FOLDS)
    assert p.a == [("Ann", 1), ("Ann", 1), ("Cid", 2), ("Dee", 1)]
    assert p.b == [("Ann", 2), ("Bob", 3), ("Cid", 4), ("Eve", 1)]
    assert p.same.tolist() == [True, False, True, False]
    assert p.folds.tolist() == [0, 0, 1, 1]
    one = parse_pairs("1\nAnn\t1\t2\nAnn\t1\tBob\t3\n")
    assert one.folds.tolist() == [0, 0]


@pytest.mark.parametrize(
    "text, match",
    [
        ("x\n", "not an LFW pairs file"),
        ("2\nAnn\t1\t2\n", "expected 4 pair lines"),
        ("1\nAnn\t1\tBob\t3\nAnn\t1\t2\n", "matched then"),
        ("1\nAnn\t1\nAnn\t1\tBob\t3\n", "3 or 4"),
    ],
)
def test_malformed_pair_files_are_explained(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_pairs(text)


def test_report_counts_training_identities_and_folds() -> None:
    p = parse_pairs(TWO_FOLDS)
    scores = np.array([0.9, 0.2, 0.8, 0.3])
    r = verification_report(scores, p, tau=0.5, train_people={"Ann"})
    assert r["pairs_with_training_identity"] == 2
    assert r["disjoint_pairs"]["pairs"] == 2 and r["disjoint_pairs"]["best_accuracy"] == 1.0
    assert r["at_global_tau"]["accuracy"] == 1.0
    assert r["kfold_accuracy"]["fold_accuracies"] == [1.0, 1.0]


@pytest.mark.slow
def test_lfw_run_reports_verification(tmp_path, data_dir) -> None:
    cfg = load_config(
        None,
        [
            f"data_dir={DATA_DIR}",
            "dataset=lfw",
            "image_size=32",
            "width=8",
            "embedding_dim=32",
            "epochs=1",
            "steps_per_epoch=5",
            "max_train_classes=300",
            "max_test_classes=200",
            "batch_size=32",
        ],
    )
    train_evaluate_export(cfg, tmp_path / "run", None, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    dev, view2 = report["verification"]["pairsDevTest"], report["verification"]["pairs"]
    assert (dev["genuine"], dev["impostor"]) == (500, 500)
    assert (view2["genuine"], view2["impostor"]) == (3000, 3000)
    # View 1 is identity-disjoint from the training people; View 2 is not
    assert dev["pairs_with_training_identity"] == 0
    assert view2["pairs_with_training_identity"] > 0
    assert len(view2["kfold_accuracy"]["fold_accuracies"]) == 10
    for far, r in dev["tar_at_far"].items():
        assert r["far"] <= float(far) and 0.0 <= r["tar"] <= 1.0
    assert (tmp_path / "run" / "det.png").stat().st_size > 0
