"""`ray job submit` for real: a head node started with `ray start --head`, a job running jobs/adapt.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, log: Path, proc: subprocess.Popen) -> None:
    """Until the dashboard answers at all (401 without a token also means it is up)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {timeout} s; head log:\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(900)
def test_job_submit_against_a_head_node(tmp_path, tiny_raw_config):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    gcs_port, dash_port = _free_port(), _free_port()
    log = tmp_path / "head.log"
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=3",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats",
         # the session's own Ray holds the default agent ports: give this head free ones
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        _wait_http(f"{address}/api/version", timeout=120, log=log, proc=head)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as denied:  # token authentication is on: no token, no jobs
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert denied.value.code in (401, 403)
        config = tiny_raw_config()
        config.update(name="job", runtime="ray", ray={})
        config["stream"]["corruptions"] = ["fog"]
        config["output"]["report"] = True
        cfg_path = tmp_path / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        out = tmp_path / "out"
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--", "python", "jobs/adapt.py", str(cfg_path), "--out", str(out)]
        deadline = time.time() + 300  # a loaded machine can take minutes to start the job agent
        while True:  # the dashboard answers before its job agent is ready: retry that case only
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"] == "ray" and summary["samples"] == 2 * 64
        assert (out / "report.md").is_file() and (out / "batches.parquet").is_file()
    finally:
        head.terminate()  # `ray start --block` drains the node and stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
