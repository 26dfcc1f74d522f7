"""Placement settings, the pre-flight check and the lost-node watch, on the session's one-node Ray.

The real multi-node behaviour (actors on the nodes that offer their resources, a worker removed mid-run) is
tests/test_cluster.py; here the pieces are checked where a failure is cheap to provoke."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from cema_ray.errors import ConfigError
from cema_ray.runtime.placement import NodeWatch, preflight


def test_custom_resources_are_validated_at_load(make_run_config):
    cfg = make_run_config("cloud.resources={cloud: 1}", "ray.host_resources={edge: 0.5}")
    assert cfg["cloud"]["resources"] == {"cloud": 1} and cfg["ray"]["host_resources"] == {"edge": 0.5}
    with pytest.raises(ConfigError, match=r"^cloud.resources.CPU: a resource Ray defines itself"):
        make_run_config("cloud.resources={CPU: 2}")
    with pytest.raises(ConfigError, match=r"^ray.host_resources.edge = -1: must be a non-negative number"):
        make_run_config("ray.host_resources={edge: -1}")
    with pytest.raises(ConfigError, match=r"^cloud.resources = 'gpu': must be a mapping"):
        make_run_config("cloud.resources=gpu")


@dataclass
class LazyImages:
    """What the pre-flight check reads of a lazy image folder: its files."""

    files: list[str]


@pytest.mark.ray
def test_preflight_names_the_node_and_the_missing_file(ray_session, make_run_config, tmp_path):
    cfg = make_run_config("runtime=ray")
    present = tmp_path / "0.png"
    present.write_bytes(b"x")
    assert preflight(cfg, LazyImages([str(present)]), True, skip_own_node=False) == 1
    assert preflight(cfg, LazyImages([str(present)]), True) == 0  # the driver's node was checked before Ray
    missing = tmp_path / "missing.png"
    with pytest.raises(ConfigError, match=rf"^pre-flight: node \S+ \([0-9a-f]{{8}}\), which may run edge hosts and "
                                          rf"the cloud: {missing}: not found$"):
        preflight(cfg, LazyImages([str(present), str(missing)]), True, skip_own_node=False)


@pytest.mark.ray
def test_a_reservation_no_node_offers_fails_at_once_on_a_local_instance(ray_session, make_run_config):
    cfg = make_run_config("runtime=ray", "cloud.resources={gpu_box: 1}")
    with pytest.raises(ConfigError, match=r"^no node of this Ray instance offers what the cloud reserve "
                                          r"\(CPU 1, gpu_box 1\)"):
        preflight(cfg, None, True)


@pytest.mark.ray
def test_the_node_watch_reports_a_dead_node_once_with_every_actor_on_it(ray_session, capsys):
    import ray

    alive = ray.get_runtime_context().get_node_id()
    gone = "f" * 56  # no such node: Ray does not list it as alive
    watch = NodeWatch([gone, gone, alive], [alive])
    watch.moved("edge host 2", alive)  # back on its own node: nothing lost
    watch.moved("the cloud", alive)
    assert watch.lost == []
    watch.moved("edge host 0", alive)
    watch.moved("edge host 1", alive)  # the same node: reported once
    assert [(n["node"], n["actors"]) for n in watch.lost] == [(gone, ["edge host 0", "edge host 1"])]
    assert watch.lost[0]["moved_to"] == {"edge host 0": alive, "edge host 1": alive}
    assert capsys.readouterr().err.count(f"({gone[:8]}) lost: edge host 0, edge host 1 restart") == 1
