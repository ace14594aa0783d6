"""mpcache: quantisation, stochastic rounding, INT4 packing, cache policy vs an exact simulation, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import embcompress as ec
from embcompress.embeddings import BudgetError
from embcompress.embeddings.mpcache import MPCacheEmbeddingBag, table_bytes
from embcompress.embeddings.ops import hash64_reference
from embcompress.embeddings.quant import (dequantize_rows, pack_int4, quantize_rows, row_bytes, scale_bias_of,
                                          unpack_int4)


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # magnitudes from DLRM-sized (1e-4) to O(1), plus a constant row and a row with one outlier
    x = torch.randn(n, d, generator=g) * torch.logspace(-4, 0, n)[:, None]
    x[0] = 0.25
    x[1, 0] = 50.0
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [16, 7])
def test_nearest_rounding_error_within_half_a_step(bits, d):
    x = _rows(64, d)
    q = quantize_rows(x, bits)
    assert q.dtype == torch.uint8 and q.shape == (64, row_bytes(bits, d))
    scale, _ = scale_bias_of(q, bits, d)
    err = (dequantize_rows(q, bits, d) - x).abs()
    # half a step, plus float32 rounding of x - b and q*s + b
    bound = scale[:, None] / 2 + 1e-6 * x.abs().amax(dim=1, keepdim=True)
    assert torch.all(err <= bound)
    assert torch.all(err[0] == 0)  # a constant row is exact


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    """Each decoded value is lo + s·Bernoulli(p) (s the step), bounded in a range of width s, so by
    Hoeffding P(|mean of K draws - x| >= t) <= 2 exp(-2 K t² / s²). With n values and a union bound at
    failure probability delta: t = s · sqrt(ln(2n / delta) / (2K))."""
    d, k, delta = 16, 4000, 1e-6
    x = _rows(32, d, seed=1)[2:]  # no constant row: every value strictly inside its range
    n = x.numel()
    torch.manual_seed(0)
    q = quantize_rows(x.repeat(k, 1), bits, stochastic=True)  # the K copies share scale and bias
    scale, _ = scale_bias_of(q[: len(x)], bits, d)
    mean = dequantize_rows(q, bits, d).view(k, len(x), d).mean(dim=0)
    t = scale[:, None] * math.sqrt(math.log(2 * n / delta) / (2 * k))
    assert torch.all((mean - x).abs() <= t + 1e-6 * x.abs())
    # the test has power: nearest rounding is off by more than t somewhere
    nearest = dequantize_rows(quantize_rows(x, bits), bits, d)
    assert torch.any((nearest - x).abs() > t)


@pytest.mark.parametrize("bits", [8, 4])
def test_write_back_keeps_the_grid_of_a_row_that_fits(bits):
    d = 16
    x = _rows(32, d, seed=2)[2:]
    q = quantize_rows(x, bits)
    y = dequantize_rows(q, bits, d)
    # lower each row's largest element by one step: the row now spans L - 1 steps of its old grid
    scale, bias = scale_bias_of(q, bits, d)
    top = y.argmax(dim=1)
    y[torch.arange(len(y)), top] -= scale
    kept = quantize_rows(y, bits, stochastic=True, generator=torch.Generator().manual_seed(0), previous=q)
    codes = dequantize_rows(q, bits, d).sub(bias[:, None]).div(scale[:, None]).round()
    codes[torch.arange(len(y)), top] -= 1
    kept_codes = dequantize_rows(kept, bits, d).sub(bias[:, None]).div(scale[:, None]).round()
    assert torch.equal(kept_codes, codes)  # every element on its old code: no rounding noise
    assert torch.equal(scale_bias_of(kept, bits, d)[0], scale)
    # the test has power: a fresh grid (span L - 1 steps stretched to L) moves elements off their codes
    fresh = quantize_rows(y, bits, stochastic=True, generator=torch.Generator().manual_seed(0))
    moved = (dequantize_rows(fresh, bits, d) - y).abs().amax(dim=1) > 0.1 * scale
    assert moved.float().mean() > 0.8
    # rows that leave their grid, or shrink to less than half of it, get a fresh one
    for z in (y * 1.5, y * 0.3):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(quantize_rows(z, bits, True, g1, previous=q), quantize_rows(z, bits, True, g2))


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_on_a_kept_grid_is_unbiased(bits):
    """As test_stochastic_rounding_is_unbiased, on the grid of the rows before a small update."""
    d, k, delta = 16, 4000, 1e-6
    x = _rows(32, d, seed=3)[2:]
    q = quantize_rows(x, bits)
    scale, _ = scale_bias_of(q, bits, d)
    y = dequantize_rows(q, bits, d)
    g = torch.Generator().manual_seed(4)
    moved = y + (torch.rand(y.shape, generator=g) - 0.5) * scale[:, None] * 0.2  # updates of at most a tenth of a step
    lo, hi = y.amin(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)
    moved = torch.minimum(torch.maximum(moved, lo), hi)  # stay inside the grid
    torch.manual_seed(0)
    out = quantize_rows(moved.repeat(k, 1), bits, stochastic=True, previous=q.repeat(k, 1))
    assert torch.equal(scale_bias_of(out[: len(x)], bits, d)[0], scale)  # the grid was kept
    mean = dequantize_rows(out, bits, d).view(k, len(x), d).mean(dim=0)
    t = scale[:, None] * math.sqrt(math.log(2 * moved.numel() / delta) / (2 * k))
    assert torch.all((mean - moved).abs() <= t + 1e-6 * moved.abs())


@pytest.mark.parametrize("d", [1, 2, 15, 16])
def test_int4_packing_round_trip(d):
    codes = torch.randint(0, 16, (11, d), dtype=torch.uint8, generator=torch.Generator().manual_seed(d))
    packed = pack_int4(codes)
    assert packed.shape == (11, (d + 1) // 2)
    assert torch.equal(unpack_int4(packed, d), codes)
    # FBGEMM's order: element 2j in the low nibble of byte j
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21


def test_fbgemm_decodes_our_rows():
    pytest.importorskip("fbgemm_gpu")
    x = _rows(32, 16)
    q8 = quantize_rows(x, 8)
    torch.testing.assert_close(torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(q8), dequantize_rows(q8, 8, 16))
    q4 = quantize_rows(x, 4)
    torch.testing.assert_close(torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q4, 4),
                               dequantize_rows(q4, 4, 16))


# ---------------------------------------------------------------------------- cache policy
def simulate(batches, capacity, policy, depth=2, reset=10, width=1):
    """Exact replay of the documented rule with dicts: returns (hit lookups, lookups, final cache ids)."""
    cache: dict[int, int] = {}
    columns = capacity * width
    sketch = [[0] * columns for _ in range(depth)]
    mass = hits = total = 0

    def col(i, r):  # rows 2j and 2j+1: low 31 and high 32 bits of one hash with seed j
        h = hash64_reference(i, r // 2)
        return (h & 0x7FFFFFFF if r % 2 == 0 else h >> 31) % columns

    def est(i):
        return min(sketch[r][col(i, r)] for r in range(depth))

    for step, batch in enumerate(batches, start=1):
        ids, counts = np.unique(batch, return_counts=True)
        ids, counts = [int(i) for i in ids], [int(c) for c in counts]
        hits += sum(c for i, c in zip(ids, counts) if i in cache)
        total += sum(counts)
        new = [i for i in ids if i not in cache]
        if policy == "lru":
            for i in ids:
                if i in cache:
                    cache[i] = step
            keys = {i: step for i in new}
        else:
            for i, c in zip(ids, counts):
                for r in range(depth):
                    sketch[r][col(i, r)] += c
            mass += sum(counts)
            if mass >= reset * columns:
                sketch = [[v // 2 for v in row] for row in sketch]
                mass = 0
            cache = {i: est(i) for i in cache}
            keys = {i: est(i) for i in new}
        ranked = sorted([(-k, 0, i) for i, k in cache.items()] + [(-k, 1, i) for i, k in keys.items()])
        cache = {i: -k for k, _, i in ranked[:capacity]}
    return hits, total, set(cache)


@pytest.mark.parametrize("kernels", ["native", "pytorch"])
@pytest.mark.parametrize("policy,depth,width", [("lfu", 2, 1), ("lfu", 3, 1), ("lfu", 2, 8), ("lru", 2, 1)])
def test_cache_hit_rate_matches_exact_simulation(policy, depth, width, kernels, monkeypatch):
    """(On the compiled count-min sketch where a compiler exists, and on the PyTorch one.)"""
    if kernels == "pytorch":
        monkeypatch.setenv("EMBCOMPRESS_NATIVE", "0")
    n, capacity, steps, batch = 3000, 60, 80, 48
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    perm = rng.permutation(n)  # hot ids scattered over the id space
    batches = [perm[rng.choice(n, size=batch, p=p / p.sum())] for _ in range(steps)]
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([1000, 2000], 4, precision="int8", cache_rows=capacity, policy=policy,
                                sketch_depth=depth, sketch_width=width)
    opt = torch.optim.SGD(table.parameters(), lr=0.05)
    ec.attach(table, opt)
    half = steps // 2
    for i, b in enumerate(batches):
        if i == half:
            first = table.training_stats()
            hits_first = int(table.stats[1])
        opt.zero_grad()
        table(torch.from_numpy(b).long()[:, None]).pow(2).sum().backward()
        opt.step()
    hits, total, cached = simulate(batches, capacity, policy, depth, width=width)
    # training_stats: the hit rate of the lookups since the previous call
    assert first == {"cache_hit_rate": pytest.approx(hits_first / (half * batch))}
    assert table.training_stats() == {"cache_hit_rate": pytest.approx((hits - hits_first) / ((steps - half) * batch))}
    assert table.training_stats() == {}  # nothing looked up since
    assert int(table.stats[2]) == total == steps * batch
    assert int(table.stats[1]) == hits
    assert set(table.cache_ids[table.cache_ids < n].tolist()) == cached
    assert torch.all(table.cache_ids[:-1] <= table.cache_ids[1:])  # index stays sorted
    assert sorted(table.cache_slots.tolist()) == list(range(capacity))  # every slot used once
    assert table.hit_rate() > 0.3  # 2% of rows serve a good share of a Zipf stream


# ---------------------------------------------------------------------------- training semantics
def test_rows_are_updated_in_their_precision():
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([100], 8, precision="int8", cache_rows=1, policy="lru")
    opt = torch.optim.SGD(table.parameters(), lr=0.5)
    ec.attach(table, opt)
    ids = torch.tensor([[3], [3], [7]])
    x3, x7 = table.dequantized(torch.tensor([3, 7]))
    opt.zero_grad()
    table(ids).sum().backward()  # d/drow = count of the id
    opt.step()
    # id 3 (used twice) wins the single cache slot and moves in with its exact float update
    assert table.cache_ids.tolist() == [3]
    torch.testing.assert_close(table.cache_weight[0], x3 - 0.5 * 2)
    # id 7 stays quantised: within one quantisation step of its float update (stochastic rounding)
    scale, _ = scale_bias_of(table.codes[7:8], 8, 8)
    assert torch.all((table.dequantized(torch.tensor([7]))[0] - (x7 - 0.5)).abs() <= scale + 1e-6)
    # next step id 7 evicts id 3 (LRU); 3 is written back within one step of its float value
    before = table.cache_weight[0].detach().clone()
    opt.zero_grad()
    table(torch.tensor([[7]])).sum().backward()
    opt.step()
    assert table.cache_ids.tolist() == [7]
    scale3, _ = scale_bias_of(table.codes[3:4], 8, 8)
    assert torch.all((table.dequantized(torch.tensor([3]))[0] - before).abs() <= scale3 + 1e-6)
    assert table.state_dict()["cache_weight"].shape == (1, 8)  # the cache, not the staging workspace


def test_eval_reads_cache_and_changes_nothing():
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([50], 4, precision="int4", cache_rows=5)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    ids = torch.arange(10)[:, None]
    for _ in range(3):
        opt.zero_grad()
        table(ids).sum().backward()
        opt.step()
    table.eval()
    state = {k: v.clone() for k, v in table.state_dict().items()}
    out = table(ids)
    cached = table.cache_ids[table.cache_ids < 50]
    torch.testing.assert_close(out[cached], table.cache_weight[table.cache_slots[:len(cached)]].detach())
    for k, v in table.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------- memory and budget
@pytest.mark.parametrize("dim,ratio", [(16, 2.025), (64, 2.870), (128, 3.084)])
def test_memory_accounting_int8_with_5_percent_cache(dim, ratio):
    """INT8 + 5% LFU cache, a cache row costing 4·D + 24 + 4·2·8 (sketch) bytes: 64/(24 + 0.05·152) = 2.03x
    at D=16; 256/(72 + 0.05·344) = 2.87x at D=64; 512/(136 + 0.05·600) = 3.08x at D=128, the first of
    these to reach the paper's 3x (with TinyLFU's one sketch column per cache row D = 64 gives 2.96x)."""
    fields = [20, 980, 19000]
    table = MPCacheEmbeddingBag(fields, dim, precision="int8", cache_fraction=0.05)
    n = sum(fields)
    assert table.num_cache_rows == n // 20
    expected = n * (dim + 8) + n // 20 * (4 * dim + 24 + 64) + 32
    assert table.memory_bytes() == expected == table_bytes(n, dim, 8, n // 20)
    assert table.compression_ratio() == pytest.approx(ratio, abs=1e-3)


def test_int4_accounting_and_budget_errors():
    fields = [1000, 99000]
    t4 = MPCacheEmbeddingBag(fields, 64, precision="int4", cache_fraction=0.01)
    assert t4.memory_bytes() == 100000 * 36 + 1000 * (256 + 24 + 64) + 32  # 6.49x
    with pytest.raises(BudgetError, match="reachable ratios"):
        ec.make_table("mpcache", fields, 16, compression=10, precision="int8")
    with pytest.raises(BudgetError, match="reachable ratios"):
        ec.make_table("mpcache", fields, 16, compression=10)  # INT4 tops out at 64/12 = 5.3x
    # auto: INT8 while its 5% cache fits, then INT4; the cache fills the rest of the budget
    t = ec.make_table("mpcache", fields, 16, compression=2)
    assert t.precision == "int8" and t.num_cache_rows > 5000
    t = ec.make_table("mpcache", fields, 16, compression=4)
    assert t.precision == "int4" and t.num_cache_rows > 0
    for t in (t, ec.make_table("mpcache", fields, 16, compression=2.0, precision="int8", cache_fraction=0.05)):
        budget = ec.full_table_bytes(fields, 16) / (2.0 if t.precision == "int8" else 4)
        assert 0.9 * budget <= t.memory_bytes() <= budget


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_trains_without_a_cache(precision):
    """With no cache every update goes through dequantise -> SGD -> stochastic requantise."""
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([100], 8, precision=precision, cache_rows=0)
    opt = torch.optim.SGD(table.parameters(), lr=0.5)
    ec.attach(table, opt)
    ids, target = torch.arange(20)[:, None], torch.randn(20, 8)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (table(ids) - target).pow(2).sum(dim=1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert table.memory_bytes() == 100 * (16 if precision == "int8" else 8) + 32


# ---------------------------------------------------------------------------- optimizer state follows the row
def _accumulator(table, opt, n):
    """Adagrad's accumulator of every row, wherever the row lives now: its cache slot or the store."""
    store = table.optstate_sum
    acc = store.clone() if store.dim() == 2 else store[:, None].expand(-1, table.embedding_dim).clone()
    cached = table.cache_ids < n
    acc[table.cache_ids[cached]] = opt.state[table.cache_weight]["sum"][table.cache_slots[cached]]
    return acc


