"""Score raw rows with a trained run: the run's own vocabularies, streaming, in input order.

Raw rows are read the way the run's training data was (its feature map's ``input``): Criteo TSV (40
fields, or 39 without the label) or CSV with the training columns (any order when the file has a header;
the label column may be absent). Plain, gzip and zstd files are read alike. Values not in the run's
vocabulary map to the OOV id 0. Memory stays bounded by one chunk of rows, plus 5 bytes a row for the
labels and probabilities when metrics are computed (AUC needs them all).
"""

from __future__ import annotations

import csv as _csv
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..data import DataError, load_vocabularies
from ..data._pipeline import ParsedChunk, Unread, iter_byte_chunks, lookup_ids, open_input
from ..data.criteo import NUM_COLUMNS, parse_chunk_fast, parse_chunk_slow
from ..data.csv import CsvParser
from ..train.metrics import auc, logloss
from .model import Run, load_run

OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")


def _raw_path(spec: str, fmt: str) -> str:
    """The file of a data spec: ``criteo:PATH``, ``csv:PATH`` (must match the run's input) or ``PATH``."""
    for kind in ("criteo", "csv"):
        if spec.startswith(kind + ":"):
            if kind != fmt:
                raise DataError(f"the run was trained on {fmt} input; {spec!r} names {kind} input.")
            return spec[len(kind) + 1:]
    return spec


