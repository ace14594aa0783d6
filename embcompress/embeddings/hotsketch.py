"""HotSketch (CAFE, SIGMOD 2024): find the hot features of a stream online, in fixed memory.

``w`` buckets of ``c`` slots (id, float32 score, hot row); an id lives in bucket :func:`bucket_of`. An
insert adds scores (Space-Saving replacement for ids not in the sketch), and entries whose score reaches
the threshold T take free hot rows; scores decay by ``decay`` when the inserted mass or the demand for
rows (more entries at T than free rows) calls for it, and a waiting entry may preempt a weaker hot one.
:meth:`HotSketch.insert` applies a whole batch with one documented batch rule, vectorised in PyTorch
(any device) or compiled (:mod:`.native`, CPU; the same state, tested); :meth:`HotSketch.insert_masked`
applies the same rule with no host sync (fixed-size buffers and masks, for CUDA graphs and
``torch.compile``). The rules, why each was chosen, and the measurements behind them: docs/native.md,
"HotSketch" and "A step without host syncs".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import native
from .ops import topk_ties_first

log = logging.getLogger(__name__)

EMPTY = -1
KEY_DTYPES = (torch.int32, torch.int64)


def slot_bytes(key_dtype: torch.dtype = torch.int64) -> int:
    """Bytes of one slot: the id (``key_dtype``), its float32 score and its int32 hot row."""
    return key_dtype.itemsize + 4 + 4


def slot_words(key_dtype: torch.dtype = torch.int64) -> int:
    """int32 words of one slot in :attr:`HotSketch.table`: 4 with int64 ids, 3 with int32."""
    return slot_bytes(key_dtype) // 4


SLOT_BYTES = slot_bytes(torch.int64)
_CELLS_MIN = 2048  # newcomers from which _newcomers_by_bucket aggregates by cells rather than sorting
_CELLS_MAX_PER_BUCKET = 1.0  # ... up to this many newcomers per bucket
_PICK_COUNT_MIN = 1024  # columns from which pick_ranked counts comparisons rather than sorting
DEFAULT_SEED = 0x5EED  # bucket hash seed, distinct from the hash tables' seeds
# The generation of a Located made, and of a sketch changed, while tracing: never trusted. Traced code
# neither reads nor increments the counter (torch.compile guards on a module's ints, so reading it would
# recompile every step); it sets this constant, and the next change outside tracing takes a fresh number.
TRACED = -2
_MIX1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (golden ratio)
_MIX2 = -4658895280553007687  # 0xBF58476D1CE4E5B9 (SplitMix64's first multiplier)


def bucket_of(ids: Tensor, num_buckets: int, seed: int = DEFAULT_SEED) -> Tensor:
    """Bucket in ``[0, num_buckets)`` of each int64 id.

    ``z = ((x + seed·golden) · M1) ^ (… >> 29)) · M2`` mixes every bit of the id into the high bits
    (int64 products wrap modulo 2^64, identically on CPU and CUDA); the top 31 bits ``u`` are mapped to a
    bucket by ``(u · w) >> 31``, which is uniform and needs no int64 modulo. Five cheap elementwise ops
    where ``ops.hash64(x) % w`` takes ten (and a division): about half the time on this CPU.
    """
    if num_buckets >= 2**31:
        raise ValueError("at most 2^31 - 1 buckets")
    # In place after the first op: each new 100k-element tensor costs an allocation as large as the op.
    z = ids + seed * 0x2545F491
    z.mul_(_MIX1)
    z.bitwise_xor_(z >> 29)
    z.mul_(_MIX2)
    z.bitwise_right_shift_(33)  # arithmetic shift: top 31 bits, offset into [0, 2^31) below
    z.add_(1 << 30)
    z.mul_(num_buckets)
    return z.bitwise_right_shift_(31)


def int32_range_error(lo: int, hi: int) -> str:
    """The message for ids (smallest ``lo``, largest ``hi``) that int32 keys cannot hold."""
    return f"HotSketch with int32 keys holds ids in [0, 2^31); got {lo if lo < 0 else hi}"


def slot_views(table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(keys, scores, hot_row): the (w, c) views of a table of int32 words (w, c, 4 or 3)."""
    if table.shape[-1] == 4:  # words 0-1: the int64 id
        keys = table[..., 0:2].view(torch.int64).squeeze(-1)
    else:
        keys = table[..., 0]
    return keys, table[..., -2].view(torch.float32), table[..., -1]


