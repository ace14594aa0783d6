"""``hash``: the hashing trick. Each large field's ids share that field's rows by a 64-bit hash.

Field f gets ``rows[f]`` rows (see :func:`~embcompress.embeddings.ops.allocate`): a field with at
least as many rows as values keeps one row per value; otherwise local id ``i`` is served by row
``hash64(i, seed) % rows[f]``, with :func:`~embcompress.embeddings.ops.hash64` the SplitMix64 finaliser,
so sequential ids spread evenly and no two fields share a row.

The option ``allocation`` chooses how the budget's rows are split among fields: "capped" (the default, the
DLRM reference's ``--max-ind-range`` rule: small fields whole, the largest fields give up rows first) or
"proportional" (the CAFE artifact's hashing baseline: every field above a few dozen values compressed by
the same ratio, so mid-size fields keep only a row or two at 1,000× and above).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FLOAT_BYTES, IndexedEmbeddingBag, uniform_rows_
from .ops import allocate, fewest_rows, field_hash_rows, field_of, field_starts
from .options import Option, hash_seed_option, mode_option, sparse_option
from .registry import register

_BUFFERS_PER_FIELD = 4  # field start, field size, rows, row base: int64 each


@register("hash")
class HashEmbeddingBag(IndexedEmbeddingBag):
    OPTIONS = (
        Option("allocation", "str", "capped", "how the budget's rows are split among fields: capped keeps small "
               "fields whole and takes rows from the largest first; proportional compresses every field alike",
               choices=("capped", "proportional")),
        hash_seed_option(), mode_option(), sparse_option(),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rows_per_field: Sequence[int],
                 mode: str = "sum", seed: int = 0, sparse: bool = True) -> None:
        rows = [int(r) for r in rows_per_field]
        if len(rows) != len(field_sizes) or min(rows) < 1:
            raise ValueError("rows_per_field needs one positive count per field")
        rows = [min(r, int(n)) for r, n in zip(rows, field_sizes)]
        super().__init__(field_sizes, embedding_dim, sum(rows), mode, sparse)
        self.seed = int(seed)
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
        self.register_buffer("row_base", field_starts(rows))
        uniform_rows_(self.weight, rows)

    def row_index(self, ids: Tensor) -> Tensor:
        return field_hash_rows(ids, field_of(ids, self.starts), self.starts, self.sizes, self.rows, self.row_base,
                               self.seed)

    @classmethod
    def _overhead(cls, field_sizes: Sequence[int]) -> int:
        return _BUFFERS_PER_FIELD * 8 * len(field_sizes)

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        row = embedding_dim * FLOAT_BYTES
        fewest = fewest_rows(field_sizes, options.get("allocation", "capped"))
        return fewest * row + cls._overhead(field_sizes), sum(field_sizes) * row + cls._overhead(field_sizes)

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "HashEmbeddingBag":
        opts = dict(options)
        rule = opts.pop("allocation", "capped")
        total = (budget_bytes - cls._overhead(field_sizes)) // (embedding_dim * FLOAT_BYTES)
        return cls(field_sizes, embedding_dim, allocate(field_sizes, total, rule), **opts)

    def inference_form(self) -> "HashInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return HashInference(self)


class HashInference(nn.Module):
    """``hash`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field f,
    -> rows (B, F, D); the same per-field hash as :meth:`HashEmbeddingBag.row_index`. Also the hashed
    rows of the tables that fall back to ``hash``'s layout (``cafe``'s inference form)."""

    def __init__(self, table: "HashEmbeddingBag") -> None:
        super().__init__()
        self.seed = table.seed
        for name in ("starts", "sizes", "rows", "row_base"):
            self.register_buffer(name, getattr(table, name).detach().clone())
        self.register_buffer("weight", table.weight.detach().clone())
        self.register_buffer("columns", torch.arange(len(table.field_sizes)))

    def hashed_row(self, ids: Tensor) -> Tensor:
        """Row of ``weight`` that the per-field hash gives each id."""
        return field_hash_rows(ids, self.columns.expand_as(ids), self.starts, self.sizes, self.rows,
                               self.row_base, self.seed)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(self.hashed_row(ids), self.weight)
