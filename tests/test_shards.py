"""A cloud in shards: each edge served by shard edge_id % N, the foundations averaged back into one model,
a local run equal to a sync Ray run with the same shards, and a killed shard recovered."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cema_ray.errors import ConfigError
from cema_ray.runtime import run_experiment
from cema_ray.runtime.cloud import Publication
from cema_ray.runtime.shards import average_states, shard_of

from batch_tables import COMPARED, batch_table

CEMA = ("method.name=cema", "method.settings={e_max_factor: 0.97}")  # the tiny models' entropies sit near ln C


def test_average_states_is_the_mean_in_shard_order():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    out = average_states([a, b])
    assert out["w"].dtype == np.float32 and np.array_equal(out["w"], [2.0, 4.0])
    assert np.array_equal(a["w"], [1.0, 2.0])  # the inputs are left alone


def test_a_shard_publication_reaches_only_its_edges():
    pub = Publication({}, 1, None, shard=1)
    assert [e for e in range(6) if pub.reaches(e, 2)] == [1, 3, 5]
    assert Publication({}, 1, 4).reaches(4, 2) and not Publication({}, 1, 4).reaches(2, 2)
    assert pub.key != Publication({}, 1, None, shard=0).key  # each shard's shared student has its own versions
    assert [shard_of(e, 3) for e in range(5)] == [0, 1, 2, 0, 1]


def test_shards_train_apart_and_average_their_foundations(make_run_config):
    """Each shard steps on its own edges' uploads; at a sync round both hold the same (averaged) foundation."""
    from cema_ray.models.norm import norm_state
    from cema_ray.runtime.assembly import build_shards, load_edge_model, load_foundation

    torch.set_num_threads(1)
    cfg = make_run_config(*CEMA, "cloud.shards=2", "cloud.sync_every=2", "edges.count=4")
    shards = build_shards(cfg, [load_edge_model(cfg)], load_foundation(cfg))
    f0, f1 = (s.trainer.foundation for s in shards.services)
    assert f0 is not f1
    before = norm_state(f0)
    rng = np.random.default_rng(0)
    for rnd in range(2):
        for edge in range(4):
            shards.receive(edge, rng.integers(0, 256, (16, 28, 28, 1), np.uint8))
        pubs = shards.end_round(list(range(4)))
        assert sorted(p.shard for p in pubs) == [0, 1] and all(p.edge_id is None for p in pubs)
        a, b = norm_state(f0), norm_state(f1)
        same = all(np.array_equal(a[k], b[k]) for k in a)
        assert same == (rnd == 1)  # apart after round 0, averaged at round 1 (sync_every 2)
    assert any(not np.array_equal(before[k], a[k]) for k in a)  # the foundation did adapt
    assert shards.stats.steps == sum(s.stats.steps for s in shards.services) > 0
    assert set(shards.services[0].stats.per_edge_steps) == {0, 2}  # shard 0 served edges 0 and 2 only


def test_local_shards_account_for_every_sample_and_version_per_shard(make_run_config, tmp_path):
    torch.set_num_threads(1)
    one = run_experiment(make_run_config(*CEMA, "edges.count=4"), tmp_path / "one")
    two = run_experiment(make_run_config(*CEMA, "edges.count=4", "cloud.shards=2"), tmp_path / "two")
    assert one["samples"] == two["samples"] and two["dropped"] == 0
    t = batch_table(tmp_path / "two")
    assert two["publications"] > one["publications"]  # two shared students, each publishing
    assert max(t["weight_version"]) >= 1


def test_a_cloud_without_room_for_hosts_is_refused(make_run_config, monkeypatch):
    from cema_ray.runtime import ray_runner

    monkeypatch.setattr(ray_runner, "cluster_cpus", lambda: 2.0)
    cfg = make_run_config("runtime=ray", "cloud.shards=2")
    with pytest.raises(ConfigError, match="leave 0 of the cluster's 2 for edge hosts"):
        ray_runner.free_cpus(cfg)
    assert ray_runner.free_cpus(make_run_config("runtime=ray", "cloud.shards=2", "cloud.num_cpus=0.75")) == 0.5


