"""Cloud checkpoints on disk, a killed cloud's restart and replay, and backpressure from a slow cloud."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.runtime import run_experiment
from cema_ray.runtime.cloud_checkpoint import CloudCheckpointStore, decode_tree, encode_tree

from batch_tables import COMPARED, batch_table


def _ids(t: dict[str, list]) -> list[int]:
    return [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]


def test_state_tree_survives_encoding_with_key_types_and_tuples():
    tree = {"opt": {"state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2, 2)}},
                    "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1]}]},
            "queue": np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3), "nothing": None, "flag": True,
            "gen": torch.Generator().manual_seed(5).get_state(), "nan": float("nan"), "scalar": np.float32(1.5)}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(encode_tree(tree, tensors)))  # what goes to disk is plain JSON
    back = decode_tree(encoded, tensors)
    assert set(back["opt"]["state"]) == {0} and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"]["state"][0]["buf"], torch.ones(2, 2))
    np.testing.assert_array_equal(back["queue"], tree["queue"])
    assert back["queue"].dtype == np.uint8 and back["nothing"] is None and back["flag"] is True
    assert torch.equal(back["gen"], tree["gen"]) and math.isnan(back["nan"]) and back["scalar"] == 1.5
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        encode_tree({"x": object()}, {})


def test_store_keeps_the_newest_two_and_ignores_other_runs(tmp_path):
    store = CloudCheckpointStore(tmp_path, "run-a")
    assert store.latest() is None
    for position in (2, 4, 6):
        store.save({"position": position, "w": torch.full((3,), float(position))}, position)
    state, position = store.latest()
    assert position == 6 and torch.equal(state["w"], torch.full((3,), 6.0))
    assert sorted(p.name for p in tmp_path.glob("state-*.json")) == ["state-00000004.json", "state-00000006.json"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    assert CloudCheckpointStore(tmp_path, "run-b").latest() is None  # another run's checkpoint is not resumed


def test_tampered_or_truncated_cloud_checkpoint_is_refused(tmp_path):
    store = CloudCheckpointStore(tmp_path, "r")
    weights = store.save({"w": torch.arange(100.0)}, 1)
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        store.latest()
    weights.write_bytes(bytes(data[:40]))
    with pytest.raises(CheckpointError, match="truncated"):
        store.latest()
    (tmp_path / "state-00000001.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        store.latest()


@pytest.mark.parametrize("method", ["cema", "cema-fleet"])
def test_cema_cloud_resumes_from_disk_exactly(make_run_config, tmp_path, method):
    """Save after two deliveries, load into a fresh cloud: both publish the same parameters afterwards."""
    from cema_ray.runtime.fleet import load_model
    from cema_ray.runtime.assembly import build_cloud

    torch.set_num_threads(1)
    cfg = make_run_config(f"method.name={method}", "method.settings={}")
    rng = np.random.default_rng(0)
    uploads = [rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8) for _ in range(4)]

    def cloud():
        return build_cloud(cfg, [load_model(cfg["models"]["edge"], cfg["data"], "edge")],
                           load_model(cfg["models"]["foundation"], cfg["data"], "foundation"))

    a = cloud()
    for imgs in uploads[:2]:
        a.receive(0, imgs)
        a.end_round([0])
    store = CloudCheckpointStore(tmp_path, "r")
    store.save(a.state_dict(), 2)
    b = cloud()
    state, position = store.latest()
    b.load_state_dict(state)
    assert position == 2 and b.rounds == a.rounds and b.versions == a.versions
    for imgs in uploads[2:]:
        steps = [c.receive(0, imgs) for c in (a, b)]
        pubs = [c.end_round([0]) for c in (a, b)]
        assert steps[0] == steps[1] >= 1 and len(pubs[0]) == len(pubs[1]) == 1
        assert pubs[0][0].version == pubs[1][0].version
        for k, v in pubs[0][0].state.items():
            np.testing.assert_array_equal(v, pubs[1][0].state[k])


def test_kill_cloud_needs_checkpoints(make_run_config):
    with pytest.raises(ConfigError, match="faults.kill_cloud.*checkpoint_every"):
        make_run_config("faults.kill_cloud=1", "cloud.checkpoint_every=0")
    with pytest.raises(ConfigError, match="max_restarts"):
        make_run_config("faults.kill_cloud=1", "cloud.max_restarts=0")


@pytest.mark.ray
@pytest.mark.parametrize("method", ["cema", "cema-fleet"])
def test_killed_cloud_and_failed_hosts_in_sync_mode_change_nothing(ray_session, make_run_config, tmp_path, method):
    """A cloud kill, a host kill and a host step that raises: the cloud restarts from its checkpoint and the
    driver replays what the checkpoint misses; the hosts restart at their snapshots. Every record equals an
    undisturbed local run's."""
    torch.set_num_threads(1)
    common = (f"method.name={method}", "edges.count=3", "edges.per_host=2", "stream.samples_per_domain=128",
              "cloud.checkpoint_every=3")
    run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    hit = run_experiment(make_run_config("runtime=ray", "faults.kill_cloud=1", "faults.kill_hosts=1",
                                         "faults.raise_in_hosts=1", "faults.seed=3", *common), tmp_path / "hit")
    f = hit["faults"]
    assert f["cloud_kills_planned"] == 1 and f["cloud_failures_seen"] >= 1 and f["cloud_recoveries"] >= 1
    assert f["host_kills_planned"] == f["host_exceptions_planned"] == 1
    assert f["host_recoveries"] >= 2 and all(p >= 0 for p in f["cloud_restored_from"])
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "hit")
    for col in COMPARED:
        assert a[col] == b[col], col
    assert len(_ids(b)) == len(set(_ids(b))) == hit["samples"]
    assert (tmp_path / "hit" / "cloud_checkpoints" / "LATEST").is_file()


