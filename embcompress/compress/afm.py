"""AFM post-training low-rank compression of a trained model (Unified Low-rank Compression, KDD 2024).

:func:`compress_model` streams calibration batches through the model once, accumulating each chosen
layer's output mean and covariance (float64), keeps its top-k eigenvectors, and replaces each linear
layer by two thinner ones and the embedding table by a ``lowrank`` table with one basis and rank per
field; a factorised layer's second map is folded into a directly following linear layer.

Chosen layers: every ``nn.Linear`` with at least 2 outputs, and a ``full`` or ``lowrank`` table behind a
:class:`~embcompress.models.blocks.SparseArch` (its (B, F, D) output gives per-field statistics).

Ranks: ``variance=v`` keeps the smallest k explaining v of each layer's (field's) output variance;
``ratio=r`` shrinks the whole model r-fold, buying one rank at a time where it keeps the most variance per
parameter (:func:`_ranks_for_ratio`). Ranks are per field because a 20k-id field pays 20k parameters
per rank and a 3-id field nearly nothing. Linear layers are capped at ``mlp_variance`` of their variance
and left whole where the factorisation would not compute faster, so the budget goes to the embeddings
and the compressed model is cheaper to run (docs/lowrank.md).
"""

from __future__ import annotations

import copy
import heapq
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..models.blocks import SparseArch
from .layers import (
    FactorizedLinear, factorised_is_cheaper, factorize_linear, factorize_table, fold_into, is_compressible_table,
    linear_params, table_params, table_rows, field_rank_params,
)
from .stats import StreamingMoments, explained_fraction, principal_components, rank_for_variance

log = logging.getLogger(__name__)

#: Default ``mlp_variance``: the fraction of a linear layer's output variance its rank keeps under ``ratio``.
MLP_VARIANCE = 0.99


@dataclass
class LayerReport:
    name: str
    kind: str  # "linear" or "embedding"
    width: int  # output width (D for an embedding)
    rank: int | list[int]  # k kept (== width: left as it was); one per field for an embedding
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


def _units(targets: list[_Target],
           spectra: dict[str, tuple[Tensor, Tensor]]) -> list[tuple[str, int, list[float], list[int]]]:
    """What the rank allocation chooses among: (layer, field or -1, variance at each added rank as a
    fraction of the layer's total, parameters at each rank 1..width). An embedding table is one unit per
    field, since a field of 20k ids pays 20k parameters per rank and a field of 3 ids nearly nothing."""
    units = []
    for t in targets:
        vals = spectra[t.name][0].reshape(-1, t.width)  # (G, width)
        total = float(vals.sum().clamp(min=1e-300))
        if t.kind == "linear":
            units.append((t.name, -1, (vals[0] / total).tolist(),
                          [t.params(k) for k in range(1, t.width + 1)]))
        else:
            for f, rows in enumerate(table_rows(t.module.embedding)):
                units.append((t.name, f, (vals[f] / total).tolist(),
                              [field_rank_params(rows, t.width, k) for k in range(1, t.width + 1)]))
    return units


