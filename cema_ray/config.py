"""Run and pretrain configurations: a declarative schema, YAML loading, dotted overrides, one validation.

Configs are data. The schema below is the single source of every key's type, default, allowed values and
meaning, so defaults, error messages and the README's table cannot drift apart. A config is validated once,
here; everything downstream receives a plain nested dict it can trust (defaults filled, data root resolved).
Names that other modules own (methods, models, corruptions, data sources) are checked against their
registries, imported lazily so that reading this module stays cheap.

Why one module of ~560 lines: the run schema is one declarative table (every key with its type, range
and meaning) and the cross-checks read several of its sections at once; kept together, a reader sees
the whole configuration and every rule about it in one place. The engine is `schema.py`.
"""
from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from cema_ray.errors import ConfigError, DataError
from cema_ray.names import CORRUPTIONS, PROTOCOLS
from cema_ray.schema import (REQUIRED, Field, Section, Spec, apply_overrides, boolean, describe, fail, fmt, integer,
                             join_key, number, string, suggest, validate_section, validate_value)




# ------------------------------------------------------------------------------ lazy registry checks
def _check_model(key: str, name: str) -> None:
    from cema_ray.models.factory import MODELS, TIMM_PREFIX

    if name in MODELS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return
    fail(key, name, f"unknown model{suggest(name, MODELS.names())}; known: {', '.join(MODELS.names())}, "
                     f"or '{TIMM_PREFIX}<name>' for any timm model")


def _check_corruption(key: str, name: str) -> None:
    from cema_ray.data.corruptions import CORRUPTIONS

    known = [*CORRUPTIONS, "clean"]
    if name not in known:
        fail(key, name, f"unknown corruption{suggest(name, known)}; known: {', '.join(known)}")


def _check_source(key: str, name: str) -> None:
    from cema_ray.data.sources import DATA_SOURCES

    if name not in DATA_SOURCES:
        known = list(DATA_SOURCES)
        fail(key, name, f"unknown data source{suggest(name, known)}; known: {', '.join(known)}")


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Ray's built-in resources: reserved with cloud.num_cpus / num_gpus and ray.host_* instead of *.resources."""


def check_resources(key: str, value: dict[str, Any]) -> None:
    """A custom-resource mapping as Ray takes it: names to non-negative amounts, no built-in resource."""
    for name, amount in value.items():
        if name in RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            raise ConfigError(f"{key}.{name}: a resource Ray defines itself; reserve CPUs, GPUs and memory with the "
                              f"section's num_cpus / num_gpus / memory keys and name only custom resources here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{key}.{name} = {amount!r}: must be a non-negative number (the amount reserved)")


def _check_method(key: str, name: str) -> None:
    methods = method_registry()
    if name not in methods:
        fail(key, name, f"unknown method{suggest(name, methods.names())}; known: {', '.join(methods.names())}")


def method_registry() -> Any:
    """METHODS after `import cema_ray.methods`, which registers every method and preset."""
    import cema_ray.methods  # noqa: F401  (registers)
    from cema_ray.methods.base import METHODS

    return METHODS


# ------------------------------------------------------------------------------------- the schemas
def _stream_fields() -> dict[str, Spec]:
    return {
        "protocol": string("continual", "order of domains: continual (no resets), reset (reset at each new domain), "
                         "mixed (all domains shuffled together), gradual (severity 1..5..1 per corruption), "
                         "label_shift (Dirichlet label-correlated order)", choices=PROTOCOLS),
        "corruptions": Field("list", list(CORRUPTIONS), "corruption sequence ('clean' = none); "
                             "default: the 15 standard ones in order",
                             item=string(REQUIRED, "corruption", check=_check_corruption)),
        "severity": integer(5, "corruption severity", lo=1, hi=5),
        "batch_size": integer(64, "samples per edge batch", lo=1),
        "samples_per_domain": integer(1000, "samples each edge sees per domain", lo=1),
        "dirichlet_alpha": number(0.1, "label-shift concentration (smaller = more correlated labels)",
                                lo=0, lo_open=True),
    }


