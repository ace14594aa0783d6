"""Run every (method, ratio, seed) cell of a sweep, one finished cell = one atomically written JSON file.

A sweep directory holds ``sweep.json`` (the settings every cell shares) and ``cells/<key>.json``, one per
finished cell. A cell is finished when it trained (``done``), when its method cannot reach its ratio
(``skipped``, with the BudgetError's message), or when its loss diverged (``failed``): all three are
deterministic for fixed settings, so a rerun never repeats them. Any other exception is reported as an
``error`` and not saved, so the next run retries that cell. A rerun with different shared settings is
refused: mixing cells trained under different settings would make the table lie.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data import Dataset, load_dataset
from ..embeddings import BudgetError, get_method
from ..train import loop
from ..train.checkpoint import write_json

log = logging.getLogger(__name__)

STATUS_FINISHED = ("done", "skipped", "failed")
# TrainConfig fields a sweep may set for all cells (the rest are per cell or fixed by the sweep).
TRAIN_FIELDS = ("split", "model", "model_options", "embedding_dim", "epochs", "batch_size", "eval_batch_size", "lr",
                "warmup_steps", "warmup_max_share", "optimizer", "shuffle", "max_steps", "device")  # fmt: skip


@dataclass(frozen=True, order=True)
class Cell:
    """One training run of a sweep. ``full`` runs at ratio 1 only."""

    seed: int
    method: str
    ratio: float

    @property
    def key(self) -> str:
        return f"{self.method}-{self.ratio:g}x-seed{self.seed}"


@dataclass
class SweepConfig:
    out: str
    methods: list[str]
    ratios: list[float]
    seeds: list[int]
    data: str = "synthetic"
    data_options: dict[str, Any] = field(default_factory=dict)  # without the seed: see data_seed
    data_seed: int | None = None  # synthetic data seed; None: each cell seed gets its own data
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides, keys from TRAIN_FIELDS
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    keep_runs: bool = False  # keep each cell's run directory (metrics.jsonl, checkpoint) under runs/
    progress: bool = True
    baseline: str | None = "hash"  # results.md's paired comparison; a report option, not a setting

    def settings(self) -> dict[str, Any]:
        """What every cell's result depends on besides (method, ratio, seed); must match on resume."""
        return json.loads(json.dumps({
            "data": self.data, "data_options": self.data_options, "data_seed": self.data_seed,
            "train": self.train, "method_options": self.method_options,
        }, sort_keys=True, default=str))  # fmt: skip

    def validate(self) -> None:
        unknown = sorted(set(self.train) - set(TRAIN_FIELDS))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; allowed: {list(TRAIN_FIELDS)}")
        if not self.methods:
            raise ValueError("no methods given")
        for m in self.methods:
            get_method(m)  # raises "unknown method ..." before any training
        for m in self.method_options:
            if m not in self.methods:
                raise ValueError(f"options given for method {m!r}, which is not in the sweep")
        if any(not (r > 0 and math.isfinite(r)) for r in self.ratios):
            raise ValueError(f"compression ratios must be positive numbers, got {self.ratios}")
        if not self.ratios and any(m != "full" for m in self.methods):
            raise ValueError("no compression ratios given")
        if not self.seeds:
            raise ValueError("no seeds given")


def plan_cells(methods: Sequence[str], ratios: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """Cells in run order: seed by seed (so one dataset serves all of a seed's cells), full first."""
    cells = []
    for seed in seeds:
        for m in methods:
            cells += [Cell(seed, "full", 1.0)] if m == "full" else [Cell(seed, m, float(r)) for r in sorted(ratios)]
    return list(dict.fromkeys(cells))  # drop duplicates, keep order


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def cell_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.key}.json"


def load_cell(out: str | Path, cell: Cell) -> dict[str, Any] | None:
    """A finished cell's record, or None when it has not finished (or its file is unreadable)."""
    path = cell_path(out, cell)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:  # atomic writes make this unlikely; redo the cell
        log.warning("ignoring unreadable cell file %s: %s", path, e)
        return None
    return record if record.get("status") in STATUS_FINISHED else None


