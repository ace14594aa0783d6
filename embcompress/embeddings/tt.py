"""``tt``: tensor-train embedding table with a cache of hot rows (TT-Rec, Yin et al., MLSys 2021).

Layout: every field large enough to gain gets its own TT over its local ids (``layout="field"``), or all
compressed fields share one TT over their concatenated ids (``"shared"``: the row modes are paid once, so
it reaches ratios per-field TTs cannot on many small fields); ``"auto"`` (default) takes per field where
it fits the budget. Fields whose raw rows are no larger than their TT are stored uncompressed. All TTs
share T, the column modes q and the ranks, so their cores are stacked along the row-mode axis and one
batched chain product (:func:`~.tt_cores.tt_rows`) serves every field.

Forward: ids are deduplicated and each distinct row is served once: a raw row, a cache row, or the TT
chain product (batched matrix products over the distinct ids, core gradients by hand); raw and cache rows
take sparse gradients. On the CPU, one id per bag (how the models call tables) runs the deduplication,
the routing, the gathers and their backward, the small chain products and the tracker merge as compiled
passes (``tt_native.cpp``, docs/native.md), bit for bit as the PyTorch path, which serves everything else.

Cache: ``cache_rows`` TT-served ids are held uncompressed and trained directly. Training forwards record
(id, count) of TT ids; every ``track_every`` optimizer steps the counts are merged into a decayed tracker
of the ``tracker_rows`` most frequent ids, and every ``refresh_every`` steps the cache takes the most
counted ids. An admitted row starts as its TT value (admission does not change the model); an evicted
row's learned value is discarded (a TT cannot store one row independently), so a cached id keeps its place
unless a candidate's count exceeds its own ``hysteresis`` times. Counting happens only in training mode.

Budget (:func:`~.tt_cores.plan_for_budget`): ranks as large as fit after the cache has its share;
``memory_bytes()`` counts everything in ``state_dict()``. The defaults' measurements are in docs/tt.md.
"""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import CompressedEmbeddingBag, uniform_rows_
from .ops import field_of, field_starts, topk_ties_first
from .options import Option, mode_option, sparse_option
from .registry import register
from .sync import gather_across_ranks
from .tt_cores import (EMPTY, TTPlan, chain_compiled, chain_backward, chain_forward, core_std, index_add_rows,
                       native_library, plan_bytes, plan_for_budget, split_index, trunc_normal_slice_, tt_params,
                       tt_rows)

log = logging.getLogger(__name__)

_PLAN_OPTIONS = ("layout", "num_cores", "q_shape", "ranks", "max_rank", "cache_fraction", "cache_max_share",
                 "tracker_per_row")
_MAX_PENDING = 16  # training forwards recorded between optimizer steps before they are merged


