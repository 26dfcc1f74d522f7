"""Build a run's pieces from its config: data, models, per-edge streams and profiles, the method.

Both runtimes call these functions, so a local run and a Ray run of one config are made of
identical parts; only where the parts live differs.
"""
from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cema_ray.config import DISTRIBUTION_TARGETS, PROFILE_KEYS
from cema_ray.data.catalog import LabeledImagesLike, corrupted_provider, load_clean_split, source_info
from cema_ray.data.streams import EdgeStream, StreamSpec
from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.methods import METHODS
from cema_ray.methods.base import MethodSpec
from cema_ray.models.checkpoint import load_checkpoint, verify_checkpoint
from cema_ray.models.factory import TIMM_PREFIX, create_model
from cema_ray.runtime.edge import EdgeProfile
from cema_ray.runtime.faults import plan_bad_batches
from cema_ray.schema import Settings


@dataclass
class EdgePlan:
    """Everything that defines one edge, small enough to ship to the actor that hosts it."""

    edge_id: int
    spec: StreamSpec
    profile: EdgeProfile
    bad_batches: tuple[tuple[float, str], ...] = ()  # fault injection: (position as a fraction, kind)
    model: int = 0  # the edge's architecture: its index in `edge_model_specs`


def method_settings(cfg: dict[str, Any]) -> tuple[MethodSpec, Settings]:
    """The method and its settings as the config resolved them at load (`MethodSpec.resolve`), frozen."""
    spec = METHODS.get(cfg["method"]["name"])
    return spec, spec.resolve(cfg["method"]["settings"])


def load_model(model_cfg: dict[str, Any], data_cfg: dict[str, Any], role: str, key: str | None = None) -> nn.Module:
    """A model from its checkpoint (safetensors + card) or, for timm names, its local weights. ``key``: where the
    config declares it (``models.<role>`` unless a group's), for messages."""
    key = key or f"models.{role}"
    path = _checkpoint_path(model_cfg, key, role)
    name = model_cfg["name"]
    if name.startswith(TIMM_PREFIX):
        info = source_info(data_cfg["source"])
        return create_model(name, info.num_classes, info.channels, info.mean, info.std, weights=path)
    model, card = load_checkpoint(path, bool(model_cfg.get("allow_unverified")))
    _check_architecture(card, model_cfg, key, path)
    return model


def edge_model_specs(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The fleet's edge architectures as (config key, model section): `models.edge` first, then every group's
    `model` that differs (by name and checkpoint) from each one before it, in the groups' order. More than one:
    a mixed fleet, whose cloud trains a student per architecture."""
    specs = [("models.edge", cfg["models"]["edge"])]
    for i, group in enumerate(cfg["edges"].get("groups") or []):
        model = group.get("model") or {}
        if model.get("name") is not None and _model_index(specs, model) is None:
            specs.append((f"edges.groups.{i}.model", model))
    return specs


def edge_model_names(cfg: dict[str, Any]) -> list[str]:
    """Each architecture's label (summary.json, the report, the metrics' `model` tag): the model's name, with
    ``#<index>`` where two checkpoints of one name are two architectures of the fleet."""
    names = [m["name"] for _, m in edge_model_specs(cfg)]
    return [n if names.count(n) == 1 else f"{n}#{k}" for k, n in enumerate(names)]


def _model_index(specs: list[tuple[str, dict[str, Any]]], model: dict[str, Any]) -> int | None:
    same = [k for k, (_, m) in enumerate(specs) if (m["name"], m.get("checkpoint")) == (model["name"],
                                                                                       model.get("checkpoint"))]
    return same[0] if same else None


def group_model_index(cfg: dict[str, Any], group: dict[str, Any]) -> int:
    """The index in `edge_model_specs` of the architecture a group's edges run."""
    model = group.get("model") or {}
    return 0 if model.get("name") is None else int(_model_index(edge_model_specs(cfg), model))