def pick_ranked(order_key: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """For each column i of ``order_key`` (c, m), the row at position ``rank[i]`` of the column's stable
    ascending order (ties: lower row first) and its key: ``torch.sort(order_key, dim=0, stable=True)``
    at ``rank``.

    Sorting m tiny columns costs ~130 ns each on the CPU (a (c, c, m) broadcast comparison as much); for
    c <= 8 and m >= 1024 the position of every entry is counted with c(c-1)/2 comparisons of whole rows
    instead (~30 small ops: at c = 4, 160 us at m <= 1024, where the sort takes 20-130 us, and 1.0 ms
    against 8.7 ms at m = 65536).
    """
    c, m = order_key.shape
    if c > 8 or m < _PICK_COUNT_MIN or order_key.is_cuda:  # on CUDA the sort's few kernels win
        keys, rows = torch.sort(order_key, dim=0, stable=True)
        r = rank[None]
        return rows.gather(0, r).squeeze(0), keys.gather(0, r).squeeze(0)
    # uint8 counters (positions < 8) fed with bools viewed as uint8.
    pos = torch.zeros((c, m), dtype=torch.uint8, device=order_key.device)
    for j in range(c):
        for k in range(j):
            before = order_key[k] <= order_key[j]  # entry k precedes entry j (k < j wins ties)
            pos[j].add_(before.view(torch.uint8))
            pos[k].add_((~before).view(torch.uint8))
    sel = pos == rank.to(torch.uint8)  # (c, m): exactly one row per column
    row = torch.zeros(m, dtype=torch.uint8, device=order_key.device)
    key = order_key[0]
    for j in range(1, c):  # (argmax over the c rows, or a gather, cost more than these small ops)
        row.add_(sel[j].view(torch.uint8), alpha=j)
        key = torch.where(sel[j], order_key[j], key)
    return row.long(), key


def masked_put(flat: Tensor, target: Tensor, value: Tensor, mask: Tensor) -> None:
    """``flat[target[i]] = value[i]`` where ``mask[i]``, with no read back and no data-dependent size.

    The targets of the entries in ``mask`` must be distinct. Every other entry repeats the write of the
    first entry in ``mask`` (or, with none, rewrites the value already at the last entry's target), so
    where indices repeat they write equal values and the result does not depend on the write order.
    """
    target = target.clamp(0, flat.shape[0] - 1)
    last = mask.shape[0] - 1  # (argmax of the mask: inductor's CPU kernel misreads short all-False masks)
    first = torch.where(mask, torch.arange(mask.shape[0], device=mask.device), last).amin().view(1)
    at = target.index_select(0, first)
    stay = flat.index_select(0, at)
    mask_first = mask.index_select(0, first)
    extra = (1,) * (value.dim() - 1)
    fill = torch.where(mask_first.view(1, *extra), value.index_select(0, first), stay)
    flat.index_put_((torch.where(mask, target, at),), torch.where(mask.view(-1, *extra), value, fill))


def _batch(ids: Tensor, scores: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """An insert's ids (int64) and scores (float32, None: 1 each), flat; ValueError if their shapes differ."""
    ids = ids.reshape(-1).long()
    s = None if scores is None else scores.reshape(-1).float()
    if s is not None and s.shape != ids.shape:
        raise ValueError(f"scores shape {tuple(s.shape)} differs from ids shape {tuple(ids.shape)}")
    return ids, s


class Located:
    """Where the ids of a batch live in the sketch, valid while ``generation`` is the sketch's.

    ``bucket`` (n,) int64; ``flat`` (n,) the flat slot index, the bucket's first slot where not found;
    ``found`` (n,) bool; ``code`` (n,) the compiled kernels' form of the same: the slot where found,
    else -1 - bucket. Each is derived from the other form on first use. The compiled locate also
    answers the query (hot row, score) for :meth:`HotSketch.query` to hand out once.
    """

    def __init__(self, bucket: Tensor | None, flat: Tensor | None, found: Tensor | None, generation: int,
                 code: Tensor | None = None, slots: int = 1,
                 answer: tuple[Tensor, Tensor] | None = None) -> None:
        self._bucket, self._flat, self._found, self._code = bucket, flat, found, code
        self.generation, self.slots, self.answer = generation, slots, answer

    def __len__(self) -> int:
        return (self._code if self._code is not None else self._flat).shape[0]  # type: ignore[union-attr]

    @property
    def found(self) -> Tensor:
        if self._found is None:
            self._found = self._code >= 0  # type: ignore[operator]
        return self._found

    @property
    def bucket(self) -> Tensor:
        if self._bucket is None:
            code = self._code
            self._bucket = torch.where(code >= 0, code.div(self.slots, rounding_mode="floor"), -1 - code)  # type: ignore[union-attr]
        return self._bucket

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            code = self._code
            self._flat = torch.where(code >= 0, code, (-1 - code) * self.slots)  # type: ignore[operator]
        return self._flat

    @property
    def code(self) -> Tensor:
        if self._code is None:
            self._code = torch.where(self.found, self.flat, -1 - self.bucket)
        return self._code

    def index_select(self, index: Tensor) -> Located:
        """The entries at ``index`` (same generation), kept in the form this one holds."""
        if self._code is not None:
            return Located(None, None, None, self.generation, self._code.index_select(0, index), self.slots)
        return Located(*(t.index_select(0, index) for t in (self.bucket, self.flat, self.found)), self.generation)

    @staticmethod
    def cat(parts: Sequence[Located]) -> Located:
        """The entries of ``parts`` (all of one generation) one after the other."""
        first = parts[0]
        if all(p._code is not None for p in parts):
            return Located(None, None, None, first.generation, torch.cat([p.code for p in parts]), first.slots)
        return Located(*(torch.cat([getattr(p, k) for p in parts]) for k in ("bucket", "flat", "found")),
                       first.generation)

    @staticmethod
    def joined(parts: Sequence[Located | None]) -> Located | None:
        """Several forwards' Located as one (:meth:`cat`; the one itself, uncopied, when alone), while every
        part exists and all are of one sketch generation; else None (the insert locates afresh)."""
        present = [p for p in parts if p is not None]
        if len(present) < len(parts) or any(p.generation != present[0].generation for p in present):
            return None
        return present[0] if len(present) == 1 else Located.cat(present)


@dataclass
class SketchUpdate:
    """What one :meth:`HotSketch.insert` changed in the hot set (int64 tensors)."""

    promoted_ids: Tensor
    promoted_rows: Tensor
    demoted_ids: Tensor
    demoted_rows: Tensor


@dataclass
class MaskedUpdate:
    """What one :meth:`HotSketch.insert_masked` changed in the hot set, in fixed-size buffers (int64
    ids and rows, bool masks): entry i happened where its mask is set; the others are garbage."""

    promoted_ids: Tensor
    promoted_rows: Tensor
    promoted: Tensor
    demoted_ids: Tensor
    demoted_rows: Tensor
    demoted: Tensor

    def compact(self) -> SketchUpdate:
        """The :class:`SketchUpdate` that :meth:`HotSketch.insert` reports, in its order (a read back)."""
        p, d = self.promoted, self.demoted
        return SketchUpdate(self.promoted_ids[p], self.promoted_rows[p], self.demoted_ids[d], self.demoted_rows[d])


class HotSketch(nn.Module):
    """A bucketed Space-Saving sketch that assigns hot rows to features whose score reaches ``threshold``.

    Args:
        num_buckets: w.
        num_hot_rows: rows that can be handed to hot features (CAFE uses w = num_hot_rows).
        threshold: T, the score at which a feature becomes hot.
        slots: c, slots per bucket.
        decay: factor applied to all scores at each decay.
        decay_mass: decay once the inserted score mass exceeds ``decay_mass * w * T``.
        pressure_decay: also decay when more entries have reached T than rows are free (see module doc).
        preempt: let an entry waiting for a row take the row of a hot entry it outscores (module doc).
        hysteresis: how many times the hot entry's score a waiting entry needs to take its row; None: one
            decay step (``1 / decay``), the least margin that stops two equal features trading a row.
        seed: seed of the bucket hash.
        key_dtype: dtype of the stored ids. ``torch.int32`` (12-byte slots, the paper's 48 bytes per
            bucket) holds ids in ``[0, 2^31)`` and rejects others at insert; the default int64 holds any id.

    State (``state_dict``): ``table``, the slots as int32 words (w, c, 4 or 3: id, score bits, hot row),
    of which :attr:`keys`, :attr:`scores` and :attr:`hot_row` are (w, c) views; ``row_used``; ``mass``.
    """

    def __init__(self, num_buckets: int, num_hot_rows: int, threshold: float, slots: int = 4,
                 decay: float = 0.98, decay_mass: float = 10.0, pressure_decay: bool = True,
                 preempt: bool = True, hysteresis: float | None = None, seed: int = DEFAULT_SEED,
                 key_dtype: torch.dtype = torch.int64) -> None:
        super().__init__()
        if num_buckets < 1 or slots < 1 or num_hot_rows < 0:
            raise ValueError(f"need num_buckets >= 1, slots >= 1, num_hot_rows >= 0; got "
                             f"{num_buckets}, {slots}, {num_hot_rows}")
        if num_hot_rows >= 2**31 or num_buckets * slots >= 2**31:
            raise ValueError("hot-row indices and bucket indices must stay below 2^31")
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be torch.int32 or torch.int64, got {key_dtype}")
        if threshold <= 0 or not 0 < decay <= 1:
            raise ValueError(f"need threshold > 0 and 0 < decay <= 1, got {threshold}, {decay}")
        if hysteresis is not None and not hysteresis >= 1:
            raise ValueError(f"need hysteresis >= 1, got {hysteresis}")
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.decay_mass = float(decay_mass)
        self.pressure_decay = bool(pressure_decay)
        self.preempt = bool(preempt)
        # a swap needs waiting score * preempt_margin > hot score (decay itself by default, bit for bit)
        self.preempt_margin = self.decay if hysteresis is None else 1.0 / float(hysteresis)
        self.seed = int(seed)
        self.bucket_cells = True  # aggregate newcomers per bucket cell (False: sort them all; same result)
        self.native = True  # compiled kernels where available (False: the vectorised PyTorch path; same result)
        # insert without host syncs (insert_masked) where the compiled kernels do not serve: None while
        # tracing (torch.compile) or capturing a CUDA graph, which need it; True for every insert; False
        # never. Elsewhere the vectorised path runs: on the CPU it is faster (docs/native.md).
        self.sync_free: bool | None = None
        # (generation, waiting slots, rows in use) after a compiled insert, handed to the next one (a
        # preemption both promotes and demotes: the rows in use change by promoted - demoted)
        self._waiting_left: tuple[int, Tensor | None, int] = (-1, None, -1)
        # One buffer of int32 words, slot by slot (id, score bits, hot row): a bucket's c slots are one
        # stretch of memory (one 64-byte line with int64 ids and c = 4), where three arrays cost the
        # compiled kernels three cache misses per bucket. keys / scores / hot_row are views of it.
        self.register_buffer("table", torch.zeros(num_buckets, slots, slot_words(key_dtype), dtype=torch.int32))
        self._view_cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.keys.fill_(EMPTY)
        self.hot_row.fill_(EMPTY)
        self.register_buffer("row_used", torch.zeros(num_hot_rows, dtype=torch.bool))  # the free-row list
        self.register_buffer("mass", torch.zeros((), dtype=torch.float64))  # inserted since last decay
        self.generation = 0  # bumped by every change of keys/scores/rows; invalidates Located
        self._last_generation = 0  # the highest generation handed out (the next is one more)

    # ------------------------------------------------------------------ the slots
    def _views(self) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, scores, hot_row) as (w, c) views of :attr:`table` (made once per table tensor)."""
        table = self.table
        if torch.compiler.is_compiling():  # views made in the graph: AOT autograd refuses to mutate
            return slot_views(table)  # inputs that are views of another input in another dtype
        cache = self._view_cache
        if cache is None or cache[0] is not table:
            cache = self._view_cache = (table, *slot_views(table))
        return cache[1], cache[2], cache[3]

    @property
    def keys(self) -> Tensor:
        """(w, c) id of each slot (``key_dtype``), -1 when empty: a view of :attr:`table`."""
        return self._views()[0]

    @property
    def scores(self) -> Tensor:
        """(w, c) float32 importance score of each slot (0 when empty): a view of :attr:`table`."""
        return self._views()[1]

    @property
    def hot_row(self) -> Tensor:
        """(w, c) int32 hot row of each slot, -1 when not hot: a view of :attr:`table`."""
        return self._views()[2]

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_last_generation", max(state.get("generation", 0), 0))  # pickles without it
        super().__setstate__(state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_view_cache"] = None  # views of one storage in three dtypes, which torch.save refuses; rebuilt on use
        return state

    # ------------------------------------------------------------------ sizes
    @property
    def num_buckets(self) -> int:
        return self.table.shape[0]

    @property
    def slots(self) -> int:
        return self.table.shape[1]

    @property
    def key_dtype(self) -> torch.dtype:
        return torch.int64 if self.table.shape[-1] == 4 else torch.int32

    @property
    def num_hot_rows(self) -> int:
        return self.row_used.numel()

    @staticmethod
    def memory_bytes_for(num_buckets: int, num_hot_rows: int, slots: int = 4,
                         key_dtype: torch.dtype = torch.int64) -> int:
        """Bytes of the buffers of a sketch of this shape (what ``state_dict`` holds)."""
        return num_buckets * slots * slot_bytes(key_dtype) + num_hot_rows + 8

    def num_hot(self) -> int:
        return int(self.row_used.sum())

    def extra_repr(self) -> str:
        return (f"buckets={self.num_buckets}, slots={self.slots}, hot_rows={self.num_hot_rows}, "
                f"threshold={self.threshold}, decay={self.decay}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Also loads checkpoints that hold the slots as three tensors (``keys``, ``scores``, ``hot_row``)."""
        self._bump()
        parts = [prefix + name for name in ("keys", "scores", "hot_row")]
        if prefix + "table" not in state_dict and all(k in state_dict for k in parts):
            keys, scores, hot = (state_dict.pop(k) for k in parts)
            if keys.shape == self.keys.shape:  # (otherwise the table is reported missing, as for a bad shape)
                table = torch.empty_like(self.table)
                for view, old in zip(slot_views(table), (keys, scores, hot)):
                    view.copy_(old)
                state_dict[prefix + "table"] = table
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._bump()  # .to(device) etc. replace the buffers
        return super()._apply(fn, *args, **kwargs)

    def _native(self) -> bool:
        """Whether the compiled kernels serve this sketch: on the CPU, with ``native`` left on and a
        library built (see :mod:`.native`)."""
        return self._native_table() is not None

    def _native_table(self) -> Tensor | None:
        """:attr:`table` where the compiled kernels serve this sketch, else None. (Buffers read from
        ``_buffers``: nn.Module.__getattr__ costs ~0.5 us a read, and a batch makes a few dozen.)"""
        table = self._buffers["table"]
        if self.native and self.bucket_cells and table.is_cpu and native.library() is not None:  # type: ignore[union-attr]
            return table
        return None

    def uses_sync_free(self, device: torch.device) -> bool:
        """Whether :meth:`insert` (and ``cafe``'s step) take the path without host syncs on ``device``
        (see :attr:`sync_free`); never where the compiled kernels serve this sketch."""
        if self.sync_free is not None:
            return self.sync_free and not self._native()
        if self._native():
            return False
        return torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def _bump(self) -> int:
        """Mark a change of the slots (invalidates every Located); returns the new generation. (Plain
        attribute write: nn.Module.__setattr__ costs ~1 us, paid several times per batch.)"""
        if torch.compiler.is_compiling():
            object.__setattr__(self, "generation", TRACED)
            return TRACED
        generation = self._last_generation + 1
        object.__setattr__(self, "_last_generation", generation)
        object.__setattr__(self, "generation", generation)
        return generation

    def _generation_now(self) -> int:
        """The generation a Located made now carries (:data:`TRACED` while tracing)."""
        return TRACED if torch.compiler.is_compiling() else self.generation

    def _current(self, located: Located) -> bool:
        """Whether ``located`` still describes the sketch (never while tracing, nor one made then)."""
        return (not torch.compiler.is_compiling() and located.generation != TRACED
                and located.generation == self.generation)

    # ------------------------------------------------------------------ reading
    def bucket(self, ids: Tensor) -> Tensor:
        return bucket_of(ids.long(), self.num_buckets, self.seed)

    def locate(self, ids: Tensor, bucket: Tensor | None = None) -> Located:
        """Bucket, flat slot index and found mask of each id (``bucket`` if already known). The compiled
        locate also reads each id's hot row and score (same slot, same cache line), which the next
        :meth:`query` with this ``Located`` returns without another pass."""
        ids = ids.reshape(-1).long()
        table = self._native_table() if bucket is None else None
        if table is not None:
            code, rows, scores = native.op("hotsketch_locate")(table, ids, self.seed * 0x2545F491)
            return Located(None, None, None, self._generation_now(), code, table.shape[1], (rows, scores))
        b = self.bucket(ids) if bucket is None else bucket
        c = self.slots
        base = b * c
        flat_keys = self.keys.view(-1)
        # One 1-D index_select and compare per slot: faster than an (n, c) gather with a tiny inner dim.
        # Slot j is read through the view flat_keys[j:] (no base + j); the hit slot is accumulated in a
        # uint8 (a bool viewed as uint8 costs nothing; int64 += bool * j costs ~5x more).
        found = flat_keys.index_select(0, base) == ids
        if c > 1:
            offset = torch.zeros(ids.shape, dtype=torch.uint8, device=ids.device)
            for j in range(1, c):
                hit = flat_keys[j:].index_select(0, base) == ids
                offset.add_(hit.view(torch.uint8), alpha=j)  # at most one slot of a bucket holds an id
                found |= hit
            base.add_(offset)
        return Located(b, base, found, self._generation_now())

    def _valid(self, located: Located | None, ids: Tensor) -> Located:
        if located is None or len(located) != ids.numel():
            return self.locate(ids)
        if self._current(located):
            return located
        return self.locate(ids, located.bucket)

    def query(self, ids: Tensor, located: Located | None = None) -> tuple[Tensor, Tensor]:
        """Hot row (int64, -1 if not hot) and score (float32, 0 if absent) of each id. Changes nothing."""
        ids = ids.reshape(-1).long()
        if located is not None and located.answer is not None and self._current(located):
            answer, located.answer = located.answer, None  # handed out once: the caller owns the tensors
            if answer[0].numel() == ids.numel():
                return answer
        if self._native():
            return self.locate(ids).answer  # type: ignore[return-value]
        loc = self._valid(located, ids)
        rows = torch.where(loc.found, self.hot_row.view(-1).index_select(0, loc.flat), EMPTY).long()
        scores = self.scores.view(-1).index_select(0, loc.flat) * loc.found  # (masked_fill_ is 3x slower)
        return rows, scores

    def hot_entries(self) -> tuple[Tensor, Tensor]:
        """(ids, hot rows) of every hot feature, int64."""
        mask = self.hot_row >= 0
        return self.keys[mask].long(), self.hot_row[mask].long()

    def top(self, k: int) -> Tensor:
        """The k ids with the highest scores (fewer if the sketch holds fewer)."""
        keys, scores = self.keys.view(-1), self.scores.view(-1)
        present = keys >= 0
        order = torch.argsort(torch.where(present, scores, -1.0), descending=True, stable=True)
        k = min(k, int(present.sum()))
        return keys[order[:k]].long()

    # ------------------------------------------------------------------ writing
    def insert(self, ids: Tensor, scores: Tensor | None = None, located: Located | None = None) -> SketchUpdate:
        """Add ``scores`` (default 1 each) to ``ids`` with the batch rule of the module docstring.

        ``located`` (from :meth:`locate` on the same ids) skips the hash and, if the sketch has not
        changed since, the slot search.
        """
        ids, s = _batch(ids, scores)
        table = self._native_table()
        if table is not None:  # the same rule compiled (native.py); it checks the int32-key range itself
            n = ids.numel()
            mass_add = float(n) if s is None else float(s.sum(dtype=torch.float64))
            fresh = located is not None and self._current(located) and len(located) == n
            gen, waiting, used = self._waiting_left
            row_used = self._buffers["row_used"]
            if gen != self.generation:
                waiting, used = None, int(row_used.sum())  # type: ignore[union-attr]
            *changes, waiting = native.op("hotsketch_insert")(
                table, row_used, self._buffers["mass"], ids, s, mass_add, self.seed * 0x2545F491, self.threshold,
                self.decay, self.decay_mass, self.pressure_decay, self.preempt, self.preempt_margin,
                located.code if fresh else None,
                waiting, used)
            object.__setattr__(self, "_waiting_left",
                               (self._bump(), waiting, used + changes[0].numel() - changes[2].numel()))
            return SketchUpdate(*changes)
        if self.uses_sync_free(ids.device):
            return self.insert_masked(ids, s, located).compact()
        if ids.numel() > 0:
            loc = self._valid(located, ids)
            # Ids not found add 0 to their bucket's first slot: no masking, one scatter_add over the batch
            # (same sums in the same order as index_add_, which is ~1.7x slower on the CPU).
            add = loc.found.float() if s is None else s * loc.found
            self.scores.view(-1).scatter_add_(0, loc.flat, add)
            new = torch.nonzero(~loc.found).squeeze(1)
            if new.numel():
                s_new = torch.ones(new.shape, device=ids.device) if s is None else s.index_select(0, new)
                self._insert_newcomers(ids.index_select(0, new), s_new, loc.bucket.index_select(0, new))
            self.mass += ids.numel() if s is None else s.sum(dtype=torch.float64)
            self._bump()
        return self._maintain()

    def _insert_newcomers(self, ids: Tensor, s: Tensor, b: Tensor) -> None:
        """Steps 2-3 of the batch rule for the occurrences of ids not in the sketch (bucket ``b``)."""
        uid, us, ub, rank = self._newcomers_by_bucket(ids, s, b)
        target, slot_score, ok = self._pick_slots(us, ub, rank)
        place = torch.nonzero(ok).squeeze(1)
        target = target.index_select(0, place)
        old = slot_score.index_select(0, place).clamp(min=0)  # an empty slot counts as 0
        self.keys.view(-1).index_copy_(0, target, self._as_key(uid.index_select(0, place)))
        self.scores.view(-1).index_copy_(0, target, old + us.index_select(0, place))

    def _pick_slots(self, us: Tensor, ub: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step 3 for newcomers with summed score ``us``, bucket ``ub`` and rank ``rank`` < c in it:
        (flat slot each would take, that slot's score (-inf: empty, +inf: none), whether it takes it)."""
        c, inf = self.slots, float("inf")
        # The c slots of every row's bucket as (c, m) tensors (slot j of all rows contiguous): one gather
        # per buffer, and reductions over the slots run along contiguous rows (over a trailing dim of 4
        # they are several times slower on the CPU).
        base = ub * c
        idx = (torch.arange(c, device=ub.device)[:, None] + base).view(-1)
        keys = self.keys.view(-1).index_select(0, idx).view(c, -1)
        scores = self.scores.view(-1).index_select(0, idx).view(c, -1)
        hot = self.hot_row.view(-1).index_select(0, idx).view(c, -1) >= 0
        min_hot = torch.where(hot, scores, inf).amin(0)
        empty = keys < 0
        evictable = empty | (~hot & (scores <= min_hot))
        order_key = torch.where(evictable, torch.where(empty, -inf, scores), inf)  # evictable first, smallest first
        slot, slot_score = pick_ranked(order_key, rank)  # -inf: empty, +inf: not evictable
        ok = (slot_score < inf) & ((rank == 0) | (us > slot_score))
        return base + slot, slot_score, ok

    def _as_key(self, ids: Tensor) -> Tensor:
        """``ids`` in the dtype of the stored keys; ValueError for ids int32 keys cannot hold."""
        if self.keys.dtype == torch.int64:
            return ids
        if ids.numel() == 0:  # (index_copy_ wants the keys' dtype even for no entries)
            return ids.to(torch.int32)
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one read back (a sync on CUDA), not two
        if lo < 0 or hi > torch.iinfo(torch.int32).max:
            raise ValueError(int32_range_error(lo, hi))
        return ids.to(torch.int32)

    def _newcomers_by_bucket(self, ids: Tensor, s: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(unique id, summed score, bucket, rank in its bucket) of the newcomers with rank < c.

        Most buckets receive one distinct newcomer (rank 0), and those need no sort: per cell (the
        bucket, or its low bits when the buckets far outnumber the newcomers) the smallest and largest
        id are scattered; where they agree the cell holds one distinct id, whose score is the cell's sum.
        Only the occurrences in cells with several ids go through :meth:`_rank_sorted` (sorts of 20k
        elements cost ~1 ms each on this CPU and were half of an insert).
        """
        # Sorting takes fewer ops for small batches, and is what the cells would end in when newcomers
        # outnumber the buckets (then most buckets receive several: a small sketch, e.g. CAFE at 10,000x).
        # On CUDA the sort is a few kernels and the cells a dozen more launches (module doc, "Speed").
        if (ids.is_cuda or not self.bucket_cells
                or not _CELLS_MIN <= ids.numel() <= _CELLS_MAX_PER_BUCKET * self.num_buckets):
            return self._rank_sorted(ids, s, b)
        n, w, dev = ids.numel(), self.num_buckets, ids.device
        size = 1 << max(4 * n - 1, 1).bit_length()  # >= 4n cells: few unrelated buckets share a cell
        cell = b
        if size >= w:
            size = w
        else:
            cell = b & (size - 1)
        big = torch.iinfo(torch.int64)
        lo = torch.full((size,), big.max, dtype=torch.int64, device=dev).scatter_reduce_(0, cell, ids, "amin")
        hi = torch.full((size,), big.min, dtype=torch.int64, device=dev).scatter_reduce_(0, cell, ids, "amax")
        one = lo == hi  # an occupied cell with one distinct id (empty cells have lo > hi)
        cells = torch.nonzero(one).squeeze(1)
        uid = lo.index_select(0, cells)
        # Summed in batch order, like the sorted path: the same float sums.
        us = torch.zeros(size, device=dev).index_add_(0, cell, s).index_select(0, cells)
        if size == w:
            ub = cells
        else:  # every occurrence in a one-id cell has the same bucket: duplicates write equal values
            ub = torch.empty(size, dtype=torch.int64, device=dev).index_copy_(0, cell, b).index_select(0, cells)
        rank = torch.zeros(cells.shape, dtype=torch.int64, device=dev)
        several = torch.nonzero(~one.index_select(0, cell)).squeeze(1)
        if several.numel():
            rest = self._rank_sorted(*(t.index_select(0, several) for t in (ids, s, b)))
            uid, us, ub, rank = (torch.cat([x, y]) for x, y in zip((uid, us, ub, rank), rest))
        return uid, us, ub, rank

    def _rank_sorted(self, ids: Tensor, s: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_newcomers_by_bucket` for any batch, by sorting."""
        c, dev = self.slots, ids.device
        uid, inverse = torch.unique(ids, return_inverse=True)  # sorted ascending
        us = torch.zeros(uid.shape, device=dev).index_add_(0, inverse, s)
        ub = torch.empty_like(uid).scatter_(0, inverse, b)  # every occurrence has the same bucket
        # Sort by (bucket, score desc, id asc) with one stable sort of an int64 key: the bits of a
        # non-negative float32 order like the floats, so (bucket << 31) + (2^31 - 1 - bits) puts the
        # buckets in order and, within one, higher scores first; uid is ascending, so ties keep id order.
        bits = us.clamp(min=0).view(torch.int32).long()
        order = torch.sort((ub << 31) + (0x7FFFFFFF - bits), stable=True)[1]
        uid, us, ub = uid.index_select(0, order), us.index_select(0, order), ub.index_select(0, order)
        pos = torch.arange(uid.numel(), device=dev)
        first = torch.ones_like(ub, dtype=torch.bool)
        first[1:] = ub[1:] != ub[:-1]
        rank = pos - torch.cummax(pos * first, 0)[0]  # position within the bucket's run
        keep = torch.nonzero(rank < c).squeeze(1)  # at most c newcomers of a bucket can be placed
        return tuple(t.index_select(0, keep) for t in (uid, us, ub, rank))  # type: ignore[return-value]

    def _maintain(self) -> SketchUpdate:
        """Decay (mass rule or pressure) with demotion, then promotion into free rows, then preemption."""
        none = torch.empty(0, dtype=torch.int64, device=self.keys.device)
        demoted_ids = demoted_rows = promoted_ids = promoted_rows = none
        wait = self._waiting()
        used = int(self.row_used.sum())
        decay = float(self.mass) > self.decay_mass * self.num_buckets * self.threshold
        if not decay and self.pressure_decay and self.decay < 1:
            decay = wait.numel() > self.num_hot_rows - used
        if decay:
            demoted_ids, demoted_rows = self.apply_decay()
            used -= demoted_rows.numel()
            wait = self._waiting()
        if wait.numel():
            # Highest score first, ties by slot position (wait is ascending): the promotion order, and
            # what is left of it is the preemption order.
            order = torch.sort(self.scores.view(-1).index_select(0, wait), descending=True, stable=True)[1]
            wait = wait.index_select(0, order)
            promoted_ids, promoted_rows = self._promote(wait, used)
            wait = wait[promoted_rows.numel():]
            if self.preempt and wait.numel():
                ids_in, ids_out, rows = self._preempt(wait)
                if rows.numel():
                    promoted_ids, promoted_rows = torch.cat([promoted_ids, ids_in]), torch.cat([promoted_rows, rows])
                    demoted_ids, demoted_rows = torch.cat([demoted_ids, ids_out]), torch.cat([demoted_rows, rows])
        return SketchUpdate(promoted_ids, promoted_rows, demoted_ids, demoted_rows)

    def _waiting(self) -> Tensor:
        """Flat slots (ascending) of the non-hot entries whose score reached T."""
        # Empty slots always hold score 0 < T, so the keys need not be read.
        return torch.nonzero((self.scores.view(-1) >= self.threshold) & (self.hot_row.view(-1) < 0)).squeeze(1)

    def _preempt(self, wait: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Entries still waiting for a row (``wait``, highest score first) take the rows of the
        lowest-scored hot entries they beat.

        A waiting entry (non-hot, score >= T, no free row) and the hot entry it replaces are paired
        highest-waiting with lowest-hot; a swap needs the waiting score above the hot one times
        ``hysteresis`` (by default one decay step, so two features of equal weight do not trade a row back
        and forth).
        Returns (ids promoted, ids demoted, rows they traded).
        """
        none = torch.empty(0, dtype=torch.int64, device=self.keys.device)
        flat_keys, flat_scores, flat_rows = self.keys.view(-1), self.scores.view(-1), self.hot_row.view(-1)
        hot = torch.nonzero(flat_rows >= 0).squeeze(1)
        n = min(wait.numel(), hot.numel())
        if n == 0:
            return none, none, none
        w_scores = flat_scores.index_select(0, wait[:n])
        hot_scores = flat_scores.index_select(0, hot)
        h_order = topk_ties_first(hot_scores, n, largest=False)  # ties: lower slot first, on every device
        h_scores = hot_scores.index_select(0, h_order)
        swap = torch.nonzero(w_scores * self.preempt_margin > h_scores).squeeze(1)
        if swap.numel() == 0:
            return none, none, none
        win = wait.index_select(0, swap)
        lose = hot.index_select(0, h_order.index_select(0, swap))
        rows = flat_rows.index_select(0, lose)
        flat_rows.index_fill_(0, lose, EMPTY)
        flat_rows.index_copy_(0, win, rows)
        self._bump()
        return flat_keys.index_select(0, win).long(), flat_keys.index_select(0, lose).long(), rows.long()

    def apply_decay(self) -> tuple[Tensor, Tensor]:
        """Multiply every score by ``decay`` and demote hot entries below T; returns (ids, rows) demoted."""
        self.scores.mul_(self.decay)
        self.mass.zero_()
        self._bump()
        flat_rows = self.hot_row.view(-1)
        out = torch.nonzero((flat_rows >= 0) & (self.scores.view(-1) < self.threshold)).squeeze(1)
        ids, rows = self.keys.view(-1).index_select(0, out).long(), flat_rows.index_select(0, out).long()
        if ids.numel():
            self.row_used.index_fill_(0, rows, False)
            flat_rows.index_fill_(0, out, EMPTY)
            log.debug("HotSketch decay demoted %d features", ids.numel())
        return ids, rows

    def _promote(self, order: Tensor, used: int) -> tuple[Tensor, Tensor]:
        """Give the free rows, smallest index first, to the first entries of ``order`` (flat slots);
        ``used`` rows are taken."""
        none = torch.empty(0, dtype=torch.int64, device=self.keys.device)
        # The k smallest free rows lie below used + k: search that prefix only.
        prefix = self.row_used[: used + order.numel()]
        free = torch.nonzero(~prefix).squeeze(1)
        k = min(order.numel(), free.numel())
        if k == 0:
            return none, none
        cand, rows = order[:k], free[:k]
        self.hot_row.view(-1).index_copy_(0, cand, rows.int())
        self.row_used.index_fill_(0, rows, True)
        self._bump()
        return self.keys.view(-1).index_select(0, cand).long(), rows

    # ------------------------------------------------------------------ writing without host syncs
    def insert_masked(self, ids: Tensor, scores: Tensor | None = None, located: Located | None = None,
                      keep: Tensor | None = None) -> MaskedUpdate:
        """:meth:`insert` with no host sync: the same batch rule and the same state, over fixed-size work
        buffers (the batch's n entries, the w·c slots, min(w·c, hot rows) candidates) with masks where
        the other paths compact, so a step can be captured in a CUDA graph or compiled as one graph.

        ``keep`` (bool, like ``ids``): insert only those entries, as :meth:`insert` of ``ids[keep]``
        would (the others add +0.0 to a score, as ids not found already do, and 0 to the mass). The
        mass sums the scores of all n entries in float64, the others' as 0: the same number as the
        sum over the kept ones alone, up to the float64 summation order (equal for integer scores).
        """
        ids, s = _batch(ids, scores)
        if ids.numel() > 0:
            loc = self._valid(located, ids)
            found, new = loc.found, ~loc.found
            if keep is not None:
                keep = keep.reshape(-1)
                found, new = found & keep, new & keep
            self.scores.view(-1).scatter_add_(0, loc.flat, found.float() if s is None else s * found)
            self._insert_newcomers_masked(ids, s, loc.bucket, new)
            # add_ rather than +=, which torch.compile takes for a new tensor bound to the attribute
            if keep is None:
                self.mass.add_(ids.numel() if s is None else s.sum(dtype=torch.float64))
            else:
                self.mass.add_(keep.sum(dtype=torch.float64) if s is None else (s * keep).sum(dtype=torch.float64))
            self._bump()
        return self._maintain_masked()

    def _insert_newcomers_masked(self, ids: Tensor, s: Tensor | None, b: Tensor, new: Tensor) -> None:
        """Steps 2-3 of the batch rule for the entries ``new`` (ids not in the sketch), in buffers of n.

        The newcomers are sorted by id (the others last) to number the distinct ones (group g: the g-th
        smallest), their scores summed per id in batch order (``index_add_``, as the other paths) and
        ranked per bucket by one stable sort of :meth:`_rank_sorted`'s key over the groups, which are in
        ascending id order as there; entries beyond the groups are masked out.
        """
        n, dev = ids.numel(), ids.device
        big = torch.iinfo(torch.int64).max
        sid, order = torch.sort(torch.where(new, ids, big))
        new_s = new.index_select(0, order)
        first = new_s.clone()
        first[1:] &= sid[1:] != sid[:-1]
        group = torch.cumsum(first, 0) - 1  # of each sorted entry
        groups = first.sum()
        grouped = torch.where(new_s, group, n)  # n: a spare cell for the entries that are not newcomers
        inverse = torch.empty(n, dtype=torch.int64, device=dev).scatter_(0, order, grouped)
        add = torch.ones(n, device=dev) if s is None else s
        us = torch.zeros(n + 1, device=dev).index_add_(0, inverse, add)[:n]
        # every occurrence of a group writes the same id and bucket (the spare cell takes the rest)
        uid = torch.full((n + 1,), big, dtype=torch.int64, device=dev).scatter_(0, grouped, sid)[:n]
        ub = torch.zeros(n + 1, dtype=torch.int64, device=dev).scatter_(0, grouped, b.index_select(0, order))[:n]
        pos = torch.arange(n, device=dev)
        valid = pos < groups
        bits = us.clamp(min=0).view(torch.int32).long()
        key = torch.where(valid, (ub << 31) + (0x7FFFFFFF - bits), big)
        order = torch.sort(key, stable=True)[1]  # the groups (first) by bucket, score desc, id asc
        uid, us, ub = uid.index_select(0, order), us.index_select(0, order), ub.index_select(0, order)
        head = torch.ones_like(valid)
        head[1:] = ub[1:] != ub[:-1]
        rank = pos - torch.cummax(pos * head, 0)[0]  # position within the bucket's run
        keep = valid & (rank < self.slots)
        target, slot_score, ok = self._pick_slots(us, torch.where(keep, ub, 0), torch.where(keep, rank, 0))
        ok &= keep
        masked_put(self.keys.view(-1), target, self._as_key_masked(uid, ok), ok)
        masked_put(self.scores.view(-1), target, slot_score.clamp(min=0) + us, ok)  # an empty slot counts as 0

    def _as_key_masked(self, ids: Tensor, ok: Tensor) -> Tensor:
        """:meth:`_as_key` of the entries ``ok``: the ValueError where reading back is free (the CPU,
        outside tracing), else a device-side assertion (``torch._assert_async``, no host sync)."""
        if self.keys.dtype == torch.int64:
            return ids
        if ids.device.type == "cpu" and not torch.compiler.is_compiling():
            self._as_key(ids[ok])
        else:
            inside = torch.where(ok, ids, 0)
            torch._assert_async((inside.amin() >= 0) & (inside.amax() <= torch.iinfo(torch.int32).max),
                                "HotSketch with int32 keys holds ids in [0, 2^31)")
        return ids.to(torch.int32)

    def _maintain_masked(self) -> MaskedUpdate:
        """:meth:`_maintain` over all w·c slots with masks.

        One stable sort of an int64 key over every slot puts the waiting entries first, highest score
        first (promotion order), then the hot entries, lowest score first (preemption order), ties by
        slot position as on the other paths (the key: the float's bits made order-preserving, negated
        for the waiting entries, offset by 2^33 for the hot ones). Only the first min(w·c, hot rows)
        waiting entries can take a row, a free one or a traded one. Preemption pairs the entries still
        waiting with the hot set from before the promotions: a promoted entry outscores every entry still
        waiting, so it never loses a swap, and the swaps (a prefix of the pairs) are the same.
        """
        keys, scores, rows = self.keys.view(-1), self.scores.view(-1), self.hot_row.view(-1)
        num_slots, num_rows, dev = keys.numel(), self.num_hot_rows, keys.device
        threshold = self.threshold
        decay = self.mass > self.decay_mass * self.num_buckets * self.threshold
        if self.pressure_decay and self.decay < 1:
            waiting = ((scores >= threshold) & (rows < 0)).sum()
            decay = decay | (waiting > num_rows - self.row_used.sum())
        self.scores.copy_(torch.where(decay, self.scores * self.decay, self.scores))
        self.mass.copy_(torch.where(decay, torch.zeros_like(self.mass), self.mass))
        demote = decay & (rows >= 0) & (scores < threshold)
        demoted_ids, demoted_rows = keys.to(torch.int64, copy=True), rows.long()
        k = min(num_slots, num_rows)
        if k == 0:  # no hot rows: nothing to demote, promote or trade
            self._bump()
            none = torch.zeros(0, dtype=torch.int64, device=dev)
            return MaskedUpdate(none, none, none.bool(), demoted_ids, demoted_rows, demote)
        masked_put(self.row_used, demoted_rows, torch.zeros_like(demote), demote)
        rows.copy_(torch.where(demote, EMPTY, rows))
        hot = rows >= 0
        wait = (scores >= threshold) & ~hot
        bits = (scores + 0.0).view(torch.int32).long()  # (+ 0.0 turns -0.0 into 0.0)
        bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # orders like the floats
        order = torch.sort(torch.where(wait, -bits, torch.where(hot, bits + 2**33, 2**34)), stable=True)[1]
        waiting, i = wait.sum(), torch.arange(k, device=dev)
        first = order[:k]  # the waiting entries, in promotion order (then others, masked)
        # the i-th free row (num_rows where fewer are free): the first row where i + 1 of them are free
        free_rows = torch.searchsorted(torch.cumsum(~self.row_used, 0), i + 1)
        promote = (i < waiting) & (free_rows < num_rows)
        rows.index_copy_(0, first, torch.where(promote, free_rows, rows.index_select(0, first).long()).int())
        masked_put(self.row_used, free_rows, torch.ones_like(promote), promote)
        promoted, promoted_rows = promote, free_rows
        if self.preempt:
            promotions = promote.sum()
            win = order.index_select(0, (i + promotions) % num_slots)  # the entries still waiting
            lose = order.index_select(0, (i + waiting) % num_slots)  # the hot ones, lowest score first
            swap = (i < waiting - promotions) & (i < hot.sum())
            swap &= scores.index_select(0, win) * self.preempt_margin > scores.index_select(0, lose)
            traded = rows.index_select(0, lose)
            masked_put(rows, lose, torch.full_like(traded, EMPTY), swap)
            masked_put(rows, win, traded, swap)
            # a swap's winner is waiting entry promotions + i (< k: it takes one of the k rows)
            at = (i - promotions).clamp(min=0)
            won = (i >= promotions) & swap.index_select(0, at)
            promoted_rows = torch.where(promote, free_rows, traded.index_select(0, at).long())
            promoted = promote | won
            demoted_ids = torch.cat([demoted_ids, keys.index_select(0, lose).long()])
            demoted_rows = torch.cat([demoted_rows, traded.long()])
            demote = torch.cat([demote, swap])
        self._bump()
        return MaskedUpdate(keys.index_select(0, first).long(), promoted_rows, promoted, demoted_ids, demoted_rows,
                            demote)
