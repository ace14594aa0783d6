"""A sweep's outputs: results.csv (one row per cell) and results.md (mean ± std over seeds per method/ratio,
and each method's test AUC against a baseline method paired by seed)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..report import markdown_table
from ..train.checkpoint import atomic_write_bytes

# Summary keys copied into results.csv, after method, ratio, seed, status, reason.
CSV_METRICS = ("compression_target", "compression_actual", "embedding_bytes", "full_embedding_bytes", "test_auc",
               "test_logloss", "train_samples_per_s", "eval_samples_per_s", "train_loss", "bayes_auc", "rows_train",
               "rows_test", "steps", "train_seconds", "epochs", "batch_size", "lr", "optimizer")  # fmt: skip
CSV_COLUMNS = ("method", "ratio", "seed", "status", "reason", *CSV_METRICS, "load_before", "load_after")

# (summary key, column title, format of one value, scale applied first)
MD_METRICS = (
    ("compression_actual", "ratio reached", "{:,.1f}x", 1.0),
    ("test_auc", "test AUC", "{:.4f}", 1.0),
    ("test_logloss", "logloss", "{:.4f}", 1.0),
    ("embedding_bytes", "table MiB", "{:,.3f}", 1 / 2**20),
    ("train_samples_per_s", "train samples/s", "{:,.0f}", 1.0),
    ("eval_samples_per_s", "eval samples/s", "{:,.0f}", 1.0),
)


def csv_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        s = rec.get("summary") or {}
        row = {"method": rec["cell"]["method"], "ratio": rec["cell"]["ratio"], "seed": rec["cell"]["seed"],
               "status": rec["status"], "reason": rec.get("reason") or ""}
        row.update({k: s.get(k, "") for k in CSV_METRICS})
        row.update(load_before=rec.get("load_before", ""), load_after=rec.get("load_after", ""))
        rows.append(row)
    return rows


def write_csv(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(records))
    atomic_write_bytes(path, buf.getvalue().encode())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value); NaNs are left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def _fmt(mean: float, std: float, fmt: str, scale: float) -> str:
    if math.isnan(mean):
        return ""
    text = fmt.format(mean * scale)
    return text if math.isnan(std) else f"{text} ± {fmt.format(std * scale).rstrip('x')}"


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target ratio) with the finished seeds' mean ± std, in plan order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["cell"]["method"], rec["cell"]["ratio"]), []).append(rec)
    rows = []
    for (method, ratio), recs in groups.items():
        done = [r["summary"] for r in recs if r["status"] == "done"]
        row: dict[str, Any] = {"method": method, "target": f"{ratio:,g}x", "seeds": f"{len(done)}/{len(recs)}"}
        for key, title, fmt, scale in MD_METRICS:
            m, s = mean_std([d.get(key, math.nan) for d in done])
            row["fmt_" + key] = _fmt(m, s, fmt, scale) or None
            row[key + "_mean"], row[key + "_std"] = m, s
        notes = sorted({r["status"] for r in recs if r["status"] != "done"})
        row["note"] = ", ".join(notes) + " (see below)" if notes else None
        row["ratio"] = ratio
        rows.append(row)
    return rows


def paired(records: Sequence[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per (method, ratio): test AUC minus ``baseline``'s at the same ratio and seed, over the seeds where
    both finished. With one dataset per seed the seeds differ in difficulty far more than the methods
    do, so these differences, not the means, say which method is ahead."""
    auc = {(r["cell"]["method"], r["cell"]["ratio"], r["cell"]["seed"]): float(r["summary"]["test_auc"])
           for r in records if r["status"] == "done" and "test_auc" in (r.get("summary") or {})}
    rows = []
    for method, ratio in dict.fromkeys((m, r) for m, r, _ in auc):
        if method == baseline:
            continue
        seeds = sorted(s for m, r, s in auc if (m, r) == (method, ratio) and (baseline, ratio, s) in auc)
        if not seeds:
            continue
        diffs = [auc[(method, ratio, s)] - auc[(baseline, ratio, s)] for s in seeds]
        mean, std = mean_std(diffs)
        base = statistics.fmean(auc[(baseline, ratio, s)] for s in seeds)
        rows.append({"method": method, "ratio": ratio, "target": f"{ratio:,g}x", "seeds": seeds, "diffs": diffs,
                     "mean": mean, "se": std / math.sqrt(len(diffs)), "relative": mean / base,
                     "wins": sum(d > 0 for d in diffs)})
    return rows


