"""Run and pretrain configurations: a declarative schema, YAML loading, dotted overrides, one validation.

Configs are data. The schema below is the single source of every key's type, default, allowed values and
meaning, so defaults, error messages and the README's table cannot drift apart. A config is validated once,
here; everything downstream receives a plain nested dict it can trust (defaults filled, data root resolved).
Names that other modules own (methods, models, corruptions, data sources) are checked against their
registries, imported lazily so that reading this module stays cheap.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import yaml

from cema_ray.errors import ConfigError, DataError

REQUIRED: Any = object()
"""Default of a field the user must give."""

PROTOCOLS = ("continual", "reset", "mixed", "gradual", "label_shift")
STANDARD_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# (environment variable, default root) per data source, used when the source's registry entry does not
# carry its own `env_var` / `default_root` attributes.
SOURCE_ROOTS: dict[str, tuple[str | None, str | None]] = {
    "fashion-mnist": ("CEMA_FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"),
    "cifar10-folder": ("CEMA_CIFAR10_ROOT", None),
    "imagenet-c": ("CEMA_IMAGENETC_ROOT", None),
}


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


def _int(default: Any, doc: str, lo: float | None = None, hi: float | None = None, nullable: bool = False) -> Field:
    return Field("int", default, doc, nullable=nullable, lo=lo, hi=hi)


def _num(default: Any, doc: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, nullable: bool = False) -> Field:
    return Field("float", default, doc, nullable=nullable, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def _str(default: Any, doc: str, nullable: bool = False, choices: tuple[str, ...] | None = None,
         check: Callable[[str, Any], None] | None = None) -> Field:
    return Field("str", default, doc, nullable=nullable, choices=choices, check=check)


def _bool(default: bool, doc: str) -> Field:
    return Field("bool", default, doc)


# ------------------------------------------------------------------------------ lazy registry checks
def _check_model(key: str, name: str) -> None:
    from cema_ray.models.factory import MODELS, TIMM_PREFIX

    if name in MODELS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return
    _fail(key, name, f"unknown model{_suggest(name, MODELS.names())}; known: {', '.join(MODELS.names())}, "
                     f"or '{TIMM_PREFIX}<name>' for any timm model")


def _check_corruption(key: str, name: str) -> None:
    from cema_ray.data.corruptions import CORRUPTIONS

    known = [*CORRUPTIONS, "clean"]
    if name not in known:
        _fail(key, name, f"unknown corruption{_suggest(name, known)}; known: {', '.join(known)}")


def _check_source(key: str, name: str) -> None:
    from cema_ray.data.sources import DATA_SOURCES

    if name not in DATA_SOURCES:
        known = list(DATA_SOURCES)
        _fail(key, name, f"unknown data source{_suggest(name, known)}; known: {', '.join(known)}")


def _check_method(key: str, name: str) -> None:
    methods = method_registry()
    if name not in methods:
        _fail(key, name, f"unknown method{_suggest(name, methods.names())}; known: {', '.join(methods.names())}")


def method_registry() -> Any:
    """METHODS after `import cema_ray.methods`, which registers every method and preset."""
    import cema_ray.methods  # noqa: F401  (registers)
    from cema_ray.methods.base import METHODS

    return METHODS


# ------------------------------------------------------------------------------------- the schemas
def _stream_fields() -> dict[str, Spec]:
    return {
        "protocol": _str("continual", "order of domains: continual (no resets), reset (reset at each new domain), "
                         "mixed (all domains shuffled together), gradual (severity 1..5..1 per corruption), "
                         "label_shift (Dirichlet label-correlated order)", choices=PROTOCOLS),
        "corruptions": Field("list", list(STANDARD_CORRUPTIONS), "corruption sequence ('clean' = none); "
                             "default: the 15 standard ones in order",
                             item=_str(REQUIRED, "corruption", check=_check_corruption)),
        "severity": _int(5, "corruption severity", lo=1, hi=5),
        "batch_size": _int(64, "samples per edge batch", lo=1),
        "samples_per_domain": _int(1000, "samples each edge sees per domain", lo=1),
        "dirichlet_alpha": _num(0.1, "label-shift concentration (smaller = more correlated labels)",
                                lo=0, lo_open=True),
    }


GROUP = Section({
    "name": _str(None, "label of the group in reports (default g<index>)", nullable=True),
    "fraction": _num(REQUIRED, "share of the edges in this group", lo=0, hi=1, lo_open=True),
    "stream": Section(_stream_fields(), "stream keys that differ from the top-level stream", partial=True),
    "frame_rate": _num(None, "batches per second (null = as fast as possible)", lo=0, lo_open=True, nullable=True),
    "uplink_samples_per_s": _num(None, "upload budget in samples per second (null = unlimited)", lo=0,
                                 lo_open=True, nullable=True),
    "uplink_bytes_per_s": _num(None, "upload budget in bytes per second (null = unlimited)", lo=0,
                               lo_open=True, nullable=True),
}, "one group of edges with its own stream, frame rate and uplink")

# Per-edge values drawn from distributions (`edges.distributions`): the keys a distribution may set, each with the
# field that every drawn value must satisfy, and the forms of distribution (one per key).
PROFILE_KEYS = ("frame_rate", "uplink_samples_per_s", "uplink_bytes_per_s")
DISTRIBUTION_TARGETS: dict[str, Field] = {**_stream_fields(), **{k: GROUP.fields[k] for k in PROFILE_KEYS}}
DISTRIBUTION_FORMS = ("choice", "uniform", "loguniform", "randint", "permute")

RUN_SCHEMA = Section({
    "name": _str(REQUIRED, "run name (default: the config file's stem)"),
    "runtime": _str("ray", "where edges and cloud run: local (one process) or ray (actors)",
                    choices=("local", "ray")),
    "mode": _str("sync", "sync: rounds in the reference order; async: edges never wait for the cloud",
                 choices=("sync", "async")),
    "seed": _int(0, "seed of every random choice"),
    "threads": _int(None, "torch threads of the local runtime and of bench's runs and evaluations, set once at "
                          "start and written to summary.json (null: $OMP_NUM_THREADS if set, else the CPUs "
                          "Ray assigned this task, else the cores the OS lets this process use: CPU affinity "
                          "and cgroup quota); Ray's hosts and cloud use ray.host_num_cpus / cloud.threads",
                    lo=1, nullable=True),
    "data": Section({
        "source": _str("fashion-mnist", "data source name (see `cema-ray list`)", check=_check_source),
        "root": _str(None, "data folder (null: the source's env var, then its default)", nullable=True),
        "split": _str("test", "which split the streams draw from", choices=("train", "test")),
        "cache_dir": _str(None, "where decoded arrays are cached (null: the source's default)", nullable=True),
        "num_classes": _int(None, "number of classes (null: from the data)", lo=1, nullable=True),
    }),
    "models": Section({
        "edge": Section({
            "name": _str("cema_resnet_s", "edge model name", check=_check_model),
            "checkpoint": _str(None, "safetensors checkpoint (timm: local weights file)", nullable=True),
            "allow_unverified": _bool(False, "load a checkpoint whose card has no sha256 (nothing vouches for its "
                                             "bytes; a warning says so)"),
        }),
        "foundation": Section({
            "name": _str("cema_resnet_l", "foundation model name", check=_check_model),
            "checkpoint": _str(None, "safetensors checkpoint (timm: local weights file)", nullable=True),
            "allow_unverified": _bool(False, "load a checkpoint whose card has no sha256 (nothing vouches for its "
                                             "bytes; a warning says so)"),
        }),
    }),
    "stream": Section(_stream_fields(), "the stream every edge sees unless its group overrides it"),
    "edges": Section({
        "count": _int(32, "number of (virtual) edges", lo=1),
        "per_host": _int(8, "virtual edges multiplexed on one EdgeHost actor", lo=1),
        "hosts": _int(None, "EdgeHost actors (null: ceil(count / per_host))", lo=1, nullable=True),
        "groups": Field("list", [], "heterogeneous edge groups; edges not covered use the top-level stream",
                        item=GROUP),
        "distributions": Field("dict", {}, "per-edge values drawn with seed (heterogeneity_seed, edge id, key): "
                               "<key>: {choice: [v, ...], weights: [w, ...]}, {uniform: [lo, hi]}, "
                               "{loguniform: [lo, hi]}, {randint: [lo, hi]} or {permute: [c, ...]} (corruptions "
                               "only); keys: the group stream keys, frame_rate, uplink_samples_per_s, "
                               "uplink_bytes_per_s; a group's own keys win"),
        "heterogeneity_seed": _int(None, "seed of per-edge variation (null: the run seed)", nullable=True),
    }),
    "method": Section({
        "name": _str("cema", "method or preset (see `cema-ray list`)", check=_check_method),
        "publish_every": _int(1, "cloud publishes norm parameters every K edge batches", lo=1),
        "student_scope": _str("shared", "one student for all edges, or one per edge",
                              choices=("shared", "per_edge")),
        "settings": Field("dict", {}, "method settings; keys must be among the method's defaults"),
    }),
    "cloud": Section({
        "queue_capacity": _int(8192, "uploaded samples the cloud queues before dropping", lo=1),
        "num_cpus": _num(1.0, "CPUs reserved for the cloud actor", lo=0, lo_open=True),
        "threads": _int(None, "torch threads of the cloud actor (null: cloud.num_cpus rounded up)", lo=1,
                        nullable=True),
        "checkpoint_every": _int(10, "Ray runtime: checkpoint the cloud's state to <out>/cloud_checkpoints every N "
                                     "deliveries (a sync round, or one host's uploads in async); 0 = off, and a "
                                     "dead cloud then ends the run", lo=0),
        "max_restarts": _int(-1, "times Ray may restart a dead cloud actor (-1: no limit)", lo=-1),
        "checkpoint_dir": _str(None, "folder of the cloud's checkpoints, which the node that restarts the cloud must "
                                     "read (null: <output folder>/cloud_checkpoints, the local staging folder for a "
                                     "URI); on a multi-node cluster it must be an absolute path on a shared file "
                                     "system", nullable=True),
    }),
    "ray": Section({
        "address": _str(None, "cluster to join: an address, or auto (the one running on this machine); "
                              "null: start a new local instance", nullable=True),
        "num_cpus": _int(None, "logical CPUs of a local instance (null: Ray's default)", lo=1, nullable=True),
        "object_store_memory_mb": _int(256, "object store of a local instance, MiB (Ray needs >= 75)",
                                       lo=75, nullable=True),
        "host_num_cpus": _num(0.5, "CPUs reserved per EdgeHost actor", lo=0, lo_open=True),
        "host_memory_mb": _int(700, "memory reserved per EdgeHost actor, MiB (admission only)", lo=0),
        "max_in_flight_per_host": _int(2, "outstanding step calls per host", lo=1),
        "backlog_full": _str("drop_oldest", "async mode, when the uploads waiting for the cloud reach their bound "
                             "(2 x hosts deliveries): drop the oldest (edges never wait; counted in dropped) or "
                             "wait (hosts pause until the cloud catches up: nothing dropped)",
                             choices=("drop_oldest", "wait")),
        "host_nice": _int(4, "niceness added to EdgeHost processes (Ray starts workers at 15; 19 is the most): "
                             "the cloud wins the CPU when edges and cloud share a node (num_cpus only admits)",
                          lo=0, hi=19),
        "malloc_keep_mb": _int(256, "EdgeHost and cloud processes: glibc malloc serves buffers below 32 MB from its "
                                    "heap and keeps up to this many MiB of freed memory for reuse, instead of "
                                    "mapping and unmapping torch's buffers at every batch (0: glibc's defaults)",
                               lo=0),
        "include_dashboard": _bool(True, "start the Ray dashboard (local instance)"),
        "dashboard_host": _str("127.0.0.1", "dashboard bind address (keep loopback unless token auth is on)"),
    }),
    "faults": Section({
        "kill_hosts": _int(0, "EdgeHost actors to kill during the run (fault injection)", lo=0),
        "kill_cloud": _int(0, "times to kill the cloud actor during the run (needs cloud.checkpoint_every > 0)",
                           lo=0),
        "bad_batches": _int(0, "malformed batches injected into the edges' streams (NaN, Inf, wrong shape, wrong "
                               "dtype, labels out of range, empty, in turn): each is rejected and counted", lo=0),
        "raise_in_hosts": _int(0, "EdgeHost steps that raise an exception during the run (fault injection)", lo=0),
        "slow_cloud_s": _num(0.0, "extra seconds the cloud sleeps per delivery: rehearses a cloud that cannot "
                                  "keep up (backpressure)", lo=0),
        "seed": _int(0, "seed of when and which actors are killed"),
    }),
    "output": Section({
        "dir": _str(None, "output folder, or a URI pyarrow's filesystems open (s3://bucket/prefix, gs://, hdfs://, "
                          "file://) (null: $CEMA_RAY_STORAGE/<name>-<timestamp>, else ~/cema_ray_runs/... under a "
                          "Ray job, else runs/<name>-<timestamp>)", nullable=True),
        "progress": _bool(True, "show progress bars"),
        "report": _bool(True, "write report.md and its plots"),
    }),
})

PRETRAIN_SCHEMA = Section({
    "name": _str(REQUIRED, "pretrain run name (default: the config file's stem)"),
    "seed": _int(0, "seed of every random choice"),
    "data": Section({
        "source": _str("fashion-mnist", "data source name", check=_check_source),
        "root": _str(None, "data folder (null: the source's env var, then its default)", nullable=True),
        "cache_dir": _str(None, "where decoded arrays are cached", nullable=True),
    }),
    "model": Section({
        "name": _str(REQUIRED, "model name", check=_check_model),
        "role": _str(REQUIRED, "which model of a run this becomes", choices=("edge", "foundation")),
        "init_checkpoint": _str(None, "start from this checkpoint's weights (same architecture; a second "
                                "training stage) instead of a random initialisation", nullable=True),
    }),
    "train": Section({
        "epochs": _int(10, "training epochs", lo=1),
        "batch_size": _int(128, "training batch size", lo=1),
        "lr": _num(0.1, "peak SGD learning rate", lo=0, lo_open=True),
        "weight_decay": _num(5e-4, "SGD weight decay", lo=0),
        "momentum": _num(0.9, "SGD momentum", lo=0, hi=1, hi_open=True),
        "augment": _str("basic", "basic (crop + flip) or augmix (adds AugMix for robustness)",
                        choices=("basic", "augmix")),
        "label_smoothing": _num(0.0, "cross-entropy label smoothing", lo=0, hi=1, hi_open=True),
        "threads": _int(None, "torch threads (null: torch's default)", lo=1, nullable=True),
        "eval_every": _int(1, "evaluate on the test split every N epochs", lo=1),
    }),
    "output": Section({
        "checkpoint": _str(REQUIRED, "where the safetensors checkpoint (+ .json card) is written"),
        "work_dir": _str("pretrain_work", "scratch folder for partial checkpoints and logs"),
    }),
})


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


def _fail(key: str, value: Any, problem: str) -> None:
    raise ConfigError(f"{key} = {fmt(value)}: {problem}")


def _suggest(name: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _join(prefix: str, name: str | int) -> str:
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
def _validate_section(section: Section, raw: Any, prefix: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(prefix or "<config>", raw, f"must be a mapping with keys {', '.join(section.fields)}")
    for name in raw:
        if name not in section.fields:
            _fail(_join(prefix, name), raw[name], f"unknown key{_suggest(name, section.fields)}; "
                                                  f"allowed here: {', '.join(section.fields)}")
    out: dict[str, Any] = {}
    for name, spec in section.fields.items():
        key = _join(prefix, name)
        if name in raw:
            out[name] = _validate_value(spec, raw[name], key)
        elif section.partial:
            continue
        elif isinstance(spec, Section):
            out[name] = _validate_section(spec, {}, key)
        elif spec.default is REQUIRED:
            raise ConfigError(f"{key}: missing; must be {describe(spec)}")
        else:
            out[name] = _validate_value(spec, copy.deepcopy(spec.default), key)
    return out


def _validate_value(spec: Spec, value: Any, key: str) -> Any:
    if isinstance(spec, Section):
        return _validate_section(spec, value, key)
    if value is None:
        if spec.nullable:
            return None
        _fail(key, value, f"must be {describe(spec)}")
    value = _check_type(spec, value, key)
    if spec.choices is not None and value not in spec.choices:
        _fail(key, value, f"must be {describe(spec)}{_suggest(value, map(str, spec.choices))}")
    if spec.kind in ("int", "float") and not _in_range(spec, value):
        _fail(key, value, f"must be {describe(spec)}")
    if spec.kind == "list" and spec.item is not None:
        value = [_validate_value(spec.item, v, _join(key, i)) for i, v in enumerate(value)]
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
        _fail(key, value, f"must be {describe(spec)}")
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
                _fail(key, value, "cannot replace a whole list item; set its keys, e.g. "
                                  f"{key}.fraction=0.5")
            continue
        if isinstance(spec, Section):
            if part not in spec.fields:
                _fail(key, value, f"unknown key{_suggest(part, spec.fields)}"
                                  f"{' in ' + repr(where) if where else ''}; allowed: {', '.join(spec.fields)}")
            spec = spec.fields[part]
        elif isinstance(spec, Field) and spec.kind != "dict":
            _fail(key, value, f"'{where}' is {describe(spec)}, it has no key '{part}'")
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
        _fail(key, value, f"'{where}' has {size} item(s); address one as {where}.<index 0..{max(size - 1, 0)}>")
    item = node[int(part)]
    if not isinstance(item, dict):
        node[int(part)] = item = {}
    return item


# ------------------------------------------------------------------------------------ data roots
def source_root_info(source: str) -> tuple[str | None, str | None]:
    """(environment variable, default root) of a data source: its registry entry's, else SOURCE_ROOTS."""
    env, default = SOURCE_ROOTS.get(source, (None, None))
    try:
        from cema_ray.data.sources import DATA_SOURCES

        entry = DATA_SOURCES.get(source) if source in DATA_SOURCES else None
    except ImportError:
        entry = None
    env = getattr(entry, "env_var", env)
    default = getattr(entry, "default_root", default)
    return env, (None if default is None else str(default))


