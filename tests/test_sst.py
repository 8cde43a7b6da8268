"""SST-Merge invariants (docs/method.md) on synthetic modules, and the projection against a dense Kronecker solve."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sstmerge_core.adapters import LoraFactors
from sstmerge_core.gevp import damp, orthonormal_basis
from sstmerge_core.merge import merge_modules
from sstmerge_core.methods.base import FisherFactors, ModuleInputs
from sstmerge_core.methods.catalog import SSTParams
from sstmerge_core.methods.registry import get_method
from sstmerge_core.methods.sst import project

D_OUT, D_IN, R_S, R_U = 24, 20, 4, 3
F64 = torch.float64


def spd(n: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(n, rank or 2 * n, generator=g, dtype=F64)
    return X @ X.T


def module(name: str = "m", seed: int = 0, utility: bool = True) -> ModuleInputs:
    """A random module: utility rank R_U, safety rank R_S, Fisher factors at the span."""
    g = torch.Generator().manual_seed(seed)
    safety = LoraFactors(
        torch.randn(D_OUT, R_S, generator=g, dtype=F64), torch.randn(R_S, D_IN, generator=g, dtype=F64), 0.5
    )
    ups = (
        [
            LoraFactors(
                torch.randn(D_OUT, R_U, generator=g, dtype=F64), torch.randn(R_U, D_IN, generator=g, dtype=F64), 2.0
            )
        ]
        if utility
        else []
    )
    R_in, R_out = orthonormal_basis(safety.A.T), orthonormal_basis(safety.B)
    fisher = FisherFactors(R_in, R_out, spd(R_S, g), spd(R_S, g), spd(R_S, g, 2), spd(R_S, g, 3))
    return ModuleInputs(name, (D_OUT, D_IN), ups, safety, fisher)


def sst_delta(m: ModuleInputs, **params) -> torch.Tensor:
    projected, _ = project(m, SSTParams(**params))
    return projected.delta().to(F64)


def test_topk_with_all_directions_returns_the_safety_update():
    m = module()
    torch.testing.assert_close(sst_delta(m, selection="topk", k=R_S * R_S), m.safety.delta().to(F64))


def test_soft_with_beta_to_zero_returns_the_safety_update():
    m = module()
    exact = m.safety.delta().to(F64)
    torch.testing.assert_close(sst_delta(m, selection="soft", beta=0.0), exact)
    errors = [float(torch.linalg.norm(sst_delta(m, selection="soft", beta=b) - exact)) for b in (1e-2, 1e-5, 1e-8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2 * errors[0]
    # and a finite β really shrinks it
    assert not torch.allclose(sst_delta(m, selection="soft", beta=1.0), m.safety.delta().to(F64))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_rank_and_idempotence(k):
    m = module()
    once = sst_delta(m, selection="topk", k=k)
    assert torch.linalg.matrix_rank(once) <= k
    # projecting the projection again (same eigenbasis) changes nothing
    U, S, Vh = torch.linalg.svd(once, full_matrices=False)
    again = ModuleInputs(m.name, m.shape, m.utility, LoraFactors(U[:, :R_S] * S[:R_S], Vh[:R_S]), m.fisher)
    torch.testing.assert_close(sst_delta(again, selection="topk", k=k), once, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k_in", [1, 2, 3])
def test_input_selection_rank(k_in):
    delta = sst_delta(module(), selection="input", k_in=k_in)
    assert torch.linalg.matrix_rank(delta) <= k_in


def test_different_k_give_different_results():
    m = module()
    deltas = [sst_delta(m, selection="topk", k=k) for k in (1, 4, 9)]
    assert not torch.allclose(deltas[0], deltas[1]) and not torch.allclose(deltas[1], deltas[2])


def test_alpha_zero_returns_the_utility_update_and_alpha_scales_the_projection():
    m = module()
    params = SSTParams(alphas=[0.0, 1.0, 2.0], selection="topk", k=5)
    results = get_method("sst").merge(m, params, params.alphas)
    utility = m.utility_delta()
    torch.testing.assert_close(results[0].factors.delta().to(F64), utility)
    assert results[0].factors.rank == R_U
    step = results[1].factors.delta().to(F64) - utility
    torch.testing.assert_close(results[2].factors.delta().to(F64) - utility, 2 * step)
    torch.testing.assert_close(step, sst_delta(m, selection="topk", k=5))


def kron_reference(m: ModuleInputs, eps: float):
    """Dense F_U, F_S = Ã ⊗ G̃ on vec(core) (column-major) and scipy's generalized eigenpairs."""
    f = m.fisher
    A_u, G_u, A_s, G_s = (damp(x, eps).numpy() for x in (f.A_u, f.G_u, f.A_s, f.G_s))
    F_u, F_s = np.kron(A_u, G_u), np.kron(A_s, G_s)
    lam, V = scipy.linalg.eigh(F_s, F_u)
    core = (f.R_out.T @ m.safety.delta().to(F64) @ f.R_in).numpy()
    return F_u, lam, V, core.flatten(order="F")


