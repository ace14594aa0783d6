"""Export a trained model as a ``torch.export`` artifact that serves with torch alone.

``embcompress export --run DIR --out model.pt2`` (or :func:`export_model` / :func:`save` in Python)
writes one file that ``torch.export.load`` reads back without ``embcompress`` installed::

    program = torch.export.load("model.pt2")
    model = program.module()
    with torch.inference_mode():
        logits = model(dense, sparse)  # (B,) logits; torch.sigmoid(logits) is the click probability

Input layout (the same as the training models'):

* ``dense``: float32 (B, I), the dense features as the run's dataset stores them (I = 13 on Criteo; with
  no dense features, a (B, 0) tensor);
* ``sparse``: int64 (B, F), the local id of each categorical field, column f holding field f's id in
  ``[0, field_sizes[f])`` (the run's vocabulary ids: 0 is the out-of-vocabulary id).

The batch dimension B is dynamic (any B >= 1); I and F are fixed. Out-of-range ids: the graph checks every
local id against its field's size with ``torch._assert_async``: on the CPU a bad id raises a
``RuntimeError`` carrying :data:`~embcompress.models.blocks.FIELD_RANGE_MESSAGE`; on CUDA it is a
device-side assert. Nothing is clamped or wrapped, and no host sync is added.

Each table is exported in its *inference form* (``table.inference_form()``, a separate class in each
method's file): frozen state copied into buffers, no parameters, no training hooks, no data-dependent
Python control flow and no host syncs: CAFE's sketch becomes a sorted array of the ids it holds (hot
rows found by ``searchsorted``), mpcache keeps its INT8/INT4 rows and decodes only the rows a batch
reads, tt keeps its cores and a frozen cache. An inference form takes the global ids (B, F) (column f
holding field f's ids) and returns their rows (B, F, D). The rest of the model (MLPs, interaction) is
exported as it is, in eval mode.

The artifact also carries ``embcompress.json`` (an ``extra_files`` entry): method, model, field sizes,
input layout and the package version, readable with ``torch.export.load(path, extra_files=...)``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import __version__
from .embeddings.base import CompressedEmbeddingBag
from .embeddings.ops import field_starts
from .models.blocks import SparseArch, check_field_ids

METADATA_FILE = "embcompress.json"
#: batch size of the example inputs the graph is traced with (not 0 or 1, which torch.export specialises)
EXAMPLE_BATCH = 4


class InferenceSparseArch(nn.Module):
    """Local ids (B, F) -> embeddings (B, F, D) through a table's inference form.

    The per-field range check (:func:`~embcompress.models.blocks.check_field_ids`) is, while exporting,
    one vectorised comparison feeding ``torch._assert_async``: it stays in the graph and costs no host
    sync."""

    def __init__(self, form: nn.Module, field_sizes: Sequence[int]) -> None:
        super().__init__()
        self.form = form
        self.num_fields = len(field_sizes)
        self.register_buffer("starts", field_starts(field_sizes))
        self.register_buffer("sizes", torch.tensor([int(n) for n in field_sizes], dtype=torch.int64))

    def forward(self, sparse: Tensor) -> Tensor:
        check_field_ids(sparse, self.sizes)
        return self.form(sparse.long() + self.starts)  # (B, F, D)


def inference_form(table: CompressedEmbeddingBag) -> nn.Module:
    """The table's frozen serving module (global ids (B, F) -> rows (B, F, D)), or a ValueError naming
    the method when it has none."""
    make = getattr(table, "inference_form", None)
    if make is None:
        raise ValueError(f"method {table.name!r} has no inference form, so it cannot be exported")
    return make()


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose sparse arches serve through the tables' inference forms.

    The training tables are not copied (the forms copy what serving needs), and ``model`` is unchanged."""
    arches = sparse_arches(model)
    # deepcopy everything but the tables, which the forms replace
    memo: dict[int, Any] = {id(a.embedding): None for a in arches}
    copied = copy.deepcopy(model, memo)
    swaps = {id(a): InferenceSparseArch(inference_form(a.embedding), a.embedding.field_sizes) for a in arches}
    originals = dict(zip((id(m) for m in copied.modules() if isinstance(m, SparseArch)), (id(a) for a in arches)))
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseArch):
                setattr(parent, name, swaps[originals[id(child)]])
    copied.to(next((t.device for t in model.state_dict().values()), torch.device("cpu")))
    copied.eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def num_dense_of(model: nn.Module) -> int:
    """Dense features the model takes (``num_dense`` of the project's models)."""
    n = getattr(model, "num_dense", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} does not say how many dense features it takes (num_dense)")
    return int(n)