def resolve_data_root(source: str, root: str | None, key: str = "data.root", check: bool = True) -> str | None:
    """The folder a source reads: `root`, else $ENV, else the source's default; checked to exist."""
    env, default = source_root_info(source)
    if root is not None:
        path, origin = os.path.expanduser(root), f"set by {key}"
    elif env and os.environ.get(env):
        path, origin = os.path.expanduser(os.environ[env]), f"from ${env}"
    else:
        path, origin = default, "the default"
    if path is None:
        if env is not None and check:
            _fail(key, root, f"no folder for data source '{source}'; set ${env} or {key} to it")
        return None
    if check and not Path(path).exists():
        how = f"set ${env} or {key}" if env else f"set {key}"
        _fail(key, root, f"data folder {path} ({origin}) does not exist; {how} to the '{source}' data")
    return path


# ------------------------------------------------------------------------------------- cross checks
# Settings a method may also read that the config holds elsewhere: the config's key is the source of truth.
MIRRORED_SETTINGS = {"publish_every": "method.publish_every", "student_scope": "method.student_scope",
                     "num_classes": "data.num_classes"}


def _check_settings(cfg: dict[str, Any]) -> None:
    """method.settings: known keys only (those of the method's defaults), same type as the default.

    Settings that mirror a config key (MIRRORED_SETTINGS) take that key's value, so the method and the
    runtime cannot disagree; giving both with different values is an error.
    """
    method = cfg["method"]
    spec = method_registry().get(method["name"])
    if getattr(spec, "needs_labels", False) and cfg["runtime"] != "local":
        _fail("method.name", method["name"], "is a reference trained on the stream's true labels; it needs runtime: local")
    defaults = dict(spec.defaults)
    for name, source in MIRRORED_SETTINGS.items():
        section, key = source.split(".")
        value = cfg[section][key]
        if name not in defaults or value is None:
            continue
        if name in method["settings"] and method["settings"][name] != value:
            _fail(f"method.settings.{name}", method["settings"][name],
                  f"conflicts with {source} = {fmt(value)}; set {source} only")
        method["settings"][name] = value
    for name, value in method["settings"].items():
        key = f"method.settings.{name}"
        if name not in defaults:
            _fail(key, value, f"unknown setting of method '{method['name']}'{_suggest(name, defaults)}; "
                              f"known: {', '.join(sorted(defaults)) or '(none)'}")
        typed = getattr(spec, "nullable_settings", {}).get(name)
        method["settings"][name] = (_validate_value(typed, value, key) if typed is not None and defaults[name] is None
                                    else _like_default(key, value, defaults[name]))
    method["settings"] = {**copy.deepcopy(defaults), **method["settings"]}


