"""Row-wise asymmetric quantisation in FBGEMM's fused row layouts (the ``mpcache`` table's rows).

A row of D floats is stored as codes in [0, 2^bits - 1] plus a per-row scale and bias (the row's minimum),
decoding to ``code * scale + bias``; INT8 rows are D code bytes + fp32 scale + fp32 bias, INT4 rows
ceil(D/2) bytes (element 2j in the low nibble) + fp16 scale + fp16 bias, so FBGEMM and PyTorch's
quantized ops read them as they are. Rounding is to nearest or stochastic (unbiased). The layouts and
the error bounds the tests check: docs/native.md, "Quantised rows".
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (8, 4)


def row_bytes(bits: int, dim: int) -> int:
    """Bytes of one stored row: codes plus scale and bias."""
    if bits == 8:
        return dim + 8
    if bits == 4:
        return (dim + 1) // 2 + 4
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _round_half(x: Tensor, up: bool) -> Tensor:
    """fp32 -> fp16 rounded towards +inf (``up``) or -inf, so the fp16 value bounds x."""
    h = x.to(torch.float16)
    inf = torch.full_like(h, float("inf") if up else float("-inf"))
    wrong = h.float() < x if up else h.float() > x
    return torch.where(wrong, torch.nextafter(h, inf), h)


def _scale_bias(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row (scale, bias) for rows with minima ``lo`` and maxima ``hi``, as float32 tensors (n,),
    already rounded to their stored precision."""
    levels = (1 << bits) - 1
    if bits == 8:
        return (hi - lo) / levels, lo
    bias = _round_half(lo, up=False)
    scale = _round_half((hi - bias.float()) / levels, up=True)
    return scale.float(), bias.float()


def _codes(x: Tensor, scale: Tensor, bias: Tensor, bits: int, stochastic: bool,
           generator: torch.Generator | None) -> Tensor:
    levels = (1 << bits) - 1
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # constant rows: all codes 0
    v = (x - bias[:, None]) * inv[:, None]
    if stochastic:
        v = torch.floor(v + torch.rand(v.shape, device=v.device, generator=generator))
    else:
        v = torch.round(v)
    # The clamp only absorbs float rounding at the range ends; the range covers every value.
    return v.clamp_(0, levels).to(torch.uint8)


def pack_int4(codes: Tensor) -> Tensor:
    """(n, D) uint8 codes in [0, 15] -> (n, ceil(D/2)) bytes, even element in the low nibble."""
    n, d = codes.shape
    if d % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    pairs = codes.view(n, -1, 2)
    return pairs[:, :, 0] | (pairs[:, :, 1] << 4)


def unpack_int4(packed: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`pack_int4`: (n, ceil(D/2)) bytes -> (n, D) uint8 codes."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=2)  # (n, ceil(D/2), 2)
    return both.reshape(packed.shape[0], 2 * packed.shape[1])[:, :dim]


def quantize_rows(x: Tensor, bits: int, stochastic: bool = False,
                  generator: torch.Generator | None = None, previous: Tensor | None = None) -> Tensor:
    """(n, D) float -> (n, row_bytes(bits, D)) uint8 in the fused layout of ``bits``.

    ``previous`` ((n, row_bytes) fused rows, optional): the rows' current storage. A row that still fits
    its previous grid (every value within [bias, bias + L·scale]) and still spans at least half of it
    keeps that scale and bias, so an element whose value did not move keeps its code exactly and one that
    moved by u picks up a rounding variance of at most |u|·scale instead of up to scale²/4 (see
    :func:`grid_kept`). Other rows get a fresh grid from their own min and max.
    """
    x = x.detach().float()
    n, d = x.shape
    if n == 0:
        return torch.empty(0, row_bytes(bits, d), dtype=torch.uint8, device=x.device)
    lo, hi = torch.aminmax(x, dim=1)
    scale, bias = _scale_bias(lo, hi, bits)
    if previous is not None:
        old_scale, old_bias = scale_bias_of(previous, bits, d)
        keep = grid_kept(lo, hi, old_scale, old_bias, bits)
        scale, bias = torch.where(keep, old_scale, scale), torch.where(keep, old_bias, bias)
    codes = _codes(x, scale, bias, bits, stochastic, generator)
    if bits == 8:
        tail = torch.stack([scale, bias], dim=1).contiguous().view(torch.uint8)  # (n, 8)
        return torch.cat([codes, tail], dim=1)
    tail = torch.stack([scale.half(), bias.half()], dim=1).contiguous().view(torch.uint8)  # (n, 4)
    return torch.cat([pack_int4(codes), tail], dim=1)


def grid_kept(lo: Tensor, hi: Tensor, scale: Tensor, bias: Tensor, bits: int) -> Tensor:
    """(n,) bool: rows (minima ``lo``, maxima ``hi``) that lie inside the grid (scale, bias) and span at
    least half of it.

    Why a write-back keeps the grid: requantising a row on a fresh grid moves every element off its old
    code, and stochastic rounding then adds a variance of frac·(1 - frac)·scale² per element (scale²/6 on
    average) at every write, however small the update; over the hundreds of writes an uncached row gets,
    that noise walks like a random walk (at INT4 up to half the row's range). On a kept grid an element
    that sits on a code stays there, and one moved by u < scale gets variance (u/scale)(1 - u/scale)·scale²
    <= |u|·scale, which vanishes with the update.
    """
    levels = (1 << bits) - 1
    top = bias + levels * scale
    return (lo >= bias) & (hi <= top) & (scale > 0) & (2 * (hi - lo) >= top - bias)


def scale_bias_of(rows: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor]:
    """Stored (scale, bias) of fused rows, as float32 (n,) each."""
    width = dim if bits == 8 else (dim + 1) // 2
    dtype = torch.float32 if bits == 8 else torch.float16
    sb = rows[:, width:].clone(memory_format=torch.contiguous_format).view(dtype).float()  # (n, 2), aligned
    return sb[:, 0], sb[:, 1]


def dequantize_rows(rows: Tensor, bits: int, dim: int) -> Tensor:
    """(n, row_bytes) uint8 fused rows -> (n, D) float32."""
    scale, bias = scale_bias_of(rows, bits, dim)
    codes = rows[:, :dim] if bits == 8 else unpack_int4(rows[:, :(dim + 1) // 2], dim)
    return codes.float() * scale[:, None] + bias[:, None]
