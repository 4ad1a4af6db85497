import json

import numpy as np
import pytest
import torch

from tcm import (
    Baseline,
    Calibration,
    Manifest,
    Preprocessing,
    build_embedder,
    load_artefact,
    read_manifest,
    save_artefact,
    to_input_tensor,
)


def _manifest(**over) -> Manifest:
    base = dict(
        model_version="test-v1",
        architecture="small_cnn",
        architecture_kwargs={"in_channels": 1, "embedding_dim": 16, "width": 8},
        preprocessing=Preprocessing(image_size=(16, 16)),
        embedding_dim=16,
        calibration=Calibration(
            tau=0.5, target_far=0.01, far_at_tau=0.009, frr_at_tau=0.2, tau_lo=0.3, tau_hi=0.7
        ),
        baseline=Baseline(
            opis=0.01,
            eps_opis=0.1,
            eps=0.05,
            recall_at_1=0.9,
            map_at_r=0.5,
            num_classes=10,
            num_images=100,
        ),
    )
    base.update(over)
    return Manifest(**base)


def test_round_trip_gives_identical_embeddings(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_embedder("small_cnn", in_channels=1, embedding_dim=16, width=8).eval()
    x = torch.rand(5, 1, 16, 16)
    saved = save_artefact(tmp_path, model, _manifest())
    assert len(saved.weights_sha256) == 64
    loaded, manifest = load_artefact(tmp_path)
    assert manifest == saved
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a, b)
    assert torch.allclose(b.norm(dim=1), torch.ones(5))
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 1
    # readable by another user (a container's service user), not mkstemp's 0600
    for f in ("manifest.json", "model.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f


def test_tampered_weights_rejected(tmp_path) -> None:
    model = build_embedder("small_cnn", in_channels=1, embedding_dim=16, width=8)
    save_artefact(tmp_path, model, _manifest())
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_artefact(tmp_path)


def test_bad_manifests_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    d = _manifest().to_dict()
    d["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="format_version"):
        read_manifest(tmp_path)
    d["format_version"] = 1
    del d["calibration"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="malformed"):
        read_manifest(tmp_path)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_embedder("resnet9000")


def test_preprocessing_grey_rgb_resize_invert() -> None:
    spec = Preprocessing(image_size=(4, 4), channels=1, mean=(0.0,), std=(1.0,), invert=True)
    white = np.full((8, 8), 255, np.uint8)
    out = to_input_tensor([white], spec)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out, torch.zeros(1, 1, 4, 4))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    grey = to_input_tensor(rgb, Preprocessing(image_size=(4, 4), mean=(0.0,), std=(1.0,)))
    torch.testing.assert_close(grey, torch.full((1, 1, 4, 4), 0.299))
    spec3 = Preprocessing(image_size=(2, 2), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    out3 = to_input_tensor([np.zeros((2, 2), np.uint8)], spec3)
    torch.testing.assert_close(out3, torch.full((1, 3, 2, 2), -1.0))
    boolean = to_input_tensor([np.ones((4, 4), bool)], spec)
    torch.testing.assert_close(boolean, torch.zeros(1, 1, 4, 4))


def test_preprocessing_validation() -> None:
    with pytest.raises(ValueError, match="channels"):
        Preprocessing(channels=2)
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(channels=3)
    with pytest.raises(ValueError, match="uint8"):
        to_input_tensor([np.zeros((4, 4), np.float32)], Preprocessing())
    with pytest.raises(ValueError, match="no images"):
        to_input_tensor([], Preprocessing())
    spec = Preprocessing.from_dict(Preprocessing(image_size=(5, 7), invert=True).to_dict())
    assert spec.image_size == (5, 7) and spec.invert


def _with_cohort(tmp_path, dim: int = 16):
    from tcm import load_cohort
    from tcm.artefact import add_cohort

    torch.manual_seed(0)
    model = build_embedder("small_cnn", in_channels=1, embedding_dim=16, width=8).eval()
    saved = save_artefact(tmp_path, model, _manifest())
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(50, dim)).astype(np.float32)
    held = rng.normal(size=(60, 16)).astype(np.float32)
    labels = np.repeat(np.arange(12), 5)
    return saved, add_cohort(tmp_path, saved, cohort, held, labels, top_k=10), load_cohort


def test_cohort_round_trip_and_as_norm_calibration(tmp_path) -> None:
    from tcm.asnorm import Cohort, as_norm_pair_scores
    from tcm.calibration import threshold_at_far

    saved, m, load_cohort = _with_cohort(tmp_path)
    assert read_manifest(tmp_path) == m
    assert m.threshold_units == "as-norm" and saved.threshold_units == "cosine"
    assert m.model_version == f"test-v1-asnorm-{m.score_norm['sha256'][:8]}"
    sec = m.score_norm
    assert sec["kind"] == "as-norm" and sec["top_k"] == 10 and sec["cohort_size"] == 50
    assert sec["cosine_calibration"]["tau"] == saved.calibration.tau
    _, loaded = load_artefact(tmp_path)
    cohort = load_cohort(tmp_path, loaded)
    assert isinstance(cohort, Cohort) and cohort.size == 50 and cohort.top_k == 10
    # tau is the AS-norm threshold at the same target FAR (recomputed here from the file)
    rng = np.random.default_rng(0)
    rng.normal(size=(50, 16))
    held = rng.normal(size=(60, 16)).astype(np.float32)
    _, imp = as_norm_pair_scores(held, np.repeat(np.arange(12), 5), cohort)
    assert m.calibration.tau == threshold_at_far(imp, saved.calibration.target_far)
    assert m.calibration.target_far == saved.calibration.target_far
    assert m.calibration.tau_lo <= m.calibration.tau <= m.calibration.tau_hi
    assert (tmp_path / "cohort.safetensors").stat().st_mode & 0o777 == 0o644
    # the baseline OPIS is re-measured on the AS-normalised held-out scores (the cosine one kept)
    from tcm import consistency_from_scores
    from tcm.asnorm import as_norm_class_scores

    assert sec["cosine_baseline"]["opis"] == saved.baseline.opis
    gen, imp = as_norm_class_scores(held, np.repeat(np.arange(12), 5), cohort)
    cal = m.calibration
    want = consistency_from_scores(
        gen, imp, tau_range=(cal.tau_lo, cal.tau_hi), eps=saved.baseline.eps, tau=cal.tau
    )
    assert m.baseline.opis == pytest.approx(want.opis) and m.baseline.opis != saved.baseline.opis
    assert m.baseline.opis_interval is not None


def test_cohort_of_another_dimension_or_hash_is_refused(tmp_path) -> None:
    import json as _json

    from tcm.artefact import save_cohort

    _with_cohort(tmp_path)
    d = _json.loads((tmp_path / "manifest.json").read_text())
    good = dict(d["score_norm"])
    d["score_norm"]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(_json.dumps(d))
    with pytest.raises(ValueError, match="does not match the sha256") as e:
        load_artefact(tmp_path)
    assert "\n" not in str(e.value)
    d["score_norm"] = good | save_cohort(tmp_path, np.ones((5, 8), np.float32), top_k=2)
    (tmp_path / "manifest.json").write_text(_json.dumps(d))
    with pytest.raises(ValueError, match="dimension is 16") as e:
        load_artefact(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"1\.\.2000 embeddings"):
        save_cohort(tmp_path, np.ones((2001, 16), np.float32), top_k=2)
    with pytest.raises(ValueError, match="top-k"):
        save_cohort(tmp_path, np.ones((5, 16), np.float32), top_k=6)
