"""DLRM training samples/s with the loop's optimizers against one Adagrad over all parameters, in one run.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/optimizer_speed.py [--ratio 10000 --methods hash,cafe]

The loop (``build_optimizers``) gives the sparse table weights one Adagrad and the dense MLP parameters
another, fused on the CPU. Before, one Adagrad held them all, and a single sparse gradient sends every
parameter of an optimizer down PyTorch's per-tensor loop, whose ``sqrt`` slows down on accumulators with
many exact zeros (weights of dead ReLU units never get a gradient): its cost then depends on the model's
state rather than its size. Each method trains one model per optimizer layout (same seed, same data), their
steps interleaved in blocks as in ``cafe_speed.py``; a first round of blocks is warm-up. Prints ms per step
per (method, layout), the speedup of the loop's layout and each layout's ratios to ``hash``, the share
of exact zeros in each model's dense Adagrad state at the end (in all and in its most-zero tensor), and
what ``sqrt``, ``rsqrt`` and a fused Adagrad step cost on an accumulator by what it holds.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (add_dlrm_step_args, apply_threads, dlrm_steppers, emit,  # type: ignore[import-not-found]
                    interleaved_seconds, log)
from embcompress.data import make_synthetic
from embcompress.embeddings import attach
from embcompress.train.loop import build_optimizers


def one_adagrad(model, cfg) -> list[torch.optim.Optimizer]:  # type: ignore[no-untyped-def]
    """The layout before the split: every parameter in one (per-tensor) Adagrad."""
    opt = torch.optim.Adagrad(list(model.parameters()), lr=cfg.lr)
    attach(model, opt)
    return [opt]


def sqrt_microseconds(repeats: int = 300) -> dict[str, float]:
    """Why the layout matters: µs of one elementwise ``sqrt`` (and ``rsqrt``) of a 256x512 float tensor
    (an MLP layer's Adagrad accumulator) by what it holds, and of one fused Adagrad step on it."""
    gen = torch.Generator().manual_seed(0)

    def filled(share: float, value: float) -> torch.Tensor:
        x = torch.rand(256, 512, generator=gen)
        x[torch.rand(256, 512, generator=gen) < share] = value
        return x

    def timed(f) -> float:  # type: ignore[no-untyped-def]
        f()
        start = time.perf_counter()
        for _ in range(repeats):
            f()
        return round((time.perf_counter() - start) / repeats * 1e6, 1)

    out = {}
    for name, x in (("random", filled(0, 0)), ("10% zeros", filled(0.1, 0.0)), ("40% zeros", filled(0.4, 0.0)),
                    ("40% denormals", filled(0.4, 1e-39))):
        out[f"sqrt, {name}"] = timed(x.sqrt)
    x = filled(0.4, 0.0)
    out["rsqrt, 40% zeros"] = timed(x.rsqrt)
    p = torch.nn.Parameter(torch.rand(256, 512, generator=gen))
    fused = torch.optim.Adagrad([p], lr=0.01, fused=True)
    p.grad = torch.rand(256, 512, generator=gen) * (x > 0)  # no gradient where the accumulator stays 0
    fused.step()
    fused.state[p]["sum"].copy_(x)
    out["fused Adagrad step, 40% zeros"] = timed(fused.step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dlrm_step_args(ap, ratio=10000.0)
    ap.add_argument("--methods", default="hash,cafe")
    args = ap.parse_args()
    apply_threads(args)
    torch.sparse.check_sparse_tensor_invariants.disable()  # as the loop does
    ds = make_synthetic(rows=args.rows, scale=args.scale)
    methods = args.methods.split(",")
    captured: dict[str, list[torch.optim.Optimizer]] = {}

    def keep(layout: str, build):  # type: ignore[no-untyped-def]
        def wrapped(model, cfg):  # type: ignore[no-untyped-def]
            opts = build(model, cfg)
            captured[f"{cfg.method}/{layout}"] = opts
            return opts
        return wrapped

    steps = {}
    for layout, build in (("one", one_adagrad), ("split", build_optimizers)):
        for method, step in dlrm_steppers(ds, methods, args.ratio, args.batch_size,
                                          optimizers=keep(layout, build)).items():
            steps[f"{method}/{layout}"] = step
    seconds = interleaved_seconds(steps, args.blocks, args.block_steps)
    n = args.blocks * args.block_steps
    ms = {k: round(v / n * 1e3, 3) for k, v in seconds.items()}
    speedup = {m: round(ms[f"{m}/one"] / ms[f"{m}/split"], 3) for m in methods}
    rel = {layout: {m: round(ms[f"hash/{layout}"] / ms[f"{m}/{layout}"], 3) for m in methods}
           for layout in ("one", "split")} if "hash" in methods else {}
    zeros, most = {}, {}
    for key, opts in captured.items():
        dense = [o.state[p]["sum"] for o in opts for p in o.param_groups[0]["params"]
                 if p.grad is None or not p.grad.is_sparse]
        total = sum(t.numel() for t in dense)
        zeros[key] = round(sum(int((t == 0).sum()) for t in dense) / max(total, 1), 3)
        most[key] = round(max(float((t == 0).float().mean()) for t in dense), 3)
    sqrt_us = sqrt_microseconds()
    log(f"ms per step: {ms}\nspeedup of the split: {speedup}\nrelative to hash: {rel}\n"
        f"exact zeros in the dense Adagrad state: {zeros} (most in one tensor: {most})\n"
        f"us per op on a 256x512 accumulator: {sqrt_us}")
    emit({"benchmark": "optimizer_speed", "settings": vars(args), "ms_per_step": ms,
          "speedup_of_split": speedup, "relative_to_hash": rel, "dense_state_zero_share": zeros,
          "dense_state_zero_share_max_tensor": most, "accumulator_op_us": sqrt_us})


if __name__ == "__main__":
    main()
