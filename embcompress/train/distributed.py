"""Data-parallel training: one replica of the whole model per process, DDP for the MLPs.

Launch with ``torchrun --nproc_per_node N -m embcompress train ...`` (the process group is initialised
from torchrun's environment: gloo on the CPU, NCCL on CUDA), or from Python by initialising a process
group yourself and calling :func:`embcompress.train.run_training` on every rank.

How the model stays identical on every rank:

* At the start rank 0's parameters and buffers are broadcast to all ranks (so a table built from a
  different random state, or a resumed checkpoint read on one rank only, cannot make replicas differ).
* MLP parameters are wrapped in ``DistributedDataParallel`` (gradients averaged during backward).
* Compressed tables are small enough to replicate; their parameters are left out of DDP (whose reducer
  expects dense gradients for modules it does not know) and :func:`sync_table_gradients` averages them
  after backward: dense gradients with all-reduce, sparse ones by all-gathering (indices, values) in rank
  order and coalescing, which works on gloo and on NCCL alike (NCCL has no sparse all-reduce).
* State that is not a gradient (CAFE's sketch, mpcache's cache and counts, TT's access counts) is
  updated from the (ids, scores/counts) of all ranks, concatenated in rank order by
  :func:`embcompress.embeddings.sync.gather_across_ranks`: every rank applies the same update in the
  same order, so the state stays bitwise identical. Random draws in those updates (mpcache's stochastic
  rounding) come from the global torch RNG, which starts from the same seed and sees the same calls on
  every rank.

Each rank reads batches ``rank, rank + N, ...`` of the epoch's batch order, so one step of N ranks with
batch size B sees the same rows as one single-process step with batch N*B; all ranks take the number of
steps of the rank with the fewest batches. Evaluation is sharded the same way and the predictions are
gathered, so every rank computes the same AUC; only rank 0 writes the run directory.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..embeddings import CompressedEmbeddingBag
from ..embeddings.sync import gather_across_ranks

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    owns_group: bool = False  # this module initialised the process group, so it tears it down
    store: Any = None  # the process group's key-value store: each rank's last step, to name a rank that stopped
    timeout: float = 1800.0  # seconds a collective waits for the other ranks

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankStopped(RuntimeError):
    """A collective failed because another rank stopped answering (hung past the timeout, or crashed)."""


def setup(device: str = "cpu", timeout: float = 1800.0) -> DistContext:
    """Join the process group: an existing one, or one described by torchrun's environment variables
    (WORLD_SIZE > 1), whose collectives wait ``timeout`` seconds for the other ranks. Without either,
    a single-process context."""
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return DistContext(device=device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda") and world > 1 and ":" not in device:
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and dist.get_backend() == "nccl" and not device.startswith("cuda"):
        raise ValueError("the process group uses NCCL, which needs --device cuda; use gloo for CPU training")
    log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    try:
        store = dist.distributed_c10d._get_default_store() if world > 1 else None
    except (RuntimeError, AttributeError):  # a group without a default store: ranks go unnamed
        store = None
    ctx = DistContext(rank=rank, world_size=world, device=device, owns_group=owns, store=store, timeout=timeout)
    heartbeat(ctx, 0)
    return ctx


def heartbeat(ctx: DistContext, step: int) -> None:
    """Record that this rank has started optimizer step ``step`` (read back by :func:`rank_stopped`)."""
    if ctx.enabled and ctx.store is not None:
        ctx.store.set(f"embcompress/step/{ctx.rank}", str(step))


_COMM_ERROR = re.compile(r"timed? ?out|timeout|connection (closed|reset|refused)|broken pipe|peer", re.I)


def rank_stopped(ctx: DistContext, error: BaseException) -> RankStopped | None:
    """A :class:`RankStopped` naming the ranks that stopped when ``error`` is a failed collective (a timeout
    or a lost connection); None for any other error.

    Every rank whose collective fails says so in the store and waits a few seconds for the others to say so
    too: a rank that does not is the one that hung or crashed.
    """
    dist_error = getattr(dist, "DistError", ())
    if not ctx.enabled or not (isinstance(error, dist_error) or _COMM_ERROR.search(str(error))):
        return None
    cause = _first_line(error)
    try:
        store = ctx.store
        store.set_timeout(timedelta(seconds=5))
        store.set(f"embcompress/failed/{ctx.rank}", "1")
        others = [r for r in range(ctx.world_size) if r != ctx.rank]
        deadline = time.monotonic() + min(max(ctx.timeout, 2.0), 10.0)
        while time.monotonic() < deadline and not store.check([f"embcompress/failed/{r}" for r in others]):
            time.sleep(0.1)
        silent = [r for r in others if not store.check([f"embcompress/failed/{r}"])]
        steps = ", ".join(f"rank {r}: {int(store.get(f'embcompress/step/{r}'))}" for r in range(ctx.world_size))
    except Exception:  # the store lives in rank 0's process: unreachable when rank 0 is gone
        who = "rank 0 (which holds the process group's store)" if ctx.rank != 0 else "another rank"
        return RankStopped(f"rank {ctx.rank}: {who} stopped answering within --dist-timeout {ctx.timeout:g} s: "
                           f"{cause}")
    who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent)) if silent else "a rank"
    return RankStopped(f"rank {ctx.rank}: {who} stopped answering within --dist-timeout {ctx.timeout:g} s "
                       f"(hung or crashed; last step started: {steps}): {cause}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if ctx.enabled:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def table_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, gets sparse gradients) of every table parameter, in a fixed order."""
    tables = {id(m) for m in model.modules() if isinstance(m, CompressedEmbeddingBag)}
    sparse = {id(p) for m in model.modules() if id(m) in tables for p in m.sparse_parameters()}
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        if id(module) not in tables:
            continue
        for name, p in module.named_parameters(recurse=True):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mod_name}.{name}" if mod_name else name, p, id(p) in sparse))
    return out


