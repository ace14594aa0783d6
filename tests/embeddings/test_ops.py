import torch
from hypothesis import given, settings, strategies as st

import pytest

from embcompress.embeddings.hashing import HashEmbeddingBag
from embcompress.embeddings.ops import (allocate, allocate_rows, allocate_rows_proportional, fewest_rows,
                                        field_of, field_starts, hash64, hash64_reference, topk_ties_first,
                                        whole_field_max)
from embcompress.embeddings.qr import QREmbeddingBag, largest_remainder, plan_field, smallest_qr


@given(st.lists(st.integers(0, 2**62), min_size=1, max_size=20), st.integers(0, 5))
@settings(max_examples=50, deadline=None)
def test_hash64_matches_reference(xs, seed):
    got = hash64(torch.tensor(xs), seed).tolist()
    assert got == [hash64_reference(x, seed) for x in xs]
    assert all(0 <= g < 2**63 for g in got)


def test_hash64_spreads_sequential_ids():
    buckets = hash64(torch.arange(100_000)) % 100
    counts = torch.bincount(buckets, minlength=100).float()
    # each bucket expects 1000 ids; a plain modulo would give exactly 1000, a bad hash far off
    assert counts.min() > 850 and counts.max() < 1150
    assert not torch.equal(hash64(torch.arange(10), 0), hash64(torch.arange(10), 1))


def test_field_of():
    starts = field_starts([3, 5, 2])
    assert field_of(torch.tensor([0, 2, 3, 7, 8, 9]), starts).tolist() == [0, 0, 1, 1, 2, 2]


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=12), st.data())
@settings(max_examples=80, deadline=None)
def test_allocate_rows(sizes, data):
    total = data.draw(st.integers(len(sizes), sum(sizes)))
    rows = allocate_rows(sizes, total)
    assert sum(rows) == total
    assert all(1 <= r <= n for r, n in zip(rows, sizes))
    # small fields stay whole before any large field gets more rows than they have
    cap = max(r for r, n in zip(rows, sizes) if r < n) if any(r < n for r, n in zip(rows, sizes)) else None
    if cap is not None:
        assert all(r == n for r, n in zip(rows, sizes) if n < cap - 1)


@given(st.lists(st.integers(1, 100_000), min_size=1, max_size=12), st.data())
@settings(max_examples=80, deadline=None)
def test_allocate_rows_proportional(sizes, data):
    whole = [n for n in sizes if n <= whole_field_max(sum(sizes), sizes)]
    need = sum(whole) + len(sizes) - len(whole)
    if need > sum(sizes):
        return
    total = data.draw(st.integers(need, sum(sizes)))
    rows = allocate_rows_proportional(sizes, total)
    assert sum(rows) == total
    assert all(1 <= r <= n for r, n in zip(rows, sizes))
    small = whole_field_max(total, sizes)
    assert all(r == n for r, n in zip(rows, sizes) if n <= small)
    # one ratio for every compressed field: a larger field never gets fewer rows, but for the one leftover
    # row a smaller field may have received
    big = [(n, r) for n, r in zip(sizes, rows) if n > small]
    for (n1, r1) in big:
        for (n2, r2) in big:
            if n1 >= n2:
                assert r1 >= r2 - 1


def test_proportional_is_the_cafe_artifacts_baseline():
    kaggle = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
              27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
    total = sum(kaggle) // 10_000
    rows = allocate_rows_proportional(kaggle, total)
    assert sum(rows) == total
    assert round(whole_field_max(total, kaggle)) == 28
    assert rows[kaggle.index(24)] == 24 and rows[kaggle.index(2173)] == 1  # whole / one row
    assert abs(rows[2] / kaggle[2] - rows[3] / kaggle[3]) < 2e-6  # the same ratio for large fields
    capped = allocate_rows(kaggle, total)
    assert capped[kaggle.index(2173)] > 100  # the default keeps far more rows for mid-size fields
    with pytest.raises(ValueError, match="whole"):
        allocate_rows_proportional(kaggle, 40)
    with pytest.raises(ValueError, match="allocation"):
        allocate(kaggle, total, "uniform")


@given(st.lists(st.integers(1, 100_000), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_fewest_rows_is_the_fewest_each_rule_can_split(sizes):
    for rule in ("capped", "proportional"):
        fewest = fewest_rows(sizes, rule)
        if fewest > sum(sizes):
            continue
        assert sum(allocate(sizes, fewest, rule)) == fewest
        if fewest > 1:
            with pytest.raises(ValueError):
                allocate(sizes, fewest - 1, rule)


def test_hash_allocation_option():
    sizes = [10, 5000, 200_000]
    budget = 2000 * 4 * 4
    default = HashEmbeddingBag.from_budget_bytes(sizes, 4, budget)
    prop = HashEmbeddingBag.from_budget_bytes(sizes, 4, budget, allocation="proportional")
    assert default.rows.tolist() == allocate_rows(sizes, default.rows.sum().item())
    assert prop.rows.tolist() == allocate_rows_proportional(sizes, prop.rows.sum().item())
    assert prop.rows.sum() == default.rows.sum() and prop.rows.tolist() != default.rows.tolist()
    with pytest.raises(ValueError, match="allocation"):
        HashEmbeddingBag.from_budget_bytes(sizes, 4, budget, allocation="even")
    # the smallest reachable table: every field one row (capped), small fields whole (proportional)
    assert HashEmbeddingBag.byte_range(sizes, 4)[0] < HashEmbeddingBag.byte_range(sizes, 4, allocation="proportional")[0]


@given(st.integers(1, 10**7), st.integers(2, 10**5))
@settings(max_examples=100, deadline=None)
def test_qr_plan_fits_and_is_maximal(n, rows):
    v, m = plan_field(n, rows)
    assert 1 <= m <= v <= n
    used = m + -(-v // m)
    assert used <= max(rows, smallest_qr(v)[0])
    if v == n and rows <= n:
        assert largest_remainder(n, rows) == m
        assert m == n or m + 1 + -(-n // (m + 1)) > rows


def test_qr_pairs_are_unique_within_a_field():
    table = QREmbeddingBag([1000], 4, remainders=[37])
    ids = torch.arange(1000)
    q, r = ids // 37, ids % 37
    assert len(set(zip(q.tolist(), r.tolist()))) == 1000
    # and embeddings differ for ids sharing a remainder
    out = table(ids.view(-1, 1))
    assert not torch.allclose(out[0], out[37])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0, 2.0, 3.5, 1e30, float("inf")]), max_size=40),
       st.integers(0, 45), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_topk_ties_first_is_topk_with_ties_to_the_lower_position(vals, k, largest, dtype):
    """Against a plain Python sort by (value, position): many ties, -0.0, +inf, k beyond the length, and
    float64 (the stable-sort path)."""
    got = topk_ties_first(torch.tensor(vals, dtype=dtype), k, largest=largest).tolist()
    want = sorted(range(len(vals)), key=lambda i: (-vals[i] if largest else vals[i], i))[:k]
    assert got == want


def test_topk_ties_first_takes_the_sort_path_for_negative_values():
    vals = torch.tensor([-1.0, 2.0, -1.0, 2.0, 0.0])
    assert topk_ties_first(vals, 3).tolist() == [1, 3, 4]
    assert topk_ties_first(vals, 3, largest=False).tolist() == [0, 2, 4]
