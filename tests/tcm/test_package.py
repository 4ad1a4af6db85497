"""The ``tcm`` package's top level: lazy names (PEP 562)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_tcm_package_resolves_every_public_name_lazily() -> None:
    """``tcm`` imports its submodules on first use, so ``import tcm.exported`` (which the
    service's operator commands use) stays torch-free; every name it promises still resolves,
    and an unknown one does not."""
    code = (
        "import sys, tcm, tcm.exported; print('torch' in sys.modules); "
        "[getattr(tcm, n) for n in tcm.__all__]; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    import tcm

    assert sorted(tcm.__all__) == sorted(tcm._WHERE)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tcm.nope  # noqa: B018
