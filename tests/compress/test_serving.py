"""The serving form computes the compressed model's function: exact against the plain factorised computation."""

import pytest
import torch
from torch import nn

from embcompress.compress import FactorizedLinear, compress_model
from embcompress.compress.afm import find_targets
from embcompress.compress.layers import factorised_is_cheaper
from embcompress.compress.serving import FieldCodes, merged, serving_model
from embcompress.embeddings.lowrank import LowRankEmbeddingBag
from embcompress.models.deepfm import DeepFM
from embcompress.embeddings import make_table

from test_afm import SIZES, batches, build, outputs


def served_outputs(served, data):
    with torch.no_grad():
        return torch.cat([served(d, s) for d, s, _ in data])


@torch.no_grad()
def detune(model, seed=0):
    """Move every table factor and bias off the AFM solution (B_f no longer orthonormal), as a fine-tune does."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.embedding.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "dcn"])
@pytest.mark.parametrize("table", ["full", "lowrank"])
@pytest.mark.parametrize("ratio", [None, 2.0])
def test_served_equals_compressed(kind, table, ratio):
    model = build(kind, table)
    data = batches()
    if ratio is None:  # every layer factorised at full width: the folds and merges all apply
        new, _ = compress_model(model, data, ranks={t.name: t.width for t in find_targets(model)})
    else:
        new, _ = compress_model(model, data, ratio=ratio, mlp_variance=None)
    detune(new)
    served = serving_model(new)
    held_out = batches(seed=1)
    torch.testing.assert_close(served_outputs(served, held_out), outputs(new, held_out), atol=2e-5, rtol=1e-5)
    assert not list(served.parameters())  # frozen: buffers only


def test_hashed_lowrank_table_is_served_exactly():
    torch.manual_seed(0)
    table = make_table("lowrank", SIZES, 8, compression=20)
    assert table.hashes_ids()
    model = DeepFM(table, num_dense=13, deep=(16,))
    data = batches()
    new, _ = compress_model(model, data, ratio=1.5, mlp_variance=None)
    detune(new)
    held_out = batches(seed=2)
    torch.testing.assert_close(served_outputs(serving_model(new), held_out), outputs(new, held_out),
                               atol=2e-5, rtol=1e-5)


def test_deepfm_without_dense_features():
    torch.manual_seed(0)
    model = DeepFM(make_table("full", SIZES, 8, compression=1), num_dense=0, deep=(16, 8))
    data = [(torch.zeros(len(s), 0), s, y) for _, s, y in batches()]
    new, _ = compress_model(model, data, ratio=2.0)
    detune(new)
    torch.testing.assert_close(served_outputs(serving_model(new), data), outputs(new, data), atol=2e-5, rtol=1e-5)


def test_field_codes_read_each_fields_rows():
    torch.manual_seed(0)
    table = LowRankEmbeddingBag(SIZES, 8, [8, 3, 1, 5])
    blocks = [table.field_factors(f)[0] for f in range(len(SIZES))]
    codes = FieldCodes(table, blocks)
    sparse = batches(n=1)[0][1]
    got = codes(sparse)  # (B, F, k_max), entries past k_f unspecified
    for f, block in enumerate(blocks):
        torch.testing.assert_close(got[:, f, :block.shape[1]], block[sparse[:, f]])
    torch.testing.assert_close(codes(sparse, field_major=True), got.transpose(0, 1))
    with pytest.raises(RuntimeError):
        codes(torch.tensor([[0, 0, 0, SIZES[3]]]))  # one past field 3's last id


def test_merge_rule():
    layer = FactorizedLinear(100, 60, 80)
    one = merged(layer)  # 60·180 > 0.8·100·80: one product is cheaper
    assert isinstance(one, nn.Linear) and not factorised_is_cheaper(100, 60, 80)
    x = torch.randn(5, 100)
    torch.testing.assert_close(one(x), layer(x), atol=1e-5, rtol=1e-5)
    thin = FactorizedLinear(100, 10, 80)
    assert merged(thin) is thin and factorised_is_cheaper(100, 10, 80)
    # at batch 1 the extra call pays only where it saves reading many weights
    assert not factorised_is_cheaper(100, 10, 80, batch_size=1) and isinstance(merged(thin, 1), nn.Linear)
    assert factorised_is_cheaper(512, 4, 256, batch_size=1) and not factorised_is_cheaper(256, 2, 64, batch_size=1)


def test_mlp_variance_leaves_expensive_layers_whole():
    model = build("dlrm")
    data = batches()
    new, report = compress_model(model, data, ratio=2.0, mlp_variance=0.99)
    for layer in report.layers:
        if layer.kind == "linear" and layer.factorized:
            module = model.get_submodule(layer.name)
            assert factorised_is_cheaper(module.in_features, layer.rank, module.out_features)
    assert report.ratio >= 2.0 * 0.999


def test_served_form_exports():
    model = build("deepfm", "lowrank")
    new, _ = compress_model(model, batches(), ratio=2.0)
    served = serving_model(new)
    d, s, _ = batches(n=1, b=8, seed=3)[0]
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(served, (d, s), dynamic_shapes=({0: batch}, {0: batch}))
    for n in (1, 8):
        torch.testing.assert_close(program.module()(d[:n], s[:n]), served(d[:n], s[:n]))


@pytest.mark.parametrize("kind", ["dlrm", "deepfm"])
def test_small_batch_form_merges_small_factorised_layers(kind):
    model = build(kind, "lowrank")
    data = batches()
    new, _ = compress_model(model, data, ranks={t.name: 2 for t in find_targets(model)})
    large, small = serving_model(new), serving_model(new, batch_size=1)
    assert any(isinstance(m, FactorizedLinear) for m in large.modules())
    assert not any(isinstance(m, FactorizedLinear) for m in small.modules())
    held_out = batches(seed=1)
    for served in (large, small):
        torch.testing.assert_close(served_outputs(served, held_out), outputs(new, held_out), atol=2e-5, rtol=1e-5)


def test_deepfm_without_hidden_layers_is_served_generically():
    torch.manual_seed(0)
    model = DeepFM(make_table("full", SIZES, 8, compression=1), num_dense=13, deep=())
    data = batches()
    new, _ = compress_model(model, data, ratio=2.0)
    torch.testing.assert_close(served_outputs(serving_model(new), data), outputs(new, data), atol=2e-5, rtol=1e-5)