GROUP = Section({
    "name": string(None, "label of the group in reports (default g<index>)", nullable=True),
    "fraction": number(REQUIRED, "share of the edges in this group", lo=0, hi=1, lo_open=True),
    "stream": Section(_stream_fields(), "stream keys that differ from the top-level stream", partial=True),
    "frame_rate": number(None, "batches per second (null = as fast as possible)", lo=0, lo_open=True, nullable=True),
    "uplink_samples_per_s": number(None, "upload budget in samples per second (null = unlimited)", lo=0,
                                 lo_open=True, nullable=True),
    "uplink_bytes_per_s": number(None, "upload budget in bytes per second (null = unlimited)", lo=0,
                               lo_open=True, nullable=True),
    "model": Section({
        "name": string(None, "the group's edge model (null: models.edge)", nullable=True, check=_check_model),
        "checkpoint": string(None, "safetensors checkpoint (timm: local weights file)", nullable=True),
        "allow_unverified": boolean(False, "load a checkpoint whose card has no sha256"),
    }, "the edge model this group runs; groups of several architectures make a mixed fleet, whose cloud trains a "
       "student per architecture (cema-fleet, or an edge-only method)"),
}, "one group of edges with its own stream, frame rate, uplink and model")

# Per-edge values drawn from distributions (`edges.distributions`): the keys a distribution may set, each with the
# field that every drawn value must satisfy, and the forms of distribution (one per key).
PROFILE_KEYS = ("frame_rate", "uplink_samples_per_s", "uplink_bytes_per_s")
DISTRIBUTION_TARGETS: dict[str, Field] = {**_stream_fields(), **{k: GROUP.fields[k] for k in PROFILE_KEYS}}
DISTRIBUTION_FORMS = ("choice", "uniform", "loguniform", "randint", "permute")

