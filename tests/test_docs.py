"""The documentation stands alone and its model figures are the artefacts' own.

Issue 30: user docs sent readers to ``../shared`` (a spec, an architecture sketch and data sets
that a clone of this repository does not have), and no model had a card. Every tracked Markdown
file is checked here, and each model card's tabled figures against the manifest they describe.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# | quantity | value | `manifest.field` |  (a card's tables name the manifest field of each value)
ROW = re.compile(r"^\|[^|]+\|\s*([^|]+?)\s*\|\s*`([a-z_]+(?:\.[a-z_0-9]+)+)`\s*\|\s*$")
REQUIRED = ("calibration.tau", "calibration.target_far", "baseline.opis")


def tracked(pattern: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", pattern],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / p for p in out.split("\0") if p]


def field(manifest: dict[str, Any], path: str) -> Any:
    value: Any = manifest
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def card_rows(text: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(2) not in rows, f"{m.group(2)} is tabled twice"
            rows[m.group(2)] = m.group(1)
    return rows


def check_card(rows: dict[str, str], manifest: dict[str, Any], where: str) -> None:
    missing = [f for f in REQUIRED if f not in rows]
    assert not missing, f"{where} does not table {missing}"
    for path, shown in rows.items():
        want = field(manifest, path)
        # a rebuild may differ in the last bit (float sums in another order): 1e-12 relative
        ok = math.isclose(float(shown), float(want), rel_tol=1e-12, abs_tol=0.0)
        assert ok, f"{where}: {path} is {shown}, the manifest says {want}"


def test_no_user_doc_sends_readers_outside_the_repository() -> None:
    docs = tracked("*.md")
    assert ROOT / "README.md" in docs and len(docs) > 10
    offenders = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in docs
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "../shared" in line
    ]
    assert not offenders, "docs must stand alone:\n" + "\n".join(offenders)


def test_the_checker_sees_a_reference_outside(tmp_path: Path) -> None:
    """The card checks are not blind: a row is read, a wrong value is caught."""
    assert card_rows("| τ | 0.5 | `calibration.tau` |") == {"calibration.tau": "0.5"}
    with pytest.raises(AssertionError):
        check_card({"calibration.tau": "0.5"}, {"calibration": {"tau": 0.6}}, "card")
    rows = {"calibration.tau": "0.5", "calibration.target_far": "0.001"}
    manifest = {"calibration": {"tau": 0.5, "target_far": 0.001}}
    rebuilt = {**manifest, "baseline": {"opis": 0.034147797702592624}}  # last bit apart: agrees
    check_card({**rows, "baseline.opis": "0.03414779770259262"}, rebuilt, "card")
    with pytest.raises(AssertionError, match=r"baseline\.opis is 0\.0341478,"):  # 8 digits: caught
        check_card({**rows, "baseline.opis": "0.0341478"}, rebuilt, "card")


def test_the_spec_the_docs_point_to_exists() -> None:
    spec = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    for section in ("TCM, the regulariser", "OPIS and ε-OPIS", "The global threshold"):
        assert section in spec
    assert "docs/spec.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_committed_artefact_has_a_card_that_agrees_with_its_manifest() -> None:
    manifests = tracked("artefacts/*/manifest.json")
    assert manifests, "no committed artefact"
    for path in manifests:
        card = path.with_name("MODEL_CARD.md")
        assert card in tracked(str(card.relative_to(ROOT))), f"{card} is not committed"
        manifest = json.loads(path.read_text())
        text = card.read_text(encoding="utf-8")
        assert manifest["model_version"] in text, f"{card} names another version"
        check_card(card_rows(text), manifest, str(card.relative_to(ROOT)))
        for heading in ("## Intended use", "## Training data", "## Calibration", "## Limits"):
            assert heading in text, f"{card} has no {heading!r}"
        assert "## Licences" in text


def test_the_face_card_agrees_with_the_served_face_model() -> None:
    """The face model is built locally (not committed): its card's τ is the one the committed
    end-to-end run served (``docs/results/faces_serve.json``), and where a build is present its
    manifest agrees with every tabled value."""
    text = (ROOT / "docs" / "model-cards.md").read_text(encoding="utf-8")
    rows = card_rows(text)
    served = json.loads((ROOT / "docs" / "results" / "faces_serve.json").read_text())
    assert float(rows["calibration.tau"]) == served["threshold"]
    assert "## The face model" in text and "### Licences" in text
    built = ROOT / "artefacts" / "faces" / "manifest.json"
    if built.is_file():  # `make run MODEL=faces` has built it in this checkout
        check_card(rows, json.loads(built.read_text()), "docs/model-cards.md")
    else:
        missing = [f for f in REQUIRED if f not in rows]
        assert not missing, missing
