"""What a trained table holds, per field, in the raw values of the run's vocabulary.

- ``cafe`` / ``cafe-ml`` / ``cafe-tt``: the ids the hot-id sketch holds, their importance scores (lookup
  counts for ``cafe-tt``), which of them have a hot row (the others wait below the threshold), and for
  ``cafe`` and ``cafe-ml`` the hash rows each field has.
- ``mpcache``: the ids whose rows the full-precision cache holds, with the priority the cache ranks them by.
- ``tt``: the ids whose rows the uncompressed cache holds, with their tracked lookup counts.
- other methods keep no per-id state; the report says so.

With raw rows (``data``), each field also gets the share of its lookups that the hot rows (or the
cache) serve on them; without, the last training window's share from ``metrics.jsonl`` is given.
The table's state is read through its attributes, never changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import DataError, load_vocabularies
from .model import Run, load_run


def _value(vocab: np.ndarray | None, local: int, criteo: bool) -> str | None:
    """The raw value of a local id: ``<OOV>`` for id 0, None without a vocabulary."""
    if local == 0:
        return "<OOV>"
    if vocab is None or local > len(vocab):
        return None
    v = vocab[local - 1]
    if criteo:
        return "" if int(v) < 0 else f"{int(v):08x}"
    return bytes(v).decode("utf-8", errors="replace")


def _held(table: torch.nn.Module) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, str] | None:
    """(kind, global ids held, their score, whether each serves lookups, score's meaning) or None."""
    sketch = getattr(table, "sketch", None)
    if sketch is not None and hasattr(sketch, "hot_row"):  # cafe, cafe-ml, cafe-tt
        keys, hot, scores = (sketch.keys.reshape(-1).long(), sketch.hot_row.reshape(-1),
                             sketch.scores.reshape(-1).float())
        keep = keys >= 0
        return ("hot-id sketch", keys[keep].numpy(), scores[keep].numpy(), (hot[keep] >= 0).numpy(),
                "importance score (a hot row needs the threshold)")
    if hasattr(table, "cache_ids") and hasattr(table, "codes"):  # mpcache: empty slots hold num_embeddings
        ids, keys = table.cache_ids, table.cache_keys
        keep = ids < table.num_embeddings
        return ("full-precision cache", ids[keep].numpy(), keys[keep].float().numpy(),
                np.ones(int(keep.sum()), dtype=bool), "the cache's priority of the row")
    if hasattr(table, "cache_keys") and hasattr(table, "track_ids"):  # tt: empty slots hold no valid id
        keys = table.cache_keys
        ids = keys[(keys >= 0) & (keys < sum(table.field_sizes))]
        tracked = dict(zip(table.track_ids.tolist(), table.track_counts.tolist()))
        counts = np.array([tracked.get(i, np.nan) for i in ids.tolist()], dtype=np.float64)
        return ("uncompressed row cache", ids.numpy(), counts, np.ones(len(ids), dtype=bool),
                "tracked lookup count (NaN: no longer tracked)")
    return None


def _served_share(run: Run, table: torch.nn.Module, data: str, served_ids: np.ndarray) -> list[float | None]:
    """Per field, the share of ``data``'s lookups that go to an id in ``served_ids`` (global ids)."""
    from .predict import _Reader

    starts = np.concatenate([[0], np.cumsum(run.features["field_sizes"])[:-1]]).astype(np.int64)
    served = np.sort(served_ids.astype(np.int64))
    hits = np.zeros(len(starts), dtype=np.int64)
    rows = 0
    for _, _, ids in _Reader(run, data).chunks(200_000, progress=False):
        g = ids + starts
        pos = np.clip(np.searchsorted(served, g), 0, max(len(served) - 1, 0))
        hits += ((served[pos] == g) if len(served) else np.zeros_like(g, dtype=bool)).sum(axis=0)
        rows += len(ids)
    return [float(h / rows) if rows else None for h in hits]


def _last_training_stats(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    last = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "train" and row.get("table"):
                last = row["table"]
    return last


def inspect_run(run_dir: str | os.PathLike, *, fields: Sequence[int] | None = None, top: int = 10,
                data: str | None = None) -> dict[str, Any]:
    """What the run's table holds per field (see the module docstring): a dict with ``method``,
    ``holds`` (what the per-id state is), ``score`` (what the score means), ``training_stats`` and
    ``fields``: per field its name, size, ``held`` / ``serving`` counts, ``served_share`` (with
    ``data``) and the ``top`` held ids by score as ``{"id", "value", "score", "serving"}``."""
    from ..train.loop import embedding_tables

    run = load_run(run_dir)
    fmap = run.features
    table = embedding_tables(run.model)[0]
    sizes = [int(s) for s in fmap["field_sizes"]]
    chosen = list(range(len(sizes))) if not fields else list(fields)
    bad = [f for f in chosen if not 0 <= f < len(sizes)]
    if bad:
        raise DataError(f"field(s) {bad} out of range: the run has {len(sizes)} fields (0..{len(sizes) - 1}).")
    try:
        vocabs: list[np.ndarray | None] = list(load_vocabularies(run.path, fmap))
    except DataError:
        vocabs = [None] * len(sizes)  # synthetic data: ids are the values
    criteo = fmap.get("source") == "criteo"
    report: dict[str, Any] = {"run": str(run.path), "method": run.config.method, "table": table.extra_repr(),
                              "memory_bytes": int(table.memory_bytes()),
                              "training_stats": _last_training_stats(run.path), "fields": []}
    held = _held(table)
    if held is None:
        report.update(holds=None, score=None)
        report["note"] = f"{run.config.method} keeps no per-id state: every id is served by the same rule."
        for f in chosen:
            report["fields"].append({"field": f, "name": fmap["field_names"][f], "size": sizes[f]})
        return report
    kind, ids, scores, serving, meaning = held
    report.update(holds=kind, score=meaning)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    field = np.searchsorted(starts, ids, side="right") - 1
    shares = _served_share(run, table, data, ids[serving]) if data is not None else None
    hashed = getattr(table, "field_hashed", None)
    for f in chosen:
        mine = np.flatnonzero(field == f)
        order = mine[np.argsort(-np.nan_to_num(scores[mine], nan=-np.inf), kind="stable")][:top]
        entry: dict[str, Any] = {
            "field": f, "name": fmap["field_names"][f], "size": sizes[f], "held": int(len(mine)),
            "serving": int(serving[mine].sum()),
            "top": [{"id": int(ids[i] - starts[f]), "value": _value(vocabs[f], int(ids[i] - starts[f]), criteo),
                     "score": None if np.isnan(scores[i]) else float(scores[i]), "serving": bool(serving[i])}
                    for i in order],
        }
        if hashed is not None and hasattr(table, "rows"):  # cafe, cafe-ml
            entry["whole"] = not bool(hashed[f])  # a field small enough to have a row per id needs no hot rows
            entry["hash_rows"] = int(table.rows[f])
        if shares is not None:
            entry["served_share"] = shares[f]
        report["fields"].append(entry)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one block per field."""
    lines = [f"{report['run']}: {report['method']} ({report['table']}), {report['memory_bytes']:,} bytes"]
    if report.get("training_stats"):
        lines.append("last training window: " + ", ".join(f"{k} {v:.4g}" for k, v in report["training_stats"].items()))
    if report.get("holds") is None:
        lines.append(report.get("note", ""))
        return "\n".join(lines)
    lines.append(f"holds: {report['holds']}; score: {report['score']}")
    for f in report["fields"]:
        head = f"field {f['field']} {f['name']}: {f['size']:,} ids, {f['held']} held, {f['serving']} serving"
        if "hash_rows" in f:
            head += " (whole: a row per id)" if f["whole"] else f", {f['hash_rows']:,} hash rows"
        if f.get("served_share") is not None:
            head += f", {f['served_share']:.1%} of the given rows' lookups served"
        lines.append(head)
        for e in f["top"]:
            score = "-" if e["score"] is None else f"{e['score']:.4g}"
            value = "?" if e["value"] is None else repr(e["value"])
            lines.append(f"  id {e['id']:>8}  {value:<14} score {score:>10}  {'serving' if e['serving'] else 'waiting'}")
    return "\n".join(lines)