def _like_default(key: str, value: Any, default: Any) -> Any:
    if default is None:
        return value
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, what = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, what = isinstance(value, (list, tuple)), "a list"
    else:
        ok, what = True, ""
    if not ok:
        _fail(key, value, f"must be {what} (default {fmt(default)})")
    return value


def _check_groups(edges: dict[str, Any]) -> None:
    for i, group in enumerate(edges["groups"]):
        if group["name"] is None:
            group["name"] = f"g{i}"
    total = sum(g["fraction"] for g in edges["groups"])
    if total > 1 + 1e-9:
        fractions = [g["fraction"] for g in edges["groups"]]
        _fail("edges.groups", fractions, f"fractions sum to {total:g}; they must sum to at most 1")
    names = [g["name"] for g in edges["groups"]]
    if len(set(names)) != len(names):
        _fail("edges.groups", names, "group names must be distinct")
    if edges["hosts"] is not None and edges["hosts"] > edges["count"]:
        _fail("edges.hosts", edges["hosts"], f"must be at most edges.count ({edges['count']})")


def _check_distributions(edges: dict[str, Any]) -> None:
    """edges.distributions: known keys, one form each, and every value a draw can give valid for its key.

    Normalises in place: numbers of number keys become floats, randint bounds stay integers.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, dist in edges["distributions"].items():
        key = f"edges.distributions.{name}"
        if name not in DISTRIBUTION_TARGETS:
            _fail(key, dist, f"unknown key{_suggest(name, DISTRIBUTION_TARGETS)}; "
                             f"allowed: {', '.join(DISTRIBUTION_TARGETS)}")
        forms_text = ", ".join(DISTRIBUTION_FORMS)
        if not isinstance(dist, dict) or not all(isinstance(k, str) for k in dist):
            _fail(key, dist, f"must be a mapping with one of {forms_text}, e.g. {{choice: [16, 32]}}")
        for form in dist:
            if form not in (*DISTRIBUTION_FORMS, "weights"):
                _fail(_join(key, form), dist[form], f"unknown distribution{_suggest(form, DISTRIBUTION_FORMS)}; "
                                                    f"allowed: {forms_text} (and weights with choice)")
        forms = [f for f in dist if f in DISTRIBUTION_FORMS]
        if len(forms) != 1:
            _fail(key, dist, f"give exactly one of {forms_text}" + (f"; got {', '.join(forms)}" if forms else ""))
        form = forms[0]
        if "weights" in dist and form != "choice":
            _fail(_join(key, "weights"), dist["weights"], f"weights go with choice, not {form}")
        spec = DISTRIBUTION_TARGETS[name]
        if form == "choice":
            out[name] = _check_choice(key, name, spec, dist)
        elif form == "permute":
            if name != "corruptions":
                _fail(_join(key, form), dist[form], "permute shuffles a list per edge: only "
                                                    "edges.distributions.corruptions takes it")
            out[name] = {form: _drawable(name, spec, dist[form], _join(key, form))}
        else:
            out[name] = {form: _check_bounds(key, name, spec, form, dist[form])}
    edges["distributions"] = out


def _drawable(name: str, spec: Field, value: Any, key: str) -> Any:
    """One value a distribution can give `name`, validated as the key itself would be."""
    if name == "corruptions" and not isinstance(value, list):
        _fail(key, value, "must be a list of corruption names (a choice picks a whole list, e.g. "
                          "{choice: [[fog], [snow, frost]]})")
    value = _validate_value(spec, value, key)
    if name == "corruptions" and not value:
        _fail(key, value, "must be a non-empty list of corruption names")
    return value


def _check_choice(key: str, name: str, spec: Field, dist: dict[str, Any]) -> dict[str, Any]:
    values, ckey = dist["choice"], _join(key, "choice")
    if not isinstance(values, list) or not values:
        _fail(ckey, values, f"must be a non-empty list of values for {name}")
    out: dict[str, Any] = {"choice": [_drawable(name, spec, v, _join(ckey, i)) for i, v in enumerate(values)]}
    if "weights" in dist:
        weights, wkey = dist["weights"], _join(key, "weights")
        if not isinstance(weights, list) or len(weights) != len(values):
            _fail(wkey, weights, f"must be a list of {len(values)} numbers >= 0, one per choice")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                _fail(_join(wkey, i), w, "must be a number >= 0")
        if not sum(weights) > 0:
            _fail(wkey, weights, "must not all be 0")
        out["weights"] = [float(w) for w in weights]
    return out


def _check_bounds(key: str, name: str, spec: Field, form: str, bounds: Any) -> list[Any]:
    bkey = _join(key, form)
    if form in ("uniform", "loguniform") and spec.kind != "float":
        hint = "use randint" if spec.kind == "int" else "use choice"
        _fail(bkey, bounds, f"{form} draws real numbers; {name} must be {describe(spec)}: {hint}")
    if form == "randint" and spec.kind not in ("int", "float"):
        _fail(bkey, bounds, f"randint draws integers; {name} must be {describe(spec)}: use choice")
    integer = form == "randint"
    what = "integers" if integer else "numbers"
    if not isinstance(bounds, list) or len(bounds) != 2 or any(
            isinstance(b, bool) or not isinstance(b, int if integer else (int, float))
            or (isinstance(b, float) and not math.isfinite(b)) for b in bounds):
        _fail(bkey, bounds, f"must be [lo, hi], two {what}")
    lo, hi = bounds
    if lo > hi:
        _fail(bkey, bounds, f"lo ({fmt(lo)}) must be <= hi ({fmt(hi)})")
    if form == "loguniform" and lo <= 0:
        _fail(bkey, bounds, "loguniform needs lo > 0")
    bound_spec = Field(spec.kind, doc=spec.doc, lo=spec.lo, hi=spec.hi, lo_open=spec.lo_open, hi_open=spec.hi_open)
    for i, b in enumerate(bounds):
        _validate_value(bound_spec, b, _join(bkey, i))  # a draw lies in [lo, hi]: both ends must be valid values
    return [int(lo), int(hi)] if integer else [float(lo), float(hi)]


def _check_corruption_lists(cfg: dict[str, Any]) -> None:
    lists = [("stream.corruptions", cfg["stream"].get("corruptions"))]
    lists += [(f"edges.groups.{i}.stream.corruptions", g["stream"].get("corruptions"))
              for i, g in enumerate(cfg["edges"]["groups"])]
    for key, names in lists:
        if names is not None and not names:
            _fail(key, names, "must be a non-empty list of corruption names")


def _check_faults(cfg: dict[str, Any]) -> None:
    if cfg["faults"]["kill_cloud"] and not cfg["cloud"]["checkpoint_every"]:
        _fail("faults.kill_cloud", cfg["faults"]["kill_cloud"],
              "a killed cloud restarts from its checkpoint: set cloud.checkpoint_every > 0")
    if cfg["faults"]["kill_cloud"] and cfg["cloud"]["max_restarts"] == 0:
        _fail("faults.kill_cloud", cfg["faults"]["kill_cloud"], "cloud.max_restarts is 0: a killed cloud cannot restart")


def _check_corrupted_source(cfg: dict[str, Any], raw_data: dict[str, Any], check_files: bool) -> None:
    """A source that ships its corrupted domains: no split settings, no clean domain, and (with the files
    checked) every domain file the streams need present, read before any run starts."""
    try:
        from cema_ray.data.sources import DATA_SOURCES
    except ImportError:
        return
    source = cfg["data"]["source"]
    info = DATA_SOURCES.get(source) if source in DATA_SOURCES else None
    if getattr(info, "kind", None) != "corrupted":
        return
    for key, default in (("split", "test"), ("cache_dir", None)):
        if key in raw_data and raw_data[key] != default:
            _fail(f"data.{key}", raw_data[key], f"data source '{source}' ships its corrupted test images as they "
                                                f"are and ignores data.{key}: remove it")
    names = needed_corruptions(cfg)
    if "clean" in names:
        _fail("stream.corruptions", "clean", f"data source '{source}' has no clean images; drop 'clean' or use a "
                                             f"clean source (see `cema-ray list`)")
    if check_files and info.check_files is not None and cfg["data"]["root"] is not None:
        try:
            info.check_files(Path(cfg["data"]["root"]), names)
        except DataError as exc:
            raise ConfigError(f"data.root: {exc}") from None


def needed_corruptions(cfg: dict[str, Any]) -> list[str]:
    """Every corruption some edge's stream can visit: the top-level list, the groups' and the distributions'."""
    lists = [cfg["stream"]["corruptions"]]
    lists += [g["stream"]["corruptions"] for g in cfg["edges"]["groups"] if "corruptions" in g["stream"]]
    dist = cfg["edges"]["distributions"].get("corruptions") or {}
    lists += [dist["permute"]] if "permute" in dist else [list(v) for v in dist.get("choice", [])]
    return list(dict.fromkeys(name for names in lists for name in names))