RUN_SCHEMA = Section({
    "name": string(REQUIRED, "run name (default: the config file's stem)"),
    "runtime": string("ray", "where edges and cloud run: local (one process) or ray (actors)",
                    choices=("local", "ray")),
    "mode": string("sync", "sync: rounds in the reference order; async: edges never wait for the cloud",
                 choices=("sync", "async")),
    "seed": integer(0, "seed of every random choice"),
    "threads": integer(None, "torch threads of the local runtime and of bench's runs and evaluations, set once at "
                          "start and written to summary.json (null: $OMP_NUM_THREADS if set, else the CPUs "
                          "Ray assigned this task, else the cores the OS lets this process use: CPU affinity "
                          "and cgroup quota); Ray's hosts and cloud use ray.host_num_cpus / cloud.threads",
                    lo=1, nullable=True),
    "data": Section({
        "source": string("fashion-mnist", "data source name (see `cema-ray list`)", check=_check_source),
        "root": string(None, "data folder (null: the source's env var, then its default)", nullable=True),
        "split": string("test", "which split the streams draw from", choices=("train", "test")),
        "cache_dir": string(None, "where decoded arrays are cached (null: the source's default)", nullable=True),
        "num_classes": integer(None, "number of classes (null: from the data)", lo=1, nullable=True),
    }),
    "models": Section({
        "edge": Section({
            "name": string("cema_resnet_s", "edge model name", check=_check_model),
            "checkpoint": string(None, "safetensors checkpoint (timm: local weights file)", nullable=True),
            "allow_unverified": boolean(False, "load a checkpoint whose card has no sha256 (nothing vouches for its "
                                             "bytes; a warning says so)"),
        }),
        "foundation": Section({
            "name": string("cema_resnet_l", "foundation model name", check=_check_model),
            "checkpoint": string(None, "safetensors checkpoint (timm: local weights file)", nullable=True),
            "allow_unverified": boolean(False, "load a checkpoint whose card has no sha256 (nothing vouches for its "
                                             "bytes; a warning says so)"),
        }),
    }),
    "stream": Section(_stream_fields(), "the stream every edge sees unless its group overrides it"),
    "edges": Section({
        "count": integer(32, "number of (virtual) edges", lo=1),
        "per_host": integer(8, "virtual edges multiplexed on one EdgeHost actor", lo=1),
        "hosts": integer(None, "EdgeHost actors (null: ceil(count / per_host))", lo=1, nullable=True),
        "groups": Field("list", [], "heterogeneous edge groups; edges not covered use the top-level stream",
                        item=GROUP),
        "distributions": Field("dict", {}, "per-edge values drawn with seed (heterogeneity_seed, edge id, key): "
                               "<key>: {choice: [v, ...], weights: [w, ...]}, {uniform: [lo, hi]}, "
                               "{loguniform: [lo, hi]}, {randint: [lo, hi]} or {permute: [c, ...]} (corruptions "
                               "only); keys: the group stream keys, frame_rate, uplink_samples_per_s, "
                               "uplink_bytes_per_s; a group's own keys win"),
        "heterogeneity_seed": integer(None, "seed of per-edge variation (null: the run seed)", nullable=True),
        "fuse_samples": integer(128, "a host stacks the batches of its edges that hold the same published weights "
                                     "and batch size into forwards of up to this many samples (same predictions; "
                                     "0: one forward per edge)", lo=0),
    }),
    "method": Section({
        "name": string("cema", "method or preset (see `cema-ray list`)", check=_check_method),
        "publish_every": integer(1, "cloud publishes norm parameters every K edge batches", lo=1),
        "student_scope": string("shared", "one student for all edges, or one per edge",
                              choices=("shared", "per_edge")),
        "lanes": string("fleet", "fleet: one cloud trainer for every edge; group: one per edge group "
                                 "(edges.groups), so groups never share a student, a bank or a reset",
                        choices=("fleet", "group")),
        "settings": Field("dict", {}, "method settings, checked against the method's declarations "
                                      "(cema-ray list <method>)"),
    }),
    "cloud": Section({
        "queue_capacity": integer(8192, "uploaded samples the cloud queues before dropping", lo=1),
        "num_cpus": number(1.0, "CPUs reserved for the cloud actor", lo=0, lo_open=True),
        "threads": integer(None, "torch threads of the cloud actor (null: cloud.num_cpus rounded up)", lo=1,
                        nullable=True),
        "checkpoint_every": integer(10, "Ray runtime: checkpoint the cloud's state to <out>/cloud_checkpoints every N "
                                     "deliveries (a sync round, or one host's uploads in async); 0 = off, and a "
                                     "dead cloud then ends the run", lo=0),
        "max_restarts": integer(-1, "times Ray may restart a dead cloud actor (-1: no limit)", lo=-1),
        "device": string("cpu", "where the cloud computes: cpu, cuda, or auto (cuda when one is visible, else cpu "
                                "with one log line); edges always run on CPU", choices=("cpu", "cuda", "auto")),
        "num_gpus": number(0.0, "Ray runtime: GPUs reserved for the cloud actor (needed for cloud.device cuda on Ray)",
                           lo=0),
        "amp": boolean(False, "bfloat16 autocast of the cloud's forward and backward on CUDA (no effect on CPU)"),
        "shards": integer(1, "cloud services, each serving the edges with edge id % shards == its index, with its own "
                             "queue, replay, students and checkpoints (Ray: one actor each)", lo=1),
        "sync_every": integer(1, "with shards > 1: average the shards' foundations (norm layers) every N rounds "
                                 "(async: a shard shares every N of its deliveries, one share in flight)",
                              lo=1),
        "resources": Field("dict", {}, "Ray runtime: custom resources each cloud shard reserves, e.g. {cloud: 1}: it "
                                       "starts only on nodes that offer them (ray start --resources)",
                           check=check_resources),
        "checkpoint_dir": string(None, "folder of the cloud's checkpoints, which the node that restarts the cloud must "
                                     "read (null: <output folder>/cloud_checkpoints, the local staging folder for a "
                                     "URI); on a multi-node cluster it must be an absolute path on a shared file "
                                     "system", nullable=True),
    }),
    "ray": Section({
        "address": string(None, "cluster to join: an address, or auto (the one running on this machine); "
                              "null: start a new local instance", nullable=True),
        "num_cpus": integer(None, "logical CPUs of a local instance (null: Ray's default)", lo=1, nullable=True),
        "object_store_memory_mb": integer(256, "object store of a local instance, MiB (Ray needs >= 75)",
                                       lo=75, nullable=True),
        "host_num_cpus": number(0.5, "CPUs reserved per EdgeHost actor", lo=0, lo_open=True),
        "host_num_gpus": number(0.0, "GPUs reserved per EdgeHost actor (the edges compute on CPU; for placement)",
                                lo=0),
        "host_resources": Field("dict", {}, "custom resources each EdgeHost reserves, e.g. {edge: 1}: hosts start "
                                           "only on nodes that offer them", check=check_resources),
        "host_memory_mb": integer(700, "memory reserved per EdgeHost actor, MiB (admission only)", lo=0),
        "max_in_flight_per_host": integer(2, "outstanding step calls per host", lo=1),
        "host_step_edges": integer(512, "async mode: at most this many of a host's due edges predict in one step "
                                        "call, the least advanced first, so that publications reach big hosts' "
                                        "edges between steps (null: all of them)", lo=1, nullable=True),
        "backlog_full": string("drop_oldest", "async mode, when the uploads waiting for the cloud reach their bound "
                             "(2 x hosts deliveries): drop the oldest (edges never wait; counted in dropped) or "
                             "wait (hosts pause until the cloud catches up: nothing dropped)",
                             choices=("drop_oldest", "wait")),
        "uplink": string("follow", "async mode: follow (the cloud sends with each publication the uploads per second "
                              "each edge may send, what it can train on; the edges' uploads follow it, the most "
                              "uncertain first) or fixed (each edge uploads its method's budget; the backlog drops "
                              "what the cloud cannot take); with backlog_full: wait the hosts pause instead, and the uplink stays "
                              "fixed", choices=("follow", "fixed")),
        "uplink_headroom": number(0.9, "uplink follow: the fraction of the cloud's measured uploads per busy second "
                                       "it hands out", lo=0, hi=1, lo_open=True),
        "host_nice": integer(4, "niceness added to EdgeHost processes (Ray starts workers at 15; 19 is the most): "
                             "the cloud wins the CPU when edges and cloud share a node (num_cpus only admits)",
                          lo=0, hi=19),
        "malloc_keep_mb": integer(256, "EdgeHost and cloud processes: glibc malloc serves buffers below 32 MB from its "
                                    "heap and keeps up to this many MiB of freed memory for reuse, instead of "
                                    "mapping and unmapping torch's buffers at every batch (0: glibc's defaults)",
                               lo=0),
        "include_dashboard": boolean(True, "start the Ray dashboard (local instance)"),
        "dashboard_host": string("127.0.0.1", "dashboard bind address (keep loopback unless token auth is on)"),
    }),
    "faults": Section({
        "kill_hosts": integer(0, "EdgeHost actors to kill during the run (fault injection)", lo=0),
        "kill_cloud": integer(0, "times to kill the cloud actor during the run (needs cloud.checkpoint_every > 0)",
                           lo=0),
        "bad_batches": integer(0, "malformed batches injected into the edges' streams (NaN, Inf, wrong shape, wrong "
                               "dtype, labels out of range, empty, in turn): each is rejected and counted", lo=0),
        "raise_in_hosts": integer(0, "EdgeHost steps that raise an exception during the run (fault injection)", lo=0),
        "slow_cloud_s": number(0.0, "extra seconds the cloud sleeps per delivery: rehearses a cloud that cannot "
                                  "keep up (backpressure)", lo=0),
        "seed": integer(0, "seed of when and which actors are killed"),
    }),
    "output": Section({
        "dir": string(None, "output folder, or a URI pyarrow's filesystems open (s3://bucket/prefix, gs://, hdfs://, "
                          "file://) (null: $CEMA_RAY_STORAGE/<name>-<timestamp>, else ~/cema_ray_runs/... under a "
                          "Ray job, else runs/<name>-<timestamp>)", nullable=True),
        "progress": boolean(True, "show progress bars"),
        "report": boolean(True, "write report.md and its plots"),
    }),
})

