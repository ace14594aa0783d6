"""``lowrank``: a low-rank factorised table, E_f = A_f · B_f + c_f per field.

Shapes: N global ids, F fields, D embedding dim, k rank (k <= D), R rows of A (R <= N).

Every id has a k-dim row of ``A`` (R, k); field f maps it to D dims with its own ``B_f`` (k, D) and adds
its own bias ``c_f`` (D,). A per-field map costs only F·k·D floats, and lets each field use its own
k-dim subspace of R^D: with one shared B every embedding would lie in the same subspace, so DLRM's dot
products (``a_iᵀ B Bᵀ a_j``) would be no richer than k-dim embeddings. The bias is what the AFM
post-training compression (``embcompress.compress``) needs to represent ``(E − μ)U_k`` followed by
``z ↦ U_k z + μ`` exactly, and it costs F·D floats.

Rank from the budget: ``k ≈ budget / (N + F·D)`` floats per id, clamped to ``[min_rank, D]``
(``min_rank`` defaults to D/4: a rank-1 or rank-2 table makes every embedding of a field nearly
collinear, which wastes the interaction layer). When ``k·N`` floats do not fit, the ids of the largest
fields are hashed (:func:`~embcompress.embeddings.ops.hash64`) onto fewer rows of ``A`` with
:func:`~embcompress.embeddings.ops.allocate_rows`, so the table reaches 10× to 10,000× at rank k: a
hashed low-rank table. k is rounded down (every id whole) unless that would leave more than 8% of
the budget unused, then up (a few ids hashed), so the table always lands within 10% of its budget.

:meth:`LowRankEmbeddingBag.from_full` turns a trained ``full`` table into a ``lowrank`` one by
truncated SVD per field, computed from the D×D Gram matrix so that a 10M-row field needs no N×N or N×D
float64 workspace.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FLOAT_BYTES, CompressedEmbeddingBag
from .ops import allocate_rows, field_of, field_starts, hash64
from .registry import register

_BUFFERS_PER_FIELD = 4  # start, size, rows of A, first row of A  (int64 each)


def default_min_rank(dim: int) -> int:
    return max(1, dim // 4)


@register("lowrank")
class LowRankEmbeddingBag(CompressedEmbeddingBag):
    """Rows ``A[row(id)] @ B[f] + c[f]``; ids of field f whose share of A is smaller than n_f are hashed."""

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rank: int,
                 rows: Sequence[int] | None = None, mode: str = "sum", sparse: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        k = int(rank)
        if not 1 <= k <= self.embedding_dim:
            raise ValueError(f"rank must be in [1, {self.embedding_dim}], got {rank}")
        rows_f = list(self.field_sizes) if rows is None else [max(1, min(int(r), n))
                                                               for r, n in zip(rows, self.field_sizes)]
        if len(rows_f) != len(self.field_sizes):
            raise ValueError("rows needs one entry per field")
        self.rank = k
        self.sparse = sparse
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
        self.register_buffer("rows", torch.tensor(rows_f, dtype=torch.int64))
        self.register_buffer("row_base", field_starts(rows_f))
        num_fields = len(self.field_sizes)
        # B_f: orthonormal rows, so ||A_i B_f|| = ||A_i||; A then gets the DLRM-reference variance
        # U(±sqrt(1/n_f)) per coordinate of the D-dim row, spread over k coordinates.
        b = torch.linalg.qr(torch.randn(num_fields, self.embedding_dim, k)).Q.transpose(1, 2)  # (F, k, D)
        self.proj = nn.Parameter(b.contiguous())
        scale = torch.repeat_interleave(
            torch.tensor([math.sqrt(self.embedding_dim / (k * n)) for n in self.field_sizes]), torch.tensor(rows_f))
        self.weight = nn.Parameter(torch.empty(sum(rows_f), k).uniform_(-1.0, 1.0) * scale[:, None])  # (R, k)
        self.bias = nn.Parameter(torch.zeros(num_fields, self.embedding_dim))  # (F, D)

    # ------------------------------------------------------------------ lookup
    def row_index(self, ids: Tensor, fields: Tensor) -> Tensor:
        """Row of ``weight`` for each global id (fields given by :func:`field_of`)."""
        if not self.hashes_ids():
            return ids  # every field whole: rows of A are laid out exactly like the global ids
        local = ids - self.starts[fields]
        r = self.rows[fields]
        local = torch.where(r < self.sizes[fields], hash64(local) % r, local)
        return self.row_base[fields] + local

    def hashes_ids(self) -> bool:
        """Whether some field has fewer rows of A than ids (then its ids are hashed)."""
        return not torch.equal(self.rows, self.sizes)

    def _field_major(self, ids: Tensor) -> bool:
        """Whether ids come as (…, F) rows of one id per field in field order, as the models send them.

        Two comparisons per id; far cheaper than finding each id's field (and int64 division and
        hashing are slow on CPU, so skipping them when no field is hashed matters)."""
        num_fields = len(self.field_sizes)
        if ids.numel() == 0 or ids.numel() % num_fields:
            return False
        grid = ids.view(-1, num_fields)
        return bool(((grid >= self.starts) & (grid < self.starts + self.sizes)).all())

    def lookup(self, ids: Tensor) -> Tensor:
        num_fields, n = len(self.field_sizes), ids.numel()
        if self._field_major(ids):
            # One batched matmul per field instead of gathering a (k, D) map for every id.
            if self.hashes_ids():
                fields = torch.arange(num_fields, device=ids.device).repeat(n // num_fields)
                rows = self.row_index(ids, fields)
            else:
                rows = ids
            low = F.embedding(rows, self.weight, sparse=self.sparse)  # (n, k)
            z = low.view(-1, num_fields, self.rank).transpose(0, 1)  # (F, B, k)
            out = torch.baddbmm(self.bias[:, None, :], z, self.proj)  # (F, B, D)
            return out.transpose(0, 1).reshape(n, self.embedding_dim)
        fields = field_of(ids, self.starts)
        low = F.embedding(self.row_index(ids, fields), self.weight, sparse=self.sparse)  # (n, k)
        return torch.bmm(low[:, None, :], self.proj[fields]).squeeze(1) + self.bias[fields]  # (n, D)

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        # Bags of one id each (the models' (B·F, 1) input): pooling is the identity, skip its copy.
        if input.dim() == 2 and input.shape[1] == 1 and offsets is None and per_sample_weights is None:
            if input.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{self._label()}: ids must be int32 or int64, got {input.dtype}")
            ids = input.reshape(-1).long()
            if self.validate_ids:
                self.check_ids(ids)
            return self.lookup(ids)
        return super().forward(input, offsets, per_sample_weights)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    # ------------------------------------------------------------------ budget
    @staticmethod
    def _bytes(num_fields: int, dim: int, rank: int, total_rows: int) -> int:
        floats = total_rows * rank + num_fields * rank * dim + num_fields * dim
        return floats * FLOAT_BYTES + _BUFFERS_PER_FIELD * 8 * num_fields

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        num_fields, n = len(field_sizes), sum(int(s) for s in field_sizes)
        rank = options.get("rank")
        lo_rank = int(rank) if rank else min(embedding_dim, int(options.get("min_rank") or
                                                                default_min_rank(embedding_dim)))
        hi_rank = int(rank) if rank else embedding_dim
        return (cls._bytes(num_fields, embedding_dim, lo_rank, num_fields),
                cls._bytes(num_fields, embedding_dim, hi_rank, n))

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "LowRankEmbeddingBag":
        sizes = [int(s) for s in field_sizes]
        num_fields, n, dim = len(sizes), sum(sizes), int(embedding_dim)
        rank, min_rank = options.pop("rank", None), options.pop("min_rank", None)
        floats = (budget_bytes - _BUFFERS_PER_FIELD * 8 * num_fields) // FLOAT_BYTES - num_fields * dim
        if rank:
            k = int(rank)
        else:
            per_id = n + num_fields * dim
            k = floats // per_id
            if k * per_id < 0.92 * floats:  # rounding down would waste too much: round up and hash
                k += 1
            k = max(min(dim, int(min_rank or default_min_rank(dim))), min(dim, k))
        total = min(n, (floats - num_fields * k * dim) // k)
        return cls(sizes, dim, k, allocate_rows(sizes, total), **options)

    # ------------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_full(cls, full: CompressedEmbeddingBag, rank: int, mode: str | None = None,
                  sparse: bool = True) -> "LowRankEmbeddingBag":
        """Truncated SVD of a trained ``full`` table, per field: W_f ≈ (W_f V_k) V_kᵀ.

        V_k are the top-k eigenvectors of the Gram matrix W_fᵀ W_f (D×D, float64); W_f V_k equals
        U_k Σ_k of the SVD, so this is the best rank-k approximation of each field in Frobenius norm.
        """
        weight = getattr(full, "weight", None)
        if weight is None or weight.shape[0] != full.num_embeddings:
            raise TypeError(f"from_full needs a table with one row per id (a 'full' table), got {type(full).__name__}")
        table = cls(full.field_sizes, full.embedding_dim, rank, mode=mode or full.mode, sparse=sparse)
        table.to(weight.device)
        starts = field_starts(full.field_sizes).tolist()
        for f, (start, size) in enumerate(zip(starts, full.field_sizes)):
            w = weight[start:start + size]
            _, vecs = torch.linalg.eigh(w.double().T @ w.double())  # ascending eigenvalues
            v = vecs[:, -rank:].flip(1).to(weight.dtype)  # (D, k), largest first
            table.weight[start:start + size] = w @ v
            table.proj[f] = v.T
        table.bias.zero_()
        return table
