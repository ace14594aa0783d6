"""torch.export artifacts of every method: equal to the eager model, dynamic batch, per-field range check,
and loadable by torch alone in a process where ``embcompress`` cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import embcompress as ec
from embcompress import export
from embcompress.models import DLRM, get_model
from embcompress.models.blocks import FIELD_RANGE_MESSAGE

SIZES, DIM, DENSE = [300, 7, 120, 40], 8, 3
#: variant -> (method, ratio, options): tiny tables that still compress and hold hot or cached rows;
#: a method not listed is built at 4x with its defaults
BUILD = {"full": ("full", 1, {}), "mpcache": ("mpcache", 1.5, {"precision": "int8"}),
         "mpcache-int4": ("mpcache", 2, {"precision": "int4"}),
         "cafe-ml-shared": ("cafe-ml", 4, {"medium_source": "shared", "medium_fraction": 0.0}),
         "zch-row": ("zch", 4, {"miss": "row"})}
VARIANTS = [*ec.methods(), "mpcache-int4", "cafe-ml-shared", *(["zch-row"] if "zch" in ec.methods() else [])]
_TRAINED: dict[str, torch.nn.Module] = {}


def _batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewed ids (the low ids of each field are frequent, so they become hot or cached)."""
    dense = torch.randn(n, DENSE, generator=gen)
    sparse = torch.stack([(torch.rand(n, generator=gen) ** 3 * s).long() for s in SIZES], 1)
    return dense, sparse


def trained(variant: str) -> torch.nn.Module:
    """A tiny DLRM of ``variant`` after 60 training steps (hot rows, caches and sketches filled), in eval mode."""
    if variant not in _TRAINED:
        method, ratio, opts = BUILD.get(variant, (variant, 4, {}))
        torch.manual_seed(0)
        table = ec.make_table(method, SIZES, DIM, compression=ratio, **opts)
        model = DLRM(table, num_dense=DENSE, bottom=(8,), top=(8,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ec.attach(model, opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            dense, sparse = _batch(gen, 32)
            loss = F.binary_cross_entropy_with_logits(model(dense, sparse), torch.rand(32, generator=gen).round())
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED[variant] = model.eval()
    return _TRAINED[variant]


def _held_state(model: torch.nn.Module) -> int:
    """Hot / cached rows the table holds (what its inference form must freeze)."""
    t = model.embedding
    if hasattr(t, "sketch") and hasattr(t.sketch, "num_hot"):
        return t.sketch.num_hot()
    if t.name == "zch":
        return t.num_slots - int(t.mch.open_slots().sum())
    if t.name == "mpcache":
        return int((t.cache_ids < t.num_embeddings).sum())
    if t.name == "tt":
        return int((t.cache_keys != torch.iinfo(torch.int64).max).sum())
    return -1


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """variant -> its artifact's path, each written once (by the first test that asks)."""
    folder = tmp_path_factory.mktemp("artifacts")
    paths: dict[str, object] = {}

    def get(variant: str):
        if variant not in paths:
            paths[variant] = folder / f"{variant}.pt2"
            export.save(trained(variant), paths[variant])  # save itself checks the artifact against eager
        return paths[variant]
    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_artifact_equals_eager(variant, artifacts, one_thread):
    model = trained(variant)
    if _held_state(model) == 0:
        pytest.fail(f"{variant}: training left no hot or cached rows, so the test would not cover them")
    served = torch.export.load(artifacts(variant)).module()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n in (1, 5, 200):  # one dynamic batch dimension serves every size
            dense, sparse = _batch(gen, n)
            torch.testing.assert_close(served(dense, sparse), model(dense, sparse))
        every = torch.stack([torch.arange(300) % s for s in SIZES], 1)  # every id of the small fields, ends included
        every[:, 0] = torch.arange(300)
        every[-1] = torch.tensor(SIZES) - 1
        dense = torch.randn(300, DENSE, generator=gen)
        torch.testing.assert_close(served(dense, every), model(dense, every))


def test_inference_forms_hold_no_parameters_and_leave_the_model_alone(one_thread):
    model = trained("cafe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = export.inference_model(model)
    assert not any(p.requires_grad for p in served.parameters())
    form = served.sparse_arch.form
    assert not list(form.parameters()) and not served.training
    assert model.sparse_arch.embedding is model.embedding  # the original still has its training table
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_out_of_range_id_fails_in_the_artifact(artifacts, one_thread):
    served = torch.export.load(artifacts("hash")).module()
    dense = torch.zeros(2, DENSE)
    ok = torch.tensor([[299, 6, 119, 39], [0, 0, 0, 0]])
    served(dense, ok)
    for bad in ([[300, 0, 0, 0], [0, 0, 0, 0]], [[0, 7, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, -1, 0]]):
        with pytest.raises(RuntimeError, match="outside its field's range"):
            served(dense, torch.tensor(bad))
    assert "outside its field's range" in FIELD_RANGE_MESSAGE


@pytest.mark.parametrize("name", ["dcn", "deepfm"])
def test_other_models_export(name, tmp_path, one_thread):
    torch.manual_seed(0)
    model = get_model(name)(ec.make_table("qr", SIZES, DIM, compression=4), num_dense=DENSE).eval()
    export.save(model, tmp_path / "m.pt2")
    dense, sparse = _batch(torch.Generator().manual_seed(3), 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(dense, sparse), model(dense, sparse))


def test_metadata_and_bad_file_name(tmp_path, one_thread):
    model = trained("hash")
    export.save(model, tmp_path / "m.pt2", run="somewhere")
    meta = export.load_metadata(tmp_path / "m.pt2")
    assert meta["method"] == "hash" and meta["field_sizes"] == SIZES and meta["run"] == "somewhere"
    assert meta["inputs"]["sparse"][1] == ["B", len(SIZES)] and meta["inputs"]["dense"][1] == ["B", DENSE]
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        export.save(model, tmp_path / "m.bin")


_CHILD = textwrap.dedent("""
    import sys
    sys.modules["embcompress"] = None  # importing it now raises ImportError: the artifacts must not need it
    import torch
    cases = torch.load(sys.argv[1])
    out = {}
    with torch.inference_mode():
        for name, (path, dense, sparse) in cases.items():
            out[name] = torch.export.load(path).module()(dense, sparse)
    torch.save(out, sys.argv[2])
""")


def test_artifacts_load_and_run_without_embcompress(tmp_path, artifacts, one_thread):
    """Every method's artifact, in one child process that cannot import embcompress."""
    cases, want = {}, {}
    gen = torch.Generator().manual_seed(11)
    for variant in VARIANTS:
        model = trained(variant)
        dense, sparse = _batch(gen, 33)
        cases[variant] = (str(artifacts(variant)), dense, sparse)
        with torch.no_grad():
            want[variant] = model(dense, sparse)
    torch.save(cases, tmp_path / "cases.pt")
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(child), str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == set(VARIANTS)
    for variant in VARIANTS:
        torch.testing.assert_close(got[variant], want[variant], msg=variant)


def test_export_command_writes_a_checked_artifact(tmp_path, capsys):
    import argparse

    from embcompress.cli import main

    run = tmp_path / "run"
    assert main(["train", "--rows", "3000", "--fields", "4", "--scale", "0.002", "--method", "cafe",
                 "--compression", "4", "--batch-size", "256", "--out", str(run), "--no-progress",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "--run", str(run), "--out", str(tmp_path / "model.pt2")])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    meta = export.load_metadata(tmp_path / "model.pt2")
    assert meta["method"] == "cafe" and len(meta["field_sizes"]) == 4
    json.dumps(meta)
    args = parser.parse_args(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.pt2")])
    with pytest.raises(ValueError, match=str(tmp_path)):
        args.func(args)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.pt2")]) == 2  # registered in the CLI
    assert capsys.readouterr().err.startswith("embcompress: error:")


def test_a_compressed_run_exports_its_serving_form(tmp_path, capsys, one_thread):
    from embcompress.cli import main

    run, small = tmp_path / "run", tmp_path / "afm"
    assert main(["train", "--rows", "3000", "--fields", "4", "--scale", "0.002", "--model", "deepfm",
                 "--batch-size", "256", "--out", str(run), "--no-progress"]) == 0
    assert main(["compress-lowrank", "--run", str(run), "--ratio", "2", "--out", str(small),
                 "--calibration-batches", "2", "--timing-batches", "1"]) == 0
    assert main(["export", "--run", str(small), "--out", str(tmp_path / "afm.pt2")]) == 0  # checked against eager
    assert export.load_metadata(tmp_path / "afm.pt2")["form"] == "afm-serving"
    assert export.load_metadata(tmp_path / "afm.pt2")["method"] == "lowrank"
    capsys.readouterr()


def test_the_training_tables_range_check_does_not_stop_export(one_thread):
    """check_ids reads the ids back in eager mode; traced, it becomes an assert inside the graph."""
    table = ec.make_table("hash", SIZES, DIM, compression=4)
    program = torch.export.export(table, (torch.zeros(5, 1, dtype=torch.int64),),
                                  dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    ids = torch.tensor([[0], [466], [3]])
    torch.testing.assert_close(program.module()(ids), table(ids))
    with pytest.raises(RuntimeError, match="outside the valid range"):
        program.module()(torch.tensor([[467]]))


def test_afm_compressed_model_exports(tmp_path, one_thread):
    """A compress-lowrank result: a lowrank table with per-field ranks (several rank groups)."""
    from embcompress.compress.afm import compress_model

    torch.manual_seed(0)
    model = DLRM(ec.make_table("full", SIZES, DIM, compression=1), num_dense=DENSE, bottom=(8,), top=(8,)).eval()
    gen = torch.Generator().manual_seed(5)
    small, _ = compress_model(model, [_batch(gen, 64) for _ in range(4)], variance=0.9)
    assert small.embedding.name == "lowrank" and len(set(small.embedding.ranks)) > 1
    export.save(small, tmp_path / "afm.pt2")
    dense, sparse = _batch(gen, 17)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "afm.pt2").module()(dense, sparse), small(dense, sparse))
