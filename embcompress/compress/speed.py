"""Inference throughput of several models on the same batches, measured interleaved.

On a shared machine the load changes from second to second; timing model A, then B, then A again and
taking each model's median round keeps the ratio between them fair.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import Tensor, nn


@torch.inference_mode()
def inference_samples_per_s(models: Sequence[nn.Module], batches: Sequence[tuple[Tensor, Tensor]],
                            rounds: int = 5, warmup: int = 1) -> list[float]:
    """Samples per second of each model's forward over ``batches`` ((dense, sparse) pairs): median round."""
    for m in models:
        m.eval()
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