class _Reader:
    """Parses one raw file chunk by chunk into (labels or NaN, dense, ids) with the run's vocabularies."""

    def __init__(self, run: Run, path: str) -> None:
        fmap = run.features
        inp = fmap.get("input")
        if not inp or not fmap.get("vocabulary"):
            why = ("its dataset was preprocessed without vocabularies (by an older version): preprocess the raw "
                   "file again and retrain" if fmap.get("source") in ("criteo", "csv") else
                   f"it was trained on data without raw values ({fmap.get('source')})")
            raise DataError(f"run {run.path} has no vocabularies to read raw rows with: {why}.")
        self.path = Path(_raw_path(path, inp["format"]))
        if self.path.is_dir():
            raise DataError(f"{self.path} is a directory: give the raw rows as a file ({inp['format']} format, "
                            "plain, gzip or zstd).")
        self.vocabs = load_vocabularies(run.path, fmap)
        self.skip_bytes, self.first_line = 0, 1
        with open_input(self.path) as (fh, _):
            first = fh.readline()
        if inp["format"] == "criteo":
            fields = first.rstrip(b"\r\n").count(b"\t") + 1
            if fields not in (NUM_COLUMNS, NUM_COLUMNS - 1):
                raise DataError(f"{self.path}, line 1: expected {NUM_COLUMNS} tab-separated fields (or "
                                f"{NUM_COLUMNS - 1} without the label), found {fields}.")
            self.has_label = fields == NUM_COLUMNS
            self.fast: Callable[..., ParsedChunk | None] = functools.partial(parse_chunk_fast, has_label=self.has_label)
            self.slow: Callable[..., ParsedChunk] = functools.partial(parse_chunk_slow, has_label=self.has_label)
        else:
            self.fast, self.slow = self._csv_parser(inp, first)

    def _csv_parser(self, inp: dict[str, Any], first: bytes):
        delim = inp["delimiter"]
        split = next(_csv.reader([first.rstrip(b"\r\n").decode("utf-8", errors="replace")], delimiter=delim), [])
        needed = [*inp["categorical"], *inp["numeric"]]
        if inp["header"]:
            names = split
            missing = [c for c in needed if c not in names]
            if missing:
                raise DataError(f"{self.path} lacks the run's column(s) {missing} (its header: {names[:20]}).")
            self.skip_bytes, self.first_line = len(first), 2
        else:
            names = inp["columns"]
            if len(split) != len(names):
                raise DataError(f"{self.path}, line 1: expected {len(names)} fields as in training "
                                f"(delimiter {delim!r}), found {len(split)}.")
        self.has_label = inp["label"] in names
        parser = CsvParser(names, inp["label"] if self.has_label else None, inp["categorical"], inp["numeric"], delim)
        return parser.fast, parser.slow

    def chunks(self, chunk_rows: int, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        size = self.path.stat().st_size
        with open_input(self.path) as (fh, position), \
                tqdm(total=size, unit="B", unit_scale=True, desc="predict", disable=not progress) as bar:
            fh.read(self.skip_bytes)
            sample = fh.read(1 << 20)
            avg_line = max(len(sample) / max(sample.count(b"\n"), 1), 16.0)
            chunk_bytes = max(int(chunk_rows * avg_line), 1 << 16)
            for buf, line0, n_lines in iter_byte_chunks(Unread(sample, fh), chunk_bytes, self.first_line):
                parsed = self.fast(buf, line0, n_lines)
                if parsed is None:
                    parsed = self.slow(bytes(buf), line0)
                    if parsed.bad:  # a skipped row would shift every later prediction
                        ln, reason = parsed.bad[0]
                        raise DataError(f"{self.path}, line {ln}: {reason}.")
                ids = np.empty((parsed.rows, len(self.vocabs)), dtype=np.int64)
                for f, vocab in enumerate(self.vocabs):
                    ids[:, f] = lookup_ids(vocab, parsed.dict_keys[f])[parsed.row_idx[:, f]]
                yield parsed.labels, parsed.dense.reshape(parsed.rows, -1), ids
                bar.update(position() - bar.n)


class _Output:
    """One probability per row, written as it comes: CSV (header ``probability``) or Parquet."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise DataError(f"--out {self.path}: name a .csv or .parquet file.")
        if self.path.is_dir():
            raise DataError(f"--out {self.path} is a directory; name a .csv or .parquet file.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        schema = pa.schema([("probability", pa.float32())])
        if self.path.suffix.lower() == ".csv":
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.sink.write(b"probability\n")  # arrow would quote the header name
            self.writer: Any = pacsv.CSVWriter(self.sink, schema, write_options=pacsv.WriteOptions(include_header=False))
        else:
            self.writer = pq.ParquetWriter(str(self.tmp), schema)

    def write(self, probs: np.ndarray) -> None:
        self.writer.write_table(pa.table({"probability": pa.array(probs, pa.float32())}))

    def close(self, ok: bool) -> None:
        self.writer.close()
        if getattr(self, "sink", None) is not None:
            self.sink.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


@torch.no_grad()
def predict_file(run: Run | str | os.PathLike, data: str, out: str | os.PathLike | None = None, *,
                 batch_size: int = 4096, chunk_rows: int = 200_000, device: str = "cpu",
                 progress: bool = True, require_labels: bool = False) -> dict[str, Any]:
    """Score the raw rows of ``data`` (a file, or ``criteo:PATH`` / ``csv:PATH``) with a run (a ``Run``
    or its directory). Writes one probability per input row, in input order, to ``out`` (.csv or
    .parquet) when given. Returns rows, samples/s and, when every row has a label, ``auc`` and
    ``logloss`` (None without labels; ``require_labels`` makes that an error before any scoring)."""
    if batch_size <= 0 or chunk_rows <= 0:
        raise ValueError("batch_size and chunk_rows must be positive")
    run = run if isinstance(run, Run) else load_run(run, device)
    run.model.to(device).eval()
    reader = _Reader(run, data)
    if require_labels and not reader.has_label:
        raise DataError(f"{reader.path} has no labels: evaluating needs labelled rows (predict scores unlabelled "
                        "ones).")
    writer = _Output(out) if out is not None else None
    labels, probs, rows, ok = [], [], 0, False
    start = time.perf_counter()
    try:
        for y, dense, ids in reader.chunks(chunk_rows, progress):
            p = np.concatenate([
                torch.sigmoid(run.model(torch.from_numpy(dense[i:i + batch_size]).to(device),
                                        torch.from_numpy(ids[i:i + batch_size]).to(device))).float().cpu().numpy()
                for i in range(0, len(y), batch_size)]) if len(y) else np.zeros(0, np.float32)
            rows += len(y)
            if writer is not None:
                writer.write(p)
            if reader.has_label:
                labels.append(y.astype(np.uint8))
                probs.append(p.astype(np.float32))
        ok = True
    finally:
        if writer is not None:
            writer.close(ok)
    seconds = time.perf_counter() - start
    if rows == 0:
        raise DataError(f"{reader.path} holds no data rows.")
    result: dict[str, Any] = {"run": str(run.path), "data": str(reader.path), "rows": rows,
                              "samples_per_s": rows / max(seconds, 1e-9), "auc": None, "logloss": None,
                              "out": str(out) if out is not None else None}
    if reader.has_label:
        y_all, p_all = np.concatenate(labels), np.concatenate(probs)
        result.update(auc=_nan_to_none(auc(y_all, p_all)), logloss=_nan_to_none(logloss(y_all, p_all)))
    return result
