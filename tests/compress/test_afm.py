"""AFM post-training compression: exact at full rank, near-exact on low-rank activations, sizes on target."""

import pytest
import torch
from torch import nn

import embcompress as ec
from embcompress.compress import FactorizedLinear, apply_plan, compress_model, count_parameters
from embcompress.compress.afm import find_targets
from embcompress.compress.layers import factorize_linear, fold_into
from embcompress.embeddings.lowrank import LowRankEmbeddingBag
from embcompress.models import DLRM
from embcompress.models.dcn import DCNv2
from embcompress.models.deepfm import DeepFM

SIZES = [5, 40, 300, 2000]


def batches(n=6, b=64, dense=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # Zipf-ish ids, so that calibration statistics are frequency-weighted as in real data
        sparse = torch.stack([(torch.rand(b, generator=gen) ** 3 * s).long() for s in SIZES], 1)
        out.append((torch.randn(b, dense, generator=gen), sparse, torch.zeros(b)))
    return out


def build(kind, table="full", dim=8):
    torch.manual_seed(0)
    emb = ec.make_table(table, SIZES, dim, compression=1 if table == "full" else 2)
    if kind == "dcn":
        return DCNv2(emb, num_dense=13, cross_layers=2, deep=(64, 32))
    if kind == "deepfm":
        return DeepFM(emb, num_dense=13, deep=(64, 32))
    return DLRM(emb, num_dense=13, bottom=(32, 16), top=(64, 32))


def outputs(model, data):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(d, s) for d, s, _ in data])


@pytest.mark.parametrize("kind", ["dcn", "deepfm", "dlrm"])
@pytest.mark.parametrize("table", ["full", "lowrank"])
def test_full_rank_gives_the_same_outputs(kind, table):
    model = build(kind, table)
    data = batches()
    full_ranks = {t.name: t.width for t in find_targets(model)}
    assert any(t.kind == "embedding" for t in find_targets(model))
    new, report = compress_model(model, data, ranks=full_ranks)
    assert all(l.factorized for l in report.layers)
    assert any(isinstance(m, FactorizedLinear) for m in new.modules())
    assert isinstance(new.embedding, LowRankEmbeddingBag)
    held_out = batches(seed=1)  # exactness holds on any input, not only the calibration data
    torch.testing.assert_close(outputs(new, held_out), outputs(model, held_out), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())  # the original is untouched


def test_low_rank_activations_are_reproduced_at_their_rank():
    # A layer whose outputs span only 3 dimensions (plus a mean) is exact at k = 3.
    torch.manual_seed(0)
    lin = nn.Linear(10, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 3) @ torch.randn(3, 10))
    x = torch.randn(500, 10)
    y = lin(x)
    from embcompress.compress.stats import StreamingMoments, principal_components
    m = StreamingMoments(20)
    m.update(y)
    _, vecs = principal_components(m.covariance())
    f = factorize_linear(lin, vecs[0, :, :3], m.mean[0])
    torch.testing.assert_close(f(x), y, atol=1e-4, rtol=1e-4)
    assert f.first.out_features == 3


@pytest.mark.parametrize("ratio", [2.0, 3.0, 5.0])
def test_parameter_count_meets_the_ratio(ratio):
    model = build("dcn")
    new, report = compress_model(model, batches(), ratio=ratio)
    before, after = count_parameters(model), count_parameters(new)
    assert report.params_before == before and report.params_after == after
    assert before / ratio * 0.9 <= after <= before / ratio  # on target, not far below it
    assert outputs(new, batches(seed=1)).shape == (6 * 64,)


def test_variance_mode_keeps_the_requested_variance():
    model = build("deepfm")
    _, report = compress_model(model, batches(), variance=0.9)
    for layer in report.layers:
        assert layer.explained_variance >= 0.9 - 1e-9
        assert layer.params_after <= layer.params_before


def test_folding_into_a_following_linear_layer():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(30, 6)
    ref = seq(x)
    basis = torch.linalg.qr(torch.randn(8, 8)).Q
    fact = factorize_linear(seq[0], basis, torch.randn(8))
    torch.testing.assert_close(fact(x), seq[0](x), atol=1e-5, rtol=1e-5)
    seq[0] = fact
    assert fold_into(fact, seq[1])
    assert "second" not in fact._modules and seq[1].in_features == 8
    torch.testing.assert_close(seq(x), ref, atol=1e-5, rtol=1e-5)
    assert not fold_into(seq[1], seq[2]) if isinstance(seq[1], FactorizedLinear) else True


def test_plan_rebuilds_the_structure_for_loading():
    model = build("dcn")
    new, report = compress_model(model, batches(), ratio=3.0)
    rebuilt = apply_plan(build("dcn"), report.plan())
    rebuilt.load_state_dict(new.state_dict())
    data = batches(seed=2)
    torch.testing.assert_close(outputs(rebuilt, data), outputs(new, data))


def test_bad_arguments():
    model = build("dlrm")
    with pytest.raises(ValueError, match="exactly one"):
        compress_model(model, batches(), ratio=2.0, variance=0.9)
    with pytest.raises(ValueError, match="no calibration"):
        compress_model(model, [], ratio=2.0)
    with pytest.raises(ValueError, match="cannot shrink"):
        compress_model(model, batches(), ratio=1e5)


@pytest.mark.parametrize("allocation", ["per-parameter", "variance"])
def test_ratio_gives_per_field_ranks_and_is_deterministic(allocation):
    model = build("deepfm")
    new, report = compress_model(model, batches(), ratio=3.0, allocation=allocation)
    again, report2 = compress_model(model, batches(), ratio=3.0, allocation=allocation)
    emb = next(l for l in report.layers if l.kind == "embedding")
    assert isinstance(emb.rank, list) and len(emb.rank) == len(SIZES)
    assert [l.rank for l in report.layers] == [l.rank for l in report2.layers]  # same data, same ranks
    assert new.embedding.ranks == emb.rank
    before = count_parameters(model)
    assert before / 3.0 * 0.9 <= report.params_after <= before / 3.0
    data = batches(seed=1)
    torch.testing.assert_close(outputs(new, data), outputs(again, data))
    rebuilt = apply_plan(build("deepfm"), report.plan())
    rebuilt.load_state_dict(new.state_dict())
    torch.testing.assert_close(outputs(rebuilt, data), outputs(new, data))
    if allocation == "per-parameter":  # a 5-id field is nearly free: it keeps more rank than the 2000-id one
        assert emb.rank[0] >= emb.rank[3]
