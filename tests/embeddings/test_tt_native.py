"""The ``tt`` table's compiled routing (``tt_native.cpp``) against its PyTorch path: equal bit for bit."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import embcompress as ec
from embcompress.embeddings import native
from embcompress.embeddings.cafe_tt import CafeTTEmbeddingBag
from embcompress.embeddings.tt import TTEmbeddingBag
from embcompress.embeddings.tt_cores import index_add_rows, native_library, suggest_p

FIELDS = [3, 40, 1500, 3000, 7, 1200]
N = sum(FIELDS)
DIM = 8


@pytest.fixture(autouse=True)
def compiled():
    """Every test here needs the compiled kernels; a compiler that fails on the source is a bug."""
    if native_library() is None:
        if native.enabled():
            assert shutil.which(os.environ.get("CXX", "g++")) is None, "the C++ compiler failed on tt_native.cpp"
        pytest.skip("no C++ compiler (or EMBCOMPRESS_NATIVE=0): the compiled kernels are not built")


@contextmanager
def pytorch_path():
    old = os.environ.get("EMBCOMPRESS_NATIVE")
    os.environ["EMBCOMPRESS_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["EMBCOMPRESS_NATIVE"]
        else:
            os.environ["EMBCOMPRESS_NATIVE"] = old


def tt_table(layout: str = "field", dtype=torch.float32, cache_rows: int = 64, ranks=(3, 4), q=(2, 2, 2)):
    """Fields 1, 2, 3, 5 in TTs (per field or one shared), fields 0 and 4 raw."""
    tt_fields = [1, 2, 3, 5]
    groups = [[f] for f in tt_fields] if layout == "field" else [tt_fields]
    p_shapes = [suggest_p(sum(FIELDS[f] for f in g), len(q)) for g in groups]
    table = TTEmbeddingBag(FIELDS, DIM, groups=groups, p_shapes=p_shapes, q_shape=list(q), ranks=list(ranks),
                           cache_rows=cache_rows, seed=0, refresh_every=4)
    return table.to(dtype)


def cafe_tt_table():
    groups = [[1], [2], [3], [5]]
    return CafeTTEmbeddingBag(FIELDS, DIM, groups=groups, p_shapes=[suggest_p(FIELDS[g[0]], 3) for g in groups],
                              q_shape=[2, 2, 2], ranks=[3, 4], hot_rows=24, threshold=2.0, seed=0)


def zipf_ids(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    p = np.arange(1, N + 1, dtype=np.float64) ** -1.1
    return torch.from_numpy(rng.permutation(N)[rng.choice(N, size=n, p=p / p.sum())])[:, None]


def assert_same_grad(a: torch.Tensor | None, b: torch.Tensor | None, name: str) -> None:
    assert (a is None) == (b is None), name
    if a is None:
        return
    assert a.is_sparse == b.is_sparse, name
    if a.is_sparse:
        assert a.is_coalesced() == b.is_coalesced(), name
        assert torch.equal(a._indices(), b._indices()), name
        assert torch.equal(a._values(), b._values()), name
    else:
        assert torch.equal(a, b), name


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def one_step(table, ids, grad_seed: int):
    table.zero_grad(set_to_none=True)
    out = table(ids)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach()


@given(st.lists(st.integers(0, N - 1), min_size=1, max_size=300), st.sampled_from(["field", "shared"]),
       st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.sampled_from([(3, 4), (12, 12)]))
@settings(max_examples=40, deadline=None)
def test_forward_gradients_and_counts_equal_the_pytorch_path(ids, layout, dtype, training, ranks):
    """Random batches (repeats, raw ids, cache hits, TT ids): rows, every gradient (sparse structure
    included) and the recorded counts are those of the PyTorch path, bit for bit. Ranks (12, 12) take
    bmm's BLAS path, so the chain product there is ``_TTRows`` rather than the compiled one."""
    ids = torch.tensor(ids)[:, None]
    tables = []
    for _ in range(2):
        table = tt_table(layout, dtype, ranks=ranks)
        table.update_state(torch.arange(40, 4000, 7), torch.ones(566))  # the first step refreshes the cache
        table.train(training)
        tables.append(table)
    compiled, reference = tables
    assert compiled.cache_keys[0] != torch.iinfo(torch.int64).max  # the cache holds rows
    out = one_step(compiled, ids, 0)
    with pytorch_path():
        expected = one_step(reference, ids, 0)
    assert torch.equal(out, expected)
    for (name, p), q in zip(compiled.named_parameters(), reference.parameters()):
        assert_same_grad(p.grad, q.grad, name)
    assert len(compiled._pending) == len(reference._pending)
    for got, want in zip(compiled._pending, reference._pending):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("method", ["tt", "cafe-tt"])
