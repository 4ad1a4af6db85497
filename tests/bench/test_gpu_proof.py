"""The GPU proof script (bench/gpu_proof.py) runs end to end on the CPU at tiny sizes, so the one
device run a session gets is not spent finding that it no longer imports or runs."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_proof


def test_gpu_proof_runs_on_cpu(tmp_path: Path) -> None:
    results = gpu_proof.main(
        ["--out", str(tmp_path), "--small", "--device", "cpu", "--skip", "pytest"]
    )
    assert results["errors"] == {}
    saved = json.loads((tmp_path / "gpu_proof.json").read_text())
    parts = saved["parts"]
    assert set(parts) == {
        "opis",
        "tcm_overhead",
        "batcher",
        "batcher_ceiling",
        "search",
        "service_index",
    }
    assert parts["service_index"]["same_hits"] and parts["service_index"]["same_filtered"]
    assert parts["service_index"]["same_after_removals"]
    assert parts["opis"]["best_seconds"] > 0 and parts["opis"]["limit_seconds_n2d"] > 0
    assert parts["tcm_overhead"]["ratio"] > 0
    assert parts["batcher"]["batcher_runs"][1]["mean_batch"] > 1  # the batcher did batch
    # the torch engine and FAISS agree on every query's top 10
    assert parts["search"]["rows_identical_topk"] == parts["search"]["queries"]
    assert (tmp_path / "gpu_proof.md").read_text().startswith("# GPU proof run")
