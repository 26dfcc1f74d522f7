"""The runners: outputs, accounting of every sample, and local == Ray (sync) on the same seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cema_ray.runtime import run_experiment

from batch_tables import COMPARED, batch_table


def _expected_ids(cfg) -> set[int]:
    from cema_ray.runtime.fleet import DataContext, edge_plans

    data = DataContext(cfg["data"])
    ids = set()
    for plan in edge_plans(cfg):
        stream = data.stream(plan)
        ids |= {plan.edge_id * 10**9 + i for i in range(stream.total_samples)}
    return ids


def test_local_run_writes_outputs_and_accounts_every_sample(make_run_config, tmp_path):
    torch.set_num_threads(1)
    cfg = make_run_config("edges.count=3", "output.report=true")
    summary = run_experiment(cfg, tmp_path / "out")
    for name in ("summary.json", "batches.parquet", "report.md"):
        assert (tmp_path / "out" / name).is_file()
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["samples"] == summary["samples"] == 3 * 2 * 64
    assert on_disk["upload_fraction"] == 1.0  # upload-all
    assert on_disk["dropped"] == 0
    t = batch_table(tmp_path / "out")
    seen = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert len(seen) == len(set(seen)) == sum(t["samples"])  # no sample predicted twice
    assert set(seen) == _expected_ids(cfg)  # none missing
    assert max(t["cloud_steps"]) >= 1 and max(t["weight_version"]) >= 1
    assert set(t["domain"]) == {"gaussian_noise-5", "fog-5"}


def test_cema_records_which_filter_kept_each_sample_off_the_uplink(make_run_config, tmp_path):
    """samples = uploaded + throttled + skipped by each filter, batch by batch; the summary adds them up."""
    torch.set_num_threads(1)
    summary = run_experiment(make_run_config("method.name=cema", "edges.count=2", "method.settings={e_max_factor: 0.97}"),
                             tmp_path / "o")  # the tiny untrained models' entropies sit near 0.97 ln C
    t = batch_table(tmp_path / "o")
    reasons = ("skipped_unreliable", "skipped_confident", "skipped_redundant", "throttled")
    for i, n in enumerate(t["samples"]):
        assert n == t["uploaded"][i] + sum(t[c][i] for c in reasons)
    assert sum(t["skipped_unreliable"]) > 0 and sum(t["skipped_redundant"]) > 0  # both filters at work
    assert sum(t["skipped_confident"]) == 0  # the authors' code has no entropy floor
    total = sum(t["samples"])
    assert summary["skipped"]["skipped_redundant"] == pytest.approx(sum(t["skipped_redundant"]) / total)
    for domain in summary["per_domain"].values():
        assert domain["upload_fraction"] + sum(domain["skipped"].values()) == pytest.approx(1.0)


def test_source_method_uploads_nothing(make_run_config, tmp_path):
    torch.set_num_threads(1)
    summary = run_experiment(make_run_config("method.name=source", "edges.count=1"), tmp_path / "o")
    assert summary["uploaded"] == 0 and summary["bytes_down"] == 0


@pytest.mark.ray
@pytest.mark.parametrize("method,edges,per_host", [("upload-all", 1, 1), ("upload-all", 5, 2), ("cema", 4, 3),
                                                    ("tent", 3, 2), ("cema-fleet", 4, 3),
                                                    ("cema-bank", 4, 3)])
def test_ray_sync_reproduces_local(ray_session, make_run_config, tmp_path, method, edges, per_host):
    """Same seed, same config: the Ray runtime's predictions, uploads and versions equal the local runner's."""
    torch.set_num_threads(1)  # hosts and cloud run one thread each; keep float reductions identical
    common = (f"method.name={method}", f"edges.count={edges}", f"edges.per_host={per_host}",
              *(["method.settings={bank_gate: false}", "method.lanes=group",  # random models: entries; a lane
                 "edges.groups=[{name: a, fraction: 0.5}, {name: b, fraction: 0.5, stream: {corruptions: [fog]}}]"]
                if method == "cema-bank" else []),  # per group, each its own bank
              *(["stream.samples_per_domain=32"] if edges == 5 else []))  # 3 hosts, one partial: a short stream
    local = run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    remote = run_experiment(make_run_config("runtime=ray", *common), tmp_path / "ray")
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "ray")
    for col in COMPARED:
        assert a[col] == b[col], col
    assert remote["num_hosts"] == -(-edges // per_host)
    assert local["accuracy"] == remote["accuracy"]
    assert np.isclose(local["upload_fraction"], remote["upload_fraction"])


@pytest.mark.ray
def test_ray_async_accounts_every_sample_and_records_staleness(ray_session, make_run_config, tmp_path):
    cfg = make_run_config("runtime=ray", "mode=async", "edges.count=4", "edges.per_host=2", "ray.uplink=fixed",
                          "ray.max_in_flight_per_host=2", "stream.samples_per_domain=128",
                          "edges.groups=[{name: paced, fraction: 1.0, frame_rate: 4.0}]")
    summary = run_experiment(cfg, tmp_path / "a")
    t = batch_table(tmp_path / "a")
    seen = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert len(seen) == len(set(seen)) and set(seen) == _expected_ids(cfg)
    assert summary["uploaded"] == summary["samples"]  # upload-all: every sample sent
    assert 0 <= summary["dropped"] <= summary["uploaded"]  # what the cloud could not take is counted
    assert max(t["weight_version"]) >= 1
    assert summary["version_lag"]["max"] == max(t["version_lag"])  # the summary reads the column it describes


@pytest.mark.ray
def test_ctrl_c_in_async_records_every_batch_already_predicted_and_resumes(ray_session, make_run_config, tmp_path,
                                                                            monkeypatch):
    """An async batch is recorded when the cloud has taken its uploads; an interrupt while batches wait in the
    backlog, in a cloud call or in a finished host step records them all (their uploads counted as dropped);
    `--resume` then finishes the run with every sample once."""
    from cema_ray.cli import main
    from cema_ray.errors import RunInterrupted
    from cema_ray.runtime.async_driver import AsyncDriver

    real, calls = AsyncDriver._cloud_done, []

    def third_is_interrupted(self, lane, ref):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, lane, ref)

    monkeypatch.setattr(AsyncDriver, "_cloud_done", third_is_interrupted)
    cfg = make_run_config("runtime=ray", "mode=async", "edges.count=4", "edges.per_host=2", "ray.uplink=fixed",
                          "faults.slow_cloud_s=0.3", "stream.samples_per_domain=256", "cloud.checkpoint_every=1")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, tmp_path / "cut")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    t = batch_table(tmp_path / "cut")
    assert summary["status"] == "interrupted" and len(t["edge_id"]) == summary["predicted_batches"]
    for edge in set(t["edge_id"]):  # each edge's batches from its first, none missing, none twice
        mine = [b for e, b in zip(t["edge_id"], t["batch_index"]) if e == edge]
        assert sorted(mine) == list(range(len(mine)))
    assert summary["dropped_at_interrupt"] > 0 and summary["dropped"] >= summary["dropped_at_interrupt"]
    assert sum(t["dropped"]) == summary["dropped"]  # every upload the interrupt dropped is in the table
    monkeypatch.setattr(AsyncDriver, "_cloud_done", real)
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0  # from the journal's newest round
    done = json.loads((tmp_path / "cut" / "summary.json").read_text())
    t = batch_table(tmp_path / "cut")
    seen = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert done["status"] == "complete" and done["resumed_at"] >= 1
    assert len(seen) == len(set(seen)) and set(seen) == _expected_ids(cfg)  # each sample once


def test_async_version_lag_counts_the_versions_published_before_the_batch():
    """`fix_lags`: a batch's lag is the newest version its student key had when the batch was predicted, minus
    the version the edge used; publications after the prediction do not count, per-edge keys win over shared."""
    from cema_ray.runtime.async_driver import fix_lags
    from cema_ray.runtime.cloud import SHARED

    pub_log = [(1.0, SHARED, 1), (2.0, SHARED, 2), (3.0, SHARED, 3), (2.5, 7, 5)]
    records = [{"edge_id": 0, "predicted_at": 2.2, "weight_version": 1},
               {"edge_id": 0, "predicted_at": 0.5, "weight_version": 0},
               {"edge_id": 0, "predicted_at": 9.0, "weight_version": 3},
               {"edge_id": 7, "predicted_at": 2.6, "weight_version": 2}]
    fix_lags(records, pub_log, 1)
    assert [r["version_lag"] for r in records] == [1, 0, 0, 3]
    sharded = [{"edge_id": 1, "predicted_at": 2.0, "weight_version": 1},  # shard 1's shared student
               {"edge_id": 2, "predicted_at": 2.0, "weight_version": 1}]  # shard 0's
    fix_lags(sharded, [*pub_log, (1.0, SHARED - 1, 4)], 2)
    assert [r["version_lag"] for r in sharded] == [3, 1]


@pytest.mark.ray
@pytest.mark.parametrize("method", ["upload-all", "cema-fleet"])
def test_killed_hosts_restart_resume_and_predict_every_sample_exactly_once(ray_session, make_run_config, tmp_path,
                                                                           method):
    """Two injected host crashes in a sync run: same records as an undisturbed local run."""
    torch.set_num_threads(1)
    common = (f"method.name={method}", "edges.count=4", "edges.per_host=2", "stream.samples_per_domain=96")
    local = run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    hit = run_experiment(make_run_config("runtime=ray", "faults.kill_hosts=2", *common), tmp_path / "hit")
    assert hit["faults"]["host_failures_seen"] >= 2 and hit["faults"]["host_recoveries"] >= 2
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "hit")
    for col in COMPARED:
        assert a[col] == b[col], col  # nothing lost, nothing twice, and the same predictions
    assert hit["dropped"] == 0 and local["accuracy"] == hit["accuracy"]


@pytest.mark.ray
def test_edge_hosts_run_at_lower_priority_than_the_cloud(ray_session, make_run_config):
    """ray.host_nice: Ray's num_cpus admits actors but does not share the CPU between them; the niceness
    added to EdgeHost processes is what lets a cloud on the same node win the CPU in async mode."""
    import psutil

    from cema_ray.runtime.fleet import edge_plans
    from cema_ray.runtime.ray_actors import EdgeHost

    cfg = make_run_config("runtime=ray", "edges.count=1")
    plans = edge_plans(cfg)
    plain = ray_session.remote(EdgeHost).options(num_cpus=0.1).remote(0, cfg, plans, None, 1, 0)
    nice = ray_session.remote(EdgeHost).options(num_cpus=0.1).remote(1, cfg, plans, None, 1, 3)
    pids = ray_session.get([plain.ping.remote(), nice.ping.remote()])
    base = psutil.Process(pids[0]).nice()  # Ray starts workers at 15 (its worker_niceness)
    assert base <= 16 and psutil.Process(pids[1]).nice() == base + 3
    for actor in (plain, nice):
        ray_session.kill(actor)



@pytest.mark.ray
def test_two_runs_share_one_cluster_at_once(ray_session, make_run_config, tmp_path):
    """Two runs on one Ray instance at the same time: their actors' names differ, both finish, and each one's
    records equal its own undisturbed local run (no cross-talk through a shared actor)."""
    from concurrent.futures import ThreadPoolExecutor

    from cema_ray.runtime.ray_runner import actor_prefix

    torch.set_num_threads(1)
    assert actor_prefix("Quick start!", "abcdef0123") == "cema-quick-start-abcdef"
    cfgs = {s: ("method.name=cema-fleet", "edges.count=2", "edges.per_host=1", f"seed={s}") for s in (0, 1)}
    with ThreadPoolExecutor(2) as pool:
        futures = {s: pool.submit(run_experiment, make_run_config("runtime=ray", *c), tmp_path / f"ray{s}")
                   for s, c in cfgs.items()}
        remote = {s: f.result(timeout=240) for s, f in futures.items()}
    for s, c in cfgs.items():
        local = run_experiment(make_run_config("runtime=local", *c), tmp_path / f"local{s}")
        a, b = batch_table(tmp_path / f"local{s}"), batch_table(tmp_path / f"ray{s}")
        assert all(a[col] == b[col] for col in COMPARED) and local["accuracy"] == remote[s]["accuracy"]


def test_without_an_address_a_run_starts_its_own_instance(make_run_config, monkeypatch):
    """A plain ray.init() joins a cluster already running on the machine and then refuses the resource
    arguments (a raw ValueError); with no address a run asks for a new local instance, with one it joins."""
    import ray

    from cema_ray.runtime import ray_runner

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runner.init_ray(make_run_config("runtime=ray")) is True
    args, kwargs = calls[-1]
    assert args == ("local",) and "num_cpus" in kwargs
    ray_runner.init_ray(make_run_config("runtime=ray", "ray.address=auto"))
    args, kwargs = calls[-1]
    assert kwargs["address"] == "auto" and "num_cpus" not in kwargs


def test_an_image_folder_source_runs_end_to_end(tmp_path):
    """`data.source: image-folder` (a lazy folder: no image array, no class count in the source) runs, and every
    sample is predicted once; a folder whose images differ in size is refused by the loader's own check."""
    from PIL import Image

    from cema_ray.config import load_config
    from cema_ray.errors import DataError

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fox"):
        (tmp_path / "data" / "test" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / "test" / c / f"{i}.png")
    overrides = ["runtime=local", "edges.count=2", "stream.samples_per_domain=16", "stream.batch_size=8",
                 "stream.corruptions=[fog]", "data.source=image-folder", f"data.root={tmp_path / 'data'}",
                 "output.progress=false", "output.report=false", "method.name=bn", "method.settings={}"]
    from conftest import REPO

    overrides += [f"models.edge.checkpoint={REPO / 'checkpoints/cifar10/edge.safetensors'}",
                  f"models.foundation.checkpoint={REPO / 'checkpoints/cifar10/foundation.safetensors'}"]
    cfg = load_config(REPO / "configs" / "cifar10c.yaml", overrides)
    summary = run_experiment(cfg, tmp_path / "out")
    assert summary["samples"] == 2 * 16 and summary["rejected"] == 0
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "data" / "test" / "cat" / "0.png")
    with pytest.raises(DataError):
        run_experiment(load_config(REPO / "configs" / "cifar10c.yaml", overrides), tmp_path / "out2")


