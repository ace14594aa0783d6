"""Blocks shared by the models: an MLP, the id-shifting sparse arch and its per-field id check."""

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


FIELD_RANGE_MESSAGE = "a categorical id is outside its field's range [0, field size)"


def check_field_ids(local: Tensor, sizes: Tensor, field: Tensor | None = None,
                    names: Sequence[str] | None = None) -> None:
    """ValueError naming the field, an offending local id and the field's valid range.

    ``local`` is (B, F) with ``sizes`` (F,), or any shape with ``field`` (same shape) giving each id's
    field. Checking only the global range is not enough: global id = field start + local id, so a local
    id >= its field's size would silently read the next field's rows.

    One vectorised comparison. On the CPU the error path alone looks at values; on CUDA (and while
    compiling or exporting) the comparison feeds ``torch._assert_async`` so a step waits on no host read:
    a bad id then stops the run with a device-side assert carrying :data:`FIELD_RANGE_MESSAGE` instead
    (rerun the batch on the CPU to see which field and id).
    """
    limit = sizes if field is None else sizes.index_select(0, field.reshape(-1)).view(field.shape)
    bad = (local < 0) | (local >= limit)
    if local.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(torch.logical_not(bad.any()), FIELD_RANGE_MESSAGE)
        return
    if not bool(bad.any()):
        return
    first = int(torch.nonzero(bad.reshape(-1))[0])
    f = first % sizes.numel() if field is None else int(field.reshape(-1)[first])
    name = f" ({names[f]!r})" if names is not None else ""
    raise ValueError(f"field {f}{name}: id {int(local.reshape(-1)[first])} is outside its valid range "
                     f"[0, {int(sizes[f])})")


class SparseArch(nn.Module):
    """Per-field local ids (B, F) -> embeddings (B, F, D) through one table over the global id space.

    Every local id is checked against its own field's size (:func:`check_field_ids`)."""

    def __init__(self, embedding: CompressedEmbeddingBag) -> None:
        super().__init__()
        self.embedding = embedding
        self.num_fields = len(embedding.field_sizes)
        self.register_buffer("starts", field_starts(embedding.field_sizes), persistent=False)
        self.register_buffer("sizes", torch.tensor(embedding.field_sizes, dtype=torch.int64), persistent=False)

    def forward(self, sparse: Tensor) -> Tensor:
        batch, fields = sparse.shape
        if fields != self.num_fields:
            raise ValueError(f"expected {self.num_fields} categorical fields, got {fields}")
        if self.embedding.validate_ids:
            check_field_ids(sparse, self.sizes)
        ids = (sparse.long() + self.starts).reshape(-1, 1)  # (B*F, 1) global ids, one bag each
        return self.embedding(ids).view(batch, fields, -1)  # (B, F, D)
