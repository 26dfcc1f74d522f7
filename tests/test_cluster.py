"""A two-node cluster (`ray.cluster_utils.Cluster`): EdgeHosts spread across nodes and the run completes.

The driver runs in a subprocess, because this test session already holds a Ray connection of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(400)
def test_hosts_spread_over_two_nodes(tmp_path, tiny_raw_config):
    from ray.cluster_utils import Cluster

    short_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # AF_UNIX socket paths must stay short
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "object_store_memory": 100 * 2**20, "temp_dir": short_tmp,
                                      "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        config = tiny_raw_config()
        config.update(name="cluster", runtime="ray", edges={"count": 4, "per_host": 2}, cloud={"num_cpus": 1.0},
                      ray={"host_num_cpus": 1.0, "address": cluster.address})
        config["stream"]["corruptions"] = ["fog"]
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = Path(sys.executable).parent / "cema-ray"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        run = subprocess.run([str(cli), "run", str(path), "--out", str(tmp_path / "out")], env=env,
                             capture_output=True, text=True, timeout=360)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["num_hosts"] == 2 and summary["host_nodes"] == 2  # SPREAD put one host per node
        assert summary["samples"] == 4 * 64
    finally:
        cluster.shutdown()
