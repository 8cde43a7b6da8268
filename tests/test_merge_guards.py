"""The merge refuses what it cannot compute soundly, with a named code (never a crash, never a silent loss): a
linear-algebra failure (`numerical_error`), a non-finite merged update or diagnostic (`non_finite_result`), a safety
update that leaves no trace in the merge (`safety_update_lost`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sstmerge_core.adapters import LoraFactors
from sstmerge_core.errors import InputError
from sstmerge_core.merge import merge_modules
from sstmerge_core.methods.catalog import parse_params
from sstmerge_core.methods.registry import get_method
from tests.test_sst import module


def scaled_safety(scale: float, dtype: torch.dtype = torch.float64):
    m = module()
    safety = LoraFactors((m.safety.B * scale).to(dtype), (m.safety.A * scale).to(dtype), m.safety.scale)
    return dataclasses.replace(m, safety=safety)


def merge(method: str, m, alphas=(1.0,), **params):
    return merge_modules(get_method(method), {"m": m}, parse_params(method, {"alphas": list(alphas), **params}), None)


@pytest.mark.parametrize(
    ("scale", "code"),
    [(1e-200, "safety_update_lost"), (1e150, "non_finite_result"), (1e300, "numerical_error")],
)
def test_sst_on_extreme_safety_values_fails_with_a_code(scale, code):
    """Before: 1e-200 and 1e150 merged "successfully" with the safety projection gone (norm ratio 0) and NaN
    energies in the report; 1e300 raised torch's SVD error."""
    with pytest.raises(InputError) as error:
        merge("sst", scaled_safety(scale))
    assert error.value.code == code and "sst" in str(error.value), str(error.value)
    assert "Error" not in str(error.value)  # no exception names


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune", "linear"])
def test_every_method_on_overflowing_float32_values_fails_as_non_finite(method):
    """Finite float32 factors whose product overflows float32: `non_finite_result` (before: TIES, DARE and magnitude
    pruning crashed in the SVD; linear is refused by the writer's check instead, so here it must merge)."""
    m = scaled_safety(1e19, torch.float32)
    if method == "linear":
        merged = merge(method, m)[1.0]["m"]
        assert merged.factors is not None  # factors stay finite; `stages.writing.check_finite` refuses ΔW
        return
    with pytest.raises(InputError) as error:
        merge(method, m)
    assert error.value.code == "non_finite_result" and "module m" in str(error.value)


def test_a_zero_safety_update_is_refused_unless_alpha_is_zero():
    m = scaled_safety(0.0)
    for method in ("sst", "linear", "ties"):
        with pytest.raises(InputError) as error:
            merge(method, m, alphas=(0.0, 1.0))
        assert error.value.code == "safety_update_lost" and f"{method}@1" in str(error.value)
        assert merge(method, m, alphas=(0.0,))[0.0]["m"] is not None


def test_sound_inputs_merge_as_before():
    for method in ("sst", "linear", "ties", "dare_linear"):
        results = merge(method, module(), alphas=(0.0, 0.5, 2.0))
        assert all(torch.isfinite(r["m"].factors.delta()).all() for r in results.values() if r["m"].factors)
