"""Where a DLRM training step's time goes, per method: ms per step, and from ``torch.profiler`` the
kernel launches, stream synchronisations and GPU time per step (on CUDA) or the aten ops per step.

    # the README's profile ("On a GPU"): Kaggle cardinalities, batch 4096, 1000x
    PYTHONPATH=.:benchmarks python3 benchmarks/cafe_profile.py --device cuda
    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/cafe_profile.py --scale 0.2 --rows 60000   # CPU

Each method gets the loop's model and optimizers (``common.dlrm_steppers``); ``--warmup`` steps are not
counted, ``--timed`` steps give ms per step (ending with a synchronize on CUDA), then ``--profiled`` steps
run under the profiler. The busiest ops by host time go to stderr; one JSON line to stdout.
``--sites`` also times, over another ``--timed`` steps, the CAFE table's own call sites (the sketch's and
the table's methods, each counted without the sites it calls), in microseconds per step (thread CPU time
on the CPU, wall time on CUDA):

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/cafe_profile.py --scale 0.05 --rows 200000 \
        --batch-size 128 --ratio 1000 --sites --timed 1000        # cafe_speed.py's setting
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections import Counter
from typing import Callable, Iterator

import torch

from common import add_threads_arg, apply_threads, dlrm_steppers, emit, log  # type: ignore[import-not-found]
from embcompress.data import make_synthetic
from embcompress.embeddings.cafe import CafeEmbeddingBag, _Pending
from embcompress.embeddings.cafe_ml import CafeMLEmbeddingBag
from embcompress.embeddings.hotsketch import HotSketch

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC")
SITES = {HotSketch: ("locate", "query", "insert", "_insert_newcomers", "_newcomers_by_bucket", "_rank_sorted",
                     "_maintain", "_waiting", "apply_decay", "_promote", "_preempt"),
         CafeEmbeddingBag: ("_route", "hashed_row", "_pool", "_record", "before_optimizer_step", "_normalise",
                            "_hashed_lookups", "apply_importance", "cold_embedding", "training_stats"),
         _Pending: ("capture",),
         CafeMLEmbeddingBag: ("_rows_of", "_pool", "cold_embedding")}


@contextlib.contextmanager
def site_timer(seconds: Counter, clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """While open, add each call site's own time (without the sites it calls) to ``seconds``, by ``clock``."""
    stack: list[float] = []
    saved = [(cls, name, cls.__dict__[name]) for cls, names in SITES.items() for name in names if name in cls.__dict__]

    def timed(f, label):  # type: ignore[no-untyped-def]
        @functools.wraps(f)
        def call(*a, **k):  # type: ignore[no-untyped-def]
            start = clock()
            stack.append(0.0)
            try:
                return f(*a, **k)
            finally:
                took, inner = clock() - start, stack.pop()
                seconds[label] += took - inner
                if stack:
                    stack[-1] += took
        return call

    for cls, name, f in saved:
        setattr(cls, name, timed(f, f"{cls.__name__}.{name}"))
    try:
        yield
    finally:
        for cls, name, f in saved:
            setattr(cls, name, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--methods", default="hash,cafe")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--timed", type=int, default=60)
    ap.add_argument("--profiled", type=int, default=10)
    ap.add_argument("--sites", action="store_true", help="also time the CAFE table's call sites")
    add_threads_arg(ap, default=1)
    args = ap.parse_args()
    apply_threads(args)
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    ds = make_synthetic(rows=args.rows, scale=args.scale)
    steps = dlrm_steppers(ds, args.methods.split(","), args.ratio, args.batch_size, args.device)
    results = {}
    for method, step in steps.items():
        for _ in range(args.warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(args.timed):
            step()
        sync()
        ms = (time.perf_counter() - start) / args.timed * 1e3
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profiled):
                step()
            sync()
        events = prof.key_averages()
        per_step = {"ms_per_step": round(ms, 2)}
        if cuda:
            per_step["kernel_launches"] = sum(e.count for e in events if e.key in LAUNCHES) / args.profiled
            per_step["stream_syncs"] = sum(e.count for e in events if e.key == "cudaStreamSynchronize") / args.profiled
            per_step["gpu_ms"] = round(sum(e.self_device_time_total for e in events) / 1e3 / args.profiled, 2)
        else:
            per_step["aten_ops"] = sum(e.count for e in events if e.key.startswith("aten::")) / args.profiled
        if args.sites:
            seconds: Counter = Counter()
            # on the CPU the thread's CPU time: a site preempted by other work costs what it computed
            with site_timer(seconds, time.perf_counter if cuda else time.thread_time):
                for _ in range(args.timed):
                    step()
                sync()
            if seconds:
                per_step["sites_us"] = {k: round(v / args.timed * 1e6, 1) for k, v in seconds.most_common()}
        results[method] = per_step
        log(f"{method}: {per_step}\n" + events.table(sort_by="self_cpu_time_total", row_limit=25))
    emit({"benchmark": "cafe_profile", "settings": vars(args), "per_step": results})


if __name__ == "__main__":
    main()
