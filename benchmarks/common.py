"""Shared by the benchmark scripts: machine and commit description, one-JSON-line output, --threads.

Every benchmark prints one JSON object per line (``emit``) holding the machine (with its load average at
that moment: the development machine is shared, so a figure without the load beside it means little),
the commit and the settings, so a figure in benchmarks/README.md can be traced to what produced it.
Scripts are run from the repository root as ``PYTHONPATH=. .venv/bin/python benchmarks/NAME.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """Platform, Python, torch, CPU count, torch threads and the 1/5/15-minute load average now."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def commit() -> dict[str, Any]:
    """HEAD's hash and whether the working tree differs from it (figures from a dirty tree say so)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "HEAD")
    return {"commit": head or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def emit(record: dict[str, Any]) -> None:
    """Print ``record`` as one JSON line, with the machine, the commit and a timestamp added."""
    out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record, "machine": machine(), **commit()}
    print(json.dumps(out, default=_plain), flush=True)


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def add_threads_arg(ap: argparse.ArgumentParser, default: int | None = None) -> None:
    ap.add_argument("--threads", type=int, default=default,
                    help="torch CPU threads (default: torch's choice); the figures record it")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    """Resident set size now, from /proc (Linux); 0 where that is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def log(msg: str) -> None:
    """Progress for the person running the script: stderr, so stdout stays JSON lines only."""
    print(msg, file=sys.stderr, flush=True)


def kaggle_field_sizes(scale: float, fields: int = 26) -> list[int]:
    """Criteo Kaggle cardinalities times ``scale`` (at least 1 id each), as the synthetic generator does."""
    from embcompress.data.synthetic import resolve_cardinalities

    return list(resolve_cardinalities(fields, scale, None))


def zipf_requests(field_sizes: list[int], batch: int, batches: int, skew: float = 1.1,
                  seed: int = 0) -> list[torch.Tensor]:
    """The one request generator of the benchmarks: ``batches`` tensors of (batch * F, 1) global ids.

    Row b of field f is a Zipf(``skew``)-distributed popularity rank mapped through a fixed random
    permutation of the field (popularity is not id order), plus the field's start in the global id space.
    Laid out like DLRM's lookups: sample-major, one id per bag.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n = batch * batches
    starts = np.concatenate([[0], np.cumsum(field_sizes)[:-1]]).astype(np.int64)
    ids = np.empty((n, len(field_sizes)), dtype=np.int64)
    for f, size in enumerate(field_sizes):
        cdf = np.cumsum(np.arange(1, size + 1, dtype=np.float64) ** -skew)
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), size - 1)
        ids[:, f] = rng.permutation(size)[ranks] + starts[f]
    return [torch.from_numpy(chunk.reshape(-1, 1).copy()) for chunk in np.split(ids, batches)]


def add_dlrm_step_args(ap: argparse.ArgumentParser, ratio: float) -> None:
    """The data, model and timing options of the DLRM step benchmarks (``cafe_speed.py``,
    ``optimizer_speed.py``): one synthetic dataset, steps interleaved in blocks."""
    ap.add_argument("--ratio", type=float, default=ratio)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--scale", type=float, default=0.05)
    add_threads_arg(ap, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=20, help="timed rounds of blocks per model")
    ap.add_argument("--block-steps", type=int, default=25)


def interleaved_seconds(steps: dict[str, Callable[[], None]], blocks: int, block_steps: int,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Seconds each stepper took over ``blocks`` rounds of ``block_steps`` steps, the steppers taking turns
    block by block, so load from other processes hits all of them alike. A first round warms up caches,
    allocators and the tables' state and is not counted; ``sync`` (e.g. ``torch.cuda.synchronize``) ends
    each block."""
    seconds = dict.fromkeys(steps, 0.0)
    for block in range(blocks + 1):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(block_steps):
                step()
            if sync is not None:
                sync()
            if block:
                seconds[key] += time.perf_counter() - start
    return seconds


def dlrm_steppers(ds: Any, methods: list[str], ratio: float, batch_size: int, device: str = "cpu",
                  optimizers: Callable[[Any, Any], list[torch.optim.Optimizer]] | None = None,
                  ) -> dict[str, Callable[[], None]]:
    """One DLRM per method as the training loop builds it (model, optimizers, tables attached), the data
    copied to ``device`` once; each value runs that model's next training step, walking the rows in order.
    A method may carry table options: ``cafe:key_dtype=int64:threshold=200``. ``optimizers(model, cfg)``
    replaces the loop's ``build_optimizers`` (it must attach the tables)."""
    import torch.nn.functional as F
    from embcompress.cli import parse_options
    from embcompress.train.loop import TrainConfig, build_model, build_optimizers

    dev = torch.device(device)
    dense, sparse = torch.from_numpy(ds.dense).to(dev), torch.from_numpy(ds.sparse.astype("int64")).to(dev)
    labels = torch.from_numpy(ds.labels).float().to(dev)
    b, rows = batch_size, len(labels) - batch_size

    def stepper(method: str) -> Callable[[], None]:
        name, *options = method.split(":")
        cfg = TrainConfig(method=name, compression=ratio, batch_size=batch_size, method_options=parse_options(options))
        torch.manual_seed(0)
        model = build_model(cfg, ds).to(dev)
        model.train()
        opts = (optimizers or build_optimizers)(model, cfg)
        done = [0]

        def step() -> None:
            lo = done[0] * b % rows
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(dense[lo:lo + b], sparse[lo:lo + b]), labels[lo:lo + b]).backward()
            for opt in opts:
                opt.step()
            done[0] += 1
        return step

    return {m: stepper(m) for m in methods}
