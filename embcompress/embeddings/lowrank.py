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
from .ops import allocate_rows, field_of, field_starts, hash_into
from .options import Option, mode_option, sparse_option
from .registry import register

_BUFFERS_PER_FIELD = 4  # start, size, rows of A, first row of A  (int64 each)


def default_min_rank(dim: int) -> int:
    return max(1, dim // 4)


@register("lowrank")
class LowRankEmbeddingBag(CompressedEmbeddingBag):
    """Rows ``A[row(id)] @ B[f] + c[f]``; ids of field f whose share of A is smaller than n_f are hashed.

    ``rank`` is one k for every field (a table trained from scratch) or one k_f per field (the AFM
    compression gives a 20k-id field a lower rank than a 3-id one, whose rows cost almost nothing).
    Fields of equal rank share one parameter ``weights[g]`` (R_g, k_g) and ``projs[g]`` (F_g, k_g, D), so
    a lookup is one gather and one batched matmul per distinct rank (at most D), never a loop over ids.
    """

    OPTIONS = (
        Option("rank", "int", None, "rank k of every field (at most the embedding dim); ids are hashed onto "
               "fewer rows of A when k x ids floats do not fit", low=1, auto="as large as the budget allows"),
        Option("min_rank", "int", None, "lowest rank the budget may choose", low=1, auto="embedding dim / 4"),
        mode_option(), sparse_option(),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rank: int | Sequence[int],
                 rows: Sequence[int] | None = None, mode: str = "sum", sparse: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        num_fields = len(self.field_sizes)
        ranks = [int(rank)] * num_fields if isinstance(rank, (int, float)) else [int(k) for k in rank]
        if len(ranks) != num_fields:
            raise ValueError(f"rank needs one entry per field ({num_fields}), got {len(ranks)}")
        if not all(1 <= k <= self.embedding_dim for k in ranks):
            raise ValueError(f"ranks must be in [1, {self.embedding_dim}], got {ranks}")
        rows_f = list(self.field_sizes) if rows is None else [max(1, min(int(r), n))
                                                               for r, n in zip(rows, self.field_sizes)]
        if len(rows_f) != len(self.field_sizes):
            raise ValueError("rows needs one entry per field")
        self.ranks = ranks
        self.rank = max(ranks)  # the largest rank; equal to every field's when uniform
        self.sparse = sparse
        self.group_ranks = sorted(set(ranks), reverse=True)
        self.group_fields = [[f for f in range(num_fields) if ranks[f] == k] for k in self.group_ranks]
        group_of = [0] * num_fields
        slot = [0] * num_fields
        base = [0] * num_fields  # first row of field f inside its group's A
        for g, fields in enumerate(self.group_fields):
            offset = 0
            for i, f in enumerate(fields):
                group_of[f], slot[f], base[f] = g, i, offset
                offset += rows_f[f]
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
        self.register_buffer("rows", torch.tensor(rows_f, dtype=torch.int64))
        self.register_buffer("row_base", torch.tensor(base, dtype=torch.int64))
        # Structure only (rebuilt from ``rank`` by the constructor): not state, so not in state_dict.
        self.register_buffer("field_group", torch.tensor(group_of, dtype=torch.int64), persistent=False)
        self.register_buffer("field_slot", torch.tensor(slot, dtype=torch.int64), persistent=False)
        for g, fields in enumerate(self.group_fields):
            self.register_buffer(f"group_cols{g}", torch.tensor(fields, dtype=torch.int64), persistent=False)
        self.weights = nn.ParameterList()
        self.projs = nn.ParameterList()
        for k, fields in zip(self.group_ranks, self.group_fields):
            # B_f: orthonormal rows, so ||A_i B_f|| = ||A_i||; A then gets the DLRM-reference variance
            # U(±sqrt(1/n_f)) per coordinate of the D-dim row, spread over k coordinates.
            b = torch.linalg.qr(torch.randn(len(fields), self.embedding_dim, k)).Q.transpose(1, 2)  # (F_g, k, D)
            self.projs.append(nn.Parameter(b.contiguous()))
            scale = torch.repeat_interleave(
                torch.tensor([math.sqrt(self.embedding_dim / (k * self.field_sizes[f])) for f in fields]),
                torch.tensor([rows_f[f] for f in fields]))
            self.weights.append(nn.Parameter(torch.empty(len(scale), k).uniform_(-1.0, 1.0) * scale[:, None]))
        self.bias = nn.Parameter(torch.zeros(num_fields, self.embedding_dim))  # (F, D)

    @property
    def weight(self) -> nn.Parameter:
        """A (R, k) of a table with one rank for every field."""
        if len(self.weights) != 1:
            raise AttributeError("this table has per-field ranks: see weights / field_factors()")
        return self.weights[0]

    @property
    def proj(self) -> nn.Parameter:
        """B (F, k, D) of a table with one rank for every field."""
        if len(self.projs) != 1:
            raise AttributeError("this table has per-field ranks: see projs / field_factors()")
        return self.projs[0]

    def field_factors(self, f: int) -> tuple[Tensor, Tensor]:
        """(A_f (rows_f, k_f), B_f (k_f, D)) of field ``f``: views of the parameters."""
        g, slot = self.field_group[f].item(), self.field_slot[f].item()
        base, r = self.row_base[f].item(), self.rows[f].item()
        return self.weights[g][base:base + r], self.projs[g][slot]

    # ------------------------------------------------------------------ lookup
    def row_index(self, ids: Tensor, fields: Tensor) -> Tensor:
        """Row of each global id (fields given by :func:`field_of`) in its field's group's ``weights[g]``."""
        if len(self.weights) == 1 and not self.hashes_ids():
            return ids  # one group, every field whole: rows of A are laid out exactly like the global ids
        local = ids - self.starts[fields]
        if self.hashes_ids():
            local = hash_into(local, self.rows[fields], self.sizes[fields])
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
        num_fields, n, dim = len(self.field_sizes), ids.numel(), self.embedding_dim
        if self._field_major(ids):
            # One gather and one batched matmul per group of equal rank, not a (k, D) map per id.
            if len(self.weights) == 1:
                fields = torch.arange(num_fields, device=ids.device).repeat(n // num_fields)
                rows = self.row_index(ids, fields)
                low = F.embedding(rows, self.weight, sparse=self.sparse)  # (n, k)
                z = low.view(-1, num_fields, self.rank).transpose(0, 1)  # (F, B, k)
                out = torch.baddbmm(self.bias[:, None, :], z, self.proj)  # (F, B, D)
                return out.transpose(0, 1).reshape(n, dim)
            # Field-major local ids (F, B): each group then takes whole rows of it, contiguous.
            local_t = (ids.view(-1, num_fields) - self.starts).t()
            out = self.bias.new_empty(num_fields, n // num_fields, dim)  # (F, B, D), whole blocks per field
            for g in range(len(self.weights)):  # a loop over ranks (at most D), not ids
                cols = getattr(self, f"group_cols{g}")
                sub = local_t[cols]  # (F_g, B)
                if self.hashes_ids():
                    sub = hash_into(sub, self.rows[cols][:, None], self.sizes[cols][:, None])
                low = F.embedding(sub + self.row_base[cols][:, None], self.weights[g], sparse=self.sparse)
                part = torch.baddbmm(self.bias[cols][:, None, :], low, self.projs[g])  # (F_g, B, D)
                out.index_copy_(0, cols, part)  # in place (autograd records it): one write per field
            return out.transpose(0, 1).reshape(n, dim)
        fields = field_of(ids, self.starts)
        rows = self.row_index(ids, fields)
        if len(self.weights) == 1:
            low = F.embedding(rows, self.weight, sparse=self.sparse)  # (n, k)
            return torch.bmm(low[:, None, :], self.proj[fields]).squeeze(1) + self.bias[fields]  # (n, D)
        out = self.bias[fields]  # (n, D)
        groups = self.field_group[fields]
        for g in range(len(self.weights)):
            idx = (groups == g).nonzero().squeeze(1)
            low = F.embedding(rows[idx], self.weights[g], sparse=self.sparse)  # (n_g, k_g)
            proj = self.projs[g][self.field_slot[fields[idx]]]  # (n_g, k_g, D)
            out = out.index_add(0, idx, torch.bmm(low[:, None, :], proj).squeeze(1))
        return out

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
        return list(self.weights) if self.sparse else []

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
    def from_full(cls, full: CompressedEmbeddingBag, rank: int | Sequence[int], mode: str | None = None,
                  sparse: bool = True) -> "LowRankEmbeddingBag":
        """Truncated SVD of a trained ``full`` table, per field: W_f ≈ (W_f V_k) V_kᵀ (k: one, or one per field).

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
            k = table.ranks[f]
            _, vecs = torch.linalg.eigh(w.double().T @ w.double())  # ascending eigenvalues
            v = vecs[:, -k:].flip(1).to(weight.dtype)  # (D, k), largest first
            a, b = table.field_factors(f)
            a.copy_(w @ v)
            b.copy_(v.T)
        table.bias.zero_()
        return table

    def inference_form(self) -> "LowRankInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return LowRankInference(self)


class LowRankInference(nn.Module):
    """``lowrank`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field
    f, -> ``A[row] @ B_f + c_f`` (B, F, D), one gather and one batched matmul per group of equal rank, as
    :meth:`LowRankEmbeddingBag.lookup` computes field-major input."""

    def __init__(self, table: "LowRankEmbeddingBag") -> None:
        super().__init__()
        self.hashed = table.hashes_ids()
        for name in ("starts", "sizes", "rows", "row_base"):
            self.register_buffer(name, getattr(table, name).detach().clone())
        self.register_buffer("bias", table.bias.detach().clone())  # (F, D)
        cols = [torch.tensor(fields, dtype=torch.int64) for fields in table.group_fields]
        for g, c in enumerate(cols):
            self.register_buffer(f"cols{g}", c)
            self.register_buffer(f"weight{g}", table.weights[g].detach().clone())
            self.register_buffer(f"proj{g}", table.projs[g].detach().clone())
        self.groups = len(cols)
        # position in the concatenation of the groups' columns -> field order
        self.register_buffer("order", torch.argsort(torch.cat(cols)))

    def forward(self, ids: Tensor) -> Tensor:
        local = (ids - self.starts).t()  # (F, B) field-major local ids
        parts = []
        for g in range(self.groups):
            cols = getattr(self, f"cols{g}")
            sub = local.index_select(0, cols)  # (F_g, B)
            if self.hashed:
                sub = hash_into(sub, self.rows.index_select(0, cols)[:, None], self.sizes.index_select(0, cols)[:, None])
            low = F.embedding(sub + self.row_base.index_select(0, cols)[:, None], getattr(self, f"weight{g}"))
            parts.append(torch.baddbmm(self.bias.index_select(0, cols)[:, None, :], low, getattr(self, f"proj{g}")))
        out = parts[0] if self.groups == 1 else torch.cat(parts).index_select(0, self.order)  # (F, B, D)
        return out.transpose(0, 1)
