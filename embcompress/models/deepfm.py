"""DeepFM (Guo et al., 2017): first-order terms + factorisation machine + deep network, summed as logits.

Shapes: B batch, F categorical fields, D embedding dim, I dense features.

First-order weights. The FM's first-order term gives every id its own scalar w_id, which is itself an
embedding table (dimension 1) as large as the id space. Two ways are offered:

* default: ``w_id = <v_id, p_f>``, a learned D-vector ``p_f`` per field applied to the id's D-dim
  embedding. No second table, so the injected table's compression ratio is the model's, and every
  method (including ones that cannot build a 1-dim table) works unchanged; the first-order weight is
  the part of the embedding along ``p_f``.
* ``first_order=<table>``: a separately injected 1-dim CompressedEmbeddingBag (e.g. the same method at
  the same ratio, ``make_table(m, field_sizes, 1, compression=R)``); its bytes are then the caller's to count.

Dense features enter the linear term and the deep network (as in DeepCTR's DeepFM), not the FM.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..embeddings.base import CompressedEmbeddingBag
from . import register_model
from .blocks import SparseArch, mlp


class FMInteraction(nn.Module):
    """Second-order FM term over F vectors: sum_{i<j} <v_i, v_j> = ((sum v)^2 - sum v^2).sum / 2 -> (B,)."""

    def forward(self, emb: Tensor) -> Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)  # (B, D)
        sum_of_square = emb.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # (B,)


@register_model("deepfm")
class DeepFM(nn.Module):
    """DeepFM taking its embedding table by injection; ``forward(dense, sparse)`` returns logits (B,)."""

    def __init__(self, embedding: CompressedEmbeddingBag, num_dense: int = 13, deep: Sequence[int] = (400, 400, 400),
                 first_order: CompressedEmbeddingBag | None = None) -> None:
        super().__init__()
        dim = embedding.embedding_dim
        self.sparse_arch = SparseArch(embedding)
        fields = self.sparse_arch.num_fields
        self.num_dense = int(num_dense)
        if first_order is not None:
            if first_order.embedding_dim != 1 or tuple(first_order.field_sizes) != tuple(embedding.field_sizes):
                raise ValueError("first_order must be a 1-dim table over the same fields as the embedding")
            self.first_order_arch: SparseArch | None = SparseArch(first_order)
            self.first_order_proj = None
        else:
            self.first_order_arch = None
            self.first_order_proj = nn.Parameter(torch.zeros(fields, dim))  # p_f, (F, D)
        self.dense_linear = nn.Linear(self.num_dense, 1) if self.num_dense else None
        self.bias = nn.Parameter(torch.zeros(()))
        self.fm = FMInteraction()
        in_dim = self.num_dense + fields * dim
        self.deep = nn.Sequential(mlp([in_dim, *deep]), nn.Linear(deep[-1] if deep else in_dim, 1))

    @property
    def embedding(self) -> CompressedEmbeddingBag:
        return self.sparse_arch.embedding

    def first_order(self, sparse: Tensor, emb: Tensor) -> Tensor:
        """Sum over fields of the first-order weights: (B,)."""
        if self.first_order_arch is not None:
            return self.first_order_arch(sparse).sum(dim=(1, 2))
        return (emb * self.first_order_proj).sum(dim=(1, 2))

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        emb = self.sparse_arch(sparse)  # (B, F, D)
        logit = self.bias + self.first_order(sparse, emb) + self.fm(emb)  # (B,)
        x = torch.cat([dense, emb.flatten(1)], dim=1) if self.num_dense else emb.flatten(1)  # (B, I + F·D)
        logit = logit + self.deep(x).squeeze(-1)
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(-1)
        return logit