def _check_settings(cfg: SweepConfig) -> None:
    path = Path(cfg.out) / "sweep.json"
    settings = cfg.settings()
    if path.is_file():
        saved = json.loads(path.read_text()).get("settings")
        if saved != settings:
            raise ValueError(f"{cfg.out} holds a sweep with other settings ({saved}); these are {settings}. "
                             "Use a new --out directory, or the same settings to resume.")
    write_json(path, {"settings": settings, "methods": cfg.methods, "ratios": cfg.ratios, "seeds": cfg.seeds,
                      "machine": machine_info()})


class _Datasets:
    """The dataset of the current seed, kept while that seed's cells run (one dataset in memory)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self._key: Any = None
        self._ds: Dataset | None = None

    def options(self, seed: int) -> dict[str, Any]:
        opts = dict(self.cfg.data_options)
        if self.cfg.data == "synthetic":
            opts["seed"] = self.cfg.data_seed if self.cfg.data_seed is not None else seed
        return opts

    def get(self, seed: int) -> Dataset:
        opts = self.options(seed)
        key = json.dumps(opts, sort_keys=True, default=str)
        if key != self._key:
            self._ds = None  # free the previous seed's data before making the next
            log.info("loading %s data %s", self.cfg.data, opts)
            self._ds, self._key = load_dataset(self.cfg.data, **opts), key
        assert self._ds is not None
        return self._ds


def run_cell(cfg: SweepConfig, cell: Cell, datasets: _Datasets) -> dict[str, Any]:
    """Train one cell; returns its record (status done/skipped/failed). Other exceptions propagate."""
    train_cfg = loop.TrainConfig(
        data=cfg.data, data_options=datasets.options(cell.seed), method=cell.method,
        compression=None if cell.method == "full" else cell.ratio,
        method_options=dict(cfg.method_options.get(cell.method, {})), seed=cell.seed,
        out=str(Path(cfg.out) / "runs" / cell.key) if cfg.keep_runs else None, progress=cfg.progress, **cfg.train,
        overwrite=True,  # a cell without a result file reruns from scratch over what an interrupted run left
    )  # fmt: skip
    record: dict[str, Any] = {"cell": asdict(cell), "key": cell.key, "load_before": os.getloadavg()[0]}
    try:
        # looked up on the module at call time, so tests can patch embcompress.train.loop.run_training
        summary = loop.run_training(train_cfg, dataset=datasets.get(cell.seed))
    except BudgetError as e:
        record.update(status="skipped", reason=str(e))
    except loop.TrainingDiverged as e:
        record.update(status="failed", reason=str(e))
    else:
        record.update(status="done", reason=None, summary=summary)
    record["load_after"] = os.getloadavg()[0]
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


def run_sweep(cfg: SweepConfig, report: Callable[[SweepConfig, list[dict[str, Any]]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run the unfinished cells of ``cfg`` and return one record per planned cell, in plan order.

    ``report`` (e.g. write results.csv/md and plots) is called with the records at the end.
    """
    cfg.validate()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    _check_settings(cfg)
    cells = plan_cells(cfg.methods, cfg.ratios, cfg.seeds)
    records: dict[Cell, dict[str, Any]] = {}
    for cell in cells:
        rec = load_cell(cfg.out, cell)
        if rec is not None:
            records[cell] = rec
    todo = [c for c in cells if c not in records]
    log.info("sweep: %d cells, %d finished before, %d to run", len(cells), len(records), len(todo))
    datasets = _Datasets(cfg)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep", unit="cell", disable=not cfg.progress)
    try:
        for cell in todo:
            bar.set_postfix_str(cell.key)
            try:
                rec = run_cell(cfg, cell, datasets)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # a bug in one method must not cost the other cells; not saved: retried
                log.error("cell %s raised %s: %s", cell.key, type(e).__name__, e,
                          exc_info=log.isEnabledFor(logging.INFO))
                records[cell] = {"cell": asdict(cell), "key": cell.key, "status": "error",
                                 "reason": f"{type(e).__name__}: {e}"}
            else:
                write_json(cell_path(cfg.out, cell), rec)  # atomic: a cell file is whole or absent
                records[cell] = rec
                if rec["status"] != "done":
                    log.warning("cell %s %s: %s", cell.key, rec["status"], rec["reason"])
            bar.update(1)
    finally:
        bar.close()
    ordered = [records[c] for c in cells]
    if report is not None:
        report(cfg, ordered)
    return ordered
