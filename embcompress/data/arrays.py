"""Array-backed datasets: the on-disk layout, train/test views and batch iteration.

Shape letters: N rows, F categorical fields, B batch size.

On disk a dataset is a directory holding ``dense.npy`` (N, num_dense) float32, ``sparse.npy`` (N, F)
int32/int64 per-field local ids, ``labels.npy`` (N,) float32, optionally ``probs.npy`` (N,) float32, and
``meta.json``. ``meta.json`` is written last and the directory is built under a temporary name and renamed
into place, so a directory that has ``meta.json`` is complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .errors import DataError, read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ARRAYS = ("dense", "sparse", "labels")


@dataclass
class Dataset:
    """A whole dataset in memory or memory-mapped; see the module docstring for shapes and dtypes."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    field_sizes: list[int]
    meta: dict = field(default_factory=dict)
    probs: np.ndarray | None = None
    root: Path | None = None  # the directory it was opened from (its feature map lives there)

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def num_fields(self) -> int:
        return len(self.field_sizes)


def sparse_dtype(field_sizes: list[int]) -> np.dtype:
    """int32 when every local id fits, else int64 (halves memory for every real dataset we know)."""
    return np.dtype(np.int32) if max(field_sizes, default=0) <= np.iinfo(np.int32).max else np.dtype(np.int64)


def _meta_for(ds: Dataset) -> dict:
    meta = dict(ds.meta)
    meta.update(
        format_version=FORMAT_VERSION,
        rows=ds.num_rows,
        num_dense=ds.num_dense,
        field_sizes=[int(s) for s in ds.field_sizes],
        has_probs=ds.probs is not None,
    )
    return meta


def make_staging_dir(out_dir: str | os.PathLike) -> Path:
    """A fresh temporary directory next to ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def commit_staging_dir(staging: Path, out_dir: str | os.PathLike, meta: dict, overwrite: bool = True) -> Path:
    """Write meta.json last, then move ``staging`` to ``out_dir`` (replacing an earlier dataset there
    only with ``overwrite``)."""
    out = Path(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; a dataset should read like any directory
    with open(staging / "meta.json.part", "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    os.replace(staging / "meta.json.part", staging / "meta.json")
    if out.exists():
        # Only ever delete something that is recognisably ours: an earlier dataset or an empty directory.
        if not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").exists()):
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"Refusing to overwrite {out}: it exists and is not a dataset directory.")
        if not overwrite and any(out.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def save_dataset(ds: Dataset, out_dir: str | os.PathLike) -> Path:
    """Write ``ds`` to ``out_dir`` (see the module docstring); returns the directory."""
    staging = make_staging_dir(out_dir)
    try:
        np.save(staging / "dense.npy", np.asarray(ds.dense, dtype=np.float32))
        np.save(staging / "sparse.npy", np.asarray(ds.sparse, dtype=sparse_dtype(ds.field_sizes)))
        np.save(staging / "labels.npy", np.asarray(ds.labels, dtype=np.float32))
        if ds.probs is not None:
            np.save(staging / "probs.npy", np.asarray(ds.probs, dtype=np.float32))
        return commit_staging_dir(staging, out_dir, _meta_for(ds))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Memory-map a dataset directory written by ``save_dataset`` or a preprocessor."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Dataset directory {root} does not exist.")
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{root} is not a complete dataset: meta.json is missing (unfinished or failed write?).")
    meta = read_json(meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root} has format version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}.")
    names = list(_ARRAYS) + (["probs"] if meta.get("has_probs") else [])
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        f = root / f"{name}.npy"
        if not f.exists():
            raise DataError(f"{root} is incomplete: {f.name} is missing.")
        try:
            arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{f} cannot be read (truncated or not a .npy array?): {exc}.") from exc
    rows, fields = meta["rows"], len(meta["field_sizes"])
    expected = {"dense": (rows, meta["num_dense"]), "sparse": (rows, fields), "labels": (rows,), "probs": (rows,)}
    for name, arr in arrays.items():
        if arr.shape != expected[name]:
            raise DataError(f"{root}/{name}.npy has shape {arr.shape}, meta.json says {expected[name]}.")
    return Dataset(
        dense=arrays["dense"],
        sparse=arrays["sparse"],
        labels=arrays["labels"],
        field_sizes=[int(s) for s in meta["field_sizes"]],
        meta=meta,
        probs=arrays.get("probs"),
        root=root,
    )


class DatasetView:
    """Rows of a ``Dataset`` without copying it: a contiguous range, or an index array (random split)."""

    def __init__(self, ds: Dataset, start: int = 0, stop: int | None = None, index: np.ndarray | None = None):
        self.dataset = ds
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.start = start
        self.stop = ds.num_rows if stop is None else stop
        if self.index is None and not (0 <= self.start <= self.stop <= ds.num_rows):
            raise ValueError(f"bad row range [{start}, {stop}) for {ds.num_rows} rows")

    @property
    def num_rows(self) -> int:
        return len(self.index) if self.index is not None else self.stop - self.start

    def __len__(self) -> int:
        return self.num_rows

    @property
    def field_sizes(self) -> list[int]:
        return self.dataset.field_sizes

    @property
    def num_dense(self) -> int:
        return self.dataset.num_dense

    @property
    def num_fields(self) -> int:
        return self.dataset.num_fields

    def _rows(self, arr: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) of this view taken from ``arr``, as a fresh in-memory array."""
        hi = self.num_rows if hi is None else hi
        if self.index is None:
            return np.array(arr[self.start + lo : self.start + hi])
        return np.take(arr, self.index[lo:hi], axis=0)

    @property
    def labels(self) -> np.ndarray:
        return self._rows(self.dataset.labels)

    @property
    def probs(self) -> np.ndarray | None:
        return None if self.dataset.probs is None else self._rows(self.dataset.probs)

    def __repr__(self) -> str:
        kind = "index" if self.index is not None else f"rows {self.start}:{self.stop}"
        return f"DatasetView({kind}, num_rows={self.num_rows})"