@pytest.mark.parametrize("mode", ["element", "row"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_adagrad_state_follows_rows_through_staging_and_cache(mode, policy):
    """Rows move between staging slots and a small cache (admissions and evictions every step); each
    row's accumulator must still be init + the sum of its own squared gradients (``row``: the mean over
    D, which is what row-wise Adagrad keeps). Per-slot state (``slot``) fails this check."""
    n, d, init = 40, 4, 0.1
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([n], d, precision="int8", cache_rows=5, policy=policy, optimizer_state=mode)
    opt = torch.optim.Adagrad(table.parameters(), lr=0.01, initial_accumulator_value=init)
    ec.attach(table, opt)
    expected = torch.full((n, d), init)
    for _ in range(25):
        ids = torch.from_numpy(rng.choice(n, size=12)).long()
        w = torch.randn(12, d)
        opt.zero_grad()
        (table(ids[:, None]) * w).sum().backward()
        opt.step()
        grad = torch.zeros(n, d).index_add_(0, ids, w)  # d loss / d row
        expected += grad.pow(2)
    acc = _accumulator(table, opt, n)
    if mode == "row":
        acc, expected = acc.mean(dim=1), expected.mean(dim=1)
    torch.testing.assert_close(acc, expected)
    assert table.memory_bytes() == table_bytes(n, d, 8, 5, policy)  # the store is optimizer state, not counted


def test_slot_state_does_not_follow_rows():
    """The check above has power: with per-slot state a row's accumulator is not its own."""
    n, d = 40, 4
    rng = np.random.default_rng(0)
    table = MPCacheEmbeddingBag([n], d, precision="int8", cache_rows=5, policy="lru", optimizer_state="slot")
    opt = torch.optim.Adagrad(table.parameters(), lr=0.01)
    ec.attach(table, opt)
    for _ in range(10):
        ids = torch.from_numpy(rng.choice(n, size=12)).long()
        opt.zero_grad()
        table(ids[:, None]).sum().backward()
        opt.step()
    assert not hasattr(table, "optstate_sum")
    # staging slot 0 served a (different) row at every step: its accumulator counts all 10 steps
    staged_sum = opt.state[table.cache_weight]["sum"][table.num_cache_rows, 0].item()
    assert staged_sum >= 10


def test_optimizer_state_store_survives_a_checkpoint():
    torch.manual_seed(0)
    fields = [30, 70]
    table = MPCacheEmbeddingBag(fields, 4, precision="int4", cache_rows=3)
    opt = torch.optim.Adagrad(table.parameters(), lr=0.05)
    ec.attach(table, opt)
    for _ in range(3):
        opt.zero_grad()
        table(torch.randint(0, 100, (16, 1))).pow(2).sum().backward()
        opt.step()
    fresh = MPCacheEmbeddingBag(fields, 4, precision="int4", cache_rows=3)
    fresh.load_state_dict(table.state_dict())
    assert torch.equal(fresh.optstate_sum, table.optstate_sum)


@pytest.mark.parametrize("mode", ["element", "row"])
def test_with_every_row_cached_training_equals_full(mode):
    """Once every row is cached nothing is quantised again, so from the same (dequantised) start an
    mpcache table trains exactly like ``full`` under Adagrad: a row's first update happens in staging with
    the row's own (fresh) state, and the row then moves into the cache with that state."""
    n, d = 200, 8
    torch.manual_seed(0)
    mp = MPCacheEmbeddingBag([n], d, precision="int8", cache_fraction=1.0, policy="lru", optimizer_state=mode)
    full = ec.make_table("full", [n], d, compression=1)
    with torch.no_grad():
        full.weight.copy_(mp.dequantized(torch.arange(n)))
    o_mp, o_full = torch.optim.Adagrad(mp.parameters(), lr=0.05), torch.optim.Adagrad(full.parameters(), lr=0.05)
    ec.attach(mp, o_mp)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        ids, w = torch.randint(0, n, (64, 1), generator=g), torch.randn(64, d, generator=g)
        for table, opt in ((mp, o_mp), (full, o_full)):
            opt.zero_grad()
            (table(ids) * w).sum().backward()
            opt.step()
    mp.eval()
    torch.testing.assert_close(mp(torch.arange(n)[:, None]), full(torch.arange(n)[:, None]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- cached rows found through their stored row
def _trained(precision, dim, cache_rows, policy="lfu"):
    """A table after steps with admissions and evictions every step."""
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([300, 500], dim, precision=precision, cache_rows=cache_rows, policy=policy)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    g = torch.Generator().manual_seed(2)
    for _ in range(12):
        ids = (torch.rand(64, generator=g) ** 3 * 800).long()
        opt.zero_grad()
        table(ids[:, None]).pow(2).sum().backward()
        opt.step()
    return table


def _reference_rows(table):
    """Every id's row from the sorted cache index and the stored rows (markers undone)."""
    n = table.num_embeddings
    rows = dequantize_rows(table._unmarked(table.codes.clone()), table.bits, table.embedding_dim)
    cached = table.cache_ids < n
    rows[table.cache_ids[cached]] = table.cache_weight.detach()[table.cache_slots[cached]]
    return rows


@pytest.fixture(params=["native", "pytorch"])
def lookup_kernel(request, monkeypatch):
    """The eval lookup on the compiled kernel (where a compiler exists) and on the PyTorch path."""
    from embcompress.embeddings.mpcache import lookup_op

    if request.param == "pytorch":
        monkeypatch.setenv("EMBCOMPRESS_NATIVE", "0")
    elif lookup_op() is None:
        pytest.skip("no C++ compiler: the compiled lookup is not built")
    return request.param


@pytest.mark.parametrize("precision,dim", [("int8", 16), ("int8", 6), ("int4", 7), ("int4", 4), ("int4", 32)])
def test_eval_lookup_matches_cache_and_stored_rows(precision, dim, lookup_kernel):
    """The eval path (slot read from the stored row; the compiled pass, or PyTorch's quantized
    embedding_bag for the uncached rows) returns what the sorted cache index and the dequantised rows
    say, for one-id bags, pooled bags with weights, and mean pooling."""
    table = _trained(precision, dim, cache_rows=40)
    assert table._marked and int((table.cache_ids < 800).sum()) == 40
    ref = _reference_rows(table)
    table.eval()
    ids = torch.arange(800)
    torch.testing.assert_close(table(ids[:, None]), ref)
    flat = torch.randint(0, 800, (50,), generator=torch.Generator().manual_seed(3))
    offsets = torch.tensor([0, 3, 3, 20, 49])
    w = torch.rand(50, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.embedding_bag(flat, ref, offsets, mode="sum", per_sample_weights=w)
    torch.testing.assert_close(table(flat, offsets, w), expected)
    torch.testing.assert_close(table(ids[:, None], per_sample_weights=w[:1].expand(800, 1)), ref * w[0])
    torch.testing.assert_close(table(ids.int()[:, None]), ref)
    table.mode = "mean"
    torch.testing.assert_close(table(flat, offsets), torch.nn.functional.embedding_bag(flat, ref, offsets, mode="mean"))
    assert table(flat[:0], torch.tensor([0, 0])).shape == (2, dim) and not table(flat[:0], torch.tensor([0, 0])).any()
    # the hit mask and slots agree with the sorted index for every id
    hit, slot = table._cached(ids)
    cached = table.cache_ids < 800
    assert torch.equal(hit.nonzero().squeeze(1), table.cache_ids[cached])
    assert torch.equal(slot[hit], table.cache_slots[cached])


@pytest.mark.parametrize("precision,dim", [("int8", 16), ("int4", 7)])
def test_marking_keeps_scale_and_bias_for_the_write_back(precision, dim):
    """A cached row's stored scale and bias come back unchanged when the marker is undone, so an evicted
    row is written back on the grid it had before it was cached."""
    table = MPCacheEmbeddingBag([100], dim, precision=precision, cache_rows=10)
    before = table.codes.clone()
    ids = torch.tensor([3, 50, 99])
    table._mark(ids, torch.tensor([7, 0, 9]))
    assert not torch.equal(table.codes, before)
    width = dim if precision == "int8" else (dim + 1) // 2
    restored = table._unmarked(table.codes.clone())
    assert torch.equal(restored[:, width:], before[:, width:])
    others = torch.ones(100, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(restored[others], before[others])


def test_checkpoint_without_markers_loads_and_looks_up_alike():
    table = _trained("int8", 16, cache_rows=40)
    table.eval()
    out = table(torch.arange(800)[:, None])
    for unmark in (False, True):  # this version's state, and stored rows saved without markers
        state = table.state_dict()
        if unmark:
            state["codes"] = table._unmarked(state["codes"].clone())
        fresh = MPCacheEmbeddingBag([300, 500], 16, precision="int8", cache_rows=40)
        fresh.load_state_dict(state)
        fresh.eval()
        torch.testing.assert_close(fresh(torch.arange(800)[:, None]), out)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [16, 7, 32, 5])
def test_compiled_lookup_decodes_stored_rows_as_dequantize(bits, dim, lookup_kernel):
    """Without a cache every lookup decodes its stored row: code * scale + bias in float32, fp16 scale and
    bias (subnormal ones too: the rows span 1e-4 to 1) for INT4, as quant.dequantize_rows."""
    table = MPCacheEmbeddingBag([40, 24], dim, precision=f"int{bits}", cache_rows=0)
    table.codes.copy_(quantize_rows(_rows(64, dim), bits))
    table.eval()
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    expected = dequantize_rows(table.codes, bits, dim)[ids]
    torch.testing.assert_close(table(ids[:, None]), expected, rtol=1e-6, atol=0)


def test_compiled_lookup_baseline_version_gives_the_same_rows():
    """The kernel is also compiled for AVX2 where the CPU has it; its baseline version gives the same
    rows (one-id bags, pooled weighted bags) on the same table."""
    from embcompress.embeddings import mpcache

    op = mpcache.lookup_op()
    if op is None:
        pytest.skip("no C++ compiler: the compiled lookup is not built")
    lib = mpcache.native.load(mpcache.Path(mpcache.__file__).with_name("mpcache_native.cpp"))
    table = _trained("int4", 32, cache_rows=40)
    table.eval()
    ids = torch.randint(0, 800, (500,), generator=torch.Generator().manual_seed(6))
    offsets, w = torch.tensor([0, 7, 7, 300]), torch.rand(500)
    best = table(ids[:, None]), table(ids, offsets, w)
    lib.mpcache_baseline_only(1)
    try:
        baseline = table(ids[:, None]), table(ids, offsets, w)
    finally:
        lib.mpcache_baseline_only(0)
    for a, b in zip(best, baseline):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_compiled_lookup_rejects_bad_ids_and_offsets(lookup_kernel):
    table = _trained("int8", 16, cache_rows=40)
    table.eval()
    with pytest.raises(ValueError, match="outside the valid range"):
        table(torch.tensor([[3], [800]]))
    table.validate_ids = False  # the kernel still never reads outside the table
    if lookup_kernel == "native":
        with pytest.raises(IndexError, match="id -1 is outside"):
            table(torch.tensor([[3], [-1]]))
        with pytest.raises(ValueError, match="offsets"):
            table(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))


def test_lookup_op_agrees_with_its_shape_function():
    """torch.library.opcheck: schema, fake (tracing) kernel and real kernel agree."""
    from embcompress.embeddings.mpcache import lookup_op

    if lookup_op() is None:
        pytest.skip("no C++ compiler: the compiled lookup is not built")
    op = torch.ops.embcompress.mpcache_lookup.default
    table = _trained("int8", 16, cache_rows=40)
    marks = (table._marker_byte, table._slot_at, table._slot_bytes)
    ids = torch.randint(0, 800, (30,), generator=torch.Generator().manual_seed(5))
    cache = table.cache_weight.detach()
    for offsets, weights, mean in ((None, None, False), (torch.tensor([0, 4, 4, 17]), torch.rand(30), False),
                                   (torch.tensor([0, 9]), None, True)):
        torch.library.opcheck(op, (table.codes, cache, ids, offsets, weights, 16, 8, *marks, mean))
    torch.testing.assert_close(op(table.codes, cache, ids.int(), None, None, 16, 8, *marks, False),
                               _reference_rows(table)[ids])  # int32 ids


def test_lookup_falls_back_without_a_compiler(monkeypatch, tmp_path):
    from embcompress.embeddings import mpcache, native

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EMBCOMPRESS_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    assert mpcache.lookup_op() is None
    table = _trained("int8", 16, cache_rows=40)
    table.eval()
    torch.testing.assert_close(table(torch.arange(800)[:, None]), _reference_rows(table))


# ---------------------------------------------------------------------------- training step's compiled parts
@pytest.mark.parametrize("broadcast", [False, True])
def test_accumulate_sums_as_index_add(broadcast):
    """The compiled backward of the ids' gather rounds each row's sum exactly as ``index_add_`` does."""
    from embcompress.embeddings.mpcache import _accumulate, _library

    if _library() is None:
        pytest.skip("no C++ compiler: the compiled sum is not built")
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 50, (4000,), generator=g)
    grad = torch.randn(1 if broadcast else 4000, 6, generator=g) * torch.logspace(-6, 3, 6)
    grad = grad.expand(4000, 6) if broadcast else grad
    expected = torch.zeros(50, 6).index_add_(0, index, grad)
    assert torch.equal(_accumulate(grad, index, 50), expected)


def _train_state(policy, steps=15, precision="int8", dim=8, optimizer=torch.optim.Adagrad, sort_ids=False):
    """state_dict after training steps with admissions and evictions; ``sort_ids``: each step's ids
    deduplicated by one sort (the base class's way, kept for tables without markers) instead of by markers."""
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag([300, 500], dim, precision=precision, cache_rows=30, policy=policy)
    assert table._marked
    if sort_ids:
        from embcompress.embeddings.mpcache import _Gather

        def by_sort(ids):
            unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            return _Gather.apply(table.lookup_unique(unique, counts), inverse)
        table._rows_by_marker = by_sort
    opt = optimizer(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    g = torch.Generator().manual_seed(4)
    for step in range(steps):
        ids = (torch.rand(256, generator=g) ** 3 * 800).long()
        w = torch.randn(256, dim, generator=g)
        opt.zero_grad()
        if step % 3 == 2:  # two forwards in one step, one with per-sample weights; disjoint ids, since
            # a row with gradients from both is updated from an uncoalesced sparse gradient, whose rounding
            # PyTorch's add_ ties to the order of its entries (by id when sorted, by row with the markers)
            psw = torch.rand(128, 1, generator=g)
            ((table(ids[:128, None] % 400, per_sample_weights=psw) * w[:128]).sum()
             + (table(ids[128:, None] % 400 + 400) * w[128:]).sum()).backward()
        else:
            (table(ids[:, None]) * w).sum().backward()
        opt.step()
    return table.state_dict()


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_training_is_bitwise_the_same_with_and_without_compiled_kernels(policy, monkeypatch):
    """The compiled step (gather backward, sketch) changes no bit of the table against the PyTorch path."""
    native_state = _train_state(policy)
    monkeypatch.setenv("EMBCOMPRESS_NATIVE", "0")
    torch_state = _train_state(policy)
    assert native_state.keys() == torch_state.keys()
    for key, value in native_state.items():
        assert torch.equal(value, torch_state[key]), key


@pytest.mark.parametrize("policy,precision,dim,optimizer", [("lfu", "int8", 8, torch.optim.SGD),
                                                            ("lru", "int8", 8, torch.optim.Adagrad),
                                                            ("lfu", "int4", 5, torch.optim.Adagrad)])
def test_dedup_by_markers_trains_bitwise_as_dedup_by_sort(policy, precision, dim, optimizer):
    """Deduplicating a step's ids through the cached rows' markers (the default for one id per bag)
    gives the table bit for bit the state of deduplicating them by sorting."""
    by_markers = _train_state(policy, precision=precision, dim=dim, optimizer=optimizer)
    by_sort = _train_state(policy, precision=precision, dim=dim, optimizer=optimizer, sort_ids=True)
    for key, value in by_markers.items():
        assert torch.equal(value, by_sort[key]), key