def merged_stream(cfg: dict[str, Any], group: dict[str, Any] | None) -> dict[str, Any]:
    """The full stream settings of a group's edges: the top-level stream with the group's keys on top."""
    return {**cfg["stream"], **(group["stream"] if group else {})}


# ------------------------------------------------------------------------------------------ loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate_run_config(raw: dict[str, Any], *, check_paths: bool = True) -> dict[str, Any]:
    """Validate a raw run config (overrides already applied) and return it with defaults filled."""
    cfg = _validate_section(RUN_SCHEMA, raw, "")
    _check_corruption_lists(cfg)
    _check_groups(cfg["edges"])
    _check_distributions(cfg["edges"])
    _check_settings(cfg)
    _check_faults(cfg)
    cfg["data"]["root"] = resolve_data_root(cfg["data"]["source"], cfg["data"]["root"], check=check_paths)
    _check_corrupted_source(cfg, raw.get("data") or {}, check_paths)
    return cfg


def validate_pretrain_config(raw: dict[str, Any], *, check_paths: bool = True) -> dict[str, Any]:
    """Validate a raw pretrain config and return it with defaults filled."""
    cfg = _validate_section(PRETRAIN_SCHEMA, raw, "")
    cfg["data"]["root"] = resolve_data_root(cfg["data"]["source"], cfg["data"]["root"], check=check_paths)
    init = cfg["model"]["init_checkpoint"]
    if init is not None and check_paths and not Path(init).is_file():
        raise ConfigError(f"model.init_checkpoint = {fmt(init)}: no such file")
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True) -> dict[str, Any]:
    """Read a run config, apply `key=value` overrides, fill defaults, validate once.

    `check_paths=False` skips the data-folder existence check (configs for data not on this machine).
    """
    raw = read_yaml(path)
    raw.setdefault("name", Path(path).stem)
    return validate_run_config(apply_overrides(raw, overrides, RUN_SCHEMA), check_paths=check_paths)