def example_inputs(model: nn.Module, batch: int = EXAMPLE_BATCH, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(dense (batch, I) float32, sparse (batch, F) int64) with every local id drawn inside its field."""
    table = model_table(model)
    dense = torch.randn(batch, num_dense_of(model), generator=generator)
    sizes = torch.tensor(table.field_sizes, dtype=torch.float64)
    sparse = (torch.rand(batch, len(sizes), generator=generator, dtype=torch.float64) * sizes).long()
    return dense.to(device), sparse.to(device)


def sparse_arches(model: nn.Module) -> list[SparseArch]:
    """The model's sparse arches (one per table), or a ValueError for a model that is not one of ours."""
    arches = [m for m in model.modules() if isinstance(m, SparseArch)]
    if not arches:
        raise ValueError(f"{type(model).__name__} has no SparseArch: only the project's models can be exported")
    return arches


def model_table(model: nn.Module) -> CompressedEmbeddingBag:
    """The model's (first) embedding table."""
    return sparse_arches(model)[0].embedding


def export_model(model: nn.Module, served: nn.Module | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference model: ``(dense (B, I) float32, sparse (B, F) int64) -> logits (B,)``
    with a dynamic batch dimension B >= 1. ``served``: a frozen module computing ``model``'s logits to
    export instead of :func:`inference_model` (e.g. the AFM serving form of a compressed model)."""
    served = inference_model(model) if served is None else served
    device = next((t.device for t in served.state_dict().values()), torch.device("cpu"))
    args = example_inputs(model, device=device)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(served, args, dynamic_shapes=({0: batch}, {0: batch}))


def metadata(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """What the artifact's ``embcompress.json`` holds."""
    table = model_table(model)
    return {
        "format": "embcompress-export/1",
        "embcompress_version": __version__,
        "torch_version": torch.__version__,
        "method": table.name,
        "model": type(model).__name__,
        "field_sizes": list(table.field_sizes),
        "embedding_dim": table.embedding_dim,
        "inputs": {"dense": ["float32", ["B", num_dense_of(model)]],
                   "sparse": ["int64", ["B", len(table.field_sizes)], "local id per field, in [0, field size)"]},
        "output": "logits (B,) float32; sigmoid gives the click probability",
        **extra,
    }


def artifact_path(path: str | Path) -> Path:
    """``path`` as a Path, or a ValueError when it cannot name an artifact (a .pt2 file)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"the artifact's file name must end in .pt2 (torch.export's archive format), got {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the artifact's file name")
    return path


def save(model: nn.Module, path: str | Path, *, served: nn.Module | None = None, check_rows: int = 64,
         **extra: Any) -> torch.export.ExportedProgram:
    """Export ``model`` (through ``served`` if given, see :func:`export_model`), check the artifact against
    the eager model on ``check_rows`` random rows, write it.

    The check runs the program as saved (after a round trip through ``torch.export.load``) and raises if
    its logits differ from the eager model's beyond float rounding: an artifact that would serve other
    scores is never written."""
    path = artifact_path(path)
    program = export_model(model, served)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.pt2")
    torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata(model, **extra))})
    if check_rows:
        check(model, torch.export.load(tmp), check_rows)
    tmp.replace(path)
    return program


@torch.no_grad()
def check(model: nn.Module, program: torch.export.ExportedProgram, rows: int = 64, seed: int = 0) -> None:
    """assert_close of the program's logits to the eager model's (eval mode) at batch ``rows`` and 1."""
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
        served = program.module()
        for batch in (rows, 1):
            dense, sparse = example_inputs(model, batch, gen, device)
            torch.testing.assert_close(served(dense, sparse), model(dense, sparse))
    finally:
        model.train(was_training)


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The ``embcompress.json`` of an artifact."""
    files = {METADATA_FILE: ""}
    torch.export.load(path, extra_files=files)
    return json.loads(files[METADATA_FILE])


# ---------------------------------------------------------------------------------------------- CLI
def cmd_export(args: Any) -> int:
    from .serve.model import load_model

    artifact_path(args.out)  # before the model is loaded
    model = load_model(args.run)  # eval mode, on the CPU
    table = model_table(model)
    served, form = None, "inference-form"
    if (Path(args.run) / "compression.json").is_file():  # a compress-lowrank run: serve its algebra
        from .compress.serving import serving_model
        served, form = serving_model(model), "afm-serving"
    save(model, args.out, served=served, run=str(Path(args.run).resolve()), form=form)
    print(f"wrote {args.out}: {table.name} {type(model).__name__}, inputs dense float32 (B, {num_dense_of(model)}) "
          f"+ sparse int64 (B, {len(table.field_sizes)}), output logits (B,); load with torch.export.load")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a torch.export artifact of a trained run (serves with torch alone)",
                       description="Export a run's model with torch.export: inputs dense float32 (B, I) and "
                                   "sparse int64 (B, F) local ids, output logits (B,), B dynamic. The artifact "
                                   "is checked against the eager model before it is written. See docs/export.md.")
    p.add_argument("--run", required=True, help="run directory written by 'embcompress train'")
    p.add_argument("--out", required=True, help="artifact file to write (e.g. model.pt2)")
    p.set_defaults(func=cmd_export)
