"""``full``: the uncompressed baseline, one row per id, sparse gradients (as the DLRM reference)."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import FLOAT_BYTES, IndexedEmbeddingBag, uniform_rows_
from .options import mode_option, sparse_option
from .registry import register


@register("full")
class FullEmbeddingBag(IndexedEmbeddingBag):
    """One float32 row per global id; field f's rows start at ``sum(field_sizes[:f])``."""

    OPTIONS = (mode_option(), sparse_option())

    def __init__(self, field_sizes: Sequence[int], embedding_dim: int, mode: str = "sum", sparse: bool = True) -> None:
        super().__init__(field_sizes, embedding_dim, sum(int(s) for s in field_sizes), mode, sparse)
        uniform_rows_(self.weight, self.field_sizes)

    def row_index(self, ids: Tensor) -> Tensor:
        return ids

    @classmethod
    def byte_range(cls, field_sizes: Sequence[int], embedding_dim: int, **options: Any) -> tuple[int, int]:
        full = sum(int(s) for s in field_sizes) * embedding_dim * FLOAT_BYTES
        return full, full

    @classmethod
    def from_budget_bytes(cls, field_sizes: Sequence[int], embedding_dim: int, budget_bytes: int,
                          **options: Any) -> "FullEmbeddingBag":
        return cls(field_sizes, embedding_dim, **options)

    def inference_form(self) -> "FullInference":
        """This table frozen for serving: global ids (B, F) -> rows (B, F, D) (see :mod:`embcompress.export`)."""
        return FullInference(self)


class FullInference(nn.Module):
    """``full`` frozen for serving (see :mod:`embcompress.export`): global ids (B, F) -> rows (B, F, D)."""

    def __init__(self, table: "FullEmbeddingBag") -> None:
        super().__init__()
        self.register_buffer("weight", table.weight.detach().clone())

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)
