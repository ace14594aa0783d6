"""One table of several runs: run directories (``summary.json``), ``compress-lowrank`` outputs and sweep
directories (``sweep.json`` + ``cells/*.json``, one row per cell)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..data import DataError
from ..data.errors import read_json
from ..report import markdown_table, text_table

# (row key, column title, format)
COLUMNS = (
    ("run", "run", "{}"),
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("seed", "seed", "{}"),
    ("ratio", "ratio", "{:,.1f}x"),
    ("bytes", "table bytes", "{:,}"),
    ("auc", "test AUC", "{:.4f}"),
    ("logloss", "logloss", "{:.4f}"),
    ("train_samples_per_s", "train samples/s", "{:,.0f}"),
    ("eval_samples_per_s", "eval samples/s", "{:,.0f}"),
    ("status", "status", "{}"),
)


def _clean(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def row_of_summary(name: str, s: dict[str, Any], status: str = "done") -> dict[str, Any]:
    """A table row from a training ``summary.json`` (or a ``compress-lowrank`` one)."""
    if "auc_after" in s:  # compress-lowrank: the compressed model's figures, whole-model parameter ratio
        row = {"method": f"{s.get('method')}+lowrank-afm", "model": s.get("model"), "seed": None,
               "ratio": s.get("params_ratio"), "bytes": None, "auc": s.get("auc_after"),
               "logloss": s.get("logloss_after"), "train_samples_per_s": None,
               "eval_samples_per_s": s.get("infer_samples_per_s_after")}
    else:
        row = {"method": s.get("method"), "model": s.get("model"), "seed": s.get("seed"),
               "ratio": s.get("compression_actual"), "bytes": s.get("embedding_bytes"), "auc": s.get("test_auc"),
               "logloss": s.get("test_logloss"), "train_samples_per_s": s.get("train_samples_per_s"),
               "eval_samples_per_s": s.get("eval_samples_per_s")}
    return {"run": name, **{k: _clean(v) for k, v in row.items()}, "status": status, "reason": None}


def _sweep_rows(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((root / "cells").glob("*.json")):
        rec = read_json(path)
        name = f"{root}/{rec.get('key', path.stem)}"
        if rec.get("status") == "done" and rec.get("summary"):
            rows.append(row_of_summary(name, rec["summary"]))
        else:
            cell = rec.get("cell", {})
            rows.append({"run": name, "method": cell.get("method"), "model": None, "seed": cell.get("seed"),
                         "ratio": None, "bytes": None, "auc": None, "logloss": None, "train_samples_per_s": None,
                         "eval_samples_per_s": None, "status": rec.get("status"), "reason": rec.get("reason")})
    return rows


def collect_runs(dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Rows (dicts with the ``COLUMNS`` keys and ``reason``) of every run and sweep cell in ``dirs``, in
    the order given. A run that has not finished gives a row with status ``unfinished``."""
    rows: list[dict[str, Any]] = []
    for d in dirs:
        root = Path(d)
        if (root / "summary.json").is_file():
            rows.append(row_of_summary(str(root), read_json(root / "summary.json")))
        elif (root / "sweep.json").is_file():
            rows.extend(_sweep_rows(root))
        elif (root / "config.json").is_file():
            cfg = read_json(root / "config.json")
            rows.append({**{k: None for k, _, _ in COLUMNS}, "run": str(root), "method": cfg.get("method"),
                         "model": cfg.get("model"), "seed": cfg.get("seed"), "status": "unfinished",
                         "reason": "no summary.json yet"})
        else:
            raise DataError(f"{root} is neither a run directory (summary.json) nor a sweep directory (sweep.json).")
    return rows


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Markdown, or aligned plain text; columns no row has a value in are left out."""
    if markdown:
        return markdown_table(rows, COLUMNS)
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = [["" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols] for r in rows]
    return text_table([title for _, title, _ in cols], lines, left=3)
