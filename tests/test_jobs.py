"""The README's Ray recipes, run as written: `ray start` and `ray job submit` in a fresh HOME (no ~/.ray).

Each recipe is read from the README's bash blocks and run line by line. What this machine forces on the lines
is added, never changed: free ports and a short temp folder for each node (the test session's own Ray holds
the defaults), the test's tiny config and output folder in place of the quick start's, and `ray stop` left
out (it would stop every Ray instance on the machine, the test session's own included); the nodes the recipe
started are stopped by their temp folder instead.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free loopback port never handed out before in this session: two ports picked one after the other can
    otherwise be the same one (the first socket is closed before the second is bound), and Ray refuses two of its
    components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def readme_blocks(section: str) -> list[str]:
    """The bash blocks of one `## section` of the README, in order."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end], re.S)


class Recipe:
    """Runs README lines in a fresh HOME with the project's interpreter first on PATH."""

    def __init__(self, tmp_path: Path, config: Path, out: Path) -> None:
        bin_dir = Path(sys.executable).parent
        home = tmp_path / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
        self.temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
        self.gcs, self.dashboard = _free_port(), _free_port()
        self.config, self.out, self.tmp_path = config, out, tmp_path
        self.log = tmp_path / "recipe.log"

    def run(self, block: str) -> None:
        for line in self._lines(block):
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                self.env[key] = value
            elif line.startswith("ray job submit"):
                self._submit(line)
            else:
                self._shell(line)

    def _lines(self, block: str) -> list[str]:
        """Joined continuation lines, comments and the lines this machine cannot run as written left out."""
        text = block.replace("\\\n", " ")
        lines = [re.sub(r"\s+#.*$", "", raw).strip() for raw in text.splitlines()]
        return [line for line in lines if line and not line.startswith(("#", "source ", "ray stop"))]

    def _node_flags(self) -> str:
        return (f" --temp-dir={self.temp} --disable-usage-stats --dashboard-agent-listen-port={_free_port()}"
                f" --dashboard-agent-grpc-port={_free_port()} --runtime-env-agent-port={_free_port()}"
                f" --metrics-export-port={_free_port()}")

    def _shell(self, line: str) -> None:
        if line.startswith("ray start --head"):
            line += f" --port={self.gcs} --dashboard-port={self.dashboard}" + self._node_flags()
        elif line.startswith("ray start --address"):
            line = line.replace("HEAD_IP:6379", f"127.0.0.1:{self.gcs}") + self._node_flags()
        done = subprocess.run(["bash", "-c", line], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=180)
        with self.log.open("a") as log:
            log.write(f"$ {line}\n{done.stdout}{done.stderr}\n")
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"

    def _submit(self, line: str) -> None:
        line = line.replace(":8265", f":{self.dashboard}").replace("configs/quickstart.yaml", str(self.config))
        line = line.replace("/shared/cema_ray/checkpoints", str(self.tmp_path / "ckpt"))
        line += f" --out {shlex.quote(str(self.out))}"
        deadline = time.time() + 300  # a loaded machine can take minutes to start the job agent
        while True:  # the dashboard answers before its job agent is ready: retry that case only
            done = subprocess.run(["bash", "-c", line], cwd=REPO, env=self.env, capture_output=True, text=True,
                                  timeout=400)
            if "No available agent" not in done.stdout + done.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout + done.stderr

    def stop(self) -> None:
        """Stop the processes of the nodes this recipe started (and only those): they name its temp folder."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.temp in cmdline and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)


def _tiny_job_config(tiny_raw_config, tmp_path: Path) -> Path:
    config = tiny_raw_config()
    config.update(name="job", runtime="ray", ray={})
    config["stream"]["corruptions"] = ["fog"]
    config["output"]["report"] = True
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(900)
def test_the_readme_job_recipe_runs_as_written_in_a_fresh_home(tmp_path, tiny_raw_config):
    out = tmp_path / "out"
    recipe = Recipe(tmp_path, _tiny_job_config(tiny_raw_config, tmp_path), out)
    (block,) = readme_blocks("Ray job submission")
    head, submit = block.split("ray job submit")
    try:
        recipe.run(head)
        with pytest.raises(urllib.error.HTTPError) as denied:  # token authentication is on: no token, no jobs
            urllib.request.urlopen(f"http://127.0.0.1:{recipe.dashboard}/api/jobs/", timeout=30)
        assert denied.value.code in (401, 403)
        recipe.run("ray job submit" + submit)
    finally:
        recipe.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "ray" and summary["samples"] == 2 * 64
    assert (out / "report.md").is_file() and (out / "batches.parquet").is_file()


@pytest.mark.timeout(900)
def test_the_readme_cluster_recipe_places_the_cloud_on_the_head_and_the_hosts_on_the_worker(tmp_path,
                                                                                          tiny_raw_config):
    out = tmp_path / "out"
    recipe = Recipe(tmp_path, _tiny_job_config(tiny_raw_config, tmp_path), out)
    head, worker, submit = readme_blocks("On a cluster")
    try:
        for block in (head, worker, submit):
            recipe.run(block)
    finally:
        recipe.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 * 64 and summary["nodes_lost"] == []
    placed = summary["placement"]
    assert "cloud" in placed["nodes"][placed["cloud"][0]]["resources"]
    assert all("edge" in placed["nodes"][n]["resources"] for n in placed["hosts"])
    assert placed["cloud"][0] not in placed["hosts"]
    assert summary["preflight_nodes"] == 1  # the worker; the driver runs on the head