def from_vec(m: ModuleInputs, vec: np.ndarray) -> torch.Tensor:
    core = torch.from_numpy(vec.reshape(R_S, R_S, order="F"))
    return m.fisher.R_out @ core @ m.fisher.R_in.T


def test_topk_equals_the_seed_formulation_on_the_dense_kronecker_problem():
    """ΔS' = V_k V_kᵀ F_U vec(ΔS) with V the F_U-orthonormal generalized eigenvectors of (F_S, F_U)."""
    m, k = module(seed=3), 6
    F_u, lam, V, s = kron_reference(m, 1e-3)
    Vk = V[:, np.argsort(lam)[::-1][:k]]
    torch.testing.assert_close(
        sst_delta(m, selection="topk", k=k), from_vec(m, Vk @ Vk.T @ F_u @ s), rtol=1e-6, atol=1e-8
    )


def test_soft_equals_the_fisher_merging_closed_form():
    """argmin_v ½‖v − ΔS‖²_{F_S} + ½β′‖v‖²_{F_U} = (F_S + β′F_U)⁻¹ F_S ΔS, solved densely."""
    m, beta = module(seed=4), 0.7
    F_u, lam, V, s = kron_reference(m, 1e-3)
    f = m.fisher
    F_s = np.kron(damp(f.A_s, 1e-3).numpy(), damp(f.G_s, 1e-3).numpy())
    beta_prime = beta * np.median(lam)
    v = np.linalg.solve(F_s + beta_prime * F_u, F_s @ s)
    torch.testing.assert_close(sst_delta(m, selection="soft", beta=beta), from_vec(m, v), rtol=1e-6, atol=1e-8)


def test_every_module_result_lands_on_its_own_module():
    """Modules given in an order unlike their names, each with its own update: no alignment mix-up."""
    modules = {
        name: module(name, seed=i, utility=(i % 2 == 0))
        for i, name in enumerate(["z.last", "a.first", "m.middle", "b.second"])
    }
    params = SSTParams(alphas=[1.0], selection="topk", k=5)
    fisher = {name: m.fisher for name, m in modules.items()}
    stripped = {name: ModuleInputs(m.name, m.shape, m.utility, m.safety) for name, m in modules.items()}
    results = merge_modules(get_method("sst"), stripped, params, fisher)[1.0]
    assert set(results) == set(modules)
    for name, m in modules.items():
        expected = m.utility_delta() + sst_delta(m, selection="topk", k=5)
        torch.testing.assert_close(results[name].factors.delta().to(F64), expected)


def test_diagnostics_are_recorded():
    _, diag = project(module(), SSTParams(selection="soft"))
    assert diag["gevp_residual"] < 1e-8
    assert 0 < diag["energy_retained_fu"] <= 1 and 0 < diag["energy_retained_fs"] <= 1
    assert diag["energy_retained_fs"] > diag["energy_retained_fu"]  # soft keeps what F_S weighs, sheds F_U
    assert len(diag["lambda_top"]) == 8 and diag["lambda_top"] == sorted(diag["lambda_top"], reverse=True)
    assert diag["norm_ratio"] > 0


def test_max_rank_truncation_reports_error():
    m = module()
    params = SSTParams(alphas=[1.0], selection="soft", max_rank=2)
    result = merge_modules(
        get_method("sst"), {"m": ModuleInputs(m.name, m.shape, m.utility, m.safety)}, params, {"m": m.fisher}
    )[1.0]["m"]
    assert result.factors.rank == 2
    full = m.utility_delta() + sst_delta(m, selection="soft")
    S = torch.linalg.svdvals(full)
    assert result.diagnostics["svd_rel_error"] == pytest.approx(
        float(torch.linalg.norm(S[2:]) / torch.linalg.norm(S)), rel=1e-6
    )