PRETRAIN_SCHEMA = Section({
    "name": string(REQUIRED, "pretrain run name (default: the config file's stem)"),
    "seed": integer(0, "seed of every random choice"),
    "data": Section({
        "source": string("fashion-mnist", "data source name", check=_check_source),
        "root": string(None, "data folder (null: the source's env var, then its default)", nullable=True),
        "cache_dir": string(None, "where decoded arrays are cached", nullable=True),
    }),
    "model": Section({
        "name": string(REQUIRED, "model name", check=_check_model),
        "role": string(REQUIRED, "which model of a run this becomes", choices=("edge", "foundation")),
        "init_checkpoint": string(None, "start from this checkpoint's weights (same architecture; a second "
                                "training stage) instead of a random initialisation", nullable=True),
    }),
    "train": Section({
        "epochs": integer(10, "training epochs", lo=1),
        "batch_size": integer(128, "training batch size", lo=1),
        "lr": number(0.1, "peak SGD learning rate", lo=0, lo_open=True),
        "weight_decay": number(5e-4, "SGD weight decay", lo=0),
        "momentum": number(0.9, "SGD momentum", lo=0, hi=1, hi_open=True),
        "augment": string("basic", "basic (crop + flip) or augmix (adds AugMix for robustness)",
                        choices=("basic", "augmix")),
        "label_smoothing": number(0.0, "cross-entropy label smoothing", lo=0, hi=1, hi_open=True),
        "threads": integer(None, "torch threads (null: torch's default)", lo=1, nullable=True),
        "eval_every": integer(1, "evaluate on the test split every N epochs", lo=1),
    }),
    "output": Section({
        "checkpoint": string(REQUIRED, "where the safetensors checkpoint (+ .json card) is written"),
        "work_dir": string("pretrain_work", "scratch folder for partial checkpoints and logs"),
    }),
})