def verify_models(cfg: dict[str, Any]) -> None:
    """Every checkpoint the run loads exists and matches its card, and every edge architecture predicts the
    foundation's classes from the data's channels: checked once, on the driver, before Ray starts, so a bad file is
    one line at once instead of a dead actor after the start-up."""
    spec, _ = method_settings(cfg)
    models = [(key, m, "edge") for key, m in edge_model_specs(cfg)]
    if spec.uses_foundation:
        models.insert(0, ("models.foundation", cfg["models"]["foundation"], "foundation"))
    info = source_info(cfg["data"]["source"])
    reference: tuple[str, dict[str, Any]] | None = None
    for key, model_cfg, role in models:
        path = _checkpoint_path(model_cfg, key, role)
        if model_cfg["name"].startswith(TIMM_PREFIX):
            card = {"num_classes": cfg["data"].get("num_classes") or info.num_classes, "in_chans": info.channels}
        else:
            card = verify_checkpoint(path, bool(model_cfg.get("allow_unverified")))
            _check_architecture(card, model_cfg, key, path)
        if len(models) > 1 + spec.uses_foundation:  # a mixed fleet: every model must agree with the first
            reference = reference or (key, card)
            for field in ("num_classes", "in_chans"):
                want, got = reference[1].get(field), card.get(field)
                if want is not None and got is not None and int(want) != int(got):
                    raise CheckpointError(f"{key}: '{model_cfg['name']}' has {field} {got}, {reference[0]} has "
                                          f"{want}: every edge architecture must predict the same classes from "
                                          "the same images")


def _checkpoint_path(model_cfg: dict[str, Any], key: str, role: str) -> str | None:
    """`<key>.checkpoint`, checked to exist (optional for timm names: no file = random weights)."""
    path, name = model_cfg.get("checkpoint"), model_cfg["name"]
    if name.startswith(TIMM_PREFIX):
        if path and not Path(path).is_file():
            raise CheckpointError(f"{key}.checkpoint = {path}: file not found")
        return path
    if not path:
        raise CheckpointError(f"{key}.checkpoint is not set: '{name}' needs trained weights")
    if not Path(path).is_file():
        raise CheckpointError(f"{key}.checkpoint = {path}: file not found; train it with "
                              f"`cema-ray pretrain configs/pretrain_<data>_{role}.yaml`")
    return path


def _check_architecture(card: dict[str, Any], model_cfg: dict[str, Any], key: str, path: str) -> None:
    if card["architecture"] != model_cfg["name"]:
        raise CheckpointError(f"{key}: checkpoint {path} holds '{card['architecture']}', "
                              f"config names '{model_cfg['name']}'")


UPLINK_KEYS = ("uplink_samples_per_s", "uplink_bytes_per_s")


def edge_plans(cfg: dict[str, Any], ids: range | None = None) -> list[EdgePlan]:
    """Every edge's stream and profile (or those of the edges in ``ids``), deterministically.

    Precedence, lowest first: the top-level `stream`, then the edge's draws from `edges.distributions`, then its
    group's keys (the group's `stream` keys; its `frame_rate` and uplink budget where they are not null; a group
    that sets either uplink key sets the whole budget).
    """
    count = cfg["edges"]["count"]
    groups = cfg["edges"].get("groups") or []
    distributions = cfg["edges"].get("distributions") or {}
    seed = cfg["edges"].get("heterogeneity_seed")
    seed = cfg["seed"] if seed is None else seed
    order = np.random.default_rng(seed).permutation(count)
    assignment: dict[int, int] = {}
    start = 0
    for g, group in enumerate(groups):
        n = int(round(group["fraction"] * count))
        for e in order[start : start + n]:
            assignment[int(e)] = g
        start += n
    models = [group_model_index(cfg, group) for group in groups]
    faults = cfg.get("faults") or {}
    bad = plan_bad_batches(faults.get("bad_batches", 0), count, faults.get("seed", 0))
    plans = []
    for e in range(count) if ids is None else ids:
        drawn = draw_edge_values(distributions, seed, e)
        stream = {**cfg["stream"], **{k: v for k, v in drawn.items() if k not in PROFILE_KEYS}}
        profile = {k: drawn.get(k) for k in PROFILE_KEYS}
        name, model = "default", 0
        g = assignment.get(e)
        if g is not None:
            group = groups[g]
            stream.update(group.get("stream") or {})
            name = group.get("name") or f"group{g}"
            model = models[g]
            if group.get("frame_rate") is not None:
                profile["frame_rate"] = group["frame_rate"]
            if any(group.get(k) is not None for k in UPLINK_KEYS):
                profile.update({k: group.get(k) for k in UPLINK_KEYS})
        spec = StreamSpec(
            protocol=stream["protocol"], corruptions=tuple(stream["corruptions"]), severity=stream["severity"],
            batch_size=stream["batch_size"], samples_per_domain=stream["samples_per_domain"],
            dirichlet_alpha=stream["dirichlet_alpha"], seed=cfg["seed"],
        )
        plans.append(EdgePlan(e, spec, EdgeProfile(group=name, **profile), tuple(bad.get(e, ())), model))
    return plans


