"""``zch``: TorchRec's managed-collision table (zero-collision hashing): the hottest ids get their own row.

A TorchRec ``MCHManagedCollisionModule`` holds a sorted id -> slot map with per-slot metadata (the
eviction policy's: LFU counts, LRU last access, DistanceLFU both) and, at each eviction, keeps the ids
that score highest; a slot is one row of ``weight``, the id's own. Ids without a slot are served by
per-field hashed rows (``miss="hash"``: ``hash``'s layout, as in ``cafe``) or by TorchRec's one miss row
(``miss="row"``: the module as shipped).

Training: forward only looks ids up. Training forwards record their ids; ``after_optimizer_step``
(registered by ``embcompress.attach``) gathers them over data-parallel ranks in rank order, hands them to
the module every ``eviction_interval`` steps, and re-initialises every slot given to a new id as TorchRec's
sharded module does: weights from the init (U(+-sqrt(1/slots)), from a generator seeded by the eviction
round, so every rank draws the same) or, with ``slot_init="hash"``, from the hashed row that served the id;
optimizer state to the optimizer's initial value. Eval forwards change nothing.

Memory: ``weight`` plus the module's persistent buffers: sorted ids, slot map, one int64 per slot per
metadata (counts, last access) and the iteration counter. TorchRec's ``_output_segments_tensor`` (1,025
int64: shard boundaries for resharding) is not kept: an unsharded table never reads it, and it is rebuilt
from the slot count. The per-batch history buffer is training scratch, like a gradient, and not counted.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FLOAT_BYTES, IndexedEmbeddingBag, uniform_rows_
from .cafe import reference_hash_rate
from .ops import allocate_rows, field_hash_rows, field_of, field_starts, hash64
from .options import Option, hash_seed_option, mode_option, sparse_option
from .registry import register
from .sync import gather_across_ranks

log = logging.getLogger(__name__)

INSTALL_HINT = ("the 'zch' method needs TorchRec (the torchrec extra): pip install -r requirements-torchrec.txt "
                "&& pip install --no-deps torchrec==1.8.0")
#: int64 metadata buffers per slot of each eviction policy, besides the sorted ids and the slot map
POLICY_METADATA = {"lfu": 1, "lru": 1, "distance_lfu": 2}
_FIELD_BUFFERS = 4  # starts, sizes, rows, row_base: int64 each (miss="hash" only)
_MAX_PENDING = 64  # forwards recorded without an optimizer step before we give up on them


def _mc_modules() -> Any:
    """``torchrec.modules.mc_modules``, imported on first use (it takes a second or two)."""
    try:
        from torchrec.modules import mc_modules
        from torchrec.sparse.jagged_tensor import JaggedTensor
    except Exception as e:  # a missing or broken install: say which extra
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    return mc_modules, JaggedTensor


def slot_bytes(embedding_dim: int, policy: str) -> int:
    """Bytes per slot: its row plus its int64 id, slot index and metadata."""
    return embedding_dim * FLOAT_BYTES + 8 * (2 + POLICY_METADATA[policy])


class ZchEmbeddingBag(IndexedEmbeddingBag):
    """Managed-collision table (module doc). ``weight`` holds the per-field hashed rows (``miss="hash"``)
    and then one row per slot (and the miss row with ``miss="row"``)."""

    OPTIONS = (
        Option("eviction_policy", "str", "lfu", "TorchRec's eviction policy: which ids keep a slot",
               choices=tuple(POLICY_METADATA)),
        Option("eviction_interval", "int", 1, "training steps whose ids are gathered before each eviction", low=1),
        Option("decay_exponent", "float", 1.0, "lru and distance_lfu: exponent of the steps since an id was last "
               "seen", low=0, low_open=True),
        Option("miss", "str", "hash", "what serves an id without a slot: its field's hashed rows, or TorchRec's "
               "single miss row", choices=("hash", "row")),
        Option("hash_rate", "float", None, "miss=hash: share of the budget for the hashed rows; the rest buys "
               "slots", low=0, high=1, low_open=True, high_open=True,
               auto="cafe's reference value for the nearest compression ratio"),
        Option("slot_init", "str", "random", "what a slot given to a new id starts from: the table's init "
               "(TorchRec's) or the hashed row that served the id (miss=hash)", choices=("random", "hash")),
        hash_seed_option(), mode_option(), sparse_option(),
    )

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rows_per_field: Sequence[int] | None,
                 num_slots: int, eviction_policy: str = "lfu", eviction_interval: int = 1,
                 decay_exponent: float = 1.0, miss: str = "hash", slot_init: str = "random", mode: str = "sum",
                 seed: int = 0, sparse: bool = True) -> None:
        mc_modules, self._jagged = _mc_modules()
        if eviction_policy not in POLICY_METADATA:
            raise ValueError(f"eviction_policy must be one of {', '.join(POLICY_METADATA)}, got {eviction_policy!r}")
        if miss not in ("hash", "row"):
            raise ValueError(f"miss must be 'hash' or 'row', got {miss!r}")
        if slot_init not in ("random", "hash") or (slot_init == "hash" and miss != "hash"):
            raise ValueError(f"slot_init must be 'random' or 'hash' (the latter with miss='hash'), got {slot_init!r}")
        if int(num_slots) < 1 or int(eviction_interval) < 1:
            raise ValueError("num_slots and eviction_interval must be at least 1")
        if miss == "hash":
            if rows_per_field is None or len(rows_per_field) != len(field_sizes) or min(rows_per_field) < 1:
                raise ValueError("miss='hash' needs rows_per_field: one positive count per field")
            rows = [min(int(r), int(n)) for r, n in zip(rows_per_field, field_sizes)]
        else:
            rows = []
        self.num_hash_rows = sum(rows)
        self.num_slots = int(num_slots)
        # TorchRec keeps its last slot for misses: zch_size = slots + 1, the miss row only with miss="row"
        super().__init__(field_sizes, embedding_dim, self.num_hash_rows + self.num_slots + (miss == "row"), mode,
                         sparse)
        self.miss, self.slot_init, self.seed = miss, slot_init, int(seed)
        self.eviction_policy, self.eviction_interval = eviction_policy, int(eviction_interval)
        if miss == "hash":
            self.register_buffer("starts", field_starts(self.field_sizes))
            self.register_buffer("sizes", torch.tensor(self.field_sizes, dtype=torch.int64))
            self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
            self.register_buffer("row_base", field_starts(rows))
            # derived, so not state: ids of fields served whole never need a slot
            self.register_buffer("field_hashed", self.rows < self.sizes, persistent=False)
        policy = {"lfu": lambda: mc_modules.LFU_EvictionPolicy(),
                  "lru": lambda: mc_modules.LRU_EvictionPolicy(decay_exponent=decay_exponent),
                  "distance_lfu": lambda: mc_modules.DistanceLFU_EvictionPolicy(decay_exponent=decay_exponent)}
        # eviction_interval=1: this table gathers the ids of its own interval and hands them over at once
        self.mch = mc_modules.MCHManagedCollisionModule(
            zch_size=self.num_slots + 1, device=torch.device("cpu"), eviction_policy=policy[eviction_policy](),
            eviction_interval=1, input_hash_size=self.num_embeddings, name="zch")
        segments = torch.tensor([0, self.num_slots + 1], dtype=torch.int64)
        self.mch._non_persistent_buffers_set.add("_output_segments_tensor")  # see module doc, "Memory"
        self.mch._output_segments_tensor = self.mch._init_output_segments_tensor = segments
        self.miss_slot = self.num_slots  # TorchRec's zch_index
        if rows:
            uniform_rows_(self.weight[: self.num_hash_rows], rows)
        uniform_rows_(self.weight[self.num_hash_rows:], [self.weight.shape[0] - self.num_hash_rows])
        self.register_load_state_dict_post_hook(lambda module, keys: module._loaded())
        self._pending: list[Tensor] = []
        self._interval: list[Tensor] = []
        self._warned = False
        # training_stats counters (not state)
        self._stat_lookups, self._stat_hit, self._stat_admitted = 0, None, 0

    def _loaded(self) -> None:
        self.mch._current_iter = -1  # re-read the loaded iteration counter at the next eviction
        self._pending, self._interval = [], []

    # ------------------------------------------------------------------ routing ids to rows
    def slot_of(self, ids: Tensor) -> Tensor:
        """Slot holding each id, or ``miss_slot`` (TorchRec's remap)."""
        flat = ids.reshape(-1)
        feature = self._jagged(values=flat, lengths=torch.full((1,), flat.numel(), dtype=torch.int64,
                                                               device=flat.device))
        return self.mch.remap({"ids": feature})["ids"].values().view(ids.shape)

    def hashed_row(self, ids: Tensor, field: Tensor | None = None) -> Tensor:
        """Row of the per-field hash table serving each id (``miss="hash"``)."""
        f = field_of(ids, self.starts) if field is None else field
        return field_hash_rows(ids, f, self.starts, self.sizes, self.rows, self.row_base, self.seed)

    def _route(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(row of ``weight`` serving each id, whether a slot served it)."""
        slot = self.slot_of(ids)
        hit = slot != self.miss_slot
        if self.miss == "row":
            return slot, hit
        return torch.where(hit, slot + self.num_hash_rows, self.hashed_row(ids)), hit

    def row_index(self, ids: Tensor) -> Tensor:
        return self._route(ids)[0]

    def _slotted(self, ids: Tensor) -> Tensor:
        """The ids that may hold a slot: with ``miss="hash"``, those of hashed fields."""
        if self.miss == "row":
            return ids
        return ids[self.field_hashed.index_select(0, field_of(ids, self.starts))]

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        ids, offsets, psw = self._flatten(input, offsets, per_sample_weights)
        if self.validate_ids:
            self.check_ids(ids)
        rows, hit = self._route(ids)
        out = F.embedding_bag(rows, self.weight, offsets, mode=self.mode, per_sample_weights=psw,
                              sparse=self.sparse)
        if self.training and torch.is_grad_enabled() and ids.numel() > 0:
            self._record(ids, hit)
        return out

    def _record(self, ids: Tensor, hit: Tensor) -> None:
        if len(self._pending) >= _MAX_PENDING:
            if not self._warned:
                log.warning("%s: %d training forwards without an optimizer step; call "
                            "embcompress.attach(model, optimizer) so the slots are updated",
                            self._label(), len(self._pending))
                self._warned = True
            self._pending.pop(0)
        slotted = self._slotted(ids)
        self._pending.append(slotted)
        self._stat_lookups += slotted.numel()
        hits = hit.sum()  # a slot only ever holds a slotted id
        self._stat_hit = hits if self._stat_hit is None else self._stat_hit.add_(hits)

    # ------------------------------------------------------------------ training step
    def after_optimizer_step(self) -> None:
        """Hand the step's ids (all ranks', in rank order) to the module; re-initialise new slots."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        ids = pending[0] if len(pending) == 1 else torch.cat(pending)
        (ids,) = gather_across_ranks(ids)
        self._interval.append(ids)
        if len(self._interval) >= self.eviction_interval:
            ids = self._interval[0] if len(self._interval) == 1 else torch.cat(self._interval)
            self._interval = []
            self.evict(ids)

    @torch.no_grad()
    def evict(self, ids: Tensor) -> Tensor:
        """One TorchRec eviction round over ``ids``; returns the slots given to new ids (re-initialised)."""
        mch = self.mch
        if mch.device != ids.device or ids.numel() > mch._input_history_buffer_size:
            # TorchRec sizes its history buffer (on its device) from the first batch and truncates larger
            # ones; the ids of an interval differ in number (ranks, the last batch), so size it per round.
            mch._device = ids.device
            mch._input_history_buffer_size = -1
        was = mch.training
        mch.train()
        mch.profile({"ids": self._jagged(values=ids, lengths=torch.full((1,), ids.numel(), dtype=torch.int64,
                                                                         device=ids.device))})
        mch.train(was)
        slots = mch.evict()
        if slots is None or slots.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=ids.device)
        slots = slots.long()
        self._stat_admitted += slots.numel()
        rows = slots + self.num_hash_rows
        if self.slot_init == "hash":
            position = torch.empty_like(mch._mch_remapped_ids_mapping)
            position[mch._mch_remapped_ids_mapping] = torch.arange(position.numel(), device=position.device)
            new_ids = mch._mch_sorted_raw_ids.index_select(0, position.index_select(0, slots))
            self.weight[rows] = self.weight[self.hashed_row(new_ids)]
        else:
            gen = torch.Generator().manual_seed(int(hash64(torch.tensor([int(mch._current_iter_tensor)]),
                                                           self.seed)))
            bound = (1.0 / (self.weight.shape[0] - self.num_hash_rows)) ** 0.5
            init = torch.rand(slots.numel(), self.embedding_dim, generator=gen) * (2 * bound) - bound
            self.weight[rows] = init.to(self.weight.device, self.weight.dtype)
        state, inits = self.row_optimizer_state(self.weight)
        for key, value in inits.items():
            state[key].index_fill_(0, rows, value)
        return slots

    def training_stats(self) -> dict[str, float]:
        """``slot_share``: share of the training lookups of slot-eligible ids that a slot served;
        ``slots_used``: share of the slots held now; ``admitted``: slots given to new ids. Since the
        previous call."""
        open_slots = int(self.mch.open_slots().sum())
        stats: dict[str, float] = {"slots_used": 1.0 - open_slots / self.num_slots, "admitted": self._stat_admitted}
        if self._stat_lookups:
            stats["slot_share"] = (0 if self._stat_hit is None else int(self._stat_hit)) / self._stat_lookups
        self._stat_lookups, self._stat_hit, self._stat_admitted = 0, None, 0
        return stats

    # ------------------------------------------------------------------ budget
    @classmethod
    def _sizes(cls, field_sizes: Sequence[int], embedding_dim: int, options: dict[str, Any]) -> tuple[int, int, int]:
        """(fixed bytes, bytes per hashed row, bytes per slot) of a table with these options."""
        policy, miss = options.get("eviction_policy", "lfu"), options.get("miss", "hash")
        if policy not in POLICY_METADATA:
            raise ValueError(f"eviction_policy must be one of {', '.join(POLICY_METADATA)}, got {policy!r}")
        row = embedding_dim * FLOAT_BYTES
        slot = slot_bytes(embedding_dim, policy)
        fixed = 8 + (slot - row)  # iteration counter; the miss slot's id, index and metadata
        fixed += row if miss == "row" else _FIELD_BUFFERS * 8 * len(field_sizes)
        return fixed, row, slot

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        fixed, row, slot = cls._sizes(field_sizes, embedding_dim, options)
        total = sum(int(n) for n in field_sizes)
        if options.get("miss", "hash") == "row":
            return fixed + slot, fixed + total * slot
        return fixed + len(field_sizes) * row + slot, fixed + total * (row + slot)

    @classmethod
    def plan(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
             options: dict[str, Any]) -> tuple[int, int]:
        """(hashed rows, slots) that fill ``budget_bytes``: ``hash_rate`` of it to hashed rows, the rest to
        slots, and what whole slots leave to more hashed rows."""
        fixed, row, slot = cls._sizes(field_sizes, embedding_dim, options)
        total = sum(int(n) for n in field_sizes)
        usable = budget_bytes - fixed
        if options.get("miss", "hash") == "row":
            return 0, max(1, min(total, usable // slot))
        hash_rate = options.get("hash_rate")
        if hash_rate is None:
            hash_rate = reference_hash_rate(total * row / budget_bytes)
        hash_rows = max(len(field_sizes), min(total, int(hash_rate * usable) // row))
        slots = max(1, min(total, (usable - hash_rows * row) // slot))
        hash_rows = max(len(field_sizes), min(total, (usable - slots * slot) // row))
        return hash_rows, slots

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "ZchEmbeddingBag":
        opts = dict(options)
        hash_rows, slots = cls.plan(field_sizes, embedding_dim, budget_bytes, opts)
        opts.pop("hash_rate", None)
        rows = allocate_rows(field_sizes, hash_rows) if opts.get("miss", "hash") == "hash" else None
        table = cls(field_sizes, embedding_dim, rows, slots, **opts)
        log.info("zch: %d hashed rows, %d slots (%s), %d bytes", table.num_hash_rows, slots,
                 table.eviction_policy, table.memory_bytes())
        return table

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", hash_rows={self.num_hash_rows}, slots={self.num_slots}, "
                f"policy={self.eviction_policy}, miss={self.miss}")

    def inference_form(self) -> "ZchInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return ZchInference(self)


class ZchInference(torch.nn.Module):
    """``zch`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F), column f of field f,
    -> rows (B, F, D). TorchRec's id -> slot map is frozen into its sorted ids and slots and searched as
    its ``remap`` does (``searchsorted``, match, else the miss slot), without TorchRec in the graph: an id
    with a slot reads its slot's row, any other its hashed row (``miss="hash"``) or the miss row."""

    def __init__(self, table: "ZchEmbeddingBag") -> None:
        super().__init__()
        self.miss, self.seed = table.miss, table.seed
        self.miss_slot, self.num_hash_rows = table.miss_slot, table.num_hash_rows
        if table.miss == "hash":
            for name in ("starts", "sizes", "rows", "row_base"):
                self.register_buffer(name, getattr(table, name).detach().clone())
            self.register_buffer("columns", torch.arange(len(table.field_sizes)))
        self.register_buffer("keys", table.mch._mch_sorted_raw_ids.detach().clone())
        self.register_buffer("slots", table.mch._mch_remapped_ids_mapping.detach().long().clone())
        self.register_buffer("weight", table.weight.detach().clone())

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.searchsorted(self.keys[:-1], ids)
        hit = self.keys[pos] == ids
        slot = torch.where(hit, self.slots[pos], self.miss_slot)
        if self.miss == "row":
            return F.embedding(slot, self.weight)
        hashed = field_hash_rows(ids, self.columns.expand_as(ids), self.starts, self.sizes, self.rows,
                                 self.row_base, self.seed)
        return F.embedding(torch.where(hit, slot + self.num_hash_rows, hashed), self.weight)


if importlib.util.find_spec("torchrec") is not None:  # without TorchRec the method is not offered
    register("zch")(ZchEmbeddingBag)
