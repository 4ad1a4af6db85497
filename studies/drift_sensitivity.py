"""How much must real bird photos degrade before the drift alerts name their tenant, and do
healthy tenants stay quiet (issue 29)? The plan and the success rule are in docs/results.md
("Drift alerts on real photos: sensitivity").

    .venv/bin/python -m studies.drift_sensitivity [--data-dir DIR] [--out docs/results/...]

The service is the app itself (``create_app`` with the committed default bird model, a SQLite
store in a temporary folder): photos are embedded by ``POST /v1/embed`` (each (photo,
degradation) once per run; the vectors are kept in ``runs/drift_sensitivity`` so a rerun
resumes), tenants enrol them through ``POST /v1/gallery``, and the app's own monitor computes
each snapshot (refreshed on demand: the monitor's cadence is injected, not waited for). The
``/metrics`` text before and after the tenant under study enrols is replayed into the committed
alert rules by ``promtool test rules`` in simulated time (``studies.promtool_replay``): the
snapshot that includes the newcomer is published one monitor interval after it enrols.

Photos: the CUB species the default model never saw (CUB ids > 100, ``classes_cub_map.csv``),
12 per species drawn once; every tenant is 10 species x 8 photos. Three healthy tenants
(disjoint species) form the fleet; a fourth enrols 10 other species, either degraded (Gaussian
blur of radius r, or JPEG re-encoding at quality q, both PIL) or clean (the healthy draws:
10 species of the 42 and 8 of their 12 photos, seeds 0-9). Every level of each kind's ladder is
run, once with one tenant id and once enrolled as 10 tenants (10 ids, so 10 draws of the level
reference, which is seeded by the tenant's id).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import platform
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from studies.promtool_replay import (
    TENANT_ALERTS,
    alert_timeline,
    first_seen,
    intervals,
    rule_for_seconds,
)

ADMIN_TOKEN = "drift-sensitivity-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SPECIES_PER_TENANT = 10
PHOTOS_PER_SPECIES = 8
POOL_PER_SPECIES = 12
HEALTHY_FLEET = 3
HEALTHY_DRAWS = 10
# tenants (ids) each level's degraded gallery is enrolled as, to see its reference's spread
REFERENCE_COPIES = 10
# ladders, mildest first: blur radius in pixels of the 227 px photo; JPEG quality (PIL)
# (a smoke run before the study: radius 8 did not alert, 24 did, so the blur ladder goes to 24)
# (a first full run found utility at tau not monotone in the blur: every level is run, no
# bisection; JPEG keeps the levels that run measured, and 5)
BLUR_LADDER = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0)
JPEG_LADDER = (30, 20, 15, 10, 5, 1)
WARMUP_S = 600.0  # the healthy fleet alone, before the newcomer enrols
DETECT_WITHIN_S = 600.0  # the "within 10 minutes"
HORIZON_AFTER_S = 45 * 60.0  # how long after the enrolment the alerts are followed

Photo = tuple[str, str]  # (species, file name in the zip)


@dataclass(frozen=True)
class Degradation:
    kind: str  # clean | blur | jpeg
    level: float

    @property
    def key(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}={self.level:g}"


CLEAN = Degradation("clean", 0)


def data_dir(arg: str | None) -> Path:
    for candidate in (arg, os.environ.get("TCM_DATA_DIR"), "../shared/data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit("no shared data folder: pass --data-dir or set TCM_DATA_DIR")


def test_species_photos(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The held-out species (``open_world_split == test``: CUB ids > 100, which the default
    model never saw) -> their (file name, JPEG bytes), in file order."""
    folder = root / "cub200_subset100"
    rows = csv.DictReader((folder / "classes_cub_map.csv").read_text().splitlines())
    test = {r["name"] for r in rows if r["open_world_split"] == "test"}
    out: dict[str, list[tuple[str, bytes]]] = {s: [] for s in sorted(test)}
    with zipfile.ZipFile(folder / "bird_dataset.zip") as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if (
                len(parts) == 4
                and parts[1] == "images"
                and parts[2] in test
                and parts[3].endswith(".jpg")
            ):
                out[parts[2]].append((parts[3], z.read(info)))
    return out


