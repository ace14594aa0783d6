"""One training loop for every method: build data, table and model; train; evaluate; write the run.

Reads top to bottom: :func:`run_training` is the whole job, the functions above it are its steps.
A run directory holds ``config.json``, ``metrics.jsonl`` (one line per logged step and per evaluation),
``summary.json`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset, iterate_batches, load_dataset, num_batches, split_dataset
from ..embeddings import CompressedEmbeddingBag, attach, full_table_bytes, make_table
from ..models import get_model
from .checkpoint import save_checkpoint, write_json
from .metrics import auc, logloss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adagrad", "adam")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved as the run's config.json."""

    data: str = "synthetic"
    data_options: dict[str, Any] = field(default_factory=dict)
    split: str = "time"
    test_fraction: float = 1 / 7
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
    # Adagrad, not the DLRM reference's SGD lr 0.1: with SGD one epoch over fewer than millions of rows
    # barely moves the embeddings (README, "Defaults"); Adagrad 0.05 reaches the logistic-regression
    # reference AUC on the real Criteo sample.
    lr: float = 0.05
    optimizer: str = "adagrad"
    seed: int = 0
    shuffle: bool = False  # time order by default: CAFE adapts to it, as in its paper
    max_steps: int | None = None
    device: str = "cpu"
    out: str | None = None
    progress: bool = True
    log_every: int = 200
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.split not in ("time", "random"):
            raise ValueError(f"split must be 'time' or 'random', got {self.split!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "embedding_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


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


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Optimizers for a model whose tables may have sparse-gradient parameters.

    SGD and Adagrad take sparse and dense gradients alike; Adam needs SparseAdam for the sparse ones.
    The list is in stepping order; :func:`embcompress.attach` hooks the tables onto it.
    """
    sparse_ids = {id(p) for t in embedding_tables(model) for p in t.sparse_parameters()}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
    if cfg.optimizer == "sgd":
        opts: list[torch.optim.Optimizer] = [torch.optim.SGD(sparse + dense, lr=cfg.lr)]
    elif cfg.optimizer == "adagrad":
        opts = [torch.optim.Adagrad(sparse + dense, lr=cfg.lr)]
    else:
        opts = ([torch.optim.SparseAdam(sparse, lr=cfg.lr)] if sparse else []) + [torch.optim.Adam(dense, lr=cfg.lr)]
    attach(model, *opts)
    return opts


def _to(batch: Iterable[torch.Tensor], device: str) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in batch]


@torch.no_grad()
def predict(model: nn.Module, view: Any, batch_size: int, device: str = "cpu",
            progress: bool = False) -> tuple[np.ndarray, float]:
    """Click probabilities for every row of ``view`` and the evaluation speed in samples/s."""
    model.eval()
    out: list[np.ndarray] = []
    start = time.perf_counter()
    total = num_batches(view, batch_size)
    for dense, sparse, _ in tqdm(iterate_batches(view, batch_size), total=total, disable=not progress,
                                 desc="eval", unit="batch", leave=False):
        dense, sparse = _to((dense, sparse), device)
        out.append(torch.sigmoid(model(dense, sparse)).float().cpu().numpy())
    seconds = time.perf_counter() - start
    probs = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return probs, len(probs) / max(seconds, 1e-9)


def evaluate(model: nn.Module, view: Any, batch_size: int, device: str = "cpu",
             progress: bool = False) -> dict[str, float]:
    probs, speed = predict(model, view, batch_size, device, progress)
    labels = np.asarray(view.labels)
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "samples_per_s": speed}


def checkpoint_state(model: nn.Module, opts: list[torch.optim.Optimizer], cfg: TrainConfig,
                     epoch: int, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in opts],
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "epoch": epoch,
        "step": step,
    }


class RunWriter:
    """The run directory: config.json, metrics.jsonl (appended, flushed per line), summary, checkpoint."""

    def __init__(self, out: str | None) -> None:
        self.dir = Path(out) if out else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)

    def config(self, cfg: TrainConfig) -> None:
        if self.dir is not None:
            write_json(self.dir / "config.json", asdict(cfg))

    def metric(self, **row: Any) -> None:
        if self.dir is not None:
            self._metrics.write(json.dumps(row) + "\n")

    def checkpoint(self, state: dict[str, Any]) -> None:
        if self.dir is not None:
            save_checkpoint(self.dir / "checkpoint.pt", state)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json(self.dir / "summary.json", summary)
            self._metrics.close()


def train_epoch(model: nn.Module, opts: list[torch.optim.Optimizer], view: Any, cfg: TrainConfig,
                epoch: int, step: int, writer: RunWriter) -> tuple[int, int, float]:
    """One pass over ``view``; returns (steps taken in all, samples seen, mean loss of the epoch)."""
    model.train()
    total = num_batches(view, cfg.batch_size)
    if cfg.max_steps is not None:
        total = max(0, min(total, cfg.max_steps - step))
    batches = iterate_batches(view, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed + epoch)
    bar = tqdm(total=total, disable=not cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs} {cfg.method}",
               unit="batch", leave=False)
    samples, loss_sum, window, window_start = 0, 0.0, 0.0, time.perf_counter()
    for i, batch in enumerate(batches):
        if i >= total:
            break
        dense, sparse, labels = _to(batch, cfg.device)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            where = f" the last good checkpoint is {writer.dir / 'checkpoint.pt'}" if writer.dir and (
                writer.dir / "checkpoint.pt").exists() else " no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {value} at step {step} (epoch {epoch + 1}); training stopped;"
                                   f"{where}. Try a smaller --lr.")
        loss.backward()
        for opt in opts:
            opt.step()  # table hooks run before the first and after the last (embcompress.attach)
        step += 1
        samples += len(labels)
        loss_sum += value * len(labels)
        window += value
        bar.update(1)
        if step % cfg.log_every == 0:
            now = time.perf_counter()
            rate = cfg.log_every * cfg.batch_size / max(now - window_start, 1e-9)
            bar.set_postfix(loss=f"{window / cfg.log_every:.4f}")
            writer.metric(kind="train", epoch=epoch, step=step, loss=window / cfg.log_every, samples_per_s=rate)
            window, window_start = 0.0, now
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            writer.checkpoint(checkpoint_state(model, opts, cfg, epoch, step))
    bar.close()
    return step, samples, loss_sum / max(samples, 1)


# ---------------------------------------------------------------------------------------------- the job
def run_training(cfg: TrainConfig, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) the summary."""
    cfg.validate()
    # Say explicitly that sparse-gradient invariants go unchecked (the fast path; our tables build
    # valid sparse gradients): torch otherwise warns on every sparse Adagrad step.
    torch.sparse.check_sparse_tensor_invariants.disable()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ds = dataset if dataset is not None else load_dataset(cfg.data, **cfg.data_options)
    train, test = split_dataset(ds, cfg.split, cfg.test_fraction, seed=cfg.seed)
    model = build_model(cfg, ds).to(cfg.device)
    table = embedding_tables(model)[0]
    opts = build_optimizers(model, cfg)
    writer = RunWriter(cfg.out)
    writer.config(cfg)
    log.info("training %s (%s) on %d rows, testing on %d", cfg.method, table.extra_repr(), train.num_rows,
             test.num_rows)

    step, samples, seconds, last_loss = 0, 0, 0.0, math.nan
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        step, n, last_loss = train_epoch(model, opts, train, cfg, epoch, step, writer)
        seconds += time.perf_counter() - start
        samples += n
        writer.checkpoint(checkpoint_state(model, opts, cfg, epoch + 1, step))
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break

    metrics = evaluate(model, test, cfg.eval_batch_size, cfg.device, cfg.progress)
    writer.metric(kind="eval", step=step, **metrics)
    full = full_table_bytes(table.field_sizes, table.embedding_dim)
    summary: dict[str, Any] = {
        "method": cfg.method,
        "model": cfg.model,
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
        "train_loss": last_loss,
        "rows_train": train.num_rows,
        "rows_test": test.num_rows,
        "epochs": cfg.epochs,
        "steps": step,
        "train_seconds": seconds,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "embedding_dim": cfg.embedding_dim,
    }
    if getattr(test, "probs", None) is not None:
        summary["bayes_auc"] = auc(np.asarray(test.labels), np.asarray(test.probs))
    writer.summary(summary)
    return summary
