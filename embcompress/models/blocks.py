"""Blocks shared by the models: an MLP and the id-shifting sparse arch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..embeddings.base import CompressedEmbeddingBag
from ..embeddings.ops import field_starts


def mlp(sizes: Sequence[int], *, final_activation: bool = True) -> nn.Sequential:
    """Linear layers of ``sizes`` (input first) with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SparseArch(nn.Module):
    """Per-field local ids (B, F) -> embeddings (B, F, D) through one table over the global id space."""

    def __init__(self, embedding: CompressedEmbeddingBag) -> None:
        super().__init__()
        self.embedding = embedding
        self.num_fields = len(embedding.field_sizes)
        self.register_buffer("starts", field_starts(embedding.field_sizes), persistent=False)

    def forward(self, sparse: Tensor) -> Tensor:
        batch, fields = sparse.shape
        if fields != self.num_fields:
            raise ValueError(f"expected {self.num_fields} categorical fields, got {fields}")
        ids = (sparse.long() + self.starts).reshape(-1, 1)  # (B*F, 1) global ids, one bag each
        return self.embedding(ids).view(batch, fields, -1)  # (B, F, D)
