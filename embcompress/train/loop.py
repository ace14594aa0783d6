"""One training loop for every method: build data, table and model; train; evaluate; write the run.

Reads top to bottom: :func:`run_training` is the whole job, the functions above it are its steps.
A run directory holds ``config.json``, ``metrics.jsonl`` (one line per logged step, with the tables'
``training_stats``, and per evaluation), ``summary.json`` and the last ``keep_checkpoints`` checkpoints
(``checkpoint-STEP.pt``, the manifest ``checkpoints.json`` and ``checkpoint.pt``, a link to the newest;
see :mod:`.checkpoint`).

A checkpoint holds everything needed to continue exactly: model state (parameters and every table's
state: sketches, caches, counters), optimizer states, the RNG states (torch, numpy, python, CUDA) and the
data position (epoch, batches done in it, step). ``resume=True`` continues from the newest intact one;
with ``deterministic=True`` and a fixed thread count the resumed run ends bitwise equal to an
uninterrupted one. Several processes (torchrun) train data-parallel: see :mod:`.distributed`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset, DatasetView, iterate_batches, load_dataset, num_batches, split_dataset
from ..embeddings import CompressedEmbeddingBag, attach, full_table_bytes, make_table
from ..embeddings.sync import gather_across_ranks
from ..models import get_model
from . import distributed
from .checkpoint import CheckpointError, find_resume_checkpoint, rng_state, save_run_checkpoint, set_rng_state
from .checkpoint import atomic_write_bytes, json_dumps, write_json
from .distributed import DistContext
from .metrics import auc, logloss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adagrad", "adam")
# no cap on the warm-up by default: capped at a tenth, full on the real Criteo sample diverged on one seed of
# three (test logloss 0.73); benchmarks/warmup_cap.py and docs/cli.md "Defaults" have the figures
WARMUP_MAX_SHARE: float | None = None
# the files a run writes into its directory (besides checkpoint-STEP.pt): what --overwrite removes
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints.json", "checkpoint.pt")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved as the run's config.json."""

    data: str = "synthetic"
    data_options: dict[str, Any] = field(default_factory=dict)
    split: str = "time"
    test_fraction: float = 1 / 7
    # the last val_fraction of the training rows (time order under split="time") are held out and scored
    # as val_auc / val_logloss: choose settings on them, never on the test rows. 0: no validation rows
    val_fraction: float = 0.0
    method: str = "full"
    compression: float | None = None  # None: 1 for ``full``; give this or budget_bytes for others
    budget_bytes: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "dlrm"
    model_options: dict[str, Any] = field(default_factory=dict)
    embedding_dim: int = 16
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 4096
    # Adagrad rather than the DLRM reference's SGD: one SGD epoch over fewer than millions of rows barely
    # moves the embeddings (docs/cli.md, "Defaults")
    lr: float = 0.05
    # linear learning-rate ramp (the DLRM reference's --lr-num-warmup-steps): without it Adagrad's first
    # steps overshoot the logits and test AUC varies much more between seeds (docs/cli.md, "Defaults")
    warmup_steps: int = 300
    # the ramp lasts at most this share of the run's steps (None: no cap); a run shorter than its warm-up
    # never trains at ``lr``, which the loop logs as a warning
    warmup_max_share: float | None = WARMUP_MAX_SHARE
    optimizer: str = "adagrad"
    seed: int = 0
    shuffle: bool = False  # time order by default: CAFE adapts to it, as in its paper
    max_steps: int | None = None
    device: str = "cpu"
    out: str | None = None
    progress: bool = True
    log_every: int = 200
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end of each epoch
    keep_checkpoints: int = 2  # the last K checkpoints stay in the run directory
    resume: bool = False  # continue from the newest intact checkpoint in ``out`` (start afresh if none)
    deterministic: bool = False  # torch.use_deterministic_algorithms; with fixed threads, exact resumes
    overwrite: bool = False  # replace the run files in a non-empty ``out`` (otherwise refused unless resuming)
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective (torch's default)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.split not in ("time", "random"):
            raise ValueError(f"split must be 'time' or 'random', got {self.split!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size", "eval_batch_size", "embedding_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_max_share is not None and not self.warmup_max_share > 0:
            raise ValueError(f"warmup_max_share must be positive, got {self.warmup_max_share}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")
        check_device(self.device)
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.out:
            raise ValueError("resuming needs the run directory (--out DIR or --resume DIR)")


def check_device(device: str) -> None:
    """ValueError unless ``device`` is ``cpu``, or ``cuda`` / ``cuda:N`` on a machine where torch sees it."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch finds no CUDA device on this machine "
                             f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} "
                             "CUDA); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def prepare_run_dir(cfg: TrainConfig, clear: bool = True) -> None:
    """Refuse to mix two runs in one directory: ``out`` must be new or empty unless the run resumes from
    it, or ``overwrite`` removes the files of the run it holds (other files stay; ``clear=False`` only
    checks, for the ranks that do not write)."""
    if not cfg.out:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run directory {out} is a file; give --out a directory (new or empty)")
    if cfg.resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not cfg.overwrite:
        raise ValueError(f"run directory {out} is not empty; pass --resume to continue the run in it, "
                         "--overwrite to replace it, or a new --out")
    for path in out.iterdir() if clear else ():
        name = path.name[1:] if path.name.startswith(".") else path.name  # "." : a crashed write's temporary
        if name.startswith(RUN_FILES) or re.match(r"checkpoint-\d+\.pt", name):
            path.unlink()


# Settings a resumed run must share with the checkpoint (the rest, e.g. epochs or max_steps, may change).
RESUME_MUST_MATCH = ("data", "data_options", "split", "test_fraction", "val_fraction", "method", "compression", "budget_bytes",
                     "method_options", "model", "model_options", "embedding_dim", "batch_size", "lr",
                     "warmup_steps", "optimizer", "seed", "shuffle")
# Method options a resumed run may add to a checkpoint's settings: they name a layout that checkpoints
# without them were built with (cafe / cafe-ml sketches with 8-byte ids).
_OLD_DEFAULTS = {"key_dtype": "int64"}
# Optimizer settings that pick how the update runs, not what it computes: a resumed run keeps its own.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


# ---------------------------------------------------------------------------------------------- steps
def build_table(cfg: TrainConfig, field_sizes: list[int]) -> CompressedEmbeddingBag:
    compression = cfg.compression
    if compression is None and cfg.budget_bytes is None:
        if cfg.method != "full":
            raise ValueError(f"method {cfg.method!r} needs a compression ratio (--compression) or a byte budget")
        compression = 1.0
    return make_table(cfg.method, field_sizes, cfg.embedding_dim, compression=compression,
                      budget_bytes=cfg.budget_bytes, **cfg.method_options)


def build_model(cfg: TrainConfig, dataset: Dataset) -> nn.Module:
    table = build_table(cfg, list(dataset.field_sizes))
    return get_model(cfg.model)(table, num_dense=dataset.num_dense, **cfg.model_options)


def embedding_tables(model: nn.Module) -> list[CompressedEmbeddingBag]:
    return [m for m in model.modules() if isinstance(m, CompressedEmbeddingBag)]


def table_stats(model: nn.Module) -> dict[str, float]:
    """Every table's :meth:`~embcompress.embeddings.base.CompressedEmbeddingBag.training_stats` since the
    previous call; keys get the table's index when the model has several tables."""
    tables = embedding_tables(model)
    out: dict[str, float] = {}
    for i, t in enumerate(tables):
        out.update({(f"{i}.{k}" if len(tables) > 1 else k): v for k, v in t.training_stats().items()})
    return out


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Optimizers for a model whose tables may have sparse-gradient parameters, in stepping order, with
    the tables' hooks attached (:func:`embcompress.attach`).

    The sparse parameters and the dense ones (the MLPs) get an optimizer each: one sparse gradient sends
    every parameter of an optimizer down PyTorch's slow per-tensor loop, while the dense one can run
    fused on the CPU (multi-tensor on CUDA). The update is the same, since the state is per parameter.
    Adam takes SparseAdam for the sparse parameters.
    """
    sparse_ids = {id(p) for t in embedding_tables(model) for p in t.sparse_parameters()}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
    fused = True if dense and all(p.device.type == "cpu" and p.is_floating_point() for p in dense) else None
    if cfg.optimizer == "sgd":
        opts: list[torch.optim.Optimizer] = [torch.optim.SGD(sparse + dense, lr=cfg.lr)]
    elif cfg.optimizer == "adagrad":
        opts = (([torch.optim.Adagrad(sparse, lr=cfg.lr)] if sparse else [])
                + ([torch.optim.Adagrad(dense, lr=cfg.lr, fused=fused)] if dense else []))
    else:
        opts = (([torch.optim.SparseAdam(sparse, lr=cfg.lr)] if sparse else [])
                + ([torch.optim.Adam(dense, lr=cfg.lr, fused=fused)] if dense else []))
    attach(model, *opts)
    return opts


def warmup_steps_used(cfg: TrainConfig, planned_steps: int) -> int:
    """``cfg.warmup_steps``, capped at ``cfg.warmup_max_share`` of the run's ``planned_steps`` if set."""
    if cfg.warmup_max_share is None:
        return cfg.warmup_steps
    return min(cfg.warmup_steps, int(cfg.warmup_max_share * planned_steps))


def set_learning_rate(opts: list[torch.optim.Optimizer], cfg: TrainConfig, step: int,
                      warmup: int | None = None) -> None:
    """lr of optimizer step ``step`` (0-based): ``cfg.lr`` after a linear ramp over ``warmup`` steps
    (default ``cfg.warmup_steps``; the loop passes :func:`warmup_steps_used`).

    A function of the step alone, so a resumed run continues the schedule from its checkpointed step.
    """
    warmup = cfg.warmup_steps if warmup is None else warmup
    lr = cfg.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.lr
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = lr


def hold_out(view: DatasetView, fraction: float) -> tuple[DatasetView, DatasetView | None]:
    """(training rows, validation rows): the last ``fraction`` of ``view`` in its order (time order for a
    contiguous view, the seeded permutation's order for a random split). ``fraction=0``: (view, None)."""
    n_val = int(round(view.num_rows * fraction))
    if n_val == 0:
        return view, None
    n_fit = view.num_rows - n_val
    if n_fit <= 0:
        raise ValueError(f"val_fraction {fraction} leaves no training rows out of {view.num_rows}")
    if view.index is not None:
        return DatasetView(view.dataset, index=view.index[:n_fit]), DatasetView(view.dataset, index=view.index[n_fit:])
    return (DatasetView(view.dataset, view.start, view.start + n_fit),
            DatasetView(view.dataset, view.start + n_fit, view.stop))


def _to(batch: Iterable[torch.Tensor], device: str) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in batch]


@torch.no_grad()
def predict(model: nn.Module, view: Any, batch_size: int, device: str = "cpu",
            progress: bool = False, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, float]:
    """Click probabilities for this rank's batches of ``view`` (all rows in one process) and samples/s."""
    model.eval()
    out: list[np.ndarray] = []
    start = time.perf_counter()
    total = num_batches(view, batch_size, world_size=world_size, rank=rank)
    for dense, sparse, _ in tqdm(iterate_batches(view, batch_size, rank=rank, world_size=world_size),
                                 total=total, disable=not progress, desc="eval", unit="batch", leave=False):
        dense, sparse = _to((dense, sparse), device)
        out.append(torch.sigmoid(model(dense, sparse)).float().cpu().numpy())
    seconds = time.perf_counter() - start
    probs = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return probs, len(probs) / max(seconds, 1e-9)


def _shard_labels(view: Any, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    labels = np.asarray(view.labels)
    if world_size == 1:
        return labels
    total = num_batches(view, batch_size)
    parts = [labels[b * batch_size:(b + 1) * batch_size] for b in range(rank, total, world_size)]
    return np.concatenate(parts) if parts else labels[:0]


def evaluate(model: nn.Module, view: Any, batch_size: int, device: str = "cpu",
             progress: bool = False, ctx: DistContext | None = None) -> dict[str, float]:
    """AUC, logloss and speed on ``view``; with several ranks each predicts its shard of the batches and
    the predictions are gathered, so every rank returns the same metrics."""
    ctx = ctx or DistContext(device=device)
    start = time.perf_counter()
    probs, speed = predict(model, view, batch_size, device, progress, ctx.rank, ctx.world_size)
    labels = _shard_labels(view, batch_size, ctx.rank, ctx.world_size)
    if ctx.enabled:
        p, y = gather_across_ranks(torch.from_numpy(probs).to(device), torch.from_numpy(labels).float().to(device))
        probs, labels = p.cpu().numpy(), y.cpu().numpy()
        speed = len(probs) / max(time.perf_counter() - start, 1e-9)
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "samples_per_s": speed}


@dataclass
class Position:
    """Where training stands: what a checkpoint needs besides the model and optimizers."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches this rank has done in that epoch
    step: int = 0  # optimizer steps in all
    samples: int = 0  # training samples this rank has seen, all epochs
    seconds: float = 0.0  # training time so far
    epoch_samples: int = 0
    epoch_loss_sum: float = 0.0
    train_loss: float = math.nan  # mean loss of the latest (possibly partial) epoch, for the summary
    warmup: int = -1  # warm-up steps this run uses (warmup_steps_used); -1: not decided yet


def config_json(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON values: what a checkpoint stores and what a resume compares against."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def checkpoint_state(model: nn.Module, opts: list[torch.optim.Optimizer], cfg: TrainConfig,
                     pos: Position, world_size: int = 1) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in opts],
        "config": config_json(cfg),
        "epoch": pos.epoch,
        "step": pos.step,
        "position": asdict(pos),
        "rng": rng_state(),
        "world_size": world_size,
    }


def restore(state: dict[str, Any], model: nn.Module, opts: list[torch.optim.Optimizer], cfg: TrainConfig,
            world_size: int, source: Any) -> Position:
    """Load a checkpoint into a freshly built model and optimizers; returns the data position."""
    saved = state.get("config", {})
    mine = config_json(cfg)
    if "method_options" in saved:  # options that rebuild what older versions built by default may be added
        added = {k: v for k, v in mine["method_options"].items() if k not in saved["method_options"]}
        if added and added.items() <= _OLD_DEFAULTS.items():
            saved = {**saved, "method_options": {**saved["method_options"], **added}}
    differ = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != mine[k]]
    if differ:
        raise CheckpointError(f"cannot resume from {source}: it was trained with different settings: "
                              + ", ".join(f"{k}={saved[k]!r} (now {mine[k]!r})" for k in differ))
    if "position" not in state or "rng" not in state:
        raise CheckpointError(f"cannot resume from {source}: it holds no data position or RNG state "
                              "(written by an older version); only its weights can be loaded")
    if state.get("world_size", 1) != world_size:
        raise CheckpointError(f"cannot resume from {source}: it was written by {state.get('world_size')} "
                              f"ranks and this run has {world_size} (the data shards would differ)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # e.g. size mismatch: the settings build tables of another shape
        raise CheckpointError(
            f"cannot resume from {source}: its model does not fit the one these settings build (a cafe or "
            f"cafe-ml checkpoint from before 4-byte sketch ids became the default needs --option "
            f"key_dtype=int64): {e}") from e
    saved_opts = state["optimizers"]
    sizes = [sum(len(g["params"]) for g in o.param_groups) for o in opts]
    if cfg.optimizer == "adagrad" and len(saved_opts) == 1 < len(opts):
        saved_opts = _split_optimizer_state(saved_opts[0], sizes)
    if len(saved_opts) != len(opts):
        raise CheckpointError(f"cannot resume from {source}: it has {len(state['optimizers'])} optimizer states, "
                              f"this run {len(opts)}")
    for opt, s in zip(opts, saved_opts):
        # How the update runs (fused, multi-tensor) is this run's choice, not the checkpoint's: a
        # checkpoint written on a CPU resumes on CUDA, where fused Adagrad does not exist.
        groups = [{**saved, **{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g}}
                  for saved, g in zip(s["param_groups"], opt.param_groups)]
        opt.load_state_dict({**s, "param_groups": groups})
    set_rng_state(state["rng"])
    known = {f.name for f in fields(Position)}
    return Position(**{k: v for k, v in state["position"].items() if k in known})


def _split_optimizer_state(saved: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """The state of one Adagrad over all parameters (checkpoints from before the sparse and the dense
    parameters had an optimizer each) as the states of optimizers over ``sizes`` parameters in turn."""
    if len(saved["param_groups"]) != 1 or len(saved["param_groups"][0]["params"]) != sum(sizes):
        return [saved]  # not that layout: the count check reports it
    group, out, start = saved["param_groups"][0], [], 0
    for n in sizes:
        out.append({"state": {int(i) - start: v for i, v in saved["state"].items() if start <= int(i) < start + n},
                    "param_groups": [{**group, "params": list(range(n))}]})
        start += n
    return out


class RunWriter:
    """The run directory: config.json, metrics.jsonl (appended, flushed per line), summary, checkpoints.

    ``out=None`` (or a rank other than 0) writes nothing.
    """

    def __init__(self, out: str | None, keep: int = 2) -> None:
        self.dir = Path(out) if out else None
        self.keep = keep
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)

    def config(self, cfg: TrainConfig) -> None:
        if self.dir is not None:
            write_json(self.dir / "config.json", asdict(cfg))

    def metric(self, **row: Any) -> None:
        if self.dir is not None:
            self._metrics.write(json_dumps(row) + "\n")

    def forget_after(self, step: int) -> None:
        """Drop metric rows a killed run logged after the checkpoint being resumed from."""
        if self.dir is None:
            return
        self._metrics.close()
        rows = [line for line in (self.dir / "metrics.jsonl").read_text().splitlines()
                if line.strip() and _row_step(line) <= step]
        write_json_lines(self.dir / "metrics.jsonl", rows)
        self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)

    def checkpoint(self, state: dict[str, Any]) -> None:
        if self.dir is not None:
            save_run_checkpoint(self.dir, state, state["step"], self.keep)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json(self.dir / "summary.json", summary)
            self._metrics.close()


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except ValueError:
        return math.inf  # a line cut by the kill


def write_json_lines(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def epoch_batches(view: Any, cfg: TrainConfig, ctx: DistContext) -> int:
    """Steps in one epoch: with several ranks, the batches of the rank with the fewest (the last one)."""
    return num_batches(view, cfg.batch_size, world_size=ctx.world_size, rank=ctx.world_size - 1)


def train_epoch(model: nn.Module, opts: list[torch.optim.Optimizer], view: Any, cfg: TrainConfig,
                pos: Position, writer: RunWriter, ctx: DistContext | None = None,
                ddp_model: nn.Module | None = None) -> None:
    """Train from ``pos`` (epoch ``pos.epoch``, after ``pos.batch`` batches) to the end of that epoch or
    ``max_steps``, advancing ``pos``. ``ddp_model`` is the module to call (DDP-wrapped under torchrun)."""
    ctx = ctx or DistContext(device=cfg.device)
    step_model = ddp_model if ddp_model is not None else model
    model.train()
    epoch_total = epoch_batches(view, cfg, ctx)
    total = epoch_total - pos.batch
    if cfg.max_steps is not None:
        total = max(0, min(total, cfg.max_steps - pos.step))
    batches = iterate_batches(view, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed + pos.epoch,
                              start_batch=pos.batch, rank=ctx.rank, world_size=ctx.world_size)
    bar = tqdm(total=total, disable=not cfg.progress or not ctx.is_main,
               desc=f"epoch {pos.epoch + 1}/{cfg.epochs} {cfg.method}", unit="batch", leave=False)
    # the loss and speed of a logged row cover the steps since the previous row of this process (after a
    # resume the first window is shorter than log_every)
    window, window_steps, window_samples = 0.0, 0, 0
    window_start = start = time.perf_counter()
    table_stats(model)  # start the tables' counters here (a resumed table's count from its checkpoint)
    for i, batch in enumerate(batches):
        if i >= total:
            break
        dense, sparse, labels = _to(batch, ctx.device)
        distributed.heartbeat(ctx, pos.step)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(step_model(dense, sparse), labels)
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            where = f" the last good checkpoint is {writer.dir / 'checkpoint.pt'}" if writer.dir and (
                writer.dir / "checkpoint.pt").exists() else " no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {value} at step {pos.step} (epoch {pos.epoch + 1}); training "
                                   f"stopped;{where}. Try a smaller --lr.")
        loss.backward()
        distributed.sync_table_gradients(model, ctx)
        set_learning_rate(opts, cfg, pos.step, pos.warmup)
        for opt in opts:
            opt.step()  # table hooks run before the first and after the last (embcompress.attach)
        pos.step += 1
        pos.batch += 1
        pos.samples += len(labels)
        pos.epoch_samples += len(labels)
        pos.epoch_loss_sum += value * len(labels)
        window, window_steps, window_samples = window + value, window_steps + 1, window_samples + len(labels)
        bar.update(1)
        if pos.step % cfg.log_every == 0:
            now = time.perf_counter()
            rate = window_samples / max(now - window_start, 1e-9)
            bar.set_postfix(loss=f"{window / window_steps:.4f}")
            stats = table_stats(model)  # the table's own state over the window: cafe's hot share, ...
            writer.metric(kind="train", epoch=pos.epoch, step=pos.step, steps=window_steps, loss=window / window_steps,
                          samples_per_s=rate, **({"table": stats} if stats else {}))
            window, window_steps, window_samples, window_start = 0.0, 0, 0, now
        # the end of an epoch is checkpointed by the caller, as the start of the next one
        if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0 and pos.batch < epoch_total:
            pos.seconds += time.perf_counter() - start
            start = time.perf_counter()
            writer.checkpoint(checkpoint_state(model, opts, cfg, pos, ctx.world_size))
    pos.seconds += time.perf_counter() - start
    bar.close()


# ---------------------------------------------------------------------------------------------- the job
def run_training(cfg: TrainConfig, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) the summary."""
    return train_model(cfg, dataset)[0]


def train_model(cfg: TrainConfig, dataset: Dataset | None = None) -> tuple[dict[str, Any], nn.Module]:
    """:func:`run_training`, also returning the trained model (the plain module, not a DDP wrapper)."""
    cfg.validate()
    ctx = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        return _train(cfg, dataset, ctx)
    except RuntimeError as e:
        stopped = None if isinstance(e, TrainingDiverged) else distributed.rank_stopped(ctx, e)
        if stopped is None:
            raise
        raise stopped from e
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, dataset: Dataset | None, ctx: DistContext) -> tuple[dict[str, Any], nn.Module]:
    # Say explicitly that sparse-gradient invariants go unchecked (the fast path; our tables build
    # valid sparse gradients): torch otherwise warns on every sparse Adagrad step.
    torch.sparse.check_sparse_tensor_invariants.disable()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    prepare_run_dir(cfg, clear=ctx.is_main)
    distributed.barrier(ctx)  # every rank has checked the run directory before rank 0 writes to it
    ds = dataset if dataset is not None else load_dataset(cfg.data, progress=cfg.progress, **cfg.data_options)
    train, test = split_dataset(ds, cfg.split, cfg.test_fraction, seed=cfg.seed)
    train, val = hold_out(train, cfg.val_fraction)
    if train.num_rows < ctx.world_size or test.num_rows == 0:
        raise ValueError(f"{ds.num_rows} rows are too few to train and test on: {train.num_rows} training and "
                         f"{test.num_rows} test rows after the split")
    model = build_model(cfg, ds).to(ctx.device)
    table = embedding_tables(model)[0]
    opts = build_optimizers(model, cfg)
    writer = RunWriter(cfg.out if ctx.is_main else None, cfg.keep_checkpoints)

    pos = Position()
    # every rank reads the checkpoint (the run directory must be visible to all of them); rank 0 tidies
    found = find_resume_checkpoint(cfg.out, tidy=ctx.is_main) if cfg.resume else None
    if found is not None:
        state, path = found
        pos = restore(state, model, opts, cfg, ctx.world_size, path)
        writer.forget_after(pos.step)
        log.warning("resumed from %s: epoch %d, batch %d, step %d", path, pos.epoch + 1, pos.batch, pos.step)
    elif cfg.resume:
        log.warning("no checkpoint in %s: starting from the beginning", cfg.out)
        writer.forget_after(-1)  # rows of a run that left no checkpoint
    if pos.warmup < 0:
        planned = cfg.epochs * epoch_batches(train, cfg, ctx)
        planned = planned if cfg.max_steps is None else min(planned, cfg.max_steps)
        pos.warmup = warmup_steps_used(cfg, planned)
        if pos.warmup < cfg.warmup_steps:  # also in the summary (warmup_steps_used) and the CLI's result line
            log.info("learning-rate warm-up: %d steps instead of %d (at most %.0f%% of the run's %d steps)",
                     pos.warmup, cfg.warmup_steps, 100 * cfg.warmup_max_share, planned)
        if pos.warmup > planned:  # also in the summary (lr_reached) and the CLI's result line
            log.warning("the learning-rate warm-up (%d steps) is longer than this run (%d steps): the learning "
                        "rate reaches only %.0f%% of --lr; --warmup-steps or --warmup-max-share shorten it",
                        pos.warmup, planned, 100 * planned / pos.warmup)
    writer.config(cfg)
    if writer.dir is not None:  # the run's own feature map: it loads and scores raw rows without its dataset
        from ..data.features import copy_feature_map
        copy_feature_map(ds, writer.dir)
    step_model = distributed.wrap_model(model, ctx)
    log.info("training %s (%s) on %d rows, testing on %d", cfg.method, table.extra_repr(), train.num_rows,
             test.num_rows)

    while pos.epoch < cfg.epochs and (cfg.max_steps is None or pos.step < cfg.max_steps):
        train_epoch(model, opts, train, cfg, pos, writer, ctx, step_model)
        pos.train_loss = pos.epoch_loss_sum / max(pos.epoch_samples, 1)
        if pos.batch >= epoch_batches(train, cfg, ctx):  # epoch finished: the next one starts at batch 0
            pos.epoch, pos.batch, pos.epoch_samples, pos.epoch_loss_sum = pos.epoch + 1, 0, 0, 0.0
        writer.checkpoint(checkpoint_state(model, opts, cfg, pos, ctx.world_size))
    samples, seconds, step = pos.samples * ctx.world_size, pos.seconds, pos.step

    if val is not None:
        val_metrics = evaluate(model, val, cfg.eval_batch_size, ctx.device, cfg.progress and ctx.is_main, ctx)
        writer.metric(kind="val", step=step, **val_metrics)
    metrics = evaluate(model, test, cfg.eval_batch_size, ctx.device, cfg.progress and ctx.is_main, ctx)
    writer.metric(kind="eval", step=step, **metrics)
    full = full_table_bytes(table.field_sizes, table.embedding_dim)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "method_options": dict(cfg.method_options),
        "model": cfg.model,
        "model_options": dict(cfg.model_options),
        "data": cfg.data,
        "compression_target": cfg.compression if cfg.compression is not None else (
            full / cfg.budget_bytes if cfg.budget_bytes else 1.0),
        "compression_actual": full / table.memory_bytes(),
        "embedding_bytes": table.memory_bytes(),
        "full_embedding_bytes": full,
        "test_auc": metrics["auc"],
        "test_logloss": metrics["logloss"],
        "train_samples_per_s": samples / max(seconds, 1e-9),
        "eval_samples_per_s": metrics["samples_per_s"],
        "train_loss": pos.train_loss,
        "rows_train": train.num_rows,
        "rows_test": test.num_rows,
        "epochs": cfg.epochs,
        "steps": step,
        "train_seconds": seconds,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "warmup_steps_used": pos.warmup,
        "lr_reached": min(1.0, step / pos.warmup) if pos.warmup > 0 else 1.0,  # of lr, at the last step
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "embedding_dim": cfg.embedding_dim,
        "world_size": ctx.world_size,
    }
    if val is not None:
        summary.update(val_auc=val_metrics["auc"], val_logloss=val_metrics["logloss"], rows_val=val.num_rows,
                       val_fraction=cfg.val_fraction)
    if getattr(test, "probs", None) is not None:
        summary["bayes_auc"] = auc(np.asarray(test.labels), np.asarray(test.probs))
    writer.summary(summary)
    return summary, model