def load_pretrain_config(path: str | Path, overrides: Sequence[str] = (), *,
                         check_paths: bool = True) -> dict[str, Any]:
    """As load_config, for a pretraining config."""
    raw = read_yaml(path)
    raw.setdefault("name", Path(path).stem)
    return validate_pretrain_config(apply_overrides(raw, overrides, PRETRAIN_SCHEMA), check_paths=check_paths)


STORAGE_ENV = "CEMA_RAY_STORAGE"
JOB_STORAGE = "~/cema_ray_runs"  # under `ray job submit`: outside the working directory Ray unpacks for the job


def runs_root() -> Path:
    """Where runs go without output.dir: $CEMA_RAY_STORAGE, else ~/cema_ray_runs under a Ray job (the job's
    working directory is a temporary copy nobody finds again), else runs/ in the current directory."""
    if os.environ.get(STORAGE_ENV):
        return Path(os.environ[STORAGE_ENV]).expanduser()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for every job driver
        return Path(JOB_STORAGE).expanduser()
    return Path("runs")


def resolve_output_dir(cfg: dict[str, Any], now: datetime | None = None) -> Path | str:
    """output.dir (a URI stays a string), else <runs root>/<name>-<YYYYmmdd-HHMMSS> (`runs_root`)."""
    target = cfg["output"]["dir"]
    if target and "://" in target:
        return target
    if target:
        return Path(target).expanduser()
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return runs_root() / f"{cfg['name']}-{stamp}"


def schema_rows(schema: Section = RUN_SCHEMA, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, default, allowed, doc) for every leaf: what the README's configuration table lists."""
    for name, spec in schema.fields.items():
        key = _join(prefix, name)
        if isinstance(spec, Section) and spec.partial:
            yield f"{key}.<key>", "unset", f"any of: {', '.join(spec.fields)}", spec.doc
            continue
        if isinstance(spec, Section):
            yield from schema_rows(spec, key)
            continue
        default = "required" if spec.default is REQUIRED else fmt(spec.default)
        yield key, default, describe(spec), spec.doc
        if isinstance(spec.item, Section):
            yield from schema_rows(spec.item, key + ".<i>")
