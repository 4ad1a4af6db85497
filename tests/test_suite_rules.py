"""The suite fails, not skips, when what a selected test needs is missing (issue 15: ``pytest -m
gpu`` with a CPU torch reported "31 skipped" and exited 0; two Redis process test files skipped
without ``redis-server``). Each case runs pytest in a subprocess where the thing is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pytest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_tests_fail_without_cuda() -> None:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, even on a GPU machine
    r = _pytest("-m", "gpu", "tests/tcm/test_retrieval.py", env=env)
    assert r.returncode == 1, r.stdout[-2000:]
    # reported as setup errors: counted as failures, exit status 1, nothing skipped
    assert "3 errors" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
    assert "sees no CUDA device" in r.stdout


def test_redis_process_tests_fail_without_redis_server(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with python but without redis-server
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = os.environ | {"PATH": str(bin_dir)}
    targets = (
        "tests/service/store/test_redis_down.py",
        "tests/service/store/test_redis_topologies.py",
        "tests/service/store/test_bulk_enrol.py::"
        "test_connection_cut_at_a_byte_of_a_bulk_enrolment_is_all_or_nothing",
    )
    r = _pytest("-m", "not gpu", *targets, env=env)
    assert r.returncode == 1, r.stdout[-2000:]
    for target in targets:  # every selected test fails at setup
        assert f"ERROR {target.partition('::')[0]}::" in r.stdout, r.stdout[-2000:]
    assert "passed" not in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
    assert "redis-server is not installed" in r.stdout
