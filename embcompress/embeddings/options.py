"""The options a table method accepts: name, type, default, range or choices, and meaning.

Every method class lists its options in ``OPTIONS`` (a tuple of :class:`Option`). :func:`validate` checks
what a caller passes before anything is built, so an unknown name, a wrong type or an out-of-range value
is one :class:`OptionError` naming the valid options, never a ``TypeError`` deep inside a constructor or a
table built from a nonsense value. :func:`describe` and :func:`markdown` print the declarations
(``embcompress methods`` and ``docs/methods.md``, written by ``embcompress methods --markdown``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: types an option may declare; "int|list[int]" style unions are allowed
_TYPES = ("int", "float", "bool", "str", "list[int]")


class OptionError(ValueError):
    """An option a method does not have, or a value of the wrong type or out of range."""


@dataclass(frozen=True)
class Option:
    """One method option. ``default=None`` with ``auto`` set means the method chooses (``auto`` says how)."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes ``low``
    high_open: bool = False  # the range excludes ``high``
    auto: str = ""  # what None (the default) means, when the method picks the value itself

    def __post_init__(self) -> None:
        if any(t not in _TYPES for t in self.type.split("|")):
            raise ValueError(f"option {self.name}: type must be among {_TYPES}, got {self.type!r}")

    # ------------------------------------------------------------------ text
    def range_text(self) -> str:
        """The accepted values in words: ``one of a, b``, ``> 0``, ``in (0, 1)`` or ``''`` (any)."""
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def default_text(self) -> str:
        if self.default is None:
            return f"auto ({self.auto})" if self.auto else "none"
        return json_text(self.default)

    # ------------------------------------------------------------------ checking
    def check(self, value: Any, method: str) -> None:
        """Raise :class:`OptionError` unless ``value`` has this option's type and lies in its range."""
        if value is None and self.default is None:
            return
        kinds = self.type.split("|")
        if not any(_is(value, k) for k in kinds):
            rng = f" {self.range_text()}" if self.range_text() else ""
            raise OptionError(f"method '{method}': option {self.name} must be "
                              f"{' or '.join(_type_words(k) for k in kinds)}{rng}, got {json_text(value)}")
        items = value if isinstance(value, (list, tuple)) else [value]
        if self.choices and value not in self.choices:
            raise OptionError(f"method '{method}': option {self.name} must be {self.range_text()}, "
                              f"got {json_text(value)}")
        for v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not self._in_range(v):
                raise OptionError(f"method '{method}': option {self.name} must be {self.range_text()}, "
                                  f"got {json_text(value)}")

    def _in_range(self, v: float) -> bool:
        if math.isnan(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


def _is(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and all(_is(v, "int") for v in value)  # list[int]


def _type_words(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "list[int]": "a list of integers such as [4,4]"}[kind]


def json_text(value: Any) -> str:
    """A value as the user writes it after ``--option KEY=``: JSON for numbers, lists and booleans."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")


def declared(cls: type) -> tuple[Option, ...] | None:
    """The options ``cls`` declares, or None when it declares none (then nothing is checked)."""
    return getattr(cls, "OPTIONS", None)


def validate(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``options`` against the declarations of method class ``cls`` (see the module doc); returns
    them without the options given as None whose default is None (None asks the method to choose)."""
    decl = declared(cls)
    if decl is None:
        return dict(options)
    method = getattr(cls, "name", "") or cls.__name__
    by_name = {o.name: o for o in decl}
    unknown = [k for k in options if k not in by_name]
    if unknown:
        valid = ", ".join(by_name) or "none"
        raise OptionError(f"method '{method}' has no option {', '.join(repr(k) for k in unknown)}; "
                          f"valid options: {valid} (see: embcompress methods {method})")
    for key, value in options.items():
        by_name[key].check(value, method)
    return {k: v for k, v in options.items() if not (v is None and by_name[k].default is None)}


def describe(name: str, cls: type) -> str:
    """Plain-text listing of one method's options for the terminal."""
    decl = declared(cls) or ()
    summary = first_line(cls)
    lines = [f"{name}: {summary}" if summary else name]
    if not decl:
        lines.append("  (no options)")
    for o in decl:
        extra = ", ".join(x for x in (o.type, o.range_text(), f"default {o.default_text()}") if x)
        lines.append(f"  {o.name} ({extra})")
        lines.append(f"      {o.help}")
    return "\n".join(lines)


def first_line(cls: type) -> str:
    """The first sentence of the method module's docstring (its one-line description)."""
    import sys
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    text = doc[0] if doc else ""
    return text.split(": ", 1)[1] if text.startswith("``") and ": " in text else text


def markdown(entries: Iterable[tuple[str, type]]) -> str:
    """docs/methods.md: one table of options per method, from the declarations."""
    out = ["# Method options", "",
           "Generated from the options each method declares (`OPTIONS` in `embcompress/embeddings/`) by",
           "`embcompress methods --markdown > docs/methods.md`; a test checks this file is current.",
           "Pass an option on the command line as `--option NAME=VALUE` (VALUE in JSON: `0.5`, `true`, `[4,4]`)",
           "or in Python as a keyword of `make_table`. An unknown name or an out-of-range value is an error",
           "that lists the valid options.", ""]
    for name, cls in entries:
        out += [f"## {name}", "", first_line(cls), ""]
        decl = declared(cls) or ()
        if not decl:
            out += ["No options.", ""]
            continue
        out += ["| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for o in decl:
            cells = (f"`{o.name}`", o.type.replace("|", " or "), o.default_text(), o.range_text() or "any",
                     o.help)
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- shared
def mode_option() -> Option:
    return Option("mode", "str", "sum", "how the rows of a bag of several ids are pooled",
                  choices=("sum", "mean"))


def sparse_option() -> Option:
    return Option("sparse", "bool", True, "sparse row gradients (SGD, Adagrad or SparseAdam); false: dense")


def hash_seed_option() -> Option:
    return Option("seed", "int", 0, "seed of the id hash that maps a large field's ids onto its rows", low=0)
