"""Shared machinery of the streaming preprocessors (Criteo TSV and generic CSV).

Two passes over the data, with memory bounded by one chunk plus the per-field vocabularies:

pass 1  reads the text in byte chunks cut at line ends, parses each chunk (a vectorised pyarrow parse;
        if that fails or finds bad values, a line-by-line Python re-scan of just that chunk that knows the
        exact line numbers), appends labels and dense features to their final files, writes each row's
        index into the chunk's own value dictionary to ``sparse.npy``, keeps the chunk dictionaries on
        disk, and merges the per-field value counts.
pass 2  turns the counts into vocabularies (values seen >= min_count times, sorted) and rewrites every
        chunk's dictionary indices into final ids in place: a small lookup per chunk dictionary and one
        gather per row, instead of a binary search per row.

Id order, per field: 0 is the OOV id (values seen fewer than min_count times; also free for values a
model meets later), then the kept values in sorted order, so ids are 1..len(kept). An empty value is a
value like any other (it is information: "missing"), with the smallest key, so when kept it gets id 1.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .arrays import commit_staging_dir, make_staging_dir, FORMAT_VERSION, sparse_dtype
from .errors import DataError
from .features import write_feature_map

log = logging.getLogger(__name__)

OOV_ID = 0
_HEADER_BYTES = 128  # reserved .npy header, filled in once the row count is known


@dataclass
class ParsedChunk:
    """One chunk of rows. F = number of categorical fields, D = number of dense features."""

    labels: np.ndarray  # (n,) float32
    dense: np.ndarray  # (n, D) float32, already transformed
    dict_keys: list[np.ndarray]  # F arrays of distinct sortable keys (int64 or bytes) in this chunk
    row_idx: np.ndarray  # (n, F) int32, index of each row's value into dict_keys[f]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, reason) of bad lines

    @property
    def rows(self) -> int:
        return len(self.labels)


def chunk_from_keys(labels: np.ndarray, dense: np.ndarray, keys: list[np.ndarray], bad=None) -> ParsedChunk:
    """Build a ParsedChunk from per-row keys (used by the slow paths and tests)."""
    n = len(labels)
    row_idx = np.empty((n, len(keys)), dtype=np.int32)
    dicts = []
    for f, k in enumerate(keys):
        uniq, inv = np.unique(k, return_inverse=True)
        dicts.append(uniq)
        row_idx[:, f] = inv.reshape(-1)
    return ParsedChunk(labels.astype(np.float32), dense.astype(np.float32), dicts, row_idx, list(bad or []))


class NpyAppender:
    """Writes a .npy file row block by row block before the row count is known: a fixed-size header is
    reserved up front and rewritten on close (numpy reads any header length)."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.fh = open(path, "wb")
        self.fh.write(b"\0" * _HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        assert block.shape[1:] == self.row_shape, (block.shape, self.row_shape)
        self.fh.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        shape = (self.rows, *self.row_shape)
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        room = _HEADER_BYTES - 10 - 1
        assert len(header) <= room, header
        self.fh.seek(0)
        self.fh.write(b"\x93NUMPY\x01\x00" + np.uint16(room + 1).tobytes() + (header.ljust(room) + "\n").encode())
        self.fh.close()


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([a[0], b[0]])
    counts = np.concatenate([a[1], b[1]])
    order = np.argsort(keys, kind="stable")  # two sorted runs: timsort/radix merges them in about O(n)
    keys, counts = keys[order], counts[order]
    if len(keys) == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


class ValueCounter:
    """Counts of distinct keys for one field. Chunk results are merged like a binary counter (a level is
    merged into the one below while that is not more than twice as big), so a field with K distinct values
    over C chunks costs about K log C work instead of K per chunk."""

    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        # A chunk's keys may repeat (e.g. "0000abcd" and "0000ABCD" decode to one key): merge them here.
        empty = (keys[:0], counts[:0].astype(np.int64))
        order = np.argsort(keys, kind="stable")
        self.levels.append(_merge((keys[order], counts[order].astype(np.int64)), empty))
        while len(self.levels) >= 2 and len(self.levels[-2][0]) <= 2 * len(self.levels[-1][0]):
            b = self.levels.pop()
            self.levels[-1] = _merge(self.levels[-1], b)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct keys, counts)."""
        if not self.levels:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        while len(self.levels) >= 2:
            b = self.levels.pop()
            self.levels[-1] = _merge(self.levels[-1], b)
        return self.levels[0]


def lookup_ids(vocab: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Ids of ``keys`` in a sorted vocabulary: 1 + position when present, else OOV_ID (0)."""
    if len(vocab) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    pos = np.searchsorted(vocab, keys)
    pos_c = np.minimum(pos, len(vocab) - 1)
    return np.where(vocab[pos_c] == keys, pos_c + 1, OOV_ID).astype(np.int64)