def test_a_late_mean_is_applied_as_a_correction_not_a_rollback(make_run_config):
    """`CloudService.share`/`merge`: one share in flight per shard; a mean arriving before any further delivery
    is loaded as is (sync rounds), one arriving after more deliveries moves the state by mean - sent (async)."""
    from cema_ray.runtime.assembly import build_shards, load_edge_model, load_foundation

    torch.set_num_threads(1)
    cfg = make_run_config(*CEMA, "cloud.shards=2", "edges.count=2")
    service = build_shards(cfg, [load_edge_model(cfg)], load_foundation(cfg)).services[0]
    rng = np.random.default_rng(0)

    def deliver() -> None:
        service.receive(0, rng.integers(0, 256, (32, 28, 28, 1), np.uint8))
        service.end_round([0])

    deliver()
    sent = service.share()
    assert sent is not None and service.share() is None  # the first share waits for its mean
    mean = {k: np.asarray(v, np.float32) + np.float32(0.5) for k, v in sent.items()}
    service.merge(mean)
    state = service.trainer.shared_state()
    assert all(np.array_equal(np.asarray(state[k], np.float32), mean[k]) for k in mean)  # loaded as is

    sent = service.share()
    deliver()
    deliver()
    moved = service.trainer.shared_state()
    changed = [k for k in sent if not np.array_equal(sent[k], moved[k])]
    assert changed  # the two deliveries adapted the foundation after the share
    mean = {k: np.asarray(v, np.float32) + np.float32(0.25) for k, v in sent.items()}
    snapshot = service.state_dict()["shared_sent"]
    assert snapshot is not None and snapshot[0] == service.rounds - 2  # a checkpoint keeps the share
    service.merge(mean)
    after = service.trainer.shared_state()
    for k in changed:
        expected = np.asarray(moved[k], np.float32) + np.float32(0.25)
        assert np.allclose(np.asarray(after[k], np.float32), expected, atol=1e-6), k
    assert service.share() is not None  # merged: the shard shares again


@pytest.mark.ray
@pytest.mark.parametrize("method", [CEMA, ("method.name=upload-all",)])
def test_ray_sync_with_two_shards_equals_local_with_two_shards(ray_session, make_run_config, tmp_path, method):
    """Record for record; hosts of 3 edges hold edges of both shards."""
    torch.set_num_threads(1)
    common = (*method, "edges.count=5", "edges.per_host=3", "cloud.shards=2")
    local = run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    remote = run_experiment(make_run_config("runtime=ray", *common), tmp_path / "ray")
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "ray")
    for col in COMPARED:
        assert a[col] == b[col], col
    assert local["cloud_steps"] == remote["cloud_steps"] > 0
    assert local["publications"] == remote["publications"]


@pytest.mark.ray
def test_a_killed_shard_recovers_and_changes_nothing(ray_session, make_run_config, tmp_path):
    """Shard 0 is killed mid-run, restarts from its own checkpoint folder and is replayed (merges included)."""
    torch.set_num_threads(1)
    common = (*CEMA, "edges.count=4", "edges.per_host=2", "stream.samples_per_domain=128",
              "cloud.checkpoint_every=3", "cloud.shards=2")
    run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    hit = run_experiment(make_run_config("runtime=ray", "faults.kill_cloud=1", "faults.seed=3", *common),
                         tmp_path / "hit")
    assert hit["faults"]["cloud_recoveries"] >= 1
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "hit")
    for col in COMPARED:
        assert a[col] == b[col], col
    assert (tmp_path / "hit" / "cloud_checkpoints" / "shard-0" / "LATEST").is_file()
    assert (tmp_path / "hit" / "cloud_checkpoints" / "shard-1" / "LATEST").is_file()


@pytest.mark.ray
def test_async_shards_account_for_every_sample_and_average_their_foundations(ray_session, make_run_config,
                                                                              tmp_path):
    """Async, 2 shards, backpressure: every sample predicted once, every upload taken, both shards publish
    their own versions, and the foundations are averaged while the edges run."""
    torch.set_num_threads(1)
    cfg = make_run_config("runtime=ray", "mode=async", *CEMA, "edges.count=4", "edges.per_host=2",
                          "stream.samples_per_domain=128", "cloud.shards=2", "ray.backlog_full=wait")
    summary = run_experiment(cfg, tmp_path / "a")
    t = batch_table(tmp_path / "a")
    ids = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert len(ids) == len(set(ids)) == summary["samples"] == 4 * 256
    assert summary["dropped"] == 0 and summary["uploaded"] == summary["cloud_ingested"] > 0
    assert summary["shard_merges"] >= 1
    assert summary["cloud_steps"] == sum(t["cloud_steps"]) > 0
    for shard in (0, 1):  # each shard's edges ran on its own published versions
        versions = [v for e, v in zip(t["edge_id"], t["weight_version"]) if e % 2 == shard]
        assert max(versions) >= 1, shard


@pytest.mark.ray
def test_a_killed_shard_in_async_mode_loses_no_sample(ray_session, make_run_config, tmp_path):
    torch.set_num_threads(1)
    cfg = make_run_config("runtime=ray", "mode=async", "method.name=upload-all", "edges.count=4",
                          "edges.per_host=2", "stream.samples_per_domain=128", "cloud.checkpoint_every=2",
                          "cloud.shards=2", "faults.kill_cloud=1", "ray.backlog_full=wait")
    summary = run_experiment(cfg, tmp_path / "k")
    t = batch_table(tmp_path / "k")
    ids = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert len(ids) == len(set(ids)) == summary["samples"] == 4 * 256
    assert summary["faults"]["cloud_recoveries"] >= 1
    assert summary["dropped"] == 0 and summary["uploaded"] == summary["cloud_ingested"] == summary["samples"]