def test_training_is_bitwise_the_same_with_and_without_compiled_kernels(method, optimizer):
    """30 steps of Zipf batches (cache refreshes, or the sketch's promotions and demotions): every
    parameter, buffer and statistic ends equal."""
    states = []
    for path in ("compiled", "pytorch"):
        table = tt_table() if method == "tt" else cafe_tt_table()
        opt = (torch.optim.SGD(table.parameters(), lr=0.1) if optimizer == "sgd"
               else torch.optim.Adagrad(table.parameters(), lr=0.1))
        ec.attach(table, opt)
        table.train()
        with pytorch_path() if path == "pytorch" else nullcontext():
            for step in range(30):
                one_step(table, zipf_ids(256, step), step)
                opt.step()
            stats = table.training_stats()
            table.eval()
            rows = table(torch.arange(N)[:, None]).detach()
        states.append((table, stats, rows))
    (a, stats_a, rows_a), (b, stats_b, rows_b) = states
    assert_same_state(a, b)
    assert stats_a == stats_b and torch.equal(rows_a, rows_b)
    if method == "tt":
        assert int(a.stats[1]) > 0  # rows were admitted to the cache
    else:
        assert a.sketch.num_hot() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_index_add_rows_sums_as_index_add(dtype):
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(5000, 12, generator=gen, dtype=dtype) * torch.logspace(-6, 6, 12, dtype=dtype)
    index = torch.randint(0, 37, (5000, 3), generator=gen)[:, 1]  # a strided column, as the core rows
    assert torch.equal(index_add_rows(37, index, src), torch.zeros(37, 12, dtype=dtype).index_add_(0, index, src))


def test_pooled_bags_and_the_switch_take_the_pytorch_path(monkeypatch):
    table = tt_table()
    ids = torch.tensor([[5], [4545], [1600]])
    assert table._native_library(ids, list(table.cores)) is not None
    assert table._native_library(ids.reshape(1, 3), list(table.cores)) is None  # a bag of three ids
    monkeypatch.setenv("EMBCOMPRESS_NATIVE", "0")
    assert table._native_library(ids, list(table.cores)) is None


def test_compiled_path_does_not_run_the_pytorch_routing(monkeypatch):
    table = tt_table()
    expected = table(torch.arange(N)[:, None]).detach()
    monkeypatch.setattr(TTEmbeddingBag, "_rows", lambda *a: pytest.fail("the PyTorch routing ran"))
    assert torch.equal(table(torch.arange(N)[:, None]), expected)


def test_ids_outside_the_table_raise():
    table = tt_table()
    with pytest.raises(ValueError, match="outside the valid range"):
        table(torch.tensor([[0], [N]]))
    table.validate_ids = False
    with pytest.raises(IndexError, match="id -1 is outside"):
        table(torch.tensor([[3], [-1]]))


@given(st.integers(2, 4), st.data())
@settings(max_examples=40, deadline=None)
def test_compiled_chain_product_equals_the_bmm_path(t_cores, data):
    """Rows and core gradients of the compiled chain product equal ``_TTRows``' (bmm, index_add_) bit for
    bit, for every shape the compiled one serves (products up to bmm's plain-loop size)."""
    from embcompress.embeddings import tt_cores

    q = data.draw(st.lists(st.integers(1, 4), min_size=t_cores, max_size=t_cores))
    ranks = data.draw(st.lists(st.integers(1, 9), min_size=t_cores - 1, max_size=t_cores - 1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    r = [1, *ranks, 1]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    cores = [torch.randn(5, r[t], q[t], r[t + 1], generator=gen, dtype=dtype, requires_grad=True)
             for t in range(t_cores)]
    rows = torch.randint(0, 5, (200, t_cores), generator=gen)
    grad = torch.randn(200, int(np.prod(q)), generator=gen, dtype=dtype)
    served = tt_cores.chain_compiled(cores, rows)
    if not served:  # bmm takes BLAS for some core: the PyTorch path serves it
        assert any(np.prod(q[:t]) * r[t] * q[t] * r[t + 1] >= 400 for t in range(1, t_cores))
        return
    results = []
    for fn in (tt_cores._TTChain, tt_cores._TTRows):
        out = fn.apply(rows, *cores)
        results.append((out.detach(), torch.autograd.grad(out, cores, grad)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_falls_back_without_a_compiler(monkeypatch, tmp_path):
    table = tt_table()
    ids = zipf_ids(500, 0)
    expected = table(ids).detach()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EMBCOMPRESS_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libraries", {})
    assert native_library() is None and table._native_library(ids, list(table.cores)) is None
    assert torch.equal(table(ids), expected)