def _paired_table(records: Sequence[dict[str, Any]], baseline: str) -> list[str]:
    rows = paired(records, baseline)
    if not rows:
        return [f"No method has a result at a ratio where `{baseline}` has one on the same seed.", ""]
    for row in rows:
        se = "" if math.isnan(row["se"]) else f" ± {row['se']:.4f}"
        row["fmt_mean"] = f"{row['mean']:+.4f}{se}"
        row["fmt_relative"] = f"{100 * row['relative']:+.2f}%"
        row["fmt_wins"] = f"{row['wins']}/{len(row['diffs'])}"
        row["fmt_per_seed"] = " / ".join(f"{s}: {d:+.4f}" for s, d in zip(row["seeds"], row["diffs"]))
    columns = [("method", "method", "{}"), ("target", "target", "{}"), ("fmt_mean", "AUC difference", "{}"),
               ("fmt_relative", "relative", "{}"), ("fmt_wins", "seeds ahead", "{}"),
               ("fmt_per_seed", "per seed", "{}")]
    return [markdown_table(rows, columns), ""]


def markdown(records: Sequence[dict[str, Any]], settings: dict[str, Any], machine: dict[str, Any] | None = None,
             baseline: str | None = None) -> str:
    rows = aggregate(records)
    columns = [("method", "method", "{}"), ("target", "target", "{}"), ("seeds", "seeds done", "{}")]
    columns += [("fmt_" + key, title, "{}") for key, title, _, _ in MD_METRICS] + [("note", "note", "{}")]
    table = markdown_table(rows, columns)
    done = [r for r in records if r["status"] == "done"]
    bayes = mean_std([r["summary"].get("bayes_auc", math.nan) for r in done])[0]
    loads = [r[k] for r in done for k in ("load_before", "load_after") if k in r]
    lines = [
        "# Sweep results", "",
        f"Data: `{settings['data']}` {settings['data_options']}" + (
            f", data seed {settings['data_seed']}" if settings.get("data_seed") is not None else
            (", one dataset per seed" if settings["data"] == "synthetic" else "")),
        f"Training settings: {settings['train'] or 'TrainConfig defaults'}"
        + (f"; method options {settings['method_options']}" if settings["method_options"] else ""),
        "Mean ± sample standard deviation over the seeds that finished; 'ratio reached' is full table bytes / "
        "memory_bytes() of the table that was built.",
    ]  # fmt: skip
    if not math.isnan(bayes):
        lines.append(f"Bayes-optimal test AUC of the synthetic data (its hidden model): {bayes:.4f}.")
    if machine:
        described = ", ".join(f"{k} {v}" for k, v in machine.items())
        lines.append(f"Machine (when this report was written): {described}.")
    if loads:
        lines.append(f"1-minute load average around the cells: {min(loads):.2f} to {max(loads):.2f} "
                     "(speeds are comparable only under similar load).")
    lines += ["", table, ""]
    if baseline:
        lines += [f"## Test AUC against `{baseline}`, paired by seed", "",
                  f"Each method's test AUC minus `{baseline}`'s at the same target ratio and seed (the same data and "
                  "initial seed), over the seeds where both finished: mean ± standard error of the mean, the mean "
                  f"relative to `{baseline}`'s AUC, and on how many seeds the method was ahead.", ""]
        lines += _paired_table(records, baseline)
    not_done = [r for r in records if r["status"] != "done"]
    if not_done:
        lines += ["## Cells without a result", ""]
        lines += [f"- `{r['key']}` {r['status']}: {r['reason']}" for r in not_done]
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: str | Path, records: Sequence[dict[str, Any]], settings: dict[str, Any],
                   machine: dict[str, Any] | None = None, baseline: str | None = None) -> None:
    atomic_write_bytes(path, markdown(records, settings, machine, baseline).encode())
