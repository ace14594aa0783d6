"""The ``cafe`` and ``cafe-ml`` tables: budget split, importance, migration, tiers, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

import embcompress as ec
from embcompress.embeddings.cafe import CafeEmbeddingBag, reference_hash_rate
from embcompress.embeddings.hotsketch import HotSketch
from embcompress.embeddings.ops import field_of

FIELDS = [4, 50, 20_000, 50_000]
DIM = 8


def table(method: str = "cafe", ratio: float = 10, **options) -> CafeEmbeddingBag:
    torch.manual_seed(0)
    return ec.make_table(method, FIELDS, DIM, compression=ratio, **options)


def big_ids(n: int, gen: torch.Generator) -> torch.Tensor:
    """Ids of the two hashed fields, (n, 1)."""
    return torch.randint(54, sum(FIELDS), (n, 1), generator=gen)


def step(t: CafeEmbeddingBag, ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    t.train()
    out = t(ids)
    (out if weights is None else out * weights[:, None]).sum().backward()
    t.before_optimizer_step()
    return out.detach()


def test_reference_hash_rate_by_nearest_ratio():
    assert reference_hash_rate(10) == 0.5
    assert reference_hash_rate(100) == 0.3
    assert reference_hash_rate(1000) == 0.2
    assert reference_hash_rate(10000) == 0.1
    assert reference_hash_rate(80) == 0.3  # 100x is nearer than 50x in log scale


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
def test_budget_built_sketch_has_the_declared_threshold_and_hysteresis_and_takes_overrides(method):
    """T and the preemption margin are the declared defaults at every ratio (not the artifact's T per
    ratio); options replace them, and hysteresis 1/0.98 is exactly the one-decay margin of ``None``."""
    declared = {o.name: o.default for o in CafeEmbeddingBag.OPTIONS}
    for ratio in (10, 100, 1000):
        t = table(method, ratio)
        assert t.sketch.threshold == declared["threshold"] == 10.0
        assert t.sketch.preempt_margin == 1 / declared["hysteresis"] == 0.5
    t = table(method, ratio=100)
    t2 = table(method, ratio=100, threshold=7, decay=0.9, hash_rate=0.6, importance="frequency", hysteresis=1.5)
    assert (t2.sketch.threshold, t2.sketch.decay, t2.importance) == (7, 0.9, "frequency")
    assert t2.sketch.preempt_margin == 1 / 1.5
    assert t2.num_hash_rows > t.num_hash_rows  # a larger hash_rate buys hash rows with hot rows
    one_decay = table(method, ratio=100, hysteresis=1.0204081632653061).sketch
    assert one_decay.preempt_margin == HotSketch(1, 1, 5.0, hysteresis=None).preempt_margin


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
def test_a_budget_too_small_for_hash_rate_warns_and_spends_every_byte(method, caplog):
    with caplog.at_level("WARNING", logger="embcompress.embeddings.cafe"):
        table(method, 1000)
    assert not caplog.records
    for ratio in (2000, 3000, 4000):  # 1,120 to 560 bytes: hash_rate 0.1 buys fewer rows than the 4 fields need
        caplog.clear()
        with caplog.at_level("WARNING", logger="embcompress.embeddings.cafe"):
            t = table(method, ratio)  # BudgetError unless it lands within 10% under the budget
        budget = ec.full_table_bytes(FIELDS, DIM) / ratio
        (record,) = caplog.records
        assert f"{method}: {int(budget)} bytes cannot honour hash_rate=0.1" in record.getMessage()
        assert f"leaving {t.num_hot_rows} hot rows" in record.getMessage()
        assert budget - DIM * 4 < t.memory_bytes() <= budget  # no hash row's worth of bytes left unspent


@pytest.mark.parametrize("source", ["hash", "shared", "hot"])
def test_cafe_ml_layouts_land_in_budget_down_to_the_bottom_of_their_range(source):
    lo, _ = ec.get_method("cafe-ml").byte_range(FIELDS, DIM, medium_source=source)
    for factor in (1.0, 1.05, 1.1, 1.2, 1.5):
        budget = int(lo * factor)
        t = ec.make_table("cafe-ml", FIELDS, DIM, budget_bytes=budget, medium_source=source)
        assert 0.9 * budget <= t.memory_bytes() <= budget, (factor, t.memory_bytes(), budget)


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
@pytest.mark.parametrize("ratio", [10, 100, 1000])
@pytest.mark.parametrize("key_dtype", ["auto", "int64"])
def test_memory_counts_every_buffer(method, ratio, key_dtype):
    t = table(method, ratio, key_dtype=key_dtype)
    state = t.state_dict()
    assert t.memory_bytes() == sum(v.numel() * v.element_size() for v in state.values())
    h, w = t.num_hot_rows, t.sketch.num_buckets
    assert state["weight"].shape == (t.num_hash_rows + h, DIM)
    key = torch.int32 if key_dtype == "auto" else torch.int64  # 70k ids fit in int32
    assert t.sketch.keys.dtype == key
    assert HotSketch.memory_bytes_for(w, h, key_dtype=key) == sum(
        v.numel() * v.element_size() for k, v in state.items() if k.startswith("sketch."))
    hash_bytes = t.num_hash_rows * DIM * 4
    budget = ec.full_table_bytes(FIELDS, DIM) / ratio
    rate = reference_hash_rate(ratio)
    assert abs(hash_bytes / budget - rate) < 0.05 + (0.2 if method == "cafe-ml" else 0)
    if method == "cafe-ml":
        assert int(t.rows2.sum()) > 0 and t.num_hash_rows == int(t.rows.sum() + t.rows2.sum())


@pytest.mark.parametrize("ratio", [10, 1000])
def test_cafe_ml_second_table_from_the_hash_rows_or_from_the_hot_rows(ratio):
    cafe = table("cafe", ratio)
    from_hash, from_hot = table("cafe-ml", ratio), table("cafe-ml", ratio, medium_source="hot")
    budget = ec.full_table_bytes(FIELDS, DIM) / ratio
    for t in (from_hash, from_hot):
        assert 0.9 * budget <= t.memory_bytes() <= budget and int(t.rows2.sum()) > 0
    # "hash": both tables share cafe's hash rows; "hot": the first table is cafe's, the hot rows pay
    assert from_hash.num_hash_rows == pytest.approx(cafe.num_hash_rows, abs=2)
    # (cafe-ml's few more fixed bytes can cost the first table a row)
    assert (from_hot.rows - cafe.rows).abs().max() <= 1 and from_hot.num_hot_rows < cafe.num_hot_rows
    second = int(from_hot.rows2.sum()) * DIM * 4
    hot_bytes = budget - cafe.num_hash_rows * DIM * 4
    assert second == pytest.approx(0.3 * hot_bytes, abs=DIM * 4 * len(FIELDS))  # whole rows per field
    with pytest.raises(ValueError, match="medium_source"):
        table("cafe-ml", ratio, medium_source="cold")
    shared = table("cafe-ml", ratio, medium_source="shared")  # no second table: cafe's rows, cafe's bytes
    assert int(shared.rows2.sum()) == 0 and (shared.rows - cafe.rows).abs().max() <= 1
    assert abs(shared.num_hot_rows - cafe.num_hot_rows) <= 2  # its 64 bytes of per-field buffers: <= 2 hot rows


def test_small_fields_stay_whole_and_are_never_sketched():
    t = table(ratio=100, threshold=1.0, importance="frequency")
    assert t.rows[:2].tolist() == [4, 50] and (t.rows[2:] < torch.tensor(FIELDS[2:])).all()
    step(t, torch.arange(54).reshape(-1, 1))
    assert (t.sketch.keys < 0).all()


def test_gradient_importance_is_normalised_per_field():
    t = table(ratio=10, threshold=1e9, buckets_per_row=8)  # no promotion; few sketch collisions
    gen = torch.Generator().manual_seed(0)
    a = torch.randperm(20_000, generator=gen)[:6] + 54  # field 2
    b = torch.randperm(50_000, generator=gen)[:4] + 20_054  # field 3
    ids = torch.cat([a, b]).reshape(-1, 1)
    c = torch.tensor([1.0, 2, 3, 4, 5, 6, 1, 1, 2, 4])
    step(t, ids, c)  # d loss / d embedding of lookup i = c_i * ones(D): norm c_i * sqrt(D)
    _, scores = t.sketch.query(ids.reshape(-1))
    expected = torch.cat([c[:6] * 6 / c[:6].sum(), c[6:] * 4 / c[6:].sum()])
    torch.testing.assert_close(scores, expected)


def test_a_field_without_gradient_counts_one_per_lookup():
    t = table(ratio=10, threshold=1e9, buckets_per_row=8)
    gen = torch.Generator().manual_seed(1)
    a = torch.randperm(20_000, generator=gen)[:3] + 54  # field 2: zero gradient
    b = torch.randperm(50_000, generator=gen)[:2] + 20_054  # field 3
    ids = torch.cat([a, b]).reshape(-1, 1)
    step(t, ids, torch.tensor([0.0, 0, 0, 1, 3]))
    _, scores = t.sketch.query(ids.reshape(-1))
    torch.testing.assert_close(scores, torch.tensor([1.0, 1, 1, 0.5, 1.5]))


def test_frequency_importance_counts_lookups():
    t = table(ratio=10, threshold=1e9, importance="frequency", buckets_per_row=8)
    ids = torch.tensor([[100], [100], [30_000], [100]])
    step(t, ids)
    assert t.sketch.query(torch.tensor([100, 30_000]))[1].tolist() == [3.0, 1.0]


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
def test_promotion_copies_the_served_row_and_demotion_returns_to_it(method):
    extra = {"medium_fraction": 0.5} if method == "cafe-ml" else {}
    t = table(method, ratio=10, threshold=4.0, importance="frequency", decay=0.5, **extra)
    ids = torch.tensor([[123], [40_000]])
    step(t, ids.repeat(3, 1))  # score 3: medium tier in cafe-ml, not hot
    assert (t.sketch.query(ids.reshape(-1))[0] < 0).all()
    t.train()
    served = t(ids).detach()
    t.zero_grad()
    step(t, ids.repeat(2, 1))  # score 5 >= T: promoted into a hot row holding a copy of what served it
    rows, _ = t.sketch.query(ids.reshape(-1))
    assert (rows >= 0).all()
    t.eval()
    torch.testing.assert_close(t(ids), served)
    with torch.no_grad():  # move the hot rows away so we can tell them from the hashed rows
        t.weight[rows + t.num_hash_rows] += 1.0
    torch.testing.assert_close(t(ids), served + 1.0)
    t.sketch.apply_decay()  # 5 * 0.5 < T: demoted, served by the hashed row(s) again
    assert (t.sketch.query(ids.reshape(-1))[0] < 0).all() and t.sketch.num_hot() == 0
    expected = t.cold_embedding(ids.reshape(-1)) if method == "cafe-ml" else t.weight[t.hashed_row(ids.reshape(-1))]
    torch.testing.assert_close(t(ids), expected)


@pytest.mark.parametrize("source", ["hash", "shared"])
def test_cafe_ml_tiers(source):
    t = table("cafe-ml", ratio=10, threshold=10.0, importance="frequency", medium_fraction=0.3,
              medium_source=source)
    cold, medium = torch.tensor([70]), torch.tensor([30_000])
    step(t, medium.repeat(4).reshape(-1, 1))  # score 4 >= 0.3 * 10: medium
    t.eval()
    f = torch.tensor([3])
    torch.testing.assert_close(t(medium.reshape(1, 1)), t.weight[t.hashed_row(medium)] +
                               t.weight[t.second_row(medium, f)])
    torch.testing.assert_close(t(cold.reshape(1, 1)), t.weight[t.hashed_row(cold)])
    second = t.second_row(medium, f).item()
    if source == "hash":
        assert second >= int(t.rows.sum())  # the second table is its own rows
    else:  # another row of the medium feature's own field, by an independent hash
        assert int(t.row_base[3]) <= second < int(t.row_base[3] + t.rows[3])
        ids = torch.arange(54 + 20_000, 54 + 20_000 + 5_000)
        field = torch.full_like(ids, 3)
        assert (t.second_row(ids, field) != t.hashed_row(ids, field)).float().mean() > 0.9


@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_cafe_ml_bags_pool_both_rows_of_their_medium_lookups(mode):
    """Bags of several lookups, medium and cold mixed, an empty bag among them: the pooled output and the
    weight gradient equal pooling the per-lookup embeddings of ``lookup`` (first row + second row for a
    medium feature) by hand."""
    t = table("cafe-ml", ratio=10, threshold=10.0, importance="frequency", medium_fraction=0.3)
    step(t, torch.tensor([30_000, 30_001]).repeat(4).reshape(-1, 1))  # score 4 >= 0.3 * 10: medium
    ids = torch.tensor([30_000, 70, 30_001, 30_000, 20_100, 70])
    offsets = torch.tensor([0, 2, 2, 5])  # bags [30000, 70], [], [30001, 30000, 20100], [70]
    bag = torch.tensor([0, 0, 2, 2, 2, 3])
    w = torch.tensor([0.5, 2.0, 1.5, -1.0, 0.25, 3.0]) if mode == "weighted" else None
    t.mode = "mean" if mode == "mean" else "sum"
    t.eval()
    rows = t.lookup(ids)
    routed, field, score, _ = t._route(ids)
    assert int(t._medium(routed, score, field).sum()) == 3  # 30000 twice and 30001
    scale = torch.ones(6) if w is None else w
    if mode == "mean":
        scale = 1.0 / torch.tensor([2, 2, 3, 3, 3, 1]).float()
    expected = torch.zeros(4, DIM).index_add_(0, bag, rows * scale[:, None])
    out = t(ids, offsets, per_sample_weights=w)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0))
    t.weight.grad = None
    (out * grad_out).sum().backward()
    got = t.weight.grad.to_dense()
    t.weight.grad = None
    (torch.zeros(4, DIM).index_add_(0, bag, t.lookup(ids) * scale[:, None]) * grad_out).sum().backward()
    torch.testing.assert_close(got, t.weight.grad.to_dense())
    assert (got[int(t.rows.sum()):t.num_hash_rows].abs().sum(1) > 0).sum() >= 2  # second rows got gradient


def test_cafe_ml_medium_fraction_zero_has_no_cold_tier():
    t = table("cafe-ml", ratio=10, threshold=10.0, importance="frequency", medium_fraction=0.0)
    t.eval()
    never_seen = torch.tensor([70, 30_000])  # not in the sketch: score 0, still two rows
    f = torch.tensor([2, 3])
    torch.testing.assert_close(t(never_seen.reshape(-1, 1)), t.weight[t.hashed_row(never_seen)] +
                               t.weight[t.second_row(never_seen, f)])
    with pytest.raises(ValueError, match=r"medium_fraction must be in \[0, 1\]"):
        table("cafe-ml", ratio=10, medium_fraction=-0.1)


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
def test_ordinary_loop_promotes_the_frequent_ids_and_checkpoint_reproduces(method):
    t = table(method, ratio=100, threshold=20.0)
    opt = torch.optim.SGD(t.parameters(), lr=0.05)
    ec.attach(t, opt)
    gen = torch.Generator().manual_seed(1)
    frequent = torch.tensor([60, 61, 62, 20_100, 20_101])
    target = torch.randn(64, DIM, generator=gen)
    for _ in range(30):
        ids = torch.cat([frequent.repeat(8), big_ids(24, gen).reshape(-1)]).reshape(-1, 1)
        opt.zero_grad()
        (t(ids) - target).pow(2).mean().backward()
        opt.step()
    assert (t.sketch.query(frequent)[0] >= 0).all()
    t.eval()
    before = copy.deepcopy(t.state_dict())
    probe = torch.cat([frequent, big_ids(50, gen).reshape(-1)]).reshape(-1, 1)
    out = t(probe)
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())  # eval is pure
    other = ec.make_table(method, FIELDS, DIM, compression=100, threshold=20.0)
    other.load_state_dict(before)
    other.eval()
    assert torch.equal(other(probe), out)


def test_sketch_key_dtype_is_int32_when_the_ids_fit():
    from embcompress.embeddings.cafe import sketch_key_dtype
    assert sketch_key_dtype([2**30, 2**30]) == torch.int32  # ids 0 .. 2^31 - 1
    assert sketch_key_dtype([2**30, 2**30 + 1]) == torch.int64
    assert sketch_key_dtype([10], "int64") == torch.int64
    with pytest.raises(ValueError, match="cannot hold"):
        sketch_key_dtype([2**31, 5], "int32")
    with pytest.raises(ValueError, match="key_dtype must be"):
        sketch_key_dtype([10], "int16")
    wide, narrow = table(ratio=100, key_dtype="int64"), table(ratio=100)
    assert narrow.num_hot_rows > wide.num_hot_rows and narrow.num_hash_rows == wide.num_hash_rows
    assert max(narrow.memory_bytes(), wide.memory_bytes()) <= ec.full_table_bytes(FIELDS, DIM) / 100


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("optimizer_state", ["copy", "reset", "slot"])
def test_a_reused_hot_row_restarts_from_the_served_row_with_its_optimizer_state(optimizer_state, sparse):
    """One hot row: A holds it, then B outgrows A within one step. With ``copy`` B's row starts as its
    hashed row, weight and Adagrad sum, with ``reset`` as its hashed row's weight and a zero sum, and A's
    gradient of that step does not land on it; with ``slot`` it keeps the row's old sum and takes A's
    step."""
    torch.manual_seed(0)
    t = CafeEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_hot_rows=1, threshold=4.0, decay=0.5,
                         importance="frequency", optimizer_state=optimizer_state, sparse=sparse,
                         pressure_decay=True)  # the decay that demotes A below
    opt = torch.optim.Adagrad(t.parameters(), lr=0.1)
    ec.attach(t, opt)
    a, b = 100, 30_000

    def train(ids: list[int]) -> None:
        opt.zero_grad()
        t.train()
        t(torch.tensor(ids).reshape(-1, 1)).pow(2).sum().backward()
        opt.step()

    train([a] * 5)  # A reaches T: promoted into row 0
    train([a, b])  # row 0 trains, its Adagrad sum grows; so does the sum of B's hashed row
    assert t.sketch.query(torch.tensor([a]))[0].item() == 0
    hot, source = t.num_hash_rows, int(t.hashed_row(torch.tensor([b])))
    sums = opt.state[t.weight]["sum"]
    assert sums[hot].abs().sum() > 0
    before_weight, before_sum = t.weight[source].detach().clone(), sums[source].clone()
    assert before_sum.abs().sum() > 0 and not torch.equal(before_sum, sums[hot])
    train([a] + [b] * 10)  # B waits, no row is free: decay demotes A (3.5 < T) and B takes row 0
    assert t.sketch.query(torch.tensor([a, b]))[0].tolist() == [-1, 0]
    fresh = {"copy": before_sum, "reset": torch.zeros(DIM), "slot": None}[optimizer_state]
    restarted = torch.equal(t.weight[hot].detach(), before_weight) and fresh is not None and torch.equal(sums[hot], fresh)
    assert restarted == (optimizer_state != "slot")
    assert optimizer_state != "slot" or not torch.equal(t.weight[hot].detach(), before_weight)


def test_training_forward_without_backward_records_nothing_harmful():
    t = table(ratio=10, threshold=1.0)
    t.train()
    with torch.no_grad():
        t(torch.tensor([[100]]))
    t.before_optimizer_step()
    assert (t.sketch.keys < 0).all()


def test_hashed_row_of_a_few_ids_in_python_equals_the_tensor_path():
    t = table(ratio=10)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, t.num_embeddings, (30,), generator=gen),
                     torch.tensor([0, 3, 4, 53, 54, t.num_embeddings - 1])])  # field edges, whole fields
    assert t.field_hashed.any() and not t.field_hashed.all()
    want = t.hashed_row(ids, field_of(ids, t.starts))  # the tensor path
    cases = ((ids[:1], want[:1]), (ids[:32], want[:32]), (ids[32:].reshape(2, 2), want[32:].reshape(2, 2)))
    for part, expected in cases:
        assert torch.equal(t.hashed_row(part), expected)  # Python path: up to 32 ids
    assert torch.equal(t.hashed_row(ids), want)  # 36 ids: the tensor path
    with torch.no_grad():
        t.rows.sub_(1)  # written buffers are read again
    assert torch.equal(t.hashed_row(ids[:8]), t.hashed_row(ids[:8], field_of(ids[:8], t.starts)))


def test_compiled_scoring_equals_the_pytorch_path():
    """``cafe_native.cpp`` normalises the norms per field and picks the hashed fields' lookups with the
    PyTorch path's ids, scores and sketch codes, bit for bit (a field without gradient and a NaN included)."""
    from embcompress.embeddings import cafe as cafe_module

    if cafe_module._kernel() is None:
        pytest.skip("no C++ compiler, or EMBCOMPRESS_NATIVE=0")
    t = table(ratio=10)
    assert t.field_hashed.any() and not t.field_hashed.all()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, t.num_embeddings, (500,), generator=gen)
    field = field_of(ids, t.starts)
    norms = torch.rand(500, generator=gen) * 3
    norms[field == 3] = 0.0  # a hashed field without gradient
    norms[torch.nonzero(field == 2)[0]] = float("nan")
    e = cafe_module._Pending(ids=ids, field=field, located=t.sketch.locate(ids), rows=ids, norms=norms)
    got = t._scored_lookups(e)
    want = t._hashed_lookups(e, t._normalise(norms, field))
    assert got is not None and got[0].numel() == int(t.field_hashed[field].sum())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2].code, want[2].code)
    assert (got[1][field[t.field_hashed[field]] >= 2] == 1).all()  # field 2 (NaN) and field 3 (no gradient)


