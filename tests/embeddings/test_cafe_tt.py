"""The ``cafe-tt`` table: hot rows chosen by a HotSketch over a TT table; promotion, demotion, budget."""

from __future__ import annotations

import pytest
import torch

import embcompress as ec
from embcompress.embeddings.cafe_tt import CafeTTEmbeddingBag
from embcompress.embeddings.tt_cores import suggest_p

FIELDS = [3, 40, 1500, 3000, 7, 1200]
DIM = 8
RAW_FIELD_ID = 4545  # field 4 (ids 4543..4549) is stored raw: see small_table
TT_IDS = torch.tensor([50, 51, 1600, 5000])  # ids of TT fields 2, 3 and 5


def small_table(hot_rows: int = 4, threshold: float = 3.0, **kw) -> CafeTTEmbeddingBag:
    """Fields 1, 2, 3, 5 in per-field TTs, fields 0 and 4 raw."""
    groups = [[1], [2], [3], [5]]
    return CafeTTEmbeddingBag(FIELDS, DIM, groups=groups, p_shapes=[suggest_p(FIELDS[g[0]], 3) for g in groups],
                              q_shape=[2, 2, 2], ranks=[3, 4], hot_rows=hot_rows, threshold=threshold, seed=0, **kw)


def step(table, opt, batch):
    opt.zero_grad()
    table(batch).sum().backward()
    opt.step()


def test_frequent_ids_become_hot_and_promotion_does_not_change_the_model():
    table = small_table()
    opt = torch.optim.SGD(table.parameters(), lr=0.0)  # lr 0: only the sketch changes anything
    ec.attach(table, opt)
    batch = torch.cat([TT_IDS.repeat(5), torch.tensor([7, 4545, 5300])])[:, None]
    table.eval()
    before = table(batch).detach()
    table.train()
    step(table, opt, batch)
    keys, _ = table.cached_rows()
    assert keys.tolist() == sorted(TT_IDS.tolist())  # 5 lookups each reach T = 3; 7 and 5300 once
    stats = table.training_stats()
    assert stats["promoted"] == 4 and stats["hot_rows_used"] == 1.0
    table.eval()
    torch.testing.assert_close(table(batch), before)  # a hot row starts as the id's TT value
    with torch.no_grad():
        table.cache_weight.add_(1.0)
    after = table(batch)
    changed = ~torch.isclose(after, before).all(dim=1)
    assert changed[:20].all() and not changed[20:].any()  # exactly the hot ids read their own rows


def test_raw_field_ids_never_take_hot_rows():
    table = small_table()
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    for _ in range(3):
        step(table, opt, torch.tensor([RAW_FIELD_ID, 1, 2] * 10)[:, None])
    assert table.sketch.num_hot() == 0 and table.cached_rows()[0].numel() == 0


def test_hot_rows_train_and_a_demoted_id_returns_to_its_tt_row():
    table = small_table(hot_rows=2, threshold=2.0, preempt=True)
    opt = torch.optim.SGD(table.parameters(), lr=0.5)
    ec.attach(table, opt)
    first = torch.tensor([50, 51])[:, None]
    table.eval()
    tt_value = table(first).detach()
    table.train()
    step(table, opt, first.repeat(3, 1))  # promoted after this step's insert
    step(table, opt, first.repeat(3, 1))  # trains the hot rows (TT cores get no gradient from them)
    assert sorted(table.cached_rows()[0].tolist()) == [50, 51]
    table.eval()
    assert not torch.allclose(table(first), tt_value)
    table.train()
    other = torch.tensor([1600, 5000])[:, None]
    for _ in range(12):  # a new, much more frequent pair outscores and preempts them
        step(table, opt, other.repeat(20, 1))
    assert sorted(table.cached_rows()[0].tolist()) == [1600, 5000]
    table.eval()
    # the demoted ids are served by the TT again; their TT rows never trained while they were hot,
    # but the shared cores moved under the other ids' gradients, so compare with the TT's own value
    torch.testing.assert_close(table(first), table._tt_rows_for_ids(first[:, 0]))


def test_state_dict_carries_the_sketch_and_resumes_the_same():
    table = small_table(hot_rows=3)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    ec.attach(table, opt)
    batch = torch.tensor([50, 50, 50, 51, 51, 51, 1600, 7, 5000, 5000, 5000])[:, None]
    for _ in range(3):
        step(table, opt, batch)
    other = small_table(hot_rows=3)
    other.load_state_dict(table.state_dict())
    for a, b in zip(table.cached_rows(), other.cached_rows()):
        assert torch.equal(a, b)
    other.eval(), table.eval()
    torch.testing.assert_close(other(batch), table(batch))


@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_planner_counts_the_table_exactly(ratio):
    fields = [3, 40, 15000, 30000, 7, 12000]
    budget = ec.full_table_bytes(fields, 16) // ratio
    table = ec.make_table("cafe-tt", fields, 16, budget_bytes=budget)
    assert 0.9 * budget <= table.memory_bytes() <= budget
    plan, hot = CafeTTEmbeddingBag._plan(fields, 16, budget, {"threshold": 1.0})
    assert table.num_hot_rows == hot
    assert table.memory_bytes() == CafeTTEmbeddingBag.table_bytes(plan, hot, {})
    if ratio <= 100:  # at 1000x the smallest TT leaves less than hot_share of these 3.6 KB
        hot_bytes = hot * (16 * 4 + 0.5 * 4 * 12 + 1)
        assert hot_bytes >= 0.7 * budget  # hot_share 0.75 of the budget, less the sketch's rounding


def test_hot_share_moves_bytes_between_hot_rows_and_the_tt():
    fields = [3, 40, 15000, 30000, 7, 12000]
    budget = ec.full_table_bytes(fields, 16) // 100
    low = ec.make_table("cafe-tt", fields, 16, budget_bytes=budget, hot_share=0.3)
    high = ec.make_table("cafe-tt", fields, 16, budget_bytes=budget, hot_share=0.9)
    assert low.num_hot_rows < high.num_hot_rows
    assert sum(c.numel() for c in low.cores) > sum(c.numel() for c in high.cores)


def test_budget_built_table_uses_the_declared_sketch_defaults_and_takes_overrides():
    """Built from a budget, the sketch has the declared T (10 lookups) and hysteresis (2), at every ratio;
    options replace them, and hysteresis 1/0.98 is exactly the one-decay margin of ``hysteresis=None``."""
    declared = {o.name: o.default for o in CafeTTEmbeddingBag.OPTIONS}
    for ratio in (10, 100):
        sketch = ec.make_table("cafe-tt", [20000, 5000, 30], DIM, compression=ratio).sketch
        assert sketch.threshold == declared["threshold"] == 10.0
        assert sketch.preempt_margin == 1 / declared["hysteresis"] == 0.5
    sketch = ec.make_table("cafe-tt", [20000, 5000, 30], DIM, compression=100, threshold=500.0,
                           hysteresis=1.0204081632653061).sketch
    assert sketch.threshold == 500.0 and sketch.preempt_margin == small_table(hysteresis=None).sketch.preempt_margin
