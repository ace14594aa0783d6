"""Data: synthetic Criteo-like data, streaming preprocessing of Criteo/CSV files, memory-mapped batches."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from .arrays import Batch, Dataset, DatasetView, iterate_batches, num_batches, open_dataset, save_dataset, split_dataset
from .criteo import preprocess_criteo
from .csv import preprocess_csv
from .errors import DataError
from .synthetic import KAGGLE_CARDINALITIES, bayes_auc, make_synthetic, write_synthetic_tsv

log = logging.getLogger(__name__)

__all__ = [
    "Batch", "DataError", "Dataset", "DatasetView", "KAGGLE_CARDINALITIES", "bayes_auc", "iterate_batches",
    "load_dataset", "make_synthetic", "num_batches", "open_dataset", "preprocess_criteo", "preprocess_csv",
    "save_dataset", "split_dataset", "write_synthetic_tsv",
]  # fmt: skip

_SYNTHETIC_OPTIONS = {"rows", "fields", "scale", "skew", "drift", "seed", "dense", "cardinalities"}
_CRITEO_OPTIONS = {"min_count", "skip_bad_lines", "progress", "chunk_rows"}
_CSV_OPTIONS = {"label", "categorical", "numeric", "delimiter", "header", "min_count", "skip_bad_lines", "progress",
                "chunk_rows"}  # fmt: skip


def _check_options(kind: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"Unknown option(s) {unknown} for {kind} data; allowed: {sorted(allowed)}.")


def _cache_dir(kind: str, path: Path, options: dict, cache_dir: str | None) -> Path:
    """A cache directory keyed by the file (path, size, mtime) and the options, so a changed file or
    different options never reuse a stale result."""
    st = path.stat()
    key = repr((kind, str(path.resolve()), st.st_size, st.st_mtime_ns, sorted(options.items())))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "embcompress-cache"
    return root / f"{path.stem}-{digest}"


def load_dataset(spec: str, **options) -> Dataset:
    """Load data named by ``spec``: ``synthetic``, ``criteo:PATH`` (raw TSV), ``csv:PATH``, or a dataset
    directory. Raw files are preprocessed once into ``options["cache_dir"]`` (default: a directory under
    the system temp dir) and memory-mapped from there afterwards."""
    cache_dir = options.pop("cache_dir", None)
    if spec == "synthetic":
        _check_options("synthetic", options, _SYNTHETIC_OPTIONS)
        return make_synthetic(**options)
    for kind, allowed, fn in (("criteo", _CRITEO_OPTIONS, preprocess_criteo), ("csv", _CSV_OPTIONS, preprocess_csv)):
        if spec.startswith(kind + ":"):
            path = Path(spec[len(kind) + 1 :])
            if not path.is_file():
                raise DataError(f"{kind} file {path} does not exist.")
            _check_options(kind, options, allowed)
            out = _cache_dir(kind, path, {k: v for k, v in options.items() if k != "progress"}, cache_dir)
            if not (out / "meta.json").exists():
                log.info("preprocessing %s into %s", path, out)
                fn(path, out, **options)
            return open_dataset(out)
    path = Path(spec)
    if path.is_dir():
        if options:
            raise DataError(f"Options {sorted(options)} do not apply to a preprocessed directory.")
        return open_dataset(path)
    if path.exists():
        raise DataError(f"{spec} is a file; name raw files as 'criteo:{spec}' or 'csv:{spec}'.")
    raise DataError(f"Unknown data spec {spec!r}: use 'synthetic', 'criteo:PATH', 'csv:PATH' or a dataset directory.")
