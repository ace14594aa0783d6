"""HotSketch (CAFE, SIGMOD 2024): find the hot features of a stream online, in fixed memory.

The sketch has ``w`` buckets of ``c`` slots (default c = 4). A slot holds a feature id (int64, -1 when
empty), an importance score (float32) and a hot-row index (int32, -1 when the feature is not hot). A
feature lives in bucket ``hash64(id, seed) % w`` (a well-mixed hash, so sequential ids spread evenly).

Insert of (id, s), DESIGN.md §4:
- the id is in its bucket: add s to its score;
- else, if the bucket's smallest slot is empty or not hot, the id takes that slot with the slot's old
  score plus s (an empty slot counts as score 0): Space-Saving replacement;
- else (the smallest slot is hot) the update is dropped.
After the scores change, every non-hot entry whose score reached the threshold ``T`` is promoted while
hot rows are free (highest score first). Once the score mass inserted since the last decay exceeds
``decay_mass · w · T``, every score is multiplied by ``decay`` and hot entries that fall below ``T`` are
demoted: their hot row returns to the free list.

**Batches.** :meth:`insert` applies a whole batch at once, vectorised, with this rule:
1. scores of ids already in the sketch are added first (all occurrences of an id together);
2. the remaining ids ("newcomers") are aggregated per unique id (their scores summed);
3. in each bucket the newcomers are ranked by aggregated score (ties: smaller id first) and the k-th
   newcomer takes the k-th smallest *evictable* slot, where a slot is evictable when it is empty or
   not hot with a score no larger than the bucket's smallest hot score (ties: lower slot index).
   Newcomers of one batch therefore never evict each other, and newcomers beyond the number of
   evictable slots are dropped;
4. decay/demotion, then promotion (highest score first, ties by slot position) into the free rows with
   the smallest indices.
With one id per call this is exactly the sequential algorithm. The result does not depend on the order
of ids within a batch (up to float rounding of score sums; with integer scores it is exact), and the
same code gives the same state on CPU and CUDA.

All state sits in fixed-size buffers, so ``state_dict`` is a complete checkpoint and the memory is
``w · c · 16`` bytes for the slots, one byte per hot row for the free-row mask and 8 bytes of counter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .ops import hash64

log = logging.getLogger(__name__)

EMPTY = -1
SLOT_BYTES = 8 + 4 + 4  # id int64, score float32, hot row int32
DEFAULT_SEED = 0x5EED  # bucket hash seed, distinct from the hash tables' seeds


@dataclass
class SketchUpdate:
    """What one :meth:`HotSketch.insert` changed in the hot set (int64 tensors)."""

    promoted_ids: Tensor
    promoted_rows: Tensor
    demoted_ids: Tensor
    demoted_rows: Tensor


class HotSketch(nn.Module):
    """A bucketed Space-Saving sketch that assigns hot rows to features whose score reaches ``threshold``.

    Args:
        num_buckets: w.
        num_hot_rows: rows that can be handed to hot features (CAFE uses w = num_hot_rows).
        threshold: T, the score at which a feature becomes hot.
        slots: c, slots per bucket.
        decay: factor applied to all scores at each decay.
        decay_mass: decay once the inserted score mass exceeds ``decay_mass * w * T``.
        seed: seed of the bucket hash.
    """

    def __init__(self, num_buckets: int, num_hot_rows: int, threshold: float, slots: int = 4,
                 decay: float = 0.98, decay_mass: float = 10.0, seed: int = DEFAULT_SEED) -> None:
        super().__init__()
        if num_buckets < 1 or slots < 1 or num_hot_rows < 0:
            raise ValueError(f"need num_buckets >= 1, slots >= 1, num_hot_rows >= 0; got "
                             f"{num_buckets}, {slots}, {num_hot_rows}")
        if num_hot_rows >= 2**31:
            raise ValueError("hot-row indices are int32: at most 2^31 - 1 hot rows")
        if threshold <= 0 or not 0 < decay <= 1:
            raise ValueError(f"need threshold > 0 and 0 < decay <= 1, got {threshold}, {decay}")
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.decay_mass = float(decay_mass)
        self.seed = int(seed)
        self.register_buffer("keys", torch.full((num_buckets, slots), EMPTY, dtype=torch.int64))
        self.register_buffer("scores", torch.zeros(num_buckets, slots, dtype=torch.float32))
        self.register_buffer("hot_row", torch.full((num_buckets, slots), EMPTY, dtype=torch.int32))
        self.register_buffer("row_used", torch.zeros(num_hot_rows, dtype=torch.bool))  # the free-row list
        self.register_buffer("mass", torch.zeros((), dtype=torch.float64))  # inserted since last decay

    # ------------------------------------------------------------------ sizes
    @property
    def num_buckets(self) -> int:
        return self.keys.shape[0]

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def num_hot_rows(self) -> int:
        return self.row_used.numel()

    @staticmethod
    def memory_bytes_for(num_buckets: int, num_hot_rows: int, slots: int = 4) -> int:
        """Bytes of the buffers of a sketch of this shape (what ``state_dict`` holds)."""
        return num_buckets * slots * SLOT_BYTES + num_hot_rows + 8

    def num_hot(self) -> int:
        return int(self.row_used.sum())

    def extra_repr(self) -> str:
        return (f"buckets={self.num_buckets}, slots={self.slots}, hot_rows={self.num_hot_rows}, "
                f"threshold={self.threshold}, decay={self.decay}")

    # ------------------------------------------------------------------ reading
    def bucket(self, ids: Tensor) -> Tensor:
        return hash64(ids, self.seed) % self.num_buckets

    def _locate(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(flat slot index, found mask) of each id; the index is meaningless where not found."""
        # One 1-D gather and compare per slot: much faster than (n, c) tensors with a tiny inner dim.
        base = self.bucket(ids) * self.slots
        flat_keys = self.keys.view(-1)
        flat = base
        found = flat_keys[base] == ids
        for j in range(1, self.slots):
            hit = flat_keys[base + j] == ids
            flat = torch.where(hit, base + j, flat)
            found |= hit
        return flat, found

    def query(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Hot row (int64, -1 if not hot) and score (float32, 0 if absent) of each id. Changes nothing."""
        ids = ids.reshape(-1).long()
        flat, found = self._locate(ids)
        rows = torch.where(found, self.hot_row.view(-1)[flat].long(), torch.full_like(ids, EMPTY))
        scores = torch.where(found, self.scores.view(-1)[flat], torch.zeros((), device=ids.device))
        return rows, scores

    def hot_entries(self) -> tuple[Tensor, Tensor]:
        """(ids, hot rows) of every hot feature, int64."""
        mask = self.hot_row >= 0
        return self.keys[mask], self.hot_row[mask].long()

    def top(self, k: int) -> Tensor:
        """The k ids with the highest scores (fewer if the sketch holds fewer)."""
        keys, scores = self.keys.view(-1), self.scores.view(-1)
        present = keys >= 0
        order = torch.argsort(torch.where(present, scores, -1.0), descending=True, stable=True)
        k = min(k, int(present.sum()))
        return keys[order[:k]]

    # ------------------------------------------------------------------ writing
    def insert(self, ids: Tensor, scores: Tensor | None = None) -> SketchUpdate:
        """Add ``scores`` (default 1 each) to ``ids`` with the batch rule of the module docstring."""
        ids = ids.reshape(-1).long()
        s = torch.ones(ids.shape, device=ids.device) if scores is None else scores.reshape(-1).float()
        if s.shape != ids.shape:
            raise ValueError(f"scores shape {tuple(s.shape)} differs from ids shape {tuple(ids.shape)}")
        if ids.numel() > 0:
            flat, found = self._locate(ids)
            self.scores.view(-1).index_add_(0, flat[found], s[found])
            if not bool(found.all()):
                self._insert_newcomers(ids[~found], s[~found])
            self.mass += s.sum(dtype=torch.float64)
        demoted_ids = demoted_rows = torch.empty(0, dtype=torch.int64, device=self.keys.device)
        if float(self.mass) > self.decay_mass * self.num_buckets * self.threshold:
            demoted_ids, demoted_rows = self.apply_decay()
        promoted_ids, promoted_rows = self._promote()
        return SketchUpdate(promoted_ids, promoted_rows, demoted_ids, demoted_rows)

    def _insert_newcomers(self, ids: Tensor, s: Tensor) -> None:
        c = self.slots
        uid, inverse = torch.unique(ids, return_inverse=True)  # sorted ascending
        us = torch.zeros(uid.shape, device=ids.device).index_add_(0, inverse, s)
        ub = self.bucket(uid)
        # Sort by (bucket, score desc, id asc): stable sorts from the least significant key up.
        order = torch.argsort(-us, stable=True)
        order = order[torch.argsort(ub[order], stable=True)]
        uid, us, ub = uid[order], us[order], ub[order]
        rank = torch.arange(uid.numel(), device=ids.device) - torch.searchsorted(ub, ub)
        keys, scores, hot = self.keys[ub], self.scores[ub], self.hot_row[ub] >= 0  # (m, c)
        inf = torch.tensor(float("inf"), device=ids.device)
        min_hot = torch.where(hot, scores, inf).amin(1, keepdim=True)
        empty = keys < 0
        evictable = empty | (~hot & (scores <= min_hot))
        order_key = torch.where(empty, -inf, scores)
        order_key = torch.where(evictable, order_key, inf)
        candidates = torch.argsort(order_key, dim=1, stable=True)  # evictable slots first, smallest first
        ok = rank < evictable.sum(1)
        slot = candidates.gather(1, rank.clamp(max=c - 1)[:, None]).squeeze(1)
        target = (ub * c + slot)[ok]
        flat_keys, flat_scores = self.keys.view(-1), self.scores.view(-1)
        old = torch.where(flat_keys[target] < 0, torch.zeros((), device=ids.device), flat_scores[target])
        flat_keys[target] = uid[ok]
        flat_scores[target] = old + us[ok]

    def apply_decay(self) -> tuple[Tensor, Tensor]:
        """Multiply every score by ``decay`` and demote hot entries below T; returns (ids, rows) demoted."""
        self.scores.mul_(self.decay)
        self.mass.zero_()
        mask = (self.hot_row >= 0) & (self.scores < self.threshold)
        ids, rows = self.keys[mask], self.hot_row[mask].long()
        self.row_used[rows] = False
        self.hot_row[mask] = EMPTY
        if ids.numel():
            log.debug("HotSketch decay demoted %d features", ids.numel())
        return ids, rows

    def _promote(self) -> tuple[Tensor, Tensor]:
        """Give free rows to non-hot entries with score >= T, highest score first.

        Scans all w·c slots (no sort unless there are candidates): cheap next to the batch itself, and it
        also picks up entries that reached T while no row was free.
        """
        flat_keys, flat_scores, flat_rows = self.keys.view(-1), self.scores.view(-1), self.hot_row.view(-1)
        none = torch.empty(0, dtype=torch.int64, device=self.keys.device)
        want = (flat_scores >= self.threshold) & (flat_rows < 0) & (flat_keys >= 0)
        cand = torch.nonzero(want).squeeze(1)
        if cand.numel() == 0:
            return none, none
        free = torch.nonzero(~self.row_used).squeeze(1)
        k = min(cand.numel(), free.numel())
        if k == 0:
            return none, none
        cand = cand[torch.argsort(flat_scores[cand], descending=True, stable=True)[:k]]
        rows = free[:k]
        flat_rows[cand] = rows.int()
        self.row_used[rows] = True
        return flat_keys[cand], rows
