"""A compressed table behind TorchRec's EmbeddingBagCollection interface, inside torchrec's DLRM."""

import pytest
import torch

torchrec = pytest.importorskip("torchrec")
from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor  # noqa: E402

import embcompress  # noqa: E402
from embcompress.interop.torchrec import CompressedEmbeddingBagCollection  # noqa: E402

SIZES, D, B = [7, 50, 300], 8, 5
NAMES = ["cat_a", "cat_b", "cat_c"]


def _kjt(generator, weighted=False):
    lengths = torch.randint(0, 4, (len(SIZES) * B,), generator=generator)  # key-major, empty bags included
    values = torch.cat([torch.randint(0, SIZES[f], (int(lengths[f * B:(f + 1) * B].sum()),), generator=generator)
                        for f in range(len(SIZES))])
    weights = torch.rand(len(values), generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=values, lengths=lengths, weights=weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torchrec_embedding_bag_collection(weighted):
    torch.manual_seed(0)
    table = embcompress.make_table("full", SIZES, D, compression=1)
    ours = CompressedEmbeddingBagCollection(table, NAMES, is_weighted=weighted)
    ref = EmbeddingBagCollection(tables=[EmbeddingBagConfig(num_embeddings=n, embedding_dim=D, name=f"t_{k}",
                                                            feature_names=[k]) for k, n in zip(NAMES, SIZES)],
                                 is_weighted=weighted)
    start = 0
    with torch.no_grad():
        for k, n in zip(NAMES, SIZES):
            ref.embedding_bags[f"t_{k}"].weight.copy_(table.weight[start:start + n])
            start += n
    kjt = _kjt(torch.Generator().manual_seed(1), weighted)
    got, want = ours(kjt), ref(kjt)
    assert isinstance(got, KeyedTensor) and got.keys() == want.keys() == NAMES
    assert got.values().shape == (B, len(SIZES) * D)
    for k in NAMES:
        torch.testing.assert_close(got[k], want[k])


def test_keys_in_another_order_are_matched_by_name():
    torch.manual_seed(0)
    ours = CompressedEmbeddingBagCollection(embcompress.make_table("hash", SIZES, D, compression=4), NAMES)
    kjt = _kjt(torch.Generator().manual_seed(2))
    perm = kjt.permute([2, 0, 1])
    a, b = ours(kjt), ours(perm)
    for k in NAMES:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("method,ratio", [("cafe", 4), ("hash", 4), ("mpcache", 2)])
def test_drops_into_torchrec_dlrm_and_trains(method, ratio):
    torch.manual_seed(0)
    table = embcompress.make_table(method, SIZES, D, compression=ratio)
    model = DLRM(embedding_bag_collection=CompressedEmbeddingBagCollection(table, NAMES), dense_in_features=4,
                 dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[16, 1])
    sparse = {id(p) for p in table.sparse_parameters()}
    opt = torch.optim.Adagrad([p for p in model.parameters()], lr=0.1)
    embcompress.attach(model, opt)
    before = {k: v.clone() for k, v in table.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        dense = torch.randn(B, 4, generator=g)
        logits = model(dense, _kjt(g))
        assert logits.shape == (B, 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), torch.ones(B))
        opt.zero_grad()
        loss.backward()
        assert any(p.grad is not None and (p.grad.is_sparse == (id(p) in sparse)) for p in table.parameters())
        opt.step()
    after = table.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed nothing in the table"


@pytest.mark.parametrize("method", ["hash", "cafe"])
def test_replicated_under_distributed_model_parallel(method):
    """DMP wraps modules it cannot shard in DDP, which cannot reduce sparse gradients: tables go in with
    sparse=False. One gloo process here; the point is that DMP accepts, runs and trains the module."""
    import socket

    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        table = embcompress.make_table(method, SIZES, D, compression=4, sparse=False)
        model = DLRM(embedding_bag_collection=CompressedEmbeddingBagCollection(table, NAMES), dense_in_features=4,
                     dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[16, 1])
        dmp = DistributedModelParallel(model, device=torch.device("cpu"))
        opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
        embcompress.attach(dmp, opt)
        before = {k: v.clone() for k, v in table.state_dict().items()}
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            opt.zero_grad()
            logits = dmp(torch.randn(B, 4, generator=g), _kjt(g))
            assert logits.shape == (B, 1)
            logits.pow(2).mean().backward()
            opt.step()
        after = table.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        dist.destroy_process_group()


def test_local_id_past_its_feature_is_an_error_naming_the_feature():
    ours = CompressedEmbeddingBagCollection(embcompress.make_table("full", SIZES, D, compression=1), NAMES)
    lengths = torch.tensor([1] * len(SIZES))
    ok = KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=torch.tensor([6, 49, 299]), lengths=lengths)
    ours(ok)
    # cat_a's id 7 is global id 7, cat_b's row 0: without the per-feature check it read that row silently
    bad = KeyedJaggedTensor.from_lengths_sync(keys=NAMES, values=torch.tensor([7, 0, 0]), lengths=lengths)
    with pytest.raises(ValueError, match=r"field 0 \('cat_a'\): id 7 is outside its valid range \[0, 7\)"):
        ours(bad)
