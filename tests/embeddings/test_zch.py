"""The ``zch`` table: TorchRec's managed-collision module behind the table interface."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch

import embcompress as ec
from embcompress.embeddings import zch as zch_module
from embcompress.embeddings.zch import ZchEmbeddingBag, slot_bytes

FIELDS = [4, 50, 20_000, 50_000]
DIM = 8
HASHED = 54  # first id of the hashed fields (the first two are served whole)


def table(ratio: float = 100, **options) -> ZchEmbeddingBag:
    torch.manual_seed(0)
    return ec.make_table("zch", FIELDS, DIM, compression=ratio, **options)


def train_steps(t, opt, batches) -> None:
    t.train()
    for ids in batches:
        opt.zero_grad()
        t(ids.reshape(-1, 1)).pow(2).sum().backward()
        opt.step()


def skewed(n: int, gen: torch.Generator, hot: torch.Tensor) -> torch.Tensor:
    """Half the lookups from ``hot``, half uniform over the hashed fields."""
    return torch.cat([hot[torch.randint(0, len(hot), (n // 2,), generator=gen)],
                      torch.randint(HASHED, sum(FIELDS), (n - n // 2,), generator=gen)])


@pytest.mark.parametrize("policy", ["lfu", "lru", "distance_lfu"])
@pytest.mark.parametrize("miss", ["hash", "row"])
def test_memory_is_the_state_and_the_planner_counts_it_exactly(policy, miss):
    t = table(100, eviction_policy=policy, miss=miss)
    state = t.state_dict()
    assert not any("output_segments" in k for k in state)  # a resharding table: not kept (module doc)
    assert t.memory_bytes() == sum(v.numel() * v.element_size() for v in state.values())
    meta = [k for k in state if k.startswith("mch._mch_")]
    assert len(meta) == 2 + {"lfu": 1, "lru": 1, "distance_lfu": 2}[policy]
    fixed, row, slot = ZchEmbeddingBag._sizes(FIELDS, DIM, {"eviction_policy": policy, "miss": miss})
    assert slot == slot_bytes(DIM, policy) == row + 8 * len(meta)
    assert t.memory_bytes() == fixed + t.num_hash_rows * row + t.num_slots * slot
    assert (t.num_hash_rows == 0) == (miss == "row")


def test_hash_rate_splits_the_budget():
    few, many = table(100, hash_rate=0.1), table(100, hash_rate=0.8)
    assert few.num_slots > many.num_slots and few.num_hash_rows < many.num_hash_rows
    assert many.rows.tolist()[:2] == [4, 50]  # small fields whole


def test_the_most_frequent_ids_get_their_own_rows_and_misses_their_hashed_rows():
    t = table(100)
    opt = torch.optim.SGD(t.parameters(), lr=0.01)
    ec.attach(t, opt)
    gen = torch.Generator().manual_seed(0)
    hot = torch.tensor([60, 61, 62, 20_100, 20_101, 60_000])
    train_steps(t, opt, [skewed(512, gen, hot) for _ in range(10)])
    rows = t.row_index(hot)
    assert (t.slot_of(hot) != t.miss_slot).all()
    assert rows.unique().numel() == len(hot) and (rows >= t.num_hash_rows).all()
    probe = torch.arange(HASHED, sum(FIELDS))
    miss = t.slot_of(probe) == t.miss_slot
    assert miss.sum() > len(probe) // 2  # few slots: most ids have none and are served by the hashed rows
    assert torch.equal(t.row_index(probe)[miss], t.hashed_row(probe)[miss])
    assert torch.equal(t.row_index(torch.tensor([3, 10])), torch.tensor([3, 10]))  # whole fields: own rows
    assert (t.mch._mch_sorted_raw_ids < HASHED).sum() == 0  # whole fields never take a slot
    stats = t.training_stats()
    assert 0 < stats["slots_used"] <= 1 and stats["admitted"] > 0 and 0 < stats["slot_share"] <= 1
    assert t.training_stats()["admitted"] == 0  # counts restart at each call


def test_miss_row_serves_every_id_without_a_slot():
    t = table(100, miss="row")
    assert t.weight.shape[0] == t.num_slots + 1
    ids = torch.tensor([0, 5, 30_000])  # nothing trained: all misses, one row
    assert torch.equal(t.row_index(ids), torch.full((3,), t.miss_slot))


@pytest.mark.parametrize("slot_init", ["random", "hash"])
def test_a_slot_given_to_a_new_id_restarts_with_its_optimizer_state(slot_init):
    """One slot, LFU: A takes it, then B (more frequent in one step) evicts A. B's row starts from
    the init (within its bound) or from B's hashed row, and its Adagrad sum from zero."""
    t = ZchEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_slots=1, slot_init=slot_init)
    opt = torch.optim.Adagrad(t.parameters(), lr=0.1)
    ec.attach(t, opt)
    a, b = 100, 30_000
    slot_row = t.num_hash_rows
    train_steps(t, opt, [torch.tensor([a] * 3)])
    assert t.slot_of(torch.tensor([a])).item() == 0
    train_steps(t, opt, [torch.tensor([a])] * 2)  # A's row trains: its sum grows
    sums = opt.state[t.weight]["sum"]
    assert sums[slot_row].abs().sum() > 0
    hashed_b = t.weight[t.hashed_row(torch.tensor([b]))[0]].detach().clone()
    train_steps(t, opt, [torch.tensor([b] * 50)])  # 50 lookups in one step outcount A's 5
    assert t.slot_of(torch.tensor([a, b])).tolist() == [t.miss_slot, 0]
    assert torch.equal(sums[slot_row], torch.zeros(DIM))
    new = t.weight[slot_row].detach()
    if slot_init == "hash":
        # B's hashed row took its step before the eviction; the slot starts from it
        assert torch.equal(new, t.weight[t.hashed_row(torch.tensor([b]))[0]].detach())
        assert not torch.equal(new, hashed_b)
    else:
        assert new.abs().max() <= 1.0 and not torch.equal(new, t.weight[t.hashed_row(torch.tensor([b]))[0]].detach())


