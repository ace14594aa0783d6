"""``cafe-ml``: CAFE with a multi-level hash embedding for the features that are not hot.

Three tiers, decided by the HotSketch score of a feature:
- hot (has a hot row): its own row, as in ``cafe``;
- medium (not hot, score >= ``medium_fraction`` · T): the sum of its row in the first hash table and its
  row in a second per-field hash table indexed by an independent hash (``hash64`` with another seed);
- cold: its row in the first hash table only.
``medium_fraction=0`` leaves no cold tier: every feature that is not hot gets both rows (a feature the
sketch does not hold scores 0). That is what the CAFE artifact's multi-level code does
(``tricks/sketch_ml_embed.py``: its medium-tier mask is computed but unused, and every non-hot lookup
sums its rows of two hash tables, 70% and 30% of the hash rows).
Only medium features touch the second table, so its rows are shared by far fewer features than the first
table's. ``medium_rate`` of the hash bytes go to the second table (hashed fields only; small fields stay
whole in the first); with ``medium_source="hot"`` the first table is cafe's and the second takes
``medium_rate`` of the hot rows' bytes instead; with ``medium_source="shared"`` there is no second table:
the first table is cafe's, and a medium feature's second row is another row of its own field's table,
chosen by the independent hash (no bytes move, so the table costs what cafe's does).

A promoted feature's hot row starts as the sum of its two hashed rows: a feature reaching T has almost
always passed through the medium tier.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FLOAT_BYTES, uniform_rows_
from .cafe import THRESHOLD, CafeEmbeddingBag, CafeInference
from .ops import allocate_rows, bag_of_lookups, field_of, field_starts, hash64, mean_weights
from .options import Option
from .registry import register

log = logging.getLogger(__name__)

_SECOND_SEED_OFFSET = 0x51  # the second table's hash seed is seed + this


@register("cafe-ml")
class CafeMLEmbeddingBag(CafeEmbeddingBag):
    """Options of ``cafe`` plus ``medium_fraction`` (0.2), ``medium_rate`` (0.3) and ``medium_source``
    ("hash": the second table's rows come out of the hash rows; "hot": out of the hot rows; "shared": the
    second row is drawn from the first table, ``second_in_first=True``)."""

    OPTIONS = CafeEmbeddingBag.OPTIONS + (
        Option("medium_fraction", "float", 0.2, "a feature that is not hot is medium (gets a second row) when its "
               "score is at least medium_fraction x T; 0: every feature that is not hot", low=0, high=1),
        Option("medium_rate", "float", 0.3, "share of the hash rows (medium_source=hash) or of the hot rows' bytes "
               "(hot) that goes to the second hash table", low=0, high=1, high_open=True),
        Option("medium_source", "str", "hash", "where the second rows come from: the hash rows' bytes, the hot "
               "rows' bytes, or another row of the first table (shared, no extra bytes)",
               choices=("hash", "hot", "shared")),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rows_per_field: Sequence[int],
                 second_rows_per_field: Sequence[int], num_hot_rows: int, threshold: float = THRESHOLD,
                 medium_fraction: float = 0.2, second_in_first: bool = False, **options: Any) -> None:
        rows = [min(int(r), int(n)) for r, n in zip(rows_per_field, field_sizes)]
        rows2 = [int(r) if r_ < int(n) else 0 for r, r_, n in zip(second_rows_per_field, rows, field_sizes)]
        if second_in_first and any(rows2):
            raise ValueError("second_in_first draws the second row from the first table: second rows must be 0")
        super().__init__(field_sizes, embedding_dim, rows, num_hot_rows, threshold,
                         extra_rows=sum(rows2), **options)
        if not 0 <= medium_fraction <= 1:
            raise ValueError(f"medium_fraction must be in [0, 1], got {medium_fraction}")
        self.medium_fraction = float(medium_fraction)
        self.second_in_first = bool(second_in_first)
        self.register_buffer("rows2", torch.tensor(rows2, dtype=torch.int64))
        self.register_buffer("row2_base", field_starts(rows2) + sum(rows))
        # Fields whose features can be medium: those with a second row to add.
        has_second = self.field_hashed.clone() if self.second_in_first else self.rows2 > 0
        self.register_buffer("has_second", has_second, persistent=False)
        # Second-table rows start small so a feature entering the medium tier keeps roughly its embedding.
        uniform_rows_(self.weight[sum(rows): self.num_hash_rows], [r for r in rows2 if r > 0])
        with torch.no_grad():
            self.weight[sum(rows): self.num_hash_rows].mul_(0.1)

    def second_row(self, ids: Tensor, field: Tensor) -> Tensor:
        """Row of the second hash table for each id (meaningless for whole fields, which have none)."""
        local = ids - self.starts[field]
        h = hash64(local, self.seed + _SECOND_SEED_OFFSET)
        if self.second_in_first:
            return self.row_base[field] + h % self.rows[field]
        return self.row2_base[field] + h % self.rows2[field].clamp(min=1)

    def _medium(self, rows: Tensor, score: Tensor, field: Tensor) -> Tensor:
        threshold = self.medium_fraction * self.sketch.threshold
        return (score >= threshold) & (rows < self.num_hash_rows) & self.has_second[field]

    def _rows_of(self, ids: Tensor, rows: Tensor, score: Tensor, field: Tensor) -> Tensor:
        emb = F.embedding(rows, self.weight, sparse=self.sparse)  # (n, D)
        pos = torch.nonzero(self._medium(rows, score, field)).squeeze(1)
        if pos.numel():
            second = F.embedding(self.second_row(ids[pos], field[pos]), self.weight, sparse=self.sparse)
            emb = emb.index_add(0, pos, second)
        return emb

    def _pool(self, ids: Tensor, rows: Tensor, score: Tensor, field: Tensor, offsets: Tensor,
              psw: Tensor | None) -> Tensor:
        """One ``embedding_bag`` over ``weight`` whose bags also hold each medium lookup's second row,
        right after its first: one sparse gradient. Gathering each lookup's rows first and pooling them
        as a dense tensor cost a second sparse gradient and a dense backward (cafe-ml / hash in
        ``benchmarks/cafe_speed.py`` went from 0.76-0.78 to 0.78-0.81). Sums are the same up to float
        rounding (exactly the same with one lookup per bag and no weights)."""
        medium = self._medium(rows, score, field)
        pos = torch.nonzero(medium).squeeze(1)
        if pos.numel() == 0:
            return F.embedding_bag(rows, self.weight, offsets, mode=self.mode, per_sample_weights=psw,
                                   sparse=self.sparse)
        n, dev = ids.numel(), ids.device
        before = torch.zeros(n + 1, dtype=torch.int64, device=dev)  # medium lookups before each position
        torch.cumsum(medium, 0, out=before[1:])
        first = torch.arange(n, device=dev).add_(before[:-1])  # where each lookup's first row goes
        index = torch.empty(n + pos.numel(), dtype=torch.int64, device=dev)
        index.index_copy_(0, first, rows)
        second_at = first.index_select(0, pos).add_(1)
        index.index_copy_(0, second_at, self.second_row(ids.index_select(0, pos), field.index_select(0, pos)))
        bags = offsets + before.index_select(0, offsets)
        weights = psw
        if self.mode == "mean":  # the mean over lookups, not over entries: weight each entry 1 / lookups
            weights = mean_weights(offsets, bag_of_lookups(offsets, n), n)
        if weights is not None:
            doubled = torch.empty(index.shape, dtype=weights.dtype, device=dev)
            doubled.index_copy_(0, first, weights)
            doubled.index_copy_(0, second_at, weights.index_select(0, pos))
            weights = doubled
        return F.embedding_bag(index, self.weight, bags, mode="sum", per_sample_weights=weights,
                               sparse=self.sparse)

    def lookup(self, ids: Tensor) -> Tensor:
        rows, field, score, _ = self._route(ids)
        return self._rows_of(ids, rows, score, field)

    def cold_embedding(self, ids: Tensor) -> Tensor:
        field = field_of(ids, self.starts)
        emb = self.weight.index_select(0, self.hashed_row(ids, field))
        second = self.weight.index_select(0, self.second_row(ids, field))
        return emb + torch.where(self.has_second.index_select(0, field)[:, None], second, 0.0)

    # ------------------------------------------------------------------ budget
    @classmethod
    def _field_buffer_bytes(cls, field_sizes: Sequence[int]) -> int:
        return super()._field_buffer_bytes(field_sizes) + 2 * 8 * len(field_sizes)  # + rows2, row2_base

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "CafeMLEmbeddingBag":
        opts = dict(options)
        medium_rate = float(opts.pop("medium_rate", 0.3))
        source = opts.pop("medium_source", "hash")
        if source not in ("hash", "hot", "shared"):
            raise ValueError(f"medium_source must be 'hash', 'hot' or 'shared', got {source!r}")
        hash_rows, hot_rows, opts = cls._plan(field_sizes, embedding_dim, budget_bytes, opts)
        sizes = [int(n) for n in field_sizes]
        if source == "hash":  # the second table takes medium_rate of the hash rows
            first = max(len(sizes), int(round(hash_rows * (1 - medium_rate))))
            rows = allocate_rows(sizes, first)
            second_total = hash_rows - sum(rows)
        else:  # the first table is cafe's
            rows = allocate_rows(sizes, hash_rows)
            second_total = 0  # "shared": the second row is drawn from the first table
            if source == "hot":  # the second table takes medium_rate of the hot rows' bytes
                hot_bytes = budget_bytes - cls._fixed_bytes(field_sizes) - sum(rows) * embedding_dim * FLOAT_BYTES
                second_total = int(medium_rate * hot_bytes) // (embedding_dim * FLOAT_BYTES)
        hashed = [f for f, (r, n) in enumerate(zip(rows, sizes)) if r < n]
        rows2 = [0] * len(sizes)
        if hashed and second_total >= len(hashed):
            for f, r in zip(hashed, allocate_rows([sizes[f] for f in hashed], second_total)):
                rows2[f] = r
        elif source == "hash":  # nothing to hash twice, or too few rows: give them back to the first table
            rows = allocate_rows(sizes, min(sum(sizes), hash_rows))
        if source == "hot" and any(rows2):  # otherwise the plan's rows are split, or unchanged: keep its hot rows
            leftover = budget_bytes - cls._fixed_bytes(field_sizes) - (sum(rows) + sum(rows2)) * embedding_dim * FLOAT_BYTES
            hot_rows = max(1, int(leftover // cls._hot_row_bytes(field_sizes, embedding_dim, opts)))
        table = cls(field_sizes, embedding_dim, rows, rows2, hot_rows, second_in_first=source == "shared", **opts)
        log.info("cafe-ml: %d + %d hash rows, %d hot rows, T=%g, %d bytes", sum(rows), sum(rows2), hot_rows,
                 table.sketch.threshold, table.memory_bytes())
        return table

    def inference_form(self) -> "CafeMLInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return CafeMLInference(self)


class CafeMLInference(CafeInference):
    """``cafe-ml`` frozen for serving (see :mod:`embcompress.export`): ``cafe``'s frozen lookup, where each
    held id also keeps whether it is medium (its frozen score >= ``medium_fraction`` · T; an id the
    sketch does not hold scores 0). A medium id that is not hot adds its second row."""

    def __init__(self, table: "CafeMLEmbeddingBag") -> None:
        super().__init__(table)
        self.second_seed = table.seed + _SECOND_SEED_OFFSET
        self.second_in_first = table.second_in_first
        for name in ("rows2", "row2_base", "has_second"):
            self.register_buffer(name, getattr(table, name).detach().clone())
        threshold = table.medium_fraction * table.sketch.threshold
        self.absent_medium = bool(0.0 >= threshold)
        self.register_buffer("medium", (self.held(table)[2] >= threshold) & (self.keys >= 0))

    def forward(self, ids: Tensor) -> Tensor:
        found, pos = self.find(ids)
        row = self.hot_row(ids, found, pos)
        hot = torch.where(found, self.hot_rows[pos], -1) >= 0
        medium = torch.where(found, self.medium[pos], self.absent_medium) & ~hot & self.has_second
        h = hash64(ids - self.starts, self.second_seed)
        if self.second_in_first:
            second = self.row_base + h % self.rows
        else:
            second = self.row2_base + h % self.rows2.clamp(min=1)
        return F.embedding(row, self.weight) + torch.where(medium.unsqueeze(-1), F.embedding(second, self.weight), 0.0)
