import math

import pytest

from studies.common import differences_table, paired_differences


def _row(seed: int, opis: float) -> dict:
    return {"config": {"seed": seed}, "opis": opis}


def test_paired_differences_oracle() -> None:
    # paired by seed whatever the order; differences -2, -1, -3: mean -2, sd 1, t(0.975, 2)
    base = [_row(0, 10.0), _row(1, 12.0), _row(2, 14.0)]
    treated = [_row(2, 11.0), _row(0, 8.0), _row(1, 11.0)]
    d = paired_differences(base, treated, ["opis"])["opis"]
    assert d["seeds"] == [2, 0, 1] and d["per_seed"] == [-3.0, -2.0, -1.0]
    half = 4.302652729911275 / math.sqrt(3)
    assert d["mean"] == pytest.approx(-2.0)
    assert d["ci95"] == pytest.approx([-2.0 - half, -2.0 + half])
    assert d["relative"] == pytest.approx(-2.0 / 12.0)
    assert d["inside_noise"] is True  # half = 2.48: [-4.48, +0.48] covers 0
    tight = [_row(0, 8.0), _row(1, 9.9), _row(2, 12.1)]  # -2.0, -2.1, -1.9: half = 0.25
    assert paired_differences(base, tight, ["opis"])["opis"]["inside_noise"] is False


def test_paired_differences_noise_and_errors() -> None:
    base = [_row(0, 10.0), _row(1, 10.0)]
    d = paired_differences(base, [_row(0, 9.0), _row(1, 11.0)], ["opis"])["opis"]
    assert d["mean"] == 0.0 and d["inside_noise"] is True
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_differences(base, [_row(0, 9.0), _row(5, 9.0)], ["opis"])
    lines = differences_table({"opis": d}, [("opis", "OPIS", 1.0, ".1f")])
    assert lines[2].startswith("| OPIS | -1.0, +1.0 | +0.0 |") and lines[2].endswith("| yes |")
