import math

import pytest

from studies.derived import CUB_KEYS, cub_section


def _run(arm: str, seed: int, far_spread: float) -> dict:
    row = {key: 1.0 for key, *_ in CUB_KEYS}
    row.update(loss="SupCon", arm=arm, far_spread=far_spread, config={"seed": seed})
    return row


def test_cub_section_relative_interval_oracle() -> None:
    # base 0.04 every seed; with TCM 0.030, 0.032, 0.028: differences -0.010, -0.008, -0.012,
    # mean -0.010 (-25% of 0.04), sd 0.002, t(0.975, 2) = 4.3027
    runs = [_run("base", s, 0.04) for s in range(3)]
    runs += [_run("tcm_l1", s, v) for s, v in enumerate([0.030, 0.032, 0.028])]
    runs.append(_run("tcm_l0.5", 0, 0.5))  # other arms are not compared
    lines, out = cub_section(runs)
    d = out["SupCon + TCM λ=1 - SupCon"]["far_spread"]
    half = 4.302652729911275 * 0.002 / math.sqrt(3)
    assert d["relative"] == pytest.approx(-0.25)
    assert d["relative_ci95"] == pytest.approx([(-0.010 - half) / 0.04, (-0.010 + half) / 0.04])
    assert d["seeds_lower"] == 3
    assert out["SupCon + TCM λ=1 - SupCon"]["frr_spread"]["relative_ci95"] == [0.0, 0.0]
    assert any("-25.0% [-37.4%, -12.6%], lower in 3/3 seeds" in ln for ln in lines)