def test_eval_and_no_grad_forwards_change_nothing():
    t = table(100)
    opt = torch.optim.SGD(t.parameters(), lr=0.01)
    ec.attach(t, opt)
    before = copy.deepcopy(t.state_dict())
    t.eval()
    t(torch.tensor([[100], [200]]))
    t.train()
    with torch.no_grad():
        t(torch.tensor([[100], [200]]))
    t.after_optimizer_step()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())


def test_checkpoint_resume_continues_exactly():
    gen = torch.Generator().manual_seed(2)
    hot = torch.arange(60, 90)
    batches = [skewed(256, gen, hot) for _ in range(12)]

    def fresh():
        t = table(100, eviction_policy="distance_lfu")
        opt = torch.optim.Adagrad(t.parameters(), lr=0.05)
        ec.attach(t, opt)
        return t, opt

    t, opt = fresh()
    train_steps(t, opt, batches[:6])
    saved = copy.deepcopy((t.state_dict(), opt.state_dict()))
    train_steps(t, opt, batches[6:])
    r, ropt = fresh()
    r.load_state_dict(saved[0])
    ropt.load_state_dict(saved[1])
    train_steps(r, ropt, batches[6:])
    for k, v in t.state_dict().items():
        assert torch.equal(v, r.state_dict()[k]), k
    assert int(t.mch._current_iter_tensor) == 12


def test_eviction_interval_gathers_steps():
    t = table(100, eviction_interval=3)
    opt = torch.optim.SGD(t.parameters(), lr=0.01)
    ec.attach(t, opt)
    train_steps(t, opt, [torch.tensor([100, 101])] * 2)
    assert int(t.mch._current_iter_tensor) == 0 and (t.slot_of(torch.tensor([100])) == t.miss_slot).all()
    train_steps(t, opt, [torch.tensor([100, 101])])
    assert int(t.mch._current_iter_tensor) == 1 and (t.slot_of(torch.tensor([100, 101])) != t.miss_slot).all()


def test_ids_are_gathered_across_ranks_before_the_eviction(monkeypatch):
    seen = []

    def two_ranks(*tensors):  # what rank 1 seeing id 30_000 would add after this rank's ids
        seen.append(tensors[0].tolist())
        return tuple(torch.cat([t, torch.tensor([30_000])]) for t in tensors)

    monkeypatch.setattr(zch_module, "gather_across_ranks", two_ranks)
    t = table(100)
    opt = torch.optim.SGD(t.parameters(), lr=0.01)
    ec.attach(t, opt)
    train_steps(t, opt, [torch.tensor([100, 3])])  # id 3: a whole field's, never handed over
    assert seen == [[100]]
    assert (t.slot_of(torch.tensor([100, 30_000])) != t.miss_slot).all()


def test_options_are_checked():
    with pytest.raises(ValueError, match="eviction_policy"):
        table(100, eviction_policy="fifo")
    with pytest.raises(ValueError, match="slot_init"):
        table(100, miss="row", slot_init="hash")


def test_a_missing_torchrec_is_a_clear_error_at_build_time(monkeypatch):
    real = builtins.__import__

    def no_torchrec(name, *args, **kwargs):
        if name.startswith("torchrec"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchrec)
    with pytest.raises(ImportError, match="torchrec extra"):
        ZchEmbeddingBag(FIELDS, DIM, [4, 50, 100, 100], num_slots=4)