def degrade(jpeg: bytes, how: Degradation) -> bytes:
    """The photo as a client would send it after the degradation: blurred photos as PNG (no
    further loss), re-compressed ones as the JPEG itself."""
    if how.kind == "clean":
        return jpeg
    from PIL import Image, ImageFilter

    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    buf = io.BytesIO()
    if how.kind == "blur":
        img.filter(ImageFilter.GaussianBlur(how.level)).save(buf, format="PNG")
    elif how.kind == "jpeg":
        img.save(buf, format="JPEG", quality=int(how.level))
    else:
        raise ValueError(f"unknown degradation {how.kind!r}")
    return buf.getvalue()


class Embeddings:
    """(photo, degradation) -> the served model's embedding, each computed once through the
    app's POST /v1/embed, kept on disk (``cache``) for a rerun of the same model."""

    def __init__(self, client: Any, auth: dict[str, str], photos: dict, cache: Path) -> None:
        self.client, self.auth, self.photos, self.cache = client, auth, photos, cache
        self.model = client.get("/v1/model", headers=auth).json()["model_version"]
        self.vectors: dict[str, np.ndarray] = {}
        self.computed = 0
        self.seconds = 0.0
        if cache.is_file():
            with np.load(cache) as f:
                if str(f["model"]) == self.model:
                    self.vectors = dict(zip(f["keys"].tolist(), f["vectors"], strict=True))

    @staticmethod
    def key(photo: Photo, how: Degradation) -> str:
        return f"{photo[0]}/{photo[1]}|{how.key}"

    def get(self, photos: Sequence[Photo], how: Degradation, batch: int = 32) -> np.ndarray:
        from tqdm import tqdm

        todo = [p for p in photos if self.key(p, how) not in self.vectors]
        files = {(s, name): data for s in self.photos for name, data in self.photos[s]}
        started = time.perf_counter()
        for i in tqdm(range(0, len(todo), batch), desc=f"embed {how.key}", disable=not todo):
            chunk = todo[i : i + batch]
            images = [base64.b64encode(degrade(files[p], how)).decode() for p in chunk]
            r = self.client.post("/v1/embed", json={"images": images}, headers=self.auth)
            assert r.status_code == 200, r.text
            for p, v in zip(chunk, r.json()["embeddings"], strict=True):
                self.vectors[self.key(p, how)] = np.asarray(v, np.float32)
        if todo:
            self.seconds += time.perf_counter() - started
            self.computed += len(todo)
            self.save()
        return np.stack([self.vectors[self.key(p, how)] for p in photos])

    def save(self) -> None:
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.vectors)
        tmp = self.cache.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            model=self.model,
            keys=np.asarray(keys),
            vectors=np.stack([self.vectors[k] for k in keys]),
        )
        tmp.replace(self.cache)


def draw_pool(species: dict[str, list], seed: int = 0) -> dict[str, list[Photo]]:
    """``POOL_PER_SPECIES`` photos of each species, drawn once."""
    rng = np.random.default_rng(seed)
    return {
        s: [(s, files[i][0]) for i in sorted(rng.choice(len(files), POOL_PER_SPECIES, False))]
        for s, files in species.items()
    }


def tenant_photos(pool: dict[str, list[Photo]], species: Sequence[str], rng: Any) -> list[Photo]:
    return [
        pool[s][i]
        for s in species
        for i in sorted(rng.choice(POOL_PER_SPECIES, PHOTOS_PER_SPECIES, replace=False))
    ]


def settings_for(folder: Path) -> Any:
    from service.settings import Settings

    return Settings(
        artefact_path=Path("artefacts/default"),
        admin_token=ADMIN_TOKEN,
        device="cpu",
        store_url=f"sqlite:///{folder / 'tcm.db'}",
    )


