"""studies.drift_sensitivity's pure parts: the degradations and how a ladder is summarised."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from studies.drift_sensitivity import CLEAN, Degradation, degrade, mildest_from, verdict


def photo() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_degradations() -> None:
    jpeg = photo()
    assert degrade(jpeg, CLEAN) is jpeg
    original = np.asarray(Image.open(io.BytesIO(jpeg)), np.float64)
    blurred = Image.open(io.BytesIO(degrade(jpeg, Degradation("blur", 2.0))))
    assert blurred.format == "PNG" and blurred.size == (32, 32)
    # a blur smooths: neighbouring pixels differ less
    assert (
        np.abs(np.diff(np.asarray(blurred, np.float64), axis=1)).mean()
        < 0.5 * np.abs(np.diff(original, axis=1)).mean()
    )
    low = degrade(jpeg, Degradation("jpeg", 1))
    assert Image.open(io.BytesIO(low)).format == "JPEG" and len(low) < len(jpeg)
    assert Degradation("jpeg", 10).key == "jpeg=10" and CLEAN.key == "clean"


def test_mildest_from_by_hand() -> None:
    # mildest first; the band 8-12 that does not alert stops the walk back from the harshest
    levels = [(1, False), (2, True), (6, True), (8, False), (16, True), (24, True)]
    assert mildest_from(levels) == 16
    assert mildest_from([(1, True), (2, True)]) == 1
    assert mildest_from([(1, True), (2, False)]) is None


def test_verdict_reads_the_10_minutes() -> None:
    result = {
        "newcomer": {
            "pending_after_s": {"TCMTenantLevelDegraded/retrain": 75.0},
            "firing_after_s": {"TCMTenantLevelDegraded/retrain": 1875.0},
        }
    }
    assert verdict(result) == {
        "pending_within_10_min": True,
        "firing_within_10_min": False,
        "firing_within_horizon": True,
    }
