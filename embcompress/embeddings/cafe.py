"""``cafe``: CAFE (SIGMOD 2024). Hot features get their own row; the rest share per-field hashed rows.

One :class:`~embcompress.embeddings.hotsketch.HotSketch` over the global id space decides which features
are hot (one sketch for all fields: the CAFE paper found per-field sketches worse). ``weight`` holds the
per-field hash rows (``hash``'s layout) and then the hot rows; a lookup is one ``embedding_bag`` over it,
so the only extra cost over ``hash`` is the sketch query.

Training: forward only queries the sketch; train-mode forwards record their lookups and the norm of
each lookup's embedding gradient (a hook on the output), with no compaction and no read back, so the
forward and backward wait on no host sync. ``before_optimizer_step`` (``embcompress.attach``)
normalises the norms per field and batch to mean 1 (``importance="frequency"``: 1 per lookup), keeps
the hashed fields' lookups (one ``nonzero``; the sketch insert itself has data-dependent sizes; on the
CPU both in one compiled pass, ``cafe_native.cpp``, with the same scores; while tracing or capturing a
CUDA graph, or with ``sketch.sync_free = True``, masks and :meth:`HotSketch.insert_masked` instead, with
no host sync), inserts them into the sketch and migrates rows: a promoted feature's hot row starts as
the hashed row that served it, a demoted one goes back to its hashed row. Under data parallelism the
(ids, scores) of all ranks are gathered first, in rank order, so every rank applies the same update.
Eval forwards change nothing.

Budget: ``memory_bytes`` is the state dict. A hot row costs 4·D bytes plus its share of the sketch,
``buckets_per_row`` buckets of ``slots`` slots of 12 bytes (int32 id, float32 score, int32 row) and a
byte of free-row mask: 4·D + 25 with the defaults (half a bucket per row; 4·D + 33 with int64 ids, above
2^31 ids or with ``key_dtype="int64"``). ``hash_rate`` of the budget goes to hash rows, the rest to hot rows and sketch;
``hash_rate`` defaults to the CAFE artifact's value for the nearest compression ratio.

Selection: a feature needs a score of ``threshold`` (T = 10, about ten lookups' worth of normalised
gradient) for a hot row, so the rows fill in the first steps, and a waiting feature takes a hot feature's
row only with twice its score (``hysteresis`` 2), so those first, noisy choices are corrected without the
hot set churning. The artifact's T (up to 500) filled rows only as features earned them; both values were
chosen on validation rows: docs/zch.md, "At Criteo Kaggle's size".
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .base import FLOAT_BYTES, IndexedEmbeddingBag, uniform_rows_
from .hashing import HashInference
from .hotsketch import SLOT_BYTES, HotSketch, Located, masked_put, slot_bytes
from .ops import (allocate_rows, bag_of_lookups, field_hash_rows, field_hash_rows_few, field_of, field_starts,
                  mean_weights)
from .options import Option, hash_seed_option, mode_option, sparse_option
from .registry import register
from .sync import distributed_world, gather_across_ranks

log = logging.getLogger(__name__)

# The CAFE artifact's share of the budget for hash rows by compression ratio CR = 1 / ratio.
REFERENCE_CR = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)
REFERENCE_HASH_RATE = (0.7, 0.5, 0.5, 0.5, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1)
_FIELD_BUFFERS = 4  # starts, sizes, rows, row_base: int64 each
_ROUNDING_SLACK = SLOT_BYTES * 4  # a bucket of int64 slots: room for round(buckets_per_row * hot rows)
_MAX_PENDING = 64  # forwards recorded without an optimizer step before we give up on them
_FEW_IDS = 32  # hashed_row computes up to this many ids in Python on the CPU

#: half a 4-slot bucket per hot row and no pressure decay: chosen on validation rows (docs/zch.md)
BUCKETS_PER_ROW = 0.5
PRESSURE_DECAY = False
THRESHOLD = 10.0  # score a feature needs for a hot row (module doc, "Selection")
HYSTERESIS = 2.0  # how many times a hot feature's score a waiting feature needs to take its row


def _kernel() -> ctypes.CDLL | None:
    """``cafe_native.cpp`` built and loaded (:func:`native.loaded`), or None (turned off, or no compiler)."""
    return native.loaded(Path(__file__).with_name("cafe_native.cpp"), _declare_kernel)


def _declare_kernel(lib: ctypes.CDLL) -> None:
    lib.cafe_scored_lookups.argtypes = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 8
    lib.cafe_scored_lookups.restype = ctypes.c_int64


def sketch_key_dtype(field_sizes: Sequence[int], key_dtype: str = "auto") -> torch.dtype:
    """The sketch's id dtype: ``"auto"`` is int32 when every global id fits (below 2^31), else int64."""
    if key_dtype not in ("auto", "int32", "int64"):
        raise ValueError(f"key_dtype must be 'auto', 'int32' or 'int64', got {key_dtype!r}")
    total = sum(int(n) for n in field_sizes)
    fits = total <= 2**31
    if key_dtype == "int32" and not fits:
        raise ValueError(f"key_dtype='int32' cannot hold the {total} ids of these fields")
    return torch.int32 if key_dtype == "int32" or (key_dtype == "auto" and fits) else torch.int64


