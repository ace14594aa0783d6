import pytest
import torch

import embcompress as ec
from embcompress.models import get_model
from embcompress.models.dcn import CrossNet, DCNv2

SIZES = [10, 20, 30]


def _inputs(b=5, dense=13):
    return torch.randn(b, dense), torch.stack([torch.randint(0, n, (b,)) for n in SIZES], 1)


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_shapes_and_gradients(structure):
    table = ec.make_table("full", SIZES, 8, compression=1)
    model = get_model("dcn")(table, num_dense=13, cross_layers=2, deep=(32, 16), structure=structure)
    assert isinstance(model, DCNv2)
    out = model(*_inputs())
    assert out.shape == (5,)
    out.sum().backward()
    assert table.weight.grad is not None and model.cross.layers[0].weight.grad is not None
    assert model.head.in_features == (16 if structure == "stacked" else 13 + 3 * 8 + 16)


def test_cross_layer_formula():
    net = CrossNet(6, 2)
    x0 = torch.randn(4, 6)
    x = x0
    for layer in net.layers:
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    torch.testing.assert_close(net(x0), x)


def test_dcn_without_dense_and_bad_structure():
    table = ec.make_table("full", SIZES, 4, compression=1)
    model = DCNv2(table, num_dense=0, deep=(8,))
    assert model(torch.zeros(2, 0), torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2,)
    with pytest.raises(ValueError, match="structure"):
        DCNv2(table, structure="sideways")
