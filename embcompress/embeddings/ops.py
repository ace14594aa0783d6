"""Integer helpers shared by the tables: a 64-bit hash, field lookup, and splitting a row budget."""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed64(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


def _shift_right_logical(z: Tensor, s: int) -> Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits.
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash64(x: Tensor, seed: int = 0) -> Tensor:
    """SplitMix64 finaliser of ``x + (seed + 1) * golden``: a well-mixed, non-negative int64 (63 bits).

    Integer arithmetic only (int64 multiplication wraps modulo 2^64, as in C), so it is exact for any
    id, identical on CPU and CUDA, and matches :func:`hash64_reference`. Different seeds give
    independent-looking functions, which CAFE's multi-level hashing relies on.
    """
    z = x.long() + _signed64((seed + 1) * _GOLDEN)  # a new tensor: the rest runs in place on it
    z.bitwise_xor_(_shift_right_logical(z, 30)).mul_(_signed64(_M1))
    z.bitwise_xor_(_shift_right_logical(z, 27)).mul_(_signed64(_M2))
    z.bitwise_xor_(_shift_right_logical(z, 31))
    return z.bitwise_and_(0x7FFFFFFFFFFFFFFF)


def hash64_reference(x: int, seed: int = 0) -> int:
    """Pure-Python :func:`hash64` for one id (used by tests)."""
    z = (x + (seed + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def hash_into(local: Tensor, rows: Tensor, sizes: Tensor, seed: int = 0) -> Tensor:
    """Slot among ``rows`` serving each local id: the id itself where its field is whole
    (``rows >= sizes``), else ``hash64(local, seed) % rows``. All arguments broadcast elementwise."""
    return torch.where(rows < sizes, hash64(local, seed) % rows, local)


def field_hash_rows(ids: Tensor, field: Tensor, starts: Tensor, sizes: Tensor, rows: Tensor, row_base: Tensor,
                    seed: int = 0) -> Tensor:
    """Row serving each global id in per-field hash tables laid out one after another: ``row_base[f]``
    plus :func:`hash_into` of the id's local id, for ``f = field`` (the ids' fields, :func:`field_of`).
    The per-field values are gathered with ``index_select``, about 3x faster than ``x[f]`` on the CPU."""
    f = field.reshape(-1)
    local = ids.reshape(-1) - starts.index_select(0, f)
    slot = hash_into(local, rows.index_select(0, f), sizes.index_select(0, f), seed)
    return (row_base.index_select(0, f) + slot).view(ids.shape)


def field_hash_rows_few(ids: Sequence[int], starts: Sequence[int], sizes: Sequence[int], rows: Sequence[int],
                        row_base: Sequence[int], seed: int = 0) -> list[int]:
    """:func:`field_hash_rows` (fields by :func:`field_of`) for a handful of global ids as Python ints,
    the per-field values as lists: a few ids cost ~20 small tensor ops there, microseconds here."""
    out = []
    for i in ids:
        f = max(bisect.bisect_right(starts, i) - 1, 0)
        local = i - starts[f]
        out.append(row_base[f] + (hash64_reference(local, seed) % rows[f] if rows[f] < sizes[f] else local))
    return out


def field_starts(field_sizes: Sequence[int]) -> Tensor:
    """Global id of each field's first row, int64 (F,)."""
    starts = [0]
    for s in list(field_sizes)[:-1]:
        starts.append(starts[-1] + int(s))
    return torch.tensor(starts, dtype=torch.int64)


def field_of(ids: Tensor, starts: Tensor) -> Tensor:
    """Field index of each global id, given :func:`field_starts`."""
    return torch.bucketize(ids, starts[1:], right=True)


def bag_of_lookups(offsets: Tensor, n: int) -> Tensor:
    """Bag of each of the ``n`` lookups of an ``embedding_bag`` call with these ``offsets``."""
    return torch.bucketize(torch.arange(n, device=offsets.device), offsets, right=True) - 1


def mean_weights(offsets: Tensor, bag: Tensor, n: int) -> Tensor:
    """Per-sample weight, for lookups in bags ``bag``, that turns a bag's sum into its mean: 1 / the number
    of lookups in the bag (``n`` lookups in all)."""
    lengths = torch.diff(offsets, append=torch.tensor([n], device=offsets.device))
    return 1.0 / lengths.index_select(0, bag).clamp(min=1).float()


def topk_ties_first(values: Tensor, k: int, largest: bool = True) -> Tensor:
    """Positions of the ``k`` largest (or smallest) of ``values`` (1-D), best first, ties to the lower
    position: the same answer on every device. ``torch.topk`` leaves the order of ties to the backend,
    and the CPU and CUDA kernels differ, so a sketch or cache choosing among equal counts with it would
    diverge between devices.

    Non-negative float32 values (counts, scores) are packed with their position into one int64 key, so
    one ``topk`` over distinct keys does it; any other values take a stable sort.
    """
    k = min(int(k), values.numel())
    n = values.numel()
    if values.dtype == torch.float32 and n < 2**31 and (n == 0 or bool(values.min() >= 0)):
        # The bits of a non-negative float32 order like the float (+ 0.0 turns -0.0 into 0.0).
        bits = (values + 0.0).view(torch.int32).long() << 31
        pos = torch.arange(n, device=values.device)
        key = bits + (0x7FFFFFFF - pos if largest else pos)
        return torch.topk(key, k, largest=largest, sorted=True).indices
    return torch.sort(values, descending=largest, stable=True)[1][:k]


def _hand_out(rows: list[int], sizes: list[int], left: int) -> list[int]:
    """Give ``left`` more rows, one each, to the largest fields that are not whole yet (in place)."""
    for f in sorted(range(len(sizes)), key=lambda f: -sizes[f]):
        if left <= 0:
            break
        if rows[f] < sizes[f]:
            rows[f] += 1
            left -= 1
    return rows


def allocate_rows(field_sizes: Sequence[int], total_rows: int, min_rows: Sequence[int] | None = None) -> list[int]:
    """Split ``total_rows`` among fields: field f gets ``max(min_rows[f], min(n_f, cap))`` rows.

    The cap is the largest that fits, and the rows left over go one each to the largest fields, so the
    total is used exactly while it is below ``sum(field_sizes)``. Small fields stay whole; every large
    field gets about the same number of rows (the rule of the DLRM reference's ``--max-ind-range``).
    """
    sizes = [int(s) for s in field_sizes]
    mins = [1] * len(sizes) if min_rows is None else [int(m) for m in min_rows]

    def used(cap: int) -> int:
        return sum(max(m, min(n, cap)) for n, m in zip(sizes, mins))

    if used(0) > total_rows:
        raise ValueError(f"{total_rows} rows cannot give each of {len(sizes)} fields its minimum ({used(0)} in all)")
    lo, hi = 0, max(sizes)
    while lo < hi:  # largest cap with used(cap) <= total_rows
        mid = (lo + hi + 1) // 2
        if used(mid) <= total_rows:
            lo = mid
        else:
            hi = mid - 1
    rows = [max(m, min(n, lo)) for n, m in zip(sizes, mins)]
    return _hand_out(rows, sizes, total_rows - sum(rows))


def whole_field_max(total_rows: int, field_sizes: Sequence[int]) -> float:
    """Largest field the CAFE artifact leaves uncompressed at the ratio ``total_rows / sum(field_sizes)``:
    ``400 / (1 - log2(ratio))``, i.e. 28 values at 10,000×, 37 at 1,000×, 54 at 100×."""
    ratio = min(1.0, total_rows / max(1, sum(int(n) for n in field_sizes)))
    return 400.0 / (1.0 - math.log2(ratio))


def allocate_rows_proportional(field_sizes: Sequence[int], total_rows: int) -> list[int]:
    """Split ``total_rows`` the way the CAFE artifact's hashing baseline does: fields up to
    :func:`whole_field_max` values stay whole, and every other field is compressed by the same ratio
    (``max(1, floor(c * n_f))`` rows, ``c`` the largest that fits), so a field of 2,000 values gets a
    fifth of a row's worth at 10,000× (one row). Rows left over go one each to the largest fields.
    Compare :func:`allocate_rows`, which takes the rows from the largest fields first."""
    sizes = [int(s) for s in field_sizes]
    whole_max = whole_field_max(total_rows, sizes)
    whole = [n <= whole_max for n in sizes]

    def share(c: float) -> list[int]:
        return [n if w else max(1, min(n, math.floor(c * n))) for n, w in zip(sizes, whole)]

    def used(c: float) -> int:
        return sum(share(c))

    if used(0.0) > total_rows:
        raise ValueError(f"{total_rows} rows cannot keep the fields of up to {whole_max:.0f} values whole "
                         f"and give every other field one row ({used(0.0)} in all)")
    lo, hi = 0.0, 1.0
    for _ in range(64):  # largest c with used(c) <= total_rows
        mid = (lo + hi) / 2
        if used(mid) <= total_rows:
            lo = mid
        else:
            hi = mid
    rows = share(lo)
    return _hand_out(rows, sizes, total_rows - sum(rows))


def fewest_rows(field_sizes: Sequence[int], rule: str = "capped") -> int:
    """Fewest rows that ``rule`` can split among the fields: one per field for "capped"; for
    "proportional" the fields it keeps whole plus one row per other field, which itself depends on the
    total (the least fixed point, reached by iterating from one row per field)."""
    sizes = [int(n) for n in field_sizes]
    if rule == "capped":
        return len(sizes)
    total = len(sizes)
    while True:
        whole_max = whole_field_max(total, sizes)
        need = sum(n if n <= whole_max else 1 for n in sizes)
        if need <= total:
            return total
        total = need


ALLOCATIONS = {"capped": allocate_rows, "proportional": allocate_rows_proportional}


def allocate(field_sizes: Sequence[int], total_rows: int, rule: str = "capped") -> list[int]:
    """Split ``total_rows`` among fields by ``rule``: "capped" (:func:`allocate_rows`, the default) or
    "proportional" (:func:`allocate_rows_proportional`, the CAFE artifact's hashing baseline)."""
    if rule not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {rule!r}")
    return ALLOCATIONS[rule](field_sizes, total_rows)
