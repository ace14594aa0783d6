"""Streaming mean and covariance of layer outputs, and their eigen-decomposition (AFM statistics).

Shapes: n samples in a batch, G groups (one per embedding field, or 1 for a linear layer), d features.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StreamingMoments:
    """Mean and covariance of (n, G, d) or (n, d) batches, in float64, one pass, O(G·d²) memory.

    Batches are merged with Chan et al.'s pairwise update (batch mean and centred scatter first, then a
    rank-one correction) rather than by accumulating raw sums of x xᵀ, which would lose digits when the
    mean is large relative to the spread. Any split of the same rows gives the same result up to
    rounding.
    """

    def __init__(self, dim: int, groups: int = 1, device: torch.device | str | None = None) -> None:
        self.dim, self.groups = int(dim), int(groups)
        self.count = 0
        self.mean = torch.zeros(self.groups, self.dim, dtype=torch.float64, device=device)  # (G, d)
        self.m2 = torch.zeros(self.groups, self.dim, self.dim, dtype=torch.float64, device=device)  # (G, d, d)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach().to(device=self.mean.device, dtype=torch.float64)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1:] != (self.groups, self.dim):
            raise ValueError(f"expected a batch of shape (n, {self.groups}, {self.dim}), got {tuple(x.shape)}")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(dim=0)  # (G, d)
        xc = x - mb
        m2b = torch.einsum("ngd,nge->gde", xc, xc)  # (G, d, d)
        na = self.count
        n = na + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta[:, :, None] * delta[:, None, :] * (na * nb / n)
        self.count = n

    def covariance(self) -> Tensor:
        """Population covariance (G, d, d); zeros before any update."""
        return self.m2 / max(self.count, 1)


def principal_components(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (…, d) in descending order (clamped at 0) and eigenvectors (…, d, d) as columns."""
    cov = 0.5 * (cov + cov.transpose(-1, -2))  # exact symmetry for eigh
    vals, vecs = torch.linalg.eigh(cov)
    return vals.flip(-1).clamp(min=0), vecs.flip(-1)


def rank_for_variance(eigenvalues: Tensor, variance: float) -> int:
    """Smallest k whose top-k eigenvalues explain at least ``variance`` of the total (summed over groups).

    ``eigenvalues`` is (d,) or (G, d); a group-wise spectrum uses one k for every group.
    """
    vals = eigenvalues.reshape(-1, eigenvalues.shape[-1]).sum(0)
    total = vals.sum()
    if total <= 0:
        return 1
    explained = vals.cumsum(0) / total
    return int(min(int((explained < variance - 1e-12).sum().item()) + 1, vals.numel()))


def explained_fraction(eigenvalues: Tensor, k: int | list[int]) -> float:
    """Fraction of the total variance (summed over groups) kept at rank k, or at k_g per group."""
    vals = eigenvalues.reshape(-1, eigenvalues.shape[-1])
    total = float(vals.sum())
    if total <= 0:
        return 1.0
    if isinstance(k, int):
        return float(vals.sum(0)[:k].sum()) / total
    return sum(float(v[:kg].sum()) for v, kg in zip(vals, k)) / total
