"""Comparison tables shared by the demo, the sweep and the benchmarks."""

from __future__ import annotations

import math
from typing import Any, Sequence

COLUMNS = (
    ("method", "method", "{}"),
    ("compression_actual", "ratio", "{:,.1f}x"),
    ("test_auc", "test AUC", "{:.4f}"),
    ("test_logloss", "logloss", "{:.4f}"),
    ("embedding_bytes", "table MiB", "{:.3f}"),
    ("train_samples_per_s", "train samples/s", "{:,.0f}"),
    ("eval_samples_per_s", "eval samples/s", "{:,.0f}"),
    ("note", "note", "{}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "embedding_bytes":
        value = value / 2**20
    return fmt.format(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """A markdown table of run summaries; columns no row has are left out."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], lines: Sequence[Sequence[Any]], left: int = 1, rule: bool = False) -> str:
    """Aligned plain text: the first ``left`` columns left-aligned, the rest right-aligned; ``rule`` puts a
    line of dashes under the header."""
    cells = [[str(c) for c in line] for line in [header, *lines]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    if rule:
        cells.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in cells)
