"""The single-process runner: the reference semantics every other runtime is tested against.

Rounds are synchronous. In round k every edge that still has data predicts its k-th batch with
the parameters it holds (in ascending edge id); then the cloud ingests each edge's uploads in
that order and runs the steps they make due; then, every `publish_every` rounds, it publishes
and the edges load the new version before round k + 1. With one edge and K = 1 this is
exactly the authors' loop.
"""
from __future__ import annotations

from typing import Any

import torch
from cema_ray.errors import RunInterrupted
from cema_ray.runtime.cloud import Publication
from cema_ray.runtime.shards import CloudShards
from cema_ray.runtime.edge import EdgeDevice, EdgeStep
from cema_ray.runtime.edge_round import step_edges
from cema_ray.runtime.assembly import build_edges, build_shards, load_edge_models, load_foundation
from cema_ray.runtime.fleet import DataContext, edge_plans
from cema_ray.results import RunRecorder
from cema_ray.results.records import completed
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.journal import PartialWriter
from cema_ray.threads import apply_threads


def run_round(edges: list[EdgeDevice], cloud: CloudShards, fuse_samples: int = 0) -> list[EdgeStep]:
    """One synchronous round over the edges that still have data (the reference order)."""
    active = [e for e in edges if not e.done]
    steps = step_edges(active, lambda e: cloud.newest_version(e.edge_id), fuse_samples)
    for edge, out in zip(active, steps):
        if out.reset:
            cloud.reset(edge.edge_id)
        made = cloud.receive(edge.edge_id, out.upload_images, out.upload_labels, out.upload_key)
        out.record = completed(out.record, made, cloud.last_refused)
    deliver(cloud.end_round([e.edge_id for e in active]), edges, len(cloud.services))
    return steps


def deliver(pubs: list[Publication], edges: list[EdgeDevice], shards: int = 1) -> None:
    by_id = {e.edge_id: e for e in edges}
    for pub in pubs:
        for edge in pub.targets(by_id, shards):
            edge.apply_update(pub.state, pub.version)


def run_local(cfg: dict[str, Any], partial: PartialWriter | None = None) -> tuple[RunRecorder, dict[str, Any]]:
    """Run the whole fleet in this process; returns the per-batch records and run facts.

    ``partial`` writes the records so far every few seconds (a killed process leaves them readable)."""
    threads = apply_threads(cfg.get("threads"))
    torch.manual_seed(cfg["seed"])
    data = DataContext(cfg["data"])
    edge_models = load_edge_models(cfg)
    edges = build_edges(cfg, data, edge_models, edge_plans(cfg))
    cloud = build_shards(cfg, edge_models, load_foundation(cfg))
    progress = RunProgress(f"{cfg['name']} [local]", sum(len(e.stream) for e in edges), cfg["output"]["progress"])
    try:
        while any(not e.done for e in edges):
            for out in run_round(edges, cloud, cfg["edges"]["fuse_samples"]):
                out.record["host_id"] = 0
                progress.add(out.record)
            progress.refresh()
            if partial is not None:
                partial.maybe(progress.recorder)
    except KeyboardInterrupt:  # a round is recorded whole or not at all: the rows so far are consistent
        progress.close()
        raise RunInterrupted(progress.recorder, _facts(progress, cloud, threads)) from None
    progress.close()
    return progress.recorder, _facts(progress, cloud, threads)


def _facts(progress: RunProgress, cloud: CloudShards, threads: int) -> dict[str, Any]:
    return {"wall_seconds": progress.elapsed, "dropped": cloud.stats.dropped,
            "cloud_steps": cloud.stats.steps, "cloud_step_seconds": cloud.stats.step_seconds,
            "publications": cloud.stats.publications, "threads": {"local": threads},
            "cloud_device": cloud.device}
