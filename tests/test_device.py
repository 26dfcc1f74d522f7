"""The cloud's device settings: validated at load, `cpu`/`auto` on a machine without CUDA change nothing, and on
Ray a GPU request reaches the cloud actor (a Ray instance that declares a GPU, in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from cema_ray.errors import ConfigError
from cema_ray.runtime import run_experiment

from batch_tables import COMPARED, batch_table

NO_CUDA = not torch.cuda.is_available()


def test_device_settings_are_validated(make_run_config):
    with pytest.raises(ConfigError, match="cloud.device = 'gpu': must be one of 'cpu', 'cuda', 'auto'"):
        make_run_config("cloud.device=gpu")
    with pytest.raises(ConfigError, match="cloud.num_gpus = -1.0: must be a number >= 0"):
        make_run_config("cloud.num_gpus=-1")
    with pytest.raises(ConfigError, match="on Ray the cloud sees a GPU only when it asks for one"):
        make_run_config("runtime=ray", "cloud.device=cuda")
    with pytest.raises(ConfigError, match="cloud.amp = 'maybe': must be true or false"):
        make_run_config("cloud.amp=maybe")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
def test_cuda_without_a_device_is_a_config_error(make_run_config):
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        make_run_config("cloud.device=cuda")


@pytest.mark.skipif(not NO_CUDA, reason="on a CUDA machine auto picks the GPU, whose last bits differ")
def test_auto_and_amp_on_cpu_give_the_cpu_records(make_run_config, tmp_path, capfd):
    common = ("method.name=cema-fleet", "edges.count=2", "edges.per_host=1")
    cpu = run_experiment(make_run_config(*common), tmp_path / "cpu")
    capfd.readouterr()
    auto = run_experiment(make_run_config(*common, "cloud.device=auto", "cloud.amp=true"), tmp_path / "auto")
    assert "cloud.device=auto and no CUDA device here" in capfd.readouterr().err
    assert cpu["cloud_device"] == auto["cloud_device"] == "cpu"
    a, b = batch_table(tmp_path / "cpu"), batch_table(tmp_path / "auto")
    assert all(a[c] == b[c] for c in COMPARED) and cpu["uploaded"] > 0


DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    ray.init("local", num_cpus=3, num_gpus=1, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    from cema_ray.config import load_config
    from cema_ray.runtime import run_experiment
    s = run_experiment(load_config(sys.argv[1]), sys.argv[2])
    print("RESULT " + json.dumps({"gpu_ids": s["cloud_gpu_ids"], "device": s["cloud_device"],
                                  "samples": s["samples"]}))
""")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_gpu_request_reaches_the_cloud_actor(tiny_raw_config, tmp_path):
    """Ray's GPUs are logical resources: an instance that declares one admits `cloud.num_gpus=1`, and the actor
    is handed that GPU (`ray.get_gpu_ids()`), while `cloud.device: cpu` keeps the computation on the CPU."""
    config = tiny_raw_config()
    config.update(name="gpu-request", runtime="ray", cloud={"num_gpus": 1, "device": "cpu", "num_cpus": 1.0})
    config["stream"]["corruptions"] = ["fog"]
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", DRIVER, str(path), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"gpu_ids": ["0"], "device": "cpu", "samples": 2 * 64}
