"""``mpcache``: INT8/INT4 row-wise quantised table with a full-precision cache of hot rows.

After "Mixed-Precision Embedding Using a Cache" (Yang et al., 2020). Rows are stored in FBGEMM's fused row
layouts (:mod:`.quant`); C cache rows (default 5% of rows at INT8, 1% at INT4) hold the hot rows in
float32. In training the step's uncached rows are dequantised into staging rows of one sparse parameter
(``cache_weight``: cache slots, then a staging workspace), so the user's optimizer updates every row;
``after_optimizer_step`` writes staged and evicted rows back with stochastic rounding (on the row's old
grid where it still fits: ``write_back``), admits rows by the policy (``lfu``: a count-min sketch;
``lru``) and moves each row's optimizer state with it (``optimizer_state``). A cached row's stored row
holds its cache slot, marked by the sign bit of its scale, so a lookup needs no search; outside training
on the CPU, one compiled pass reads each id's cache row or stored row (``mpcache_native.cpp``; without a
compiler, PyTorch's quantized ``embedding_bag`` ops). The rules, why each was chosen, and the memory
formula: docs/native.md, "mpcache".
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .base import FLOAT_BYTES, CompressedEmbeddingBag, tensor_bytes
from .ops import field_of, field_starts, hash64
from .quant import dequantize_rows, quantize_rows, row_bytes, unpack_int4
from .options import Option, mode_option
from .registry import register
from .sync import distributed_world, gather_across_ranks

log = logging.getLogger(__name__)

PRECISIONS = {"int8": 8, "int4": 4}
OPTIMIZER_STATES = ("row", "element", "slot")
WRITE_BACKS = ("keep-grid", "fresh")  # see quant.grid_kept
_STORE = "optstate_"  # prefix of the per-row optimizer state buffers
DEFAULT_CACHE_FRACTION = {8: 0.05, 4: 0.01}
_STATS = 4  # step, hit lookups, lookups, sketch mass since the last halving
DEFAULT_SKETCH_WIDTH = 8  # LFU sketch columns per cache row (benchmarks/README.md, "mpcache")
_INIT_CHUNK = 1 << 20


def cache_row_bytes(dim: int, policy: str, sketch_depth: int = 2, sketch_width: int = DEFAULT_SKETCH_WIDTH) -> int:
    """Bytes per cache row: the float row, its sorted id, slot and key, and (lfu) its sketch columns."""
    return dim * FLOAT_BYTES + 24 + (4 * sketch_depth * sketch_width if policy == "lfu" else 0)


def table_bytes(num_rows: int, dim: int, bits: int, cache_rows: int, policy: str = "lfu",
                sketch_depth: int = 2, sketch_width: int = DEFAULT_SKETCH_WIDTH) -> int:
    """Exact ``memory_bytes()`` of an mpcache table with these settings."""
    return (num_rows * row_bytes(bits, dim) + cache_rows * cache_row_bytes(dim, policy, sketch_depth, sketch_width)
            + 8 * _STATS)


@register("mpcache")
class MPCacheEmbeddingBag(CompressedEmbeddingBag):
    """Quantised rows + float32 cache. Options: ``precision`` (int8/int4), ``cache_rows`` or
    ``cache_fraction``, ``policy`` (lfu/lru), ``staging_rows`` (initial workspace rows), ``sketch_depth``,
    ``sketch_width`` (columns per cache row), ``sketch_reset``, ``optimizer_state`` (row/element/slot),
    ``write_back`` (keep-grid/fresh)."""

    OPTIONS = (
        Option("precision", "str", "auto", "bits of the stored rows; auto: int8 when its default cache fits the "
               "budget, else int4", choices=("auto", "int8", "int4")),
        Option("cache_rows", "int", None, "rows of the float32 cache", low=0,
               auto="whatever the budget leaves after the quantised rows"),
        Option("cache_fraction", "float", None, "cache rows as a share of all rows (instead of cache_rows)",
               low=0, high=1, auto="whatever the budget leaves after the quantised rows"),
        Option("policy", "str", "lfu", "which rows the cache keeps: most frequent (count-min sketch with "
               "ageing) or most recently used", choices=("lfu", "lru")),
        Option("sketch_depth", "int", 2, "rows of the lfu count-min sketch", low=1),
        Option("sketch_width", "int", DEFAULT_SKETCH_WIDTH, "lfu sketch columns per cache row", low=1),
        Option("sketch_reset", "int", 10, "halve the lfu counters when the mass added since the last halving "
               "reaches sketch_reset x width", low=1),
        Option("staging_rows", "int", 4096, "initial rows of the per-step workspace for uncached rows", low=1),
        Option("optimizer_state", "str", "row", "optimizer state of uncached rows: one value per row (row-wise "
               "Adagrad), one per element (exact, as large as the full table), or none kept (slot)",
               choices=OPTIMIZER_STATES),
        Option("write_back", "str", "keep-grid", "requantising an updated row keeps its scale and bias while "
               "its values fit them (keep-grid) or picks new ones each time (fresh)", choices=WRITE_BACKS),
        mode_option(),
    )

    dedup = True  # each distinct id is staged once, and its count feeds the cache

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, precision: str = "int8",
                 cache_rows: int | None = None, cache_fraction: float | None = None, policy: str = "lfu",
                 mode: str = "sum", staging_rows: int = 4096, sketch_depth: int = 2,
                 sketch_width: int = DEFAULT_SKETCH_WIDTH, sketch_reset: int = 10,
                 optimizer_state: str = "row", write_back: str = "keep-grid") -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if policy not in ("lfu", "lru"):
            raise ValueError(f"policy must be 'lfu' or 'lru', got {policy!r}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {list(OPTIMIZER_STATES)}, got {optimizer_state!r}")
        if write_back not in WRITE_BACKS:
            raise ValueError(f"write_back must be one of {list(WRITE_BACKS)}, got {write_back!r}")
        self.optimizer_state = optimizer_state
        self.write_back = write_back
        self.bits = PRECISIONS[precision]
        self.precision = precision
        self.policy = policy
        self.sketch_reset = int(sketch_reset)
        n, d = self.num_embeddings, self.embedding_dim
        c = _cache_rows(n, self.bits, cache_rows, cache_fraction)
        self.register_buffer("codes", torch.empty(n, row_bytes(self.bits, d), dtype=torch.uint8))
        self._init_codes()
        # Cache index, kept sorted by id so a lookup is one searchsorted; empty entries hold id N (sorts
        # last, matches no id) and key -1 (loses to any used id).
        self.register_buffer("cache_ids", torch.full((c,), n, dtype=torch.int64))
        self.register_buffer("cache_slots", torch.arange(c, dtype=torch.int64))
        self.register_buffer("cache_keys", torch.full((c,), -1, dtype=torch.int64))
        if int(sketch_width) < 1 or int(sketch_depth) < 1:
            raise ValueError(f"sketch_width and sketch_depth must be >= 1, got {sketch_width}, {sketch_depth}")
        width = c * int(sketch_width) if policy == "lfu" else 0
        self.register_buffer("sketch", torch.zeros(int(sketch_depth), width, dtype=torch.int32))
        self.register_buffer("stats", torch.zeros(_STATS, dtype=torch.int64))
        # One parameter: rows [0, C) are the cache slots, rows [C, C + S) the staging workspace, so a
        # forward is one embedding call and the optimizer makes one sparse update per step.
        self.cache_weight = nn.Parameter(torch.zeros(c + max(int(staging_rows), 1), d))
        self._pending: list[tuple[Tensor, Tensor, Tensor, int]] = []  # (ids, counts, missed ids, staging start)
        self._staged = 0
        self._index_version = 0  # bumped whenever cache_ids changes (see _cached)
        self._find_memo: tuple | None = None
        # A cached row's stored row holds its cache slot and the sign bit of its scale is set (a stored
        # scale is otherwise >= +0), so an id finds its slot with a gather instead of a search. INT8: the
        # slot replaces the bias, which moves into the first code bytes (unused while the row is cached),
        # so scale and slot form one 8-byte word; INT4 (2-byte bias): the slot takes the first code bytes.
        code_bytes = d if self.bits == 8 else (d + 1) // 2
        self._slot_bytes = min(4, code_bytes)
        self._slot_at = d + 4 if self.bits == 8 else 0
        self._marker_byte = code_bytes + (3 if self.bits == 8 else 1)  # high byte of the scale
        self._marked = 0 < c <= 256 ** self._slot_bytes and (self.bits == 4 or d >= 4)

    # ------------------------------------------------------------------ construction
    def _init_codes(self) -> None:
        """DLRM-style U(±sqrt(1/n_field)) rows, quantised to nearest, in chunks (never N×D floats at once)."""
        starts = field_starts(self.field_sizes)
        sizes = torch.tensor(self.field_sizes, dtype=torch.float64)
        for lo in range(0, self.num_embeddings, _INIT_CHUNK):
            ids = torch.arange(lo, min(lo + _INIT_CHUNK, self.num_embeddings))
            bound = torch.sqrt(1.0 / sizes[field_of(ids, starts)]).float()
            x = (torch.rand(len(ids), self.embedding_dim) * 2 - 1) * bound[:, None]
            self.codes[lo:lo + len(ids)] = quantize_rows(x, self.bits)

    @property
    def num_cache_rows(self) -> int:
        return self.cache_ids.numel()

    # ------------------------------------------------------------------ lookup
    def _cached(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(hit mask, cache slot or 0) of each id.

        A training step asks for the same ids twice (forward, then :meth:`update_state`) with no cache
        change in between, so the last answer is kept for the same tensor while the index's version
        (bumped by every change of the cache) is unchanged."""
        memo = self._find_memo
        if memo is not None and memo[0] is ids and memo[1] == self._index_version:
            return memo[2], memo[3]
        if self._marked and self.bits == 8 and self.embedding_dim % 8 == 0 and sys.byteorder == "little":
            word = self.codes.view(torch.int64)[:, self.embedding_dim // 8].index_select(0, ids)  # scale, slot
            hit = (word & 0x80000000) != 0
            slot = torch.where(hit, word >> 32, 0)
        elif self._marked:
            flat, at = self.codes.view(-1), ids * self.codes.shape[1]
            hit = flat.index_select(0, at + self._marker_byte) >= 0x80
            at = at + self._slot_at
            stored = flat.index_select(0, (at[:, None] + torch.arange(self._slot_bytes, device=ids.device)).view(-1))
            stored = F.pad(stored.view(-1, self._slot_bytes), (0, 4 - self._slot_bytes))
            slot = torch.where(hit, stored.view(torch.int32).squeeze(1).long(), 0)
        elif self.num_cache_rows == 0:
            hit, slot = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids)
        else:
            hit, pos = _isin_sorted(ids, self.cache_ids, positions=True)
            slot = torch.where(hit, self.cache_slots.index_select(0, pos), 0)
        self._find_memo = (ids, self._index_version, hit, slot)
        return hit, slot

    def _mark(self, ids: Tensor, slots: Tensor) -> None:
        """Store each cached id's slot in its row and set its marker (see ``__init__``)."""
        if not self._marked or not len(ids):
            return
        rows = self.codes.index_select(0, ids)
        at, k = self._slot_at, self._slot_bytes
        if at:
            rows[:, :k] = rows[:, at:at + k]  # keep what the slot overwrites
        rows[:, at:at + k] = slots.to(torch.int32)[:, None].view(torch.uint8)[:, :k]
        rows[:, self._marker_byte] |= 0x80
        self.codes.index_copy_(0, ids, rows)

    def _unmarked(self, rows: Tensor) -> Tensor:
        """Stored rows (a copy) with the markers undone: a cached row's scale and bias as before caching."""
        if self._marked:
            marked = rows[:, self._marker_byte] >= 0x80
            at, k = self._slot_at, self._slot_bytes
            if at and marked.any():
                rows[marked, at:at + k] = rows[marked, :k]
            rows[:, self._marker_byte] &= 0x7F
        return rows

    def dequantized(self, ids: Tensor) -> Tensor:
        """Rows of uncached ids as stored in low precision: (n,) -> (n, D). (A cached row's stored
        row holds its slot, not its value.)"""
        return dequantize_rows(self.codes.index_select(0, ids), self.bits, self.embedding_dim)

    def _rows(self, ids: Tensor, counts: Tensor | None) -> Tensor:
        """Rows of unique ids; in training with grad, records the step for :meth:`after_optimizer_step`."""
        hit, slots = self._cached(ids)
        c = self.num_cache_rows
        if counts is not None and self.training and torch.is_grad_enabled():
            miss = ~hit
            missed = ids[miss]
            start = c + self._reserve(len(missed))
            with torch.no_grad():
                self.cache_weight[start:start + len(missed)] = self.dequantized(missed)
            # a missed id reads the staging row of its rank among the misses
            index = torch.where(hit, slots, start - 1 + torch.cumsum(miss, 0))
            self._pending.append((ids, counts, missed, start))
            return F.embedding(index, self.cache_weight, sparse=True)  # (u, D) in the order of ids
        if not c:
            return self.dequantized(ids)
        rows = self.cache_weight.detach().index_select(0, slots)  # (u, D), a copy
        miss = torch.nonzero(~hit).squeeze(1)
        return rows.index_copy_(0, miss, self.dequantized(ids.index_select(0, miss)))  # dequantise misses only

    @property
    def staging_rows(self) -> int:
        return self.cache_weight.shape[0] - self.num_cache_rows

    def _reserve(self, m: int) -> int:
        """First staging row (counted from the workspace's start) of m free ones, growing the workspace
        when no step is pending."""
        if self._staged + m > self.staging_rows:
            if self._staged:
                log.warning("mpcache: %d rows staged by forwards without an optimizer step; dropping them",
                            self._staged)
                self._pending.clear()
                self._staged = 0
            if m > self.staging_rows:
                log.warning("mpcache: growing the staging workspace from %d to %d rows", self.staging_rows, 2 * m)
                grown = self.cache_weight.new_zeros(self.num_cache_rows + 2 * m, self.embedding_dim)
                grown[:self.num_cache_rows] = self.cache_weight.detach()[:self.num_cache_rows]
                self.cache_weight.data = grown
        start = self._staged
        self._staged += m
        return start

    def lookup(self, ids: Tensor) -> Tensor:
        return self._rows(ids, None)

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        """Outside training on the CPU, one compiled pass pools each id's cache row or decoded stored row
        (:func:`lookup_op`); without it, PyTorch's quantized ``embedding_bag`` over the stored rows (cached
        rows weighted 0) plus an ``embedding_bag`` over the cache (the others weighted 0). No sort, no search."""
        if self.training and torch.is_grad_enabled():
            return self._train_forward(input, offsets, per_sample_weights)
        if self.codes.device.type != "cpu":
            return super().forward(input, offsets, per_sample_weights)
        kernel = lookup_op() if (self._marked or not self.num_cache_rows) and \
            self.cache_weight.dtype == torch.float32 else None
        if kernel is None and not self._marked:
            return super().forward(input, offsets, per_sample_weights)
        one = input.dim() == 2 and input.shape[1] == 1 and offsets is None  # one id per bag: no pooling
        if one and per_sample_weights is None:  # checked as 1-D ids: the (B,) offsets of bags are not needed
            ids, _, psw = self._flatten(input.reshape(-1), _NO_OFFSETS, None)
        else:
            ids, offsets, psw = self._flatten(input, offsets, per_sample_weights)
        if self.validate_ids:
            self.check_ids(ids)
        if kernel is not None:
            marks = (self._marker_byte, self._slot_at, self._slot_bytes if self._marked else 0)
            return kernel(self.codes, self.cache_weight.detach(), ids, None if one else offsets,
                          None if psw is None else psw.float(), self.embedding_dim, self.bits, *marks,
                          self.mode == "mean")
        op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if self.bits == 8
              else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
        if one and psw is None:
            hit, slots = self._cached(ids)
            out = F.embedding(slots, self.cache_weight.detach())  # cache rows, then the misses' rows
            miss = torch.nonzero(~hit).squeeze(1)
            rows = op(self.codes, ids.index_select(0, miss), torch.arange(len(miss)))[:, :self.embedding_dim]
            return out.index_copy_(0, miss, rows)
        hit, slots = self._cached(ids)
        cache_w = hit.float() if psw is None else torch.where(hit, psw.float(), 0.0)
        codes_w = (~hit).float() if psw is None else torch.where(hit, 0.0, psw.float())
        out = F.embedding_bag(slots, self.cache_weight.detach(), offsets, mode="sum", per_sample_weights=cache_w)
        out.add_(op(self.codes, ids, offsets, per_sample_weights=codes_w)[:, :self.embedding_dim])
        if self.mode == "mean":
            ends = torch.cat([offsets[1:], offsets.new_tensor([len(ids)])])
            out.div_((ends - offsets).clamp(min=1)[:, None])
        return out

    def _train_forward(self, input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None) -> Tensor:
        """Training: the base class's forward (each distinct id's row looked up once, with its count),
        except that for one id per bag (how the models look up fields) the gather from the distinct rows
        to the ids backpropagates through :class:`_Gather`'s compiled sum."""
        if not (input.dim() == 2 and input.shape[1] == 1 and offsets is None):
            return super().forward(input, offsets, per_sample_weights)
        ids, _, psw = self._flatten(input, None, per_sample_weights, need_offsets=False)
        if self.validate_ids:
            self.check_ids(ids)
        if self._marked and distributed_world() == 1:
            out = self._rows_by_marker(ids)
        else:
            unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            out = _Gather.apply(self.lookup_unique(unique, counts), inverse)  # (B, D)
        return out if psw is None else out * psw.unsqueeze(1).to(out.dtype)

    def _rows_by_marker(self, ids: Tensor) -> Tensor:
        """Training rows of ids (n,) -> (n, D), as :meth:`_rows` over their distinct ids, without sorting
        them all: the markers give each id its cache slot, only the uncached ids (a few percent) are
        deduplicated and staged, and a count per row of ``cache_weight`` deduplicates the rest. The distinct
        ids reach :meth:`update_state` as the rows they read, in row order: cached ids by slot, then the
        uncached ones, sorted (the order of their staging rows, as :meth:`_rows` stages them)."""
        hit, slot = self._cached(ids)
        c = self.num_cache_rows
        miss_at = torch.nonzero(~hit).squeeze(1)
        missed, miss_rank = torch.unique(ids.index_select(0, miss_at), return_inverse=True)
        start = c + self._reserve(len(missed))
        with torch.no_grad():
            self.cache_weight[start:start + len(missed)] = self.dequantized(missed)
        row = slot.scatter(0, miss_at, miss_rank + start)  # each id's row of cache_weight
        counts = torch.bincount(row, minlength=self.cache_weight.shape[0])
        rank = torch.cumsum(counts > 0, 0)  # rows read up to each row
        compact = rank.index_select(0, row).sub_(1)  # each id's rank among the distinct rows read
        used = row.new_empty(int(rank[-1])).scatter_(0, compact, row)  # the distinct rows, in row order
        unique = ids.new_empty(len(used)).scatter_(0, compact, ids)  # the id each of them holds
        used_hit = used < c
        self._find_memo = (unique, self._index_version, used_hit, torch.where(used_hit, used, 0))
        self._pending.append((unique, counts.index_select(0, used), missed, start))
        return _Gather.apply(F.embedding(used, self.cache_weight, sparse=True), compact)

    def lookup_unique(self, unique: Tensor, counts: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and distributed_world() > 1:
            return self._rows_all_ranks(unique, counts)
        return self._rows(unique, counts)  # (u, D)

    def _rows_all_ranks(self, unique: Tensor, counts: Tensor) -> Tensor:
        """Data-parallel training: stage the union of every rank's ids, in the same order on every rank.

        The staging rows then mean the same ids on every rank, so their gradients can be averaged like
        any parameter's, and :meth:`update_state` receives the same (ids, counts, missed, values) on
        every rank: cache, sketch, counters and codes stay identical (the stochastic rounding draws
        from the torch RNG, which every rank seeds alike and calls alike).
        """
        everyone, all_counts = gather_across_ranks(unique, counts)
        union, inv = torch.unique(everyone, return_inverse=True)
        union_counts = torch.zeros_like(union).index_add_(0, inv, all_counts)
        rows = self._rows(union, union_counts)  # (U, D)
        return rows[torch.searchsorted(union, unique)]  # (u, D): this rank's ids

    # ------------------------------------------------------------------ training
    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.cache_weight]

    # ------------------------------------------------------------------ optimizer state follows the row
    def _slot_state(self, param: nn.Parameter) -> tuple[dict[str, Any], dict[str, float]]:
        """:meth:`row_optimizer_state` of ``param``, empty when ``optimizer_state`` is ``slot``."""
        if self.optimizer_state == "slot":
            return {}, {}
        return self.row_optimizer_state(param)

    def _store(self, key: str, init: float) -> Tensor:
        """Per-row store of optimizer state ``key``, created at ``init`` on first use."""
        name = _STORE + key
        buf = getattr(self, name, None)
        if buf is None:
            shape = (self.num_embeddings,) if self.optimizer_state == "row" else (self.num_embeddings, self.embedding_dim)
            buf = torch.full(shape, init, device=self.codes.device)
            self.register_buffer(name, buf)
        return buf

    def _to_store(self, x: Tensor) -> Tensor:
        return x.mean(dim=1) if self.optimizer_state == "row" else x

    def _from_store(self, x: Tensor) -> Tensor:
        return x[:, None].expand(-1, self.embedding_dim) if self.optimizer_state == "row" else x

    def before_optimizer_step(self) -> None:
        """Load the staged rows' optimizer state into the optimizer's state of the staging rows."""
        if not self._pending:
            return
        state, inits = self._slot_state(self.cache_weight)
        c = self.num_cache_rows
        with torch.no_grad():
            for key, init in inits.items():
                if state[key].shape != self.cache_weight.shape:  # the workspace grew; keep the cache's part
                    grown = state[key].new_zeros(self.cache_weight.shape)
                    grown[:c] = state[key][:c]
                    state[key] = grown
                store = self._store(key, init)
                for _, _, missed, start in self._pending:
                    state[key][start:start + len(missed)] = self._from_store(store[missed])

    def after_optimizer_step(self) -> None:
        if not self._pending:
            return
        with torch.no_grad():
            # one forward: its ids tensor itself, whose cache lookup _cached kept
            ids = self._pending[0][0] if len(self._pending) == 1 else torch.cat([p[0] for p in self._pending])
            counts = torch.cat([p[1] for p in self._pending])
            missed = torch.cat([p[2] for p in self._pending])
            c = self.num_cache_rows
            values = self.cache_weight.detach()[c:c + self._staged]
            state, inits = self._slot_state(self.cache_weight)
            states = {k: state[k][c:c + self._staged] for k in inits}
            if len(self._pending) > 1:  # several forwards in one step: merge counts and updates
                ids, inv = torch.unique(ids, return_inverse=True)
                counts = torch.zeros_like(ids).index_add_(0, inv, counts)
                missed, inv = torch.unique(missed, return_inverse=True)
                base = self.dequantized(missed)
                values = base + torch.zeros_like(base).index_add_(0, inv, values - base[inv])
                states = {k: v.new_zeros(len(missed), v.shape[1]).index_copy_(0, inv, v) for k, v in states.items()}
            self._pending.clear()
            self._staged = 0
            self.update_state(ids, counts, missed, values, {k: (inits[k], v) for k, v in states.items()})

    @torch.no_grad()
    def update_state(self, ids: Tensor, counts: Tensor, missed: Tensor, values: Tensor,
                     states: dict[str, tuple[float, Tensor]] | None = None) -> None:
        """Apply one step: ``ids`` distinct ids used with ``counts``, the uncached among them in increasing
        order (the cached ones in any); ``missed`` (sorted unique) are the uncached ids whose updated float
        rows are ``values`` and whose optimizer state ``key`` is ``states[key] = (initial value, (m, D)
        tensor)``. Identical inputs give identical state (a distributed run all-gathers them first)."""
        states = states or {}
        stores = {k: self._store(k, init) for k, (init, _) in states.items()}
        cache_state, inits = self._slot_state(self.cache_weight)
        stores.update({k: self._store(k, init) for k, init in inits.items() if k not in stores})
        n, c = self.num_embeddings, self.num_cache_rows
        hit, _ = self._cached(ids)
        # one add for the step counter, hit lookups and lookups (each tensor op costs ~10 us on a CPU)
        self.stats[:3] += torch.stack([counts.new_ones(()), (counts * hit).sum(), counts.sum()])
        step = self.stats[0].clone()
        new_ids, new_keys = ids[~hit], None
        if c:
            if self.policy == "lru":
                self.cache_keys[torch.searchsorted(self.cache_ids, ids[hit])] = step
                new_keys = step.expand(len(new_ids))
            else:
                self._sketch_add(ids, counts)
                est = self._estimate(torch.cat([self.cache_ids, new_ids]))  # one hash pass for both
                self.cache_keys.copy_(torch.where(self.cache_ids < n, est[:c], -1))
                new_keys = est[c:]
        freed, admitted = self._admit(new_ids, new_keys) if c and len(new_ids) else (None, None)
        # rows to write back in low precision (stochastic rounding): evicted cache rows and staged rows
        # that stay out, quantised in one call
        back_ids, back_rows = [missed], [values]
        if admitted is not None and len(admitted):
            slots = self.cache_slots[freed]
            evicted = self.cache_ids[freed]
            real = evicted < n
            evicted, evicted_slots = evicted[real], slots[real]
            at, found = _locate(missed, admitted)
            rows = self.dequantized(admitted)
            if len(missed):
                rows = torch.where(found[:, None], values[at], rows)
            evicted_rows = self.cache_weight[evicted_slots]
            self.cache_weight[slots] = rows
            for key, store in stores.items():  # the evicted rows' state goes to the store, the admitted's in
                if key in cache_state:
                    slot_state = cache_state[key]
                    store[evicted] = self._to_store(slot_state[evicted_slots])
                    moved_in = self._from_store(store[admitted])
                    if key in states and len(missed):
                        moved_in = torch.where(found[:, None], states[key][1][at], moved_in)
                    slot_state[slots] = moved_in
            out = ~_isin_sorted(missed, admitted)
            back_ids, back_rows = [evicted, missed[out]], [evicted_rows, values[out]]
            states = {k: (init, v[out]) for k, (init, v) in states.items()}
            self._replace(freed, admitted, new_keys[_locate(new_ids, admitted)[0]])
        back = torch.cat(back_ids)
        if len(back):
            previous = self._unmarked(self.codes.index_select(0, back)) if self.write_back == "keep-grid" else None
            self.codes[back] = quantize_rows(torch.cat(back_rows), self.bits, stochastic=True, previous=previous)
            stays_out = back_ids[-1]
            for key, (_, v) in states.items():
                stores[key][stays_out] = self._to_store(v)

    def _admit(self, new_ids: Tensor, new_keys: Tensor) -> tuple[Tensor, Tensor]:
        """(sorted-index positions to free, ids to admit): the C best of cache ∪ newcomers stay.

        Only cached entries no stronger than the k-th weakest (k = #newcomers) can lose: any stronger
        one is beaten by at most C - 1 candidates. So only those and the newcomers are sorted.
        """
        keys = self.cache_keys
        k = min(len(new_ids), self.num_cache_rows)
        weak = (keys <= torch.kthvalue(keys, k).values).nonzero().squeeze(1)  # positions, id order
        cand = torch.cat([keys[weak], new_keys])
        # stable sort by key descending: ties keep cached-before-new and id order
        order = torch.sort(-cand, stable=True).indices
        win = torch.zeros(len(cand), dtype=torch.bool, device=cand.device)
        win[order[:len(weak)]] = True
        return weak[~win[:len(weak)]], new_ids[win[len(weak):]]

    def _replace(self, freed: Tensor, admitted: Tensor, keys: Tensor) -> None:
        """Swap entries at sorted positions ``freed`` for ``admitted`` ids (sorted), keeping id order."""
        self._index_version += 1
        c, dev = self.num_cache_rows, freed.device
        keep = torch.ones(c, dtype=torch.bool, device=dev)
        keep[freed] = False
        kept = keep.nonzero().squeeze(1)  # positions of the staying entries, in id order
        slots = self.cache_slots.index_select(0, freed)
        # merge two sorted, disjoint id lists: an admitted id lands after the kept ids below it and the
        # admitted ids before it; the kept entries fill the other positions in order
        below = torch.searchsorted(self.cache_ids.index_select(0, kept), admitted)
        at_a = torch.arange(len(admitted), device=dev) + below
        taken = torch.zeros(c, dtype=torch.bool, device=dev)
        taken[at_a] = True
        at_k = (~taken).nonzero().squeeze(1)
        for buf, new in ((self.cache_ids, admitted), (self.cache_slots, slots), (self.cache_keys, keys)):
            buf.index_copy_(0, at_k, buf.index_select(0, kept))
            buf.index_copy_(0, at_a, new)
        self._mark(admitted, slots)

    def _hashes(self, ids: Tensor) -> Tensor:
        """Sketch column of each id in each row: (depth, n). Rows 2j and 2j+1 take the low 31 and the
        high 32 bits of one ``hash64(id, seed=j)``, so a depth-2 sketch hashes each id once."""
        width, depth = self.sketch.shape[1], self.sketch.shape[0]
        cols = []
        for r in range(0, depth, 2):
            h = hash64(ids, seed=r // 2)
            cols.append((h & 0x7FFFFFFF) % width)
            if r + 1 < depth:
                cols.append((h >> 31) % width)
        return torch.stack(cols)

    def _native(self) -> bool:
        return self.sketch.device.type == "cpu" and self.sketch.numel() > 0 and native.library() is not None

    def _sketch_add(self, ids: Tensor, counts: Tensor) -> None:
        if self._native():  # the same counters, compiled (native.py)
            torch.ops.embcompress.cms_add(self.sketch, ids, counts)
        else:
            self.sketch.scatter_add_(1, self._hashes(ids), counts.to(torch.int32).expand(self.sketch.shape[0], -1))
        self.stats[3] += counts.sum()
        if self.stats[3] >= self.sketch_reset * self.sketch.shape[1]:
            self.sketch.div_(2, rounding_mode="floor")
            self.stats[3] = 0

    def _estimate(self, ids: Tensor) -> Tensor:
        if self._native():
            return torch.ops.embcompress.cms_estimate(self.sketch, ids)
        return self.sketch.gather(1, self._hashes(ids)).min(dim=0).values.long()

    def hit_rate(self) -> float:
        """Share of training lookups served by the cache since construction (or the last reset)."""
        return float(self.stats[1]) / max(int(self.stats[2]), 1)

    def reset_stats(self) -> None:
        self.stats[1:3] = 0

    def training_stats(self) -> dict[str, float]:
        """``cache_hit_rate``: share of the training lookups since the previous call served by the cache."""
        hits, lookups = self._since_last_call("cache", self.stats[1:3])
        return {"cache_hit_rate": hits / lookups} if lookups else {}

    # ------------------------------------------------------------------ state_dict: staging is workspace
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination[prefix + "cache_weight"]
        destination[prefix + "cache_weight"] = w[:self.num_cache_rows]  # the cache; not the workspace

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "cache_weight"
        if key in state_dict and state_dict[key].shape[0] == self.num_cache_rows:
            workspace = self.cache_weight.detach()[self.num_cache_rows:]
            state_dict[key] = torch.cat([state_dict[key].to(workspace.device), workspace])
        self._index_version += 1
        for name, value in state_dict.items():  # per-row optimizer state is created on first use
            if name.startswith(prefix + _STORE) and "." not in name[len(prefix):] and \
                    getattr(self, name[len(prefix):], None) is None:
                self.register_buffer(name[len(prefix):], torch.empty_like(value, device=self.codes.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        cached = self.cache_ids < self.num_embeddings
        self._mark(self.cache_ids[cached], self.cache_slots[cached])  # rows saved without their markers

    def memory_bytes(self) -> int:
        """Codes, scales, biases, cache, cache index, sketch and counters; not the optimizer-state store."""
        return sum(tensor_bytes(t) for k, t in self.state_dict().items() if _STORE not in k)

    # ------------------------------------------------------------------ budget
    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        n = sum(int(s) for s in field_sizes)
        sizes = [table_bytes(n, embedding_dim, b, c, *_policy(options))
                 for b in _precisions(options)
                 for c in _cache_choices(n, b, options)]
        return min(sizes), max(sizes)

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "MPCacheEmbeddingBag":
        """Highest precision whose default (or given) cache fits, then a cache that fills the budget
        unless ``cache_rows`` / ``cache_fraction`` fix it."""
        n = sum(int(s) for s in field_sizes)
        policy = _policy(options)
        fixed = options.get("cache_rows") is not None or options.get("cache_fraction") is not None
        bits = _precisions(options)[-1]
        for b in _precisions(options):
            c = _cache_rows(n, b, options.get("cache_rows"), options.get("cache_fraction"))
            if table_bytes(n, embedding_dim, b, c, *policy) <= budget_bytes:
                bits = b
                break
        opts = {k: v for k, v in options.items() if k not in ("precision", "cache_fraction", "cache_rows")}
        if fixed:
            rows = _cache_rows(n, bits, options.get("cache_rows"), options.get("cache_fraction"))
        else:
            spare = budget_bytes - table_bytes(n, embedding_dim, bits, 0, *policy)
            rows = max(0, min(n, spare // cache_row_bytes(embedding_dim, *policy)))
        precision = {v: k for k, v in PRECISIONS.items()}[bits]
        return cls(field_sizes, embedding_dim, precision=precision, cache_rows=rows, **opts)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, precision={self.precision}, cache_rows={self.num_cache_rows}, "
                f"policy={self.policy}")

    def inference_form(self) -> "MPCacheInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return MPCacheInference(self)


def _cache_rows(n: int, bits: int, cache_rows: int | None, cache_fraction: float | None) -> int:
    if cache_rows is not None:
        return max(0, min(n, int(cache_rows)))
    frac = DEFAULT_CACHE_FRACTION[bits] if cache_fraction is None else float(cache_fraction)
    if not 0 <= frac <= 1 or math.isnan(frac):
        raise ValueError(f"cache_fraction must lie in [0, 1], got {cache_fraction}")
    return min(n, int(round(frac * n)))


def _precisions(options: dict[str, Any]) -> list[int]:
    """Precisions to consider, best first: 'auto' (the default for budgets) tries INT8 then INT4."""
    p = options.get("precision", "auto")
    if p == "auto":
        return [8, 4]
    if p not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {p!r}")
    return [PRECISIONS[p]]


def _policy(options: dict[str, Any]) -> tuple[str, int, int]:
    return (options.get("policy", "lfu"), int(options.get("sketch_depth", 2)),
            int(options.get("sketch_width", DEFAULT_SKETCH_WIDTH)))


def _cache_choices(n: int, bits: int, options: dict[str, Any]) -> list[int]:
    if options.get("cache_rows") is not None or options.get("cache_fraction") is not None:
        return [_cache_rows(n, bits, options.get("cache_rows"), options.get("cache_fraction"))]
    return [0, n]


def _locate(sorted_ids: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """(index in ``sorted_ids``, found) of each query id."""
    if len(sorted_ids) == 0:
        return torch.zeros_like(query), torch.zeros_like(query, dtype=torch.bool)
    at = torch.searchsorted(sorted_ids, query).clamp_(max=len(sorted_ids) - 1)
    return at, sorted_ids.index_select(0, at) == query


def _isin_sorted(ids: Tensor, sorted_query: Tensor, positions: bool = False) -> Any:
    """Mask of ``ids`` found in ``sorted_query``; with ``positions``, (mask, index in it)."""
    at, found = _locate(sorted_query, ids)
    return (found, at) if positions else found


_kernel: dict[str, Any] = {}  # the lookup op's torch.library registration, kept alive
_NO_OFFSETS = torch.zeros(1, dtype=torch.int64)


def lookup_op() -> Callable[..., Tensor] | None:
    """``mpcache_lookup`` (``mpcache_native.cpp``, built on first use by :func:`native.load`) as
    :func:`native.op` gives it: ``torch.ops.embcompress.mpcache_lookup`` while tracing, the function it
    dispatches to in eager mode; None where it is turned off (``EMBCOMPRESS_NATIVE=0``) or cannot be built.

    ``mpcache_lookup(codes, cache, ids, offsets, weights, dim, bits, marker_byte, slot_at, slot_bytes,
    mean)``: each id's cache row when its stored row is marked (``slot_bytes`` > 0), else its stored row
    decoded; pooled into the bags that ``offsets`` starts (None: one id per bag), times ``weights``
    (optional), divided by the bag length when ``mean``. (bags, dim) float32."""
    return native.op("mpcache_lookup") if _library() is not None else None


def _library() -> ctypes.CDLL | None:
    """``mpcache_native.cpp`` built and loaded (its lookup op registered), or None (turned off, no compiler)."""
    return native.loaded(Path(__file__).with_name("mpcache_native.cpp"), _declare_kernels)


def _declare_kernels(lib: ctypes.CDLL) -> None:
    _register_lookup(lib)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mpcache_accumulate.argtypes = [p, i64, i64, p, p, i64]
    lib.mpcache_accumulate.restype = None


def _accumulate(grad: Tensor, index: Tensor, rows: int) -> Tensor:
    """(rows, D) sums of ``grad``'s rows by ``index``: ``zeros.index_add_(0, index, grad)``, each row's
    adds in the same order so with the same rounding, in one compiled pass on the CPU (PyTorch's
    index_add_ expands the index and sorts it: ~10x slower at a step's 50k ids)."""
    out = grad.new_zeros(rows, grad.shape[1])
    lib = _library() if grad.device.type == "cpu" and grad.dtype == torch.float32 else None
    if lib is None or index.dtype != torch.int64:
        return out.index_add_(0, index, grad)
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    index = index.contiguous()
    lib.mpcache_accumulate(out.data_ptr(), grad.shape[1], index.numel(), index.data_ptr(), grad.data_ptr(),
                           grad.stride(0))
    return out


class _Gather(torch.autograd.Function):
    """``rows.index_select(0, index)`` whose backward sums by :func:`_accumulate` (the rows' gradient
    as index_select's backward gives it, bit for bit)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return _accumulate(grad, index, ctx.rows), None


_LOOKUP_SCHEMA = ("mpcache_lookup(Tensor codes, Tensor cache, Tensor ids, Tensor? offsets, Tensor? weights, int dim, "
                  "int bits, int marker_byte, int slot_at, int slot_bytes, bool mean) -> Tensor")


def _register_lookup(lib: ctypes.CDLL) -> None:
    """Declare the C function and register it as a CPU op with a shape function (torch.library's schema
    API, as native.py's ops: a ``custom_op`` call costs ~20 us more)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mpcache_lookup.argtypes = [p, i64, i64, i64, i64, p, i64, i64, i64, i32, i64, p, i64, p, p, i32, p]
    lib.mpcache_lookup.restype = i64

    def mpcache_lookup(codes: Tensor, cache: Tensor, ids: Tensor, offsets: Tensor | None, weights: Tensor | None,
                       dim: int, bits: int, marker_byte: int, slot_at: int, slot_bytes: int, mean: bool) -> Tensor:
        if codes.dtype != torch.uint8 or cache.dtype != torch.float32 or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("mpcache_lookup: codes uint8, cache float32, ids int32 or int64")
        if row_bytes(bits, dim) != codes.shape[1] or cache.shape[1] != dim:
            raise ValueError(f"mpcache_lookup: rows of {codes.shape[1]} bytes and a cache of width "
                             f"{cache.shape[1]} do not hold {bits}-bit rows of {dim}")
        ids, codes, cache = ids.contiguous(), codes.contiguous(), cache.contiguous()
        offsets = None if offsets is None else offsets.long().contiguous()
        weights = None if weights is None else weights.float().contiguous()
        if weights is not None and weights.numel() != ids.numel():
            raise ValueError(f"mpcache_lookup: {weights.numel()} weights for {ids.numel()} ids")
        bags = ids.numel() if offsets is None else offsets.numel()
        out = torch.empty(bags, dim)
        bad = lib.mpcache_lookup(codes.data_ptr(), codes.shape[0], codes.shape[1], dim, bits, cache.data_ptr(),
                                 marker_byte, slot_at, slot_bytes, ids.element_size(), ids.numel(), ids.data_ptr(),
                                 bags, None if offsets is None else offsets.data_ptr(),
                                 None if weights is None else weights.data_ptr(), int(mean), out.data_ptr())
        if bad == -2:
            raise ValueError("mpcache_lookup: offsets must be non-decreasing within [0, number of ids]")
        if bad >= 0:
            raise IndexError(f"mpcache_lookup: id {int(ids[bad])} is outside [0, {codes.shape[0]})")
        return out

    def fake(codes, cache, ids, offsets, weights, dim, bits, marker_byte, slot_at, slot_bytes, mean):  # type: ignore[no-untyped-def]
        return cache.new_empty(ids.numel() if offsets is None else offsets.numel(), dim)

    native.KERNELS["mpcache_lookup"] = mpcache_lookup
    if hasattr(torch.ops.embcompress, "mpcache_lookup"):
        return
    reg = torch.library.Library("embcompress", "FRAGMENT")
    _kernel["library"] = reg  # kept alive: a dropped Library takes its op with it
    reg.define(_LOOKUP_SCHEMA)
    reg.impl("mpcache_lookup", mpcache_lookup, "CPU")
    torch.library.register_fake("embcompress::mpcache_lookup", fake, lib=reg)


class MPCacheInference(nn.Module):
    """``mpcache`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F) -> rows (B, F, D).

    Rows stay in low precision: each lookup gathers its codes, scale and bias and decodes only those
    (``q * scale + bias``; INT4 codes unpacked from their nibbles), as :meth:`MPCacheEmbeddingBag.dequantized`.
    The cache is frozen into its held ids, sorted, and their float rows: a hit reads its float row."""

    def __init__(self, table: "MPCacheEmbeddingBag") -> None:
        super().__init__()
        self.bits, self.dim = table.bits, table.embedding_dim
        width = self.dim if self.bits == 8 else (self.dim + 1) // 2
        codes = table.codes.detach()
        self.register_buffer("codes", codes[:, :width].clone())  # (N, width) uint8
        sb = codes[:, width:].contiguous().view(torch.float32 if self.bits == 8 else torch.float16)  # (N, 2)
        self.register_buffer("scale", sb[:, 0].clone())
        self.register_buffer("bias", sb[:, 1].clone())
        held = torch.nonzero(table.cache_ids < table.num_embeddings).squeeze(1)  # empty entries hold id N
        ids = table.cache_ids[held]
        rows = table.cache_weight.detach()[table.cache_slots[held]]
        if not len(held):  # one entry that no id matches, so the search needs no branch
            ids, rows = torch.full((1,), -1), rows.new_zeros(1, self.dim)
        self.register_buffer("cache_ids", ids.clone())
        self.register_buffer("cache_rows", rows.clone())

    def forward(self, ids: Tensor) -> Tensor:
        codes = self.codes[ids]  # (B, F, width) uint8: only the looked-up rows are decoded
        if self.bits == 4:
            codes = unpack_int4(codes.reshape(-1, codes.shape[-1]), self.dim).view(*ids.shape, self.dim)
        rows = codes.float() * self.scale[ids].float().unsqueeze(-1) + self.bias[ids].float().unsqueeze(-1)
        pos = torch.searchsorted(self.cache_ids, ids).clamp_(max=self.cache_ids.numel() - 1)
        hit = self.cache_ids[pos] == ids
        return torch.where(hit.unsqueeze(-1), self.cache_rows[pos], rows)
