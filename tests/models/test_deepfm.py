import torch

import embcompress as ec
from embcompress.models import get_model
from embcompress.models.deepfm import DeepFM, FMInteraction

SIZES = [10, 20, 30]


def _inputs(b=5, dense=13):
    return torch.randn(b, dense), torch.stack([torch.randint(0, n, (b,)) for n in SIZES], 1)


def test_deepfm_shapes_and_gradients():
    table = ec.make_table("full", SIZES, 8, compression=1)
    model = get_model("deepfm")(table, num_dense=13, deep=(32, 16))
    assert isinstance(model, DeepFM)
    out = model(*_inputs())
    assert out.shape == (5,)
    out.sum().backward()
    assert table.weight.grad is not None and model.first_order_proj.grad is not None


def test_fm_term_equals_pairwise_dot_products():
    emb = torch.randn(3, 4, 5)
    expected = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction()(emb), expected)


def test_logit_is_sum_of_parts():
    torch.manual_seed(0)
    table = ec.make_table("full", SIZES, 4, compression=1)
    model = DeepFM(table, num_dense=3, deep=(8,))
    with torch.no_grad():
        model.first_order_proj.normal_()
        model.bias.fill_(0.3)
    dense, sparse = _inputs(4, 3)
    emb = model.sparse_arch(sparse)
    first = (emb * model.first_order_proj).sum((1, 2))
    deep = model.deep(torch.cat([dense, emb.flatten(1)], 1)).squeeze(-1)
    expected = 0.3 + first + FMInteraction()(emb) + deep + model.dense_linear(dense).squeeze(-1)
    torch.testing.assert_close(model(dense, sparse), expected)


def test_separate_first_order_table_and_no_dense():
    table = ec.make_table("full", SIZES, 4, compression=1)
    first = ec.make_table("full", SIZES, 1, compression=1)
    model = DeepFM(table, num_dense=0, deep=(8,), first_order=first)
    out = model(torch.zeros(2, 0), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2,)
    out.sum().backward()
    assert first.weight.grad is not None
