"""The AFM replacements: a linear layer by two thinner ones, an embedding table by a rank-k table.

Given a layer's output statistics (mean μ, top-k eigenvectors U_k of the output covariance), an output
y is replaced by its projection on the principal subspace, ``ŷ = U_k U_kᵀ (y − μ) + μ``:

* linear layer y = W x + b: ``ŷ = W2 (W1 x + b1) + b2`` with W1 = U_kᵀW, b1 = U_kᵀb, W2 = U_k,
  b2 = (I − U_kU_kᵀ)μ; k(in + out + 1) + out parameters instead of (in + 1)·out.
* embedding table E (per field f): ``ŷ = U_f z + μ_f`` with z = (E_f − μ_f)U_f, i.e. a ``lowrank``
  table with A = (E_f − μ_f)U_f, B_f = U_fᵀ and bias c_f = μ_f.

With k equal to the full width both are exact (U_k U_kᵀ = I).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..embeddings.base import CompressedEmbeddingBag
from ..embeddings.lowrank import LowRankEmbeddingBag
from ..embeddings.ops import field_starts


class FactorizedLinear(nn.Sequential):
    """``Linear(in, k)`` then ``Linear(k, out)``: a rank-k linear layer. After folding, ``second`` is gone."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=bias)
        self.second = nn.Linear(rank, out_features)

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features if "second" in self._modules else self.first.out_features


#: A rank-k factorisation (two products, k·(in + out) multiply-adds per row) is served as two products
#: when that is at most this fraction of one product's in·out (the timed break-even at batch 4096).
FACTORISED_MAX_COST = 0.7
#: Up to SMALL_BATCH rows a call costs more than the arithmetic and a product's time is the reading of its
#: weights: two products pay for their extra call only on a big layer (SMALL_BATCH_MIN_WEIGHTS) at a low
#: cost fraction (SMALL_BATCH_MAX_COST). Timings: docs/lowrank.md.
SMALL_BATCH = 16
SMALL_BATCH_MAX_COST = 0.25
SMALL_BATCH_MIN_WEIGHTS = 65536


def factorised_is_cheaper(in_features: int, rank: int, out_features: int, batch_size: int | None = None) -> bool:
    """Whether ``Linear(in, k)`` then ``Linear(k, out)`` should beat one ``Linear(in, out)`` on the CPU at
    ``batch_size`` rows per call (None: large batches)."""
    one, two = in_features * out_features, rank * (in_features + out_features)
    if batch_size is not None and batch_size <= SMALL_BATCH:
        return one >= SMALL_BATCH_MIN_WEIGHTS and two <= SMALL_BATCH_MAX_COST * one
    return two <= FACTORISED_MAX_COST * one


def linear_params(in_features: int, out_features: int, rank: int | None = None) -> int:
    """Parameters of a linear layer (with bias), or of its rank-``rank`` factorisation."""
    if rank is None:
        return (in_features + 1) * out_features
    return rank * (in_features + out_features + 1) + out_features


@torch.no_grad()
def factorize_linear(linear: nn.Linear, basis: Tensor, mean: Tensor) -> FactorizedLinear:
    """AFM replacement of ``linear`` from its output statistics: basis U_k (out, k), mean μ (out,)."""
    out_f, k = basis.shape
    if out_f != linear.out_features:
        raise ValueError(f"basis has {out_f} rows for a layer with {linear.out_features} outputs")
    u = basis.double()
    mu = mean.double()
    w, b = linear.weight.double(), linear.bias.double() if linear.bias is not None else None
    new = FactorizedLinear(linear.in_features, k, out_f, bias=b is not None).to(linear.weight.device)
    dtype = linear.weight.dtype
    new.first.weight.copy_((u.T @ w).to(dtype))  # (k, in)
    if b is not None:
        new.first.bias.copy_((u.T @ b).to(dtype))  # (k,)
    new.second.weight.copy_(u.to(dtype))  # (out, k)
    new.second.bias.copy_((mu - u @ (u.T @ mu)).to(dtype))  # (I − U Uᵀ) μ
    return new