@pytest.mark.ray
@pytest.mark.parametrize("backlog_full", ["drop_oldest", "wait"])
def test_failures_in_async_mode_lose_no_sample(ray_session, make_run_config, tmp_path, backlog_full):
    """Async: the cloud, a host and a host's step fail while edges run ahead; nothing lost or predicted twice."""
    cfg = make_run_config("runtime=ray", "mode=async", "method.name=upload-all", "edges.count=4",
                          "edges.per_host=2", "stream.samples_per_domain=128", "cloud.checkpoint_every=2",
                          "faults.kill_cloud=1", "faults.kill_hosts=1", "faults.raise_in_hosts=1",
                          f"ray.backlog_full={backlog_full}")
    summary = run_experiment(cfg, tmp_path / "a")
    t = batch_table(tmp_path / "a")
    assert len(_ids(t)) == len(set(_ids(t))) == summary["samples"] == 4 * 256
    f = summary["faults"]
    assert f["cloud_recoveries"] >= 1 and f["host_recoveries"] >= 2 and f["host_failures_seen"] >= 2
    assert summary["uploaded"] == summary["cloud_ingested"] + summary["dropped"]  # each upload used or counted
    if backlog_full == "wait":
        assert summary["dropped"] == 0  # the hosts waited for the restarted cloud instead


@pytest.mark.ray
def test_slow_cloud_bounds_the_backlog_and_counts_what_it_drops(ray_session, make_run_config, tmp_path):
    """The cloud sleeps 1 s per delivery while hosts step in milliseconds: no deadlock, the backlog never
    passes its bound, the excess is dropped oldest first and counted, and every sample is still predicted."""
    cfg = make_run_config("runtime=ray", "mode=async", "method.name=upload-all", "edges.count=4",
                          "edges.per_host=2", "stream.samples_per_domain=64", "faults.slow_cloud_s=1.0",
                          "ray.uplink=fixed")
    summary = run_experiment(cfg, tmp_path / "s")
    t = batch_table(tmp_path / "s")
    assert len(_ids(t)) == len(set(_ids(t))) == summary["samples"]
    assert summary["max_backlog"] <= summary["backlog_bound"]
    assert summary["dropped"] > 0
    assert summary["uploaded"] == summary["cloud_ingested"] + summary["dropped"]
    assert sum(t["dropped"]) == summary["dropped"]


@pytest.mark.ray
def test_slow_cloud_with_backpressure_drops_nothing(ray_session, make_run_config, tmp_path):
    """ray.backlog_full=wait: the same slow cloud, but hosts pause while the backlog is full, so every upload
    reaches the cloud and the edges never run more than the backlog's bound ahead of it."""
    cfg = make_run_config("runtime=ray", "mode=async", "method.name=upload-all", "edges.count=4",
                          "edges.per_host=2", "stream.samples_per_domain=64", "faults.slow_cloud_s=0.5",
                          "ray.backlog_full=wait")
    summary = run_experiment(cfg, tmp_path / "w")
    t = batch_table(tmp_path / "w")
    assert len(_ids(t)) == len(set(_ids(t))) == summary["samples"]
    assert summary["dropped"] == 0 and sum(t["dropped"]) == 0
    assert summary["uploaded"] == summary["cloud_ingested"] == summary["samples"]
    assert summary["max_backlog"] <= summary["backlog_bound"]


