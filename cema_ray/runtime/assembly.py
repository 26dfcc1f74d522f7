"""One assembly path: a run's models, edges and cloud, built the same way by every runtime and benchmark.

The single-process runner, the Ray actors (`EdgeHost`, `CloudActor`) and `bench cloud` call these, so a
host's edges and the cloud actor's trainer are exactly what the local runner builds from the same config:
the ground on which sync Ray == local stands.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from cema_ray.methods.lanes import LanedCloud
from cema_ray.runtime.cloud import CloudService
from cema_ray.device import autocast, resolve_device
from cema_ray.runtime.edge import EdgeDevice
from cema_ray.runtime.shards import CloudShards
from cema_ray.runtime.fleet import (DataContext, EdgePlan, edge_model_specs, edge_plans, fresh_copy, load_model,
                                    make_generator, method_settings)


def load_edge_model(cfg: dict[str, Any]) -> nn.Module:
    """`models.edge` (the first of a mixed fleet's architectures)."""
    return load_model(cfg["models"]["edge"], cfg["data"], "edge")


def load_edge_models(cfg: dict[str, Any], used: set[int] | None = None) -> list[nn.Module | None]:
    """Every edge architecture of the run, in `edge_model_specs` order (one for most runs); with ``used``, only
    those (None in the others' places: a host reads only the architectures its edges run)."""
    return [load_model(m, cfg["data"], "edge", key) if used is None or k in used else None
            for k, (key, m) in enumerate(edge_model_specs(cfg))]


def load_foundation(cfg: dict[str, Any]) -> nn.Module | None:
    """The foundation, or None for a method that has no use for one (nothing is read then)."""
    spec, _ = method_settings(cfg)
    return load_model(cfg["models"]["foundation"], cfg["data"], "foundation") if spec.uses_foundation else None


def build_cloud(cfg: dict[str, Any], edge_models: Sequence[nn.Module], foundation: nn.Module | None,
                shard: int = 0) -> CloudService:
    """The method's cloud trainer on a fresh copy of the edge model, seeded from the run's seed (and its shard
    index past the first), on the cloud's device (`cloud.device`): the student copy and the foundation move
    there before the trainer builds its optimisers, so every state the trainer creates lives there too.
    A mixed fleet (several `edge_models`) hands the trainer a student per architecture, by index, and every
    edge's architecture index (``model_of``: a bank routes an edge's key in its own architecture's bank)."""
    spec, settings = method_settings(cfg)
    device = resolve_device(cfg["cloud"]["device"])
    student: nn.Module | dict[int, nn.Module] = fresh_copy(edge_models[0]).to(device)
    if len(edge_models) > 1:
        student = {k: fresh_copy(m).to(device) for k, m in enumerate(edge_models)}
    foundation = fresh_copy(foundation).to(device) if foundation is not None else None
    seed = (cfg["seed"], 1, *([shard] if shard else []))
    lanes = edge_lanes(cfg)
    mixed = {"model_of": {p.edge_id: p.model for p in edge_plans(cfg)}} if isinstance(student, dict) else {}
    if lanes is None:
        trainer = spec.make_cloud(foundation, student, settings, make_generator(*seed), **mixed)
    else:  # a trainer per lane, each on its own copies, its generator seeded by its lane past the first
        used = _lane_models(cfg, lanes)
        trainer = LanedCloud(lambda i: spec.make_cloud(fresh_copy(foundation) if foundation is not None else None,
                                                       _copy_students(student, used.get(i, set())), settings,
                                                       make_generator(*seed, *([100 + i] if i else [])), **mixed),
                             lanes)
    return CloudService(trainer, cfg["method"]["student_scope"], cfg["method"]["publish_every"],
                        cfg["cloud"]["queue_capacity"], autocast=lambda: autocast(device, cfg["cloud"]["amp"]),
                        device=str(device), shard=shard)


def _copy_students(student: nn.Module | dict[int, nn.Module], used: set[int]) -> nn.Module | dict[int, nn.Module]:
    """A lane's students: in a mixed fleet only the architectures its own edges run."""
    if isinstance(student, dict):
        return {k: fresh_copy(m) for k, m in student.items() if k in used}
    return fresh_copy(student)


def _lane_models(cfg: dict[str, Any], lanes: dict[int, int]) -> dict[int, set[int]]:
    """Per lane, the architecture indices of its edges."""
    used: dict[int, set[int]] = {}
    for p in edge_plans(cfg):
        used.setdefault(lanes[p.edge_id], set()).add(p.model)
    return used


def load_cloud(cfg: dict[str, Any], shard: int = 0) -> CloudService:
    """`build_cloud` with the models read from the config's checkpoints (the cloud actor, `bench cloud`)."""
    return build_cloud(cfg, load_edge_models(cfg), load_foundation(cfg), shard)


def build_shards(cfg: dict[str, Any], edge_models: Sequence[nn.Module], foundation: nn.Module | None
                 ) -> CloudShards:
    """`cloud.shards` clouds of one run, in one process (the local runner)."""
    return CloudShards([build_cloud(cfg, edge_models, foundation, k) for k in range(cfg["cloud"]["shards"])],
                       cfg["cloud"]["sync_every"])


def build_edges(cfg: dict[str, Any], data: DataContext, edge_models: Sequence[nn.Module | None], plans: list[EdgePlan]
                ) -> list[EdgeDevice]:
    """One EdgeDevice per plan. The method's edge policy is built once per architecture, on one copy of its
    model, and forked for that architecture's other edges: forward-only policies borrow that one model (each
    edge keeps only its published state and filters: `methods.host_model`), policies that train on the edge get
    their own copy. An architecture no plan here runs is not copied."""
    spec, settings = method_settings(cfg)
    firsts: dict[int, Any] = {}
    policies = []
    for p in plans:
        first = firsts.get(p.model)
        if first is None:
            policies.append(firsts.setdefault(p.model, spec.make_edge(fresh_copy(edge_models[p.model]), settings)))
        else:
            policies.append(first.fork())
    shape = data.image_shape
    lanes = edge_lanes(cfg) or {}
    mixed = len(edge_models) > 1
    return [EdgeDevice(p.edge_id, data.stream(p), policy, p.profile, shape, data.num_classes, p.bad_batches,
                       lane=lanes.get(p.edge_id), model=p.model if mixed else None)
            for p, policy in zip(plans, policies)]


def edge_lanes(cfg: dict[str, Any]) -> dict[int, int] | None:
    """``method.lanes: group``: each edge's lane, its group's index in order of first appearance; None for one
    trainer for the fleet (the plans are not even built). Taken from every plan of the run, so a host's subset of
    edges agrees with the cloud."""
    if cfg["method"]["lanes"] != "group":
        return None
    order: dict[str, int] = {}
    return {p.edge_id: order.setdefault(p.profile.group, len(order)) for p in edge_plans(cfg)}
