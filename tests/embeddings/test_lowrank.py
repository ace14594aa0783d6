"""The ``lowrank`` table beyond the contract: rank from the budget, hashing, the field fast path, SVD."""

import math

import pytest
import torch

import embcompress as ec
from embcompress.embeddings.lowrank import LowRankEmbeddingBag

FIELDS = [3, 40, 1500, 30000, 7]


def test_rank_and_rows_follow_the_budget():
    n = sum(FIELDS)
    # 2.2x at D=16: 7.3 floats per id -> rank 7, every id whole
    t = ec.make_table("lowrank", FIELDS, 16, compression=2.2)
    assert t.rank == 7 and t.rows.sum().item() == n
    # exactly 2x: rank 8 leaves no room for the per-field maps, so rank 8 with a few ids hashed
    t = ec.make_table("lowrank", FIELDS, 16, compression=2)
    assert t.rank == 8 and n - 200 < t.rows.sum().item() < n
    # 100x: below min_rank (D/4) the ids of the large fields are hashed onto fewer rows
    t = ec.make_table("lowrank", FIELDS, 16, compression=100)
    assert t.rank == 4 and t.rows.sum().item() < n
    assert t.rows.tolist()[:2] == [3, 40]  # small fields stay whole
    # an explicit rank is honoured
    t = ec.make_table("lowrank", FIELDS, 16, compression=10, rank=2)
    assert t.rank == 2


def test_lookup_is_A_times_B_plus_bias_both_paths():
    torch.manual_seed(0)
    t = ec.make_table("lowrank", FIELDS, 8, compression=4)
    with torch.no_grad():
        t.bias.normal_()
    starts = torch.tensor([0, 3, 43, 1543, 31543])
    local = torch.stack([torch.randint(0, n, (6,)) for n in FIELDS], 1)  # (6, F)
    ids = (local + starts).reshape(-1)  # field after field: the fast path
    f = torch.arange(len(FIELDS)).repeat(6)
    rows = t.row_index(ids, f)
    expected = torch.einsum("nk,nkd->nd", t.weight[rows], t.proj[f]) + t.bias[f]
    torch.testing.assert_close(t.lookup(ids), expected)
    perm = torch.randperm(len(ids))  # any order: the general path
    torch.testing.assert_close(t.lookup(ids[perm]), expected[perm])


def test_hashed_ids_collide_only_within_their_field():
    t = ec.make_table("lowrank", FIELDS, 16, compression=200)
    ids = torch.arange(sum(FIELDS))
    f = torch.bucketize(ids, t.starts[1:], right=True)
    rows = t.row_index(ids, f)
    lo = t.row_base[f]
    assert torch.all(rows >= lo) and torch.all(rows < lo + t.rows[f])
    assert rows.max().item() < t.weight.shape[0]


def test_from_full_by_truncated_svd():
    torch.manual_seed(0)
    full = ec.make_table("full", [50, 80], 8, compression=1)
    exact = LowRankEmbeddingBag.from_full(full, rank=8)
    ids = torch.arange(130).reshape(-1, 1)
    torch.testing.assert_close(exact(ids), full(ids), atol=1e-5, rtol=1e-5)
    low = LowRankEmbeddingBag.from_full(full, rank=3)
    # per field, the error equals the Eckart-Young optimum: the norm of the dropped singular values
    for start, n in [(0, 50), (50, 80)]:
        w = full.weight[start:start + n].detach()
        s = torch.linalg.svdvals(w.double())
        err = (low(ids[start:start + n]) - w).double().norm()
        assert math.isclose(err.item(), s[3:].norm().item(), rel_tol=1e-4)
    assert low.memory_bytes() < full.memory_bytes()


def test_from_full_rejects_other_tables():
    with pytest.raises(TypeError, match="full"):
        LowRankEmbeddingBag.from_full(ec.make_table("hash", [1000], 8, compression=10), rank=2)


@pytest.mark.parametrize("ratio", [3.9, 200])  # ids whole / ids of the large fields hashed
def test_one_id_bags_fast_path_equals_pooling(ratio):
    torch.manual_seed(0)
    t = ec.make_table("lowrank", FIELDS, 8, compression=ratio)
    assert t.hashes_ids() == (ratio == 200)
    starts = torch.tensor([0, 3, 43, 1543, 31543])
    ids = (torch.stack([torch.randint(0, n, (7,)) for n in FIELDS], 1) + starts).reshape(-1, 1)
    pooled = ec.CompressedEmbeddingBag.forward(t, ids.reshape(-1), torch.arange(len(ids)))
    torch.testing.assert_close(t(ids), pooled)
    with pytest.raises(ValueError, match="valid range"):
        t(torch.tensor([[sum(FIELDS)]]))
