"""Data: synthetic Criteo-like data, streaming preprocessing of Criteo/CSV files, memory-mapped batches."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from .arrays import Batch, Dataset, DatasetView, iterate_batches, num_batches, open_dataset, save_dataset, split_dataset
from .criteo import preprocess_criteo
from .csv import preprocess_csv
from ._pipeline import check_input_file
from .errors import DataError
from .features import FEATURES_FILE, copy_feature_map, load_vocabularies, read_feature_map
from .synthetic import KAGGLE_CARDINALITIES, bayes_auc, make_synthetic, write_synthetic_tsv

log = logging.getLogger(__name__)

__all__ = [
    "Batch", "DataError", "Dataset", "DatasetView", "KAGGLE_CARDINALITIES", "bayes_auc", "copy_feature_map",
    "default_cache_dir", "iterate_batches", "load_dataset", "load_vocabularies", "make_synthetic", "num_batches", "open_dataset", "preprocess_criteo", "preprocess_csv",
    "read_feature_map", "save_dataset", "split_dataset", "write_synthetic_tsv",
]  # fmt: skip

_SYNTHETIC_OPTIONS = {"rows", "fields", "scale", "skew", "drift", "seed", "dense", "cardinalities"}
_CRITEO_OPTIONS = {"min_count", "skip_bad_lines", "progress", "chunk_rows"}
_CSV_OPTIONS = {"label", "categorical", "numeric", "delimiter", "header", "min_count", "skip_bad_lines", "progress",
                "chunk_rows"}  # fmt: skip


def _check_options(kind: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"Unknown option(s) {unknown} for {kind} data; allowed: {sorted(allowed)}.")


def default_cache_dir() -> Path:
    """Where raw files are preprocessed to by default: ``$XDG_CACHE_HOME/embcompress``, else
    ``~/.cache/embcompress`` (per user, kept across reboots)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embcompress"


def _cache_dir(kind: str, path: Path, options: dict, cache_dir: str | None) -> Path:
    """A cache directory keyed by the file (path, size, mtime) and the options, so a changed file or
    different options never reuse a stale result."""
    st = path.stat()
    key = repr((kind, str(path.resolve()), st.st_size, st.st_mtime_ns, sorted(options.items())))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"{path.stem}-{digest}"


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _complete(out: Path) -> bool:
    return (out / "meta.json").exists() and (out / FEATURES_FILE).exists()


def _preprocess_once(fn, path: Path, out: Path, options: dict, wait_s: float = 3600.0, poll_s: float = 1.0) -> None:
    """Preprocess into the cache on rank 0 only (under torchrun); the other ranks wait for it. With a
    process group they meet rank 0 at a barrier; without one they poll for the finished dataset."""
    rank, world = _rank()
    import torch.distributed as dist

    group = world > 1 and dist.is_available() and dist.is_initialized()
    # a cached dataset without a feature map (written by an older version) is preprocessed again
    if rank == 0 and not _complete(out):
        log.info("preprocessing %s into %s", path, out)
        fn(path, out, overwrite=True, **options)
    if group:
        dist.barrier()
    elif rank != 0:
        deadline = time.monotonic() + wait_s
        while not _complete(out):
            if time.monotonic() > deadline:
                raise DataError(f"rank {rank} waited {wait_s:.0f}s for rank 0 to preprocess {path} into {out}; "
                                "the cache directory must be shared by all ranks.")
            time.sleep(poll_s)


def load_dataset(spec: str, **options) -> Dataset:
    """Load data named by ``spec``: ``synthetic``, ``criteo:PATH`` (raw TSV), ``csv:PATH``, or a dataset
    directory. Raw files (plain, gzip or zstd) are preprocessed once into ``options["cache_dir"]``
    (default: :func:`default_cache_dir`) and memory-mapped from there afterwards; under torchrun rank 0
    preprocesses and the others wait. ``progress=False`` silences the preprocessing bars."""
    cache_dir = options.pop("cache_dir", None)
    progress = options.pop("progress", True)
    if spec == "synthetic":
        _check_options("synthetic", options, _SYNTHETIC_OPTIONS)
        return make_synthetic(**options)
    for kind, allowed, fn in (("criteo", _CRITEO_OPTIONS, preprocess_criteo), ("csv", _CSV_OPTIONS, preprocess_csv)):
        if spec.startswith(kind + ":"):
            path = check_input_file(spec[len(kind) + 1 :], f"{kind} file")
            _check_options(kind, options, allowed)
            out = _cache_dir(kind, path, options, cache_dir)
            _preprocess_once(fn, path, out, {**options, "progress": progress})
            return open_dataset(out)
    path = Path(spec)
    if path.is_dir():
        if options:
            raise DataError(f"Options {sorted(options)} do not apply to a preprocessed directory.")
        return open_dataset(path)
    if path.exists():
        raise DataError(f"{spec} is a file; name raw files as 'criteo:{spec}' or 'csv:{spec}'.")
    raise DataError(f"Unknown data spec {spec!r}: use 'synthetic', 'criteo:PATH', 'csv:PATH' or a dataset directory.")
