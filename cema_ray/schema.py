"""The validation engine every settings table uses: typed fields, sections, one-line messages.

The run schema, the pretrain schema (`config.py`) and every method's settings (`methods/*.py`, on its
`MethodSpec`) are declared with these `Field`s, so a key's type, range, allowed values and meaning are
written once and checked the same way wherever they live.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import yaml

from cema_ray.errors import ConfigError

REQUIRED: Any = object()
"""Default of a field the user must give."""

# --------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Field:
    """One leaf key. `kind` is str, int, float, bool, list or dict (a free-form mapping)."""

    kind: str
    default: Any = None
    doc: str = ""
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    item: "Field | Section | None" = None  # for lists
    check: Callable[[str, Any], None] | None = None  # registry look-ups, run on non-null values


@dataclass(frozen=True)
class Section:
    """A mapping of named fields; `partial` sections fill no defaults (group stream overrides)."""

    fields: Mapping[str, "Field | Section"]
    doc: str = ""
    partial: bool = False


Spec = Field | Section


def integer(default: Any, doc: str, lo: float | None = None, hi: float | None = None, nullable: bool = False) -> Field:
    return Field("int", default, doc, nullable=nullable, lo=lo, hi=hi)


def number(default: Any, doc: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, nullable: bool = False) -> Field:
    return Field("float", default, doc, nullable=nullable, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def string(default: Any, doc: str, nullable: bool = False, choices: tuple[str, ...] | None = None,
         check: Callable[[str, Any], None] | None = None) -> Field:
    return Field("str", default, doc, nullable=nullable, choices=choices, check=check)


def boolean(default: bool, doc: str) -> Field:
    return Field("bool", default, doc)


# ----------------------------------------------------------------------------------------- messages
def fmt(value: Any) -> str:
    """A value as the user wrote it in YAML (null/true/false, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def fail(key: str, value: Any, problem: str) -> None:
    raise ConfigError(f"{key} = {fmt(value)}: {problem}")


def suggest(name: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def join_key(prefix: str, name: str | int) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _num_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def describe(spec: Spec) -> str:
    """What a field accepts, in words: 'an integer from 1 to 5', "one of 'local', 'ray'"..."""
    if isinstance(spec, Section):
        return "a mapping"
    if spec.choices is not None:
        text = "one of " + ", ".join(fmt(c) for c in spec.choices)
    elif spec.kind in ("int", "float"):
        text = ("an integer" if spec.kind == "int" else "a number") + _range_text(spec)
    else:
        text = {"str": "a string", "bool": "true or false", "dict": "a mapping",
                "list": "a list" + (f" of {_plural(spec.item)}" if spec.item is not None else "")}[spec.kind]
    return f"null or {text}" if spec.nullable else text


def _plural(item: Spec) -> str:
    if isinstance(item, Section):
        return "mappings"
    return {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans"}.get(item.kind, "values")


def _range_text(spec: Field) -> str:
    lo, hi = spec.lo, spec.hi
    if lo is not None and hi is not None:
        if spec.kind == "int" and not spec.lo_open and not spec.hi_open:
            return f" from {_num_text(lo)} to {_num_text(hi)}"
        return f" in {'(' if spec.lo_open else '['}{_num_text(lo)}, {_num_text(hi)}{')' if spec.hi_open else ']'}"
    if lo is not None:
        return f" {'>' if spec.lo_open else '>='} {_num_text(lo)}"
    if hi is not None:
        return f" {'<' if spec.hi_open else '<='} {_num_text(hi)}"
    return ""


# --------------------------------------------------------------------------------------- validation
def validate_section(section: Section, raw: Any, prefix: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(prefix or "<config>", raw, f"must be a mapping with keys {', '.join(section.fields)}")
    for name in raw:
        if name not in section.fields:
            fail(join_key(prefix, name), raw[name], f"unknown key{suggest(name, section.fields)}; "
                                                  f"allowed here: {', '.join(section.fields)}")
    out: dict[str, Any] = {}
    for name, spec in section.fields.items():
        key = join_key(prefix, name)
        if name in raw:
            out[name] = validate_value(spec, raw[name], key)
        elif section.partial:
            continue
        elif isinstance(spec, Section):
            out[name] = validate_section(spec, {}, key)
        elif spec.default is REQUIRED:
            raise ConfigError(f"{key}: missing; must be {describe(spec)}")
        else:
            out[name] = validate_value(spec, copy.deepcopy(spec.default), key)
    return out


def validate_value(spec: Spec, value: Any, key: str) -> Any:
    if isinstance(spec, Section):
        return validate_section(spec, value, key)
    if value is None:
        if spec.nullable:
            return None
        fail(key, value, f"must be {describe(spec)}")
    value = _check_type(spec, value, key)
    if spec.choices is not None and value not in spec.choices:
        fail(key, value, f"must be {describe(spec)}{suggest(value, map(str, spec.choices))}")
    if spec.kind in ("int", "float") and not _in_range(spec, value):
        fail(key, value, f"must be {describe(spec)}")
    if spec.kind == "list" and spec.item is not None:
        value = [validate_value(spec.item, v, join_key(key, i)) for i, v in enumerate(value)]
    if spec.check is not None:
        spec.check(key, value)
    return value


def _check_type(spec: Field, value: Any, key: str) -> Any:
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict) and all(isinstance(k, str) for k in value),
    }[spec.kind]
    if not ok or (spec.kind == "float" and not math.isfinite(value)):
        fail(key, value, f"must be {describe(spec)}")
    return float(value) if spec.kind == "float" else value


def _in_range(spec: Field, x: float) -> bool:
    if spec.lo is not None and (x <= spec.lo if spec.lo_open else x < spec.lo):
        return False
    if spec.hi is not None and (x >= spec.hi if spec.hi_open else x > spec.hi):
        return False
    return True




# ---------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[str, Any]:
    """'stream.severity=3' -> ('stream.severity', 3); the value is read as a YAML scalar or list."""
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"override {item!r}: must be key=value with a dotted key, e.g. stream.severity=3")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key.strip()} = {text!r}: not a YAML value ({exc.__class__.__name__})") from None
    if isinstance(value, dict) and not text.strip().startswith("{"):
        value = text.strip()  # 'timm:' is a name here, not a mapping; mappings need braces
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], schema: Section) -> dict[str, Any]:
    """Return a copy of `raw` with each `key=value` set; keys must exist in `schema`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, schema, key, value)
    return raw


def _set_dotted(raw: dict[str, Any], schema: Section, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    spec: Spec | None = schema  # None = inside a free-form mapping: anything goes, validated later
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth])
        if isinstance(spec, Field) and spec.kind == "list":
            node, spec = _descend_list(node, spec, part, key, value, where), spec.item
            if last:
                fail(key, value, "cannot replace a whole list item; set its keys, e.g. "
                                  f"{key}.fraction=0.5")
            continue
        if isinstance(spec, Section):
            if part not in spec.fields:
                fail(key, value, f"unknown key{suggest(part, spec.fields)}"
                                  f"{' in ' + repr(where) if where else ''}; allowed: {', '.join(spec.fields)}")
            spec = spec.fields[part]
        elif isinstance(spec, Field) and spec.kind != "dict":
            fail(key, value, f"'{where}' is {describe(spec)}, it has no key '{part}'")
        else:
            spec = None
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(spec, Field) and spec.kind == "list" else {}
            node = node[part]


def _descend_list(node: Any, spec: Field, part: str, key: str, value: Any, where: str) -> Any:
    if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
        size = len(node) if isinstance(node, list) else 0
        fail(key, value, f"'{where}' has {size} item(s); address one as {where}.<index 0..{max(size - 1, 0)}>")
    item = node[int(part)]
    if not isinstance(item, dict):
        node[int(part)] = item = {}
    return item


# --------------------------------------------------------------------------------- method settings
def setting(default: Any, doc: str, *, kind: str | None = None, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, choices: tuple[Any, ...] | None = None,
            nullable: bool = False, item: Field | None = None) -> Field:
    """A method setting; its kind follows the default's type unless given (a None default needs `kind`)."""
    if kind is None:
        if default is None:
            raise TypeError(f"setting {doc!r}: a None default needs an explicit kind")
        kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}[type(default)]
    return Field(kind, default, doc, nullable=nullable or default is None, choices=choices, lo=lo, hi=hi,
                 lo_open=lo_open, hi_open=hi_open, item=item)


class Settings(Mapping[str, Any]):
    """A method's resolved settings: every key with the value in force, read-only, picklable (Ray ships it)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"
