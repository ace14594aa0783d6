"""Keeping replicated table state identical across data-parallel ranks.

State that is not a gradient (CAFE's sketch, a cache's counters) is updated from the ids and scores a
step saw. Under DistributedDataParallel every rank sees different ids, so before such an update each
table concatenates its update tensors over all ranks with :func:`gather_across_ranks`, in rank order;
every rank then applies the same updates in the same order and the state stays bitwise identical.
Without an initialised process group (or with one rank) it returns its inputs unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor along dim 0 over all ranks, in rank order.

    All tensors must have the same length on a rank (they describe the same update rows); lengths
    may differ between ranks.
    """
    if distributed_world() == 1 or not tensors:
        return tensors
    world = dist.get_world_size()
    n = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    gathered = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return tuple(gathered)