def enrol(client: Any, name: str, photos: Sequence[Photo], x: np.ndarray) -> str:
    r = client.post("/v1/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    tenant, key = r.json()["tenant_id"], r.json()["api_key"]
    items = [{"subject": p[0], "embedding": v.tolist()} for p, v in zip(photos, x, strict=True)]
    r = client.post(
        "/v1/gallery", json={"items": items}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 201, r.text
    return tenant


def signals(snap: Any, tenant: str) -> dict[str, Any]:
    """What the alerts read for one tenant, from the monitor's snapshot."""
    row = snap.tenants[tenant]
    sub = row.subjects
    level = sub.level_reference if sub is not None else None
    ref = snap.tenants_reference
    return {
        "gallery_utility_at_tau": row.by_source.gallery.utility,
        "gallery_frr_at_tau": row.by_source.gallery.frr,
        "gallery_far_at_tau": row.by_source.gallery.far,
        "level_reference_utility": None if level is None else level.utility,
        "level_reference_frr": None if level is None else level.frr,
        "subjects_opis": None if sub is None else sub.opis,
        "subjects_reference_hi": None if sub is None or sub.reference is None else sub.reference.hi,
        "deviation": row.deviation,
        "deviation_reference_hi": None if ref is None else ref.deviation.get("hi"),
    }


def scenario(
    fleet: Sequence[tuple[list[Photo], np.ndarray]],
    newcomer: tuple[list[Photo], np.ndarray],
    *,
    monitor_interval_s: float,
) -> dict[str, Any]:
    """A fresh service: the healthy fleet enrols, the monitor measures; the newcomer enrols,
    the monitor measures again; the committed rules replayed on both /metrics texts."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with tempfile.TemporaryDirectory() as tmp, TestClient(create_app(settings_for(Path(tmp)))) as c:
        mon = c.app.state.monitor
        healthy = [enrol(c, f"healthy-{i}", p, x) for i, (p, x) in enumerate(fleet)]
        mon.refresh(force=True)
        before = c.get("/metrics").text
        new = enrol(c, "newcomer", *newcomer)
        snap = mon.refresh(force=True)
        after = c.get("/metrics").text
        enrolled = WARMUP_S
        timeline = alert_timeline(
            [(0.0, before), (enrolled + monitor_interval_s, after)],
            horizon_s=enrolled + HORIZON_AFTER_S,
        )
        names = {new: "newcomer", **{t: f"healthy-{i}" for i, t in enumerate(healthy)}}

        def alerts(tenant: str, state: str) -> dict[str, float]:
            seen = first_seen(timeline, since=enrolled, tenant=tenant, state=state)
            return {k: v for k, v in seen.items() if k.split("/")[0] in TENANT_ALERTS}

        fleet_wide = first_seen(timeline, since=enrolled, tenant="", state="pending")
        return {
            "newcomer": {
                "signals": signals(snap, new),
                "pending_after_s": alerts(new, "pending"),
                "firing_after_s": alerts(new, "firing"),
            },
            "healthy_fleet_alerts": {
                names[t]: alerts(t, "pending") for t in healthy if alerts(t, "pending")
            },
            "fleet_wide_alerts_pending_after_s": fleet_wide,
            "healthy_fleet_signals": {names[t]: signals(snap, t) for t in healthy},
        }


def repeat_over_ids(
    fleet: Sequence[tuple[list[Photo], np.ndarray]],
    newcomer: tuple[list[Photo], np.ndarray],
    *,
    copies: int,
    monitor_interval_s: float,
) -> dict[str, Any]:
    """The newcomer's gallery enrolled as ``copies`` tenants at once beside the healthy fleet:
    its level reference is drawn with a seed derived from the tenant's id, so each copy meets
    another reference draw while its own utility at tau stays the same. Counts the copies whose
    TCMTenantLevelDegraded is pending, and firing, within 10 minutes of the enrolment (the
    across-tenants alerts are not counted here: the copies outnumber the fleet)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with tempfile.TemporaryDirectory() as tmp, TestClient(create_app(settings_for(Path(tmp)))) as c:
        mon = c.app.state.monitor
        for i, (p, x) in enumerate(fleet):
            enrol(c, f"healthy-{i}", p, x)
        mon.refresh(force=True)
        before = c.get("/metrics").text
        ids = [enrol(c, f"copy-{i}", *newcomer) for i in range(copies)]
        snap = mon.refresh(force=True)
        after = c.get("/metrics").text
    timeline = alert_timeline(
        [(0.0, before), (WARMUP_S + monitor_interval_s, after)],
        horizon_s=WARMUP_S + DETECT_WITHIN_S,
    )

    def alerted(state: str, names: tuple[str, ...]) -> int:
        return sum(
            any(
                k.startswith(names) and v <= DETECT_WITHIN_S
                for k, v in first_seen(timeline, since=WARMUP_S, tenant=t, state=state).items()
            )
            for t in ids
        )

    level = ("TCMTenantLevelDegraded/",)
    either = (*level, "TCMTenantPairFARHigh/")  # the per-tenant level-type alerts
    rows = [signals(snap, t) for t in ids]
    return {
        "copies": copies,
        "level_alert_pending_within_10_min": alerted("pending", level),
        "level_alert_firing_within_10_min": alerted("firing", level),
        "level_or_pair_far_alert_pending_within_10_min": alerted("pending", either),
        "level_or_pair_far_alert_firing_within_10_min": alerted("firing", either),
        "gallery_utility_at_tau": rows[0]["gallery_utility_at_tau"],
        "reference_utility_lo": sorted(r["level_reference_utility"]["lo"] for r in rows),
    }


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    new = result["newcomer"]
    return {
        "pending_within_10_min": any(v <= DETECT_WITHIN_S for v in new["pending_after_s"].values()),
        "firing_within_10_min": any(v <= DETECT_WITHIN_S for v in new["firing_after_s"].values()),
        "firing_within_horizon": bool(new["firing_after_s"]),
    }


def mildest_from(levels: Sequence[tuple[float, bool]]) -> float | None:
    """The mildest level (``levels`` mildest first) from which every harsher level alerts
    (None: the harshest does not)."""
    found = None
    for level, alerts in reversed(levels):
        if not alerts:
            break
        found = level
    return found


def every_id(
    grid: dict[str, list[tuple[float, bool]]], repeats: dict[str, dict[str, Any]], count: str
) -> dict[str, float | None]:
    """Per kind, the mildest level from which every harsher level has ``count`` (a key of
    ``repeat_over_ids``'s result) equal to all its copies."""
    return {
        kind: mildest_from(
            [
                (
                    v,
                    repeats[Degradation(kind, v).key][count]
                    == repeats[Degradation(kind, v).key]["copies"],
                )
                for v, _ in ladder
            ]
        )
        for kind, ladder in grid.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, default=Path("docs/results/drift_sensitivity.json"))
    p.add_argument("--cache", type=Path, default=Path("runs/drift_sensitivity/embeddings.npz"))
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    species = test_species_photos(data_dir(args.data_dir))
    pool = draw_pool(species)
    order = list(np.random.default_rng(1).permutation(sorted(species)))
    rng = np.random.default_rng(2)
    fleet_photos = [
        tenant_photos(pool, order[i * SPECIES_PER_TENANT : (i + 1) * SPECIES_PER_TENANT], rng)
        for i in range(HEALTHY_FLEET + 1)
    ]
    drifter = fleet_photos.pop()
    monitor_interval_s = settings_for(Path(".")).monitor_interval_s
    with tempfile.TemporaryDirectory() as tmp, TestClient(create_app(settings_for(Path(tmp)))) as c:
        r = c.post("/v1/tenants", json={"name": "embedder"}, headers=ADMIN)
        auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
        emb = Embeddings(c, auth, species, args.cache)
        fleet = [(ph, emb.get(ph, CLEAN)) for ph in fleet_photos]
        runs: dict[str, dict[str, Any]] = {}

        def run(how: Degradation, photos: list[Photo] | None = None, name: str = "") -> dict:
            label = name or how.key
            if label in runs:
                return runs[label]
            photos = drifter if photos is None else photos
            x = emb.get(photos, how)
            result = scenario(fleet, (photos, x), monitor_interval_s=monitor_interval_s)
            result["verdict"] = verdict(result)
            runs[label] = result
            sig = result["newcomer"]["signals"]
            print(
                f"{label}: utility at tau {sig['gallery_utility_at_tau']:.3f} "
                f"(reference lo {sig['level_reference_utility']['lo']:.3f}), "
                f"pending {result['newcomer']['pending_after_s']}, "
                f"firing {result['newcomer']['firing_after_s']}, "
                f"healthy fleet {result['healthy_fleet_alerts']}",
                flush=True,
            )
            return result

        run(CLEAN)
        grid: dict[str, list[tuple[float, bool]]] = {}
        fired: dict[str, list[tuple[float, bool]]] = {}
        for kind, ladder in (("blur", BLUR_LADDER), ("jpeg", JPEG_LADDER)):
            verdicts = [(level, run(Degradation(kind, level))["verdict"]) for level in ladder]
            grid[kind] = [(level, v["pending_within_10_min"]) for level, v in verdicts]
            fired[kind] = [(level, v["firing_within_10_min"]) for level, v in verdicts]
        repeats: dict[str, dict[str, Any]] = {}
        for how in [CLEAN] + [Degradation(k, v) for k, ladder in grid.items() for v, _ in ladder]:
            label = how.key
            repeats[label] = repeat_over_ids(
                fleet,
                (drifter, emb.get(drifter, how)),
                copies=REFERENCE_COPIES,
                monitor_interval_s=monitor_interval_s,
            )
            print(f"{label} over {REFERENCE_COPIES} tenant ids: {repeats[label]}", flush=True)
        draws = []
        for seed in range(HEALTHY_DRAWS):
            g = np.random.default_rng(100 + seed)
            chosen = sorted(g.choice(sorted(species), SPECIES_PER_TENANT, replace=False))
            result = run(CLEAN, tenant_photos(pool, chosen, g), name=f"healthy draw {seed}")
            draws.append(bool(result["newcomer"]["pending_after_s"]))
        embedded, embed_s = emb.computed, emb.seconds
    scrape_s, eval_s = intervals()
    healthy_fleet_false = sorted(
        {(k, t) for k, r in runs.items() for t in r["healthy_fleet_alerts"]}
    )
    doc = {
        "what": __doc__.split("\n\n")[0],
        "command": "make drift-sensitivity",
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs; shared with other jobs)",
        "model": emb.model,
        "design": {
            "species": len(species),
            "species_per_tenant": SPECIES_PER_TENANT,
            "photos_per_species": PHOTOS_PER_SPECIES,
            "pool_per_species": POOL_PER_SPECIES,
            "healthy_fleet_tenants": HEALTHY_FLEET,
            "healthy_draws": HEALTHY_DRAWS,
            "blur_ladder": BLUR_LADDER,
            "jpeg_ladder": JPEG_LADDER,
            "monitor_interval_s": monitor_interval_s,
            "scrape_interval_s": scrape_s,
            "evaluation_interval_s": eval_s,
            "rules_for_s": rule_for_seconds(sorted(TENANT_ALERTS)),
            "detect_within_s": DETECT_WITHIN_S,
            "followed_after_enrolment_s": HORIZON_AFTER_S,
        },
        "pending_within_10_min_one_id": {k: [list(x) for x in v] for k, v in grid.items()},
        "mildest_alerting_from_one_id": {k: mildest_from(v) for k, v in grid.items()},
        "mildest_alerting_every_id": every_id(grid, repeats, "level_alert_pending_within_10_min"),
        "firing_within_10_min_one_id": {k: [list(x) for x in v] for k, v in fired.items()},
        "mildest_firing_from_one_id": {k: mildest_from(v) for k, v in fired.items()},
        "mildest_firing_every_id": every_id(grid, repeats, "level_alert_firing_within_10_min"),
        "mildest_firing_every_id_level_or_pair_far": every_id(
            grid, repeats, "level_or_pair_far_alert_firing_within_10_min"
        ),
        "false_alerts": {
            "healthy_draws_with_a_tenant_alert": sum(draws),
            "healthy_draws": len(draws),
            "fleet_tenants_alerting_in_any_scenario": [list(x) for x in healthy_fleet_false],
        },
        "level_alert_over_tenant_ids": repeats,
        "runs": runs,
        "embeddings_computed": embedded,
        "embedding_seconds": round(embed_s, 1),
        "images_per_second": round(embedded / embed_s, 1) if embed_s else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(
        json.dumps({k: v for k, v in doc.items() if k.startswith(("mildest", "false"))}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