def split_dataset(
    ds: Dataset, how: str = "time", test_fraction: float = 1 / 7, seed: int = 0
) -> tuple[DatasetView, DatasetView]:
    """Train/test views. "time": first rows train, the last ``test_fraction`` test (as CAFE does on
    Kaggle). "random": a seeded permutation, train gets its first part (indices only, no data copy)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = ds.num_rows
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    if how == "time":
        return DatasetView(ds, 0, n_train), DatasetView(ds, n_train, n)
    if how == "random":
        perm = np.random.default_rng(seed).permutation(n)
        return DatasetView(ds, index=perm[:n_train]), DatasetView(ds, index=perm[n_train:])
    raise ValueError(f"unknown split {how!r}; use 'time' or 'random'")


class Batch(NamedTuple):
    dense: torch.Tensor  # (B, num_dense) float32
    sparse: torch.Tensor  # (B, F) int64 local ids
    labels: torch.Tensor  # (B,) float32


def _as_view(data: Dataset | DatasetView) -> DatasetView:
    return data if isinstance(data, DatasetView) else DatasetView(data)


def _total_batches(n: int, batch_size: int, drop_last: bool) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def num_batches(
    view: Dataset | DatasetView, batch_size: int, drop_last: bool = False, world_size: int = 1, rank: int = 0
) -> int:
    """Batches ``iterate_batches`` yields for ``rank`` (before ``start_batch``). With world_size > 1 the
    ranks below ``total % world_size`` get one batch more than the others."""
    total = _total_batches(_as_view(view).num_rows, batch_size, drop_last)
    return len(range(rank, total, world_size))


def iterate_batches(
    view: Dataset | DatasetView,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Yield ``Batch``es of consecutive rows of ``view``.

    shuffle permutes the order of the batches (block shuffle), not rows within them, so reads from a
    memory map stay contiguous; a random split's rows are already permuted. The global batch order is
    split between ranks as ``order[rank::world_size]`` and then this rank skips its first ``start_batch``
    batches (resuming after ``start_batch`` steps).
    """
    v = _as_view(view)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    total = _total_batches(v.num_rows, batch_size, drop_last)
    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    ds = v.dataset
    for b in order[rank::world_size][start_batch:]:
        lo = int(b) * batch_size
        hi = min(lo + batch_size, v.num_rows)
        yield Batch(
            dense=torch.from_numpy(v._rows(ds.dense, lo, hi).astype(np.float32, copy=False)),
            sparse=torch.from_numpy(v._rows(ds.sparse, lo, hi).astype(np.int64, copy=False)),
            labels=torch.from_numpy(v._rows(ds.labels, lo, hi).astype(np.float32, copy=False)),
        )
