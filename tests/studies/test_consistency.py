"""The consistency study's pieces at toy size: the score-matrix evaluation against tcm's own,
the joint bootstrap on hand-made cases, the rule, TCM's logged parts against TCMLoss, and the
whole study end to end on synthetic features (resumable; the aggregation reads only files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from studies import consistency as cs
from tcm import TCMLoss, consistency_report
from tcm.calibration import calibrate_threshold
from training.config import load_config

TINY = [
    "dataset=cub",
    "arch=efficientnet_lite0",
    "freeze_backbone=true",
    "embedding_dim=8",
    "batch_size=16",
    "m_per_class=4",
    "lr=1e-2",
    "epochs=1",
    "steps_per_epoch=10",
]


def _clusters(classes: list[int], per_class: int, dim: int, seed: int) -> cs.FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(classes) + 1, dim, generator=g)
    # class-dependent spread, so per-class error rates differ
    x = torch.cat(
        [
            centres[c] + (0.3 + 0.1 * (c % 4)) * torch.randn(per_class, dim, generator=g)
            for c in classes
        ]
    )
    y = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.int64)
    return cs.FeatureSet(x.float(), y)


def test_score_curves_match_tcm_on_cosine_scores() -> None:
    data = _clusters(list(range(6)), 9, 5, seed=1)
    emb = torch.nn.functional.normalize(data.x, dim=1)
    config = load_config(None, TINY)
    c = cs.score_curves((emb @ emb.T).double().numpy(), data.y.numpy(), config)
    cal = calibrate_threshold(emb, data.y, target_far=config.target_far)
    ref = consistency_report(emb, data.y, tau=cal.tau)
    assert c["tau"] == pytest.approx(cal.tau)
    assert c["opis"] == pytest.approx(ref.opis, abs=1e-12)
    assert c["eps_opis"] == pytest.approx(ref.eps_opis, abs=1e-12)
    assert (c["tau_lo"], c["tau_hi"]) == pytest.approx((ref.tau_lo, ref.tau_hi))
    np.testing.assert_allclose(c["far"], cal.per_class_far)
    np.testing.assert_allclose(c["frr"], cal.per_class_frr)


def _const(values: list[float]) -> dict[str, np.ndarray]:
    return {"v": np.asarray(values, dtype=float)}


def _mean_metric(run: dict, idx: np.ndarray) -> dict[str, float]:
    return {"v": float(run["v"][idx].mean())}


def test_joint_bootstrap_hand_made_cases() -> None:
    # twice the control on every class and seed: every draw says +100%
    d = cs.joint_bootstrap(
        [_const([2, 4, 6]), _const([4, 2, 8])],
        [_const([1, 2, 3]), _const([2, 1, 4])],
        _mean_metric,
        3,
        draws=200,
    )["v"]
    assert d["estimate"] == pytest.approx(100) and d["ci95"] == pytest.approx([100, 100])
    # one seed, two classes: control 1 and 1, treated 0 and 2. A draw holds both classes
    # (probability 1/2: 0%), class 0 twice (1/4: -100%) or class 1 twice (1/4: +100%)
    d = cs.joint_bootstrap([_const([0, 2])], [_const([1, 1])], _mean_metric, 2, draws=4000)["v"]
    assert d["estimate"] == pytest.approx(0) and d["ci95"] == pytest.approx([-100, 100])
    # two seeds, one class: the treated run is +0% on seed 0 and +200% on seed 1; seeds are
    # resampled: {0,0} 0%, {1,1} +200%, mixed +100%
    d = cs.joint_bootstrap(
        [_const([1]), _const([3])], [_const([1]), _const([1])], _mean_metric, 1, draws=4000
    )["v"]
    assert d["estimate"] == pytest.approx(100) and d["ci95"] == pytest.approx([0, 200])
    # points, not relative, for point keys
    d = cs.joint_bootstrap(
        [_const([0.5])], [_const([0.25])], _mean_metric, 1, draws=10, point_keys=("v",)
    )["v"]
    assert d["estimate"] == pytest.approx(25) and d["unit"] == "points"
    with pytest.raises(ValueError, match="paired"):
        cs.joint_bootstrap([_const([1])], [], _mean_metric, 1, draws=10)


def _comparison(opis: float, hi: float, r1: float) -> dict:
    d = {k: {"estimate": opis, "ci95": [opis - 5, hi]} for k in cs.RULE_KEYS}
    d["recall_at_1"] = {"estimate": r1, "ci95": [r1 - 1, r1 + 1]}
    return d


def test_verdict_is_the_preregistered_rule() -> None:
    assert cs.verdict(_comparison(-25, -1, -0.4))["helps"] is True
    assert cs.verdict(_comparison(-19, -1, 0.0))["helps"] is False  # < 20% lower
    assert cs.verdict(_comparison(-25, +1, 0.0))["helps"] is False  # interval covers 0
    assert cs.verdict(_comparison(-25, -1, -0.6))["helps"] is False  # R@1 cost > 0.5 pt
    d = _comparison(-25, -1, 0.0)
    d["far_sd"] = {"estimate": -10.0, "ci95": [-15.0, -5.0]}
    v = cs.verdict(d)
    assert v["helps"] is False and v["checks"]["far_sd"] is False and v["checks"]["opis"]


def test_margin_stats_parts_make_tcm_loss() -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 4, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    st = cs.margin_stats(emb, labels, 0.6, 0.1)
    ref = TCMLoss(m_plus=0.6, m_minus=0.1, lambda_plus=0.7, lambda_minus=2.0)(emb, labels)
    assert 0.7 * st["tcm_pos_part"] + 2.0 * st["tcm_neg_part"] == pytest.approx(float(ref))
    e = torch.nn.functional.normalize(emb, dim=1)
    s = e @ e.T
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(12, dtype=torch.bool)
    assert st["frac_neg_violating"] == pytest.approx(float((s[~same] >= 0.1).float().mean()))
    assert st["frac_pos_violating"] == pytest.approx(float((s[same & off] <= 0.6).float().mean()))


def test_study_end_to_end_resumes_and_aggregates_from_files(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    train_all = _clusters(list(range(12)), 8, 16, seed=0)
    val_pick = torch.isin(train_all.y, torch.tensor([0, 1, 2, 3]))
    tr_val = cs.FeatureSet(train_all.x[~val_pick], train_all.y[~val_pick])
    val = cs.FeatureSet(train_all.x[val_pick], train_all.y[val_pick])
    test = _clusters(list(range(12, 18)), 8, 16, seed=5)
    data = ((tr_val, val), (train_all, test))
    out = tmp_path / "runs"
    losses = {"ProxyAnchor": ["loss=proxy_anchor"]}
    ran = cs.run_study(out, losses, TINY, [0, 1], data, log_every=5)
    assert len(ran) == 2 * len(cs.RUN_ARMS)
    v = json.loads((out / "ProxyAnchor" / "validation.json").read_text())
    assert len(v["rows"]) == 1 + 2 * len(cs.LAMBDAS)
    assert v["chosen"]["m_plus"] == pytest.approx(min(1.0, v["tau_far_1e-2"] + 0.1), abs=1e-4)
    assert v["chosen"]["m_minus"] in (v["tau_far_1e-1"], v["tau_far_1e-2"])
    meta = json.loads(cs.run_path(out, "ProxyAnchor", "base_5x", 1).read_text())
    assert meta["steps"] == 5 * 10 and len(meta["log"]) == 10
    assert {"frac_pos_violating", "frac_neg_violating", "tcm_pos_part", "tcm_neg_part"} <= set(
        meta["log"][0]
    )
    scaled = json.loads(cs.run_path(out, "ProxyAnchor", "base_scaled", 0).read_text())
    assert scaled["loss_scale"] == pytest.approx(1 + v["chosen"]["lambda"])
    faster = json.loads(cs.run_path(out, "ProxyAnchor", "base_lr", 0).read_text())["config"]
    assert faster["lr"] == pytest.approx(1e-2 * (1 + v["chosen"]["lambda"]))
    tcm_run = json.loads(cs.run_path(out, "ProxyAnchor", "tcm", 0).read_text())
    assert tcm_run["config"]["tcm"] and tcm_run["log"][0]["tcm_term"] > 0

    # resumable: a second call trains nothing and rewrites nothing
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert cs.run_study(out, losses, TINY, [0, 1], data, log_every=5) == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamp

    # the aggregation needs only the files: a copy elsewhere gives the same numbers, and those
    # are the runs' own (means over the seeds)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = cs.aggregate(copy, draws=50)["ProxyAnchor"]
    assert summary["seeds"] == [0, 1]
    for arm in cs.ARMS:
        for sc in cs.SCORINGS:
            own = [
                json.loads(cs.run_path(out, "ProxyAnchor", arm, s).read_text())["metrics"][sc]
                for s in (0, 1)
            ]
            row = summary["table"][f"{arm}/{sc}"]
            for k in ("opis", "frr_sd", "far_sd", "recall_at_1"):
                assert row[k][0] == pytest.approx(np.mean([o[k] for o in own]), rel=1e-4)
    best = summary["best_control"]
    assert best in cs.CONTROLS
    assert all(
        summary["table"][f"{best}/raw"]["opis"][0] <= summary["table"][f"{a}/raw"]["opis"][0]
        for a in cs.CONTROLS
    )
    assert "base_lr/raw" in summary["table"] and len(summary["supplementary_comparisons"]) == 1
    comp = summary["comparisons"]["tcm/raw"]["differences"]
    t, c = summary["table"]["tcm/raw"]["opis"][0], summary["table"][f"{best}/raw"]["opis"][0]
    assert comp["opis"]["estimate"] == pytest.approx(100 * (t / c - 1))
    # AS-norm ranks by cosine: retrieval is the raw arm's
    assert (
        summary["table"]["base/asnorm"]["recall_at_1"]
        == summary["table"]["base/raw"]["recall_at_1"]
    )
    assert cs.aggregate(copy, draws=50)["ProxyAnchor"]["table"] == summary["table"]
    # regime (b)'s design: base_scaled is not one of its arms and base_lr is a rule control
    b = cs.aggregate(copy, draws=20, design=cs.REGIME_B)["ProxyAnchor"]
    assert "base_scaled/raw" not in b["table"] and not b["supplementary_comparisons"]
    assert b["best_control"] == min(
        cs.REGIME_B.controls, key=lambda a: b["table"][f"{a}/raw"]["opis"][0]
    )
    assert set(b["comparisons"]) == {"tcm/raw", *(f"{a}/asnorm" for a in cs.REGIME_B.arms)}
    # against another regime's served training (here: these very runs), descriptively
    r = cs.aggregate(copy, draws=20, design=cs.REGIME_B, reference=(copy, "ProxyAnchor"))
    r = r["ProxyAnchor"]
    assert r["reference_seeds"] == [0, 1] and r["table"] == b["table"]
    ref = r["reference_comparisons"]
    assert set(ref) == {"base/raw", f"{b['best_control']}/raw", *b["comparisons"]}
    assert ref["base/raw"]["differences"]["opis"]["estimate"] == 0  # itself
    assert ref["base/asnorm"]["differences"]["recall_at_1"]["estimate"] == 0  # cosine ranks
    t, c = r["table"]["tcm/raw"]["opis"][0], r["table"]["base/raw"]["opis"][0]
    assert ref["tcm/raw"]["differences"]["opis"]["estimate"] == pytest.approx(100 * (t / c - 1))
    assert not cs.aggregate(copy, draws=5, design=cs.REGIME_B)["ProxyAnchor"]["reference_seeds"]
    docs = tmp_path / "docs"
    cs.write_outputs(copy, docs, draws=20, plot=False)
    assert "best control" in (docs / "consistency_table.md").read_text().lower()
    assert (docs / "consistency_summary.json").is_file()


def test_faces_split_is_the_addendums() -> None:
    """People disjoint; 150 test and 60 validation people, each with >= 4 detected images;
    at most 10 images a person (the first by name); undetected images and one-image people
    never train; the same split from the rows in any order."""
    rng = np.random.default_rng(3)
    names, detected = [], []
    for p in range(500):
        count = [1, 2, 3, 4, 6, 14][p % 6]
        for k in range(count):
            names.append(f"lfw/person{p:03d}/person{p:03d}_{k + 1:04d}.jpg")
            detected.append(not (p % 7 == 0 and k == 0))  # some faces not found
    vectors = rng.standard_normal((len(names), 5)).astype(np.float32)
    detected = np.array(detected)
    (tr_val, val), (train, test) = cs.faces_split(names, vectors, detected)

    def people(fs: cs.FeatureSet) -> set[int]:
        return set(fs.y.tolist())

    assert len(people(test)) == cs.FACES_TEST_PEOPLE and len(people(val)) == cs.FACES_VAL_PEOPLE
    assert not people(test) & people(train) and not people(val) & people(tr_val)
    assert people(train) == people(tr_val) | people(val)
    for fs in (val, test):
        counts = np.bincount(fs.y.numpy())
        assert counts[counts > 0].min() >= 4
    counts = np.bincount(train.y.numpy())
    assert counts[counts > 0].min() >= 2 and counts.max() <= cs.FACES_MAX_IMAGES
    # no undetected row: every row's vector is a detected one's
    kept = {v.tobytes() for v in vectors[detected]}
    assert all(x.numpy().tobytes() in kept for fs in (train, test) for x in fs.x)
    # the capped images are the first ten by name of a 14-image person
    rows = [i for i, n in enumerate(names) if "person005/" in n]  # 14 images, all detected
    theirs = {vectors[i].tobytes() for i in rows}
    got = {x.numpy().tobytes() for fs in (train, test) for x in fs.x} & theirs
    assert got == {vectors[i].tobytes() for i in rows[:10]}
    shuffled = rng.permutation(len(names))
    again = cs.faces_split([names[i] for i in shuffled], vectors[shuffled], detected[shuffled])
    assert torch.equal(again[1][1].x, test.x) and torch.equal(again[1][1].y, test.y)


def test_the_descriptor_arm_is_the_input_itself_and_a_control(tmp_path: Path) -> None:
    """The faces part's ``descriptor`` arm trains nothing (no steps, no log), scores the
    L2-normalised inputs, is among the controls, and its AS-norm scoring is a candidate."""
    torch.set_num_threads(1)
    train_all = _clusters(list(range(12)), 8, 16, seed=0)
    val_pick = torch.isin(train_all.y, torch.tensor([0, 1, 2, 3]))
    data = (
        (
            cs.FeatureSet(train_all.x[~val_pick], train_all.y[~val_pick]),
            cs.FeatureSet(train_all.x[val_pick], train_all.y[val_pick]),
        ),
        (train_all, _clusters(list(range(12, 18)), 8, 16, seed=5)),
    )
    out = tmp_path / "faces"
    losses = {"ProxyAnchor": ["loss=proxy_anchor"]}
    ran = cs.run_study(out, losses, TINY, [0, 1], data, log_every=5, arms=cs.FACE_ARMS)
    assert len(ran) == 2 * len(cs.FACE_ARMS)
    meta = json.loads(cs.run_path(out, "ProxyAnchor", cs.DESCRIPTOR, 0).read_text())
    assert meta["steps"] == 0 and meta["log"] == []
    test = data[1][1]
    e = torch.nn.functional.normalize(test.x, dim=1)
    config = load_config(None, [*TINY, "loss=proxy_anchor"])
    want, _ = cs.evaluate_run(
        e, test.y, torch.nn.functional.normalize(train_all.x, dim=1), 8, config
    )
    assert meta["metrics"]["raw"]["opis"] == pytest.approx(want["raw"]["opis"], rel=1e-9)
    assert meta["metrics"]["raw"]["recall_at_1"] == pytest.approx(want["raw"]["recall_at_1"])
    summary = cs.aggregate(out, draws=20)["ProxyAnchor"]
    assert "descriptor/raw" in summary["table"] and "descriptor/asnorm" in summary["comparisons"]
    opis = {a: summary["table"][f"{a}/raw"]["opis"][0] for a in ("descriptor", *cs.CONTROLS)}
    assert summary["best_control"] == min(opis, key=opis.get)
    assert "descriptor" not in summary["last_window"]
