"""Linear algebra of SST-Merge as pure tensor functions (docs/method.md, steps 2 and 4–7).

Notation for one module: ΔS (d_out × d_in) is the safety update, R_out (d_out × p) and R_in (d_in × q)
orthonormal bases of its column and row spaces, M = R_outᵀ ΔS R_in (p × q) its core. The K-FAC Fisher
restricted to the span is F = A ⊗ G with A (q × q) the input factor and G (p × p) the output-gradient
factor; its generalized eigenvectors are v_ij = (R_out y_i)(R_in x_j)ᵀ with λ_ij = ν_i μ_j.
All functions compute in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_F64 = torch.float64


def orthonormal_basis(matrix: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis (d × k) of col(matrix), dropping directions with σ ≤ rtol·σ_max (rank-revealing SVD)."""
    U, S, _ = torch.linalg.svd(matrix.to(_F64), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    return U[:, S > rtol * S[0]]


def damp(factor: torch.Tensor, eps: float) -> torch.Tensor:
    """F̃ = F + ε·tr(F)/r·I (r = size of F): damping relative to the factor's mean eigenvalue."""
    r = factor.shape[0]
    factor = factor.to(_F64)
    return factor + (eps * torch.trace(factor) / r) * torch.eye(r, dtype=_F64, device=factor.device)


def generalized_eigh(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve a x = μ b x for symmetric a and positive-definite b.

    Returns (μ descending, X) with a X = b X diag(μ) and Xᵀ b X = I, via b = L Lᵀ and the ordinary
    symmetric eigenproblem of L⁻¹ a L⁻ᵀ (the same normalisation as `scipy.linalg.eigh(a, b)`).
    """
    a, b = a.to(_F64), b.to(_F64)
    L = torch.linalg.cholesky(b)
    Linv_a = torch.linalg.solve_triangular(L, a, upper=False)
    core = torch.linalg.solve_triangular(L, Linv_a.T, upper=False)
    core = 0.5 * (core + core.T)
    mu, Z = torch.linalg.eigh(core)
    X = torch.linalg.solve_triangular(L.T, Z, upper=True)
    order = torch.argsort(mu, descending=True)
    return mu[order], X[:, order]


@dataclass(frozen=True)
class Eigenbasis:
    """The F_U-orthonormal eigenbasis of one module: v_ij = (R_out y_i)(R_in x_j)ᵀ, λ_ij = ν_i μ_j."""

    R_out: torch.Tensor  # (d_out × p)
    R_in: torch.Tensor  # (d_in × q)
    Y: torch.Tensor  # (p × p), Yᵀ G̃_U Y = I
    X: torch.Tensor  # (q × q), Xᵀ Ã_U X = I
    nu: torch.Tensor  # (p,) descending
    mu: torch.Tensor  # (q,) descending
    G_u: torch.Tensor  # G̃_U (p × p)
    A_u: torch.Tensor  # Ã_U (q × q)
    G_s: torch.Tensor  # G̃_S (p × p)
    A_s: torch.Tensor  # Ã_S (q × q)

    @property
    def lam(self) -> torch.Tensor:
        """λ (p × q), λ_ij = ν_i μ_j."""
        return torch.outer(self.nu, self.mu)

    def coefficients(self, core: torch.Tensor) -> torch.Tensor:
        """C = Yᵀ G̃_U M Ã_U X (p × q) for the core M = R_outᵀ Δ R_in, so that Δ = R_out Y C Xᵀ R_inᵀ."""
        return self.Y.T @ self.G_u @ core.to(_F64) @ self.A_u @ self.X

    def left_right(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_out Y, R_in X): Δ' = (R_out Y) C' (R_in X)ᵀ for any coefficient matrix C'."""
        return self.R_out @ self.Y, self.R_in @ self.X

    def residual(self) -> float:
        """The larger GEVP residual of the two factor problems (see `gevp_residual`)."""
        return max(
            gevp_residual(self.A_s, self.A_u, self.mu, self.X), gevp_residual(self.G_s, self.G_u, self.nu, self.Y)
        )

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Dense R_out Y C Xᵀ R_inᵀ (d_out × d_in)."""
        left, right = self.left_right()
        return left @ coefficients @ right.T


def eigenbasis(
    R_out: torch.Tensor,
    R_in: torch.Tensor,
    A_u: torch.Tensor,
    G_u: torch.Tensor,
    A_s: torch.Tensor,
    G_s: torch.Tensor,
    eps: float,
) -> Eigenbasis:
    """Damp the four r×r factors (docs/method.md, step 4) and solve Ã_S x = μ Ã_U x and G̃_S y = ν G̃_U y (step 5)."""
    A_u, G_u, A_s, G_s = (damp(f, eps) for f in (A_u, G_u, A_s, G_s))
    mu, X = generalized_eigh(A_s, A_u)
    nu, Y = generalized_eigh(G_s, G_u)
    return Eigenbasis(R_out.to(_F64), R_in.to(_F64), Y, X, nu, mu, G_u, A_u, G_s, A_s)


def gevp_residual(a: torch.Tensor, b: torch.Tensor, eigenvalues: torch.Tensor, vectors: torch.Tensor) -> float:
    """max(‖a X − b X diag(μ)‖_F / ‖a‖_F, ‖Xᵀ b X − I‖_F): 0 for an exact solution."""
    a, b = a.to(_F64), b.to(_F64)
    eq = torch.linalg.norm(a @ vectors - b @ vectors * eigenvalues) / torch.linalg.norm(a).clamp_min(1e-300)
    eye = torch.eye(vectors.shape[1], dtype=_F64, device=vectors.device)
    ortho = torch.linalg.norm(vectors.T @ b @ vectors - eye)
    return float(max(eq, ortho))


def factorize(left: torch.Tensor, core: torch.Tensor, right: torch.Tensor, rtol: float = 1e-10):
    """Exact minimal factors of Δ = left · core · rightᵀ: (B, A) with B = left P Σ, A = Qᵀ rightᵀ.

    `core = P Σ Qᵀ` is a small SVD; singular values ≤ rtol·σ_max are dropped, so rank(B A) = rank(core).
    """
    P, S, Qh = torch.linalg.svd(core.to(_F64), full_matrices=False)
    keep = S > rtol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return left.to(_F64) @ (P[:, keep] * S[keep]), Qh[keep] @ right.to(_F64).T


def truncate_product(B: torch.Tensor, A: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` approximation of Δ = B A (Eckart–Young) without forming Δ.

    B = Q_b R_b, Aᵀ = Q_a R_a (thin QR), then the SVD of the small R_b R_aᵀ. Returns (B', A', ‖Δ−B'A'‖_F/‖Δ‖_F).
    """
    B, A = B.to(_F64), A.to(_F64)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(max_rank, int((S > 0).sum()))
    total = torch.linalg.norm(S)
    error = float(torch.linalg.norm(S[k:]) / total) if total > 0 else 0.0
    return Qb @ (U[:, :k] * S[:k]), Vh[:k] @ Qa.T, error


def truncated_svd(delta: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` factors (B, A) of a dense Δ by SVD (in Δ's precision), and ‖Δ − B A‖_F / ‖Δ‖_F."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(max_rank, int((S > 0).sum()))
    total = torch.linalg.norm(S)
    error = float(torch.linalg.norm(S[k:]) / total) if total > 0 else 0.0
    return U[:, :k] * S[:k], Vh[:k], error
