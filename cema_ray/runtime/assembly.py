"""One assembly path: a run's models, edges and cloud, built the same way by every runtime and benchmark.

The single-process runner, the Ray actors (`EdgeHost`, `CloudActor`) and `bench cloud` call these, so a
host's edges and the cloud actor's trainer are exactly what the local runner builds from the same config:
the ground on which sync Ray == local stands.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from cema_ray.methods.lanes import LanedCloud
from cema_ray.runtime.cloud import CloudService
from cema_ray.runtime.device import autocast, resolve_device
from cema_ray.runtime.edge import EdgeDevice
from cema_ray.runtime.shards import CloudShards
from cema_ray.runtime.fleet import (DataContext, EdgePlan, edge_plans, fresh_copy, load_model, make_generator,
                                    method_settings)


def load_edge_model(cfg: dict[str, Any]) -> nn.Module:
    return load_model(cfg["models"]["edge"], cfg["data"], "edge")


def load_foundation(cfg: dict[str, Any]) -> nn.Module | None:
    """The foundation, or None for a method that has no use for one (nothing is read then)."""
    spec, _ = method_settings(cfg)
    return load_model(cfg["models"]["foundation"], cfg["data"], "foundation") if spec.uses_foundation else None


def build_cloud(cfg: dict[str, Any], edge_model: nn.Module, foundation: nn.Module | None, shard: int = 0
                ) -> CloudService:
    """The method's cloud trainer on a fresh copy of the edge model, seeded from the run's seed (and its shard
    index past the first), on the cloud's device (`cloud.device`): the student copy and the foundation move
    there before the trainer builds its optimisers, so every state the trainer creates lives there too."""
    spec, settings = method_settings(cfg)
    device = resolve_device(cfg["cloud"]["device"])
    student = fresh_copy(edge_model).to(device)
    foundation = fresh_copy(foundation).to(device) if foundation is not None else None
    seed = (cfg["seed"], 1, *([shard] if shard else []))
    lanes = edge_lanes(cfg)
    if lanes is None:
        trainer = spec.make_cloud(foundation, student, settings, make_generator(*seed))
    else:  # a trainer per lane, each on its own copies, its generator seeded by its lane past the first
        trainer = LanedCloud(lambda i: spec.make_cloud(fresh_copy(foundation) if foundation is not None else None,
                                                       fresh_copy(student), settings,
                                                       make_generator(*seed, *([100 + i] if i else []))), lanes)
    return CloudService(trainer, cfg["method"]["student_scope"], cfg["method"]["publish_every"],
                        cfg["cloud"]["queue_capacity"], autocast=lambda: autocast(device, cfg["cloud"]["amp"]),
                        device=str(device), shard=shard)


def load_cloud(cfg: dict[str, Any], shard: int = 0) -> CloudService:
    """`build_cloud` with the models read from the config's checkpoints (the cloud actor, `bench cloud`)."""
    return build_cloud(cfg, load_edge_model(cfg), load_foundation(cfg), shard)


def build_shards(cfg: dict[str, Any], edge_model: nn.Module, foundation: nn.Module | None) -> CloudShards:
    """`cloud.shards` clouds of one run, in one process (the local runner)."""
    return CloudShards([build_cloud(cfg, edge_model, foundation, k) for k in range(cfg["cloud"]["shards"])],
                       cfg["cloud"]["sync_every"])


def build_edges(cfg: dict[str, Any], data: DataContext, edge_model: nn.Module, plans: list[EdgePlan]
                ) -> list[EdgeDevice]:
    """One EdgeDevice per plan. The method's edge policy is built once, on one copy of the edge model, and
    forked for the other edges: forward-only policies borrow that one model (each edge keeps only its
    published state and filters: `methods.host_model`), policies that train on the edge get their own copy."""
    if not plans:
        return []
    spec, settings = method_settings(cfg)
    first = spec.make_edge(fresh_copy(edge_model), settings)
    policies = [first] + [first.fork() for _ in plans[1:]]
    shape = data.image_shape
    lanes = edge_lanes(cfg) or {}
    return [EdgeDevice(p.edge_id, data.stream(p), policy, p.profile, shape, data.num_classes, p.bad_batches,
                       lane=lanes.get(p.edge_id))
            for p, policy in zip(plans, policies)]


def edge_lanes(cfg: dict[str, Any]) -> dict[int, int] | None:
    """``method.lanes: group``: each edge's lane, its group's index in order of first appearance; None for one
    trainer for the fleet (the plans are not even built). Taken from every plan of the run, so a host's subset of
    edges agrees with the cloud."""
    if cfg["method"]["lanes"] != "group":
        return None
    order: dict[str, int] = {}
    return {p.edge_id: order.setdefault(p.profile.group, len(order)) for p in edge_plans(cfg)}
