"""The ``tcm-train`` commands end to end, and bad input stopping before training starts."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tcm import read_manifest
from tests.training.conftest import DIGITS
from training.cli import app

runner = CliRunner()


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_fit_evaluate_export_compare(tmp_path) -> None:
    quick = _sets([*DIGITS, "epochs=1", "steps_per_epoch=6"])
    for name, tcm in (("with", "true"), ("without", "false")):
        r = _invoke("fit", "-o", str(tmp_path / name), *quick, "--set", f"tcm={tcm}")
        assert r.exit_code == 0, r.output
        assert "R@1=" in r.output and "OPIS=" in r.output
    saved = (tmp_path / "with" / "config.yaml").read_text()
    assert "tcm: true" in saved and "dataset: digits" in saved
    r = _invoke("evaluate", "--run", str(tmp_path / "with"), "--no-plots")
    assert r.exit_code == 0 and "tau=" in r.output
    r = _invoke("export", "--run", str(tmp_path / "with"), "-o", str(tmp_path / "art"))
    assert r.exit_code == 0, r.output
    manifest = read_manifest(tmp_path / "art")
    assert manifest.model_version in r.output
    assert manifest.model_version.startswith("digits-small_cnn-multi_similarity-tcm-")
    r = _invoke(
        "compare",
        str(tmp_path / "with"),
        str(tmp_path / "without"),
        "--plot",
        str(tmp_path / "cmp.png"),
    )
    assert r.exit_code == 0, r.output
    assert "multi_similarity + TCM" in r.output and "tcm=False" in r.output
    assert (tmp_path / "cmp.png").stat().st_size > 5000


def test_sweep_on_validation_classes(tmp_path) -> None:
    base = _sets(
        [
            "dataset=digits",
            "image_size=16",
            "width=8",
            "embedding_dim=16",
            "batch_size=24",
            "m_per_class=8",
            "epochs=1",
            "steps_per_epoch=4",
            "val_classes=2",
        ]
    )
    r = _invoke("sweep", "-o", str(tmp_path), *base, "-g", "m_plus=0.7,0.9")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "compare_val.json").read_text())
    assert [row["differs"] for row in rows] == ["m_plus=0.7", "m_plus=0.9"]
    for row in rows:  # judged on the 2 validation classes, never on the test classes
        report = json.loads(
            (tmp_path / f"m_plus={row['config']['m_plus']}" / "report_val.json").read_text()
        )
        assert report["num_classes"] == 2 and report["split"] == "val"
    assert not list(tmp_path.glob("*/report.json"))


def test_default_model_is_skipped_when_present(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    r = _invoke("default-model", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none"))
    assert r.exit_code == 0 and "already" in r.output


def test_presets_are_valid_configs_and_unknown_ones_refused(tmp_path) -> None:
    from training.cli import PRESETS
    from training.config import load_config

    for name, settings in PRESETS.items():
        cfg = load_config(None, settings)
        assert cfg.dataset == {"omniglot": "omniglot", "faces": "lfw", "birds": "cub"}[name]
        assert cfg.tcm == (name == "omniglot")  # faces, birds: see docs/results.md
    r = runner.invoke(app, ["default-model", "--preset", "cats", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown preset 'cats'" in r.output


def _folder(root, counts: dict[str, int]):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_data", "Omniglot not found"),
        ("empty_folder", "no class sub-folders"),
        ("single_images", "single image"),
        ("unknown_arch", "arch 'resnet7' is not one of"),
        ("unknown_loss", "loss 'triplet' is not one of"),
        ("unknown_key", "unknown config key 'lerning_rate'"),
        ("too_few_classes", "needs at least batch_size / m_per_class"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, case: str, match: str) -> None:
    settings = {
        "missing_data": ["dataset=omniglot", f"data_dir={tmp_path / 'nowhere'}"],
        "empty_folder": ["dataset=imagefolder", f"data_dir={_folder(tmp_path / 'empty', {})}"],
        "single_images": [
            "dataset=imagefolder",
            f"data_dir={_folder(tmp_path / 'imgs', {f'c{i}': 1 for i in range(6)})}",
        ],
        "unknown_arch": [*DIGITS, "arch=resnet7"],
        "unknown_loss": [*DIGITS, "loss=triplet"],
        "unknown_key": [*DIGITS, "lerning_rate=0.1"],
        "too_few_classes": [*DIGITS, "batch_size=64", "m_per_class=4"],
    }[case]
    out = tmp_path / "run"
    r = _invoke("fit", "-o", str(out), *_sets(settings))
    assert r.exit_code == 2
    assert match in " ".join(r.output.split())
    assert not (out / "checkpoint.pt").exists()


def test_resume_from_another_config_is_refused_by_the_cli(tmp_path) -> None:
    quick = _sets([*DIGITS, "epochs=1", "steps_per_epoch=2"])
    assert _invoke("fit", "-o", str(tmp_path), "--no-evaluate", *quick).exit_code == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    r = _invoke(
        "fit", "-o", str(tmp_path), "--no-evaluate", "--resume", *quick, "--set", "m_minus=0.1"
    )
    assert r.exit_code == 2
    assert "cannot resume" in r.output and "m_minus" in r.output
    r = _invoke("fit", "-o", str(tmp_path), "--no-evaluate", *quick)
    assert r.exit_code == 2 and "already holds a checkpoint" in " ".join(r.output.split())
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # untouched
