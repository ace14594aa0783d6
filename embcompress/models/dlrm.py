"""DLRM (Naumov et al., 2019) with the reference's Criteo Kaggle defaults, built from small blocks.

Shapes: B batch, F categorical fields, D embedding dim, I dense features.
Dense features (B, I) -> bottom MLP -> (B, D); categorical ids (B, F) -> embedding table -> (B, F, D);
pairwise dot products of the F + 1 vectors (strict lower triangle, F(F+1)/2 values) concatenated with
the dense vector -> top MLP -> logits (B,). With I = 0 (e.g. Avazu) there is no bottom MLP and the
interaction runs over the F embeddings alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..embeddings.base import CompressedEmbeddingBag
from .blocks import SparseArch, mlp


class DenseArch(nn.Module):
    """Bottom MLP: (B, I) -> (B, D), ReLU after every layer as in the reference."""

    def __init__(self, num_dense: int, sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.net = mlp([num_dense, *sizes, dim])

    def forward(self, dense: Tensor) -> Tensor:
        return self.net(dense)


class InteractionArch(nn.Module):
    """Dot interaction: (B, D) dense and (B, F, D) sparse -> (B, D + (F+1)F/2), or (B, F(F-1)/2) without dense."""

    def __init__(self, num_vectors: int, with_dense: bool) -> None:
        super().__init__()
        self.with_dense = with_dense
        rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def output_dim(self, dim: int) -> int:
        return self.rows.numel() + (dim if self.with_dense else 0)

    def forward(self, dense: Tensor | None, sparse: Tensor) -> Tensor:
        vectors = sparse if dense is None else torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, V, D)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # (B, V, V)
        pairs = dots[:, self.rows, self.cols]  # (B, V(V-1)/2)
        return pairs if dense is None else torch.cat([dense, pairs], dim=1)


class OverArch(nn.Module):
    """Top MLP ending in one logit: (B, K) -> (B,)."""

    def __init__(self, in_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp([in_dim, *sizes]), nn.Linear(sizes[-1] if sizes else in_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class DLRM(nn.Module):
    """DLRM taking its embedding table by injection; ``forward(dense, sparse)`` returns logits (B,).

    Defaults are the reference's for Criteo Kaggle: D = 16, bottom 13-512-256-64-16, top 367-512-256-1.
    """

    def __init__(self, embedding: CompressedEmbeddingBag, num_dense: int = 13,
                 bottom: Sequence[int] = (512, 256, 64), top: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        dim = embedding.embedding_dim
        self.num_dense = int(num_dense)
        self.sparse_arch = SparseArch(embedding)
        self.dense_arch = DenseArch(num_dense, bottom, dim) if num_dense > 0 else None
        num_vectors = self.sparse_arch.num_fields + (1 if self.dense_arch is not None else 0)
        self.interaction = InteractionArch(num_vectors, with_dense=self.dense_arch is not None)
        self.over_arch = OverArch(self.interaction.output_dim(dim), top)

    @property
    def embedding(self) -> CompressedEmbeddingBag:
        return self.sparse_arch.embedding

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        emb = self.sparse_arch(sparse)  # (B, F, D)
        x = self.dense_arch(dense) if self.dense_arch is not None else None  # (B, D)
        return self.over_arch(self.interaction(x, emb))  # (B,)