def _ranks_for_ratio(targets: list[_Target], spectra: dict[str, tuple[Tensor, Tensor]], fixed: int,
                     ratio: float, per_parameter: bool = False,
                     caps: dict[str, int] | None = None) -> dict[str, int | list[int]]:
    """Ranks (one per linear layer, one per field of a table) meeting a whole-model size target.

    Every unit (:func:`_units`) starts at rank 1; one rank at a time goes to the unit whose next
    eigenvalue is the largest fraction of its layer's output variance (``per_parameter``: that
    fraction divided by the rank's parameter cost), while the model stays within ``1/ratio`` of its
    size. Ranks that carry no variance (a 3-id field beyond rank 2) are never bought, nor ranks of a layer
    beyond its ``caps`` entry.
    """
    caps = caps or {}
    goal = (fixed + sum(t.params() for t in targets)) / ratio
    units = _units(targets, spectra)
    ranks = [1] * len(units)
    total = fixed + sum(t.params(1) for t in targets)
    if total > goal:
        raise ValueError(f"cannot shrink the model {ratio}x: at rank 1 everywhere it is "
                         f"{(fixed + sum(t.params() for t in targets)) / total:.3g}x smaller")
    width = {t.name: t.width for t in targets}
    full = {t.name: t.params() for t in targets}
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        name, _, frac, cost = units[i]
        k = ranks[i]
        if k >= min(width[name], caps.get(name, width[name])) or frac[k] <= 1e-12:
            return
        gain = frac[k] / (cost[k] - cost[k - 1]) if per_parameter else frac[k]
        heapq.heappush(heap, (-gain, i))

    for i in range(len(units)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        name, field, _, cost = units[i]
        k = ranks[i]
        extra = cost[k] - cost[k - 1]
        if total + extra > goal:
            continue  # unaffordable; a cheaper unit may still fit
        if field < 0 and cost[k] >= full[name]:
            continue  # factorising this layer at that rank saves nothing
        ranks[i] = k + 1
        total += extra
        push(i)
    out: dict[str, int | list[int]] = {}
    for (name, field, _, _), k in zip(units, ranks):
        if field < 0:
            out[name] = k
        else:
            out.setdefault(name, []).append(k)
    return out


def _cheaper(t: _Target, k: int) -> bool:
    """Whether linear layer ``t`` at rank k is cheaper to compute as two products than as one."""
    return factorised_is_cheaper(t.module.in_features, k, t.module.out_features)


def _ratio_ranks(targets: list[_Target], spectra: dict[str, tuple[Tensor, Tensor]], params: int, ratio: float,
                 per_parameter: bool, mlp_variance: float | None) -> dict[str, int | list[int]]:
    """Ranks for a whole-model ``ratio``: linear layers capped by ``mlp_variance`` (or left whole), the
    rest of the budget allocated by :func:`_ranks_for_ratio`."""
    whole, caps = [], {}
    for t in targets:
        if t.kind == "linear" and mlp_variance is not None:
            k = rank_for_variance(spectra[t.name][0], mlp_variance)
            if _cheaper(t, k):
                caps[t.name] = k
            else:
                whole.append(t)
    chosen = [t for t in targets if t not in whole]
    fixed = params - sum(t.params() for t in chosen)
    try:
        ranks = _ranks_for_ratio(chosen, spectra, fixed, ratio, per_parameter, caps)
    except ValueError:
        if not whole and not caps:
            raise
        log.warning("AFM: %gx needs the linear layers below %g of their variance; allocating them freely",
                    ratio, mlp_variance)
        return _ratio_ranks(targets, spectra, params, ratio, per_parameter, None)
    ranks.update({t.name: t.width for t in whole})
    return ranks


def _clamp(k: int | list[int], width: int) -> int | list[int]:
    if isinstance(k, (list, tuple)):
        return [max(1, min(int(x), width)) for x in k]
    return max(1, min(int(k), width))


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
                   max_batches: int | None = None, allocation: str = "per-parameter",
                   mlp_variance: float | None = MLP_VARIANCE) -> tuple[nn.Module, CompressionReport]:
    """AFM-compress a copy of ``model``; returns (compressed model, report). ``model`` is not changed.

    Give exactly one of ``ratio`` (whole-model parameter reduction, e.g. 3.0), ``variance`` (fraction
    of each layer's output variance to keep, e.g. 0.99) or ``ranks`` ({layer name: k}, as named in the
    report; the named layers are factorised even at full width, which is how the tests check exactness).
    ``allocation`` (with ``ratio``): "per-parameter" (default) buys the ranks that keep the most variance
    per parameter; "variance" evens out the fraction of variance each layer and field discards.
    ``mlp_variance`` (with ``ratio``): a linear layer gets at most the rank keeping that fraction of its
    output variance, and stays whole where that rank would not make it cheaper to compute
    (:func:`~embcompress.compress.layers.factorised_is_cheaper`); the parameters it leaves go to the
    embeddings. None: linear layers compete for the budget like embedding fields.
    """
    if allocation not in ("variance", "per-parameter"):
        raise ValueError(f"allocation must be 'variance' or 'per-parameter', got {allocation!r}")
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
    width = {t.name: t.width for t in targets}
    if ranks is not None:
        ranks = {name: _clamp(k, width[name]) for name, k in ranks.items()}
    elif ratio is not None:
        ranks = _ratio_ranks(targets, spectra, params_before, ratio, allocation == "per-parameter", mlp_variance)
    else:
        ranks = {}
        for t in targets:
            vals = spectra[t.name][0]
            if t.kind == "embedding":  # per field: the smallest k_f keeping ``variance`` of that field
                k = [rank_for_variance(v, variance) for v in vals]
            else:
                k = rank_for_variance(vals, variance)
            if t.kind == "embedding":
                ranks[t.name] = k if t.params(k) < t.params() else t.width
            else:
                ranks[t.name] = k if _cheaper(t, k) else t.width

    layers: dict[str, LayerReport] = {}
    for t in targets:
        k = ranks[t.name]
        vals, vecs = spectra[t.name]
        mean = t.stats.mean
        keep = forced or (min(k) if isinstance(k, list) else k) < t.width
        before, after = t.params(), t.params(k) if keep else t.params()
        if keep and t.kind == "linear":
            _set_submodule(new, t.name, factorize_linear(t.module, vecs[0, :, :k], mean[0]))
        elif keep:
            per_field = k if isinstance(k, list) else [k] * len(vecs)
            bases = [vecs[f, :, :kf] for f, kf in enumerate(per_field)]
            t.module.embedding = factorize_table(t.module.embedding, bases, mean)
        layers[t.name] = LayerReport(t.name, t.kind, t.width, k, before, after, explained_fraction(vals, k), keep)
    if fold:
        _fold_all(new, layers)
    report = CompressionReport(params_before, count_parameters(new), ratio, variance, samples, list(layers.values()))
    log.info("AFM: %d -> %d parameters (%.3gx) from %d calibration samples", report.params_before,
             report.params_after, report.ratio, samples)
    return new, report


