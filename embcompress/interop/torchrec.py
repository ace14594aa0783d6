"""TorchRec's EmbeddingBagCollection interface around one compressed table.

Shape letters: B batch, F features (= the table's fields), D embedding dimension.

``CompressedEmbeddingBagCollection(table, feature_names)`` takes a ``KeyedJaggedTensor`` whose key f
holds local ids of the table's field f and returns a ``KeyedTensor`` of pooled (B, D) embeddings per
key, so a compressed table drops into ``torchrec.models.dlrm.DLRM`` (or anything else built on an
EmbeddingBagCollection). All features are served by one call of the table: global id = field start +
local id, each local id checked against its own feature's size (a ValueError naming the feature).
Training hooks work as usual: ``embcompress.attach(model, optimizer)``.

Under ``DistributedModelParallel`` TorchRec's sharders do not recognise this module, so it stays
replicated on every rank (data parallel), which is the point of compressing it. DMP wraps it in DDP,
which cannot reduce sparse gradients: build the table with ``sparse=False`` there. The project's own
loop (:mod:`embcompress.train.distributed`) handles sparse table gradients itself.

CPU install that works with torch 2.13.0 (a plain ``pip install torchrec`` pulls a CUDA fbgemm)::

    pip install -r requirements-torchrec.txt
    pip install --no-deps torchrec==1.8.0
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ..embeddings import CompressedEmbeddingBag
from ..embeddings.ops import field_starts
from ..models.blocks import check_field_ids


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An EmbeddingBagCollection whose F features are the F fields of one compressed table."""

    def __init__(self, table: CompressedEmbeddingBag, feature_names: Sequence[str] | None = None,
                 table_name: str = "compressed", is_weighted: bool = False) -> None:
        super().__init__()
        names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(len(table.field_sizes))]
        if len(names) != len(table.field_sizes) or len(set(names)) != len(names):
            raise ValueError(f"need {len(table.field_sizes)} distinct feature names (one per field), got {names}")
        self.table = table
        self.feature_names = names
        self._weighted = is_weighted
        pooling = PoolingType.SUM if table.mode == "sum" else PoolingType.MEAN
        self._configs = [EmbeddingBagConfig(num_embeddings=size, embedding_dim=table.embedding_dim,
                                            name=f"{table_name}_{name}", feature_names=[name], pooling=pooling)
                         for name, size in zip(names, table.field_sizes)]
        self.register_buffer("starts", field_starts(table.field_sizes), persistent=False)
        self.register_buffer("sizes", torch.tensor(table.field_sizes, dtype=torch.int64), persistent=False)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """KJT with this collection's keys (any order, extra keys ignored) -> KeyedTensor (B, F*D)."""
        kjt = features.permute([features.keys().index(n) for n in self.feature_names]) \
            if features.keys() != self.feature_names else features
        B, F, D = kjt.stride(), len(self.feature_names), self.table.embedding_dim
        per_key = torch.tensor(kjt.length_per_key(), device=kjt.values().device)
        field = torch.repeat_interleave(torch.arange(F, device=per_key.device), per_key)  # (n,) field of each id
        local = kjt.values().long()
        if self.table.validate_ids:  # a local id >= its feature's size would read the next feature's rows
            check_field_ids(local, self.sizes.to(per_key.device), field, self.feature_names)
        ids = local + self.starts.to(per_key.device)[field]  # global ids
        offsets = kjt.offsets()[:-1].long()  # F*B bags, key-major
        weights = kjt.weights_or_none() if self._weighted else None
        pooled = self.table(ids, offsets, per_sample_weights=weights)  # (F*B, D)
        values = pooled.reshape(F, B, D).transpose(0, 1).reshape(B, F * D)  # (B, F*D), key f at f*D
        return KeyedTensor(keys=list(self.feature_names), length_per_key=[D] * F, values=values)

    @property
    def device(self) -> torch.device:
        return next((t.device for t in self.table.state_dict().values() if isinstance(t, Tensor)),
                    torch.device("cpu"))
