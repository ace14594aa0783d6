"""AFM post-training low-rank compression of a trained model (Unified Low-rank Compression, KDD 2024).

:func:`compress_model` streams calibration batches through the trained model once, accumulating every
chosen layer's output mean and covariance (float64, bounded memory); keeps each layer's top-k
eigenvectors; replaces each linear layer by two thinner ones and each embedding table by a rank-k
``lowrank`` table (per-field bases); and folds a factorised layer's second map into a directly
following linear layer (same ``nn.Sequential``, nothing in between).

Chosen layers: every ``nn.Linear`` with at least 2 outputs (a logit layer has nothing to drop) and every
``full`` or ``lowrank`` table served through a :class:`~embcompress.models.blocks.SparseArch` (its
(B, F, D) output gives per-field statistics). The DCN-v2 and DeepFM models use their embeddings
non-linearly (cross products, FM dot products), so there the k→D map stays inside the table, computed
as one batched matmul per field.

k per layer: with ``variance=v``, the smallest k explaining a fraction v of the layer's output variance
(a layer is left alone when that k saves nothing); with ``ratio=r``, ranks such that the whole model (all
parameters, embeddings and MLPs) shrinks r-fold, given one at a time to the layer that discards the
largest fraction of its output variance (see :func:`_ranks_for_ratio`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..models.blocks import SparseArch
from .layers import (
    FactorizedLinear, factorize_linear, factorize_table, fold_into, is_compressible_table, linear_params,
    table_params,
)
from .stats import StreamingMoments, explained_fraction, principal_components, rank_for_variance

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    kind: str  # "linear" or "embedding"
    width: int  # output width (D for an embedding)
    rank: int  # k kept (== width: left as it was)
    params_before: int
    params_after: int
    explained_variance: float
    factorized: bool = True
    folded: bool = False


@dataclass
class CompressionReport:
    params_before: int
    params_after: int
    ratio_target: float | None
    variance_target: float | None
    calibration_samples: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def plan(self) -> list[dict[str, Any]]:
        """What :func:`apply_plan` needs to rebuild the compressed structure (e.g. to load a checkpoint)."""
        return [{"name": l.name, "kind": l.kind, "rank": l.rank, "folded": l.folded}
                for l in self.layers if l.factorized]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Target:
    name: str
    kind: str
    module: nn.Module  # nn.Linear, or the SparseArch holding the table
    width: int
    stats: StreamingMoments | None = None

    def params(self, rank: int | None = None) -> int:
        if self.kind == "linear":
            return linear_params(self.module.in_features, self.module.out_features, rank)
        return table_params(self.module.embedding, rank)


def find_targets(model: nn.Module) -> list[_Target]:
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features >= 2 and not isinstance(module, FactorizedLinear):
            targets.append(_Target(name, "linear", module, module.out_features))
        elif isinstance(module, SparseArch) and is_compressible_table(module.embedding):
            targets.append(_Target(f"{name}.embedding", "embedding", module, module.embedding.embedding_dim))
    return targets


@torch.no_grad()
def collect_statistics(model: nn.Module, targets: list[_Target], batches: Iterable[Any],
                       max_batches: int | None = None) -> int:
    """One pass of ``batches`` ((dense, sparse, ...) tuples) through ``model``; returns the samples seen."""
    device = next(model.parameters()).device
    handles = []
    for t in targets:
        groups = t.module.num_fields if t.kind == "embedding" else 1
        t.stats = StreamingMoments(t.width, groups, device=device)
        if t.kind == "linear":
            handles.append(t.module.register_forward_hook(
                lambda m, i, out, s=t.stats: s.update(out.reshape(-1, out.shape[-1]))))
        else:
            handles.append(t.module.register_forward_hook(lambda m, i, out, s=t.stats: s.update(out)))  # (B, F, D)
    was_training = model.training
    model.eval()
    samples = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            dense, sparse = batch[0].to(device), batch[1].to(device)
            model(dense, sparse)
            samples += len(dense)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if samples == 0:
        raise ValueError("no calibration batches were given")
    return samples


def _ranks_for_ratio(targets: list[_Target], spectra: dict[str, tuple[Tensor, Tensor]], fixed: int,
                     ratio: float) -> dict[str, int]:
    """Per-layer ranks meeting a whole-model size target, keeping the worst layer's lost variance smallest.

    Every layer starts at rank 1; one rank at a time goes to the layer that currently discards the
    largest fraction of its output variance, while the model stays within ``1/ratio`` of its size. A
    uniform per-layer ratio would starve the embedding table (a rank of it costs N parameters), and
    an ablation on the benchmark's DeepFM showed the embedding's discarded variance is what costs AUC.
    """
    goal = (fixed + sum(t.params() for t in targets)) / ratio
    ranks = {t.name: 1 for t in targets}
    total = fixed + sum(t.params(1) for t in targets)
    if total > goal:
        raise ValueError(f"cannot shrink the model {ratio}x: at rank 1 everywhere it is "
                         f"{(fixed + sum(t.params() for t in targets)) / total:.3g}x smaller")
    lost = {}  # fraction of variance discarded at rank k, per layer: (width + 1,)
    for t in targets:
        vals = spectra[t.name][0].reshape(-1, t.width).sum(0)
        frac = vals.cumsum(0) / vals.sum().clamp(min=1e-300)
        lost[t.name] = (1 - torch.cat([frac.new_zeros(1), frac])).tolist()
    candidates = {t.name: t for t in targets}
    while candidates:
        name = max(candidates, key=lambda n: lost[n][ranks[n]])
        t, k = candidates[name], ranks[name]
        extra = t.params(k + 1) - t.params(k)
        if k + 1 >= t.width or t.params(k + 1) >= t.params() or total + extra > goal:
            del candidates[name]  # as large as it can usefully or affordably be
            continue
        ranks[name] = k + 1
        total += extra
    return ranks


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _fold_all(model: nn.Module, report: dict[str, LayerReport] | None = None,
              only: set[str] | None = None) -> None:
    """Fold each factorised layer into a linear layer that directly follows it in a Sequential."""
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or isinstance(seq, FactorizedLinear):
            continue
        children = list(seq.named_children())
        for (name, layer), (_, following) in zip(children[:-1], children[1:]):
            full = f"{seq_name}.{name}" if seq_name else name
            if isinstance(layer, FactorizedLinear) and (only is None or full in only) and fold_into(layer, following):
                if report is not None:
                    report[full].folded = True


@torch.no_grad()
def compress_model(model: nn.Module, calibration_batches: Iterable[Any], *, ratio: float | None = None,
                   variance: float | None = None, ranks: dict[str, int] | None = None,
                   compress_embeddings: bool = True, fold: bool = True,
                   max_batches: int | None = None) -> tuple[nn.Module, CompressionReport]:
    """AFM-compress a copy of ``model``; returns (compressed model, report). ``model`` is not changed.

    Give exactly one of ``ratio`` (whole-model parameter reduction, e.g. 3.0), ``variance`` (fraction
    of each layer's output variance to keep, e.g. 0.99) or ``ranks`` ({layer name: k}, as named in the
    report; the named layers are factorised even at full width, which is how the tests check exactness).
    """
    if sum(x is not None for x in (ratio, variance, ranks)) != 1:
        raise ValueError("give exactly one of ratio=, variance= or ranks=")
    if ratio is not None and not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if variance is not None and not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    new = copy.deepcopy(model)
    targets = [t for t in find_targets(new) if (compress_embeddings or t.kind != "embedding")
               and (ranks is None or t.name in ranks)]
    if ranks is not None and len(targets) != len(ranks):
        unknown = set(ranks) - {t.name for t in targets}
        raise ValueError(f"no compressible layer named {sorted(unknown)}; see find_targets(model)")
    samples = collect_statistics(new, targets, calibration_batches, max_batches)
    params_before = count_parameters(new)
    spectra = {t.name: principal_components(t.stats.covariance()) for t in targets}

    forced = ranks is not None
    if ranks is not None:
        ranks = {name: max(1, min(int(k), next(t.width for t in targets if t.name == name)))
                 for name, k in ranks.items()}
    elif ratio is not None:
        fixed = params_before - sum(t.params() for t in targets)
        ranks = _ranks_for_ratio(targets, spectra, fixed, ratio)
    else:
        ranks = {}
        for t in targets:
            k = rank_for_variance(spectra[t.name][0], variance)
            ranks[t.name] = k if k < t.width and t.params(k) < t.params() else t.width

    layers: dict[str, LayerReport] = {}
    for t in targets:
        k = ranks[t.name]
        vals, vecs = spectra[t.name]
        mean = t.stats.mean
        keep = k < t.width or forced
        before, after = t.params(), t.params(k) if keep else t.params()
        if keep and t.kind == "linear":
            _set_submodule(new, t.name, factorize_linear(t.module, vecs[0, :, :k], mean[0]))
        elif keep:
            t.module.embedding = factorize_table(t.module.embedding, vecs[:, :, :k], mean)
        layers[t.name] = LayerReport(t.name, t.kind, t.width, k, before, after, explained_fraction(vals, k), keep)
    if fold:
        _fold_all(new, layers)
    report = CompressionReport(params_before, count_parameters(new), ratio, variance, samples, list(layers.values()))
    log.info("AFM: %d -> %d parameters (%.3gx) from %d calibration samples", report.params_before,
             report.params_after, report.ratio, samples)
    return new, report


@torch.no_grad()
def apply_plan(model: nn.Module, plan: list[dict[str, Any]]) -> nn.Module:
    """Give ``model`` (freshly built, uncompressed) the structure in ``plan``, in place, ready for
    ``load_state_dict`` of a compressed checkpoint. Weights are placeholders until then."""
    folded = set()
    for entry in plan:
        name, k = entry["name"], int(entry["rank"])
        module = model.get_submodule(name)
        if entry["kind"] == "linear":
            basis = torch.eye(module.out_features, k, device=module.weight.device)
            _set_submodule(model, name, factorize_linear(module, basis, torch.zeros(module.out_features,
                                                                                    device=basis.device)))
            if entry.get("folded"):
                folded.add(name)
        else:
            arch = model.get_submodule(name.rpartition(".")[0])
            dim = module.embedding_dim
            bases = torch.eye(dim, k).expand(len(module.field_sizes), dim, k).to(next(module.parameters()).device)
            arch.embedding = factorize_table(module, bases, torch.zeros(len(module.field_sizes), dim,
                                                                         device=bases.device))
    _fold_all(model, only=folded)
    return model
