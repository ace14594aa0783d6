"""The serving form of an AFM-compressed model: the same function, computed with the factorisation's algebra.

:func:`serving_model` turns a compressed DLRM, DeepFM or DCN-v2 into a frozen module (eval only, no
parameters, no host syncs, exportable with ``torch.export``) taking ``(dense (B, I), sparse (B, F) local
ids)`` to logits (B,):

* ``lowrank`` table: every field's k_f-dim codes come from ONE gather over a flat buffer (no loop over
  rank groups, no per-call layout checks); DLRM and DCN-v2 then map them to D dims with one batched
  matmul.
* DeepFM: each field's map is rewritten to orthonormal form, e_f = u_f Q_fᵀ + c⊥_f with Q_fᵀQ_f = I and
  Q_fᵀc⊥_f = 0 (a QR of B_f, applied to the stored codes once). Then the FM's sum of squares is
  ||z||² + const, and the deep network's first layer, the FM's sum vector and the first-order term are all
  linear in the concatenated codes z (B, Σk_f): one matrix product over [dense, z] replaces the D-dim
  embeddings, the first layer's (I + F·D) inputs shrink to I + Σk_f, and the embeddings are never built.
* a factorised linear layer (two products) is multiplied back into one where two cost more than one:
  see :func:`~embcompress.compress.layers.factorised_is_cheaper`.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..embeddings.lowrank import LowRankEmbeddingBag
from ..embeddings.ops import hash_into
from ..models.blocks import SparseArch
from .layers import FactorizedLinear, factorised_is_cheaper

RANGE_MESSAGE = "a local id is outside its field's range [0, field size)"


class FieldCodes(nn.Module):
    """Local ids (B, F) -> every field's row of ``blocks`` (one (rows_f, k_f) matrix per field) as (B, F, k_max).

    All rows lie end to end in one flat buffer; a row of field f starts at ``base_f + row·k_f``, and one
    ``embedding`` over the buffer's sliding-window view (``unfold``: no copy) reads k_max floats from
    there. Entries past k_f are the next row's values, not zeros: a consumer multiplies them by zeros
    (:attr:`valid` marks the real ones)."""

    def __init__(self, table: LowRankEmbeddingBag, blocks: Sequence[Tensor]) -> None:
        super().__init__()
        widths = [int(b.shape[1]) for b in blocks]
        self.width = max(widths)
        self.hashed = bool((table.rows < table.sizes).any())
        flat = torch.cat([b.detach().reshape(-1) for b in blocks] + [blocks[0].new_zeros(self.width)])
        self.register_buffer("flat", flat)
        self.register_buffer("sizes", table.sizes.clone())
        self.register_buffer("rows", table.rows.clone())
        self.register_buffer("rank", torch.tensor(widths))
        self.register_buffer("base", torch.tensor([0] + [int(b.numel()) for b in blocks[:-1]]).cumsum(0))
        self.register_buffer("valid", torch.arange(self.width)[None, :] < self.rank[:, None])  # (F, k_max)

    def forward(self, sparse: Tensor, field_major: bool = False) -> Tensor:
        """(B, F, k_max), or (F, B, k_max) with ``field_major``."""
        local = sparse.long()
        torch._assert_async(((local >= 0) & (local < self.sizes)).all(), RANGE_MESSAGE)
        row = hash_into(local, self.rows, self.sizes) if self.hashed else local
        start = torch.addcmul(self.base, row, self.rank)  # base_f + row·k_f
        return F.embedding(start.t() if field_major else start, self.flat.unfold(0, self.width, 1))


class LowRankSparseArch(nn.Module):
    """Local ids (B, F) -> embeddings (B, F, D) of a ``lowrank`` table: one gather of every field's code,
    one batched matmul by the maps B_f (zero rows past k_f), plus the biases."""

    def __init__(self, table: LowRankEmbeddingBag) -> None:
        super().__init__()
        num_fields, dim = len(table.field_sizes), table.embedding_dim
        factors = [tuple(t.detach() for t in table.field_factors(f)) for f in range(num_fields)]
        self.codes = FieldCodes(table, [a for a, _ in factors])
        proj = torch.zeros(num_fields, self.codes.width, dim, dtype=table.bias.dtype)
        for f, (_, b) in enumerate(factors):
            proj[f, :b.shape[0]] = b
        self.register_buffer("proj", proj)  # (F, k_max, D)
        self.register_buffer("bias", table.bias.detach().clone().unsqueeze(1))  # (F, 1, D)

    def forward(self, sparse: Tensor) -> Tensor:
        z = self.codes(sparse, field_major=True)  # (F, B, k_max)
        return torch.baddbmm(self.bias, z, self.proj).transpose(0, 1)  # (B, F, D)


@torch.no_grad()
def merged(layer: FactorizedLinear, batch_size: int | None = None) -> nn.Module:
    """``layer`` as one linear map when two products cost more than one at ``batch_size``, else ``layer``."""
    if "second" not in layer._modules:
        return layer
    first, second = layer.first, layer.second
    if factorised_is_cheaper(first.in_features, first.out_features, second.out_features, batch_size):
        return layer
    one = nn.Linear(first.in_features, second.out_features).to(first.weight.device)
    one.weight.copy_((second.weight.double() @ first.weight.double()).to(first.weight.dtype))
    b1 = first.bias.double() if first.bias is not None else torch.zeros(first.out_features, dtype=torch.float64)
    one.bias.copy_((second.weight.double() @ b1 + second.bias.double()).to(first.weight.dtype))
    return one


def _merge_layers(model: nn.Module, batch_size: int | None) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FactorizedLinear):
                setattr(parent, name, merged(child, batch_size))


def _freeze(model: nn.Module) -> nn.Module:
    """Parameters become buffers (serving holds no trainable state), eval mode."""
    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, p.detach())
    return model.eval()


class DeepFMServing(nn.Module):
    """DeepFM over a ``lowrank`` table computed from the codes: one product over [dense, z] gives the deep
    network's first layer, the FM's sum vector s and every linear term; FM = (||s||² − ||z||² − const)/2."""

    def __init__(self, model: nn.Module, batch_size: int | None = None) -> None:
        super().__init__()
        table: LowRankEmbeddingBag = model.embedding
        num_fields, dim, num_dense = len(table.field_sizes), table.embedding_dim, model.num_dense
        f64 = torch.float64
        first, second, rest = _first_layer(model.deep, batch_size)
        w, b = first.weight.double(), first.bias.double()  # (n1, I + F·D), (n1,)
        p = model.first_order_proj.double()  # (F, D)
        dense_linear = model.dense_linear
        # rows of the fused weight for the dense inputs, then for each field's codes
        w_rows, s_rows = [w[:, :num_dense].T], [torch.zeros(num_dense, dim, dtype=f64)]
        lin_rows = [dense_linear.weight.double().reshape(-1, 1) if dense_linear is not None
                    else torch.zeros(num_dense, 1, dtype=f64)]
        const = model.bias.double() + (dense_linear.bias.double().sum() if dense_linear is not None else 0.0)
        s0 = torch.zeros(dim, dtype=f64)
        blocks = []
        for f in range(num_fields):
            a, bf = (t.detach().double() for t in table.field_factors(f))  # (rows_f, k), (k, D)
            c = table.bias[f].double()
            q, r = torch.linalg.qr(bf.T)  # B_f = Rᵀ Qᵀ with Q (D, k) orthonormal columns
            t = q.T @ c
            c_perp = c - q @ t  # e_f = (a_f Rᵀ + t) Qᵀ + c⊥
            blocks.append((a @ r.T + t).to(table.bias.dtype))
            w_f = w[:, num_dense + f * dim:num_dense + (f + 1) * dim]  # (n1, D)
            w_rows.append((w_f @ q).T)
            b = b + w_f @ c_perp
            s_rows.append(q.T)
            s0 = s0 + c_perp
            lin_rows.append((q.T @ p[f]).reshape(-1, 1))
            const = const + c_perp @ p[f] - 0.5 * (c_perp @ c_perp)
        self.codes = FieldCodes(table, blocks)
        self.register_buffer("columns", self.codes.valid.flatten().nonzero().squeeze(1))  # real code entries
        hidden = torch.cat(w_rows)  # (I + K, n1)
        if second is not None and not factorised_is_cheaper(hidden.shape[0], hidden.shape[1], second.out_features,
                                                            batch_size):
            # the first map is narrower now (I + K inputs, not I + F·D): one product may beat two
            w2 = second.weight.double()
            hidden, b = hidden @ w2.T, w2 @ b + second.bias.double()
            second = None
        if second is not None:
            rest.insert(0, second)
        dtype = table.bias.dtype
        self.num_dense, self.hidden, self.dim = num_dense, hidden.shape[1], dim
        fused = torch.cat([hidden, torch.cat(s_rows), torch.cat(lin_rows)], dim=1)  # (I + K, n1 + D + 1)
        self.register_buffer("weight", fused.to(dtype).contiguous())
        self.register_buffer("bias", torch.cat([b, s0, const.reshape(1)]).to(dtype))
        self.rest = nn.Sequential(*rest, copy.deepcopy(model.deep[1]))

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        z = self.codes(sparse).flatten(1).index_select(1, self.columns)  # (B, K)
        x = torch.cat([dense, z], dim=1) if self.num_dense else z  # (B, I + K)
        out = torch.addmm(self.bias, x, self.weight)  # (B, n1 + D + 1)
        h, s, lin = out.split([self.hidden, self.dim, 1], dim=1)
        fm = 0.5 * (s.pow(2).sum(1) - z.pow(2).sum(1))
        return lin.squeeze(1) + fm + self.rest(h).squeeze(-1)


def _first_layer(deep: nn.Sequential, batch_size: int | None) -> tuple[nn.Linear, nn.Linear | None, list[nn.Module]]:
    """Copies of the deep network's first linear map, a factorised first layer's second map (or None),
    and the hidden layers after it (factorised ones merged where one product is cheaper)."""
    hidden = [merged(m, batch_size) if isinstance(m, FactorizedLinear) else m
              for m in copy.deepcopy(deep[0]).children()]
    head = hidden[0]
    if isinstance(head, FactorizedLinear):
        return head.first, head._modules.get("second"), hidden[1:]
    return head, None, hidden[1:]


@torch.no_grad()
def serving_model(model: nn.Module, batch_size: int | None = None) -> nn.Module:
    """A frozen copy of a (compressed) model that computes its logits with the factorisation's algebra.

    ``batch_size``: the rows per call it will serve (None: large batches); it decides which factorised
    layers are merged back into one product (:func:`~embcompress.compress.layers.factorised_is_cheaper`).

    ``model`` is not changed. The ``lowrank`` rewrites apply where its table is a ``lowrank`` one (any other
    table is served as it is), the merge of factorised layers everywhere."""
    table = getattr(model, "embedding", None)
    lowrank = isinstance(table, LowRankEmbeddingBag)
    if (lowrank and type(model).__name__ == "DeepFM" and getattr(model, "first_order_arch", None) is None
            and len(model.deep[0])):  # an FM term and a deep network with a hidden layer to fold into
        return _freeze(DeepFMServing(model, batch_size).eval())
    arches = [m for m in model.modules() if isinstance(m, SparseArch)]
    memo: dict[int, Any] = {id(a.embedding): None for a in arches} if lowrank else {}
    served = copy.deepcopy(model, memo)
    for parent in list(served.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseArch) and lowrank:
                setattr(parent, name, LowRankSparseArch(table))
    _merge_layers(served, batch_size)
    return _freeze(served)
