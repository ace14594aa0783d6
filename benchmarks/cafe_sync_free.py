"""A ``cafe`` table's training step on the vectorised sketch path against the step without host syncs.

    EMBCOMPRESS_NATIVE=0 PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/cafe_sync_free.py --threads 1
    # on a GPU: the same, then a CUDA-graph capture and a torch.compile(fullgraph=True) of the step
    PYTHONPATH=.:benchmarks python3 benchmarks/cafe_sync_free.py --device cuda --scale 1 --batch-size 4096 --compile

Two ``cafe`` tables from one seed (Kaggle's field sizes times ``--scale``, ``--ratio`` compression, D 16)
train side by side on the same Zipf batches (``common.zipf_requests``): forward, backward of a random
projection of the output, Adagrad step with the table's pre-step hook (``embcompress.attach``). One
inserts with the vectorised rule, the other with ``HotSketch.insert_masked`` (``sketch.sync_free``);
both run on the PyTorch sketch path (set ``EMBCOMPRESS_NATIVE=0`` on the CPU: the compiled sketch is
what the CPU runs otherwise). Steps alternate in blocks (the first round is warm-up); each step and its
pre-step hook are timed in this thread's CPU time on the CPU, in wall time after a synchronize on CUDA.
Prints one JSON line with us per step and per hook, whether the two tables ended equal, and the aten
ops the hook dispatches (20 more steps, counted with a ``TorchDispatchMode``).

Then it tries what the sync-free step is for (each attempt reports its error instead of stopping): with
``--compile``, ``torch.compile(fullgraph=True)`` (inductor) of the pre-step hook against the eager hook
(graphs compiled, time per call, tables equal); on CUDA, a whole step (dense gradients, SGD, static id
buffer) captured in one CUDA graph and replayed on the next batches, compared with the same steps run
eagerly, with the time per replay against an eager step.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import torch

import embcompress as ec
from common import (add_threads_arg, apply_threads, emit, kaggle_field_sizes, log,  # type: ignore[import-not-found]
                    zipf_requests)

DIM = 16


def make_pair(sizes: list[int], ratio: float, device: torch.device, importance: str) -> list[Any]:
    """(table, optimizer) twice from one seed: the vectorised sketch path, then the one without syncs."""
    pair = []
    for sync_free in (False, True):
        torch.manual_seed(0)
        t = ec.make_table("cafe", sizes, DIM, compression=ratio, importance=importance).to(device)
        t.sketch.native, t.sketch.sync_free = False, sync_free
        opt = torch.optim.Adagrad(t.parameters(), lr=0.05)
        ec.attach(t, opt)
        t.train()
        pair.append((t, opt))
    return pair


def stepper(t: Any, opt: Any, batches: list[torch.Tensor], project: torch.Tensor) -> Callable[[], None]:
    done = [0]

    def step() -> None:
        ids = batches[done[0] % len(batches)]
        opt.zero_grad(set_to_none=True)
        (t(ids) @ project).sum().backward()
        opt.step()
        done[0] += 1
    return step


def timed_blocks(steps: dict[str, Callable[[], None]], hooks: dict[str, list[float]], blocks: int,
                 block_steps: int, device: torch.device) -> dict[str, float]:
    """Seconds per step of each stepper over ``blocks`` interleaved rounds (after one warm-up round);
    ``hooks[key]`` collects the pre-step hook's seconds, reset after the warm-up."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.thread_time
    spent = dict.fromkeys(steps, 0.0)
    for block in range(blocks + 1):
        for key, step in steps.items():
            if block == 1:
                hooks[key].clear()
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            for _ in range(block_steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            if block:
                spent[key] += clock() - start
    return {k: v / (blocks * block_steps) for k, v in spent.items()}


def time_hook(t: Any, into: list[float], device: torch.device) -> None:
    """Record the time of each call of ``t.before_optimizer_step`` (what the optimizer's pre-step hook runs)."""
    inner = t.before_optimizer_step
    clock = time.perf_counter if device.type == "cuda" else time.thread_time

    def hook() -> None:
        start = clock()
        inner()
        into.append(clock() - start)
    t.before_optimizer_step = hook


def hook_ops(t: Any, step: Callable[[], None], steps: int = 20) -> list[int]:
    """(fewest, most) aten ops dispatched by the pre-step hook over ``steps`` more steps (views included:
    on CUDA each op that is not a view launches a kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    timed = t.before_optimizer_step
    counts = []

    def counted() -> None:
        Count.calls = 0
        with Count():
            timed()
        counts.append(Count.calls)
    t.before_optimizer_step = counted
    for _ in range(steps):
        step()
    t.before_optimizer_step = timed
    return [min(counts), max(counts)]


def same_state(a: Any, b: Any) -> dict[str, Any]:
    """Buffers and weights that differ between two tables (the sketch's mass: by more than 1e-12)."""
    differ = []
    for name, x in a.state_dict().items():
        y = b.state_dict()[name]
        if name.endswith("mass"):
            if abs(float(x) - float(y)) > 1e-12 * max(abs(float(x)), 1.0):
                differ.append(name)
        elif not torch.equal(x, y):
            differ.append(name)
    return {"equal": not differ, "differ": differ}


def cuda_capture(sizes: list[int], ratio: float, batches: list[torch.Tensor], project: torch.Tensor,
                 importance: str, steps: int) -> dict[str, Any]:
    """A whole step (forward, backward, the sketch update, SGD) captured in one CUDA graph and replayed on
    ``steps`` batches, against the same steps run eagerly on the sync-free path."""
    torch.manual_seed(0)
    eager = ec.make_table("cafe", sizes, DIM, compression=ratio, importance=importance, sparse=False).cuda()
    eager.validate_ids = False  # (the id check reads back; the models check ids per field instead)
    eager.sketch.native, eager.sketch.sync_free = False, True
    eager.train()
    graphed = copy.deepcopy(eager)
    opts = {}
    for name, t in (("eager", eager), ("graphed", graphed)):
        opts[name] = torch.optim.SGD(t.parameters(), lr=0.05)
        ec.attach(t, opts[name])
    static = batches[0].clone()

    def step(t: Any, opt: Any, ids: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=False)
        (t(ids) @ project).sum().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA-graph capture needs
        for i in range(3):
            step(eager, opts["eager"], batches[i])
            static.copy_(batches[i])
            step(graphed, opts["graphed"], static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static.copy_(batches[3])
    with torch.cuda.graph(graph):
        step(graphed, opts["graphed"], static)
    step(eager, opts["eager"], batches[3])  # the captured step ran nothing: replay it
    graph.replay()
    torch.cuda.synchronize()
    replay_s = eager_s = 0.0
    for i in range(4, 4 + steps):
        ids = batches[i % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        static.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        replay_s += time.perf_counter() - start
        start = time.perf_counter()
        step(eager, opts["eager"], ids)
        torch.cuda.synchronize()
        eager_s += time.perf_counter() - start
    return {"captured": True, "replay_us": round(1e6 * replay_s / steps, 1),
            "eager_sync_free_us": round(1e6 * eager_s / steps, 1), "hot": eager.sketch.num_hot(),
            **same_state(eager, graphed)}


def compiled_hook(sizes: list[int], ratio: float, batches: list[torch.Tensor], project: torch.Tensor,
                  importance: str, steps: int, device: torch.device) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` (inductor) of the pre-step hook (the sketch insert and the row
    copy) against the same hook run eagerly on the sync-free path: graphs compiled, time per call,
    whether the tables end equal (inductor may round the normalisation's floats differently)."""
    torch.manual_seed(0)
    eager = ec.make_table("cafe", sizes, DIM, compression=ratio, importance=importance).to(device)
    eager.sketch.native, eager.sketch.sync_free = False, True
    eager.train()
    traced = copy.deepcopy(eager)
    compiles = []

    def counted(gm: Any, inputs: Any) -> Any:
        compiles.append(1)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, inputs)
    hook = torch.compile(traced.before_optimizer_step, fullgraph=True, backend=counted)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent = {"compiled": 0.0, "eager": 0.0}
    for i in range(steps + 2):
        ids = batches[i % len(batches)]
        for key, t, step in (("compiled", traced, hook), ("eager", eager, eager.before_optimizer_step)):
            (t(ids) @ project).sum().backward()
            t.weight.grad = None
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= 2:  # the first two calls compile
                spent[key] += time.perf_counter() - start
    return {"compiled": True, "graphs": len(compiles),
            "hook_us": {k: round(1e6 * v / steps, 1) for k, v in spent.items()},
            "hot": eager.sketch.num_hot(), **same_state(eager, traced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--ratio", type=float, default=1000.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--importance", default="gradient", choices=("gradient", "frequency"))
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--block-steps", type=int, default=25)
    ap.add_argument("--compile", action="store_true",
                    help="also compile the sync-free pre-step hook with torch.compile(fullgraph=True)")
    add_threads_arg(ap, default=1)
    args = ap.parse_args()
    apply_threads(args)
    device = torch.device(args.device)
    sizes = kaggle_field_sizes(args.scale)
    batches = [b.to(device) for b in zipf_requests(sizes, args.batch_size, 200, seed=1)]
    project = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(2)).to(device)
    (a, opt_a), (b, opt_b) = make_pair(sizes, args.ratio, device, args.importance)
    hooks: dict[str, list[float]] = {"vectorised": [], "sync_free": []}
    time_hook(a, hooks["vectorised"], device)
    time_hook(b, hooks["sync_free"], device)
    steps = {"vectorised": stepper(a, opt_a, batches, project), "sync_free": stepper(b, opt_b, batches, project)}
    per_step = timed_blocks(steps, hooks, args.blocks, args.block_steps, device)
    hook = {k: sum(v) / max(len(v), 1) for k, v in hooks.items()}
    record: dict[str, Any] = {
        "benchmark": "cafe_sync_free", "settings": vars(args), "hot_rows": a.num_hot_rows,
        "sketch_slots": a.sketch.keys.numel(), "hot_rows_held": a.sketch.num_hot(),
        "step_us": {k: round(1e6 * v, 1) for k, v in per_step.items()},
        "hook_us": {k: round(1e6 * v, 1) for k, v in hook.items()},
        "sync_free_over_vectorised": {"step": round(per_step["sync_free"] / per_step["vectorised"], 3),
                                      "hook": round(hook["sync_free"] / hook["vectorised"], 3)},
        "tables_equal": same_state(a, b),
        "hook_ops": {k: hook_ops(t, steps[k]) for k, t in (("vectorised", a), ("sync_free", b))}}
    log(f"us per step {record['step_us']}, per hook {record['hook_us']}")
    attempts: dict[str, Callable[[], dict[str, Any]]] = {}
    if args.compile:
        attempts["compile"] = lambda: compiled_hook(sizes, args.ratio, batches, project, args.importance, 50, device)
    if device.type == "cuda":
        attempts["cuda_graph"] = lambda: cuda_capture(sizes, args.ratio, batches, project, args.importance, 50)
    for name, attempt in attempts.items():
        try:
            record[name] = attempt()
        except Exception as e:  # what failed is the finding
            record[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log(f"{name}: {record[name]}")
    emit(record)


if __name__ == "__main__":
    main()
