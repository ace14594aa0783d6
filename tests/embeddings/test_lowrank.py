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


def test_per_field_ranks_lookup_both_paths_and_grads():
    torch.manual_seed(0)
    ranks = [2, 5, 3, 5, 1]
    t = LowRankEmbeddingBag(FIELDS, 8, ranks, rows=[3, 40, 1500, 1000, 7])  # field 3 hashed
    assert len(t.weights) == 4 and t.ranks == ranks and t.hashes_ids()
    with torch.no_grad():
        t.bias.normal_()
    starts = torch.tensor([0, 3, 43, 1543, 31543])
    local = torch.stack([torch.randint(0, n, (6,)) for n in FIELDS], 1)
    ids = (local + starts).reshape(-1)
    f = torch.arange(len(FIELDS)).repeat(6)
    rows = t.row_index(ids, f)
    expected = []
    for fi, r in zip(f.tolist(), rows.tolist()):  # reference, one id at a time, from the field's own A_f, B_f
        a, b = t.field_factors(fi)
        local_row = r - t.row_base[fi].item()
        assert 0 <= local_row < t.rows[fi].item()
        expected.append(a[local_row] @ b + t.bias[fi])
    torch.testing.assert_close(t.lookup(ids), torch.stack(expected))
    perm = torch.randperm(len(ids))
    torch.testing.assert_close(t.lookup(ids[perm]), t.lookup(ids)[perm])
    t.lookup(ids).sum().backward()
    assert all(w.grad is not None and w.grad.is_sparse for w in t.weights)
    assert t.memory_bytes() == 4 * (sum(r * k for r, k in zip(t.rows.tolist(), ranks)) + sum(ranks) * 8
                                    + 5 * 8) + 4 * 8 * 5


def test_from_full_with_per_field_ranks_is_exact_at_full_rank():
    torch.manual_seed(0)
    full = ec.make_table("full", [50, 80, 4], 8, compression=1)
    ids = torch.arange(134).reshape(-1, 1)
    t = LowRankEmbeddingBag.from_full(full, rank=[8, 8, 4])
    torch.testing.assert_close(t(ids), full(ids), atol=1e-5, rtol=1e-5)
    assert not LowRankEmbeddingBag.from_full(full, rank=[3, 2, 1])(ids).isnan().any()


def test_per_field_ranks_gradients_match_a_reference():
    torch.manual_seed(0)
    t = LowRankEmbeddingBag(FIELDS, 4, [1, 3, 2, 3, 4], rows=[3, 40, 1500, 900, 7])
    starts = torch.tensor([0, 3, 43, 1543, 31543])
    ids = (torch.stack([torch.randint(0, n, (5,)) for n in FIELDS], 1) + starts).reshape(-1)
    w = torch.randn(len(ids), 4)
    (t.lookup(ids) * w).sum().backward()  # field-major path
    fast = [p.grad.to_dense().clone() if p.grad.is_sparse else p.grad.clone() for p in t.parameters()]
    t.zero_grad()
    perm = torch.randperm(len(ids))
    (t.lookup(ids[perm]) * w[perm]).sum().backward()  # general path
    for a, p in zip(fast, t.parameters()):
        torch.testing.assert_close(a, p.grad.to_dense() if p.grad.is_sparse else p.grad)
