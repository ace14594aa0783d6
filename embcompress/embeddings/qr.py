"""``qr``: quotient-remainder compositional embedding (Shi et al., 2020), multiply combiner.

Field f with n_f values and remainder size m_f has a remainder table of m_f rows and a quotient table
of ceil(n_f / m_f) rows; local id i is served by ``Q[i // m_f] * R[i % m_f]`` (elementwise). The pair
(i // m, i % m) is unique per id, so no two ids share an embedding even though rows are shared.
Integer arithmetic only (``//`` and ``%`` on int64): exact for any id, unlike float division.

A field too small to gain (m + ceil(n/m) >= n) keeps one remainder row per value and a single
quotient row. Pure QR needs about 2·sqrt(n_f) rows per field; below that budget, a field's ids are
first hashed (:func:`~embcompress.embeddings.ops.hash64`) into v_f < n_f values and QR splits those,
so QR reaches any ratio the hashing trick reaches, with collisions only where the budget forces them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FLOAT_BYTES, CompressedEmbeddingBag
from .ops import allocate_rows, field_of, field_starts, hash_into
from .options import mode_option, sparse_option
from .registry import register

_BUFFERS_PER_FIELD = 6  # start, size, virtual size, remainder size, quotient base, remainder base


def _qr_rows(n: int, m: int) -> int:
    return m + -(-n // m)


def smallest_qr(n: int) -> tuple[int, int]:
    """(rows, m) of the smallest QR split of n values; a field with n <= 4 stays whole (m = n)."""
    if n <= 4:
        return n + 1, n
    m = math.isqrt(n - 1) + 1
    best = min((_qr_rows(n, k), -k) for k in (m - 1, m, m + 1) if k >= 1)
    return best[0], -best[1]


def largest_remainder(n: int, rows: int) -> int:
    """Largest m with m + ceil(n/m) <= rows (fewest collisions of remainders), or n when rows > n."""
    if rows >= n + 1:
        return n
    _, m_min = smallest_qr(n)
    lo, hi = m_min, n  # m + ceil(n/m) grows with m above sqrt(n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _qr_rows(n, mid) <= rows:
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_virtual(n: int, rows: int) -> int:
    """Largest v <= n whose smallest QR split fits in ``rows`` (rows >= 2)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if smallest_qr(mid)[0] <= rows:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_field(n: int, rows: int) -> tuple[int, int]:
    """(virtual size v, remainder size m) for a field of n values given a share of ``rows`` rows."""
    v = n if smallest_qr(n)[0] <= rows else largest_virtual(n, rows)
    return v, largest_remainder(v, rows)


@register("qr")
class QREmbeddingBag(CompressedEmbeddingBag):
    OPTIONS = (mode_option(), sparse_option())

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, remainders: Sequence[int],
                 virtual_sizes: Sequence[int] | None = None, mode: str = "sum", sparse: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        vs = list(self.field_sizes) if virtual_sizes is None else [max(1, min(int(v), n)) for v, n in
                                                                    zip(virtual_sizes, self.field_sizes)]
        ms = [max(1, min(int(m), v)) for m, v in zip(remainders, vs)]
        if len(ms) != len(self.field_sizes) or len(vs) != len(self.field_sizes):
            raise ValueError("remainders and virtual_sizes need one size per field")
        qs = [-(-v // m) for v, m in zip(vs, ms)]
        self.sparse = sparse
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
        self.register_buffer("virtual", torch.tensor(vs, dtype=torch.int64))
        self.register_buffer("remainder", torch.tensor(ms, dtype=torch.int64))
        self.register_buffer("q_base", field_starts(qs))
        self.register_buffer("r_base", field_starts(ms))
        # Remainder rows start at the usual DLRM scale, quotient rows near 1, so products begin at the
        # familiar magnitude while every id's embedding is distinct.
        bound = torch.repeat_interleave(torch.tensor([math.sqrt(1.0 / n) for n in self.field_sizes]),
                                        torch.tensor(ms))
        self.weight_r = nn.Parameter(torch.empty(sum(ms), self.embedding_dim).uniform_(-1, 1) * bound[:, None])
        self.weight_q = nn.Parameter(torch.empty(sum(qs), self.embedding_dim).uniform_(0.5, 1.5))

    def lookup(self, ids: Tensor) -> Tensor:
        f = field_of(ids, self.starts)
        local = ids - self.starts[f]
        local = hash_into(local, self.virtual[f], self.sizes[f])
        m = self.remainder[f]
        q_rows = self.q_base[f] + local // m
        r_rows = self.r_base[f] + local % m
        return F.embedding(q_rows, self.weight_q, sparse=self.sparse) * F.embedding(
            r_rows, self.weight_r, sparse=self.sparse)  # (n, D)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight_q, self.weight_r] if self.sparse else []

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        row = embedding_dim * FLOAT_BYTES
        overhead = _BUFFERS_PER_FIELD * 8 * len(field_sizes)
        lo = 2 * len(field_sizes)  # one quotient and one remainder row per field, all ids hashed
        hi = sum(int(n) + 1 for n in field_sizes)
        return lo * row + overhead, hi * row + overhead

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "QREmbeddingBag":
        overhead = _BUFFERS_PER_FIELD * 8 * len(field_sizes)
        total = (budget_bytes - overhead) // (embedding_dim * FLOAT_BYTES)
        sizes = [int(n) for n in field_sizes]
        # Each field's row share is a cap on m + ceil(n/m); a whole field costs n + 1 rows.
        shares = allocate_rows([n + 1 for n in sizes], total, [2] * len(sizes))
        plans = [plan_field(n, r) for n, r in zip(sizes, shares)]
        return cls(field_sizes, embedding_dim, [m for _, m in plans], [v for v, _ in plans], **options)

    def inference_form(self) -> "QRInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return QRInference(self)


class QRInference(nn.Module):
    """``qr`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field f,
    -> ``Q[i // m_f] * R[i % m_f]`` (B, F, D) as :meth:`QREmbeddingBag.lookup`."""

    def __init__(self, table: "QREmbeddingBag") -> None:
        super().__init__()
        for name in ("starts", "sizes", "virtual", "remainder", "q_base", "r_base"):
            self.register_buffer(name, getattr(table, name).detach().clone())
        self.register_buffer("weight_q", table.weight_q.detach().clone())
        self.register_buffer("weight_r", table.weight_r.detach().clone())

    def forward(self, ids: Tensor) -> Tensor:
        local = hash_into(ids - self.starts, self.virtual, self.sizes)  # per column = per field: broadcasts
        m = self.remainder
        return F.embedding(self.q_base + local // m, self.weight_q) * F.embedding(self.r_base + local % m,
                                                                                  self.weight_r)