# ------------------------------------------------------------------------------------ data roots
def source_root_info(source: str) -> tuple[str | None, str | None]:
    """(environment variable, default root) of a data source, as its registry entry declares them."""
    from cema_ray.data.sources import DATA_SOURCES

    entry = DATA_SOURCES.get(source) if source in DATA_SOURCES else None
    default = getattr(entry, "default_root", None)
    return getattr(entry, "env_var", None), (None if default is None else str(default))


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
            fail(key, root, f"no folder for data source '{source}'; set ${env} or {key} to it")
        return None
    if check and not Path(path).exists():
        how = f"set ${env} or {key}" if env else f"set {key}"
        fail(key, root, f"data folder {path} ({origin}) does not exist; {how} to the '{source}' data")
    return path


# ------------------------------------------------------------------------------------- cross checks
# Settings a method may also read that the config holds elsewhere: the config's key is the source of truth.
MIRRORED_SETTINGS = {"publish_every": "method.publish_every", "student_scope": "method.student_scope",
                     "num_classes": "data.num_classes"}


def _check_settings(cfg: dict[str, Any]) -> None:
    """method.settings, resolved by the method's own declarations (`MethodSpec.resolve`): every key filled,
    each value type- and range-checked, class-count defaults computed; what the run uses is what is stored.

    Settings that mirror a config key (MIRRORED_SETTINGS) take that key's value, so the method and the
    runtime cannot disagree; giving both with different values is an error.
    """
    method = cfg["method"]
    spec = method_registry().get(method["name"])
    if spec.needs_labels and cfg["runtime"] != "local":
        fail("method.name", method["name"], "is a reference trained on the stream's true labels; it needs runtime: local")
    given = dict(method["settings"])
    for name, source in MIRRORED_SETTINGS.items():
        section, key = source.split(".")
        value = cfg[section][key]
        if name not in spec.settings or value is None:
            continue
        if name in given and given[name] != value:
            fail(f"method.settings.{name}", given[name], f"conflicts with {source} = {fmt(value)}; set {source} only")
        given[name] = value
    method["settings"] = dict(spec.resolve(given, num_classes=_num_classes(cfg["data"])))


def _check_lanes(cfg: dict[str, Any]) -> None:
    """A lane per group needs a shared student inside each lane (per-edge students keep groups apart already)."""
    if cfg["method"]["lanes"] == "group" and cfg["method"]["student_scope"] == "per_edge":
        fail("method.lanes", "group", "needs method.student_scope: shared (per-edge students already keep the "
             "groups apart)")


def _num_classes(data: dict[str, Any]) -> int | None:
    from cema_ray.data.sources import DATA_SOURCES

    return data.get("num_classes") or getattr(DATA_SOURCES.get(data["source"]), "num_classes", None)


def _check_mixed(cfg: dict[str, Any]) -> None:
    """A mixed fleet (a group's model differs from models.edge) needs a method that trains a student per
    architecture, or none."""
    edge = cfg["models"]["edge"]
    for i, group in enumerate(cfg["edges"]["groups"]):
        model = group["model"]
        if model["name"] is None or (model["name"], model["checkpoint"]) == (edge["name"], edge["checkpoint"]):
            continue
        key, method = f"edges.groups.{i}.model.name", cfg["method"]
        if not method_registry().get(method["name"]).mixed_models:
            fail(key, model["name"], f"a fleet of several edge architectures needs a method that trains a student "
                 f"per architecture (cema-fleet, oracle) or none (bn, source, tent-edge), not '{method['name']}'")


