"""Checkpoints and run files: atomic writes, safe loading (no code runs from a file), keep-last-K, resume.

A checkpoint is a ``torch.save`` of plain containers and tensors, loaded with ``weights_only=True``, so a
crafted file cannot execute code (its pickle may only name tensors, numbers, strings, lists, tuples and
dicts). Writes go to a temporary file in the same directory, are fsynced, renamed into place, and the
directory is fsynced, so a crash leaves either the old file or the new one, never half of one.

In a run directory, :func:`save_run_checkpoint` keeps the last K checkpoints as ``checkpoint-STEP.pt``
(STEP zero-padded to 8 digits), ``checkpoints.json`` (the manifest: file, step, size and SHA-256 of each,
newest last) and ``checkpoint.pt``, a symbolic link to the newest (the file other commands read).
:func:`find_resume_checkpoint` walks them newest first and takes the first one that is intact: a
truncated or corrupted file (wrong size or digest, or a load error) is reported in a warning naming the
file and the reason, and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
import torch

log = logging.getLogger(__name__)

MANIFEST = "checkpoints.json"
LATEST = "checkpoint.pt"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or not a checkpoint of this project."""


# ---------------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so ``json.dumps`` writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.floating):
        return json_safe(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes NaN and infinities as null (valid JSON) and anything else unknown as str."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json_dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save ``state`` (tensors, numbers, strings, lists, tuples and dicts of them)."""
    _atomic_write(path, lambda f: torch.save(state, f))


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None, size: int | None = None) -> dict[str, Any]:
    """Load a checkpoint without executing code from it; CheckpointError with the reason otherwise.

    ``size`` / ``sha256`` (from the manifest) are checked first: torch's zip reader does not verify
    checksums, so a flipped byte inside a tensor would otherwise load silently.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if size is not None and path.stat().st_size != size:
        raise CheckpointError(f"checkpoint {path} is truncated or overwritten: {path.stat().st_size} bytes, "
                              f"the manifest says {size}")
    if sha256 is not None and file_digest(path) != sha256:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 differs from the manifest's")
    kind = _file_kind(path)
    if kind != "torch":
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint: {kind}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation, zip errors, refused globals (a crafted file)
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {_reason(e)}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an embcompress checkpoint (no model state)")
    return state


def _file_kind(path: Path) -> str:
    """"torch" for a file in torch.save's formats (a zip archive, or the legacy pickle that starts with
    torch's magic number), else what the file is, in words."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:  # a pickle protocol 2-5 header
        # torch's legacy format is a pickled magic number (a long) first; anything else is a plain pickle
        return "torch" if head[2:3] == b"\x8a" else ("a plain pickle file (written with pickle.dump, not "
                                                   "torch.save): only torch.save checkpoints are loaded")
    if not head:
        return "the file is empty"
    return "its bytes are neither a torch.save file (zip) nor a pickle"


def _reason(e: Exception) -> str:
    """One line for a load error; torch's own text for refused globals suggests weights_only=False,
    which is exactly what must not be done with a file that names code to call."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
    if found:
        return (f"{type(e).__name__}: it refers to {found.group(1)}, which no checkpoint needs; it was not executed "
                "(a file that names code to run is corrupt or malicious: do not load it with weights_only=False)")
    if re.search(r"Unsupported operand", str(e)):
        return f"{type(e).__name__}: not a checkpoint (its bytes are not a torch or pickle file)"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- run directory
def _read_manifest(run_dir: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads((run_dir / MANIFEST).read_text())["checkpoints"]
        return [e for e in entries if isinstance(e, dict) and "file" in e and "step" in e]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _point_latest(run_dir: Path, name: str) -> None:
    """Atomically make ``checkpoint.pt`` a link to ``name`` (a copy where links are not allowed)."""
    tmp = run_dir / f".{LATEST}.link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(name, tmp)
    except OSError:
        atomic_write_bytes(run_dir / LATEST, (run_dir / name).read_bytes())
        return
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def save_run_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write ``checkpoint-STEP.pt``, record it in the manifest, point ``checkpoint.pt`` at it and delete
    checkpoints older than the last ``keep``. Returns the new file's path."""
    run_dir = Path(run_dir)
    name = f"checkpoint-{step:08d}.pt"
    path = run_dir / name
    save_checkpoint(path, state)
    entry = {"file": name, "step": int(step), "bytes": path.stat().st_size, "sha256": file_digest(path)}
    entries = [e for e in _read_manifest(run_dir) if e["file"] != name and (run_dir / e["file"]).exists()]
    entries = sorted(entries + [entry], key=lambda e: int(e["step"]))
    kept, dropped = entries[-max(int(keep), 1):], entries[:-max(int(keep), 1)]
    write_json(run_dir / MANIFEST, {"latest": name, "checkpoints": kept})
    _point_latest(run_dir, name)
    for e in dropped:  # only after the manifest no longer names them
        old = run_dir / e["file"]
        if _NAME.match(e["file"]) and old.exists():
            old.unlink()
    return path


def _candidates(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, manifest entry or {}) of every checkpoint in ``run_dir``, newest first."""
    listed = {e["file"]: e for e in _read_manifest(run_dir)}
    found: dict[str, int] = {}
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found[p.name] = int(m.group(1))
    for name, e in listed.items():
        found.setdefault(name, int(e["step"]))  # listed but missing: reported as missing
    out = [(run_dir / name, listed.get(name, {})) for name, _ in sorted(found.items(), key=lambda kv: -kv[1])]
    latest = run_dir / LATEST
    if not out and latest.is_file() and not latest.is_symlink():
        out.append((latest, {}))  # a run written before checkpoints were numbered
    return out


def find_resume_checkpoint(run_dir: str | os.PathLike, tidy: bool = True) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint of a run directory (state, path); None when it has none at all.

    Unusable ones are skipped with a warning naming the file and the reason; CheckpointError when
    checkpoints exist but none of them is usable. ``tidy`` (one process only, rank 0 under torchrun)
    renames unusable files to ``*.unusable`` and deletes temporary files of a killed write.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    if tidy:
        for stale in run_dir.glob(".checkpoint-*.pt.*"):  # temporary files of a write that was killed
            stale.unlink(missing_ok=True)
    problems = []
    for path, entry in _candidates(run_dir):
        try:
            state = load_checkpoint(path, sha256=entry.get("sha256"), size=entry.get("bytes"))
        except CheckpointError as e:
            problems.append(str(e))
            aside = ""
            if tidy and path.exists() and _NAME.match(path.name):  # keep the evidence, out of the way
                try:
                    path.rename(path.with_name(path.name + ".unusable"))
                    aside = f" (renamed to {path.name}.unusable)"
                except OSError:
                    pass
            log.warning("skipping unusable checkpoint %s%s: %s; trying the previous one", path, aside, e)
            continue
        if problems:
            log.warning("resuming from %s (step %s) instead of the newer unusable checkpoint(s)", path,
                        state.get("step"))
        return state, path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))
    return None
