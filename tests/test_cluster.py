"""A cluster on one machine (`ray.cluster_utils.Cluster`, Ray's own way to test multi-node code).

A head (1 CPU, no custom resources) and two workers: the first (3 CPUs) offers `cloud` and `edge`, the second
(2 CPUs) `edge` only. The tests place the cloud and the hosts with `cloud.resources` / `ray.host_resources`, check that the
pre-flight check ran on the nodes that may run them, and then lose the cloud's node mid-run while a node that
can take the cloud joins. One cluster serves the module (nodes take seconds to start); the node-loss test runs
last. Drivers run in subprocesses, because this test session already holds a Ray connection of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from cema_ray.config import load_config
from cema_ray.runtime import run_experiment

from batch_tables import COMPARED, batch_table

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("cluster")]

CLI = Path(sys.executable).parent / "cema-ray"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    short_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # AF_UNIX socket paths must stay short
    nodes = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20,
                                    "temp_dir": short_tmp, "include_dashboard": False,
                                    # a removed node is declared dead in about a second, not Ray's 30 s
                                    "_system_config": {"health_check_period_ms": 500,
                                                       "health_check_failure_threshold": 2}})
    try:
        workers = [nodes.add_node(num_cpus=cpus, resources=res, object_store_memory=100 * 2**20)
                   for cpus, res in ((3, {"edge": 2, "cloud": 1}), (2, {"edge": 2}))]
        nodes.wait_for_nodes()
        nodes.workers = workers
        yield nodes
    finally:
        nodes.shutdown()


def _config(tiny_raw_config, tmp_path: Path, cluster, name: str, **extra) -> Path:
    config = tiny_raw_config()
    config.update(name=name, runtime="ray", edges={"count": 4, "per_host": 2},
                  cloud={"num_cpus": 1.0, "resources": {"cloud": 1}, "checkpoint_dir": str(tmp_path / "ckpt")},
                  ray={"host_num_cpus": 1.0, "host_resources": {"edge": 1}, "address": cluster.address})
    config["stream"]["corruptions"] = ["fog"]
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _run_losing_a_node(path: Path, out: Path, checkpoints: Path, lose: Callable[[], None]) -> str:
    """Run the config in a driver process, call `lose` (a node dies) once the cloud has checkpointed, and wait
    for the run to finish; returns its stderr."""
    driver = subprocess.Popen([str(CLI), "run", str(path), "--out", str(out)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list(checkpoints.glob("*.json")) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before the node could be removed"
        lose()
        stdout, stderr = driver.communicate(timeout=360)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stderr


@pytest.mark.timeout(400)
def test_the_cloud_and_the_hosts_run_where_their_resources_are(tmp_path, tiny_raw_config, cluster):
    path = _config(tiny_raw_config, tmp_path, cluster, "placed")
    run = subprocess.run([str(CLI), "run", str(path), "--out", str(tmp_path / "out")], env=_env(),
                         capture_output=True, text=True, timeout=360)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    placed = summary["placement"]
    assert "cloud" in placed["nodes"][placed["cloud"][0]]["resources"]
    assert all("edge" in placed["nodes"][n]["resources"] for n in placed["hosts"])
    assert placed["cloud"] == [cluster.workers[0].node_id]
    assert summary["num_hosts"] == 2 and summary["host_nodes"] == 2  # SPREAD: one host per edge node
    assert summary["preflight_nodes"] == 2  # the nodes that may run an actor (the driver's, the head, may not)
    assert summary["samples"] == 4 * 64 and summary["nodes_lost"] == []


@pytest.mark.timeout(500)
def test_losing_the_clouds_node_mid_run_changes_no_record(tmp_path, tiny_raw_config, cluster):
    """Sync: after the cloud's first checkpoint a node that can take the cloud joins and the cloud's node dies
    (not gracefully, with a host on it). Hosts reserve 1.5 CPUs, so the second worker has no room for another:
    the cloud and the host both restart on the node that joined, from their checkpoint and snapshot, and the
    records equal the one-process run's; the log and summary.json name the node and where each actor went."""
    slow = {"faults": {"slow_cloud_s": 0.25}, "stream": {"corruptions": ["fog"], "samples_per_domain": 640,
                                                       "batch_size": 32, "severity": 5},
            "method": {"name": "cema-fleet"},
            "ray": {"host_num_cpus": 1.5, "host_resources": {"edge": 1}, "address": cluster.address}}
    path = _config(tiny_raw_config, tmp_path, cluster, "lossy", **slow)
    out = tmp_path / "out"
    joined = []

    def lose() -> None:  # a node that can take the cloud joins, the cloud's node dies
        joined.append(cluster.add_node(num_cpus=3, resources={"edge": 2, "cloud": 1}, object_store_memory=100 * 2**20))
        cluster.remove_node(cluster.workers[0], allow_graceful=False)

    stderr = _run_losing_a_node(path, out, tmp_path / "ckpt", lose)
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["nodes_lost"]
    assert len(lost) == 1 and lost[0]["node"] == cluster.workers[0].node_id, lost
    assert "the cloud" in lost[0]["actors"] and any(a.startswith("edge host") for a in lost[0]["actors"])
    assert f"({lost[0]['node'][:8]}) lost: " in stderr
    f = summary["faults"]
    assert f["host_recoveries"] >= 1 and f["cloud_recoveries"] >= 1 and summary["samples"] == 4 * 640
    assert set(lost[0]["moved_to"].values()) == {joined[0].node_id}  # the only node with room for either
    torch.set_num_threads(1)  # as the hosts and the cloud: float reductions identical
    run_experiment(load_config(path, ["runtime=local", "faults.slow_cloud_s=0"]), tmp_path / "local")
    a, b = batch_table(tmp_path / "local"), batch_table(out)
    for col in COMPARED:
        assert a[col] == b[col], col


