import torch

import embcompress as ec
from embcompress.models import DLRM, get_model


def test_dlrm_shapes_and_reference_sizes():
    table = ec.make_table("full", [10, 20, 30], 16, compression=1)
    model = DLRM(table, num_dense=13)
    # 3 fields + dense vector = 4 vectors -> 6 pairs, + 16 dense = 22 inputs to the top MLP
    assert model.over_arch.net[0][0].in_features == 16 + 6
    dense = torch.randn(5, 13)
    sparse = torch.stack([torch.randint(0, n, (5,)) for n in [10, 20, 30]], 1)
    out = model(dense, sparse)
    assert out.shape == (5,)
    out.sum().backward()
    assert table.weight.grad is not None


def test_dlrm_criteo_kaggle_interaction_width():
    table = ec.make_table("hash", [1000] * 26, 16, compression=100)
    model = get_model("dlrm")(table, num_dense=13)
    assert model.over_arch.net[0][0].in_features == 367  # 351 pairs + 16 dense, as the reference


def test_dlrm_without_dense_features():
    table = ec.make_table("full", [10, 20, 30], 4, compression=1)
    model = DLRM(table, num_dense=0)
    out = model(torch.zeros(2, 0), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2,)


def test_interaction_matches_explicit_dot_products():
    table = ec.make_table("full", [7, 9], 4, compression=1)
    model = DLRM(table, num_dense=3, bottom=(8,), top=(8,))
    dense, sparse = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]])
    x = model.dense_arch(dense)
    emb = model.sparse_arch(sparse)
    got = model.interaction(x, emb)
    v = torch.cat([x[:, None], emb], 1)
    expected = torch.stack([(v[:, i] * v[:, j]).sum(-1) for i in range(3) for j in range(i)], 1)
    torch.testing.assert_close(got, torch.cat([x, expected], 1))
