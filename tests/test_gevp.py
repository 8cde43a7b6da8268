"""The eigenproblem helpers against scipy and dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sstmerge_core.gevp import (
    damp,
    eigenbasis,
    factorize,
    generalized_eigh,
    gevp_residual,
    orthonormal_basis,
    truncate_product,
    truncated_svd,
)


def random_spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return X @ X.T / (rank or n)


@pytest.mark.parametrize("n", [1, 3, 8, 16])
def test_generalized_eigh_matches_scipy(n):
    a, b = random_spd(n, 1), damp(random_spd(n, 2), 1e-3)  # distinct eigenvalues: vectors unique up to sign
    mu, X = generalized_eigh(a, b)
    ref_mu, ref_X = scipy.linalg.eigh(a.numpy(), b.numpy())
    np.testing.assert_allclose(mu.numpy(), ref_mu[::-1], rtol=1e-9, atol=1e-12)
    # eigenvectors agree up to sign (eigenvalues are distinct for random inputs)
    signs = np.sign(np.sum(X.numpy() * ref_X[:, ::-1], axis=0))
    np.testing.assert_allclose(X.numpy(), ref_X[:, ::-1] * signs, rtol=1e-7, atol=1e-9)
    assert gevp_residual(a, b, mu, X) < 1e-10
    assert torch.all(mu[:-1] >= mu[1:])


def test_generalized_eigh_rank_deficient_numerator():
    """Safety factors may be rank-deficient (data never excites a direction): μ ≥ 0, residual small."""
    a, b = random_spd(8, 1, rank=3), damp(random_spd(8, 2), 1e-3)
    mu, X = generalized_eigh(a, b)
    np.testing.assert_allclose(mu.numpy(), scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)[::-1], atol=1e-10)
    assert gevp_residual(a, b, mu, X) < 1e-10
    assert int((mu > 1e-9).sum()) == 3


def test_damping_adds_relative_ridge():
    F = random_spd(5, 3)
    eps = 1e-2
    expected = F + eps * torch.trace(F) / 5 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(damp(F, eps), expected)
    # the damped zero-signal factor stays positive semi-definite and the damped utility factor is PD
    assert torch.linalg.eigvalsh(damp(random_spd(6, 4, rank=2), 1e-3)).min() > 0


def test_orthonormal_basis_drops_null_directions():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(20, 3, generator=g, dtype=torch.float64)
    B = torch.cat([B, B[:, :1] * 2.0], dim=1)  # 4 columns, rank 3
    R = orthonormal_basis(B)
    assert R.shape == (20, 3)
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(R @ R.T @ B, B)  # spans col(B)
    assert orthonormal_basis(torch.zeros(5, 2)).shape == (5, 0)


def test_eigenbasis_is_exact_and_fu_orthonormal():
    p, q = 4, 5
    R_out = orthonormal_basis(torch.randn(30, p, dtype=torch.float64))
    R_in = orthonormal_basis(torch.randn(40, q, dtype=torch.float64))
    basis = eigenbasis(R_out, R_in, random_spd(q, 1), random_spd(p, 2), random_spd(q, 3, 2), random_spd(p, 4, 2), 1e-3)
    M = torch.randn(p, q, dtype=torch.float64)
    delta = R_out @ M @ R_in.T
    C = basis.coefficients(M)
    torch.testing.assert_close(basis.reconstruct(C), delta)
    torch.testing.assert_close(basis.Y.T @ basis.G_u @ basis.Y, torch.eye(p, dtype=torch.float64))
    torch.testing.assert_close(basis.X.T @ basis.A_u @ basis.X, torch.eye(q, dtype=torch.float64))
    assert basis.residual() < 1e-10
    torch.testing.assert_close(basis.lam, torch.outer(basis.nu, basis.mu))


def test_factorize_is_exact_and_minimal():
    left, right = torch.randn(12, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    core = torch.zeros(4, 4, dtype=torch.float64)
    core[0, 1], core[2, 3] = 1.5, -0.5
    B, A = factorize(left, core, right)
    assert A.shape[0] == 2
    torch.testing.assert_close(B @ A, left @ core @ right.T)


def test_truncations_match_dense_svd():
    B, A = torch.randn(30, 6, dtype=torch.float64), torch.randn(6, 20, dtype=torch.float64)
    dense = B @ A
    B2, A2, err = truncate_product(B, A, 3)
    B3, A3, err3 = truncated_svd(dense, 3)
    S = torch.linalg.svdvals(dense)
    expected_err = float(torch.linalg.norm(S[3:]) / torch.linalg.norm(S))
    assert err == pytest.approx(expected_err, rel=1e-9) and err3 == pytest.approx(expected_err, rel=1e-9)
    torch.testing.assert_close(B2 @ A2, B3 @ A3)
    assert torch.linalg.matrix_rank(B2 @ A2) == 3
    _, _, zero_err = truncate_product(B, A, 6)
    assert zero_err < 1e-12