@torch.no_grad()
def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (everything in state_dict) to every rank, in place."""
    for t in model.state_dict().values():
        if isinstance(t, Tensor):
            dist.broadcast(t, src=0)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module to call in training: DDP over everything but the tables (or the model itself)."""
    if not ctx.enabled:
        return model
    broadcast_model(model)
    table_ids = {id(m) for m in model.modules() if isinstance(m, CompressedEmbeddingBag)}
    ignore = [name for name, _, _ in table_parameters(model)]
    for mod_name, module in model.named_modules():
        if id(module) in table_ids:
            ignore += [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    # No buffer broadcast in forward: the model's buffers are the tables' (codes, sketches), left out of
    # DDP above and kept identical through gather_across_ranks instead of being re-sent every step.
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **sync)


@torch.no_grad()
def sync_table_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Average the tables' gradients over ranks (call after backward, before the optimizer step).

    A parameter with no gradient on any rank keeps ``grad = None`` (so Adam-like optimizers skip it as
    in a single process); sparse gradients stay sparse and coalesced.
    """
    if not ctx.enabled:
        return
    params = table_parameters(model)
    dense = [p for _, p, is_sparse in params if not is_sparse]
    if dense:
        has = torch.tensor([p.grad is not None for p in dense], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(has)
        for p, n in zip(dense, has.tolist()):
            if n == 0:
                continue
            g = p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)
            g = g / ctx.world_size
            dist.all_reduce(g)
            p.grad = g
    for _, p, is_sparse in params:
        if not is_sparse:
            continue
        if p.grad is None:
            idx = torch.zeros(0, 1, dtype=torch.int64, device=p.device)  # row-sparse: one index per row
            val = p.new_zeros((0,) + tuple(p.shape[1:]))
        else:
            g = p.grad if p.grad.is_sparse else p.grad.to_sparse(1)
            g = g.coalesce()
            # indices are (1, nnz) for row-sparse embedding gradients; values (nnz, D)
            idx, val = g.indices().t().contiguous(), g.values()
        idx, val = gather_across_ranks(idx, val)
        if idx.shape[0] == 0:
            p.grad = None
            continue
        p.grad = torch.sparse_coo_tensor(idx.t(), val / ctx.world_size, p.shape, check_invariants=False).coalesce()