def test_training_forward_traces_as_one_graph_on_the_vectorised_path():
    """A training forward on the PyTorch sketch path (what CUDA runs): route, pooling and recording trace
    as one graph, i.e. no op whose output size depends on the data (``nonzero``) and no read back, so the
    forward waits on no host sync; its recorded lookups are the eager forward's."""
    torch.manual_seed(0)
    eager = CafeEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_hot_rows=16, threshold=2.0, importance="frequency")
    ids = (torch.randint(0, 4, (32, 4)) + torch.tensor([0, 4, 54, 20_054])).reshape(-1, 1)
    eager.sketch.native = False
    eager.sketch.insert(ids[:40].reshape(-1), torch.full((40,), 3.0))  # some hot rows to route to
    eager.train()
    traced = copy.deepcopy(eager)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(traced)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    traced._pending.clear()  # explain ran the forward once
    expected = eager(ids)
    assert torch.equal(traced(ids), expected) and int((eager.row_index(ids) >= eager.num_hash_rows).sum()) > 0
    got, want = traced._pending[-1], eager._pending[-1]
    assert torch.equal(got.ids, want.ids) and torch.equal(got.located.flat, want.located.flat)
    traced.before_optimizer_step()
    eager.before_optimizer_step()
    assert torch.equal(traced.sketch.scores, eager.sketch.scores)


