"""The sparse arch checks every local id against its own field's size: global id = field start + local
id, so a local id >= its field's size would otherwise read the next field's rows without an error."""

import pytest
import torch

import embcompress as ec
from embcompress.models import DLRM, get_model
from embcompress.models.blocks import check_field_ids


@pytest.mark.parametrize("method", ["full", "hash"])
def test_local_id_past_its_field_is_an_error_naming_the_field(method):
    table = ec.make_table(method, [100, 50], 4, compression=1 if method == "full" else 2)
    model = DLRM(table, num_dense=2, bottom=(4,), top=(4,))
    dense = torch.zeros(3, 2)
    ok = torch.tensor([[0, 0], [99, 49], [5, 7]])
    model(dense, ok)
    with pytest.raises(ValueError, match=r"field 0: id 100 is outside its valid range \[0, 100\)"):
        model(dense, torch.tensor([[0, 0], [100, 0], [5, 7]]))  # global id 100 is field 1's row 0
    with pytest.raises(ValueError, match=r"field 1: id -1 is outside its valid range \[0, 50\)"):
        model(dense, torch.tensor([[0, -1], [1, 1], [5, 7]]))


@pytest.mark.parametrize("name", ["dcn", "deepfm"])
def test_every_model_checks_per_field(name):
    table = ec.make_table("full", [10, 20, 30], 4, compression=1)
    model = get_model(name)(table, num_dense=2)
    with pytest.raises(ValueError, match=r"field 1: id 25 is outside its valid range \[0, 20\)"):
        model(torch.zeros(1, 2), torch.tensor([[0, 25, 0]]))


def test_validate_ids_false_skips_the_check():
    table = ec.make_table("full", [10, 20], 4, compression=1)
    table.validate_ids = False  # the table's documented switch turns off the per-field check too
    model = DLRM(table, num_dense=0, top=(4,))
    model(torch.zeros(1, 0), torch.tensor([[10, 0]]))


def test_check_with_a_field_per_id_names_the_feature():
    sizes = torch.tensor([3, 5])
    check_field_ids(torch.tensor([2, 4, 0]), sizes, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"field 0 \('a'\): id 3 is outside its valid range \[0, 3\)"):
        check_field_ids(torch.tensor([1, 3, 0]), sizes, torch.tensor([1, 0, 1]), names=["a", "b"])


def test_train_on_a_dataset_with_an_id_past_its_field_is_one_error_line(tmp_path, capsys):
    """The same through ``train``: a dataset directory holding an id >= its field's size."""
    from embcompress.cli import main
    from embcompress.data import make_synthetic, save_dataset

    ds = make_synthetic(rows=2000, fields=3, scale=0.0005, seed=0)
    ds.sparse[100, 0] = ds.field_sizes[0]  # one id past field 0: global id = field 1's first row
    save_dataset(ds, tmp_path / "ds")
    code = main(["train", "--data", str(tmp_path / "ds"), "--method", "full", "--batch-size", "256",
                 "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("embcompress: error:") and "Traceback" not in err
    assert f"field 0: id {ds.field_sizes[0]} is outside its valid range [0, {ds.field_sizes[0]})" in err