def sketch_buckets(buckets_per_row: float, hot_rows: int) -> int:
    """Buckets of the sketch of a table with ``hot_rows`` hot rows (what the constructor builds and the
    planner counts)."""
    return max(1, int(round(buckets_per_row * hot_rows)))


def reference_hash_rate(ratio: float) -> float:
    """The artifact's ``hash_rate`` for the CR nearest (in log scale) to ``1 / ratio``."""
    cr = 1.0 / ratio
    i = min(range(len(REFERENCE_CR)), key=lambda j: abs(math.log(REFERENCE_CR[j] / cr)))
    return float(REFERENCE_HASH_RATE[i])


def _joined(parts: list[Tensor]) -> Tensor:
    """The parts one after the other: the usual step has one forward, and a cat would copy it."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class _Pending:
    """Every lookup of one training forward, waiting for its gradient norm; the hashed fields' lookups
    are picked out at the optimizer step, so the forward adds no compaction of its own."""

    ids: Tensor  # (n,) global ids
    field: Tensor  # (n,) field index
    located: Located  # where the forward found them in the sketch
    rows: Tensor  # (n,) row of ``weight`` that served each (training_stats counts the hot ones)
    bag: Tensor | None = None  # (n,) bag of each lookup; None: lookup i is bag i
    scale: Tensor | None = None  # (n,) |per-sample weight| (or 1/bag length in mean mode)
    norms: Tensor | None = None  # (n,) set by the backward hook

    def capture(self, grad: Tensor) -> None:
        norms = torch.linalg.vector_norm(grad.detach() if grad.requires_grad else grad, dim=1)
        if self.bag is not None:
            norms = norms.index_select(0, self.bag)
        self.norms = norms if self.scale is None else norms * self.scale


@register("cafe")
class CafeEmbeddingBag(IndexedEmbeddingBag):
    """CAFE table. Options: ``threshold`` (10), ``hash_rate``, ``decay`` (0.98), ``importance``
    (``"gradient"`` | ``"frequency"``), ``slots`` (4), ``buckets_per_row`` (0.5), ``decay_mass`` (10),
    ``pressure_decay`` (False), ``preempt`` (True) and ``hysteresis`` (2; :mod:`.hotsketch`
    explains the three), ``key_dtype``
    (``"auto"`` | ``"int32"`` | ``"int64"``: the sketch's ids, module doc "Budget") and
    ``optimizer_state`` (what a hot row handed to a new feature starts with, under a stateful optimizer
    bound by :func:`~embcompress.attach`: ``"slot"`` keeps the row's state, ``"copy"`` takes that of
    the hashed row that served the feature, ``"reset"`` the optimizer's initial state; the last two
    also drop the gradient the row's previous feature left in that step)."""

    OPTIONS = (
        Option("threshold", "float", THRESHOLD, "score a feature needs for a hot row (T)", low=0, low_open=True),
        Option("hash_rate", "float", None, "share of the budget that goes to the per-field hash rows; the rest "
               "buys hot rows and their sketch", low=0, high=1, low_open=True, high_open=True,
               auto="the CAFE artifact's value for the nearest compression ratio"),
        Option("decay", "float", 0.98, "factor every sketch score is multiplied by at each decay", low=0, high=1,
               low_open=True),
        Option("decay_mass", "float", 10.0, "decay once the score mass inserted since the last decay exceeds "
               "decay_mass x buckets x T", low=0, low_open=True),
        Option("pressure_decay", "bool", PRESSURE_DECAY, "also decay when more features reach T than hot rows are free"),
        Option("preempt", "bool", True, "a feature waiting for a hot row takes the row of a hot feature it outscores"),
        Option("hysteresis", "float", HYSTERESIS, "how many times a hot feature's score a waiting feature needs "
               "to take its row", low=1),
        Option("importance", "str", "gradient", "what a lookup adds to its feature's score: its gradient norm "
               "(normalised per field and batch) or 1", choices=("gradient", "frequency")),
        Option("slots", "int", 4, "sketch slots per bucket", low=1),
        Option("buckets_per_row", "float", BUCKETS_PER_ROW, "sketch buckets per hot row", low=0, low_open=True),
        Option("key_dtype", "str", "auto", "id type of the sketch; auto: int32 when every id fits, else int64 "
               "(int64 reproduces tables built before 4-byte ids and loads their checkpoints)",
               choices=("auto", "int32", "int64")),
        Option("optimizer_state", "str", "slot", "what a hot row handed to a new feature starts with: the row's "
               "optimizer state (slot), the state of the hashed row that served the feature (copy), or the "
               "optimizer's initial state (reset)", choices=("slot", "copy", "reset")),
        hash_seed_option(), mode_option(), sparse_option(),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rows_per_field: Sequence[int],
                 num_hot_rows: int, threshold: float = THRESHOLD, decay: float = 0.98, importance: str = "gradient",
                 slots: int = 4, buckets_per_row: float = BUCKETS_PER_ROW, decay_mass: float = 10.0,
                 pressure_decay: bool = PRESSURE_DECAY, preempt: bool = True, hysteresis: float | None = HYSTERESIS,
                 optimizer_state: str = "slot", key_dtype: str = "auto", extra_rows: int = 0, mode: str = "sum",
                 seed: int = 0, sparse: bool = True) -> None:
        rows = [min(int(r), int(n)) for r, n in zip(rows_per_field, field_sizes)]
        if len(rows) != len(field_sizes) or min(rows) < 1 or num_hot_rows < 1:
            raise ValueError("rows_per_field needs one positive count per field, and num_hot_rows >= 1")
        if importance not in ("gradient", "frequency"):
            raise ValueError(f"importance must be 'gradient' or 'frequency', got {importance!r}")
        if optimizer_state not in ("slot", "copy", "reset"):
            raise ValueError(f"optimizer_state must be 'slot', 'copy' or 'reset', got {optimizer_state!r}")
        self.num_hash_rows = sum(rows) + int(extra_rows)  # extra rows: cafe-ml's second hash table
        super().__init__(field_sizes, embedding_dim, self.num_hash_rows + int(num_hot_rows), mode, sparse)
        self.importance = importance
        self.optimizer_state = optimizer_state
        self.seed = int(seed)
        self.register_buffer("starts", field_starts(self.field_sizes))
        self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
        self.register_buffer("row_base", field_starts(rows))
        # derived, so not state: fields served whole never need a hot row
        self.register_buffer("field_hashed", self.rows < self.sizes, persistent=False)
        buckets = sketch_buckets(buckets_per_row, num_hot_rows)
        self.sketch = HotSketch(buckets, int(num_hot_rows), threshold, slots=slots, decay=decay,
                                decay_mass=decay_mass, pressure_decay=pressure_decay, preempt=preempt,
                                hysteresis=hysteresis, key_dtype=sketch_key_dtype(field_sizes, key_dtype))
        uniform_rows_(self.weight[: sum(rows)], rows)
        with torch.no_grad():
            self.weight[sum(rows):].zero_()  # extra and hot rows: set when used
        self._pending: list[_Pending] = []
        self._warned = False
        # training_stats counters (not state): hashed-field lookups, how many of them hot rows served
        # (a tensor, so a step never reads back), hot-set changes
        self._stat_lookups, self._stat_hot, self._stat_promoted, self._stat_demoted = 0, None, 0, 0
        self._stat_rows: list[Tensor] = []  # serving rows of recent steps, counted in bulk (_count_hot)
        self._all_hashed = bool(self.field_hashed.all())  # no whole field: every lookup goes to the sketch

    @property
    def num_hot_rows(self) -> int:
        return self.sketch.num_hot_rows

    # ------------------------------------------------------------------ routing ids to rows
    def hashed_row(self, ids: Tensor, field: Tensor | None = None) -> Tensor:
        """Row of the per-field hash table serving each id (whole fields: the id's own row)."""
        if field is None and ids.numel() <= _FEW_IDS and ids.device.type == "cpu" and not torch.compiler.is_compiling():
            # a step's promoted features: Python ints beat ~20 small tensor ops
            rows = field_hash_rows_few(ids.reshape(-1).tolist(), *self._field_lists(), self.seed)
            return torch.tensor(rows, dtype=torch.int64).view(ids.shape)
        f = field_of(ids, self.starts) if field is None else field
        return field_hash_rows(ids, f, self.starts, self.sizes, self.rows, self.row_base, self.seed)

    def _field_lists(self) -> tuple[list[int], ...]:
        """(starts, sizes, rows, row_base) as lists, read again whenever a buffer was replaced or written."""
        buffers = (self.starts, self.sizes, self.rows, self.row_base)
        key = tuple((b.data_ptr(), b._version) for b in buffers)
        if getattr(self, "_lists_key", None) != key:
            self._lists, self._lists_key = tuple(b.tolist() for b in buffers), key
        return self._lists

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Located]:
        """(row of ``weight`` serving each id, field of each id, sketch score of each id, sketch slots)."""
        f = field_of(ids, self.starts)
        located = self.sketch.locate(ids)
        hot, score = self.sketch.query(ids, located)
        rows = torch.where(hot >= 0, hot + self.num_hash_rows, self.hashed_row(ids, f))
        return rows, f, score, located

    def row_index(self, ids: Tensor) -> Tensor:
        return self._route(ids)[0]

    # ------------------------------------------------------------------ forward
    def _pool(self, ids: Tensor, rows: Tensor, score: Tensor, field: Tensor, offsets: Tensor,
              psw: Tensor | None) -> Tensor:
        return F.embedding_bag(rows, self.weight, offsets, mode=self.mode, per_sample_weights=psw,
                               sparse=self.sparse)

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        ids, offsets, psw = self._flatten(input, offsets, per_sample_weights)
        if self.validate_ids:
            self.check_ids(ids)
        rows, field, score, located = self._route(ids)
        out = self._pool(ids, rows, score, field, offsets, psw)  # (B, D)
        if self.training and torch.is_grad_enabled() and ids.numel() > 0:
            self._record(out, ids, field, offsets, psw, located, input.dim() == 2 and input.shape[1] == 1, rows)
        return out

    def _record(self, out: Tensor, ids: Tensor, field: Tensor, offsets: Tensor, psw: Tensor | None,
                located: Located, one_per_bag: bool = False, rows: Tensor | None = None) -> None:
        if len(self._pending) >= _MAX_PENDING:
            if not self._warned:
                log.warning("%s: %d training forwards without an optimizer step; call "
                            "embcompress.attach(model, optimizer) so the sketch is updated",
                            self._label(), len(self._pending))
                self._warned = True
            self._pending.pop(0)
        if rows is None:
            rows = self._route(ids)[0]
        # only hashed fields' features hold hot rows, so this counts the hashed lookups hot rows served
        entry = _Pending(ids=ids, field=field, located=located, rows=rows)
        if self.importance == "gradient" and out.requires_grad:
            n = ids.numel()
            if not one_per_bag:  # (B, 1) input, how the models look up fields: lookup i is bag i
                entry.bag = bag_of_lookups(offsets, n)
            if psw is not None:
                entry.scale = psw.detach().abs()
            elif self.mode == "mean":
                entry.scale = mean_weights(offsets, bag_of_lookups(offsets, n), n)
            out.register_hook(entry.capture)
        self._pending.append(entry)

    # ------------------------------------------------------------------ training step
    def before_optimizer_step(self) -> None:
        """Turn the recorded lookups into importance scores and apply them (sketch + migration)."""
        pending, self._pending = self._pending, []
        if pending and self.sketch.uses_sync_free(pending[0].ids.device):
            self._step_sync_free(pending)
            return
        ids, scores, used = [], [], []
        for e in pending:
            self._stat_rows.append(e.rows)
            if self.importance == "gradient" and e.norms is None:
                # forwards whose output got no gradient carry no importance
                self._stat_lookups += int(self.field_hashed.index_select(0, e.field).sum())
                continue
            scored = self._scored_lookups(e) if self.importance == "gradient" else None
            if scored is None:
                score = None if self.importance == "frequency" else self._normalise(e.norms, e.field)
                scored = self._hashed_lookups(e, score)
            e_ids, e_score, located = scored
            self._stat_lookups += e_ids.numel()
            ids.append(e_ids)
            scores.append(e_score)
            used.append(located)
        if len(self._stat_rows) >= _MAX_PENDING:
            self._count_hot()
        if ids:
            self.apply_importance(_joined(ids), _joined(scores), Located.joined(used))

    def _step_sync_free(self, pending: list[_Pending]) -> None:
        """:meth:`before_optimizer_step` with no host sync (:meth:`HotSketch.insert_masked`): every
        recorded lookup goes to the insert, the whole fields' masked out rather than picked out, and a
        promoted feature's row is copied with :func:`masked_put`. The same state as the other paths,
        except that the sketch's float64 mass sums the step's scores with the whole fields' as 0 (last
        bits, under ``importance="gradient"`` with whole fields). Syncs remain under data parallelism
        (the gather exchanges sizes) and with ``optimizer_state`` other than ``"slot"`` (the restarted
        rows are compacted)."""
        ids, scores, keeps, used = [], [], [], []
        for e in pending:
            # counted now rather than listed for _count_hot: torch.compile guards on a list's length
            hot = (e.rows >= self.num_hash_rows).sum()
            self._stat_hot = hot if self._stat_hot is None else self._stat_hot + hot
            keep = None if self._all_hashed else self.field_hashed.index_select(0, e.field)
            hashed = e.ids.numel() if keep is None else keep.sum()
            self._stat_lookups = self._stat_lookups + hashed  # a tensor: read back by training_stats only
            if self.importance == "gradient":
                if e.norms is None:  # forwards whose output got no gradient carry no importance
                    continue
                score = self._normalise(e.norms, e.field, add_counts=True)
            else:
                score = torch.ones(e.ids.shape, device=e.ids.device)
            ids.append(e.ids)
            scores.append(score)
            keeps.append(keep)
            used.append(e.located)
        if ids:
            keep = None if self._all_hashed else _joined(keeps)  # type: ignore[arg-type]
            self._apply_sync_free(_joined(ids), _joined(scores), keep, Located.joined(used))

    @torch.no_grad()
    def _apply_sync_free(self, ids: Tensor, scores: Tensor, keep: Tensor | None, located: Located | None) -> None:
        """:meth:`apply_importance` of the entries ``keep`` (None: all) with no host sync."""
        n = ids.shape[0]
        if keep is None:
            ids, scores = gather_across_ranks(ids, scores)
        else:
            ids, scores, keep = gather_across_ranks(ids, scores, keep)
        if distributed_world() > 1 or ids.shape[0] != n:
            located = None  # other ranks' ids were never located here
        update = self.sketch.insert_masked(ids, scores, located, keep)
        promoted = update.promoted
        self._stat_promoted = self._stat_promoted + promoted.sum()
        self._stat_demoted = self._stat_demoted + update.demoted.sum()
        hot = update.promoted_rows + self.num_hash_rows
        # a feature that was not promoted takes id 0's cold row, which masked_put does not write
        cold = self.cold_embedding(torch.where(promoted, update.promoted_ids, 0))
        masked_put(self.weight, hot, cold, promoted)
        if self.optimizer_state != "slot":
            self._restart_rows(hot[promoted], self.hashed_row(update.promoted_ids[promoted]))

    def _scored_lookups(self, e: _Pending) -> tuple[Tensor, Tensor, Located] | None:
        """:meth:`_normalise` and :meth:`_hashed_lookups` in one compiled pass (``cafe_native.cpp``, the same
        scores bit for bit), where the compiled sketch serves this table on the CPU; else None."""
        norms, lib = e.norms, _kernel()
        if lib is None or norms is None or norms.device.type != "cpu" or norms.dtype != torch.float32 \
                or not self.sketch.native or torch.compiler.is_compiling():
            return None
        norms, field, ids = norms.contiguous(), e.field.contiguous(), e.ids.contiguous()
        code = e.located.code.contiguous()
        n = ids.numel()
        out_ids, out_code = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        out_scores = torch.empty(n, dtype=torch.float32)
        k = lib.cafe_scored_lookups(n, len(self.field_sizes), norms.data_ptr(), field.data_ptr(),
                                    self.field_hashed.data_ptr(), ids.data_ptr(), code.data_ptr(),
                                    out_ids.data_ptr(), out_scores.data_ptr(), out_code.data_ptr())
        return out_ids[:k], out_scores[:k], Located(None, None, None, e.located.generation, out_code[:k],
                                                    e.located.slots)

    def _hashed_lookups(self, e: _Pending, score: Tensor | None) -> tuple[Tensor, Tensor, Located]:
        """(ids, scores, sketch slots) of the lookups of hashed fields among ``e``'s, in lookup order;
        ``score`` None: 1 each. Whole fields never need a hot row, so their lookups stay out of the sketch."""
        ids, located = e.ids, e.located
        if not self._all_hashed:
            keep = torch.nonzero(self.field_hashed.index_select(0, e.field)).squeeze(1)
            ids = ids.index_select(0, keep)
            score = None if score is None else score.index_select(0, keep)
            located = located.index_select(keep)
        return ids, torch.ones(ids.shape, device=ids.device) if score is None else score, located

    def _normalise(self, norms: Tensor, field: Tensor, add_counts: bool = False) -> Tensor:
        """Per field, scale norms to mean 1; a field whose gradients are all zero counts 1 per lookup.

        Such a field's factor is count / 0 = inf and its norms are 0, so its scores come out NaN, and NaN
        becomes 1 (a field's mean needs no separate test; a NaN gradient also scores 1). ``add_counts``:
        count the lookups with ``index_add_`` on the CPU too (``bincount`` sizes its output by the data)."""
        nf, dev = len(self.field_sizes), norms.device
        if dev.type == "cpu" and not add_counts:
            count = torch.bincount(field, minlength=nf)  # exact integers, so count / total as below
        else:  # bincount reads the largest field back to the host (a CUDA sync)
            count = torch.zeros(nf, device=dev).index_add_(0, field, torch.ones_like(norms, dtype=torch.float32))
        norms = norms if norms.dtype == torch.float32 else norms.float()
        total = torch.zeros(nf, device=dev).index_add_(0, field, norms)
        return (norms * (count / total).index_select(0, field)).nan_to_num_(nan=1.0, posinf=math.inf)

    @torch.no_grad()
    def apply_importance(self, ids: Tensor, scores: Tensor, located: Located | None = None) -> None:
        """The one state update: insert (ids, scores) into the sketch, then migrate rows.

        ``located`` (the forward's sketch slots of ``ids``) saves the hash and slot search; it is used
        only while the sketch is unchanged since, and never across ranks.

        Under data parallelism every rank saw different lookups: the (ids, scores) of all ranks are
        concatenated in rank order first, so every rank applies the same update and the sketch, the
        free-row list and the migrated rows stay identical (without a process group: unchanged).
        """
        n = ids.shape[0]
        ids, scores = gather_across_ranks(ids, scores)
        if distributed_world() > 1 or ids.shape[0] != n:
            located = None  # other ranks' ids were never located here
        update = self.sketch.insert(ids, scores, located=located)
        self._stat_promoted += update.promoted_ids.numel()
        self._stat_demoted += update.demoted_ids.numel()
        if update.promoted_ids.numel():
            hot = update.promoted_rows + self.num_hash_rows
            self.weight.index_copy_(0, hot, self.cold_embedding(update.promoted_ids))
            if self.optimizer_state != "slot":
                self._restart_rows(hot, self.hashed_row(update.promoted_ids))

    def _restart_rows(self, hot: Tensor, source: Tensor) -> None:
        """Hot rows ``hot`` now serve new features: give each the optimizer state of the hashed row
        ``source`` that served its feature (``copy``) or a fresh one (``reset``), and drop the gradient
        its previous holder left for this step."""
        state, inits = self.row_optimizer_state(self.weight)
        for key, init in inits.items():
            if self.optimizer_state == "copy":
                state[key].index_copy_(0, hot, state[key].index_select(0, source))
            else:
                state[key].index_fill_(0, hot, init)
        grad = self.weight.grad
        if grad is None:
            return
        if not grad.is_sparse:
            grad.index_fill_(0, hot, 0.0)
            return
        rows = grad._indices()[0]
        keep = torch.nonzero(~torch.isin(rows, hot)).squeeze(1)
        if keep.numel() < rows.numel():
            self.weight.grad = torch.sparse_coo_tensor(grad._indices().index_select(1, keep),
                                                       grad._values().index_select(0, keep), grad.shape)

    def _count_hot(self) -> None:
        """Add the lookups that hot rows served in the recorded steps to the count (a tensor, no read back):
        one pass per ``_MAX_PENDING`` steps rather than two small ops per forward."""
        if self._stat_rows:
            hot = (torch.cat(self._stat_rows) >= self.num_hash_rows).sum()
            self._stat_hot = hot if self._stat_hot is None else self._stat_hot + hot
            self._stat_rows = []

    def training_stats(self) -> dict[str, float]:
        """``hot_share``: share of the hashed fields' training lookups that hot rows served;
        ``hot_rows_used``: share of the hot rows held now; ``promoted`` / ``demoted``: features that got
        or lost a hot row (a preemption counts once each way). All since the previous call."""
        stats: dict[str, float] = {"hot_rows_used": self.sketch.num_hot() / self.num_hot_rows,
                                   "promoted": int(self._stat_promoted), "demoted": int(self._stat_demoted)}
        lookups = int(self._stat_lookups)  # (tensors after steps without host syncs)
        if lookups:
            self._count_hot()
            hot = 0 if self._stat_hot is None else int(self._stat_hot)  # one read back per call
            stats["hot_share"] = hot / lookups
        self._stat_lookups, self._stat_hot, self._stat_promoted, self._stat_demoted = 0, None, 0, 0
        self._stat_rows = []
        return stats

    def cold_embedding(self, ids: Tensor) -> Tensor:
        """The embedding that serves ``ids`` when they are not hot (copied into a new hot row)."""
        return self.weight[self.hashed_row(ids)]

    def lookup(self, ids: Tensor) -> Tensor:
        rows = self._route(ids)[0]
        return F.embedding(rows, self.weight, sparse=self.sparse)

    # ------------------------------------------------------------------ budget
    @classmethod
    def _hot_row_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, options: dict[str, Any]) -> float:
        """A hot row's weights plus its share of the sketch: ``buckets_per_row`` buckets and a mask byte."""
        key = sketch_key_dtype(field_sizes, options.get("key_dtype", "auto"))
        sketch = options.get("buckets_per_row", BUCKETS_PER_ROW) * options.get("slots", 4) * slot_bytes(key)
        return embedding_dim * FLOAT_BYTES + sketch + 1

    @classmethod
    def _field_buffer_bytes(cls, field_sizes: Sequence[int]) -> int:
        """Bytes of the per-field int64 buffers."""
        return _FIELD_BUFFERS * 8 * len(field_sizes)

    @classmethod
    def _fixed_bytes(cls, field_sizes: Sequence[int]) -> int:
        return cls._field_buffer_bytes(field_sizes) + 8 + _ROUNDING_SLACK  # + the sketch's mass counter

    @classmethod
    def _bytes_besides_hash_rows(cls, field_sizes: Sequence[int], embedding_dim: int, hot_rows: int,
                                 options: dict[str, Any]) -> int:
        """Exact bytes of a table with ``hot_rows`` hot rows, less its hash rows (no rounding slack)."""
        key = sketch_key_dtype(field_sizes, options.get("key_dtype", "auto"))
        buckets = sketch_buckets(options.get("buckets_per_row", BUCKETS_PER_ROW), hot_rows)
        sketch = HotSketch.memory_bytes_for(buckets, hot_rows, options.get("slots", 4), key)  # with its counter
        return cls._field_buffer_bytes(field_sizes) + hot_rows * embedding_dim * FLOAT_BYTES + sketch

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        hot = cls._hot_row_bytes(field_sizes, embedding_dim, options)
        row = embedding_dim * FLOAT_BYTES
        fixed = cls._fixed_bytes(field_sizes)
        lo = fixed + len(field_sizes) * row + 2 * hot
        hi = fixed + sum(int(n) for n in field_sizes) * (row + hot)
        return int(lo), int(hi)

    @classmethod
    def _plan(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
              options: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
        """(hash rows, hot rows, constructor options) for a budget."""
        opts = dict(options)
        ratio = sum(int(n) for n in field_sizes) * embedding_dim * FLOAT_BYTES / budget_bytes
        hash_rate = float(opts.pop("hash_rate", None) or reference_hash_rate(ratio))
        hot = cls._hot_row_bytes(field_sizes, embedding_dim, opts)
        row = embedding_dim * FLOAT_BYTES
        usable = budget_bytes - cls._fixed_bytes(field_sizes)
        total = sum(int(n) for n in field_sizes)
        wanted = min(total, int(hash_rate * usable) // row)
        hash_rows = max(len(field_sizes), wanted)
        hot_rows = int((usable - hash_rows * row) // hot)
        if hot_rows < 1:
            hash_rows = (usable - int(hot) - 1) // row
            hot_rows = 1
        if wanted < len(field_sizes):
            # The reference's hash_rate assumes tables of Criteo Kaggle's size; on a budget of a few hundred
            # bytes per field the one-row-per-field minimum overrides it and few hot rows are left. The split
            # is off hash_rate anyway, so every byte that whole hot rows leave, rounding slack included, buys
            # hash rows (without them the table can fall more than 10% under the budget).
            spare = budget_bytes - cls._bytes_besides_hash_rows(field_sizes, embedding_dim, hot_rows, opts)
            hash_rows = min(total, max(hash_rows, spare // row))
            log.warning("%s: %d bytes cannot honour hash_rate=%g: the hash rows (at least one per field) take "
                        "%.0f%% of them, leaving %d hot rows. Plain 'hash' may do better: it beat cafe on a "
                        "4.3 KB table of 26 fields (docs/results.md, 'The method comparison').", getattr(cls, "name", "cafe"),
                        budget_bytes, hash_rate, 100 * hash_rows * row / budget_bytes, hot_rows)
        return hash_rows, hot_rows, opts

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "CafeEmbeddingBag":
        hash_rows, hot_rows, opts = cls._plan(field_sizes, embedding_dim, budget_bytes, options)
        table = cls(field_sizes, embedding_dim, allocate_rows(field_sizes, hash_rows), hot_rows, **opts)
        log.info("cafe: %d hash rows, %d hot rows, T=%g, %d bytes", table.num_hash_rows, hot_rows,
                 table.sketch.threshold, table.memory_bytes())
        return table

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", hash_rows={self.num_hash_rows}, hot_rows={self.num_hot_rows}, "
                f"importance={self.importance}")

    def inference_form(self) -> "CafeInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return CafeInference(self)


class CafeInference(HashInference):
    """``cafe`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field f,
    -> rows (B, F, D). The sketch is frozen into a dense lookup: the ids it holds, sorted, with the weight
    row of each hot one, so serving is a ``searchsorted`` beside the hashed row; no sketch update, no hooks."""

    def __init__(self, table: "CafeEmbeddingBag") -> None:
        super().__init__(table)  # the hashed rows: hash's layout
        keys, rows, _ = self.held(table)
        self.register_buffer("keys", keys)  # (K,) sorted ids the sketch holds
        self.register_buffer("hot_rows", rows)  # (K,) weight row of each, -1 while it is not hot

    @staticmethod
    def held(table: "CafeEmbeddingBag") -> tuple[Tensor, Tensor, Tensor]:
        """(ids the sketch holds, sorted; the weight row of each hot one, else -1; their scores). With
        none, one entry of id -1, which no id matches (ids are >= 0), so the search needs no branch."""
        sketch = table.sketch
        keys, hot, scores = sketch.keys.reshape(-1).long(), sketch.hot_row.reshape(-1).long(), sketch.scores.reshape(-1)
        held = torch.nonzero(keys >= 0).squeeze(1)
        if not len(held):
            return torch.full((1,), -1), torch.full((1,), -1), torch.zeros(1)
        order = held[torch.argsort(keys[held])]
        rows = torch.where(hot[order] >= 0, hot[order] + table.num_hash_rows, -1)
        return keys[order].clone(), rows, scores[order].clone()

    def find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(whether the sketch holds each id, its position in ``keys``)."""
        pos = torch.searchsorted(self.keys, ids).clamp_(max=self.keys.numel() - 1)
        return self.keys[pos] == ids, pos

    def hot_row(self, ids: Tensor, found: Tensor, pos: Tensor) -> Tensor:
        """Row of ``weight`` serving each id, as :meth:`CafeEmbeddingBag.row_index`."""
        hot = torch.where(found, self.hot_rows[pos], -1)
        return torch.where(hot >= 0, hot, self.hashed_row(ids))

    def forward(self, ids: Tensor) -> Tensor:
        found, pos = self.find(ids)
        return F.embedding(self.hot_row(ids, found, pos), self.weight)