@torch.no_grad()
def fold_into(layer: FactorizedLinear, following: nn.Module) -> bool:
    """Fold ``layer.second`` into a directly following linear map; returns whether it was folded.

    Next(W2 z + b2) = (W_n W2) z + (W_n b2 + b_n): valid only when nothing (no activation) sits between.
    """
    target = following.first if isinstance(following, FactorizedLinear) else following
    if "second" not in layer._modules or not isinstance(target, nn.Linear):
        return False
    w2, b2 = layer.second.weight.double(), layer.second.bias.double()
    wn = target.weight.double()
    bn = target.bias.double() if target.bias is not None else torch.zeros(wn.shape[0], dtype=torch.float64,
                                                                         device=wn.device)
    folded = nn.Linear(w2.shape[1], wn.shape[0]).to(target.weight.device)
    folded.weight.copy_((wn @ w2).to(target.weight.dtype))
    folded.bias.copy_((wn @ b2 + bn).to(target.weight.dtype))
    if isinstance(following, FactorizedLinear):
        following.first = folded
    else:
        following.weight, following.bias = folded.weight, folded.bias
        following.in_features = folded.in_features
    del layer._modules["second"]
    return True


def field_blocks(table: CompressedEmbeddingBag) -> tuple[list[int], list[Tensor]]:
    """Rows of A per field and each field's stored D-dim rows (rows_f, D), for ``full`` and ``lowrank``."""
    if isinstance(table, LowRankEmbeddingBag):
        blocks = []
        for f in range(len(table.field_sizes)):
            a, b = table.field_factors(f)
            blocks.append(a @ b + table.bias[f])
        return table.rows.tolist(), blocks
    weight = getattr(table, "weight", None)
    if table.name == "full" and weight is not None:
        starts = field_starts(table.field_sizes).tolist()
        return list(table.field_sizes), [weight[s:s + n] for s, n in zip(starts, table.field_sizes)]
    raise TypeError(f"AFM can compress 'full' and 'lowrank' tables, not {table.name!r}")


def is_compressible_table(table: nn.Module) -> bool:
    return isinstance(table, LowRankEmbeddingBag) or (
        isinstance(table, CompressedEmbeddingBag) and table.name == "full" and table.embedding_dim > 1)


def table_rows(table: CompressedEmbeddingBag) -> list[int]:
    """Rows of A per field that a ``lowrank`` replacement of ``table`` would have."""
    return table.rows.tolist() if isinstance(table, LowRankEmbeddingBag) else list(table.field_sizes)


def table_params(table: CompressedEmbeddingBag, rank: int | Sequence[int] | None = None) -> int:
    """Parameters of ``table``, or of its ``lowrank`` replacement of rank ``rank`` (one, or one per field)."""
    if rank is None:
        return sum(p.numel() for p in table.parameters())
    rows = table_rows(table)
    num_fields, dim = len(table.field_sizes), table.embedding_dim
    ranks = [int(rank)] * num_fields if isinstance(rank, int) else [int(k) for k in rank]
    return sum(r * k for r, k in zip(rows, ranks)) + sum(ranks) * dim + num_fields * dim


def field_rank_params(rows: int, dim: int, rank: int) -> int:
    """Parameters one field of rows ``rows`` costs in a ``lowrank`` table at rank ``rank`` (bias excluded)."""
    return rank * (rows + dim)


@torch.no_grad()
def factorize_table(table: CompressedEmbeddingBag, bases: Tensor | Sequence[Tensor],
                    means: Tensor) -> LowRankEmbeddingBag:
    """AFM replacement of a table from per-field output statistics: bases (F, D, k), or one (D, k_f)
    per field (per-field ranks), and means (F, D)."""
    rows, blocks = field_blocks(table)
    dim = means.shape[1]
    ranks = [int(b.shape[1]) for b in bases]
    sparse = bool(getattr(table, "sparse", True))
    new = LowRankEmbeddingBag(table.field_sizes, dim, ranks, rows=rows, mode=table.mode, sparse=sparse)
    new.to(means.device)
    dtype = new.bias.dtype
    for f, block in enumerate(blocks):  # a loop over fields, not ids
        u, mu = bases[f].double(), means[f].double()
        a, b = new.field_factors(f)
        a.copy_(((block.double() - mu) @ u).to(dtype))
        b.copy_(u.T.to(dtype))
        new.bias[f] = mu.to(dtype)
    new.validate_ids = table.validate_ids
    return new
