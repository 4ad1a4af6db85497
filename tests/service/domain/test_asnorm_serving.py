"""Serve-time AS-norm (an artefact with a cohort), through the real app: decisions equal a
brute-force AS-norm over the gallery, candidates keep the cosine ranking, the statistics of an
item do not depend on how it entered the index, a cohort that does not fit refuses the artefact
in one line, and an artefact without one answers exactly as before (raw cosine, no new
fields)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.domain.inputs import as_unit_vector
from service.monitoring.pairs import feedback_scores, gallery_scores
from tcm import load_artefact, read_manifest, to_input_tensor
from tcm.artefact import add_cohort, save_cohort
from tests.service.conftest import ADMIN_TOKEN, STORES, Digits, b64_png, make_settings, unit

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TOP_K = 20


@pytest.fixture(scope="module")
def embedded(artefact: Path, digits: Digits) -> np.ndarray:
    """Every digit embedded by the test artefact's model, as the service keeps an embedding
    it is sent (``as_unit_vector``): the brute force scores exactly the vectors served. (This
    untrained model's top-k cohort scores spread by ~1e-4 around 0.999, so a vector one float32
    step off would move an AS score by ~1e-3.)"""
    model, m = load_artefact(artefact)
    with torch.no_grad():
        e = model(to_input_tensor(list(digits.images), m.preprocessing)).numpy()
    return np.stack([as_unit_vector(row, e.shape[1], where="test") for row in e])


@pytest.fixture(scope="module")
def cohort_artefact(
    artefact: Path, digits: Digits, embedded: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The test artefact with a cohort of 150 images of digits 0-4 (the "training classes")
    and tau recalibrated on AS-normalised pairs of digits 5-9 (the held-out ones)."""
    out = tmp_path_factory.mktemp("asnorm") / "art"
    shutil.copytree(artefact, out)
    train = np.flatnonzero(digits.labels < 5)[:150]
    held = np.flatnonzero(digits.labels >= 5)
    add_cohort(
        out,
        read_manifest(out),
        embedded[train],
        embedded[held],
        digits.labels[held],
        top_k=TOP_K,
    )
    return out


