"""Round trips through the whole API, on SQLite and on Redis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.domain.matching import label_decision
from service.store import MatchRecord
from tcm import load_artefact, read_manifest, to_input_tensor
from tests.service.conftest import DIM, Api, Digits, Tenant, b64_png, png_bytes, unit


def reference_embeddings(api: Api, images: list[np.ndarray]) -> np.ndarray:
    model, manifest = load_artefact(api.settings.artefact_path)
    with torch.no_grad():
        return model(to_input_tensor(images, manifest.preprocessing)).numpy()


def test_health_model_and_metrics(api: Api) -> None:
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = c.get("/v1/model").json()
    manifest = read_manifest(api.settings.artefact_path)
    assert info["model_version"] == manifest.model_version
    assert info["embedding_dim"] == DIM
    assert info["threshold"] == manifest.calibration.tau
    assert info["target_far"] == manifest.calibration.target_far
    assert info["calibration_range"] == [manifest.calibration.tau_lo, manifest.calibration.tau_hi]
    assert info["baseline_opis"] == manifest.baseline.opis
    text = c.get("/metrics").text
    assert 'tcm_model_info{architecture="small_cnn"' in text
    assert 'route="/v1/model"' in text and 'route="/healthz"' in text
    assert c.app.state.registry is c.app.state.runtime.metrics.registry


def test_enrol_match_by_embedding(api: Api, tenant: Tenant) -> None:
    c = api.client
    a, b = unit(1), unit(2)
    ids = api.enrol(
        tenant,
        [
            {"subject": "alice", "embedding": a, "metadata": {"cam": 3}},
            {"subject": "bob", "embedding": b, "item_id": "bob-1"},
        ],
    )
    assert ids[1] == "bob-1" and len(ids[0]) == 32
    r = c.post("/v1/match", json={"embedding": a, "k": 5}, headers=tenant.auth)
    assert r.status_code == 200, r.text
    body = r.json()
    tau = body["threshold"]
    assert body["decision"] == {"accepted": True, "subject": "alice", "score": pytest.approx(1.0)}
    assert [x["item_id"] for x in body["candidates"]] == [ids[0], "bob-1"]
    assert body["candidates"][1]["score"] == pytest.approx(float(np.dot(a, b)), abs=1e-5)
    assert body["model_version"] == "digits-test-v1"
    # a query pointing away from everything is rejected, its best candidate still reported
    r = c.post(
        "/v1/match", json={"embedding": (-np.asarray(a)).tolist(), "k": 1}, headers=tenant.auth
    ).json()
    assert r["decision"]["accepted"] is False and r["decision"]["subject"] is None
    assert r["decision"]["score"] < tau and len(r["candidates"]) == 1
    # embeddings need not be normalised by the client
    r = c.post(
        "/v1/match", json={"embedding": (7.5 * np.asarray(b)).tolist(), "k": 1}, headers=tenant.auth
    ).json()
    assert r["decision"]["subject"] == "bob"


def test_empty_gallery_match(api: Api, tenant: Tenant) -> None:
    r = api.client.post("/v1/match", json={"embedding": unit(3), "k": 3}, headers=tenant.auth)
    assert r.status_code == 200
    body = r.json()
    assert body["decision"] == {"accepted": False, "subject": None, "score": None}
    assert body["candidates"] == []
    assert len(body["match_id"]) == 32


def test_enrol_and_match_images(api: Api, tenant: Tenant, digits: Digits) -> None:
    c = api.client
    imgs = [digits.images[i] for i in range(6)]
    ids = api.enrol(
        tenant, [{"subject": f"d{i}", "image": b64_png(im)} for i, im in enumerate(imgs)]
    )
    ref = reference_embeddings(api, imgs)
    for i in range(6):
        item = c.get(
            f"/v1/gallery/{ids[i]}", params={"include_embedding": True}, headers=tenant.auth
        ).json()
        assert item["has_image"] is True and item["subject"] == f"d{i}"
        np.testing.assert_allclose(item["embedding"], ref[i], atol=1e-5)
    r = c.post("/v1/match", json={"image": b64_png(imgs[4]), "k": 6}, headers=tenant.auth)
    body = r.json()
    assert body["candidates"][0]["item_id"] == ids[4]
    assert body["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [x["score"] for x in body["candidates"]]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, sorted(ref @ ref[4], reverse=True), atol=1e-5)
    # multipart variants
    up = c.post(
        "/v1/match/upload",
        files={"file": ("q.png", png_bytes(imgs[4]), "image/png")},
        data={"k": "2"},
        headers=tenant.auth,
    )
    assert up.status_code == 200, up.text
    assert [x["item_id"] for x in up.json()["candidates"]] == [
        x["item_id"] for x in body["candidates"][:2]
    ]
    en = c.post(
        "/v1/gallery/upload",
        files={"file": ("x.png", png_bytes(imgs[0]), "image/png")},
        data={"subject": "up", "item_id": "up-1", "metadata": '{"src": "upload"}'},
        headers=tenant.auth,
    )
    assert en.status_code == 201, en.text
    got = c.get("/v1/gallery/up-1", headers=tenant.auth).json()
    assert got["metadata"] == {"src": "upload"} and got["has_image"] is True


def test_embed(api: Api, tenant: Tenant, digits: Digits) -> None:
    c = api.client
    imgs = [digits.images[i] for i in (10, 11, 12)]
    r = c.post("/v1/embed", json={"images": [b64_png(i) for i in imgs]}, headers=tenant.auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "digits-test-v1"
    emb = np.asarray(body["embeddings"])
    assert emb.shape == (3, DIM)
    np.testing.assert_allclose(emb, reference_embeddings(api, imgs), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    up = c.post(
        "/v1/embed/upload",
        files={"file": ("a.png", png_bytes(imgs[0]), "image/png")},
        headers=tenant.auth,
    ).json()
    np.testing.assert_allclose(up["embeddings"][0], emb[0], atol=1e-5)
    # an RGB image is converted to grey like PIL's convert("L")
    rgb = np.stack([imgs[0]] * 3, axis=-1)
    r = c.post("/v1/embed", json={"images": [b64_png(rgb)]}, headers=tenant.auth).json()
    np.testing.assert_allclose(r["embeddings"][0], emb[0], atol=1e-5)


def test_verify_all_input_kinds(api: Api, tenant: Tenant, digits: Digits) -> None:
    c = api.client
    im0, im1 = digits.images[20], digits.images[21]
    e0, e1 = reference_embeddings(api, [im0, im1])
    x, y, z = unit(10), unit(11), unit(12)
    api.enrol(
        tenant,
        [
            {"subject": "img", "image": b64_png(im0), "item_id": "img-0"},
            {"subject": "sx", "embedding": x, "item_id": "x"},
            {"subject": "sx", "embedding": y, "item_id": "y"},
        ],
    )
    tau = c.get("/v1/model").json()["threshold"]

    def verify(a: dict, b: dict) -> dict:
        r = c.post("/v1/verify", json={"a": a, "b": b}, headers=tenant.auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["threshold"] == tau and body["model_version"] == "digits-test-v1"
        assert body["accepted"] == (body["score"] >= tau)
        return body

    assert verify({"embedding": x}, {"embedding": x})["score"] == pytest.approx(1.0)
    assert verify({"embedding": x}, {"item_id": "x"})["accepted"] is True
    assert verify({"item_id": "x"}, {"item_id": "y"})["score"] == pytest.approx(
        np.dot(x, y), abs=1e-5
    )
    # image vs image / image vs item enrolled from that image
    assert verify({"image": b64_png(im0)}, {"image": b64_png(im1)})["score"] == pytest.approx(
        float(e0 @ e1), abs=1e-5
    )
    assert verify({"image": b64_png(im0)}, {"item_id": "img-0"})["score"] == pytest.approx(
        1.0, abs=1e-5
    )
    # a subject scores as its best-matching item
    best = max(np.dot(z, x), np.dot(z, y))
    assert verify({"embedding": z}, {"subject": "sx"})["score"] == pytest.approx(best, abs=1e-5)
    assert verify({"subject": "sx"}, {"embedding": y})["score"] == pytest.approx(1.0, abs=1e-5)
    assert verify({"subject": "sx"}, {"subject": "sx"})["score"] == pytest.approx(1.0, abs=1e-5)
    up = c.post(
        "/v1/verify/upload",
        headers=tenant.auth,
        files={
            "a": ("a.png", png_bytes(im0), "image/png"),
            "b": ("b.png", png_bytes(im1), "image/png"),
        },
    )
    assert up.json()["score"] == pytest.approx(float(e0 @ e1), abs=1e-5)
    # unknown items and subjects
    for inp in ({"item_id": "nope"}, {"subject": "nobody"}):
        r = c.post("/v1/verify", json={"a": {"embedding": x}, "b": inp}, headers=tenant.auth)
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_feedback(api: Api, tenant: Tenant) -> None:
    c = api.client
    a, b = unit(30), unit(31)
    api.enrol(tenant, [{"subject": "alice", "embedding": a}, {"subject": "bob", "embedding": b}])

    def match(v: list[float]) -> dict:
        return c.post("/v1/match", json={"embedding": v, "k": 2}, headers=tenant.auth).json()

    def feedback(body: dict) -> dict:
        r = c.post("/v1/feedback", json=body, headers=tenant.auth)
        assert r.status_code == 201, r.text
        return r.json()

    accepted = match(a)
    assert accepted["decision"]["subject"] == "alice"
    assert feedback({"match_id": accepted["match_id"], "true_subject": "alice"}) == {
        "match_id": accepted["match_id"],
        "outcome": "true_accept",
        "genuine": True,
    }
    again = c.post(
        "/v1/feedback",
        json={"match_id": accepted["match_id"], "correct": True},
        headers=tenant.auth,
    )
    assert again.status_code == 409 and again.json()["code"] == "feedback_exists"

    m2 = match(a)
    assert feedback({"match_id": m2["match_id"], "true_subject": None})["outcome"] == (
        "false_accept"
    )
    m3 = match((-np.asarray(a)).tolist())
    assert m3["decision"]["accepted"] is False
    assert feedback({"match_id": m3["match_id"], "correct": True})["outcome"] == "true_reject"
    m4 = match((-np.asarray(b)).tolist())
    top = m4["candidates"][0]["subject"]
    fb = feedback({"match_id": m4["match_id"], "true_subject": top})
    assert fb == {"match_id": m4["match_id"], "outcome": "false_reject", "genuine": True}
    m5 = match(b)
    assert feedback({"match_id": m5["match_id"], "correct": False})["outcome"] == "false_accept"

    # the store keeps them for the monitor, joined with their matches
    store = c.app.state.runtime.store
    decisions = store.list_decisions(tenant.tenant_id, labelled_only=True)
    by_id = {d.match.match_id: d for d in decisions}
    assert len(decisions) == 5
    d1 = by_id[accepted["match_id"]]
    assert d1.match.accepted and d1.match.subject == "alice" and d1.match.top_subject == "alice"
    assert d1.match.score == pytest.approx(1.0) and d1.feedback is not None
    assert d1.feedback.true_subject == "alice" and d1.feedback.genuine is True
    assert by_id[m2["match_id"]].feedback.true_subject is None
    assert by_id[m3["match_id"]].feedback.correct is True
    assert len(store.list_decisions(tenant.tenant_id)) == 5
    assert 'tcm_decisions_total{outcome="true_accept"' in c.get("/metrics").text

    bad = c.post("/v1/feedback", json={"match_id": "0" * 32, "correct": True}, headers=tenant.auth)
    assert bad.status_code == 404


def test_feedback_confusion_matrix_of_1_to_n(api: Api, tenant: Tenant) -> None:
    """Every cell of the 1:N confusion matrix from the API's feedback, stored alike by the
    store and counted under tcm_decisions_total{outcome}: genuine probes (subject enrolled) are
    true_accept / wrong_accept / false_reject, impostor probes false_accept / true_reject."""
    c = api.client
    a, b = unit(40), unit(41)
    api.enrol(tenant, [{"subject": "alice", "embedding": a}, {"subject": "bob", "embedding": b}])

    def label(probe: list[float], **body: object) -> tuple[dict, dict]:
        m = c.post("/v1/match", json={"embedding": probe, "k": 2}, headers=tenant.auth).json()
        r = c.post("/v1/feedback", json={"match_id": m["match_id"], **body}, headers=tenant.auth)
        assert r.status_code == 201, r.text
        return m, r.json()

    away = (-(np.asarray(a) + np.asarray(b))).tolist()  # rejected, whoever ranks first
    cells = []
    # genuine probe, accepted as its own subject
    m, fb = label(a, true_subject="alice")
    assert m["decision"]["subject"] == "alice" and fb["outcome"] == "true_accept"
    cells.append((fb, True))
    # genuine probe of bob, accepted as alice: a wrong accept (its pair is an impostor pair)
    m, fb = label(a, true_subject="bob")
    assert m["decision"]["accepted"] and fb["outcome"] == "wrong_accept"
    cells.append((fb, False))
    # genuine probe rejected, ranked to another enrolled subject: a false reject (issue 29:
    # this was labelled true_reject and left out of FRR)
    probe = c.post("/v1/match", json={"embedding": away, "k": 2}, headers=tenant.auth).json()
    top = probe["candidates"][0]["subject"]
    other = {"alice": "bob", "bob": "alice"}[top]
    r = c.post(
        "/v1/feedback",
        json={"match_id": probe["match_id"], "true_subject": other},
        headers=tenant.auth,
    )
    fb = r.json()
    assert not probe["decision"]["accepted"] and fb["outcome"] == "false_reject"
    cells.append((fb, False))
    # genuine probe rejected, its own subject ranked first
    m, fb = label(away, true_subject=top)
    assert not m["decision"]["accepted"] and fb["outcome"] == "false_reject"
    cells.append((fb, True))
    # impostor probes: not enrolled (null, or a subject the gallery does not hold)
    for subject in (None, "carol"):
        _, fb = label(a, true_subject=subject)
        assert fb["outcome"] == "false_accept"
        cells.append((fb, False))
        _, fb = label(away, true_subject=subject)
        assert fb["outcome"] == "true_reject"
        cells.append((fb, False))
    assert [fb["genuine"] for fb, _ in cells] == [g for _, g in cells]
    # the store keeps each outcome as labelled
    store = c.app.state.runtime.store
    stored = {
        d.match.match_id: d.feedback.outcome
        for d in store.list_decisions(tenant.tenant_id, labelled_only=True)
        if d.feedback is not None
    }
    assert {fb["match_id"]: fb["outcome"] for fb, _ in cells} == stored
    text = c.get("/metrics").text
    label_value = c.app.state.runtime.metrics.tenant_label(tenant.tenant_id)
    for outcome, n in (
        ("true_accept", 1),
        ("wrong_accept", 1),
        ("false_reject", 2),
        ("false_accept", 2),
        ("true_reject", 2),
    ):
        line = f'tcm_decisions_total{{outcome="{outcome}",tenant="{label_value}"}} {float(n)}'
        assert line in text, (line, [x for x in text.splitlines() if "tcm_decisions_total{" in x])


def test_label_decision_without_candidates() -> None:
    m = MatchRecord("m", "t", False, None, None, None, None, 0.5, "v", 0.0)
    assert label_decision(m, true_subject="x", subject_given=True, correct=None) == (
        None,
        "true_reject",
    )
    assert label_decision(m, true_subject=None, subject_given=False, correct=False) == (
        None,
        "false_reject",
    )


def test_list_paginate_and_delete(api: Api, tenant: Tenant) -> None:
    c = api.client
    items = [
        {"subject": f"s{i % 3}", "embedding": unit(100 + i), "item_id": f"it-{i:02d}"}
        for i in range(11)
    ]
    api.enrol(tenant, items[:6])
    api.enrol(tenant, items[6:])
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = c.get("/v1/gallery", params=params, headers=tenant.auth).json()
        seen += [x["item_id"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"it-{i:02d}" for i in range(11)]
    s1 = c.get("/v1/gallery", params={"subject": "s1", "limit": 100}, headers=tenant.auth).json()
    assert [x["item_id"] for x in s1["items"]] == ["it-01", "it-04", "it-07", "it-10"]
    assert s1["next_cursor"] is None
    assert c.get("/v1/gallery", params={"subject": "zzz"}, headers=tenant.auth).json() == {
        "items": [],
        "next_cursor": None,
    }

    assert c.delete("/v1/gallery/it-00", headers=tenant.auth).status_code == 204
    assert c.get("/v1/gallery/it-00", headers=tenant.auth).status_code == 404
    assert c.delete("/v1/gallery/it-00", headers=tenant.auth).status_code == 404
    r = c.post(
        "/v1/match", json={"embedding": items[0]["embedding"], "k": 50}, headers=tenant.auth
    ).json()
    assert "it-00" not in [x["item_id"] for x in r["candidates"]]
    assert len(r["candidates"]) == 10

    d = c.delete("/v1/subjects/s1", headers=tenant.auth)
    assert d.status_code == 200 and d.json() == {"deleted": 4}
    assert c.delete("/v1/subjects/s1", headers=tenant.auth).status_code == 404
    r = c.post(
        "/v1/match", json={"embedding": items[1]["embedding"], "k": 50}, headers=tenant.auth
    ).json()
    assert {x["subject"] for x in r["candidates"]} == {"s0", "s2"}
    assert len(r["candidates"]) == 6
    ver = c.post(
        "/v1/verify",
        json={"a": {"embedding": unit(1)}, "b": {"subject": "s1"}},
        headers=tenant.auth,
    )
    assert ver.status_code == 404
    # an id freed by a delete can be enrolled again
    api.enrol(tenant, [{"subject": "new", "embedding": unit(5), "item_id": "it-00"}])
    assert c.get("/v1/gallery/it-00", headers=tenant.auth).json()["subject"] == "new"
    assert f'tcm_gallery_items{{tenant="{tenant.tenant_id}"}} 7.0' in c.get("/metrics").text


def test_enrol_is_all_or_nothing(api: Api, tenant: Tenant, digits: Digits) -> None:
    c = api.client
    api.enrol(tenant, [{"subject": "a", "embedding": unit(1), "item_id": "taken"}])
    r = c.post(
        "/v1/gallery",
        headers=tenant.auth,
        json={
            "items": [
                {"subject": "b", "embedding": unit(2), "item_id": "fresh"},
                {"subject": "b", "embedding": unit(3), "item_id": "taken"},
            ]
        },
    )
    assert r.status_code == 409
    assert r.json()["code"] == "duplicate_item_id"
    assert r.json()["detail"] == {"item_ids": ["taken"]}
    assert c.get("/v1/gallery/fresh", headers=tenant.auth).status_code == 404
    # a bad image anywhere in the batch also leaves nothing behind
    r = c.post(
        "/v1/gallery",
        headers=tenant.auth,
        json={
            "items": [
                {"subject": "b", "embedding": unit(2), "item_id": "fresh"},
                {"subject": "b", "image": "aGVsbG8=", "item_id": "fresh2"},
            ]
        },
    )
    assert r.status_code == 422 and r.json()["detail"]["where"] == "items[1].image"
    assert c.get("/v1/gallery/fresh", headers=tenant.auth).status_code == 404
    page = c.get("/v1/gallery", headers=tenant.auth).json()
    assert [x["item_id"] for x in page["items"]] == ["taken"]


def test_responses_of_a_model_without_faces_carry_no_faces_key(
    api: Api, tenant: Tenant, digits: Digits
) -> None:
    """Issue 30: every answer that embedded an image carried ``"faces": null`` for models that
    have no face front-end. The key is now left out (face models still send it: tests/faces),
    and the published schema does not require it."""
    c, h = api.client, tenant.auth
    img = b64_png(digits.images[3])
    png = png_bytes(digits.images[3])
    answers = {
        "enrol": c.post("/v1/gallery", json={"items": [{"subject": "s", "image": img}]}, headers=h),
        "enrol upload": c.post(
            "/v1/gallery/upload", files={"file": ("a.png", png)}, data={"subject": "s"}, headers=h
        ),
        "match": c.post("/v1/match", json={"image": img}, headers=h),
        "match upload": c.post("/v1/match/upload", files={"file": ("a.png", png)}, headers=h),
        "verify": c.post(
            "/v1/verify", json={"a": {"image": img}, "b": {"subject": "s"}}, headers=h
        ),
        "embed": c.post("/v1/embed", json={"images": [img]}, headers=h),
        "embed upload": c.post("/v1/embed/upload", files={"file": ("a.png", png)}, headers=h),
    }
    for name, r in answers.items():
        assert r.status_code in (200, 201), (name, r.text)
        assert "faces" not in r.json(), (name, r.json())
    batch = c.post("/v1/match/batch", json={"queries": [{"image": img}]}, headers=h).json()
    assert "faces" not in batch["results"][0]
    # an empty gallery's null decision fields are still sent as null (only faces is left out)
    empty = api.new_tenant()
    m = c.post("/v1/match", json={"embedding": unit(1)}, headers=empty.auth).json()
    assert m["decision"] == {"accepted": False, "subject": None, "score": None}
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    for name, schema in schemas.items():
        if "faces" in schema.get("properties", {}):
            assert "faces" not in schema.get("required", []), name
