"""The ``tt`` table: index split, forward and gradients against a dense reconstruction, init, budget, cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import embcompress as ec
from embcompress.embeddings.tt import TTEmbeddingBag
from embcompress.embeddings.tt_cores import (
    EMPTY, core_std, factor_dim, join_index, plan_for_budget, reconstruct, split_index, suggest_p, tt_rows,
)

FIELDS = [3, 40, 1500, 3000, 7, 1200]  # small, so dense reconstructions stay cheap
DIM = 8


def small_table(layout: str = "field", cache_rows: int = 0, dtype=torch.float64, fields=FIELDS,
                ranks=(3, 4), **kw) -> TTEmbeddingBag:
    """Fields 1..3 and 5 in TT groups (per field or shared), fields 0 and 4 raw; explicit shapes and ranks."""
    tt_fields = [f for f in (1, 2, 3, 5) if f < len(fields)]
    if layout == "field":
        groups = [[f] for f in tt_fields]
        p_shapes = [suggest_p(fields[f], 3) for f in tt_fields]
    else:
        groups = [tt_fields]
        p_shapes = [suggest_p(sum(fields[f] for f in tt_fields), 3)]
    table = TTEmbeddingBag(fields, DIM, groups=groups, p_shapes=p_shapes, q_shape=[2, 2, 2], ranks=list(ranks),
                           cache_rows=cache_rows, seed=0, **kw)
    return table.to(dtype)


def dense_table(table: TTEmbeddingBag) -> torch.Tensor:
    """The uncompressed (N, D) table a ``tt`` table stands for: raw rows, cached rows, else TT rows."""
    parts = []
    raw_row = 0
    for f, n in enumerate(table.field_sizes):
        g = int(table.field_group[f])
        if g < 0:
            parts.append(table.raw_weight[raw_row:raw_row + n])
            raw_row += n
        else:
            full = reconstruct(list(table.cores), table.p_shapes[g], table.core_base[g].tolist())
            base = int(table.field_base[f])
            parts.append(full[base:base + n])
    dense = torch.cat(parts)
    valid = table.cache_keys != EMPTY
    if valid.any():
        dense = dense.index_copy(0, table.cache_keys[valid], table.cache_weight[table.cache_slots[valid]])
    return dense


def random_bags(n_bags: int, max_len: int, high: int, seed: int, raw=(1, 4545)):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    ids = torch.randint(0, high, (int(lengths.sum()),), generator=gen)
    ids = torch.cat([ids, torch.tensor(raw, dtype=torch.int64)])  # the last bag also holds ids of the raw fields 0 and 4
    return ids, offsets, torch.rand(ids.shape, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- indices
@given(st.lists(st.integers(1, 60), min_size=2, max_size=4), st.data())
@settings(max_examples=60, deadline=None)
def test_split_index_round_trip(p, data):
    radix = torch.tensor(p)
    x = torch.tensor(data.draw(st.lists(st.integers(0, math.prod(p) - 1), min_size=1, max_size=30)))
    digits = split_index(x, radix)
    assert (digits >= 0).all() and (digits < radix).all()
    assert torch.equal(join_index(digits, radix), x)
    # digit t is the (t+1)-th most significant mixed-radix digit
    expect = [[(v // math.prod(p[t + 1:])) % p[t] for t in range(len(p))] for v in x.tolist()]
    assert digits.tolist() == expect


@given(st.integers(1, 3 * 10**9), st.integers(2, 4))
@settings(max_examples=60, deadline=None)
def test_suggested_shapes_cover_n_and_split_big_ids(n, t):
    p = suggest_p(n, t)
    assert len(p) == t and math.prod(p) >= n and max(p) <= math.ceil(n ** (1 / t)) + 1
    x = torch.tensor([0, n - 1, n // 2])  # ids above 2^31 stay exact (integer // and %)
    assert torch.equal(join_index(split_index(x, torch.tensor(p)), torch.tensor(p)), x)
    assert (split_index(x, torch.tensor(p))[:, 0] < p[0]).all()


@pytest.mark.parametrize("dim,t", [(16, 3), (16, 4), (8, 3), (4, 4), (7, 2), (64, 3), (12, 2)])
def test_factor_dim(dim, t):
    q = factor_dim(dim, t)
    assert len(q) == t and math.prod(q) == dim and q == sorted(q)


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("layout", ["field", "shared"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_equals_dense_reconstruction(layout, mode):
    table = small_table(layout)
    table.mode = mode
    table.eval()
    ids, offsets, w = random_bags(40, 5, table.num_embeddings, seed=1)
    dense = dense_table(table)
    torch.testing.assert_close(table(ids, offsets), F.embedding_bag(ids, dense, offsets, mode=mode))
    if mode == "sum":
        torch.testing.assert_close(table(ids, offsets, w),
                                   F.embedding_bag(ids, dense, offsets, mode=mode, per_sample_weights=w))


def test_one_id_per_bag_fast_path_equals_embedding_bag():
    table = small_table()
    table.eval()
    ids, _, w = random_bags(1, 60, table.num_embeddings, seed=7)
    dense = dense_table(table)
    one = torch.arange(ids.numel())
    torch.testing.assert_close(table(ids[:, None], per_sample_weights=w[:, None]),
                               F.embedding_bag(ids, dense, one, mode="sum", per_sample_weights=w))
    assert table(ids[:0, None]).shape == (0, DIM)


@pytest.mark.parametrize("ranks", [(3, 4), (9, 1), (1, 7)])
def test_tt_rows_gradcheck(ranks):
    """The hand-written backward of the batched chain product (duplicate core rows included)."""
    gen = torch.Generator().manual_seed(1)
    r = [1, *ranks, 1]
    shapes = [(4, r[0], 2, r[1]), (3, r[1], 2, r[2]), (5, r[2], 3, r[3])]
    cores = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    rows = torch.tensor([[1, 2, 3], [3, 0, 4], [1, 2, 0], [0, 1, 1], [1, 2, 3]])
    assert torch.autograd.gradcheck(lambda *c: tt_rows(list(c), rows), tuple(cores), fast_mode=True)


def test_tt_rows_equal_explicit_chain_product():
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(5, 1, 2, 3, generator=gen), torch.randn(4, 3, 3, 2, generator=gen),
             torch.randn(6, 2, 2, 1, generator=gen)]
    rows = torch.tensor([[1, 2, 3], [4, 0, 5]])
    got = tt_rows(cores, rows)
    for k, (a, b, c) in enumerate(rows.tolist()):
        # row[(j1, j2, j3)] = G1[a][0, j1, :] @ G2[b][:, j2, :] @ G3[c][:, j3, 0]
        expect = torch.einsum("ix,xjy,yk->ijk", cores[0][a][0], cores[1][b], cores[2][c][:, :, 0])
        torch.testing.assert_close(got[k], expect.reshape(-1))


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("layout", ["field", "shared"])
def test_gradients_equal_dense_reconstruction(layout):
    table = small_table(layout, cache_rows=8)
    ids, offsets, w = random_bags(30, 4, table.num_embeddings, seed=2)
    _warm_cache(table, ids)
    target = torch.randn(30, DIM, dtype=torch.float64)
    params = [table.raw_weight, table.cache_weight, *table.cores]
    loss = (table(ids, offsets, w) * target).sum()
    got = torch.autograd.grad(loss, params)
    ref_loss = (F.embedding_bag(ids, dense_table(table), offsets, mode="sum", per_sample_weights=w) * target).sum()
    expect = torch.autograd.grad(ref_loss, params)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, e)
    assert table.cache_weight.grad is None and any(g.abs().sum() > 0 for g in got[2:])


def test_gradcheck_float64():
    table = small_table("field", cache_rows=4, sparse=False, fields=[3, 40, 300, 90, 7], ranks=(2, 3))
    ids, offsets, w = random_bags(6, 3, table.num_embeddings, seed=3, raw=(1, 435))
    _warm_cache(table, ids)
    names = ["raw_weight", "cache_weight"] + [f"cores.{t}" for t in range(len(table.cores))]
    inputs = tuple(dict(table.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def fn(*tensors):
        return torch.func.functional_call(table, dict(zip(names, tensors)), (ids, offsets, w))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("n,t,ranks", [(20_000, 3, [16, 16]), (5_000, 2, [32]), (200_000, 4, [8, 8, 8])])
def test_init_row_variance_matches_uniform(n, t, ranks):
    dim = 16
    q = factor_dim(dim, t)
    variances, means = [], []
    for seed in range(3):
        table = TTEmbeddingBag([n], dim, groups=[[0]], p_shapes=[suggest_p(n, t)], q_shape=q, ranks=ranks, seed=seed)
        rows = table.lookup(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:4000]).detach()
        variances.append(rows.pow(2).mean().item())
        means.append(rows.mean().item())
        std = core_std(n, ranks, t)
        assert max(c.abs().max().item() for c in table.cores) <= 2 * std  # truncated at 2 std, not |w| >= 2
    target = 1.0 / (3 * n)  # Var U(-a, a) with a = sqrt(1/n)
    assert abs(sum(variances) / 3 / target - 1) < 0.15, (sum(variances) / 3, target)
    assert abs(sum(means) / 3) < 0.1 * math.sqrt(target)


# ---------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("layout", ["field", "shared"])
@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_memory_within_budget_and_plan_is_exact(layout, ratio):
    fields = [n // 20 + 1 for n in (1460, 583, 10131227, 2202608, 305, 24, 12517, 93145, 8351593, 286181)]
    budget = ec.full_table_bytes(fields, 16) / ratio
    table = ec.make_table("tt", fields, 16, compression=ratio, layout=layout)
    assert 0.9 * budget <= table.memory_bytes() <= budget
    plan = plan_for_budget(fields, 16, int(budget), layout=layout)
    assert plan.nbytes() == table.memory_bytes()
    assert table.cache_keys.numel() > 0 and len(table.groups) >= 1
    # a raw field is one no larger than its TT would be; the largest fields are compressed
    assert int(table.field_group[2]) >= 0 and int(table.field_group[5]) < 0


def test_auto_layout_is_per_field_where_it_fits_else_shared():
    small = [85, 312, 701, 896, 37, 9, 1564, 53, 4, 1093, 1245, 719, 1104, 23, 1066, 796, 10, 703, 255, 5, 744,
             8, 13, 784, 35, 585]  # the Criteo sample's fields at min-count 2: per-field TTs cannot reach 100x
    budget = ec.full_table_bytes(small, 16) / 100
    with pytest.raises(ec.BudgetError, match="reachable ratios"):
        ec.make_table("tt", small, 16, compression=100, layout="field")
    table = ec.make_table("tt", small, 16, compression=100)
    assert len(table.groups) == 1 and 0.9 * budget <= table.memory_bytes() <= budget
    big = [n // 20 + 1 for n in (1460, 583, 10131227, 2202608, 305, 24, 12517, 93145, 8351593, 286181)]
    budget = int(ec.full_table_bytes(big, 16) / 100)
    assert plan_for_budget(big, 16, budget) == plan_for_budget(big, 16, budget, layout="field")


def test_explicit_options_and_unreachable_ratio():
    BIG = [3, 40, 1500, 30000, 7, 12000]
    table = ec.make_table("tt", BIG, DIM, compression=20, num_cores=2, ranks=[4], q_shape=[4, 2])
    assert table.ranks == [4] and table.q_shape == [4, 2] and table.cache_keys.numel() > 0
    table = ec.make_table("tt", BIG, DIM, compression=20, cache_fraction=0.0)
    assert table.cache_keys.numel() == 0 and table.track_ids.numel() == 0
    with pytest.raises(ec.BudgetError, match="reachable ratios"):
        ec.make_table("tt", BIG, DIM, compression=1e6)


# ---------------------------------------------------------------------------------------------- cache
def _warm_cache(table: TTEmbeddingBag, ids: torch.Tensor) -> None:
    """Count ``ids`` as if trained on, then refresh, so some TT rows are served from the cache."""
    unique, counts = torch.unique(ids, return_counts=True)
    is_tt = table.field_group[torch.bucketize(unique, table.starts[1:], right=True)] >= 0
    table.update_state(unique[is_tt], counts[is_tt].to(table.track_counts.dtype))
    table.refresh_cache()
    with torch.no_grad():  # cached rows drift from their TT values, as in training
        table.cache_weight.add_(0.01 * torch.randn_like(table.cache_weight))


def test_cache_admits_hot_rows_without_changing_outputs_and_evicted_rows_return_to_tt():
    table = small_table(cache_rows=4, dtype=torch.float32, refresh_every=1, track_every=1)
    opt = torch.optim.SGD(table.parameters(), lr=0.0)  # lr 0: only the cache logic changes anything
    ec.attach(table, opt)
    hot = torch.tensor([50, 51, 1600, 5000])  # TT ids
    batch = torch.cat([hot.repeat(5), torch.tensor([7, 5300])])[:, None]
    table.eval()
    before = table(batch).detach()
    table.train()
    table(batch).sum().backward()
    opt.step()  # after_optimizer_step: counts, refresh
    assert sorted(table.cache_keys.tolist()) == sorted(hot.tolist())
    assert table.stats.tolist() == [1, 4, 0]
    assert table.training_stats() == {"refreshes": 1, "admitted": 4, "evicted": 0}
    table.eval()
    torch.testing.assert_close(table(batch), before)  # admitted rows start as their TT values
    with torch.no_grad():
        table.cache_weight.add_(1.0)  # learned values
    assert not torch.allclose(table(hot[:, None]), before[:4])
    # a new hot set evicts the old one: evicted ids are served by the TT again (learned values dropped)
    table.train()
    new_hot = torch.tensor([60, 61, 1700, 5200])[:, None].repeat(40, 1)
    for _ in range(30):
        opt.zero_grad()
        table(new_hot).sum().backward()
        opt.step()
    assert sorted(table.cache_keys.tolist()) == [60, 61, 1700, 5200]
    assert table.stats[2].item() == 4
    since = table.training_stats()  # only what happened after the first call
    assert since["evicted"] == 4 and since["refreshes"] == table.stats[0].item() - 1
    table.eval()
    torch.testing.assert_close(table(hot[:, None]), before[:4])


def test_eval_counts_nothing_and_state_dict_carries_cache():
    table = small_table(cache_rows=6, dtype=torch.float32, refresh_every=2, track_every=1)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    ids, offsets, _ = random_bags(64, 3, table.num_embeddings, seed=5)
    for _ in range(4):
        opt.zero_grad()
        table(ids, offsets).pow(2).sum().backward()
        opt.step()
    assert (table.cache_keys != EMPTY).sum() == 6 and table.steps.item() == 4
    table.eval()
    state = {k: v.clone() for k, v in table.state_dict().items()}
    out = table(ids, offsets)
    assert not table._pending
    for k, v in table.state_dict().items():
        assert torch.equal(v, state[k]), k
    other = small_table(cache_rows=6, dtype=torch.float32)
    other.load_state_dict(state)
    other.eval()
    torch.testing.assert_close(other(ids, offsets), out)
    assert torch.equal(other.track_counts, table.track_counts) and torch.equal(other.cache_keys, table.cache_keys)


def test_tracking_every_k_steps_counts_like_every_step():
    # no decay and a tracker that never overflows: merging every 4 steps must give exactly the same counts
    tables = [small_table(cache_rows=6, dtype=torch.float32, refresh_every=4, track_every=k, decay=1.0,
                          tracker_rows=5000) for k in (1, 4)]
    opts = [torch.optim.SGD(t.parameters(), lr=0.0) for t in tables]
    for t, o in zip(tables, opts):
        ec.attach(t, o)
    for step in range(8):
        ids, offsets, _ = random_bags(32, 3, tables[0].num_embeddings, seed=10 + step)
        for t, o in zip(tables, opts):
            t(ids, offsets).sum().backward()
            o.step()
    a, b = tables
    # refreshes at steps 1, 2 (cache warm-up: powers of two below refresh_every), 4 and 8
    assert a.steps.item() == b.steps.item() == 8 and b.stats[0].item() == a.stats[0].item() == 4
    assert torch.equal(a.cache_keys, b.cache_keys) and (a.cache_keys != EMPTY).all()
    order_a, order_b = torch.argsort(a.track_ids), torch.argsort(b.track_ids)
    assert torch.equal(a.track_ids[order_a], b.track_ids[order_b])
    torch.testing.assert_close(a.track_counts[order_a], b.track_counts[order_b])


@pytest.mark.parametrize("warmup", [True, False])
def test_cache_warmup_refreshes_at_powers_of_two_then_every_refresh_every(warmup):
    table = small_table(cache_rows=4, dtype=torch.float32, refresh_every=16, track_every=10, cache_warmup=warmup)
    opt = torch.optim.SGD(table.parameters(), lr=0.0)
    ec.attach(table, opt)
    batch = torch.tensor([50, 51, 1600, 5000] * 2 + [7])[:, None]  # four hot TT ids and a colder one
    refreshed = []
    for step in range(1, 41):
        table(batch).sum().backward()
        opt.step()
        if table.stats[0].item() > len(refreshed):
            refreshed.append(step)
    # after warm-up (and without it) counts are merged every track_every steps, and the cache is refreshed at
    # the first merge past each multiple of refresh_every: steps 16 + 20 = 36; without warm-up 20 and 40
    assert refreshed == ([1, 2, 4, 8, 16, 36] if warmup else [20, 40])
    assert sorted(table.cache_keys.tolist()) == [50, 51, 1600, 5000]


def test_core_scale_is_a_reparametrisation():
    base, scaled = small_table(), small_table(core_scale=4.0)
    torch.testing.assert_close(scaled.core_tensors()[1], base.core_tensors()[1])
    ids = torch.arange(0, base.num_embeddings, 97)
    torch.testing.assert_close(scaled.lookup(ids), base.lookup(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_trains_with_cache():
    table = small_table(cache_rows=6, dtype=torch.float32, refresh_every=1, track_every=1)
    ids, offsets, w = random_bags(64, 3, table.num_embeddings, seed=6)
    table.eval()
    expect = table(ids, offsets, w.float())
    gpu = small_table(cache_rows=6, dtype=torch.float32, refresh_every=1, track_every=1).cuda()
    gpu.load_state_dict(table.state_dict())
    gpu.eval()
    torch.testing.assert_close(gpu(ids.cuda(), offsets.cuda(), w.float().cuda()).cpu(), expect)
    gpu.train()
    opt = torch.optim.SGD(gpu.parameters(), lr=0.1)
    ec.attach(gpu, opt)
    for _ in range(3):
        opt.zero_grad()
        gpu(ids.cuda(), offsets.cuda()).pow(2).sum().backward()
        opt.step()
    assert (gpu.cache_keys != EMPTY).sum().item() == 6 and gpu.cache_keys.is_cuda
