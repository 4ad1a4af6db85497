"""Embedding validation: properties over arbitrary vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain.inputs import as_unit_vector
from service.errors import InvalidInputError

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(st.lists(finite, min_size=4, max_size=4))
def test_unit_vector_or_clear_error(values: list[float]) -> None:
    if not any(values):
        with pytest.raises(InvalidInputError, match="zero vector"):
            as_unit_vector(values, 4, where="e")
        return
    v = as_unit_vector(values, 4, where="e")
    assert v.dtype == np.float32 and np.isfinite(v).all()
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    # same direction: the cosine with the input is 1 (computed stably, in scaled float64)
    x = np.asarray(values) / np.abs(values).max()
    assert float(v @ x) / np.linalg.norm(x) == pytest.approx(1.0, abs=1e-5)


@given(st.lists(finite, min_size=1, max_size=8).filter(lambda v: len(v) != 4))
def test_wrong_dimension(values: list[float]) -> None:
    with pytest.raises(InvalidInputError, match="dimension"):
        as_unit_vector(values, 4, where="e")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad: float) -> None:
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        as_unit_vector([1.0, bad, 0.0, 0.0], 4, where="e")
