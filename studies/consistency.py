"""The consistency study (`make study-consistency`, issue 27): does anything make one threshold
hold on unseen classes? TCM with margins anchored where the threshold lives, against controls
for "longer training" and "more gradient", each with and without serve-time AS-norm.

The plan and the success rule are in ``docs/results.md`` ("Pre-registered: ..."), committed
before the first run. Regime (a): frozen ImageNet EfficientNet-Lite0 features of CUB (cached
by ``training.features``), a linear 128-d head. The faces part (``--study faces``, the plan's
addendum): the same head and arms on the served dlib descriptors of LFW (cached by
``training.face_cache``), tested on LFW's held-out people and on ORL, plus the ``descriptor``
arm (no head: what is served) among the controls.

Resumable at the grain of one (loss, arm, seed): each run writes
``<out>/<loss>/<arm>_seed<k>.json`` (metrics raw and AS-normed, config, the per-100-step log)
and a ``.npz`` beside it (per-class utility curves, hit and AP sums, per-class FAR and FRR at
tau), the npz first, so a JSON on disk means a finished run and is skipped on the next call.
The validation step (anchored margins, lambda, AS-norm's K) writes ``<out>/<loss>/validation.json``
once. ``aggregate`` rebuilds every table number and interval from those files alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.samplers import MPerClassSampler

from studies.common import choose_margins, console, machine
from studies.cub import COMMON, LOSSES, opis_from_curves, per_query_retrieval
from tcm import consistency_from_scores
from tcm.asnorm import as_norm, cohort_stats
from tcm.calibration import threshold_at_far
from training.config import TrainConfig, load_config
from training.evaluate import embed
from training.losses import build_loss
from training.models import build_model
from training.optimisation import build_optimiser, build_scheduler
from training.trainer import seed_everything

# the plan ran ProxyAnchor and multi-similarity first and deferred the other two; they ran in
# the same session after all (docs/results.md), so a fresh run makes all four
DEFAULT_LOSSES = list(LOSSES)
CONTROLS = ("base", "base_5x", "base_scaled")
ARMS = (*CONTROLS, "tcm")
# added after the first runs showed base_scaled == base (AdamW's step ignores a constant loss
# scale): "more gradient" for Adam is a larger step, lr and proxy lr x (1 + lambda). Reported
# beside the others; NOT one of the rule's controls, which stay the pre-registered three.
SUPPLEMENTARY = ("base_lr",)
RUN_ARMS = (*ARMS, *SUPPLEMENTARY)
# the faces part (docs/results.md, its addendum): no head at all, the raw descriptor that is
# served today; a control wherever a study runs it
DESCRIPTOR = "descriptor"
FACE_ARMS = (DESCRIPTOR, *RUN_ARMS)
# the face model's operating point: tau at pooled pair FAR 1e-3, OPIS over FAR 1e-2 -> 1e-4
FACES_SETTINGS = ["target_far=1e-3", "far_hi=1e-2", "far_lo=1e-4"]
FACES_TEST_PEOPLE = 150
FACES_VAL_PEOPLE = 60
FACES_SPLIT_SEED = 27
FACES_MAX_IMAGES = 10
SCORINGS = ("raw", "asnorm")
LAMBDAS = (0.3, 1.0, 3.0)
KS = (50, 200)
LOG_EVERY = 100
LONGER = 5  # base_5x trains this many times the steps
# the rule (docs/results.md, fixed before any run)
MIN_DROP = 0.20
R1_SLACK_PT = 0.5
VAL_R1_SLACK = 0.01
RULE_KEYS = ("opis", "frr_sd", "far_sd")
LOG_KEYS = ("frac_pos_violating", "frac_neg_violating", "tcm_pos_part", "tcm_neg_part", "base_loss")


@dataclass(frozen=True)
class FeatureSet:
    """Features (N, F) float32 and labels (N,) int64 of one class-disjoint part."""

    x: torch.Tensor
    y: torch.Tensor


# --- training ----------------------------------------------------------------------------------


def _batch_order(y: torch.Tensor, config: TrainConfig, steps: int) -> torch.Tensor:
    sampler = MPerClassSampler(
        y.numpy(),
        m=config.m_per_class,
        batch_size=config.batch_size,
        length_before_new_iter=config.batch_size * steps,
    )
    return torch.as_tensor(list(iter(sampler)), dtype=torch.int64)


@torch.no_grad()
def margin_stats(
    emb: torch.Tensor, labels: torch.Tensor, m_plus: float, m_minus: float
) -> dict[str, float]:
    """What TCM sees in one batch: the share of genuine pairs below m+ and of impostor pairs
    above m-, and the unweighted means of ``m+ - s`` and ``s - m-`` over those pairs (TCM's
    positive and negative parts before lambda; 0 where no pair violates)."""
    e = F.normalize(emb.float(), dim=1)
    s = e @ e.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    pos_hard, neg_hard = pos & (s <= m_plus), neg & (s >= m_minus)
    return {
        "frac_pos_violating": float(pos_hard.sum() / pos.sum().clamp(min=1)),
        "frac_neg_violating": float(neg_hard.sum() / neg.sum().clamp(min=1)),
        "tcm_pos_part": float((m_plus - s)[pos_hard].sum() / pos_hard.sum().clamp(min=1)),
        "tcm_neg_part": float((s - m_minus)[neg_hard].sum() / neg_hard.sum().clamp(min=1)),
    }


def train_head(
    config: TrainConfig,
    train: FeatureSet,
    *,
    loss_scale: float = 1.0,
    log_margins: tuple[float, float] | None = None,
    log_every: int = LOG_EVERY,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """The head on cached features, as ``training.trainer.fit`` trains it (seeded epochs of
    class-balanced batches, AdamW, cosine decay over ``epochs * steps_per_epoch``), with the
    loss multiplied by ``loss_scale`` (the gradient control) and, every ``log_every`` steps,
    the window's mean base loss, TCM term and ``margin_stats`` at ``log_margins``."""
    seed_everything(config.seed)
    y = torch.unique(train.y, return_inverse=True)[1]
    model = build_model(config, train.x.shape[1])
    loss_fn = build_loss(config, int(y.max()) + 1)
    optimiser = build_optimiser(model, loss_fn, config)
    scheduler = build_scheduler(optimiser, config)
    log: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    step = 0
    for epoch in range(config.epochs):
        seed_everything(config.seed * 1000 + epoch)
        order = _batch_order(y, config, config.steps_per_epoch)
        model.train()
        for k in range(config.steps_per_epoch):
            idx = order[k * config.batch_size : (k + 1) * config.batch_size]
            emb = model(train.x[idx])
            loss = loss_scale * loss_fn(emb, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            entry = {"base_loss": loss_fn.last["base"], "tcm_term": loss_fn.last.get("tcm", 0.0)}
            if log_margins is not None:
                entry.update(margin_stats(emb.detach(), y[idx], *log_margins))
            window.append(entry)
            if step % log_every == 0:
                log.append(
                    {"step": step, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
                )
                window = []
    return model.eval(), log


# --- evaluation: one labelled score matrix, raw or AS-normed -----------------------------------


def score_curves(scores: np.ndarray, labels: np.ndarray, config: TrainConfig) -> dict[str, Any]:
    """Per-class utility curves and FAR/FRR at tau of a full (n, n) pair-score matrix, with tau
    at the pooled FAR ``config.target_far`` and the calibration range at pooled FAR
    ``far_hi -> far_lo``, as ``tcm.consistency_report`` does for cosine scores (the test checks
    equality), so normalised scores are judged exactly like raw ones."""
    s = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(labels), 1)
    pooled = s[iu][labels[iu[0]] != labels[iu[1]]]
    tau = threshold_at_far(pooled, config.target_far)
    tau_range = (threshold_at_far(pooled, config.far_hi), threshold_at_far(pooled, config.far_lo))
    genuine, impostor = {}, {}
    for c in np.unique(labels):
        m = labels == c
        rows = s[m]
        block = rows[:, m]
        genuine[int(c)] = block[np.triu_indices(len(block), 1)]
        impostor[int(c)] = rows[:, ~m].ravel()
    cons = consistency_from_scores(
        genuine,
        impostor,
        tau_range=tau_range,
        num_thresholds=config.num_thresholds,
        beta=config.beta,
        eps=config.eps,
        tau=tau,
    )
    at = cons.at_tau
    assert at is not None
    return {
        "classes": np.asarray(cons.classes),
        "u": cons.utility,
        "far": at.far,
        "frr": at.frr,
        "opis": cons.opis,
        "eps_opis": cons.eps_opis,
        "tau": float(tau),
        "tau_lo": cons.tau_lo,
        "tau_hi": cons.tau_hi,
        "far_at_tau": at.global_far,
        "frr_at_tau": at.global_frr,
    }


def class_metrics(d: dict[str, np.ndarray], idx: np.ndarray, eps: float) -> dict[str, float]:
    """The rule's metrics on a (re)sample ``idx`` of the classes of one run's per-class arrays
    (``u``, ``far``, ``frr``, ``hit``, ``ap``, ``n``); on every class they equal the run's own."""
    opis, eps_opis = opis_from_curves(d["u"][idx], eps)
    n = d["n"][idx].sum()
    return {
        "recall_at_1": float(d["hit"][idx].sum() / n),
        "map_at_r": float(d["ap"][idx].sum() / n),
        "opis": opis,
        "eps_opis": eps_opis,
        "frr_sd": float(d["frr"][idx].std()),
        "far_sd": float(d["far"][idx].std()),
    }


def evaluate_run(
    emb: torch.Tensor, labels: torch.Tensor, cohort: torch.Tensor, k: int, config: TrainConfig
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Metrics per scoring (raw cosine, AS-norm top-``k`` with ``cohort``) and the per-class
    arrays (npz-ready). Retrieval ranks by cosine under both scorings, so R@1 and MAP@R are
    shared; the decision (tau, OPIS, per-class FAR/FRR) uses each scoring's own scores."""
    y = labels.numpy()
    hit, ap = per_query_retrieval(emb, labels)
    raw = (emb @ emb.T).double().numpy()
    e = emb.numpy()
    stats = cohort_stats(e, cohort.numpy(), k)
    scored = {"raw": raw, "asnorm": as_norm(raw, stats, stats).astype(np.float64)}
    arrays: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name, s in scored.items():
        c = score_curves(s, y, config)
        if "classes" not in arrays:
            classes = c["classes"]
            arrays.update(
                classes=classes,
                n=np.array([(y == v).sum() for v in classes]),
                hit=np.array([hit[y == v].sum() for v in classes]),
                ap=np.array([ap[y == v].sum() for v in classes]),
            )
        assert (arrays["classes"] == c["classes"]).all()
        arrays.update({f"u_{name}": c["u"], f"far_{name}": c["far"], f"frr_{name}": c["frr"]})
        full = np.arange(len(arrays["classes"]))
        m = class_metrics(scoring_arrays(arrays, name), full, config.eps)
        assert abs(m["opis"] - c["opis"]) < 1e-9 and abs(m["eps_opis"] - c["eps_opis"]) < 1e-9
        metrics[name] = {
            **m,
            **{k_: c[k_] for k_ in ("tau", "tau_lo", "tau_hi", "far_at_tau", "frr_at_tau")},
            "frr_spread": float(np.ptp(c["frr"])),
            "far_spread": float(np.ptp(c["far"])),
        }
    assert abs(metrics["raw"]["recall_at_1"] - float(hit.mean())) < 1e-6
    return metrics, arrays


def scoring_arrays(arrays: dict[str, np.ndarray], scoring: str) -> dict[str, np.ndarray]:
    """One scoring's view of a run's arrays, keyed as ``class_metrics`` reads them."""
    return {
        "u": arrays[f"u_{scoring}"],
        "far": arrays[f"far_{scoring}"],
        "frr": arrays[f"frr_{scoring}"],
        **{k: arrays[k] for k in ("hit", "ap", "n", "classes")},
    }


# --- validation: anchored margins, lambda and K ------------------------------------------------


def _val_row(name: str, config: TrainConfig, emb: torch.Tensor, y: torch.Tensor) -> dict:
    hit, _ = per_query_retrieval(emb, y)
    c = score_curves((emb @ emb.T).double().numpy(), y.numpy(), config)
    return {
        "run": name,
        "config": config.to_dict(),
        "recall_at_1": float(hit.mean()),
        "opis": c["opis"],
        "eps_opis": c["eps_opis"],
    }


def validate(base: TrainConfig, train: FeatureSet, val: FeatureSet, path: Path) -> dict[str, Any]:
    """Per base loss, once (seed 0, training species minus the validation ones): the base
    model's validation thresholds anchor TCM's margins (m- at tau(FAR 1e-1) or tau(FAR 1e-2),
    m+ = tau(FAR 1e-2) + 0.1), lambda in LAMBDAS, chosen by ``choose_margins``; AS-norm's K is the
    one of KS with the lower validation OPIS. Written to ``path``; read back if present."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    cfg = base.replace(tcm=False, seed=0)
    model, _ = train_head(cfg, train)
    emb, cohort = embed(model, val.x), embed(model, train.x)
    y = val.y.numpy()
    raw = (emb @ emb.T).double().numpy()
    iu = np.triu_indices(len(y), 1)
    pooled = raw[iu][y[iu[0]] != y[iu[1]]]
    tau1 = round(threshold_at_far(pooled, 1e-1), 4)
    tau2 = round(threshold_at_far(pooled, 1e-2), 4)
    m_plus = round(min(1.0, tau2 + 0.1), 4)
    k_opis = {}
    for k in KS:
        k_eff = min(k, len(cohort))
        st = cohort_stats(emb.numpy(), cohort.numpy(), k_eff)
        k_opis[str(k)] = score_curves(as_norm(raw, st, st), y, cfg)["opis"]
    k_best = int(min(k_opis, key=lambda k: k_opis[k]))
    rows = [_val_row("base", cfg, emb, val.y)]
    for m_minus in (tau1, tau2):
        for lam in LAMBDAS:
            c = cfg.replace(
                tcm=True, m_plus=m_plus, m_minus=m_minus, lambda_plus=lam, lambda_minus=lam
            )
            model, _ = train_head(c, train)
            rows.append(_val_row(f"tcm_m-{m_minus}_l{lam}", c, embed(model, val.x), val.y))
    chosen = choose_margins(rows, VAL_R1_SLACK)
    out = {
        "tau_far_1e-1": tau1,
        "tau_far_1e-2": tau2,
        "rows": rows,
        "chosen": {
            "m_plus": chosen["m_plus"],
            "m_minus": chosen["m_minus"],
            "lambda": chosen["picked"]["config"]["lambda_plus"],
            "rule": chosen["rule"],
            "run": chosen["picked"]["run"],
        },
        "asnorm_val_opis": k_opis,
        "asnorm_k": k_best,
        "val_classes": int(torch.unique(val.y).numel()),
        "train_classes": int(torch.unique(train.y).numel()),
        "seconds": time.perf_counter() - t0,
        "machine": machine(),
    }
    _write_json(path, out)
    return out


# --- one main run ------------------------------------------------------------------------------


class Normalised(torch.nn.Module):
    """The ``descriptor`` arm's "model": the input itself, L2-normalised (no head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1)


def arm_config(base: TrainConfig, arm: str, seed: int, chosen: dict) -> tuple[TrainConfig, float]:
    """The config and loss scale of one arm (``chosen``: validation.json's choice)."""
    cfg = base.replace(tcm=False, seed=seed)
    lam = float(chosen["lambda"])
    if arm in ("base", DESCRIPTOR):  # the descriptor trains nothing: its config is base's
        return cfg, 1.0
    if arm == "base_5x":
        return cfg.replace(epochs=cfg.epochs * LONGER), 1.0
    if arm == "base_scaled":
        return cfg, 1.0 + lam
    if arm == "base_lr":
        return cfg.replace(lr=cfg.lr * (1 + lam), proxy_lr=cfg.proxy_lr * (1 + lam)), 1.0
    if arm == "tcm":
        tcm = cfg.replace(
            tcm=True,
            m_plus=float(chosen["m_plus"]),
            m_minus=float(chosen["m_minus"]),
            lambda_plus=lam,
            lambda_minus=lam,
        )
        return tcm, 1.0
    raise ValueError(f"unknown arm {arm!r}; arms: {list(FACE_ARMS)}")


def run_path(out: Path, loss: str, arm: str, seed: int) -> Path:
    return out / loss / f"{arm}_seed{seed}.json"


def run_one(
    out: Path,
    loss: str,
    arm: str,
    seed: int,
    base: TrainConfig,
    validation: dict,
    train: FeatureSet,
    test: FeatureSet,
    *,
    log_every: int = LOG_EVERY,
) -> bool:
    """Trains and evaluates one (loss, arm, seed) unless its JSON exists; True if it ran."""
    path = run_path(out, loss, arm, seed)
    if path.is_file():
        return False
    chosen = validation["chosen"]
    cfg, scale = arm_config(base, arm, seed, chosen)
    t0 = time.perf_counter()
    model: torch.nn.Module
    if arm == DESCRIPTOR:
        model, log = Normalised(), []
    else:
        model, log = train_head(
            cfg,
            train,
            loss_scale=scale,
            log_margins=(float(chosen["m_plus"]), float(chosen["m_minus"])),
            log_every=log_every,
        )
    seconds = time.perf_counter() - t0
    k = min(int(validation["asnorm_k"]), len(train.y))
    metrics, arrays = evaluate_run(embed(model, test.x), test.y, embed(model, train.x), k, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_npz(path.with_suffix(".npz"), arrays)
    _write_json(
        path,
        {
            "loss": loss,
            "arm": arm,
            "seed": seed,
            "loss_scale": scale,
            "steps": 0 if arm == DESCRIPTOR else cfg.epochs * cfg.steps_per_epoch,
            "log_margins": {"m_plus": chosen["m_plus"], "m_minus": chosen["m_minus"]},
            "asnorm_k": k,
            "metrics": metrics,
            "log": log,
            "train_seconds": seconds,
            "eval_seconds": time.perf_counter() - t0 - seconds,
            "machine": machine(),
            "config": cfg.to_dict(),
        },
    )
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    small = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, **small)
    os.replace(tmp, path)


# --- statistics: the joint bootstrap over seeds and classes ------------------------------------

POINT_KEYS = ("recall_at_1", "map_at_r")  # differences in points; the others relative


def joint_bootstrap(
    treated: Sequence[Any],
    control: Sequence[Any],
    metrics: Callable[[Any, np.ndarray], dict[str, float]],
    num_classes: int,
    *,
    draws: int,
    seed: int = 0,
    point_keys: Sequence[str] = POINT_KEYS,
) -> dict[str, dict[str, Any]]:
    """``treated`` vs ``control``, paired by position (seed). Per key: the mean over seeds of
    ``metrics(run, classes)``; the difference is ``treated / control - 1`` (100 x, in %), or
    ``100 x (treated - control)`` in points for ``point_keys``; its 95% percentile interval over
    ``draws`` draws that each resample the seeds and the classes with replacement (the same
    seeds for both arms, the same classes for every seed and both arms)."""
    if len(treated) != len(control) or not treated:
        raise ValueError("need one control run per treated run (paired seeds), at least one")

    def diff(seeds: np.ndarray, classes: np.ndarray) -> dict[str, float]:
        mt = [metrics(treated[i], classes) for i in seeds]
        mc = [metrics(control[i], classes) for i in seeds]
        out = {}
        for k in mt[0]:
            t, c = np.mean([m[k] for m in mt]), np.mean([m[k] for m in mc])
            if k in point_keys:
                out[k] = 100 * (t - c)
            else:  # a control at exactly 0 (a toy draw) has no relative change: NaN
                out[k] = 100 * (t / c - 1) if c != 0 else float("nan")
        return out

    n = len(treated)
    est = diff(np.arange(n), np.arange(num_classes))
    rng = np.random.default_rng(seed)
    boot = [
        diff(rng.integers(0, n, n), rng.integers(0, num_classes, num_classes)) for _ in range(draws)
    ]
    return {
        k: {
            "estimate": float(est[k]),
            "ci95": [float(np.percentile([b[k] for b in boot], q)) for q in (2.5, 97.5)],
            "unit": "points" if k in point_keys else "% relative",
        }
        for k in est
    }


def verdict(d: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered rule on one comparison (``joint_bootstrap``'s output)."""
    checks = {k: d[k]["estimate"] <= -100 * MIN_DROP and d[k]["ci95"][1] < 0 for k in RULE_KEYS}
    checks["recall_at_1"] = d["recall_at_1"]["estimate"] >= -R1_SLACK_PT
    return {"helps": all(checks.values()), "checks": checks}


# --- aggregation from the committed files ------------------------------------------------------


def load_runs(out: Path) -> dict[str, dict[str, dict[int, tuple[dict, dict]]]]:
    """{loss: {arm: {seed: (json, arrays)}}} of every finished run under ``out``."""
    runs: dict[str, dict[str, dict[int, tuple[dict, dict]]]] = {}
    for path in sorted(out.glob("*/*_seed*.json")):
        meta = json.loads(path.read_text())
        with np.load(path.with_suffix(".npz")) as z:
            arrays = {
                k: z[k].astype(np.float64) if z[k].dtype.kind == "f" else z[k] for k in z.files
            }
        runs.setdefault(meta["loss"], {}).setdefault(meta["arm"], {})[meta["seed"]] = (meta, arrays)
    return runs


@dataclass(frozen=True)
class Design:
    """Which arms a study's plan runs, which of them are the rule's controls, and which are
    reported outside the rule (``base_lr`` in regime (a), where it was added post hoc)."""

    arms: tuple[str, ...] = ARMS
    controls: tuple[str, ...] = CONTROLS
    supplementary: tuple[str, ...] = SUPPLEMENTARY


# regime (b)'s addendum (docs/results.md): base_scaled is not run (it reproduced base to every
# printed digit in regime (a): AdamW ignores a constant loss scale) and base_lr, the "more
# gradient" control that works for Adam, is one of the rule's controls from the start
REGIME_B = Design(
    arms=("base", "base_5x", "base_lr", "tcm"),
    controls=("base", "base_5x", "base_lr"),
    supplementary=(),
)


@dataclass(frozen=True)
class CubRegime:
    """One CUB regime of the plan: its settings, arms, losses, seeds and output names. It runs
    the design's arms and those reported outside the rule."""

    out: Path
    name: str
    what: str
    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: tuple[str, ...] = ()
    design: Design = Design()
    reference: tuple[Path, str] | None = None

    @property
    def run_arms(self) -> tuple[str, ...]:
        return (*self.design.arms, *self.design.supplementary)


CUB_REGIMES = {
    "a": CubRegime(
        out=Path("docs/results/consistency"),
        name="consistency",
        what="regime (a)",
        losses=tuple(DEFAULT_LOSSES),
        seeds=tuple(range(10)),
    ),
    # Lite0's last block (its last stage) and 1x1 head convolution train on cached feature
    # maps, at a tenth of the head's learning rate (training.partial); compared, descriptively,
    # with the served bird model's training: regime (a), ProxyAnchor (its committed runs)
    "b": CubRegime(
        out=Path("docs/results/consistency_b"),
        name="consistency_b",
        what="regime (b), Lite0's last stage tuned",
        losses=("ProxyAnchor", "SupCon"),
        seeds=tuple(range(5)),
        settings=("tune_blocks=1", "tune_lr_factor=0.1"),
        design=REGIME_B,
        reference=(Path("docs/results/consistency"), "ProxyAnchor"),
    ),
}


def aggregate(
    out: Path,
    *,
    draws: int,
    eps: float = 0.05,
    design: Design = Design(),
    reference: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """Every number of the table from the per-run files: per (arm, scoring) the mean and sd over
    the seeds every arm of the loss finished; the best control; each candidate against it with
    joint-bootstrap intervals, and the rule's verdict. With ``reference`` (another regime's run
    folder and one of its losses: the served training), ``base/raw``, the best control and each
    candidate are also compared, descriptively, with that run's ``base/raw`` on the seeds both
    have."""
    runs = load_runs(out)
    summary: dict[str, Any] = {}
    required, outside = design.arms, design.supplementary
    ref_base = load_runs(reference[0]).get(reference[1], {}).get("base", {}) if reference else {}
    for loss, arms in runs.items():
        if not all(a in arms for a in required):
            continue
        seeds = sorted(set.intersection(*(set(arms[a]) for a in required)))
        if not seeds:
            continue
        optional = (DESCRIPTOR, *outside)
        extra = [a for a in optional if a in arms and set(seeds) <= set(arms[a])]
        present = [
            *(a for a in extra if a == DESCRIPTOR),
            *required,
            *(a for a in extra if a != DESCRIPTOR),
        ]
        controls = (DESCRIPTOR, *design.controls) if DESCRIPTOR in present else design.controls
        views = {
            (arm, sc): [scoring_arrays(arms[arm][s][1], sc) for s in seeds]
            for arm in present
            for sc in SCORINGS
        }
        c = len(views[("base", "raw")][0]["classes"])
        for v in views.values():
            assert all((r["classes"] == views[("base", "raw")][0]["classes"]).all() for r in v)
        full = np.arange(c)
        table = {}
        for (arm, sc), v in views.items():
            per_seed = [class_metrics(r, full, eps) for r in v]
            extra = [arms[arm][s][0]["metrics"][sc] for s in seeds]
            for m, e in zip(per_seed, extra, strict=True):
                m.update(tau=e["tau"], frr_at_tau=e["frr_at_tau"])
                # the npz holds float32 curves: the recomputed OPIS matches the run's own
                assert math.isclose(m["opis"], e["opis"], rel_tol=1e-4, abs_tol=1e-9)
            table[f"{arm}/{sc}"] = {
                k: [
                    float(np.mean([m[k] for m in per_seed])),
                    float(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0,
                ]
                for k in per_seed[0]
            }
        best = min(controls, key=lambda a: table[f"{a}/raw"]["opis"][0])
        candidates = [("tcm", "raw"), *((a, "asnorm") for a in present if a not in outside)]

        cache: dict[tuple[int, bytes], dict[str, float]] = {}

        def metrics(r: dict, idx: np.ndarray, cache: dict = cache) -> dict[str, float]:
            # every comparison draws the same (seeded) resamples: the control's are reused
            key = (id(r), idx.tobytes())
            if key not in cache:
                cache[key] = class_metrics(r, idx, eps)
            return cache[key]

        comparisons = {}
        for arm, sc in candidates:
            d = joint_bootstrap(views[(arm, sc)], views[(best, "raw")], metrics, c, draws=draws)
            comparisons[f"{arm}/{sc}"] = {"differences": d, **verdict(d)}
        supplementary = {}
        for arm in outside:
            if arm in present:  # outside the rule: TCM against the post-hoc control
                d = joint_bootstrap(
                    views[("tcm", "raw")], views[(arm, "raw")], metrics, c, draws=draws
                )
                supplementary[f"tcm/raw vs {arm}/raw"] = {"differences": d, **verdict(d)}
        against_reference = {}
        shared = [i for i, s in enumerate(seeds) if s in ref_base]
        if shared:
            ref_view = [scoring_arrays(ref_base[seeds[i]][1], "raw") for i in shared]
            mine_classes = views[("base", "raw")][0]["classes"]
            assert all((r["classes"] == mine_classes).all() for r in ref_view)
            for arm, sc in dict.fromkeys([("base", "raw"), (best, "raw"), *candidates]):
                mine = [views[(arm, sc)][i] for i in shared]
                d = joint_bootstrap(mine, ref_view, metrics, c, draws=draws)
                against_reference[f"{arm}/{sc}"] = {"differences": d, **verdict(d)}
        # what TCM saw at the end of training (the last logged window), mean over seeds
        last_window = {
            arm: {
                k: float(np.mean([arms[arm][s][0]["log"][-1][k] for s in seeds])) for k in LOG_KEYS
            }
            for arm in present
            if arm != DESCRIPTOR  # trains nothing, logs nothing
        }
        summary[loss] = {
            "seeds": seeds,
            "last_window": last_window,
            "num_test_classes": c,
            "table": table,
            "best_control": best,
            "comparisons": comparisons,
            "supplementary_comparisons": supplementary,
            "reference_comparisons": against_reference,
            "reference_seeds": [seeds[i] for i in shared],
            "reference": f"{reference[1]} in {reference[0]}" if reference else None,
            "chosen": json.loads((out / loss / "validation.json").read_text())["chosen"]
            if (out / loss / "validation.json").is_file()
            else None,
            "runs_per_arm": {a: sorted(arms[a]) for a in FACE_ARMS if a in arms},
        }
    return summary


TABLE_KEYS = [
    ("recall_at_1", "R@1", 100, ".2f"),
    ("map_at_r", "MAP@R", 100, ".2f"),
    ("opis", "OPIS ×1e-3", 1e3, ".2f"),
    ("eps_opis", "ε-OPIS", 1, ".3f"),
    ("tau", "τ", 1, ".3f"),
    ("frr_at_tau", "FRR at τ", 1, ".3f"),
    ("frr_sd", "per-class FRR sd", 1, ".3f"),
    ("far_sd", "per-class FAR sd", 1, ".4f"),
]


def _comparison_row(name: str, comp: dict[str, Any]) -> str:
    """One comparison as a table row: each difference with its interval, then the verdict."""
    d = comp["differences"]
    cells = [
        f"{d[k]['estimate']:+.1f} [{d[k]['ci95'][0]:+.1f}, {d[k]['ci95'][1]:+.1f}]"
        for k in ("recall_at_1", "opis", "frr_sd", "far_sd", "eps_opis", "map_at_r")
    ]
    return f"| {name} | " + " | ".join(cells) + f" | {'yes' if comp['helps'] else 'no'} |"


def render(summary: dict[str, Any], draws: int) -> str:
    lines = []
    for loss, s in summary.items():
        ch = s["chosen"] or {}
        lines += [
            f"### {loss}: {len(s['seeds'])} paired seeds ({', '.join(map(str, s['seeds']))}), "
            f"{s['num_test_classes']} test classes",
            "",
            f"Chosen on validation classes: m+ = {ch.get('m_plus')}, m− = {ch.get('m_minus')}, "
            f"λ = {ch.get('lambda')} ({ch.get('rule')}). Best control (lowest mean OPIS): "
            f"`{s['best_control']}`.",
            "",
            "| arm / scoring | " + " | ".join(h for _, h, _, _ in TABLE_KEYS) + " |",
            "|---" * (len(TABLE_KEYS) + 1) + "|",
        ]
        for name, row in s["table"].items():
            cells = [f"{row[k][0] * sc:{f}} ± {row[k][1] * sc:{f}}" for k, _, sc, f in TABLE_KEYS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Against `{s['best_control']}/raw` (mean over seeds; 95% interval from {draws} joint "
            "resamplings of seeds and test classes):",
            "",
            "| candidate | ΔR@1 pt | ΔOPIS % | Δ per-class FRR sd % | Δ per-class FAR sd % "
            "| Δε-OPIS % | ΔMAP@R pt | helps (rule) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, comp in [
            *s["comparisons"].items(),
            *(
                (f"{k} (post hoc, outside the rule)", v)
                for k, v in s["supplementary_comparisons"].items()
            ),
        ]:
            lines.append(_comparison_row(name, comp))
        if s.get("reference_comparisons"):
            lines += [
                "",
                f"Descriptive, outside the rule: against {s['reference']} `base/raw` (the served "
                f"training) on seeds {', '.join(map(str, s['reference_seeds']))}, same test "
                f"classes, same {draws} joint resamplings:",
                "",
                "| this regime's arm | ΔR@1 pt | ΔOPIS % | Δ per-class FRR sd % "
                "| Δ per-class FAR sd % | Δε-OPIS % | ΔMAP@R pt | clears the rule's bars |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [_comparison_row(n, c) for n, c in s["reference_comparisons"].items()]
        lines += [
            "",
            "Last 100 training steps (mean over seeds), at the chosen margins: share of batch "
            "genuine pairs below m+, of impostor pairs above m−, and TCM's two parts (means of "
            "m+ − s and s − m− over those pairs, before λ):",
            "",
            "| arm | genuine < m+ | impostor > m− | positive part | negative part | base loss |",
            "|---|---|---|---|---|---|",
        ]
        for arm, w in s["last_window"].items():
            lines.append(f"| {arm} | " + " | ".join(f"{w[k]:.3f}" for k in LOG_KEYS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_logs(out: Path, summary: dict[str, Any], path: Path) -> None:
    """Per loss: the share of batch pairs violating m+ and m- over training, seed 0, each arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(summary)
    if not losses:
        return
    fig, axes = plt.subplots(len(losses), 2, figsize=(10, 3.2 * len(losses)), squeeze=False)
    for row, loss in enumerate(losses):
        seed = summary[loss]["seeds"][0]
        for arm in RUN_ARMS:  # (the descriptor arm trains nothing: no log)
            if not run_path(out, loss, arm, seed).is_file():
                continue
            meta = json.loads(run_path(out, loss, arm, seed).read_text())
            steps = [e["step"] for e in meta["log"]]
            for col, key in enumerate(("frac_pos_violating", "frac_neg_violating")):
                axes[row][col].plot(steps, [e[key] for e in meta["log"]], label=arm, marker=".")
        for col, what in enumerate(("genuine pairs below m+", "impostor pairs above m−")):
            axes[row][col].set(
                title=f"{loss} (seed {seed}): {what}", xlabel="step", ylabel="share of batch pairs"
            )
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out: Path,
    docs: Path,
    draws: int,
    *,
    plot: bool = True,
    name: str = "consistency",
    what: str = "regime (a)",
    command: str = "python -m studies.consistency --aggregate-only",
    design: Design = Design(),
    reference: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """``<name>_table.md``, ``<name>_summary.json`` and ``<name>_violations.png`` in ``docs``."""
    summary = aggregate(out, draws=draws, design=design, reference=reference)
    docs.mkdir(parents=True, exist_ok=True)
    text = render(summary, draws)
    (docs / f"{name}_table.md").write_text(
        f"# Consistency study (issue 27), {what}: generated by `{command}` from the per-run "
        f"files in `{out}/`\n\n" + text
    )
    (docs / f"{name}_summary.json").write_text(
        json.dumps(
            {
                "draws": draws,
                "rule": {"min_drop": MIN_DROP, "r1_slack_pt": R1_SLACK_PT, "keys": list(RULE_KEYS)},
                "losses": summary,
            },
            indent=1,
        )
    )
    if plot:
        plot_logs(out, summary, docs / f"{name}_violations.png")
    return summary


# --- the study ---------------------------------------------------------------------------------


def load_cub(
    common: list[str],
) -> tuple[tuple[FeatureSet, FeatureSet], tuple[FeatureSet, FeatureSet]]:
    """((train minus validation, validation), (all training species, test species)) features."""
    from training.data import load_splits

    val_splits = load_splits(load_config(None, [*common, "val_classes=14"]))
    main_splits = load_splits(load_config(None, common))
    assert val_splits.val is not None

    def fs(split: Any) -> FeatureSet:
        return FeatureSet(split.x, split.y)

    return (fs(val_splits.train), fs(val_splits.val)), (fs(main_splits.train), fs(main_splits.test))


def person_of(member: str) -> str:
    """The person of a face archive member (``<root>/<person>/<file>``)."""
    return member.split("/")[-2]


def faces_split(
    names: Sequence[str], vectors: np.ndarray, detected: np.ndarray
) -> tuple[tuple[FeatureSet, FeatureSet], tuple[FeatureSet, FeatureSet]]:
    """The addendum's LFW split of cached descriptors: detected faces only, at most
    ``FACES_MAX_IMAGES`` per person (the first by file name); of the people with >= 4, a fixed
    permutation gives ``FACES_TEST_PEOPLE`` test and then ``FACES_VAL_PEOPLE`` validation
    people; every other person with >= 2 trains. Returns ((training people, validation people),
    (training + validation people, test people)), rows in file-name order, labels per person."""
    keep: dict[str, list[int]] = {}
    for i in sorted(range(len(names)), key=lambda i: names[i]):
        if detected[i]:
            rows = keep.setdefault(person_of(names[i]), [])
            if len(rows) < FACES_MAX_IMAGES:
                rows.append(i)
    people = sorted(keep)
    label = {p: k for k, p in enumerate(people)}
    four = [p for p in people if len(keep[p]) >= 4]
    order = np.random.default_rng(FACES_SPLIT_SEED).permutation(len(four))
    need = FACES_TEST_PEOPLE + FACES_VAL_PEOPLE
    if len(four) < need:
        raise ValueError(f"{len(four)} people with >= 4 detected images; the split needs {need}")
    test = {four[i] for i in order[:FACES_TEST_PEOPLE]}
    val = {four[i] for i in order[FACES_TEST_PEOPLE:need]}
    train = {p for p in people if len(keep[p]) >= 2 and p not in test and p not in val}

    def features(group: set[str]) -> FeatureSet:
        return _labelled(names, vectors, [i for p in sorted(group) for i in keep[p]], label)

    return (features(train), features(val)), (features(train | val), features(test))


def _labelled(
    names: Sequence[str], vectors: np.ndarray, rows: list[int], label: dict[str, int]
) -> FeatureSet:
    """These rows' descriptors, each labelled with its person's number in ``label``."""
    x = torch.from_numpy(np.asarray(vectors[rows], np.float32))
    y = torch.tensor([label[person_of(names[i])] for i in rows], dtype=torch.int64)
    return FeatureSet(x, y)


def faces_orl(names: Sequence[str], vectors: np.ndarray, detected: np.ndarray) -> FeatureSet:
    """ORL, the second test population: every detected photo of its 40 people."""
    rows = sorted((i for i in range(len(names)) if detected[i]), key=lambda i: names[i])
    people = sorted({person_of(names[i]) for i in rows})
    return _labelled(names, vectors, rows, {p: k for k, p in enumerate(people)})


def load_faces(
    data_dir: Path, cache: Path
) -> tuple[tuple[tuple[FeatureSet, FeatureSet], tuple[FeatureSet, FeatureSet]], FeatureSet]:
    """(LFW's split, ORL) from the descriptor cache (``python -m training.face_cache`` fills
    it; nothing is extracted here)."""
    from training import face_cache as fc

    lfw = fc.cached(data_dir / fc.LFW_ZIP, root=cache)
    orl = fc.cached(data_dir / fc.ORL_ZIP, root=cache)
    if not lfw.names or not orl.names:
        raise FileNotFoundError(
            f"no cached face descriptors under {cache}: run `python -m training.face_cache "
            f"--data-dir {data_dir} --what orl lfw` first"
        )
    return faces_split(lfw.names, lfw.vectors, lfw.detected), faces_orl(
        orl.names, orl.vectors, orl.detected
    )


def run_study(
    out: Path,
    losses: dict[str, list[str]],
    common: list[str],
    seeds: Sequence[int],
    data: tuple[tuple[FeatureSet, FeatureSet], tuple[FeatureSet, FeatureSet]],
    *,
    stop_at: float | None = None,
    log_every: int = LOG_EVERY,
    arms: Sequence[str] = RUN_ARMS,
) -> list[tuple[str, str, int]]:
    """Validation per loss, then seed by seed every loss and arm; returns what ran now.
    ``stop_at`` (a ``time.time()``): start no new run after it."""
    (tr_val, val), (train, test) = data
    validations = {}
    for loss, settings in losses.items():
        base = load_config(None, [*common, *settings, "tcm=false"])
        validations[loss] = validate(base, tr_val, val, out / loss / "validation.json")
        console.print(
            f"{loss}: validation choice {validations[loss]['chosen']}, "
            f"K = {validations[loss]['asnorm_k']}"
        )
    ran = []
    for seed in seeds:
        for loss, settings in losses.items():
            base = load_config(None, [*common, *settings, "tcm=false"])
            for arm in arms:
                if stop_at is not None and time.time() > stop_at:
                    console.print("stop time reached: no new runs")
                    return ran
                if run_one(
                    out, loss, arm, seed, base, validations[loss], train, test, log_every=log_every
                ):
                    ran.append((loss, arm, seed))
                    console.print(f"done {loss} {arm} seed {seed}")
    return ran


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=["cub", "faces"], default="cub")
    p.add_argument(
        "--regime",
        choices=["a", "b"],
        default="a",
        help="cub: a = frozen Lite0 + head; b = its last stage tuned too (docs/results.md)",
    )
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", type=Path, default=None, help="default: per study")
    p.add_argument("--docs", type=Path, default=Path("docs/results"))
    p.add_argument("--feature-cache", default="runs/features")
    p.add_argument("--face-cache", type=Path, default=Path("runs/face_cache"))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the plan's")
    p.add_argument("--losses", nargs="+", default=None, choices=list(LOSSES))
    p.add_argument("--bootstrap", type=int, default=2000)
    # one thread: the head's steps are ~10 ms, and two threads on the busy 2-core VM made
    # them ~25x slower (thread hand-offs under contention); two losses run as two processes
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-at", default="", help="UTC HH:MM: start no new run after it")
    p.add_argument("--aggregate-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stop_at = None
    if args.stop_at:
        import datetime as dt

        h, m = map(int, args.stop_at.split(":"))
        now = dt.datetime.now(dt.UTC)
        stop_at = now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()
    common = [*COMMON, "epochs=2", "steps_per_epoch=100"]
    if args.study == "cub":
        regime = CUB_REGIMES[args.regime]
        out = args.out or regime.out
        losses = {k: LOSSES[k] for k in args.losses or regime.losses}
        common += regime.settings
        if not args.aggregate_only:
            common += [f"data_dir={args.data_dir}", f"feature_cache={args.feature_cache}"]
            data = load_cub(common)
            seeds = args.seeds or regime.seeds
            run_study(out, losses, common, seeds, data, stop_at=stop_at, arms=regime.run_arms)
        regime_flag = "" if args.regime == "a" else f" --regime {args.regime}"
        summary = write_outputs(
            out,
            args.docs,
            args.bootstrap,
            name=regime.name,
            what=regime.what,
            command=f"python -m studies.consistency{regime_flag} --aggregate-only",
            design=regime.design,
            reference=regime.reference,
        )
        console.print(render(summary, args.bootstrap))
        return
    losses = {k: LOSSES[k] for k in args.losses or DEFAULT_LOSSES}
    # faces (docs/results.md, the addendum): the same training on LFW, tested on LFW and ORL
    out = args.out or Path("docs/results/consistency_faces")
    common += FACES_SETTINGS
    if not args.aggregate_only:
        data, orl = load_faces(Path(args.data_dir), args.face_cache)
        (tr_val, val), (train, test) = data
        console.print(
            f"faces: {len(torch.unique(train.y))} training people ({len(train.y)} images), "
            f"{len(torch.unique(val.y))} validation, {len(torch.unique(test.y))} test "
            f"({len(test.y)} images); ORL {len(torch.unique(orl.y))} people ({len(orl.y)})"
        )
        for seed in args.seeds or range(10):  # seed by seed, both populations together
            for population, test_set in (("lfw", test), ("orl", orl)):
                run_study(
                    out / population,
                    losses,
                    common,
                    [seed],
                    ((tr_val, val), (train, test_set)),
                    stop_at=stop_at,
                    arms=FACE_ARMS,
                )
    for population in ("lfw", "orl"):
        summary = write_outputs(
            out / population,
            args.docs,
            args.bootstrap,
            name=f"consistency_faces_{population}",
            what=f"faces, tested on {population.upper()}",
            command="python -m studies.consistency --study faces --aggregate-only",
        )
        console.print(render(summary, args.bootstrap))


if __name__ == "__main__":
    main()