@register("tt")
class TTEmbeddingBag(CompressedEmbeddingBag):
    dedup = True
    OPTIONS = (
        Option("layout", "str", "auto", "one TT per compressed field, one TT over all compressed fields, or "
               "auto: per field where that fits the budget, else shared", choices=("auto", "field", "shared")),
        Option("num_cores", "int", None, "TT cores T", low=2, high=4, auto="from the largest field's size"),
        Option("q_shape", "list[int]", None, "column modes, T factors whose product is the embedding dim",
               low=1, auto="the dim split into T near-equal factors"),
        Option("ranks", "list[int]", None, "the T - 1 inner TT ranks", low=1,
               auto="as large as the budget allows, up to max_rank"),
        Option("max_rank", "int", 64, "largest rank the budget may choose", low=1),
        Option("cache_fraction", "float", 0.01, "share of the TT-served ids held uncompressed in the cache",
               low=0, high=1),
        Option("cache_max_share", "float", 0.75, "largest share of the budget the cache may take", low=0, high=1),
        Option("tracker_per_row", "int", 2, "ids whose counts are tracked per cache row", low=0),
        Option("decay", "float", 0.999, "factor the tracked counts are multiplied by per step", low=0, high=1,
               low_open=True),
        Option("refresh_every", "int", 50, "optimizer steps between cache refreshes", low=1),
        Option("cache_warmup", "bool", True, "before step refresh_every, merge counts every step and refresh "
               "at steps 1, 2, 4, 8, ... (the cache serves hot rows from the first steps of short runs)"),
        Option("track_every", "int", 10, "optimizer steps whose counts are merged into the tracker at once",
               low=1),
        Option("hysteresis", "float", 2.0, "a candidate replaces a cached id only when its count is this many "
               "times larger", low=1),
        Option("core_scale", "float", 1.0, "per-core learning-rate multiplier (by reparametrisation)", low=0,
               low_open=True),
        Option("init_scale", "float", 1.0, "multiplier of the rows' initial standard deviation", low=0,
               low_open=True),
        Option("seed", "int", None, "seed of the core initialisation", low=0, auto="torch's global generator"),
        mode_option(), sparse_option(),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, *, groups: Sequence[Sequence[int]],
                 p_shapes: Sequence[Sequence[int]], q_shape: Sequence[int], ranks: Sequence[int],
                 cache_rows: int = 0, tracker_rows: int | None = None, mode: str = "sum", sparse: bool = True,
                 decay: float = 0.999, refresh_every: int = 50, hysteresis: float = 2.0, seed: int | None = None,
                 core_scale: float = 1.0, init_scale: float = 1.0, track_every: int = 10,
                 cache_warmup: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        t_cores = len(q_shape)
        if len(ranks) != t_cores - 1 or any(len(p) != t_cores for p in p_shapes) or len(p_shapes) != len(groups):
            raise ValueError("need one p shape of T modes per group and T - 1 ranks")
        if math.prod(q_shape) != self.embedding_dim:
            raise ValueError(f"q_shape {list(q_shape)} must multiply to {self.embedding_dim}")
        self.groups = [list(g) for g in groups]
        self.p_shapes = [list(p) for p in p_shapes]
        self.q_shape, self.ranks = list(q_shape), list(ranks)
        self.sparse, self.decay, self.refresh_every, self.hysteresis = sparse, decay, refresh_every, hysteresis
        # cores are stored divided by core_scale and multiplied back in the forward: a per-core learning-rate
        # multiplier (x core_scale under Adagrad/Adam, whose steps ignore the gradient's scale; x core_scale^2
        # under SGD) that needs no change to the optimizer the training loop builds
        self.core_scale, self.init_scale = float(core_scale), float(init_scale)
        # the tracker merge (a sort of tracker + new ids) costs more than a step's lookups at small batches,
        # so the counts of track_every steps are merged at once
        self.track_every = max(1, int(track_every))
        self.cache_warmup = bool(cache_warmup)
        cache_rows = int(cache_rows) if self.groups else 0
        if not cache_rows:
            tracker_rows = 0
        tracker_rows = 2 * cache_rows if tracker_rows is None else int(tracker_rows)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        # field -> group (-1: raw) and the field's offset in its group's id space / in raw_weight
        nf = len(self.field_sizes)
        field_group, field_base = [-1] * nf, [0] * nf
        for g, fields in enumerate(self.groups):
            offset = 0
            for f in fields:
                if field_group[f] != -1:
                    raise ValueError(f"field {f} is in two TT groups")
                field_group[f], field_base[f] = g, offset
                offset += self.field_sizes[f]
            if offset > math.prod(self.p_shapes[g]):
                raise ValueError(f"p_shape {self.p_shapes[g]} covers fewer than the {offset} rows of group {g}")
        raw_sizes = [n for f, n in enumerate(self.field_sizes) if field_group[f] < 0]
        raw_base = field_starts(raw_sizes).tolist() if raw_sizes else []
        for f in (f for f in range(nf) if field_group[f] < 0):
            field_base[f] = raw_base.pop(0)
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("field_group", torch.tensor(field_group, dtype=torch.int64))
        self.register_buffer("field_base", torch.tensor(field_base, dtype=torch.int64))
        radix = torch.tensor(self.p_shapes, dtype=torch.int64).reshape(len(self.groups), t_cores)
        self.register_buffer("radix", radix)
        self.register_buffer("core_base", torch.cumsum(radix, 0) - radix)  # (G, T) first core row of each group

        # cores, stacked over groups; each group's slices initialised for its own row count
        r = [1, *self.ranks, 1]
        totals = radix.sum(0).tolist() if self.groups else [0] * t_cores
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(totals[t], r[t], self.q_shape[t], r[t + 1])) for t in range(t_cores))
        for g, fields in enumerate(self.groups):
            std = core_std(sum(self.field_sizes[f] for f in fields), self.ranks, t_cores)
            std *= self.init_scale ** (1.0 / t_cores) / self.core_scale  # rows' std x init_scale
            for t, core in enumerate(self.cores):
                start = int(self.core_base[g, t])
                trunc_normal_slice_(core.data, start, start + self.p_shapes[g][t], std, gen)

        self.raw_weight = nn.Parameter(torch.empty(sum(raw_sizes), self.embedding_dim))
        uniform_rows_(self.raw_weight, raw_sizes, gen)

        # cache of hot TT rows: slot-major weights; which id holds which slot is the cache index's business
        self.cache_weight = nn.Parameter(torch.zeros(cache_rows, self.embedding_dim))
        self._init_cache_index(cache_rows, tracker_rows)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._unapplied = 0  # optimizer steps whose counts wait in _pending (not checkpointed: < track_every steps)

    def _init_cache_index(self, cache_rows: int, tracker_rows: int) -> None:
        """The buffers that say which TT ids the cache holds: ids sorted for searchsorted, each id's
        slot, and the tracker of candidate ids with their decayed counts."""
        self.register_buffer("cache_keys", torch.full((cache_rows,), EMPTY, dtype=torch.int64))
        self.register_buffer("cache_slots", torch.arange(cache_rows, dtype=torch.int64))
        self.register_buffer("track_ids", torch.full((tracker_rows,), EMPTY, dtype=torch.int64))
        self.register_buffer("track_counts", torch.zeros(tracker_rows))
        self.register_buffer("steps", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("stats", torch.zeros(3, dtype=torch.int64))  # refreshes, admissions, evictions

    # ------------------------------------------------------------------ lookup
    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        """As :meth:`CompressedEmbeddingBag.forward`. One id per bag on the CPU (how the models look up
        fields) takes the compiled routing (:meth:`_native_rows`); everything else the PyTorch path."""
        cores = list(self.cores)
        lib = self._native_library(input, cores)
        if lib is None:
            return super().forward(input, offsets, per_sample_weights)
        ids, _, psw = self._flatten(input, offsets, per_sample_weights, need_offsets=False)
        out = self._native_rows(lib, ids, cores)
        return out if psw is None else out * psw.unsqueeze(1).to(out.dtype)

    def _native_library(self, input: Tensor, cores: list[Tensor]) -> ctypes.CDLL | None:
        """``tt_native.cpp`` loaded, where it serves this call: (n, 1) ids and every parameter on the CPU,
        sparse gradients, parameters float32 or float64 alike and contiguous, not while tracing; else None."""
        if (input.dim() != 2 or input.shape[1] != 1 or not input.numel() or input.device.type != "cpu"
                or not self.sparse or torch.compiler.is_compiling()):
            return None
        dtype = self.raw_weight.dtype
        params = (self.raw_weight, self.cache_weight, *cores)
        if dtype not in (torch.float32, torch.float64) or any(
                p.dtype != dtype or not p.is_cpu or not p.is_contiguous() for p in params):
            return None
        return native_library()

    def _native_rows(self, lib: ctypes.CDLL, ids: Tensor, cores: list[Tensor]) -> Tensor:
        """Rows (n, D) of a batch's ids (n,): as :meth:`_rows` on the distinct ids gathered back to the
        positions, bit for bit (values, gradients, recorded counts), with the deduplication, the routing, the
        gathers and (where :func:`~.tt_cores.chain_compiled`) the chain product in compiled passes
        (``tt_native.cpp``), else the chain product by :func:`~.tt_cores.tt_rows`.
        A subclass that overrides :meth:`_cache_find` has it called on the distinct ids (sorted), as
        :meth:`_rows` would; :meth:`_record` is called as there. ``cores``: ``list(self.cores)``."""
        n, t_cores = ids.shape[0], len(self.q_shape)
        ids = ids.contiguous()
        buf = torch.empty((6 + t_cores) * n, dtype=torch.int64)
        unique, inverse, counts, cat_of_pos, cat_src, tt_pos = buf[: 6 * n].view(6, n)
        core_rows = buf[6 * n:]
        u = lib.tt_dedup(n, ids.data_ptr(), self.num_embeddings, unique.data_ptr(), inverse.data_ptr(),
                         counts.data_ptr())
        if u < 0:
            self._bad_id(ids, int(ids[-1 - u]))
        unique, counts = unique[:u], counts[:u]
        if type(self)._cache_find is TTEmbeddingBag._cache_find:  # searched in the kernel
            cache = (self.cache_keys.numel(), self.cache_keys.data_ptr(), self.cache_slots.data_ptr(), None, None)
        else:  # the subclass's own index (cafe-tt: its HotSketch)
            found, slot = self._cache_find(unique)
            found, slot = found.to(torch.bool).contiguous(), slot.to(torch.int64).contiguous()
            cache = (0, None, None, found.data_ptr(), slot.data_ptr())
        sizes = (ctypes.c_int64 * 4)()
        lib.tt_route(u, unique.data_ptr(), n, inverse.data_ptr(), len(self.field_sizes), self.starts.data_ptr(),
                     self.field_group.data_ptr(), self.field_base.data_ptr(), t_cores, self.radix.data_ptr(),
                     self.core_base.data_ptr(), *cache, cat_of_pos.data_ptr(), cat_src.data_ptr(),
                     core_rows.data_ptr(), tt_pos.data_ptr(), sizes)
        n_raw, n_cache, n_tt, n_group = sizes
        if self.training and self.cache_weight.shape[0] > 0 and n_group:
            self._record(unique, counts, tt_pos[:n_group])
        route = (lib, cat_of_pos, cat_src, n_raw, n_cache)
        if not n_tt:
            tt = self.raw_weight.new_zeros(0, self.embedding_dim)
            return _Routed.apply(self.raw_weight, self.cache_weight, tt, route, None)
        scaled, core_rows = self.core_tensors(cores), core_rows[: n_tt * t_cores].view(n_tt, t_cores)
        if chain_compiled(scaled, core_rows):  # the chain product inside the same node
            return _Routed.apply(self.raw_weight, self.cache_weight, None, route, core_rows, *scaled)
        return _Routed.apply(self.raw_weight, self.cache_weight, tt_rows(scaled, core_rows), route, None)

    def _bad_id(self, ids: Tensor, bad: int) -> None:
        """Raise for an id outside the table: check_ids's ValueError, or IndexError without validation."""
        if self.validate_ids:
            self.check_ids(ids)
        raise IndexError(f"{self._label()}: id {bad} is outside [0, {self.num_embeddings})")

    def lookup(self, ids: Tensor) -> Tensor:
        return self._rows(ids)

    def lookup_unique(self, unique: Tensor, counts: Tensor) -> Tensor:
        record = self.training and self.cache_weight.shape[0] > 0
        return self._rows(unique, counts if record else None)  # (u, D)

    def _rows(self, ids: Tensor, counts: Tensor | None = None) -> Tensor:
        """Rows for distinct ids (n,) -> (n, D); ``counts`` given: record the TT ids' accesses.

        Each id is served by exactly one of: its raw row, its cache slot, the TT chain product. The three
        position lists come from one pass (no nested masks), and one gather puts the rows back in id order.
        """
        n = ids.shape[0]
        f = field_of(ids, self.starts)
        group = self.field_group[f]
        local = ids + (self.field_base - self.starts)[f]  # raw row, or id within the TT group
        is_tt = group >= 0
        hit, slot = self._cache_find(ids)  # cache keys are TT ids only: raw ids never hit
        if counts is not None:
            tt_ids = torch.nonzero(is_tt).squeeze(1)
            if tt_ids.numel():
                self._record(ids, counts, tt_ids)
        kinds = (("raw", torch.nonzero(~is_tt).squeeze(1)), ("cache", torch.nonzero(hit).squeeze(1)),
                 ("tt", torch.nonzero(is_tt & ~hit).squeeze(1)))
        parts, positions = [], []
        for kind, pos in kinds:
            if not pos.numel():
                continue
            if kind == "raw":
                parts.append(F.embedding(local.index_select(0, pos), self.raw_weight, sparse=self.sparse))
            elif kind == "cache":
                parts.append(F.embedding(slot.index_select(0, pos), self.cache_weight, sparse=self.sparse))
            else:
                parts.append(self._tt(group.index_select(0, pos), local.index_select(0, pos)))
            positions.append(pos)
        if not parts:
            return self.raw_weight.new_zeros(n, self.embedding_dim)
        if len(parts) == 1:
            return parts[0]
        # undo the split: row i of the concatenation belongs to position order[i]
        order = torch.cat(positions)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=ids.device)
        dtype = self.cores[0].dtype if len(self.cores) else self.raw_weight.dtype
        return torch.cat([p.to(dtype) for p in parts]).index_select(0, inverse)

    def _tt(self, group: Tensor, local: Tensor) -> Tensor:
        """TT rows for (group, id within group) pairs: mixed-radix digits -> stacked core rows -> chain product."""
        digits = split_index(local, self.radix[group])  # (m, T)
        return tt_rows(self.core_tensors(), digits + self.core_base[group])

    def core_tensors(self, cores: list[Tensor] | None = None) -> list[Tensor]:
        """The cores the chain product uses (the parameters, or ``cores`` listing them, times ``core_scale``)."""
        cores = list(self.cores) if cores is None else cores
        return cores if self.core_scale == 1.0 else [c * self.core_scale for c in cores]

    def _tt_rows_for_ids(self, ids: Tensor) -> Tensor:
        f = field_of(ids, self.starts)
        return self._tt(self.field_group[f], ids - self.starts[f] + self.field_base[f])

    def cached_rows(self) -> tuple[Tensor, Tensor]:
        """(ids the cache holds, sorted; their rows), detached: what serving reads."""
        held = torch.nonzero(self.cache_keys != EMPTY).squeeze(1)
        keys = self.cache_keys[held]
        order = torch.argsort(keys)
        return keys[order], self.cache_weight.detach()[self.cache_slots[held][order]]

    def _cache_find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(hit mask, cache slot) per id; cache_keys is sorted with EMPTY (never a valid id) at the end."""
        if self.cache_keys.numel() == 0:
            return torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
        pos = torch.searchsorted(self.cache_keys, ids).clamp_(max=self.cache_keys.numel() - 1)
        return self.cache_keys[pos] == ids, self.cache_slots[pos]

    # ------------------------------------------------------------------ cache state
    def _record(self, ids: Tensor, counts: Tensor, tt_pos: Tensor) -> None:
        """Keep the accesses of the TT ids among ``ids`` (at positions ``tt_pos``) for the next step."""
        self._pending.append((ids.index_select(0, tt_pos), counts.index_select(0, tt_pos)))
        if len(self._pending) > _MAX_PENDING:  # forwards without optimizer steps: keep the list short
            self._pending = [self._merge_pending(dedup=True)]

    def _merge_pending(self, dedup: bool = False) -> tuple[Tensor, Tensor]:
        ids = torch.cat([p[0] for p in self._pending])
        counts = torch.cat([p[1] for p in self._pending]).float()
        if not dedup or len(self._pending) == 1:  # update_state sums duplicates itself
            return ids, counts
        unique, inverse = torch.unique(ids, return_inverse=True)
        return unique, torch.zeros(unique.shape[0], dtype=counts.dtype, device=ids.device).index_add_(0, inverse, counts)

    def after_optimizer_step(self) -> None:
        if self.cache_keys.numel() == 0:
            self._pending = []
            return
        self._unapplied += 1
        warming = self.cache_warmup and int(self.steps) < self.refresh_every
        if self._unapplied < self.track_every and not warming:  # counts wait: one tracker merge per track_every
            return
        if self._pending:
            ids, counts = self._merge_pending()
        else:  # still take part in the gather: every rank must call it
            ids = self.track_ids.new_zeros(0)
            counts = self.track_counts.new_zeros(0)
        self._pending = []
        steps, self._unapplied = self._unapplied, 0
        ids, counts = gather_across_ranks(ids, counts)  # identity in one process
        if ids.numel():
            self.update_state(ids, counts, steps)

    @torch.no_grad()
    def update_state(self, ids: Tensor, counts: Tensor, steps: int = 1) -> None:
        """Apply ``steps`` steps' accesses (TT ids, repeats allowed, and counts): the only place state changes.

        Under distributed training :meth:`after_optimizer_step` gathers (ids, counts) from every rank first
        (duplicates are summed here), so every rank's tracker and cache stay identical. The tracker decays by
        ``decay ** steps``; the cache is refreshed whenever the step count passes a multiple of refresh_every
        (and, with ``cache_warmup``, a power of two below refresh_every).
        """
        before = int(self.steps)
        self.steps += steps
        if not self._merge_compiled(ids, counts, steps):
            self._merge(ids, counts, steps)
        after = before + steps
        warm = self.cache_warmup and before < self.refresh_every and after.bit_length() > before.bit_length()
        if warm or after // self.refresh_every > before // self.refresh_every:
            self.refresh_cache()

    def _merge(self, ids: Tensor, counts: Tensor, steps: int) -> None:
        """The tracker keeps the most counted of its ids (counts decayed by ``decay ** steps``) and ``ids``
        (``counts`` summed per id), largest first, ties to the smaller id."""
        valid = self.track_ids != EMPTY
        all_ids = torch.cat([self.track_ids[valid], ids])
        old_counts = self.track_counts[valid] * self.decay ** steps
        unique, inverse = torch.unique(all_ids, return_inverse=True)
        summed = torch.zeros(unique.shape[0], dtype=old_counts.dtype, device=old_counts.device)
        # The new counts first: they are whole numbers, whose float sum is exact in any order (CUDA adds
        # duplicates in no fixed order); then each tracked id's one decayed count. The same sums everywhere.
        n_old = old_counts.numel()
        summed.index_add_(0, inverse[n_old:], counts.to(old_counts.dtype))
        summed.index_add_(0, inverse[:n_old], old_counts)
        keep = min(unique.shape[0], self.track_ids.numel())
        top = topk_ties_first(summed, keep)
        self.track_ids.fill_(EMPTY)
        self.track_counts.zero_()
        self.track_ids[:keep] = unique[top]
        self.track_counts[:keep] = summed[top]

    def _merge_compiled(self, ids: Tensor, counts: Tensor, steps: int) -> bool:
        """:meth:`_merge` in one compiled pass (``tt_tracker_merge``), the same sums and order bit for bit;
        False where it does not serve (not the CPU, not float32 counts, no compiler)."""
        track_ids, track_counts = self.track_ids, self.track_counts
        if (track_ids.device.type != "cpu" or track_counts.dtype != torch.float32 or ids.device.type != "cpu"
                or not track_ids.is_contiguous() or not track_counts.is_contiguous()
                or torch.compiler.is_compiling()):
            return False
        lib = native_library()
        if lib is None:
            return False
        ids = ids.to(torch.int64).contiguous()
        counts = counts.to(torch.float32).contiguous()
        kept = lib.tt_tracker_merge(track_ids.numel(), track_ids.data_ptr(), track_counts.data_ptr(), ids.numel(),
                                    ids.data_ptr(), counts.data_ptr(), self.decay ** steps, EMPTY)
        if kept < 0:
            raise IndexError(f"{self._label()}: a negative id reached the cache tracker")
        return True

    @torch.no_grad()
    def refresh_cache(self) -> None:
        """Make the cache hold the most counted TT ids (cached ones favoured by ``hysteresis``)."""
        capacity = self.cache_keys.numel()
        valid = self.track_ids != EMPTY
        cand, score = self.track_ids[valid], self.track_counts[valid].clone()
        cached_now, _ = self._cache_find(cand)
        score[cached_now] *= self.hysteresis
        want = cand[topk_ties_first(score, capacity)]
        keep, keep_slot = self._cache_find(want)
        old_valid = self.cache_keys != EMPTY
        n_old = int(old_valid.sum())
        kept_ids, kept_slots = want[keep], keep_slot[keep]
        new_ids = want[~keep]
        free = torch.ones(capacity, dtype=torch.bool, device=want.device)
        free[kept_slots] = False
        new_slots = torch.nonzero(free).squeeze(1)[: new_ids.numel()]
        if new_ids.numel():  # admitted rows start as their current TT value: the model does not change
            self.cache_weight[new_slots] = self._tt_rows_for_ids(new_ids).to(self.cache_weight.dtype)
        ids = torch.cat([kept_ids, new_ids])
        slots = torch.cat([kept_slots, new_slots])
        order = torch.argsort(ids)
        self.cache_keys.fill_(EMPTY)
        self.cache_keys[: ids.numel()] = ids[order]
        free[new_slots] = False
        self.cache_slots.copy_(torch.cat([slots[order], torch.nonzero(free).squeeze(1)]))
        evicted = n_old - kept_ids.numel()
        self.stats += torch.tensor([1, new_ids.numel(), evicted], device=self.stats.device)
        log.debug("tt cache refresh: %d kept, %d admitted, %d evicted", kept_ids.numel(), new_ids.numel(), evicted)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.raw_weight, self.cache_weight] if self.sparse else []

    def training_stats(self) -> dict[str, float]:
        """Cache ``refreshes``, rows ``admitted`` and ``evicted`` since the previous call."""
        return dict(zip(("refreshes", "admitted", "evicted"), self._since_last_call("cache", self.stats)))

    # ------------------------------------------------------------------ budget
    @classmethod
    def _split_options(cls, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        plan_opts = {k: v for k, v in options.items() if k in _PLAN_OPTIONS}
        return plan_opts, {k: v for k, v in options.items() if k not in _PLAN_OPTIONS}

    @classmethod
    def from_plan(cls, plan: TTPlan, **options: Any) -> "TTEmbeddingBag":
        return cls(plan.field_sizes, plan.dim, groups=plan.groups, p_shapes=plan.p_shapes, q_shape=plan.q_shape,
                   ranks=plan.ranks, cache_rows=plan.cache_rows, tracker_rows=plan.tracker_rows, **options)

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        plan_opts, _ = cls._split_options(options)
        lo = plan_for_budget(field_sizes, embedding_dim, None, **plan_opts).nbytes()
        hi = plan_bytes(field_sizes, embedding_dim, [], [], [embedding_dim], [], 0, 0)  # all raw, no cache
        return lo, hi

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "TTEmbeddingBag":
        plan_opts, table_opts = cls._split_options(options)
        plan = plan_for_budget(field_sizes, embedding_dim, int(budget_bytes), **plan_opts)
        log.info("tt plan: %d TT groups, ranks %s, q %s, %d raw fields, %d cache rows, %d bytes",
                 len(plan.groups), plan.ranks, plan.q_shape, len(plan.raw_fields()), plan.cache_rows, plan.nbytes())
        return cls.from_plan(plan, **table_opts)

    def extra_repr(self) -> str:
        tt = sum(tt_params(p, self.q_shape, self.ranks) for p in self.p_shapes)
        return (f"{super().extra_repr()}, groups={len(self.groups)}, q={self.q_shape}, ranks={self.ranks}, "
                f"core_floats={tt}, raw_rows={self.raw_weight.shape[0]}, cache_rows={self.cache_weight.shape[0]}")

    def inference_form(self) -> "TTInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return TTInference(self)


class _Routed(torch.autograd.Function):
    """A batch's rows from the routed concatenation [raw rows, cache rows, TT rows] (``tt_native.cpp``).

    Forward copies each position's row; backward adds each position's gradient to its row of the
    concatenation in position order (the sums of :meth:`TTEmbeddingBag._rows`' two gathers, rounded alike)
    and hands the raw and cache parts on as the sparse gradients ``F.embedding(sparse=True)`` gives. The TT
    rows are ``tt``, or, given ``core_rows`` and the cores, the compiled chain product computed here (one
    autograd node for the whole lookup; :func:`~.tt_cores.chain_forward`).
    """

    @staticmethod
    def forward(ctx: Any, raw: Tensor, cache: Tensor, tt: Tensor | None, route: tuple,  # type: ignore[override]
                core_rows: Tensor | None, *cores: Tensor) -> Tensor:
        lib, cat_of_pos, cat_src, n_raw, n_cache = route
        if core_rows is not None:
            tt, ctx.chain = chain_forward(lib, core_rows, cores)
            ctx.save_for_backward(*cores)
            ctx.core_rows = core_rows
        n, dim = cat_of_pos.shape[0], raw.shape[1]
        out = raw.new_empty(n, dim)
        lib.tt_assemble(n, dim, raw.element_size(), cat_of_pos.data_ptr(), n_raw, n_cache, cat_src.data_ptr(),
                        raw.data_ptr(), cache.data_ptr(), tt.data_ptr(), out.data_ptr())
        ctx.route, ctx.shapes = route, (raw.shape, cache.shape, tt.shape[0])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        lib, cat_of_pos, cat_src, n_raw, n_cache = ctx.route
        raw_shape, cache_shape, n_tt = ctx.shapes
        if grad.stride(1) != 1:
            grad = grad.contiguous()
        summed = index_add_rows(n_raw + n_cache + n_tt, cat_of_pos, grad)  # in position order, compiled

        def sparse(lo: int, hi: int, shape: torch.Size) -> Tensor:
            return torch.sparse_coo_tensor(cat_src[lo:hi].view(1, -1), summed[lo:hi], shape, check_invariants=False)

        needs = ctx.needs_input_grad
        grads = (sparse(0, n_raw, raw_shape) if n_raw and needs[0] else None,
                 sparse(n_raw, n_raw + n_cache, cache_shape) if n_cache and needs[1] else None)
        if not hasattr(ctx, "chain"):
            return (*grads, summed[n_raw + n_cache:] if n_tt and needs[2] else None, None, None)
        cores = ctx.saved_tensors
        dcores = chain_backward(lib, ctx.core_rows, cores, ctx.chain, summed[n_raw + n_cache:])
        return (*grads, None, None, None, *(d if need else None for d, need in zip(dcores, needs[5:])))


class TTInference(nn.Module):
    """``tt`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field f,
    -> rows (B, F, D). Raw fields read their rows; TT fields the cache (frozen into its ids, sorted, and
    float rows) or else the chain product of their cores (batch-last, as :func:`~.tt_cores.tt_rows`)."""

    def __init__(self, table: "TTEmbeddingBag") -> None:
        super().__init__()
        groups = table.field_group.tolist()
        raw = [f for f, g in enumerate(groups) if g < 0]
        tt = [f for f, g in enumerate(groups) if g >= 0]
        self.dim = table.embedding_dim
        self.register_buffer("raw_cols", torch.tensor(raw, dtype=torch.int64))
        self.register_buffer("tt_cols", torch.tensor(tt, dtype=torch.int64))
        self.register_buffer("order", torch.argsort(torch.tensor(raw + tt, dtype=torch.int64)))
        # row of raw_weight, or id within the TT group, is global id + this per field
        self.register_buffer("shift", (table.field_base - table.starts).detach().clone())
        self.register_buffer("raw_weight", table.raw_weight.detach().clone())
        tt_group = table.field_group[tt] if tt else table.field_group.new_zeros(0)
        self.register_buffer("radix", table.radix[tt_group].clone())  # (F_tt, T)
        self.register_buffer("core_base", table.core_base[tt_group].clone())  # (F_tt, T)
        cores = table.core_tensors()
        self.shapes = [tuple(c.shape) for c in cores]
        for t, c in enumerate(cores):
            self.register_buffer(f"core{t}", c.detach().reshape(c.shape[0], -1).clone())  # (P_t, r q r')
        keys, rows = table.cached_rows()
        if not len(keys):  # one entry that no id matches, so the search needs no branch
            keys, rows = torch.full((1,), -1), rows.new_zeros(1, self.dim)
        self.register_buffer("cache_ids", keys.clone())
        self.register_buffer("cache_rows", rows.clone())

    def chain(self, core_rows: Tensor) -> Tensor:
        """TT rows for core rows (n, T) -> (n, D): the batch-last chain product."""
        n = core_rows.shape[0]
        acc = None
        for t, (_, r_in, q, r_out) in enumerate(self.shapes):
            s = getattr(self, f"core{t}").index_select(0, core_rows[:, t]).t()  # (r_in q r_out, n)
            if acc is None:
                acc = s.reshape(q, r_out, n)
            else:  # (Q, r_in, n) x (r_in, q r_out, n) -> (Q q, r_out, n), as tt_cores._contract
                s = s.reshape(r_in, q * r_out, n)
                if acc.shape[0] * r_in * q * r_out <= 1024:  # small: one broadcast product
                    acc = (acc.unsqueeze(2) * s.unsqueeze(0)).sum(1)
                else:  # a multiply-add per rank, no (Q, r, K, n) buffer
                    out = acc[:, 0].unsqueeze(1) * s[0].unsqueeze(0)
                    for i in range(1, r_in):
                        out = out.addcmul(acc[:, i].unsqueeze(1), s[i].unsqueeze(0))
                    acc = out
                acc = acc.reshape(-1, r_out, n)
        return acc.reshape(-1, n).t()

    def forward(self, ids: Tensor) -> Tensor:
        local = ids + self.shift  # (B, F)
        parts = []
        if self.raw_cols.numel():
            parts.append(F.embedding(local.index_select(1, self.raw_cols), self.raw_weight))
        if self.tt_cols.numel():
            sub = local.index_select(1, self.tt_cols)  # (B, F_tt)
            b, f = sub.shape
            digits = []
            rest = sub
            for t in range(len(self.shapes) - 1, -1, -1):  # mixed-radix digits, most significant first
                digits.append(rest % self.radix[:, t])
                rest = rest // self.radix[:, t]
            core_rows = torch.stack(digits[::-1], dim=-1) + self.core_base  # (B, F_tt, T)
            rows = self.chain(core_rows.reshape(-1, len(self.shapes))).reshape(b, f, self.dim)
            tt_ids = ids.index_select(1, self.tt_cols)
            pos = torch.searchsorted(self.cache_ids, tt_ids).clamp_(max=self.cache_ids.numel() - 1)
            hit = self.cache_ids[pos] == tt_ids
            parts.append(torch.where(hit.unsqueeze(-1), self.cache_rows[pos], rows))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if len(parts) == 1 else out.index_select(1, self.order)