def test_an_unwritable_output_folder_fails_before_the_run(make_run_config, tmp_path, monkeypatch):
    """One line, before any work: the run itself is never started."""
    from cema_ray.errors import ConfigError
    from cema_ray.runtime import local

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(local, "run_local", lambda cfg: pytest.fail("the run started"))
    with pytest.raises(ConfigError, match="output folder .*cannot write"):
        run_experiment(make_run_config("runtime=local"), blocker / "out")


def test_ctrl_c_writes_what_was_predicted_and_exits_130(make_run_config, tmp_path, monkeypatch, capsys):
    """An interrupt after two rounds: summary.json and batches.parquet hold exactly those rounds, marked
    interrupted, and the CLI says so in one line with exit code 130."""
    from cema_ray.cli import main as cli_main
    from cema_ray.errors import RunInterrupted
    from cema_ray.runtime import local

    real, rounds = local.run_round, []

    def two_then_stop(edges, cloud, fuse):
        if len(rounds) == 2:
            raise KeyboardInterrupt
        rounds.append(1)
        return real(edges, cloud, fuse)

    monkeypatch.setattr(local, "run_round", two_then_stop)
    cfg = make_run_config("runtime=local", "edges.count=2")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, tmp_path / "cut")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["samples"] == 2 * 2 * 32  # 2 rounds x 2 edges x batch 32
    assert len(batch_table(tmp_path / "cut")["edge_id"]) == 4
    rounds.clear()
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "method"} | {"method": {"name": "bn"}}))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "cli")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cema-ray: interrupted; the 4 batches predicted so far are in")


