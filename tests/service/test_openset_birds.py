"""Issue 28's promise checked over HTTP on photos the model never saw: the FPIR the service
exports for a tenant (``tcm_tenant_expected_fpir_ratio``: the committed bird default's open-set
tails at the tenant's gallery shape, ``tcm.openset.fpir_gallery``) lies within the bootstrap
interval of the FPIR measured on that tenant with stranger probes.

15 unseen CUB species x 8 photos enrolled as one tenant; 6 photos of each of 15 other unseen
species sent to ``/v1/match`` as strangers; the interval resamples stranger *species* (photos of
one species are accepted or rejected together, so the probes are not independent). The draw is
fixed (seed 0): one draw, not a coverage claim. Over 200 draws of this shape
(``python -m studies.openset_gallery``, ``docs/results/openset_gallery.json``) the species-bootstrap
interval held the gallery model's 0.335 in 96% of them and the photo model's 0.430 in 88%; the
measured FPIR averaged 0.361."""

from __future__ import annotations

import base64
import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tcm import load_openset, read_manifest
from tcm.openset import fpir, fpir_gallery
from tests.service.conftest import Api, make_settings
from tests.training.conftest import DATA_DIR

DEFAULT = Path(__file__).resolve().parents[2] / "artefacts" / "default"
GALLERY_SPECIES, PHOTOS, STRANGER_SPECIES, PROBES = 15, 8, 15, 6


def unseen_species_photos() -> dict[str, list[bytes]]:
    """The CUB test species' JPEGs (the open-world split the default held out), by species."""
    folder = Path(DATA_DIR, "cub200_subset100")
    if not folder.is_dir():
        pytest.fail(f"shared data sets missing at {DATA_DIR}")
    rows = csv.DictReader((folder / "classes_cub_map.csv").read_text().splitlines())
    test = {r["name"] for r in rows if r["open_world_split"] == "test"}
    photos: dict[str, list[bytes]] = {}
    with zipfile.ZipFile(folder / "bird_dataset.zip") as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[2] in test and parts[3].endswith(".jpg"):
                photos.setdefault(parts[2], []).append(z.read(name))
    assert len(photos) == 42
    return photos


def species_bootstrap(
    accepted: dict[str, list[bool]], resamples: int = 4000
) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    names = sorted(accepted)
    hits = np.array([sum(accepted[n]) for n in names], float)
    sizes = np.array([len(accepted[n]) for n in names], float)
    pick = rng.integers(0, len(names), size=(resamples, len(names)))
    rates = hits[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    lo, hi = np.quantile(rates, [0.025, 0.975])
    return float(lo), float(hi)


def test_species_bootstrap_on_a_hand_made_case() -> None:
    assert species_bootstrap({"a": [True, True], "b": [True, True]}) == (1.0, 1.0)
    lo, hi = species_bootstrap({"a": [True] * 4, "b": [False] * 4})
    assert lo == 0.0 and hi == 1.0  # two species: either may be drawn twice


def test_expected_fpir_holds_for_a_tenant_of_unseen_birds(tmp_path: Path) -> None:
    photos = unseen_species_photos()
    rng = np.random.default_rng(0)
    species = [str(s) for s in rng.permutation(sorted(photos))]
    enrolled, strangers = (
        species[:GALLERY_SPECIES],
        species[GALLERY_SPECIES : GALLERY_SPECIES + STRANGER_SPECIES],
    )

    def draw(name: str, n: int) -> list[str]:
        chosen = rng.choice(len(photos[name]), n, replace=False)
        return [base64.b64encode(photos[name][i]).decode() for i in sorted(chosen)]

    settings = make_settings(
        DEFAULT,
        {"store_url": f"sqlite:///{tmp_path / 'tcm.db'}"},
        max_body_bytes=8 * 1024 * 1024,
    )
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        tenant = api.new_tenant("unseen birds")
        for name in enrolled:
            api.enrol(tenant, [{"subject": name, "image": image} for image in draw(name, PHOTOS)])
        accepted: dict[str, list[bool]] = {}
        for name in strangers:
            for image in draw(name, PROBES):
                r = client.post("/v1/match", json={"image": image, "k": 1}, headers=tenant.auth)
                assert r.status_code == 200, r.text
                accepted.setdefault(name, []).append(r.json()["decision"]["accepted"])
        families = text_string_to_metric_families(client.get("/metrics").text)
        (gauge,) = [f for f in families if f.name == "tcm_tenant_expected_fpir_ratio"]
        expected = {s.labels["tenant"]: s.value for s in gauge.samples}[tenant.tenant_id]

    manifest = read_manifest(DEFAULT)
    tails = load_openset(DEFAULT, manifest)
    assert tails is not None and tails.resolved(manifest.calibration.tau)
    tau = manifest.calibration.tau
    # the gauge is the gallery model at this tenant's shape, not N photos of N subjects
    assert expected == pytest.approx(fpir_gallery(tails, tau, {PHOTOS: GALLERY_SPECIES}))
    photo_model = fpir(tails, tau, GALLERY_SPECIES * PHOTOS)
    measured = float(np.mean([a for v in accepted.values() for a in v]))
    lo, hi = species_bootstrap(accepted)
    print(
        f"measured FPIR {measured:.3f} [{lo:.3f}, {hi:.3f}] over {STRANGER_SPECIES} species; "
        f"expected {expected:.3f} (gallery model), {photo_model:.3f} (photo model)"
    )
    assert lo <= expected <= hi
