"""DCN-v2 (Wang et al., 2021): a cross network of full-rank cross layers beside or before a deep network.

Shapes: B batch, F categorical fields, D embedding dim, I dense features, d = I + F·D.
x0 = [dense (B, I), flattened embeddings (B, F·D)] -> (B, d). Cross layer l:
``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l`` with W_l a full d×d matrix (an ``nn.Linear``, so the AFM
post-training compression can factorise it into the paper's low-rank ``U Vᵀ`` form after training).

``structure="stacked"`` (default) feeds the cross network's output to the deep network, then one
logit; ``"parallel"`` runs both on x0 and concatenates their outputs before the logit. The DCN-v2 paper
reports both; stacked is the default because it is the smaller model at the same widths (the logit
layer sees only the deep network's last width instead of d + that width).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..embeddings.base import CompressedEmbeddingBag
from . import register_model
from .blocks import SparseArch, mlp


class CrossNet(nn.Module):
    """``num_layers`` cross layers on (B, d): x <- x0 ⊙ (W x + b) + x."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.bias)

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # (B, d)
        return x


@register_model("dcn")
class DCNv2(nn.Module):
    """DCN-v2 taking its embedding table by injection; ``forward(dense, sparse)`` returns logits (B,)."""

    def __init__(self, embedding: CompressedEmbeddingBag, num_dense: int = 13, cross_layers: int = 3,
                 deep: Sequence[int] = (512, 256), structure: str = "stacked") -> None:
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', got {structure!r}")
        self.structure = structure
        self.sparse_arch = SparseArch(embedding)
        self.num_dense = int(num_dense)
        in_dim = self.num_dense + self.sparse_arch.num_fields * embedding.embedding_dim
        self.cross = CrossNet(in_dim, cross_layers)
        self.deep = mlp([in_dim, *deep]) if deep else nn.Identity()
        deep_out = deep[-1] if deep else in_dim
        self.head = nn.Linear(deep_out + (in_dim if structure == "parallel" else 0), 1)

    @property
    def embedding(self) -> CompressedEmbeddingBag:
        return self.sparse_arch.embedding

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        emb = self.sparse_arch(sparse)  # (B, F, D)
        x0 = torch.cat([dense, emb.flatten(1)], dim=1) if self.num_dense else emb.flatten(1)  # (B, d)
        if self.structure == "stacked":
            h = self.deep(self.cross(x0))  # (B, H)
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, d + H)
        return self.head(h).squeeze(-1)  # (B,)
