"""``cafe-tt``: CAFE's hot rows over a tensor-train table: exact rows for hot ids, TT rows for the rest.

Every id that is not hot gets a unique, approximate TT row instead of a hashed row shared with other ids.

The table is a :class:`~.tt.TTEmbeddingBag` whose cache is chosen by a CAFE
:class:`~.hotsketch.HotSketch` over the global ids of the TT fields (fields small enough to be stored whole
never need a hot row), in place of ``tt``'s tracker and periodic refresh:

- forward: an id is served by its raw row (small fields), its hot row (the sketch gives it one), or the TT
  chain product, as in ``tt``;
- training forwards record each distinct TT id's lookup count; after every optimizer step
  (:func:`~embcompress.attach`) the counts are inserted into the sketch (gathered over data-parallel ranks
  first, in rank order, so every rank applies the same update);
- a promoted id's hot row starts as its current TT value, so promotion does not change the model; a
  demoted id goes back to its TT row (a TT cannot store one row's learned value).

Budget: ``hot_share`` of the bytes buys hot rows (4·D bytes each plus their share of the sketch), the TT
cores are the largest that fit in the rest, and whatever the TT leaves buys more hot rows.

Selection: the importance signal is the lookup count; the threshold (T = 10 lookups) and the
``hysteresis`` (2) are ``cafe``'s (:mod:`.cafe`, "Selection"), chosen on validation rows for both tables:
docs/zch.md, "At Criteo Kaggle's size".
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from .cafe import (BUCKETS_PER_ROW, HYSTERESIS, PRESSURE_DECAY, THRESHOLD, CafeEmbeddingBag, sketch_buckets,
                   sketch_key_dtype)
from .base import FLOAT_BYTES, BudgetError
from .hotsketch import HotSketch, Located
from .options import Option
from .registry import register
from .sync import distributed_world, gather_across_ranks
from .tt import _MAX_PENDING, TTEmbeddingBag
from .tt_cores import TTPlan, plan_bytes, plan_for_budget

log = logging.getLogger(__name__)

_TT_OPTIONS = ("layout", "num_cores", "q_shape", "ranks", "max_rank")
_SKETCH_OPTIONS = ("threshold", "decay", "decay_mass", "pressure_decay", "preempt", "hysteresis", "slots",
                   "buckets_per_row", "key_dtype")
_TT_TABLE_OPTIONS = ("core_scale", "init_scale", "seed", "mode", "sparse")


def _option(cls: type, name: str) -> Option:
    """The declaration of option ``name`` of ``cls`` (the options this table shares with cafe or tt)."""
    return next(o for o in cls.OPTIONS if o.name == name)


@register("cafe-tt")
class CafeTTEmbeddingBag(TTEmbeddingBag):
    """TT table whose cache of exact rows a HotSketch fills (module doc)."""

    OPTIONS = (
        Option("hot_share", "float", 0.75, "share of the budget that buys hot rows and their sketch; the TT "
               "takes the rest (and hands back what it cannot use)", low=0, high=1, low_open=True, high_open=True),
        *(_option(CafeEmbeddingBag, name) for name in ("threshold", "hysteresis", "decay", "decay_mass",
                                                       "pressure_decay", "preempt", "slots", "buckets_per_row",
                                                       "key_dtype")),
        *(_option(TTEmbeddingBag, name) for name in ("layout", "num_cores", "q_shape", "ranks", "max_rank",
                                                     "core_scale", "init_scale", "seed", "mode", "sparse")),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, *, groups: Sequence[Sequence[int]],
                 p_shapes: Sequence[Sequence[int]], q_shape: Sequence[int], ranks: Sequence[int], hot_rows: int,
                 threshold: float = THRESHOLD, buckets_per_row: float = BUCKETS_PER_ROW, slots: int = 4,
                 decay: float = 0.98, decay_mass: float = 10.0, pressure_decay: bool = PRESSURE_DECAY,
                 preempt: bool = True, hysteresis: float | None = HYSTERESIS, key_dtype: str = "auto",
                 **options: Any) -> None:
        self._sketch_args = dict(buckets=sketch_buckets(buckets_per_row, max(1, int(hot_rows))), threshold=threshold,
                                 slots=slots, decay=decay, decay_mass=decay_mass, pressure_decay=pressure_decay,
                                 preempt=preempt, hysteresis=hysteresis,
                                 key_dtype=sketch_key_dtype(field_sizes, key_dtype))
        super().__init__(field_sizes, embedding_dim, groups=groups, p_shapes=p_shapes, q_shape=q_shape,
                         ranks=ranks, cache_rows=max(1, int(hot_rows)), tracker_rows=0, **options)
        del self._sketch_args

    def _init_cache_index(self, cache_rows: int, tracker_rows: int) -> None:
        a = self._sketch_args
        self.sketch = HotSketch(a["buckets"], cache_rows, a["threshold"], slots=a["slots"], decay=a["decay"],
                                decay_mass=a["decay_mass"], pressure_decay=a["pressure_decay"],
                                preempt=a["preempt"], hysteresis=a["hysteresis"], key_dtype=a["key_dtype"])
        self._stat_promoted, self._stat_demoted, self._stat_lookups, self._stat_hot = 0, 0, 0, 0
        self._found: tuple[Tensor, Located, Tensor] | None = None  # the last training _cache_find

    @property
    def num_hot_rows(self) -> int:
        return self.sketch.num_hot_rows

    # ------------------------------------------------------------------ the cache index: the sketch
    def _cache_find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(hot mask, hot row) per id; raw-field ids are never inserted, so they are never hot. In training,
        where the sketch found the ids is kept for :meth:`_record`, so the step's insert and the hot-share
        count need no second pass over the sketch."""
        located = self.sketch.locate(ids)
        hot, _ = self.sketch.query(ids, located)
        if self.training:
            self._found = (ids, located, hot)
        return hot >= 0, hot.clamp(min=0)

    def cached_rows(self) -> tuple[Tensor, Tensor]:
        keys, rows = self.sketch.hot_entries()
        order = torch.argsort(keys)
        return keys[order], self.cache_weight.detach()[rows[order]]

    def _record(self, ids: Tensor, counts: Tensor, tt_pos: Tensor) -> None:
        found_ids, located, hot = self._found
        self._found = None
        counts = counts.index_select(0, tt_pos)
        self._stat_lookups = self._stat_lookups + counts.sum()  # tensors: the forward reads nothing back
        self._stat_hot = self._stat_hot + counts.mul(hot.index_select(0, tt_pos) >= 0).sum()
        located = located.index_select(tt_pos) if found_ids is ids else None
        self._pending.append((ids.index_select(0, tt_pos), counts, located))
        if len(self._pending) > _MAX_PENDING:  # forwards without optimizer steps: keep the list short
            merged = torch.cat([p[0] for p in self._pending]), torch.cat([p[1] for p in self._pending])
            self._pending = [(*merged, None)]

    def after_optimizer_step(self) -> None:
        """Insert the step's recorded (TT id, count) into the sketch and move rows (module doc)."""
        pending, self._pending = self._pending, []
        if pending:
            ids = torch.cat([p[0] for p in pending])
            counts = torch.cat([p[1] for p in pending]).float()
            located = Located.joined([p[2] for p in pending])
        else:  # still take part in the gather: every rank must call it
            ids = torch.zeros(0, dtype=torch.int64, device=self.cache_weight.device)
            counts = torch.zeros(0, device=self.cache_weight.device)
            located = None
        n = ids.numel()
        ids, counts = gather_across_ranks(ids, counts)
        if distributed_world() > 1 or ids.numel() != n:
            located = None  # other ranks' ids were never located here
        if ids.numel():
            self.apply_counts(ids, counts, located)

    @torch.no_grad()
    def apply_counts(self, ids: Tensor, counts: Tensor, located: Located | None = None) -> None:
        """The one state update: add ``counts`` to the TT ids ``ids`` (repeats allowed) in the sketch; every
        newly hot id's row starts as its TT value. ``located``: where a forward found ``ids`` (used only
        while the sketch is unchanged since)."""
        update = self.sketch.insert(ids, counts, located=located)
        self._stat_promoted += update.promoted_ids.numel()
        self._stat_demoted += update.demoted_ids.numel()
        if update.promoted_ids.numel():
            rows = self._tt_rows_for_ids(update.promoted_ids).to(self.cache_weight.dtype)
            self.cache_weight.index_copy_(0, update.promoted_rows, rows)

    def training_stats(self) -> dict[str, float]:
        """``hot_share``: share of the TT fields' training lookups that hot rows served; ``hot_rows_used``:
        share of the hot rows held now; ``promoted`` / ``demoted``: ids that got or lost a hot row. All
        since the previous call."""
        stats: dict[str, float] = {"hot_rows_used": self.sketch.num_hot() / self.num_hot_rows,
                                   "promoted": self._stat_promoted, "demoted": self._stat_demoted}
        lookups = int(self._stat_lookups)  # one read back per call
        if lookups:
            stats["hot_share"] = int(self._stat_hot) / lookups
        self._stat_promoted, self._stat_demoted, self._stat_lookups, self._stat_hot = 0, 0, 0, 0
        return stats

    # ------------------------------------------------------------------ budget
    @staticmethod
    def table_bytes(plan: TTPlan, hot_rows: int, options: dict[str, Any]) -> int:
        """Exact ``memory_bytes()`` of the table built from ``plan`` with ``hot_rows`` hot rows."""
        key = sketch_key_dtype(plan.field_sizes, options.get("key_dtype", "auto"))
        buckets = sketch_buckets(options.get("buckets_per_row", BUCKETS_PER_ROW), hot_rows)
        tt = plan_bytes(plan.field_sizes, plan.dim, plan.groups, plan.p_shapes, plan.q_shape, plan.ranks, 0, 0)
        tt -= 4 * 8  # plan_bytes counts tt's step and statistics counters, which this table does not hold
        return (tt + hot_rows * plan.dim * FLOAT_BYTES
                + HotSketch.memory_bytes_for(buckets, hot_rows, options.get("slots", 4), key))

    @classmethod
    def _plan(cls, field_sizes: Sequence[int], dim: int, budget: int | None,
              options: dict[str, Any]) -> tuple[TTPlan, int]:
        """(TT plan, hot rows) for ``budget`` bytes (``None``: the smallest table)."""
        tt_opts = {k: options[k] for k in _TT_OPTIONS if k in options}
        smallest = plan_for_budget(field_sizes, dim, None, cache_fraction=0, **tt_opts)
        if budget is None:
            return smallest, 1
        row = CafeEmbeddingBag._hot_row_bytes(field_sizes, dim, options)  # the same sketch share as cafe
        free = budget - cls.table_bytes(smallest, 1, options)
        if free < 0:
            raise BudgetError(f"cafe-tt cannot fit {budget} bytes (smallest is {cls.table_bytes(smallest, 1, options)})")
        hot = 1 + int(min(options.get("hot_share", 0.75) * budget, free) // row)
        plan = plan_for_budget(field_sizes, dim, budget - cls.table_bytes(smallest, hot, options)
                               + smallest.nbytes(), cache_fraction=0, **tt_opts)
        hot += int((budget - cls.table_bytes(plan, hot, options)) // row)  # what the TT left
        while hot > 1 and cls.table_bytes(plan, hot, options) > budget:  # the sketch's bucket rounding
            hot -= 1
        return plan, hot

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        plan, hot = cls._plan(field_sizes, embedding_dim, None, options)
        every = plan_for_budget(field_sizes, embedding_dim, None, cache_fraction=0,
                                **{k: options[k] for k in _TT_OPTIONS if k in options})
        hi = plan_bytes(field_sizes, embedding_dim, [], [], [embedding_dim], [], 0, 0)  # all raw
        return cls.table_bytes(plan, hot, options), max(hi, cls.table_bytes(every, 1, options))

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "CafeTTEmbeddingBag":
        opts = dict(options)
        try:
            plan, hot = cls._plan(field_sizes, embedding_dim, int(budget_bytes), opts)
        except ValueError as e:
            raise BudgetError(str(e)) from None
        table_opts = {k: opts[k] for k in _SKETCH_OPTIONS + _TT_TABLE_OPTIONS if k in opts}
        table = cls(plan.field_sizes, plan.dim, groups=plan.groups, p_shapes=plan.p_shapes, q_shape=plan.q_shape,
                    ranks=plan.ranks, hot_rows=hot, **table_opts)
        log.info("cafe-tt: %d TT groups, ranks %s, %d raw fields, %d hot rows, T=%g, %d bytes", len(plan.groups),
                 plan.ranks, len(plan.raw_fields()), hot, table.sketch.threshold, table.memory_bytes())
        return table
