"""method.lanes: group: a cloud trainer per edge group; groups never share a student, a bank or a reset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cema_ray.errors import ConfigError
from cema_ray.methods.base import METHODS
from cema_ray.methods.lanes import LanedCloud, lane_view, lane_wire

from batch_tables import batch_table
from test_bank import images, tiny  # the tiny conv+BN model and uint8 uploads the bank's tests use


def fleet_cloud(lane: int = 0):
    return METHODS.get("cema-fleet").make_cloud(tiny(6, 1), tiny(4, 2), {"chunk_size": 4},
                                                torch.Generator().manual_seed(lane))


def laned() -> LanedCloud:
    return LanedCloud(fleet_cloud, {0: 0, 1: 1, 2: 0})  # edges 0 and 2 in lane 0, edge 1 in lane 1


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_each_lane_learns_only_from_its_own_edges_and_publishes_under_its_prefix() -> None:
    cloud, alone = laned(), fleet_cloud()
    cloud.ingest(0, images(4, 1))
    alone.ingest(0, images(4, 1))
    assert cloud.on_edge_batch(0) == 1 and alone.on_edge_batch(0) == 1
    assert cloud.trainers[1].queued() == 0 and cloud.trainers[1].counters["chunk_steps"] == 0
    wire = cloud.export(0)
    assert wire and all(k.startswith("lane.0.") for k in wire)  # lane 1 has nothing new: not on the wire
    assert same(lane_view(wire, 0), alone.export(0))  # lane 0 is what a fleet of its edges alone would train
    assert lane_view(wire, 1) is None
    cloud.ingest(1, images(4, 2))
    cloud.on_edge_batch(1)
    wire = cloud.export(1)
    assert {k.split(".")[1] for k in wire} == {"1"}  # only the lane with news
    assert cloud.queued() == 0


def test_a_reset_edge_resets_only_its_own_lane() -> None:
    cloud = laned()
    for edge, seed in ((0, 1), (1, 2)):
        cloud.ingest(edge, images(4, seed))
        cloud.on_edge_batch(edge)
    lane1 = cloud.trainers[1].students[0].export()
    cloud.reset(0)
    assert cloud.trainers[0].students[0].steps == 0  # lane 0's student is back to the deployed one
    assert cloud.trainers[1].students[0].steps == 1 and same(cloud.trainers[1].students[0].export(), lane1)


def test_lane_views_are_made_once_per_publication_so_a_lanes_edges_share_them() -> None:
    wire = lane_wire({0: {"w": np.zeros(3, np.float32)}, 2: {"w": np.ones(3, np.float32)}})
    assert set(wire) == {"lane.0.w", "lane.2.w"}
    assert lane_view(wire, 2) is lane_view(wire, 2) and np.array_equal(lane_view(wire, 2)["w"], np.ones(3))
    assert lane_view(wire, 1) is None


def test_laned_state_round_trip_continues_identically() -> None:
    a = laned()
    a.ingest(1, images(6, 1))
    a.on_edge_batch(1)
    b = laned()
    b.load_state_dict(a.state_dict())
    for c in (a, b):
        c.ingest(2, images(4, 3))
        c.on_edge_batch(2)
    assert same(a.export(2), b.export(2))


def test_lanes_with_per_edge_students_fail_at_load_in_one_line(make_run_config) -> None:
    with pytest.raises(ConfigError, match="method.lanes = 'group': needs method.student_scope: shared"):
        make_run_config("method.name=cema", "method.student_scope=per_edge", "method.lanes=group")


def test_a_local_run_with_lanes_feeds_each_group_its_own_lane(make_run_config, tmp_path) -> None:
    """Two groups, cema-fleet, one lane each: every sample predicted once, and an edge is charged only its own
    lane's bytes (each publication a lane's norm state: what one student sends)."""
    from cema_ray.runtime import run_experiment
    from cema_ray.runtime.assembly import edge_lanes

    groups = "edges.groups=[{name: a, fraction: 0.5}, {name: b, fraction: 0.5, stream: {corruptions: [fog]}}]"
    cfg = make_run_config("method.name=cema-fleet", "method.lanes=group", "edges.count=4", groups)
    lanes = edge_lanes(cfg)
    assert sorted(set(lanes.values())) == [0, 1]
    summary = run_experiment(cfg, tmp_path / "lanes")
    plain = run_experiment(make_run_config("method.name=cema-fleet", "edges.count=4", groups), tmp_path / "fleet")
    t, p = batch_table(tmp_path / "lanes"), batch_table(tmp_path / "fleet")
    assert summary["samples"] == sum(t["samples"]) == plain["samples"]
    downs, plain_downs = {b for b in t["bytes_down"] if b}, {b for b in p["bytes_down"] if b}
    assert downs and downs == plain_downs  # one lane's student, the size of the fleet's one student
    assert t["weight_version"] == p["weight_version"]  # one version counter: a lane with no news is not stale
    assert t["mean_entropy"] != p["mean_entropy"]  # but the students trained apart