def test_importance_is_gathered_across_ranks_before_the_sketch_update(monkeypatch):
    from embcompress.embeddings import cafe as cafe_module
    from embcompress.embeddings.sync import gather_across_ranks

    ids, scores = torch.tensor([100, 30_000]), torch.tensor([1.0, 2.0])
    assert all(a is b for a, b in zip(gather_across_ranks(ids, scores), (ids, scores)))  # no process group
    seen = []

    def doubling(*tensors):  # what two ranks with the same lookups would gather
        seen.append(len(tensors))
        return tuple(torch.cat([t, t]) for t in tensors)

    monkeypatch.setattr(cafe_module, "gather_across_ranks", doubling)
    t = table(ratio=10, threshold=1e9, importance="frequency", buckets_per_row=8)
    step(t, torch.tensor([[100], [30_000], [100]]))
    assert seen == [2]
    assert t.sketch.query(torch.tensor([100, 30_000]))[1].tolist() == [4.0, 2.0]


@pytest.mark.parametrize("method", ["cafe", "cafe-ml"])
def test_training_stats_count_hot_lookups_and_hot_set_changes_since_the_last_call(method):
    t = table(method, ratio=100, threshold=20.0)
    gen = torch.Generator().manual_seed(4)
    frequent = torch.tensor([60, 61, 62, 20_100, 20_101])
    assert t.training_stats() == {"hot_rows_used": 0.0, "promoted": 0, "demoted": 0}  # no lookups: no share
    hot = lookups = 0
    for _ in range(20):
        ids = torch.cat([frequent.repeat(8), big_ids(24, gen).reshape(-1), torch.tensor([0, 1])]).reshape(-1, 1)
        with torch.no_grad():  # what the training forward will serve: hashed-field ids (>= 54) on hot rows
            hashed = ids.reshape(-1)[ids.reshape(-1) >= 54]
            hot += int((t.row_index(hashed) >= t.num_hash_rows).sum())
            lookups += hashed.numel()
        step(t, ids)
    stats = t.training_stats()
    held = int(t.sketch.row_used.sum())
    assert 0 < hot < lookups and stats["hot_share"] == pytest.approx(hot / lookups)
    assert stats["hot_rows_used"] == pytest.approx(held / t.num_hot_rows)
    assert stats["promoted"] - stats["demoted"] == held > 0
    t.eval()
    t(big_ids(10, gen))  # eval forwards are not training lookups
    assert t.training_stats() == {"hot_rows_used": pytest.approx(held / t.num_hot_rows), "promoted": 0, "demoted": 0}