@pytest.mark.parametrize("checkpointing, kept", [(False, 0), (True, 5)])
def test_driver_forgets_deliveries_no_recovery_can_need(checkpointing, kept):
    """Without cloud checkpoints there is nothing to replay onto: the driver's delivery log stays empty
    instead of holding every upload of the run; with them it keeps what the newest checkpoint misses."""
    from types import SimpleNamespace

    from cema_ray.runtime.faults import FaultSchedule
    from cema_ray.runtime.ray_actors import Delivery
    from cema_ray.runtime.cloud_link import CloudLink

    cloud = SimpleNamespace(deliver=SimpleNamespace(remote=lambda *a, **kw: object()))
    link = CloudLink(cloud, FaultSchedule.plan(0, 10, 1, 0, 0, 0), checkpointing)
    for _ in range(5):
        seq, _ref = link.submit([0], [object()])
        link.delivered(seq, Delivery(steps={}, pubs=[], checkpoint=0, published_at=0.0))
    assert len(link.log) == kept


def test_a_restored_host_paces_its_edges_from_where_their_snapshots_left_them(make_run_config):
    """Async pacing: a restarted EdgeHost restored at batch k has batch k due at once and keeps the edge's
    frame rate; anchoring the new process at its own start made it wait k / rate first (a soak run crawled)."""
    import time

    from cema_ray.runtime.fleet import DataContext, edge_plans
    from cema_ray.runtime.ray_actors import EdgeHost

    cfg = make_run_config("runtime=ray", "mode=async", "edges.count=1", "edges.per_host=1",
                          "edges.groups=[{name: paced, fraction: 1.0, frame_rate: 2.0}]", "method.name=bn",
                          "stream.samples_per_domain=128",
                          "method.settings={}")
    plans, clean = edge_plans(cfg), DataContext(cfg["data"]).clean
    first = EdgeHost(0, cfg, plans, clean)
    first.restore({}, [])
    for _ in range(3):
        first.step_and_snapshot({}, paced=True)
    snap = first.snapshot()
    second = EdgeHost(0, cfg, plans, clean)  # what Ray starts after a crash
    second.restore(snap, [])
    t0 = time.monotonic()
    records, _, _ = second.step_and_snapshot({}, paced=True)
    assert records and records[0]["batch_index"] == 3 and time.monotonic() - t0 < 1.2  # due now, not in 1.5 s
    t1, records = time.monotonic(), []
    while not records and time.monotonic() - t1 < 5:  # a step may wake a hair early and predict nothing
        records, _, _ = second.step_and_snapshot({}, paced=True)
    assert records[0]["batch_index"] == 4 and time.monotonic() - t1 >= 0.4  # and then at 2 batches per second