def draw_edge_values(distributions: dict[str, dict[str, Any]], seed: int, edge_id: int) -> dict[str, Any]:
    """One edge's draw from each validated distribution of `edges.distributions`.

    Each key has its own generator, seeded from (seed, edge id, CRC-32 of the key's name): an edge's values do not
    depend on the fleet's size, on the other keys, or on the order they are written in.
    """
    out: dict[str, Any] = {}
    for name, dist in distributions.items():
        rng = np.random.default_rng([seed, edge_id, zlib.crc32(name.encode())])
        value = _draw(dist, rng)
        if DISTRIBUTION_TARGETS[name].kind == "float" and value is not None:
            value = float(value)
        out[name] = value
    return out


def _draw(dist: dict[str, Any], rng: np.random.Generator) -> Any:
    if "choice" in dist:
        values = dist["choice"]
        weights = dist.get("weights")
        p = None if weights is None else np.asarray(weights, float) / float(sum(weights))
        return copy.deepcopy(values[int(rng.choice(len(values), p=p))])
    if "permute" in dist:
        values = dist["permute"]
        return [values[int(i)] for i in rng.permutation(len(values))]
    if "randint" in dist:
        lo, hi = dist["randint"]
        return int(rng.integers(lo, hi, endpoint=True))
    if "uniform" in dist:
        lo, hi = dist["uniform"]
        return min(max(float(rng.uniform(lo, hi)), lo), hi)
    lo, hi = dist["loguniform"]
    return min(max(math.exp(float(rng.uniform(math.log(lo), math.log(hi)))), lo), hi)


class DataContext:
    """The clean split and pre-corrupted domains that every edge's stream draws from."""

    def __init__(self, data_cfg: dict[str, Any], clean: LabeledImagesLike | None = None) -> None:
        """``clean`` skips loading (a host gets the driver's copy from the object store)."""
        self.info = source_info(data_cfg["source"])
        self._num_classes = data_cfg.get("num_classes")
        self._lazy_shape: tuple[int, int, int] | None = None  # a lazy folder's image shape, read once
        self.clean: LabeledImagesLike | None = None
        self.corrupted = None
        if self.info.kind == "corrupted":
            self.corrupted = corrupted_provider(data_cfg)
        else:
            self.clean = clean if clean is not None else load_clean_split(data_cfg, data_cfg.get("split", "test"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image. A lazy folder (no ``images`` array) is asked for its first image once:
        its size is the folder's, which the source does not know in advance (the loader refuses later
        images of another size)."""
        images = getattr(self.clean, "images", None)
        if images is not None:
            return tuple(images.shape[1:])
        if self.clean is not None and len(self.clean):
            if self._lazy_shape is None:
                self._lazy_shape = tuple(int(d) for d in self.clean.take([0]).images.shape[1:])
            return self._lazy_shape
        size = self.info.image_size
        return (size, size, self.info.channels)

    @property
    def num_classes(self) -> int:
        """`data.num_classes`, else the source's, else the class folders a folder source found."""
        n = self._num_classes or self.info.num_classes or len(getattr(self.clean, "classes", ()) or ())
        if not n:
            raise ConfigError(f"data source '{self.info.name}': set data.num_classes (the data does not say)")
        return int(n)

    def stream(self, plan: EdgePlan) -> EdgeStream:
        return EdgeStream(self.clean, plan.spec, plan.edge_id, corrupted_source=self.corrupted)


def make_generator(seed: int, *salt: int) -> torch.Generator:
    """A torch generator seeded from (seed, salt...) through numpy's SeedSequence."""
    value = int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