def _cohort(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    c = load_file(str(path / "cohort.safetensors"))["embeddings"].astype(np.float64)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _brute_stats(x: np.ndarray, cohort: np.ndarray) -> tuple[float, float]:
    """Mean and spread of one vector's top-k cohort scores, by sorting every score."""
    s = sorted((float(np.dot(x.astype(np.float64), c)) for c in cohort), reverse=True)[:TOP_K]
    return float(np.mean(s)), max(float(np.std(s)), 1e-6)


def _brute_as(cos: float, a: tuple[float, float], b: tuple[float, float]) -> float:
    return 0.5 * ((cos - a[0]) / a[1] + (cos - b[0]) / b[1])


def _new_tenant(c: TestClient) -> tuple[str, dict[str, str]]:
    r = c.post("/v1/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["tenant_id"], {"Authorization": f"Bearer {r.json()['api_key']}"}


def _gallery(digits: Digits, embedded: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """8 photos of each held-out digit (5-9) as the gallery: ids, vectors, subjects."""
    rows = np.concatenate([np.flatnonzero(digits.labels == d)[:8] for d in range(5, 10)])
    return [f"i{r}" for r in rows], embedded[rows], [f"d{digits.labels[r]}" for r in rows]


def _enrol(c: TestClient, auth: dict[str, str], ids: list[str], vecs: np.ndarray, subj: list[str]):
    items = [
        {"item_id": i, "subject": s, "embedding": v.tolist()}
        for i, v, s in zip(ids, vecs, subj, strict=True)
    ]
    r = c.post("/v1/gallery", json={"items": items}, headers=auth)
    assert r.status_code == 201, r.text


def _probes(digits: Digits, embedded: np.ndarray) -> np.ndarray:
    """Other photos of the enrolled digits, strangers (digits 0-4), a gallery item itself and
    random directions."""
    rows = [
        *np.flatnonzero(digits.labels >= 5)[100:115],
        *np.flatnonzero(digits.labels < 5)[300:310],
    ]
    rand = np.array([unit(s) for s in range(5)], np.float32)
    own = embedded[np.flatnonzero(digits.labels == 7)[:1]]
    return np.concatenate([embedded[rows], own, rand]).astype(np.float32)


def test_decisions_equal_brute_force_as_norm(
    cohort_artefact: Path, digits: Digits, embedded: np.ndarray, tmp_path: Path
) -> None:
    m = read_manifest(cohort_artefact)
    tau = m.calibration.tau
    cohort = _cohort(cohort_artefact)
    ids, vecs, subjects = _gallery(digits, embedded)
    item_stats = [_brute_stats(v, cohort) for v in vecs]
    store = {"store_url": f"sqlite:///{tmp_path / 's.db'}"}
    with TestClient(create_app(make_settings(cohort_artefact, store))) as c:
        tenant_id, auth = _new_tenant(c)
        _enrol(c, auth, ids, vecs, subjects)
        # the statistics kept beside the index are the brute force's (float32-rounded)
        kept = np.array(_index_stats(c, tenant_id))
        want_stats = np.array(sorted(item_stats))
        np.testing.assert_allclose(kept[:, 0], want_stats[:, 0], rtol=1e-6)
        np.testing.assert_allclose(kept[:, 1], want_stats[:, 1], rtol=1e-5)
        info = c.get("/v1/model").json()
        assert info["threshold"] == tau
        assert info["score_normalisation"] == {
            "kind": "as-norm",
            "top_k": TOP_K,
            "cohort_size": 150,
            "threshold_units": "as-norm",
            "cosine_threshold": m.score_norm["cosine_calibration"]["tau"],
        }
        decided = []
        for q in _probes(digits, embedded):
            r = c.post("/v1/match", json={"embedding": q.tolist(), "k": 10}, headers=auth)
            assert r.status_code == 200, r.text
            body = r.json()
            cos = vecs.astype(np.float64) @ q.astype(np.float64)
            order = np.argsort(-cos, kind="stable")[:10]
            p = _brute_stats(q, cohort)
            got = body["candidates"]
            # ranked by cosine (R@1 unchanged by construction), scored by AS-norm. The brute
            # force normalises the service's own cosines: FAISS's float32 inner product is
            # ~6e-8 off, which the ~1e-4 spread of this model's cohort scores turns into ~1e-3
            assert [h["item_id"] for h in got] == [ids[j] for j in order]
            np.testing.assert_allclose([h["cosine"] for h in got], cos[order], atol=1e-5)
            want = [
                _brute_as(h["cosine"], item_stats[j], p) for h, j in zip(got, order, strict=True)
            ]
            # the kept statistics are float32 (a mean of 0.999 is ~6e-8 off): the same noise
            tol = [3e-7 * (1 / item_stats[j][1] + 1 / p[1]) + 1e-6 for j in order]
            assert all(abs(h["score"] - w) <= t for h, w, t in zip(got, want, tol, strict=True)), [
                (h["score"], w, t) for h, w, t in zip(got, want, tol, strict=True)
            ]
            top = want[0]
            assert not all(abs(w - tau) < 0.5 for w in want)  # AS units, far from cosines
            assert body["threshold"] == tau
            assert body["decision"]["score"] == got[0]["score"]
            assert body["decision"]["cosine"] == got[0]["cosine"]
            if abs(top - tau) > tol[0]:  # away from the threshold's float noise
                assert body["decision"]["accepted"] == (top >= tau)
            decided.append(body["decision"]["accepted"])
            # verify: the best pair by cosine, its AS-normalised score decides
            j = int(order[0])
            v = c.post(
                "/v1/verify",
                json={"a": {"item_id": ids[j]}, "b": {"embedding": q.tolist()}},
                headers=auth,
            ).json()
            assert v["cosine"] == pytest.approx(float(cos[j]), abs=1e-5)
            want_v = _brute_as(v["cosine"], item_stats[j], p)
            assert abs(v["score"] - want_v) <= tol[0]
            assert v["accepted"] == (v["score"] >= tau)
            s = c.post(
                "/v1/verify",
                json={"a": {"subject": subjects[j]}, "b": {"embedding": q.tolist()}},
                headers=auth,
            ).json()
            # the subject's best item: the same pair (its cosine from a wider product)
            assert s["cosine"] == pytest.approx(v["cosine"], abs=1e-6)
            assert abs(s["score"] - v["score"]) <= tol[0]
        assert any(decided) and not all(decided)


def _index_stats(c: TestClient, tenant_id: str) -> list[tuple[float, float]]:
    ix = c.app.state.runtime.serving.indexes.get(tenant_id)
    return sorted(ix._stats.values())


@pytest.mark.parametrize("kind", STORES)
def test_statistics_do_not_depend_on_how_an_item_entered_the_index(
    kind: str, cohort_artefact: Path, digits: Digits, embedded: np.ndarray, store_settings
) -> None:
    """Tenant A's items are loaded at start-up (one block per tenant), tenant B's identical
    vectors are enrolled after start-up, a few at a time: the kept statistics are the same
    numbers, and so are the decisions."""
    settings = make_settings(cohort_artefact, store_settings(kind))
    ids, vecs, subjects = _gallery(digits, embedded)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/tenants", json={"name": "a"}, headers=ADMIN).json()
        a_id, a = r["tenant_id"], {"Authorization": f"Bearer {r['api_key']}"}
        _enrol(c, a, ids, vecs, subjects)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/tenants", json={"name": "b"}, headers=ADMIN).json()
        b_id, b = r["tenant_id"], {"Authorization": f"Bearer {r['api_key']}"}
        for lo in range(0, len(ids), 3):
            _enrol(c, b, ids[lo : lo + 3], vecs[lo : lo + 3], subjects[lo : lo + 3])
        sa, sb = _index_stats(c, a_id), _index_stats(c, b_id)
        assert len(sa) == len(ids) and sa == sb
        for q in _probes(digits, embedded)[:8]:
            body = {"embedding": q.tolist(), "k": 5}
            ra = c.post("/v1/match", json=body, headers=a).json()
            rb = c.post("/v1/match", json=body, headers=b).json()
            assert ra["candidates"] == rb["candidates"] and ra["decision"] == rb["decision"]


def test_a_cohort_that_does_not_fit_refuses_the_artefact(
    cohort_artefact: Path, tmp_path: Path
) -> None:
    def store(name: str) -> dict[str, str]:  # each start its own registry
        return {"store_url": f"sqlite:///{tmp_path / name}.db"}

    tampered = tmp_path / "sha"
    shutil.copytree(cohort_artefact, tampered)
    d = json.loads((tampered / "manifest.json").read_text())
    d["score_norm"]["sha256"] = "0" * 64
    (tampered / "manifest.json").write_text(json.dumps(d))
    with (
        pytest.raises(ValueError, match="does not match the sha256") as e,
        TestClient(create_app(make_settings(tampered, store("a")))),
    ):
        pass
    assert "\n" not in str(e.value)
    other_dim = tmp_path / "dim"
    shutil.copytree(cohort_artefact, other_dim)
    d = json.loads((other_dim / "manifest.json").read_text())
    d["score_norm"] |= save_cohort(other_dim, np.eye(8, dtype=np.float32), top_k=4)
    (other_dim / "manifest.json").write_text(json.dumps(d))
    with (
        pytest.raises(ValueError, match="the model's dimension is 64") as e,
        TestClient(create_app(make_settings(other_dim, store("b")))),
    ):
        pass
    assert "\n" not in str(e.value)
    # staged on a running server: refused as an unusable artefact, the served model unchanged
    with TestClient(create_app(make_settings(cohort_artefact, store("c")))) as c:
        r = c.post("/v1/models", json={"path": str(other_dim)}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["code"] == "invalid_artefact"
        assert "dimension is 64" in r.json()["message"]


def test_without_a_cohort_scores_are_raw_cosine_and_fields_unchanged(
    artefact: Path, digits: Digits, embedded: np.ndarray, tmp_path: Path
) -> None:
    m = read_manifest(artefact)
    assert m.score_norm is None and m.threshold_units == "cosine"
    ids, vecs, subjects = _gallery(digits, embedded)
    store = {"store_url": f"sqlite:///{tmp_path / 's.db'}"}
    with TestClient(create_app(make_settings(artefact, store))) as c:
        _, auth = _new_tenant(c)
        _enrol(c, auth, ids, vecs, subjects)
        info = c.get("/v1/model").json()
        assert "score_normalisation" not in info and info["threshold"] == m.calibration.tau
        for q in _probes(digits, embedded)[:10]:
            body: dict[str, Any] = c.post(
                "/v1/match", json={"embedding": q.tolist(), "k": 5}, headers=auth
            ).json()
            cos = vecs.astype(np.float64) @ q.astype(np.float64)
            order = np.argsort(-cos, kind="stable")[:5]
            assert set(body) == {"match_id", "decision", "candidates", "threshold", "model_version"}
            assert set(body["decision"]) == {"accepted", "subject", "score"}
            assert all(set(h) == {"item_id", "subject", "score"} for h in body["candidates"])
            np.testing.assert_allclose(
                [h["score"] for h in body["candidates"]], cos[order], atol=1e-5
            )
            assert body["decision"]["accepted"] == (body["decision"]["score"] >= m.calibration.tau)
            v = c.post(
                "/v1/verify",
                json={"a": {"item_id": ids[int(order[0])]}, "b": {"embedding": q.tolist()}},
                headers=auth,
            ).json()
            assert set(v) == {"score", "accepted", "threshold", "model_version"}
            assert v["score"] == pytest.approx(float(cos[order[0]]), abs=1e-5)


def test_monitor_pairs_use_the_decision_score(cohort_artefact: Path, embedded: np.ndarray) -> None:
    """The monitor's gallery pairs are AS-normalised as decided, and feedback scores (stored
    decision scores) are not clipped to the cosine's range."""
    from tcm import load_cohort

    m = read_manifest(cohort_artefact)
    cohort = load_cohort(cohort_artefact, m)
    assert cohort is not None
    x = embedded[:12]
    subjects = [f"s{i % 3}" for i in range(12)]
    got = gallery_scores(subjects, x, max_items=100, max_pairs=1000, seed=0, cohort=cohort)
    c = _cohort(cohort_artefact)
    st = [_brute_stats(v, c) for v in x]
    gen, imp = [], []
    for i in range(12):
        for j in range(i + 1, 12):
            s = _brute_as(float(np.dot(x[i].astype(np.float64), x[j])), st[i], st[j])
            (gen if subjects[i] == subjects[j] else imp).append(s)
    # float32 cosines, ~1e-4 spreads (see the brute-force match test): ~1e-3 of noise
    np.testing.assert_allclose(got.genuine, np.sort(gen), atol=5e-3)
    np.testing.assert_allclose(got.impostor, np.sort(imp), atol=5e-3)
    assert feedback_scores([], model_version="v", bounded=False).size == 0


def test_a_switch_to_a_cohort_artefact_computes_the_items_statistics(
    artefact: Path, cohort_artefact: Path, digits: Digits, tmp_path: Path
) -> None:
    """Images enrolled under the plain model are re-embedded by the switch to the cohort
    artefact (its own version) and enter the new index with their statistics; the answers then
    normalise, and match what an enrolment after the switch gets."""
    from tests.service.runtime.test_restart import FAST_SWITCH, _switch

    version = read_manifest(cohort_artefact).model_version
    assert version.startswith("digits-test-v1-asnorm-")
    store = {"store_url": f"sqlite:///{tmp_path / 's.db'}"}
    rows = [int(np.flatnonzero(digits.labels == d)[i]) for d in range(5, 10) for i in range(3)]
    items = [
        {"item_id": f"i{r}", "subject": f"d{digits.labels[r]}", "image": b64_png(digits.images[r])}
        for r in rows
    ]
    with TestClient(create_app(make_settings(artefact, store))) as c:
        a_id, a = _new_tenant(c)
        assert c.post("/v1/gallery", json={"items": items}, headers=a).status_code == 201
    with TestClient(create_app(make_settings(cohort_artefact, store, **FAST_SWITCH))) as c:
        _switch(c, str(cohort_artefact), version=version)
        assert c.get("/v1/model").json()["score_normalisation"]["kind"] == "as-norm"
        b_id, b = _new_tenant(c)  # the same photos, enrolled after the switch
        assert c.post("/v1/gallery", json={"items": items}, headers=b).status_code == 201
        sa, sb = _index_stats(c, a_id), _index_stats(c, b_id)
        assert len(sa) == len(rows) and sa == sb
        probe = {"image": b64_png(digits.images[int(np.flatnonzero(digits.labels == 6)[5])])}
        ra = c.post("/v1/match", json={**probe, "k": 5}, headers=a).json()
        rb = c.post("/v1/match", json={**probe, "k": 5}, headers=b).json()
        assert ra["model_version"] == version
        assert ra["candidates"] == rb["candidates"] and ra["decision"] == rb["decision"]
        assert all("cosine" in h for h in ra["candidates"])
        assert ra["decision"]["accepted"] == (ra["decision"]["score"] >= ra["threshold"])


def test_monitor_reads_the_decision_scores_and_takes_thresholds_in_their_units(
    cohort_artefact: Path, artefact: Path, digits: Digits, embedded: np.ndarray, tmp_path: Path
) -> None:
    """Labelled decisions reach the monitor with the score that decided them (AS-norm, not
    clipped to a cosine's range), its gallery pairs are AS-normalised, and its what-if takes a
    threshold in as-norm units; a cosine model still refuses one outside [-1, 1]."""
    tau = read_manifest(cohort_artefact).calibration.tau
    ids, vecs, subjects = _gallery(digits, embedded)
    store = {"store_url": f"sqlite:///{tmp_path / 's.db'}"}
    settings = make_settings(cohort_artefact, store, monitor_interval_s=3600.0)
    with TestClient(create_app(settings)) as c:
        tenant_id, auth = _new_tenant(c)
        _enrol(c, auth, ids, vecs, subjects)
        scores = []
        for q in _probes(digits, embedded):
            m = c.post("/v1/match", json={"embedding": q.tolist(), "k": 1}, headers=auth).json()
            fb = {"match_id": m["match_id"], "true_subject": m["decision"]["subject"]}
            assert c.post("/v1/feedback", json=fb, headers=auth).status_code == 201
            scores.append(m["decision"]["score"])
        monitor = c.app.state.monitor
        pairs = monitor.load_scores([tenant_id], now=monitor.clock())[tenant_id]
        fed = np.sort(np.concatenate([pairs["feedback"].genuine, pairs["feedback"].impostor]))
        np.testing.assert_allclose(fed, np.sort(scores), rtol=1e-6)
        assert np.abs(fed).max() > 1.0  # AS units, kept as decided
        cohort = c.app.state.runtime.serving.cohort
        want = gallery_scores(
            subjects, vecs, max_items=1000, max_pairs=20_000, seed=0, cohort=cohort
        )
        assert pairs["gallery"].size == want.size and np.abs(pairs["gallery"].impostor).max() > 1
        r = c.get("/v1/monitor", headers=ADMIN, params={"threshold": tau})
        assert r.status_code == 200, r.text
        assert r.json()["what_if"]["threshold"] == tau
        assert _threshold_bounds(c) == (-1000, 1000)  # the published schema says so
    plain = make_settings(artefact, {"store_url": f"sqlite:///{tmp_path / 'p.db'}"})
    with TestClient(create_app(plain)) as c:
        r = c.get("/v1/monitor", headers=ADMIN, params={"threshold": 1.5})
        assert r.status_code == 422 and "[-1, 1]" in r.json()["message"]
        assert _threshold_bounds(c) == (-1, 1)


def _threshold_bounds(c: TestClient) -> tuple[float, float]:
    params = c.get("/openapi.json").json()["paths"]["/v1/monitor"]["get"]["parameters"]
    (node,) = [p["schema"] for p in params if p["name"] == "threshold"]
    return node["minimum"], node["maximum"]