def test_injected_bad_batches_are_rejected_counted_and_named(make_run_config, tmp_path):
    """Six malformed batches (one of each kind) reach the edges: each is rejected with its reason, the
    edges keep going, and the rejected samples are still accounted for by id."""
    torch.set_num_threads(1)
    cfg = make_run_config("edges.count=3", "method.name=cema", "faults.bad_batches=6", "faults.seed=1")
    summary = run_experiment(cfg, tmp_path / "b")
    t = batch_table(tmp_path / "b")
    reasons = sorted(r["error"].split(": ", 1)[1] for r in summary["rejected_batches"])
    assert len(reasons) == 6, reasons
    for expected in ("NaN or Inf", "images of shape", "must be uint8", "labels outside", "empty batch"):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert summary["rejected"] == sum(r["rejected"] for r in summary["rejected_batches"]) > 0
    assert len(_ids(t)) == len(set(_ids(t))) == summary["samples"] == 3 * 128  # nothing lost
    assert sum(t["samples"]) - summary["rejected"] > 0 and summary["accuracy"] > 0


def test_fault_schedule_is_a_pure_function_of_the_config():
    from cema_ray.runtime.faults import FaultSchedule

    a = FaultSchedule.plan(2, 10, 4, seed=3, kill_cloud=1, raise_in_hosts=1)
    b = FaultSchedule.plan(2, 10, 4, seed=3, kill_cloud=1, raise_in_hosts=1)
    assert a == b and a.planned == 4
    assert sorted(a.host_kills) == [3, 6] and all(1 <= r <= 9 for r in [*a.cloud_kills, *a.host_raises])
    assert not set(a.cloud_kills) & set(a.host_kills)  # each recovery is seen alone
    (at, hosts), = a.host_raises.items()
    host = hosts[0]
    assert not a.wants_raise(host, at - 1) and a.wants_raise(host, at) and a.wants_raise(host, at + 5)
    a.raised(host)  # seen once: disarmed, however late the step that raised it ran
    assert not a.wants_raise(host, at + 5)


@pytest.mark.ray
def test_uploads_a_full_cloud_queue_refuses_are_counted_in_their_batch(ray_session, make_run_config, tmp_path):
    """A cloud queue of 8 samples refuses most of each batch's uploads: every refusal lands in the `dropped`
    column of the batch that uploaded it, the columns add up to the summary's count, and Ray == local."""
    common = ("method.name=upload-all", "edges.count=2", "edges.per_host=1", "cloud.queue_capacity=8")
    local = run_experiment(make_run_config("runtime=local", *common), tmp_path / "l")
    remote = run_experiment(make_run_config("runtime=ray", *common), tmp_path / "r")
    a, b = batch_table(tmp_path / "l"), batch_table(tmp_path / "r")
    assert local["dropped"] > 0 and sum(a["dropped"]) == local["dropped"] == remote["dropped"] == sum(b["dropped"])
    assert a["dropped"] == b["dropped"]


@pytest.mark.ray
def test_an_actors_failure_is_classified_by_its_type_not_its_message(ray_session) -> None:
    import ray
    from ray.exceptions import RayTaskError

    from cema_ray.runtime.actor_calls import HostNeedsRestore, InjectedFault, raised_inside

    @ray.remote(num_cpus=0)
    def fail(kind: str) -> None:
        raise InjectedFault("injected") if kind == "injected" else RuntimeError("HostNeedsRestore InjectedFault")

    errors = {}
    for kind in ("injected", "words"):
        with pytest.raises(RayTaskError) as info:
            ray.get(fail.remote(kind))
        errors[kind] = info.value
    assert raised_inside(errors["injected"], InjectedFault) and not raised_inside(errors["injected"], HostNeedsRestore)
    assert not raised_inside(errors["words"], InjectedFault) and not raised_inside(errors["words"], HostNeedsRestore)
    assert not raised_inside(InjectedFault("not from an actor"), InjectedFault)