def _plan_module(model: nn.Module, entry: Any) -> nn.Module:
    """The module a plan entry names, checked against the entry (ValueError: the plan is for another model)."""
    if not isinstance(entry, dict) or not {"name", "kind", "rank"} <= entry.keys():
        raise ValueError(f"a compression plan entry must have name, kind and rank, got {entry!r}")
    name, kind, rank = entry["name"], entry["kind"], entry["rank"]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the compression plan names layer {name!r}, which this {type(model).__name__} "
                         "does not have") from None
    ranks = rank if isinstance(rank, list) else [rank]
    if not ranks or not all(isinstance(k, int) and k >= 1 for k in ranks):
        raise ValueError(f"the compression plan gives layer {name!r} rank {rank!r}, not positive integers")
    if kind == "linear" and isinstance(module, nn.Linear) and not isinstance(rank, list):
        return module
    if kind == "embedding" and is_compressible_table(module) and (
            not isinstance(rank, list) or len(rank) == len(module.field_sizes)):
        return module
    raise ValueError(f"the compression plan's {kind} layer {name!r} of rank {rank!r} does not fit this "
                     f"{type(model).__name__}'s {type(module).__name__}")


@torch.no_grad()
def apply_plan(model: nn.Module, plan: list[dict[str, Any]]) -> nn.Module:
    """Give ``model`` (freshly built, uncompressed) the structure in ``plan``, in place, ready for
    ``load_state_dict`` of a compressed checkpoint. Weights are placeholders until then.
    ValueError when the plan does not fit the model."""
    if not isinstance(plan, list):
        raise ValueError(f"a compression plan is a list of layers, got {type(plan).__name__}")
    folded = set()
    for entry in plan:
        module = _plan_module(model, entry)
        name = entry["name"]
        k = entry["rank"] if isinstance(entry["rank"], list) else int(entry["rank"])
        if entry["kind"] == "linear":
            basis = torch.eye(module.out_features, k, device=module.weight.device)
            _set_submodule(model, name, factorize_linear(module, basis, torch.zeros(module.out_features,
                                                                                    device=basis.device)))
            if entry.get("folded"):
                folded.add(name)
        else:
            arch = model.get_submodule(name.rpartition(".")[0])
            dim, fields = module.embedding_dim, len(module.field_sizes)
            per_field = [int(x) for x in entry["rank"]] if isinstance(entry["rank"], list) else [k] * fields
            device = next(module.parameters()).device
            bases = [torch.eye(dim, kf, device=device) for kf in per_field]
            arch.embedding = factorize_table(module, bases, torch.zeros(fields, dim, device=device))
    _fold_all(model, only=folded)
    return model
