"""The interface every compressed embedding table implements.

Shape letters used throughout the package: B bags (usually the batch, or batch × fields),
n looked-up ids, D embedding dimension, F fields, N rows of the uncompressed table.

A table covers a *global* id space over all fields: global id = field offset + local id, so one call
serves every field of a batch. It behaves like ``torch.nn.EmbeddingBag``: ``forward(input, offsets,
per_sample_weights)`` with 1-D ``input`` plus ``offsets`` or 2-D ``input`` (one bag per row), modes
``sum`` and ``mean``.

Methods that keep state besides their parameters (CAFE's sketch, a cache of hot rows) hook into the
optimizer: ``embcompress.attach(model, optimizer)`` is the one extra line such methods need in an
ordinary PyTorch loop. It registers ``before_optimizer_step`` / ``after_optimizer_step`` of every table
as step hooks of the optimizer, so ``loss.backward(); optimizer.step()`` does the rest.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import validate as validate_options

FLOAT_BYTES = 4


class BudgetError(ValueError):
    """A compression ratio or byte budget that a method cannot reach with its settings."""


def full_table_bytes(field_sizes: Sequence[int], embedding_dim: int) -> int:
    """Bytes of the uncompressed float32 table: the numerator of every compression ratio."""
    return int(sum(field_sizes)) * int(embedding_dim) * FLOAT_BYTES


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class CompressedEmbeddingBag(nn.Module):
    """Base class: an embedding table over ``sum(field_sizes)`` global ids, compressed somehow.

    Subclasses implement :meth:`lookup` (rows for ids) and the budget class methods
    :meth:`byte_range` / :meth:`from_budget_bytes`; everything else (bag pooling, id validation,
    2-D input, per-sample weights, memory accounting) lives here.
    """

    #: registry name, set by ``@register``
    name: ClassVar[str] = ""
    #: deduplicate ids before :meth:`lookup` (worth it when a row is expensive to compute)
    dedup: ClassVar[bool] = False
    #: whether per-sample weights are meaningful for this table
    supports_per_sample_weights: ClassVar[bool] = True

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, mode: str = "sum") -> None:
        super().__init__()
        sizes = [int(s) for s in field_sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"field_sizes must be a non-empty list of positive sizes, got {list(field_sizes)[:8]}")
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.field_sizes: tuple[int, ...] = tuple(sizes)
        self.num_embeddings: int = sum(sizes)
        self.embedding_dim: int = int(embedding_dim)
        self.mode: str = mode
        #: set to False to skip the range check in forward (saves a min/max reduction per call)
        self.validate_ids: bool = True
        self._counters_seen: dict[str, list[int]] = {}  # _since_last_call's snapshots (not state)

    # ------------------------------------------------------------------ what subclasses implement
    def lookup(self, ids: Tensor) -> Tensor:
        """Rows for global ids: int64 (n,) -> float (n, D). Differentiable w.r.t. the parameters."""
        raise NotImplementedError

    def lookup_unique(self, unique: Tensor, counts: Tensor) -> Tensor:
        """Rows for the distinct ids of a batch and how often each occurs (tables with ``dedup``).

        Tables that count accesses (for a cache) override this instead of :meth:`forward`.
        """
        return self.lookup(unique)

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        """Smallest and largest ``memory_bytes()`` this method can be built with, given ``options``."""
        raise NotImplementedError

    @classmethod
    def from_budget_bytes(
        cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int, **options: Any
    ) -> "CompressedEmbeddingBag":
        """Build a table whose ``memory_bytes()`` is at most ``budget_bytes`` and as close to it as possible.

        Called only with a budget inside :meth:`byte_range`.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ optional training hooks
    def before_optimizer_step(self) -> None:
        """Runs after ``loss.backward()`` and before ``optimizer.step()`` (gradients are available)."""

    def after_optimizer_step(self) -> None:
        """Runs right after ``optimizer.step()``."""

    def training_stats(self) -> dict[str, float]:
        """What the table's own state did since the previous call, for the training log (the loop adds
        it to every train row of metrics.jsonl): cafe's hot share and promotions, mpcache's cache hit
        rate, tt's cache refreshes. Counts cover this process's training forwards (one rank under data
        parallelism). Reading them changes nothing the table computes. ``{}`` for tables without such state."""
        return {}

    def _since_last_call(self, key: str, counters: Tensor) -> list[int]:
        """Cumulative integer ``counters`` minus their values at the previous call with ``key`` (for
        :meth:`training_stats`; from zero at the first call, or after the counters were reset)."""
        now = [int(v) for v in counters.tolist()]
        prev = self._counters_seen.get(key)
        if prev is None or len(prev) != len(now) or any(n < p for n, p in zip(now, prev)):
            prev = [0] * len(now)
        self._counters_seen[key] = now
        return [n - p for n, p in zip(now, prev)]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive sparse gradients (need SGD, Adagrad or SparseAdam)."""
        return []

    def bind_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Called by :func:`attach` with the optimizers that step this table, for tables whose rows move
        (between parameters, as a cache's, or within one, as CAFE's hot rows) and must carry their
        optimizer state along. Held by weak reference: the table must not keep them alive."""
        self._optimizers = [weakref.ref(o) for o in optimizers]

    def row_optimizer_state(self, param: nn.Parameter) -> tuple[dict[str, Any], dict[str, float]]:
        """(the bound optimizer's state dict of ``param``, initial value of each per-row state tensor).

        Per-row state tensors are those shaped like ``param`` up to the number of rows (Adagrad's ``sum``,
        Adam's and SparseAdam's moments, SGD's momentum buffer); scalars such as Adam's step count are
        shared and left out. Both are empty when no optimizer is bound or it has no state for ``param`` yet.
        """
        for ref in getattr(self, "_optimizers", ()):
            opt = ref()
            state = opt.state.get(param) if opt is not None else None
            if state:
                group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
                inits = {k: float(group.get("initial_accumulator_value", 0.0)) if k == "sum" else 0.0
                         for k, v in state.items()
                         if isinstance(v, Tensor) and v.dim() == param.dim() >= 1 and v.shape[1:] == param.shape[1:]}
                return state, inits
        return {}, {}

    # ------------------------------------------------------------------ construction from a budget
    @classmethod
    def build(
        cls,
        field_sizes: Sequence[int],
        embedding_dim: int,
        *,
        compression: float | None = None,
        budget_bytes: int | None = None,
        **options: Any,
    ) -> "CompressedEmbeddingBag":
        """Build from a compression ratio (full bytes / table bytes) or a byte budget.

        The result's ``memory_bytes()`` lies within 10% under the budget; a budget the method cannot
        reach raises :class:`BudgetError` naming the reachable ratios.
        """
        full = full_table_bytes(field_sizes, embedding_dim)
        if (compression is None) == (budget_bytes is None):
            raise ValueError("give exactly one of compression= or budget_bytes=")
        if compression is not None:
            if not math.isfinite(compression) or compression <= 0:
                raise BudgetError(f"compression ratio must be a positive number, got {compression}")
            budget = int(full / compression)
        else:
            budget = int(budget_bytes)  # type: ignore[arg-type]
        options = validate_options(cls, options)  # unknown or out-of-range: one OptionError naming the valid ones
        lo, hi = cls.byte_range(field_sizes, embedding_dim, **options)
        # Below lo the method cannot shrink further; above hi/0.9 it cannot use the memory it is given.
        if budget < lo or hi < 0.9 * budget:
            raise BudgetError(
                f"method '{cls.name}' cannot reach {full / max(budget, 1):.4g}x ({budget} bytes) for "
                f"{sum(field_sizes)} rows x dim {embedding_dim}: reachable ratios are "
                f"{full / hi:.4g}x to {full / lo:.4g}x with these settings"
            )
        table = cls.from_budget_bytes(field_sizes, embedding_dim, min(budget, hi), **options)
        used = table.memory_bytes()
        if not 0.9 * budget <= used <= budget:
            raise BudgetError(
                f"method '{cls.name}' built a table of {used} bytes for a budget of {budget} bytes "
                f"(must land within 10% under it)"
            )
        return table

    # ------------------------------------------------------------------ memory
    def memory_bytes(self) -> int:
        """Bytes of every tensor a lookup needs: all parameters and persistent buffers.

        Subclasses with state outside tensors add it by overriding this method.
        """
        return sum(tensor_bytes(t) for t in self.state_dict().values() if isinstance(t, Tensor))

    def compression_ratio(self) -> float:
        return full_table_bytes(self.field_sizes, self.embedding_dim) / max(self.memory_bytes(), 1)

    # ------------------------------------------------------------------ forward
    def forward(
        self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None
    ) -> Tensor:
        """Pool rows into bags: returns (B, D).

        ``input`` is 1-D (n,) with ``offsets`` (B,) giving each bag's start, or 2-D (B, L) with every row
        one bag of L ids (then ``offsets`` must be None). ``per_sample_weights`` has ``input``'s shape
        and needs mode ``sum``.
        """
        one_per_bag = input.dim() == 2 and input.shape[1] == 1
        ids, offsets, psw = self._flatten(input, offsets, per_sample_weights, need_offsets=not one_per_bag)
        if self.validate_ids:
            self.check_ids(ids)
        if self.dedup:
            unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            rows = self.lookup_unique(unique, counts)  # (u, D)
            index = inverse
        else:
            rows = self.lookup(ids)  # (n, D)
            index = None
        if one_per_bag:
            # One id per bag (how the models look up fields): pooling is a gather, whose backward is an
            # index_add, several times cheaper than embedding_bag's backward, which sorts the ids again.
            out = rows if index is None else rows.index_select(0, index)  # (B, D)
            return out if psw is None else out * psw.unsqueeze(1).to(out.dtype)
        if index is None:
            index = torch.arange(ids.numel(), device=ids.device)
        return F.embedding_bag(index, rows, offsets, mode=self.mode, per_sample_weights=psw)

    def _flatten(
        self, input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None, need_offsets: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(ids (n,) int64, offsets (B,) int64, per-sample weights (n,) or None), checked. With 2-D input and
        ``need_offsets=False`` the offsets (a pooling that only gathers does not read them) are not built:
        an empty tensor stands for them."""
        if input.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self._label()}: ids must be int32 or int64, got {input.dtype}")
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(f"{self._label()}: offsets must be None when input is 2-D")
            bags, length = input.shape
            offsets = (torch.arange(bags, device=input.device, dtype=torch.int64) * length if need_offsets
                       else input.new_empty(0, dtype=torch.int64))
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError(f"{self._label()}: offsets are required when input is 1-D")
            if offsets.dim() != 1:
                raise ValueError(f"{self._label()}: offsets must be 1-D, got shape {tuple(offsets.shape)}")
        else:
            raise ValueError(f"{self._label()}: input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        if per_sample_weights is not None:
            if not self.supports_per_sample_weights:
                raise ValueError(f"{self._label()}: per_sample_weights are not supported by this method")
            if self.mode != "sum":
                raise ValueError(f"{self._label()}: per_sample_weights need mode='sum', not {self.mode!r}")
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"{self._label()}: per_sample_weights shape {tuple(per_sample_weights.shape)} "
                    f"differs from input shape {tuple(input.shape)}"
                )
        return input.long(), offsets.long(), per_sample_weights

    def check_ids(self, ids: Tensor) -> None:
        """ValueError naming the table, an offending id and the valid range; never a silent wrap.

        While ``torch.export`` or ``torch.compile`` traces the table the check becomes a
        ``torch._assert_async`` in the graph (a RuntimeError on the CPU, a device-side assert on CUDA), so
        tracing never stops on reading the ids back."""
        if torch.compiler.is_compiling():
            torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(),
                                f"{self._label()}: an id is outside the valid range [0, {self.num_embeddings})")
            return
        if ids.numel() == 0:
            return
        lo, hi = torch.aminmax(ids)
        if lo.item() < 0 or hi.item() >= self.num_embeddings:
            bad = lo.item() if lo.item() < 0 else hi.item()
            raise ValueError(f"{self._label()}: id {bad} is outside the valid range [0, {self.num_embeddings})")

    def _label(self) -> str:
        return f"{type(self).__name__} '{self.name}' ({self.num_embeddings} rows)"

    def extra_repr(self) -> str:
        return (
            f"fields={len(self.field_sizes)}, rows={self.num_embeddings}, dim={self.embedding_dim}, "
            f"mode={self.mode}, bytes={self.memory_bytes()}, ratio={self.compression_ratio():.4g}x"
        )


#: each table's step hooks from its latest attach() (outside the module, so copies and checkpoints skip them)
_STEP_HOOKS: "weakref.WeakKeyDictionary[CompressedEmbeddingBag, list[Any]]" = weakref.WeakKeyDictionary()


def attach(model: nn.Module, *optimizers: torch.optim.Optimizer) -> list[Any]:
    """Register every table's step hooks on the optimizer(s); returns the hook handles.

    The one extra line a CAFE or cache-based table needs in an ordinary loop:
    ``embcompress.attach(model, optimizer)`` once, then ``loss.backward(); optimizer.step()`` as usual.
    With several optimizers (e.g. SparseAdam for tables and Adam for the MLPs) pass them in the order
    they are stepped: ``before_optimizer_step`` runs before the first one, ``after_optimizer_step``
    after the last one. Idempotent: attaching again replaces the table's earlier hooks (a second call
    never makes a step run them twice).
    """
    if not optimizers:
        raise ValueError("attach() needs at least one optimizer")
    tables = [m for m in model.modules() if isinstance(m, CompressedEmbeddingBag)]
    handles = []
    for table in tables:
        for old in _STEP_HOOKS.pop(table, ()):
            old.remove()
        table.bind_optimizers(optimizers)
        mine = []
        if type(table).before_optimizer_step is not CompressedEmbeddingBag.before_optimizer_step:
            mine.append(optimizers[0].register_step_pre_hook(lambda *_, t=table: t.before_optimizer_step()))
        if type(table).after_optimizer_step is not CompressedEmbeddingBag.after_optimizer_step:
            mine.append(optimizers[-1].register_step_post_hook(lambda *_, t=table: t.after_optimizer_step()))
        _STEP_HOOKS[table] = mine
        handles += mine
    return handles


def uniform_rows_(weight: Tensor, rows_per_segment: Sequence[int], generator: torch.Generator | None = None) -> None:
    """DLRM-reference initialisation: segment s of ``weight`` ~ U(-sqrt(1/rows_s), +sqrt(1/rows_s))."""
    sizes = torch.tensor([int(r) for r in rows_per_segment], dtype=torch.int64)
    bound = torch.repeat_interleave(torch.sqrt(1.0 / sizes.double()).float(), sizes).to(weight.device)
    with torch.no_grad():
        weight.uniform_(-1.0, 1.0, generator=generator).mul_(bound[:, None])


class IndexedEmbeddingBag(CompressedEmbeddingBag):
    """A table whose lookup is one row of ``self.weight`` per id: ``full`` and ``hash``.

    Subclasses give :meth:`row_index`; pooling then runs in one fused ``embedding_bag`` call with
    sparse gradients, as fast as ``torch.nn.EmbeddingBag``.
    """

    weight: nn.Parameter

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, rows: int, mode: str = "sum",
                 sparse: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, mode)
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(int(rows), self.embedding_dim))

    def row_index(self, ids: Tensor) -> Tensor:
        """Row of ``self.weight`` serving each global id (int64, same shape)."""
        raise NotImplementedError

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(self.row_index(ids), self.weight, sparse=self.sparse)

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        ids, offsets, psw = self._flatten(input, offsets, per_sample_weights)
        if self.validate_ids:
            self.check_ids(ids)
        return F.embedding_bag(self.row_index(ids), self.weight, offsets, mode=self.mode,
                               per_sample_weights=psw, sparse=self.sparse)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []
