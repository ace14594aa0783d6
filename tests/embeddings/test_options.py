import math

import pytest

import embcompress as ec
from embcompress.embeddings import get_method, methods
from embcompress.embeddings.options import Option, OptionError, declared, validate

SIZES = [1000, 200, 30]


def test_every_method_declares_its_options_with_meaning():
    for name in methods():
        decl = declared(get_method(name))
        assert decl is not None, f"{name} declares no OPTIONS"
        assert len({o.name for o in decl}) == len(decl), name
        for o in decl:
            assert o.help and o.type
            if o.default is not None:  # the declared default passes its own check
                o.check(o.default, name)


@pytest.mark.parametrize("options, message", [
    ({"foo": "bar"}, r"method 'cafe' has no option 'foo'; valid options: threshold, hash_rate"),
    ({"threshold": "abc"}, r"option threshold must be a number > 0, got abc"),
    ({"hash_rate": 2}, r"option hash_rate must be in \(0, 1\), got 2"),
    ({"hash_rate": 1}, r"hash_rate must be in \(0, 1\)"),
    ({"importance": "often"}, r"importance must be one of gradient, frequency, got often"),
    ({"slots": 2.5}, r"slots must be an integer >= 1, got 2.5"),
    ({"preempt": 1}, r"preempt must be true or false"),
    ({"threshold": math.nan}, r"threshold must be > 0"),
])
def test_cafe_rejects_unknown_wrong_type_and_out_of_range_options(options, message):
    with pytest.raises(OptionError, match=message):
        ec.make_table("cafe", SIZES, 8, compression=10, **options)


def test_every_method_rejects_an_unknown_option_listing_the_valid_ones():
    for name in methods():
        valid = [o.name for o in declared(get_method(name))]
        with pytest.raises(OptionError, match="valid options: " + ", ".join(valid)):
            ec.make_table(name, SIZES, 8, compression=1 if name == "full" else 4, no_such_option=1)


def test_options_in_range_build_and_null_means_auto():
    t = ec.make_table("cafe", SIZES, 8, compression=10, hash_rate=None, threshold=20, slots=2)
    assert t.sketch.keys.shape[1] == 2 and t.sketch.threshold == 20
    with pytest.raises(OptionError, match=r"option threshold must be a number > 0, got null"):
        ec.make_table("cafe", SIZES, 8, compression=10, threshold=None)  # null only where the method chooses
    ec.make_table("tt", SIZES, 8, compression=4, q_shape=[2, 4], num_cores=2)
    with pytest.raises(OptionError, match=r"q_shape must be a list of integers"):
        ec.make_table("tt", SIZES, 8, compression=4, q_shape="2x4")
    with pytest.raises(OptionError, match=r"num_cores must be in \[2, 4\], got 5"):
        ec.make_table("tt", SIZES, 8, compression=4, num_cores=5)


def test_option_declaration_rejects_unknown_types():
    with pytest.raises(ValueError, match="type must be among"):
        Option("x", "complex", 0, "a number")
    validate(type("Undeclared", (), {}), {"anything": 1})  # a class that declares nothing is not checked


def test_docs_methods_md_is_generated_from_the_current_declarations():
    from pathlib import Path
    from embcompress.embeddings.options import markdown
    committed = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    current = markdown([(name, get_method(name)) for name in sorted(methods())]) + "\n"
    assert committed == current, "docs/methods.md is stale: run  embcompress methods --markdown > docs/methods.md"
