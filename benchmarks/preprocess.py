"""Time streaming Criteo preprocessing on a synthetic raw TSV; prints one JSON line.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/preprocess.py --rows 2000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from embcompress.data import preprocess_criteo, write_synthetic_tsv
from common import emit  # type: ignore[import-not-found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--scale", type=float, default=0.01, help="cardinality scale of the synthetic data")
    ap.add_argument("--min-count", type=int, default=1)
    ap.add_argument("--chunk-rows", type=int, default=500_000)
    ap.add_argument("--workdir", default=None, help="where to put the TSV and output (default: a temp dir)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        tsv = Path(d) / "synthetic.tsv"
        t0 = time.perf_counter()
        write_synthetic_tsv(tsv, args.rows, scale=args.scale, progress=args.progress)
        write_s = time.perf_counter() - t0
        size = tsv.stat().st_size
        t0 = time.perf_counter()
        stats = preprocess_criteo(tsv, Path(d) / "out", min_count=args.min_count, chunk_rows=args.chunk_rows,
                                  progress=args.progress)  # fmt: skip
        secs = time.perf_counter() - t0
    emit({
        "benchmark": "preprocess_criteo",
        "rows": stats["rows"],
        "bytes": size,
        "seconds": round(secs, 3),
        "lines_per_s": round(stats["lines"] / secs),
        "mb_per_s": round(size / secs / 1e6, 1),
        "write_tsv_seconds": round(write_s, 3),
        "distinct_ids": sum(stats["field_sizes"]),
        "settings": {"scale": args.scale, "min_count": args.min_count, "chunk_rows": args.chunk_rows},
    })  # fmt: skip


if __name__ == "__main__":
    main()