def _check_groups(edges: dict[str, Any]) -> None:
    for i, group in enumerate(edges["groups"]):
        if group["name"] is None:
            group["name"] = f"g{i}"
    total = sum(g["fraction"] for g in edges["groups"])
    if total > 1 + 1e-9:
        fractions = [g["fraction"] for g in edges["groups"]]
        fail("edges.groups", fractions, f"fractions sum to {total:g}; they must sum to at most 1")
    names = [g["name"] for g in edges["groups"]]
    if len(set(names)) != len(names):
        fail("edges.groups", names, "group names must be distinct")
    if edges["hosts"] is not None and edges["hosts"] > edges["count"]:
        fail("edges.hosts", edges["hosts"], f"must be at most edges.count ({edges['count']})")


def _check_distributions(edges: dict[str, Any]) -> None:
    """edges.distributions: known keys, one form each, and every value a draw can give valid for its key.

    Normalises in place: numbers of number keys become floats, randint bounds stay integers.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, dist in edges["distributions"].items():
        key = f"edges.distributions.{name}"
        if name not in DISTRIBUTION_TARGETS:
            fail(key, dist, f"unknown key{suggest(name, DISTRIBUTION_TARGETS)}; "
                             f"allowed: {', '.join(DISTRIBUTION_TARGETS)}")
        forms_text = ", ".join(DISTRIBUTION_FORMS)
        if not isinstance(dist, dict) or not all(isinstance(k, str) for k in dist):
            fail(key, dist, f"must be a mapping with one of {forms_text}, e.g. {{choice: [16, 32]}}")
        for form in dist:
            if form not in (*DISTRIBUTION_FORMS, "weights"):
                fail(join_key(key, form), dist[form], f"unknown distribution{suggest(form, DISTRIBUTION_FORMS)}; "
                                                    f"allowed: {forms_text} (and weights with choice)")
        forms = [f for f in dist if f in DISTRIBUTION_FORMS]
        if len(forms) != 1:
            fail(key, dist, f"give exactly one of {forms_text}" + (f"; got {', '.join(forms)}" if forms else ""))
        form = forms[0]
        if "weights" in dist and form != "choice":
            fail(join_key(key, "weights"), dist["weights"], f"weights go with choice, not {form}")
        spec = DISTRIBUTION_TARGETS[name]
        if form == "choice":
            out[name] = _check_choice(key, name, spec, dist)
        elif form == "permute":
            if name != "corruptions":
                fail(join_key(key, form), dist[form], "permute shuffles a list per edge: only "
                                                    "edges.distributions.corruptions takes it")
            out[name] = {form: _drawable(name, spec, dist[form], join_key(key, form))}
        else:
            out[name] = {form: _check_bounds(key, name, spec, form, dist[form])}
    edges["distributions"] = out


def _drawable(name: str, spec: Field, value: Any, key: str) -> Any:
    """One value a distribution can give `name`, validated as the key itself would be."""
    if name == "corruptions" and not isinstance(value, list):
        fail(key, value, "must be a list of corruption names (a choice picks a whole list, e.g. "
                          "{choice: [[fog], [snow, frost]]})")
    value = validate_value(spec, value, key)
    if name == "corruptions" and not value:
        fail(key, value, "must be a non-empty list of corruption names")
    return value


def _check_choice(key: str, name: str, spec: Field, dist: dict[str, Any]) -> dict[str, Any]:
    values, ckey = dist["choice"], join_key(key, "choice")
    if not isinstance(values, list) or not values:
        fail(ckey, values, f"must be a non-empty list of values for {name}")
    out: dict[str, Any] = {"choice": [_drawable(name, spec, v, join_key(ckey, i)) for i, v in enumerate(values)]}
    if "weights" in dist:
        weights, wkey = dist["weights"], join_key(key, "weights")
        if not isinstance(weights, list) or len(weights) != len(values):
            fail(wkey, weights, f"must be a list of {len(values)} numbers >= 0, one per choice")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                fail(join_key(wkey, i), w, "must be a number >= 0")
        if not sum(weights) > 0:
            fail(wkey, weights, "must not all be 0")
        out["weights"] = [float(w) for w in weights]
    return out


def _check_bounds(key: str, name: str, spec: Field, form: str, bounds: Any) -> list[Any]:
    bkey = join_key(key, form)
    if form in ("uniform", "loguniform") and spec.kind != "float":
        hint = "use randint" if spec.kind == "int" else "use choice"
        fail(bkey, bounds, f"{form} draws real numbers; {name} must be {describe(spec)}: {hint}")
    if form == "randint" and spec.kind not in ("int", "float"):
        fail(bkey, bounds, f"randint draws integers; {name} must be {describe(spec)}: use choice")
    integer = form == "randint"
    what = "integers" if integer else "numbers"
    if not isinstance(bounds, list) or len(bounds) != 2 or any(
            isinstance(b, bool) or not isinstance(b, int if integer else (int, float))
            or (isinstance(b, float) and not math.isfinite(b)) for b in bounds):
        fail(bkey, bounds, f"must be [lo, hi], two {what}")
    lo, hi = bounds
    if lo > hi:
        fail(bkey, bounds, f"lo ({fmt(lo)}) must be <= hi ({fmt(hi)})")
    if form == "loguniform" and lo <= 0:
        fail(bkey, bounds, "loguniform needs lo > 0")
    bound_spec = Field(spec.kind, doc=spec.doc, lo=spec.lo, hi=spec.hi, lo_open=spec.lo_open, hi_open=spec.hi_open)
    for i, b in enumerate(bounds):
        validate_value(bound_spec, b, join_key(bkey, i))  # a draw lies in [lo, hi]: both ends must be valid values
    return [int(lo), int(hi)] if integer else [float(lo), float(hi)]


def _check_corruption_lists(cfg: dict[str, Any]) -> None:
    lists = [("stream.corruptions", cfg["stream"].get("corruptions"))]
    lists += [(f"edges.groups.{i}.stream.corruptions", g["stream"].get("corruptions"))
              for i, g in enumerate(cfg["edges"]["groups"])]
    for key, names in lists:
        if names is not None and not names:
            fail(key, names, "must be a non-empty list of corruption names")


def _check_faults(cfg: dict[str, Any]) -> None:
    if cfg["faults"]["kill_cloud"] and not cfg["cloud"]["checkpoint_every"]:
        fail("faults.kill_cloud", cfg["faults"]["kill_cloud"],
              "a killed cloud restarts from its checkpoint: set cloud.checkpoint_every > 0")
    if cfg["faults"]["kill_cloud"] and cfg["cloud"]["max_restarts"] == 0:
        fail("faults.kill_cloud", cfg["faults"]["kill_cloud"], "cloud.max_restarts is 0: a killed cloud cannot restart")


def _check_device(cfg: dict[str, Any]) -> None:
    """cuda on Ray needs a GPU request (Ray hides the GPUs from an actor without one); in one process it needs a
    visible device, checked here. On Ray the cloud checks in its own process: the driver may have no GPU."""
    device = cfg["cloud"]["device"]
    if device != "cuda":
        return
    if cfg["runtime"] == "ray" and not cfg["cloud"]["num_gpus"]:
        fail("cloud.device", device, "on Ray the cloud sees a GPU only when it asks for one: set cloud.num_gpus >= 1 "
                                     "(or a fraction)")
    if cfg["runtime"] == "local":
        from cema_ray.device import resolve_device

        resolve_device(device)


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
            fail(f"data.{key}", raw_data[key], f"data source '{source}' ships its corrupted test images as they "
                                                f"are and ignores data.{key}: remove it")
    names = needed_corruptions(cfg)
    if "clean" in names:
        fail("stream.corruptions", "clean", f"data source '{source}' has no clean images; drop 'clean' or use a "
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
    cfg = validate_section(RUN_SCHEMA, raw, "")
    _check_corruption_lists(cfg)
    _check_groups(cfg["edges"])
    _check_distributions(cfg["edges"])
    _check_settings(cfg)
    _check_lanes(cfg)
    _check_mixed(cfg)
    _check_faults(cfg)
    _check_device(cfg)
    cfg["data"]["root"] = resolve_data_root(cfg["data"]["source"], cfg["data"]["root"], check=check_paths)
    _check_corrupted_source(cfg, raw.get("data") or {}, check_paths)
    return cfg


def validate_pretrain_config(raw: dict[str, Any], *, check_paths: bool = True) -> dict[str, Any]:
    """Validate a raw pretrain config and return it with defaults filled."""
    cfg = validate_section(PRETRAIN_SCHEMA, raw, "")
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
        key = join_key(prefix, name)
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