@pytest.mark.timeout(400)
def test_a_worker_node_lost_in_async_mode_loses_no_sample(tmp_path, tiny_raw_config, cluster):
    """Async, after the cloud's node was lost (the previous test): two nodes offer `edge`, the second worker and
    the node that joined (which holds the cloud), so SPREAD puts a host on each. The second worker dies mid-run;
    its host restarts beside the cloud, every sample is predicted once and every upload is trained on or counted
    as dropped."""
    paced = {"mode": "async", "method": {"name": "cema-fleet"},
             "stream": {"corruptions": ["fog"], "samples_per_domain": 640, "batch_size": 32, "severity": 5},
             "edges": {"count": 4, "per_host": 2, "groups": [{"name": "paced", "fraction": 1.0, "frame_rate": 4.0}]},
             "ray": {"host_num_cpus": 0.5, "host_resources": {"edge": 1}, "address": cluster.address}}
    path = _config(tiny_raw_config, tmp_path, cluster, "async-lossy", **paced)
    out = tmp_path / "out"
    _run_losing_a_node(path, out, tmp_path / "ckpt", lambda: cluster.remove_node(cluster.workers[1],
                                                                                 allow_graceful=False))
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["nodes_lost"]
    assert [n["node"] for n in lost] == [cluster.workers[1].node_id], lost
    t = batch_table(out)
    seen = [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]
    assert len(seen) == len(set(seen)) == 4 * 640  # every sample once
    assert summary["uploaded"] == summary["cloud_ingested"] + summary["dropped"]


@pytest.mark.timeout(500)
def test_a_run_whose_head_dies_resumes_on_a_new_cluster(tmp_path, tiny_raw_config):
    """The head (GCS) dies mid-run: Ray ends the driver (exit 1, after the reconnect timeout, set to 5 s here);
    `cema-ray run --resume DIR ray.address=NEW` finishes it on a new cluster with the one-process run's records."""
    from ray.cluster_utils import Cluster

    def start() -> Cluster:
        nodes = Cluster(initialize_head=True, connect=False,
                        head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False,
                                        "temp_dir": tempfile.mkdtemp(prefix="rh", dir="/tmp")})
        nodes.add_node(num_cpus=2, object_store_memory=100 * 2**20)
        nodes.wait_for_nodes()
        return nodes

    config = tiny_raw_config()
    config.update(name="headless", runtime="ray", ray={"host_num_cpus": 1.0},
                  cloud={"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 2},
                  faults={"slow_cloud_s": 0.25}, method={"name": "cema-fleet"})
    config["stream"].update(corruptions=["fog"], samples_per_domain=320)
    path = tmp_path / "headless.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**_env(), "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
    out, first = tmp_path / "out", start()
    try:
        driver = subprocess.Popen([str(CLI), "run", str(path), f"ray.address={first.address}", "--out", str(out)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not list((tmp_path / "ckpt").glob("*.json")) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before the head could be removed"
        first.remove_node(first.head_node, allow_graceful=False)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        first.shutdown()
    assert driver.returncode != 0 and "resumable: if this driver or the head node dies" in stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    second = start()
    try:
        resumed = subprocess.run([str(CLI), "run", "--resume", str(out), f"ray.address={second.address}"], env=env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        second.shutdown()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    torch.set_num_threads(1)
    run_experiment(load_config(path, ["runtime=local", "faults.slow_cloud_s=0"]), tmp_path / "local")
    a, b = batch_table(tmp_path / "local"), batch_table(out)
    for col in COMPARED:
        assert a[col] == b[col], col
