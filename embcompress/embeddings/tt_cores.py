"""Tensor-train helpers for the ``tt`` table: shapes, mixed-radix indices, the core chain, init, planning.

Notation (TT-Rec): a table of N rows and D columns is viewed as a tensor with row modes
p_1..p_T (N <= prod p) and column modes q_1..q_T (D = prod q). Core t has shape (p_t, r_{t-1}, q_t, r_t)
with r_0 = r_T = 1. Row i is split into mixed-radix digits (i_1..i_T), i_1 most significant; the row is
the chain product G_1[i_1] G_2[i_2] ... G_T[i_T], a (q_1..q_T)-tensor flattened to D (q_1 most significant).

Several TT "groups" (one per large field, or one for all of them) share the same T, q and ranks, so their
cores are stacked along the p axis and one batched chain product serves every group: group g's slice of
core t is rows ``core_base[g, t] .. core_base[g, t] + p_t^g``.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from . import native

FLOAT_BYTES = 4
INDEX_BYTES = 8
COUNT_BYTES = 4
#: unused cache / tracker slot; larger than any valid id, so it sorts last and never matches
EMPTY = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------- shapes
def factor_dim(dim: int, num_cores: int) -> list[int]:
    """Split ``dim`` into ``num_cores`` factors as evenly as possible, ascending (q_t; 1 allowed).

    Ascending order keeps the chain product cheap: the running (Q, r) block grows only at the end.
    """
    primes, n, k = [], int(dim), 2
    while k * k <= n:
        while n % k == 0:
            primes.append(k)
            n //= k
        k += 1
    if n > 1:
        primes.append(n)
    q = [1] * num_cores
    for prime in sorted(primes, reverse=True):  # largest prime onto the currently smallest factor
        q[q.index(min(q))] *= prime
    return sorted(q)


def suggest_p(n: int, num_cores: int) -> list[int]:
    """Row modes p_t close to n^(1/T) with prod p >= n and as little waste as the greedy finds."""
    c = max(1, int(round(n ** (1.0 / num_cores))))
    while c ** num_cores < n:
        c += 1
    while c > 1 and (c - 1) ** num_cores >= n:
        c -= 1
    p = [c] * num_cores
    for t in range(num_cores):  # shave each mode while the product still covers n
        while p[t] > 1 and math.prod(p) // p[t] * (p[t] - 1) >= n:
            p[t] -= 1
    return p


def auto_num_cores(n: int) -> int:
    """2 cores for small tables, 3 (TT-Rec's choice) up to 1e9 rows, 4 beyond (keeps p_t near 1000 or less)."""
    if n <= 10_000:
        return 2
    return 3 if n <= 1_000_000_000 else 4


def tt_params(p: Sequence[int], q: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of floats in the cores of one TT with row modes p, column modes q and inner ranks."""
    r = [1, *ranks, 1]
    return sum(p[t] * r[t] * q[t] * r[t + 1] for t in range(len(p)))


# ---------------------------------------------------------------------------------------------- indices
def split_index(x: Tensor, radix: Tensor) -> Tensor:
    """Mixed-radix digits of int64 ``x`` (n,): radix (T,) or per-id (n, T); returns (n, T), most significant first.

    Integer ``//`` and ``%`` only, so it is exact for any int64 id.
    """
    radix = radix.expand(x.shape[0], -1) if radix.dim() == 1 else radix
    digits = []
    rest = x
    for t in range(radix.shape[1] - 1, -1, -1):
        digits.append(rest % radix[:, t])
        if t:  # the most significant digit leaves no rest to carry
            rest = rest // radix[:, t]
    return torch.stack(digits[::-1], dim=1)


def join_index(digits: Tensor, radix: Tensor) -> Tensor:
    """Inverse of :func:`split_index`."""
    radix = radix.expand(digits.shape[0], -1) if radix.dim() == 1 else radix
    x = torch.zeros(digits.shape[0], dtype=torch.int64, device=digits.device)
    for t in range(digits.shape[1]):
        x = x * radix[:, t] + digits[:, t]
    return x


# ---------------------------------------------------------------------------------------------- rows
_SOURCE = Path(__file__).with_name("tt_native.cpp")


def native_library() -> ctypes.CDLL | None:
    """``tt_native.cpp`` built and loaded (:func:`native.loaded`), or None (turned off, or no compiler)."""
    return native.loaded(_SOURCE, _declare_kernels)


def _declare_kernels(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tt_dedup.argtypes = [i64, p, i64, p, p, p]
    lib.tt_dedup.restype = i64
    lib.tt_route.argtypes = [i64, p, i64, p, i64, p, p, p, i64, p, p, i64, p, p, p, p, p, p, p, p, p]
    lib.tt_route.restype = None
    lib.tt_assemble.argtypes = [i64, i64, i64, p, i64, i64, p, p, p, p, p]
    lib.tt_assemble.restype = None
    for name in ("tt_scatter_f32", "tt_scatter_f64"):
        getattr(lib, name).argtypes = [i64, i64, p, i64, p, i64, p]
        getattr(lib, name).restype = None
    lib.tt_tracker_merge.argtypes = [i64, p, p, i64, p, p, ctypes.c_double, i64]
    lib.tt_tracker_merge.restype = i64
    lib.tt_chain_forward.argtypes = [i64, i64, i64, p, p, p, p]
    lib.tt_chain_forward.restype = None
    lib.tt_chain_backward.argtypes = [i64, i64, i64, p, p, p, p, p, p]
    lib.tt_chain_backward.restype = None


def index_add_rows(rows: int, index: Tensor, src: Tensor) -> Tensor:
    """``zeros(rows, k).index_add_(0, index, src)`` for src (n, k): in one compiled pass on the CPU
    (``tt_native.cpp``, adding in index order as index_add_ does, so the sums round alike), else index_add_."""
    out = src.new_zeros(rows, src.shape[1])
    lib = native_library() if src.device.type == "cpu" and src.dtype in (torch.float32, torch.float64) else None
    if lib is None or index.dtype != torch.int64 or src.stride(1) != 1 or torch.compiler.is_compiling():
        return out.index_add_(0, index, src)
    scatter = lib.tt_scatter_f32 if src.dtype == torch.float32 else lib.tt_scatter_f64
    scatter(index.numel(), src.shape[1], index.data_ptr(), index.stride(0), src.data_ptr(), src.stride(0),
            out.data_ptr())
    return out


class _TTRows(torch.autograd.Function):
    """Chain product of gathered core slices as batched matrix products, one per core (see :func:`tt_rows`).

    Each id's slice of core t is gathered as a contiguous (r_{t-1}, q_t r_t) matrix and the running
    (Q, r_{t-1}) product is multiplied by it with one ``bmm`` over all ids. Forward keeps every partial
    product, so backward needs no recomputation: per core two ``bmm`` (slice gradient, running gradient)
    and one index add into the (small, dense) core gradient (:func:`index_add_rows`).
    """

    @staticmethod
    def forward(ctx: Any, core_rows: Tensor, *cores: Tensor) -> Tensor:
        n = core_rows.shape[0]
        slices = [c.reshape(c.shape[0], -1).index_select(0, core_rows[:, t]) for t, c in enumerate(cores)]
        acc = slices[0].view(n, cores[0].shape[2], cores[0].shape[3])  # (n, q_1, r_1)
        partial = [acc]
        for t in range(1, len(cores)):
            _, r_in, q, r_out = cores[t].shape
            acc = torch.bmm(acc, slices[t].view(n, r_in, q * r_out)).view(n, -1, r_out)  # (n, Q q, r_out)
            partial.append(acc)
        ctx.save_for_backward(core_rows, *slices[1:], *partial[:-1])
        ctx.shapes = [c.shape for c in cores]
        return acc.view(n, -1)  # r_T = 1: (n, D)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        shapes = ctx.shapes
        nc = len(shapes)
        core_rows, slices, partial = ctx.saved_tensors[0], ctx.saved_tensors[1:nc], ctx.saved_tensors[nc:]
        n = core_rows.shape[0]
        grad = grad_out.contiguous()
        grads: list[Tensor | None] = [None] * nc
        for t in range(nc - 1, -1, -1):
            p, r_in, q, r_out = shapes[t]
            if t == 0:
                dslice = grad.reshape(n, q * r_out)
            else:
                a = partial[t - 1]  # (n, Q, r_in)
                g = grad.reshape(n, a.shape[1], q * r_out)
                dslice = torch.bmm(a.transpose(1, 2), g).reshape(n, -1)  # (n, r_in q r_out)
                grad = torch.bmm(g, slices[t - 1].view(n, r_in, q * r_out).transpose(1, 2))  # (n, Q, r_in)
            if ctx.needs_input_grad[t + 1]:
                grads[t] = index_add_rows(p, core_rows[:, t], dslice).view(shapes[t])
        return (None, *grads)


def tt_rows(cores: Sequence[Tensor], core_rows: Tensor) -> Tensor:
    """Chain product of the selected core slices: cores[t] (P_t, r_{t-1}, q_t, r_t), core_rows (n, T) -> (n, D).

    A custom autograd Function (:class:`_TTRows`): one gather and one ``bmm`` per core, and the core
    gradients by hand (two ``bmm`` and an ``index_add_`` each). On the CPU, where every product is one that
    ``bmm`` computes with its plain loop, the same arithmetic in two compiled passes (:class:`_TTChain`).
    """
    if core_rows.shape[0] == 0:
        return cores[0].new_zeros(0, math.prod(c.shape[2] for c in cores))
    if chain_compiled(cores, core_rows):
        return _TTChain.apply(core_rows, *cores)
    return _TTRows.apply(core_rows, *cores)


#: torch.bmm multiplies on the CPU with a plain loop (each entry summed in order of the contraction
#: index, no FMA) below this many multiply-adds per matrix product, and through BLAS above it
_BMM_LOOP_BELOW = 400


def chain_compiled(cores: Sequence[Tensor], core_rows: Tensor) -> bool:
    """Whether :class:`_TTChain` serves this product: CPU, float32/float64 cores alike and contiguous, int64
    core rows, every core's ``bmm`` on its plain loop (so the compiled loop rounds alike), not tracing."""
    dtype = cores[0].dtype
    if (core_rows.device.type != "cpu" or core_rows.dtype != torch.int64 or dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling()):
        return False
    q = 1
    for t, c in enumerate(cores):
        if c.dtype != dtype or not c.is_contiguous() or c.device.type != "cpu":
            return False
        _, r_in, qt, r_out = c.shape
        if t and q * r_in * qt * r_out >= _BMM_LOOP_BELOW:
            return False
        q *= qt
    return native_library() is not None


def chain_forward(lib: ctypes.CDLL, core_rows: Tensor, cores: Sequence[Tensor]) -> tuple[Tensor, tuple]:
    """Rows (n, D) of the chain product by ``tt_chain_forward`` (``tt_native.cpp``; :func:`chain_compiled`
    says where it serves), and what :func:`chain_backward` reads: the shapes and the running products."""
    n, nc = core_rows.shape[0], len(cores)
    shape = (ctypes.c_int64 * (3 * nc))(*(s for c in cores for s in c.shape[1:]))  # (r_in, q, r_out) per core
    q, widths = cores[0].shape[2], []  # per id, the running product after cores 1..T-1
    for c in cores[1:]:
        q *= c.shape[2]
        widths.append(q * c.shape[3])
    partial = cores[0].new_empty(n * sum(widths))
    parts = [p.view(n, w) for p, w in zip(partial.split([n * w for w in widths]), widths)]
    void = ctypes.c_void_p
    lib.tt_chain_forward(cores[0].element_size(), n, nc, shape, (void * nc)(*(c.data_ptr() for c in cores)),
                         core_rows.data_ptr(), (void * (nc - 1))(*(p.data_ptr() for p in parts)))
    return parts[-1], (shape, parts[:-1])


def chain_backward(lib: ctypes.CDLL, core_rows: Tensor, cores: Sequence[Tensor], state: tuple,
                   grad: Tensor) -> list[Tensor]:
    """The core gradients of :func:`chain_forward`'s rows for their gradient ``grad`` (n, D)."""
    shape, partial = state
    nc = len(cores)
    grad = grad.to(cores[0].dtype).contiguous()
    dcores = [torch.zeros_like(c) for c in cores]
    void = ctypes.c_void_p
    lib.tt_chain_backward(cores[0].element_size(), core_rows.shape[0], nc, shape,
                          (void * nc)(*(c.data_ptr() for c in cores)), core_rows.data_ptr(),
                          (void * max(1, nc - 2))(*(p.data_ptr() for p in partial)), grad.data_ptr(),
                          (void * nc)(*(d.data_ptr() for d in dcores)))
    return dcores


class _TTChain(torch.autograd.Function):
    """:class:`_TTRows` with the gathers, the small matrix products and the core-gradient sums in two
    compiled passes (:func:`chain_forward`, :func:`chain_backward`): per id the same loops as ``bmm``'s
    for small matrices, so rows and gradients are equal bit for bit."""

    @staticmethod
    def forward(ctx: Any, core_rows: Tensor, *cores: Tensor) -> Tensor:  # type: ignore[override]
        core_rows = core_rows.contiguous()
        rows, ctx.state = chain_forward(native_library(), core_rows, cores)
        ctx.save_for_backward(core_rows, *cores)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        core_rows, *cores = ctx.saved_tensors
        dcores = chain_backward(native_library(), core_rows, cores, ctx.state, grad_out)
        return (None, *(d if need else None for d, need in zip(dcores, ctx.needs_input_grad[1:])))


def reconstruct(cores: Sequence[Tensor], p: Sequence[int], base: Sequence[int] | None = None) -> Tensor:
    """Dense (prod p, D) table of one TT group (for tests and small tables), differentiable."""
    base = [0] * len(p) if base is None else list(base)
    digits = split_index(torch.arange(math.prod(p), device=cores[0].device),
                         torch.tensor(list(p), device=cores[0].device))
    return tt_rows(cores, digits + torch.tensor(base, device=digits.device))


# ---------------------------------------------------------------------------------------------- init
def _trunc_normal_var(a: float = 2.0) -> float:
    """Variance of a standard normal truncated to [-a, a]."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return 1.0 - 2 * a * phi / mass


def core_std(n: int, ranks: Sequence[int], num_cores: int) -> float:
    """Std of the normal (before truncation at ±2 std) for every core entry of a TT over n rows.

    A row entry sums prod(ranks) paths, each a product of T independent entries of variance s^2, so its
    variance is s^(2T) * prod(ranks); equating it with Var U(-a, a) = a^2/3 for a = sqrt(1/n) gives s.
    Truncation at ±2 std shrinks the variance by :func:`_trunc_normal_var`, which the std undoes.
    """
    target = 1.0 / (3.0 * n)
    s2 = (target / math.prod(ranks)) ** (1.0 / num_cores)
    return math.sqrt(s2 / _trunc_normal_var())


def trunc_normal_slice_(core: Tensor, start: int, stop: int, std: float, generator: torch.Generator | None) -> None:
    """Fill rows [start, stop) of a core with N(0, std^2) truncated to ±2 std (keeps values with |w| < 2 std)."""
    with torch.no_grad():
        block = torch.randn(core[start:stop].shape, generator=generator, dtype=core.dtype)
        bad = block.abs() > 2.0
        while bool(bad.any()):  # resample the tails: exact truncated normal, vectorised
            block[bad] = torch.randn(int(bad.sum()), generator=generator, dtype=core.dtype)
            bad = block.abs() > 2.0
        core[start:stop].copy_(block.mul_(std))


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class TTPlan:
    """Everything that fixes a ``tt`` table's tensor sizes (and so its bytes)."""

    field_sizes: list[int]
    dim: int
    groups: list[list[int]]  # field indices per TT group; fields in no group are stored uncompressed
    p_shapes: list[list[int]]  # row modes per group
    q_shape: list[int]
    ranks: list[int]  # T - 1 inner ranks, shared by all groups
    cache_rows: int = 0
    tracker_rows: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def num_cores(self) -> int:
        return len(self.q_shape)

    def raw_fields(self) -> list[int]:
        in_tt = {f for g in self.groups for f in g}
        return [f for f in range(len(self.field_sizes)) if f not in in_tt]

    def tt_rows_total(self) -> int:
        return sum(self.field_sizes[f] for g in self.groups for f in g)

    def nbytes(self) -> int:
        """Exact ``memory_bytes()`` of the table this plan builds (tested against the module)."""
        return plan_bytes(self.field_sizes, self.dim, self.groups, self.p_shapes, self.q_shape, self.ranks,
                          self.cache_rows, self.tracker_rows)


def cache_row_bytes(dim: int, tracker_per_row: int) -> int:
    """Bytes per cached row: the row, its sorted key and slot, and ``tracker_per_row`` tracked (id, count)."""
    return dim * FLOAT_BYTES + 2 * INDEX_BYTES + tracker_per_row * (INDEX_BYTES + COUNT_BYTES)


def plan_bytes(field_sizes: Sequence[int], dim: int, groups: Sequence[Sequence[int]], p_shapes: Sequence[Sequence[int]],
               q_shape: Sequence[int], ranks: Sequence[int], cache_rows: int, tracker_rows: int) -> int:
    in_tt = {f for g in groups for f in g}
    raw = sum(n for f, n in enumerate(field_sizes) if f not in in_tt)
    cores = sum(tt_params(p, q_shape, ranks) for p in p_shapes)
    nf, ng, nt = len(field_sizes), len(groups), len(q_shape)
    floats = (raw + cache_rows) * dim + cores
    index = 3 * nf + 2 * ng * nt + 2 * cache_rows + tracker_rows + 1 + 3  # + steps + stats
    return floats * FLOAT_BYTES + index * INDEX_BYTES + tracker_rows * COUNT_BYTES


def _layout_groups(field_sizes: Sequence[int], tt_fields: list[int], layout: str,
                   num_cores: int) -> tuple[list[list[int]], list[list[int]]]:
    if not tt_fields:
        return [], []
    if layout == "field":
        return [[f] for f in tt_fields], [suggest_p(field_sizes[f], num_cores) for f in tt_fields]
    if layout == "shared":
        return [list(tt_fields)], [suggest_p(sum(field_sizes[f] for f in tt_fields), num_cores)]
    raise ValueError(f"layout must be 'field' or 'shared', got {layout!r}")


def plan_for_budget(field_sizes: Sequence[int], dim: int, budget: int | None, *, layout: str = "auto",
                    **options: Any) -> TTPlan:
    """The largest ``tt`` table within ``budget`` bytes (``None``: the smallest one, for ``byte_range``).

    ``layout="auto"``: one TT per field where that fits, else one shared TT (its row modes are paid once, not
    per field, so it reaches ratios a TT per field cannot on tables of many small fields).
    """
    if layout != "auto":
        return _plan_layout(field_sizes, dim, budget, layout, **options)
    if budget is None:
        plans = [_plan_layout(field_sizes, dim, None, lay, **options) for lay in ("field", "shared")]
        return min(plans, key=TTPlan.nbytes)
    try:
        return _plan_layout(field_sizes, dim, budget, "field", **options)
    except ValueError:
        return _plan_layout(field_sizes, dim, budget, "shared", **options)


def _plan_layout(field_sizes: Sequence[int], dim: int, budget: int | None, layout: str, *,
                 num_cores: int | None = None, q_shape: Sequence[int] | None = None,
                 ranks: Sequence[int] | None = None, max_rank: int = 64, cache_fraction: float = 0.01,
                 cache_max_share: float = 0.75, tracker_per_row: int = 2) -> TTPlan:
    """:func:`plan_for_budget` for one layout:

    1. Uniform rank r from ``max_rank`` down: a field is TT-compressed at rank r only if its TT is smaller
       than its raw rows (small fields stay exact); the cache gets ``cache_fraction`` of the TT rows, at
       most ``cache_max_share`` of the budget. The first r that fits wins.
    2. Ranks are raised one boundary at a time while they fit (finer steps than uniform r -> r+1).
    3. TT fields whose raw rows fit in what is left are stored raw instead (smallest first).
    4. Bytes still left become extra cache rows, so the table lands close under the budget.
    """
    sizes = [int(n) for n in field_sizes]
    big = max(sizes) if layout == "field" else sum(sizes)
    t_cores = int(num_cores) if num_cores else auto_num_cores(big)
    if not 2 <= t_cores <= 4:
        raise ValueError(f"num_cores must be 2, 3 or 4, got {t_cores}")
    q = [int(v) for v in q_shape] if q_shape else factor_dim(dim, t_cores)
    if len(q) != t_cores or math.prod(q) != dim:
        raise ValueError(f"q_shape {q} must have {t_cores} factors with product {dim}")
    if ranks is not None and len(ranks) != t_cores - 1:
        raise ValueError(f"ranks must give the {t_cores - 1} inner ranks, got {list(ranks)}")
    row_b = cache_row_bytes(dim, tracker_per_row)

    def tt_fields_at(r: list[int]) -> list[int]:
        return [f for f, n in enumerate(sizes) if n * dim > tt_params(suggest_p(n, t_cores), q, r)]

    def make(r: list[int], fields: list[int], cache: int) -> TTPlan:
        groups, ps = _layout_groups(sizes, fields, layout, t_cores)
        cache = cache if groups else 0
        return TTPlan(sizes, dim, groups, ps, q, list(r), cache, tracker_per_row * cache)

    def cache_for(fields: list[int]) -> int:
        if cache_fraction <= 0 or not fields or budget is None:
            return 0
        n_tt = sum(sizes[f] for f in fields)
        return max(0, min(int(round(cache_fraction * n_tt)), int(cache_max_share * budget) // row_b))

    candidates = [list(ranks)] if ranks is not None else [[r] * (t_cores - 1) for r in range(max_rank, 0, -1)]
    if budget is None:  # the smallest table: lowest ranks, no cache
        r = candidates[-1]
        return make(r, tt_fields_at(r), 0)
    plan = None
    for r in candidates:
        fields = tt_fields_at(r)
        plan = make(r, fields, cache_for(fields))
        if plan.nbytes() <= budget:
            break
    assert plan is not None
    if plan.nbytes() > budget:  # lowest ranks: give up cache rows before giving up
        over = plan.nbytes() - budget
        plan = make(plan.ranks, [f for g in plan.groups for f in g], max(0, plan.cache_rows - -(-over // row_b)))
        if plan.nbytes() > budget:
            raise ValueError(f"tt cannot fit {budget} bytes (smallest is {plan.nbytes()})")
    fields = [f for g in plan.groups for f in g]
    if ranks is None:  # 2. finer rank steps
        improved = True
        while improved:
            improved = False
            for t in range(t_cores - 1):
                trial = list(plan.ranks)
                trial[t] += 1
                if trial[t] <= max_rank and (cand := make(trial, fields, plan.cache_rows)).nbytes() <= budget:
                    plan, improved = cand, True
    for f in sorted(fields, key=lambda f: sizes[f]):  # 3. exact rows where they fit
        rest = [g for g in fields if g != f]
        if (cand := make(plan.ranks, rest, plan.cache_rows)).nbytes() <= budget:
            plan, fields = cand, rest
    if cache_fraction > 0 and plan.groups:  # 4. leftover bytes -> cache rows
        extra = (budget - plan.nbytes()) // row_b
        plan = make(plan.ranks, fields, plan.cache_rows + extra)
    return plan