# ---------------------------------------------------------------------------- a step without host syncs
def _trained_pair(method: str, fields: list[int], steps: int, **options) -> list:
    """Two tables from one seed on the PyTorch sketch path, the second without host syncs, trained side by
    side on the same skewed batches (Adagrad, attached); yields after every step."""
    pair = []
    for sync_free in (False, True):
        torch.manual_seed(0)
        t = ec.make_table(method, fields, DIM, compression=100, **options)
        t.sketch.native, t.sketch.sync_free = False, sync_free
        opt = torch.optim.Adagrad(t.parameters(), lr=0.05)
        ec.attach(t, opt)
        pair.append((t, opt))
    starts = torch.tensor([0] + fields[:-1]).cumsum(0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        skewed = (torch.rand(48, len(fields), generator=gen) ** 4 * torch.tensor(fields)).long()
        ids = (skewed + starts).reshape(-1, 1)
        target = torch.randn(ids.shape[0], DIM, generator=gen)
        for t, opt in pair:
            t.train()
            opt.zero_grad()
            (t(ids) * target).sum().backward()
            opt.step()
        yield pair


@pytest.mark.parametrize("method,fields,importance,optimizer_state", [
    ("cafe", FIELDS, "frequency", "slot"),  # the whole fields' lookups masked out of the insert
    ("cafe", [20_000, 50_000], "gradient", "slot"),
    ("cafe", FIELDS, "gradient", "copy"),  # and the mass summed with them as 0: last bits (insert_masked)
    ("cafe-ml", FIELDS, "frequency", "reset"),
])
def test_sync_free_step_trains_as_the_vectorised_path(method, fields, importance, optimizer_state):
    """Through training with promotion, preemption and demotion, the step without host syncs leaves the
    weights, the sketch, the optimizer state and the statistics of the vectorised step, bit for bit."""
    changes = 0
    for (a, opt_a), (b, opt_b) in _trained_pair(method, fields, 40, importance=importance, threshold=3.0,
                                                optimizer_state=optimizer_state, pressure_decay=True):
        for name, want in a.state_dict().items():
            got = b.state_dict()[name]
            if name == "sketch.mass" and importance == "gradient" and not a._all_hashed:
                assert got.item() == pytest.approx(want.item(), rel=1e-12)
            else:
                assert torch.equal(got, want), name
        assert torch.equal(opt_a.state[a.weight]["sum"], opt_b.state[b.weight]["sum"])
        stats = a.training_stats()
        assert b.training_stats() == stats
        changes += stats["promoted"] + stats["demoted"]
    assert changes > 0 and a.sketch.num_hot() > 0


def test_sync_free_step_traces_as_one_graph():
    """The table's whole step on the sync-free path (forward, backward, the optimizer's pre-step hook that
    inserts into the sketch and copies promoted rows) reads nothing back: under ``torch._dynamo.explain``
    the only graph breaks are PyTorch's own (``Tensor.backward()``, which dynamo does not trace, and the
    ``graph_break()`` that ``Optimizer.step`` makes around every step), none in the table; the
    hook alone traces as one graph, also with gradient importance. The traced steps train as eager ones."""
    torch.manual_seed(0)
    ids = (torch.randint(0, 4, (32, 4)) + torch.tensor([0, 4, 54, 20_054])).reshape(-1, 1)
    for importance in ("frequency", "gradient"):
        torch.manual_seed(0)
        eager = CafeEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_hot_rows=16, threshold=2.0,
                                 importance=importance)
        eager.sketch.native = False
        traced = copy.deepcopy(eager)
        opts = [torch.optim.SGD(t.parameters(), lr=0.1) for t in (eager, traced)]
        for t, opt in zip((eager, traced), opts):
            ec.attach(t, opt)
            t.train()

        def step(t, opt):
            opt.zero_grad()
            t(ids).pow(2).sum().backward()
            opt.step()

        torch._dynamo.reset()
        if importance == "frequency":
            explanation = torch._dynamo.explain(step)(traced, opts[1])
            reasons = [r.reason for r in explanation.break_reasons]
            assert sum("Tensor.backward()" in r for r in reasons) == 1, reasons
            user = [r for r in explanation.break_reasons if "graph_break()" in r.reason]
            assert user and all(r.user_stack[-1].filename.endswith("torch/optim/optimizer.py") for r in user)
            assert len(reasons) == 1 + len(user), reasons
            assert any("searchsorted" in g.code for g in explanation.graphs)  # the hook's insert is in a graph
        else:  # the gradient hook stores the norms on a Python object, which dynamo does not trace
            traced(ids).pow(2).sum().backward()
            explanation = torch._dynamo.explain(traced.before_optimizer_step)()
            assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
            opts[1].step()
            opts[1].zero_grad()
        step(eager, opts[0])
        assert eager.sketch.num_hot() > 0
        for name, want in eager.state_dict().items():
            assert torch.equal(traced.state_dict()[name], want), (importance, name)


def test_compiled_sync_free_hook_compiles_at_most_twice():
    """The pre-step hook under torch.compile keeps no Python state that changes every step (a list's
    length, the sketch's generation), so it compiles once, and once more when its statistics turn from
    ints into tensors; it trains as the eager hook."""
    torch.manual_seed(0)
    eager = CafeEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_hot_rows=16, threshold=2.0)
    eager.sketch.native = False
    traced = copy.deepcopy(eager)
    graphs = []
    torch._dynamo.reset()
    hook = torch.compile(traced.before_optimizer_step, fullgraph=True,
                         backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = (torch.randint(0, 4, (32, 4), generator=gen) + torch.tensor([0, 4, 54, 20_054])).reshape(-1, 1)
        for t, step in ((eager, eager.before_optimizer_step), (traced, hook)):
            t.train()
            t(ids).pow(2).sum().backward()
            step()
    assert len(graphs) <= 2 and eager.sketch.num_hot() > 0
    for name, want in eager.state_dict().items():
        assert torch.equal(traced.state_dict()[name], want), name
    assert traced.training_stats() == eager.training_stats()
    torch._dynamo.reset()