class _ArrowRaw(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream (pyarrow's compressed streams have no readline)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        memoryview(b)[: len(data)] = data
        return len(data)


_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


def input_compression(path: str | os.PathLike) -> str | None:
    """"gzip", "zstd" or None (plain text), from the file's first bytes (not its name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def check_input_file(path: str | os.PathLike, what: str = "Input file") -> Path:
    src = Path(path)
    if src.is_dir():
        raise DataError(f"{what} {src} is a directory, not a file (a preprocessed dataset directory is given "
                        "as the directory itself, without 'criteo:' or 'csv:').")
    if not src.is_file():
        raise DataError(f"{what} {src} does not exist.")
    return src


@contextlib.contextmanager
def open_input(path: str | os.PathLike) -> Iterator[tuple[io.BufferedIOBase, Callable[[], int]]]:
    """Open a raw text file, plain or gzip/zstd-compressed (detected from its first bytes), for binary
    reading; yields (stream of the uncompressed bytes, function returning the bytes read of the file
    on disk, for progress bars)."""
    src = check_input_file(path)
    kind = input_compression(src)
    raw = open(src, "rb")
    try:
        if kind == "gzip":
            fh: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "zstd":
            fh = io.BufferedReader(_ArrowRaw(pa.CompressedInputStream(raw, "zstd")), 1 << 20)
        else:
            fh = raw
        yield fh, raw.tell
    except (gzip.BadGzipFile, EOFError, zlib.error, pa.ArrowException) as exc:
        if kind is None:
            raise
        raise DataError(f"{src} is not a valid {kind} file (truncated or corrupted?): {exc}.") from exc
    finally:
        raw.close()


class Unread:
    """A binary stream with ``head`` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, fh) -> None:
        self.head, self.fh = io.BytesIO(head), fh

    def readinto(self, b) -> int:
        n = self.head.readinto(b)
        return n + (self.fh.readinto(memoryview(b)[n:]) if n < len(b) else 0)

    def readline(self) -> bytes:
        line = self.head.readline()
        return line if line.endswith(b"\n") else line + self.fh.readline()


def iter_byte_chunks(fh, chunk_bytes: int, first_line: int) -> Iterator[tuple[bytearray, int, int]]:
    """Yield (chunk, 1-based number of its first line, number of lines in it). A chunk is about
    ``chunk_bytes`` long and is extended to the next line end, so no chunk is copied after reading."""
    line = first_line
    while True:
        buf = bytearray(chunk_bytes)
        got = fh.readinto(buf)
        if not got:
            break
        del buf[got:]
        if not buf.endswith(b"\n"):
            buf += fh.readline()  # finish the current line (bytearray appends in place)
        n = count_lines(buf)
        yield buf, line, n
        line += n


def count_lines(buf: bytes | bytearray) -> int:
    return buf.count(b"\n") + (0 if buf.endswith(b"\n") or not buf else 1)


ParseFn = Callable[..., "ParsedChunk | None"]  # (chunk bytes, first line number, lines in chunk)


def run_two_pass(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    parse_fast: ParseFn,
    parse_slow: ParseFn,
    num_dense: int,
    num_fields: int,
    min_count: int,
    chunk_rows: int,
    skip_bad_lines: bool,
    progress: bool,
    meta: dict,
    input_format: dict,
    start_offset: int = 0,
    first_line: int = 1,
    overwrite: bool = False,
) -> dict:
    """Preprocess ``path`` into a dataset directory ``out_dir``; see the module docstring. An existing
    dataset at ``out_dir`` is replaced only with ``overwrite``. ``start_offset``: uncompressed bytes to
    skip first (a header line). ``input_format`` goes into the feature map (how raw rows are read)."""
    src = check_input_file(path)
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    check_output_dir(out_dir, overwrite)
    t0 = time.perf_counter()
    size = src.stat().st_size
    staging = make_staging_dir(out_dir)
    try:
        with open_input(src) as (fh, position):
            fh.read(start_offset)
            sample = fh.read(1 << 20)
            avg_line = max(len(sample) / max(sample.count(b"\n"), 1), 16.0)
            chunk_bytes = max(int(chunk_rows * avg_line), 1 << 16)
            stats = _pass1(fh, position, src, staging, chunk_bytes, first_line, size, parse_fast, parse_slow,
                           num_dense, num_fields, skip_bad_lines, progress, sample)  # fmt: skip
        if stats["rows"] == 0:
            reason = "every line was bad and skipped" if stats["bad_lines"] else "it contains no data rows"
            raise DataError(f"Cannot preprocess {src}: {reason}.")
        field_sizes, field_stats, vocabs = _pass2(staging, stats, num_fields, min_count, progress)
        write_feature_map(staging, source=meta["source"], field_names=meta["field_names"], field_sizes=field_sizes,
                          dense_names=meta["dense_names"], input_format=input_format, vocabs=vocabs,
                          min_count=min_count)  # fmt: skip
        del vocabs
        elapsed = time.perf_counter() - t0
        stats.update(field_sizes=field_sizes, fields=field_stats, seconds=round(elapsed, 3),
                     lines_per_s=round(stats["lines"] / elapsed, 1), mb_per_s=round(size / elapsed / 1e6, 2))  # fmt: skip
        full_meta = dict(meta)
        full_meta.update(format_version=FORMAT_VERSION, rows=stats["rows"], num_dense=num_dense,
                         field_sizes=field_sizes, has_probs=False, stats=stats,
                         id_order="per field: 0 = OOV (count < min_count), then kept values in sorted order; "
                                  "empty is a value with the smallest key")  # fmt: skip
        for junk in ("chunks", "idx32"):
            shutil.rmtree(staging / junk, ignore_errors=True)
        commit_staging_dir(staging, out_dir, full_meta, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if stats["bad_lines"]:
        log.warning("%s: skipped %d bad lines (first: line %d, %s)", src, stats["bad_lines"], *stats["bad_examples"][0])
    log.info("preprocessed %s: %d rows in %.1fs (%.0f lines/s)", src, stats["rows"], elapsed, stats["lines_per_s"])
    return stats


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write a dataset over an existing one (or over a file) unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is a file; give a directory for the dataset.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a dataset" if (out / "meta.json").exists() else "a non-empty directory"
        raise DataError(f"{out} already holds {what}; choose another directory or pass --overwrite "
                        "(overwrite=True) to replace it.")


def _pass1(fh, position, src, staging, chunk_bytes, first_line, total_bytes, parse_fast, parse_slow, num_dense,
           num_fields, skip_bad_lines, progress, prefix) -> dict:  # fmt: skip
    (staging / "chunks").mkdir()
    labels_w = NpyAppender(staging / "labels.npy", np.float32, ())
    dense_w = NpyAppender(staging / "dense.npy", np.float32, (num_dense,))
    idx_w = NpyAppender(staging / "sparse.npy", np.int32, (num_fields,))
    counters = [ValueCounter() for _ in range(num_fields)]
    lines = bad_lines = chunks = slow_chunks = 0
    bad_examples: list[tuple[int, str]] = []
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="pass 1/2", disable=not progress) as bar:
        for buf, line0, n_lines in iter_byte_chunks(Unread(prefix, fh), chunk_bytes, first_line):
            lines += n_lines
            parsed = parse_fast(buf, line0, n_lines)
            if parsed is None:
                slow_chunks += 1
                parsed = parse_slow(bytes(buf), line0)
                if parsed.bad and not skip_bad_lines:
                    ln, reason = parsed.bad[0]
                    raise DataError(f"{src}, line {ln}: {reason}.")
                bad_lines += len(parsed.bad)
                bad_examples.extend(parsed.bad[: max(0, 10 - len(bad_examples))])
            labels_w.append(parsed.labels)
            dense_w.append(parsed.dense.reshape(parsed.rows, num_dense))
            idx_w.append(parsed.row_idx)
            np.savez(staging / "chunks" / f"{chunks:06d}.npz", rows=parsed.rows, *parsed.dict_keys)
            for f in range(num_fields):
                counts = np.bincount(parsed.row_idx[:, f], minlength=len(parsed.dict_keys[f]))
                counters[f].add(parsed.dict_keys[f], counts)
            chunks += 1
            bar.update(position() - bar.n)
    for w in (labels_w, dense_w, idx_w):
        w.close()
    return {"rows": labels_w.rows, "lines": lines, "bad_lines": bad_lines, "bad_examples": bad_examples,
            "chunks": chunks, "slow_chunks": slow_chunks, "_counters": counters}  # fmt: skip


def _pass2(staging: Path, stats: dict, num_fields: int, min_count: int, progress: bool):
    counters = stats.pop("_counters")
    vocabs, field_stats = [], []
    for c in counters:
        keys, counts = c.result()
        kept = keys[counts >= min_count]
        vocabs.append(kept)
        field_stats.append({"distinct": int(len(keys)), "kept": int(len(kept)),
                            "oov_rows": int(counts[counts < min_count].sum())})  # fmt: skip
    del counters
    field_sizes = [len(v) + 1 for v in vocabs]  # + the OOV id
    dtype = sparse_dtype(field_sizes)
    idx = np.load(staging / "sparse.npy", mmap_mode="r+")
    if dtype == np.int32:
        out = idx  # rewrite in place: saves a copy of the largest array
    else:
        os.replace(staging / "sparse.npy", staging / "idx32.npy")
        idx = np.load(staging / "idx32.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(staging / "sparse.npy", mode="w+", dtype=dtype, shape=idx.shape)
    lo = 0
    with tqdm(total=stats["rows"], unit="rows", desc="pass 2/2", disable=not progress) as bar:
        for c in range(stats["chunks"]):
            with np.load(staging / "chunks" / f"{c:06d}.npz") as z:
                n = int(z["rows"])
                block = np.array(idx[lo : lo + n])
                new = np.empty((n, num_fields), dtype=dtype)
                for f in range(num_fields):
                    new[:, f] = lookup_ids(vocabs[f], z[f"arr_{f}"])[block[:, f]]
            out[lo : lo + n] = new
            lo += n
            bar.update(n)
    out.flush()
    del idx, out
    return field_sizes, field_stats, vocabs
