"""PNG plots of a sweep: test AUC and training samples/s against the compression ratio reached (log x)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from .results import aggregate, mean_std

log = logging.getLogger(__name__)


def _series(rows: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """method -> (x: mean ratio reached, y: mean of key, yerr: std of key), points without a value left out."""
    out: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for r in rows:
        x, y, err = r["compression_actual_mean"], r[key + "_mean"], r[key + "_std"]
        if math.isnan(x) or math.isnan(y):
            continue
        xs, ys, es = out.setdefault(r["method"], ([], [], []))
        xs.append(x)
        ys.append(y)
        es.append(0.0 if math.isnan(err) else err)
    return out


def _plot(rows: Sequence[dict[str, Any]], key: str, ylabel: str, title: str, path: Path,
          reference: float | None = None, reference_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in CI and over ssh
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (xs, ys, es) in _series(rows, key).items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs, ys, es = [xs[i] for i in order], [ys[i] for i in order], [es[i] for i in order]
        if method == "full":  # one point at 1x: draw it across the plot as the uncompressed reference
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=f"full (1x): {ys[0]:.4g}")
            continue
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    if reference is not None and not math.isnan(reference):
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1, label=reference_label)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio reached (full table bytes / table bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: str | Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """auc_vs_compression.png and train_speed_vs_compression.png under ``out``; returns their paths."""
    rows = aggregate(records)
    if not any(r["status"] == "done" for r in records):
        log.warning("no finished cells: no plots")
        return []
    out = Path(out)
    done = [r["summary"] for r in records if r["status"] == "done"]
    bayes = mean_std([s.get("bayes_auc", math.nan) for s in done])[0]
    paths = [out / "auc_vs_compression.png", out / "train_speed_vs_compression.png"]
    _plot(rows, "test_auc", "test AUC (mean ± std over seeds)", "Test AUC against compression", paths[0],
          reference=bayes, reference_label=f"Bayes-optimal: {bayes:.4f}")
    _plot(rows, "train_samples_per_s", "training samples/s", "Training speed against compression", paths[1])
    return paths
