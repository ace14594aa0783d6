"""Inference throughput of several models on the same batches, measured interleaved.

On a shared machine the load changes from second to second; timing model A, then B, then A again and
taking each model's median round keeps the ratio between them fair.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]


@torch.inference_mode()
def inference_samples_per_s(models: Sequence[Model], batches: Sequence[tuple[Tensor, Tensor]],
                            rounds: int = 5, warmup: int = 1) -> list[float]:
    """Samples per second of each model's forward over ``batches`` ((dense, sparse) pairs): median round."""
    for m in models:
        if isinstance(m, torch.nn.Module):
            try:
                m.eval()
            except NotImplementedError:  # a torch.export module: exported in eval mode already
                pass
    samples = sum(len(d) for d, _ in batches)
    times: list[list[float]] = [[] for _ in models]
    for r in range(warmup + rounds):
        for i, m in enumerate(models):
            start = time.perf_counter()
            for dense, sparse in batches:
                m(dense, sparse)
            if r >= warmup:
                times[i].append(time.perf_counter() - start)
    return [samples / statistics.median(t) for t in times]


def batches_for_timing(rows: Sequence[tuple[Tensor, Tensor]], batch_size: int,
                       min_rows: int = 512) -> list[tuple[Tensor, Tensor]]:
    """Consecutive whole batches of ``batch_size`` cut from ``rows`` ((dense, sparse) chunks), enough to hold
    ``min_rows`` rows where there are (a round of batch 1 is then not one call); none if ``rows`` are fewer."""
    dense = torch.cat([d for d, _ in rows])
    sparse = torch.cat([s for _, s in rows])
    count = min(len(dense) // batch_size, max(1, -(-min_rows // batch_size)))
    return [(dense[i * batch_size:(i + 1) * batch_size], sparse[i * batch_size:(i + 1) * batch_size])
            for i in range(count)]


def speed_by_batch_size(models: Mapping[str, Model], rows: Sequence[tuple[Tensor, Tensor]],
                        batch_sizes: Sequence[int], rounds: int = 5) -> dict[int, dict[str, float]]:
    """{batch size: {model name: samples/s}}, the models interleaved at each batch size; batch sizes
    larger than the rows given are left out."""
    out = {}
    for b in batch_sizes:
        batches = batches_for_timing(rows, b)
        if batches:
            out[int(b)] = dict(zip(models, inference_samples_per_s(list(models.values()), batches, rounds)))
    return out
