"""A driver killed with SIGKILL leaves a readable partial run, and `cema-ray run --resume DIR` finishes it
with the records an uninterrupted run gives (sync mode)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cema_ray.cli import main
from cema_ray.config import load_config
from cema_ray.runtime import run_experiment
from cema_ray.runtime.cloud_checkpoint import CloudCheckpointStore

from batch_tables import COMPARED, batch_table

COMMON = ["method.name=cema-fleet", "edges.count=3", "edges.per_host=2", "stream.samples_per_domain=192",
          "cloud.checkpoint_every=3"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from cema_ray.cli import main; sys.exit(main(sys.argv[1:]))", *args]


@pytest.mark.ray
@pytest.mark.parametrize("shards", [1, 2])
def test_a_killed_driver_leaves_a_readable_run_that_resumes_to_the_same_records(ray_session, tiny_raw_config, tmp_path,
                                                                                 shards, capsys):
    """With 2 shards the driver dies once shard 0 has checkpointed round 6, and shard 1's newest checkpoint is
    set back to round 3: the resumed run takes shard 0 back to round 3 too, and the mean of the shards' pending
    shares is the merge of round 3's delivery."""
    torch.set_num_threads(1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config()))
    # sharded: upload-all, whose cloud steps every round (the tiny models' CEMA uploads too little to average),
    # on a stream half as long (8 rounds; checkpoints at 3 and 6)
    common = COMMON if shards == 1 else [*COMMON, "method.name=upload-all", "stream.samples_per_domain=128",
                                         "cloud.shards=2", "cloud.num_cpus=0.5"]
    per_domain = 192 if shards == 1 else 128
    run_experiment(load_config(config, ["runtime=local", *common]), tmp_path / "local")
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = _cli("run", str(config), "runtime=ray", "ray.num_cpus=2", "faults.slow_cloud_s=0.25", *common,
                "--out", str(out))
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    # round 6 of 12: the cloud checkpointed twice
    marker = (out / "resume" / "hosts" / "state-00000006.json" if shards == 1
              else out / "cloud_checkpoints" / "shard-0" / "state-00000006.json")
    deadline = time.monotonic() + 240
    while not marker.is_file() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started: nothing can be written at the end
    driver.wait()
    if shards > 1:
        shard1 = out / "cloud_checkpoints" / "shard-1"
        assert (shard1 / "state-00000003.json").is_file()
        (shard1 / "LATEST").write_text("state-00000003")  # as if the driver died before shard 1 saved round 6
    else:  # as if the driver died after the cloud's checkpoint of round 6 but before the hosts' state of it
        (out / "resume" / "hosts" / "state-00000006.json").unlink()
    summary = json.loads((out / "summary.json").read_text())
    partial = pq.read_table(out / "batches.parquet")
    rounds = 2 * per_domain // 32
    assert summary["status"] == "interrupted" and 0 < partial.num_rows < 3 * rounds and summary["samples"] > 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0  # here, on the session's Ray: a new driver, new actors
    assert "resumed at round 3" in capsys.readouterr().err  # the newest round the cloud and the hosts both hold
    done = json.loads((out / "summary.json").read_text())
    assert done["status"] == "complete" and done["samples"] == 3 * 2 * per_domain
    a, b = batch_table(tmp_path / "local"), batch_table(out)
    for col in COMPARED:
        assert a[col] == b[col], col
    assert max(abs(x - y) for x, y in zip(a["mean_entropy"], b["mean_entropy"])) < 1e-5
    if shards > 1:  # still averaging after the resume: each shard's newest checkpoint holds the previous round's
        # share, waiting for its mean (a merge the resumed driver failed to send would leave round 3's pending)
        run_id = json.loads((out / "resume" / "run.json").read_text())["run_id"]
        for k in (0, 1):
            state, position = CloudCheckpointStore(out / "cloud_checkpoints" / f"shard-{k}", run_id).latest()
            assert position > 3 and state["shared_sent"][0] == position, (k, position, state["shared_sent"][0])
    assert not list((out / "resume" / "hosts").glob("state-*"))  # a finished run keeps only run.json
    assert main(["run", "--resume", str(out)]) == 2  # finished: nothing to resume


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no resume/run.json" in capsys.readouterr().err
    assert main(["run", "x.yaml", "--resume", str(tmp_path)]) == 2
    assert "give no config" in capsys.readouterr().err


def test_resume_takes_ray_overrides_only(tiny_raw_config, tmp_path, capsys):
    """A run whose head died continues on a new cluster: `--resume DIR ray.address=NEW` (nothing else changes)."""
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "run.json").write_text(json.dumps({"run_id": "x", "config": tiny_raw_config()}))
    assert main(["run", "--resume", str(tmp_path), "edges.count=3"]) == 2
    assert "overrides of ray.* keys only" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "ray.address=10.0.0.9:6379", "--dry-run"]) == 0
    assert "10.0.0.9:6379" in capsys.readouterr().out


def test_a_local_run_writes_its_table_as_it_goes(make_run_config, tmp_path, monkeypatch):
    """The partial writer runs during the run (here at every round), leaving a readable table marked interrupted."""
    from cema_ray.runtime import journal

    seen = []
    original = journal.PartialWriter.maybe

    def every_round(self, recorder, force=False):
        original(self, recorder, force=True)
        seen.append(json.loads((tmp_path / "o" / "summary.json").read_text())["status"])

    monkeypatch.setattr(journal.PartialWriter, "maybe", every_round)
    summary = run_experiment(make_run_config("runtime=local"), tmp_path / "o")
    assert seen and set(seen) == {"interrupted"} and summary["status"] == "complete"
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["status"] == "complete"


def _sample_ids(out: Path) -> list[int]:
    t = batch_table(out)
    return [i for a, b in zip(t["first_id"], t["last_id"]) for i in range(a, b + 1)]


@pytest.mark.ray
def test_a_killed_async_driver_resumes_with_every_sample_predicted_exactly_once(ray_session, tiny_raw_config, tmp_path,
                                                                               capsys):
    """Async: the driver dies by SIGKILL 1.5 s after its first journal while the paced edges are mid-stream;
    `--resume` goes back to the journal's newest round (the cloud to that very checkpoint), keeps every batch
    the edges' snapshots cover, predicts the rest, and the final table holds each sample once."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config()))
    out = tmp_path / "async"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = _cli("run", str(config), "runtime=ray", "mode=async", "ray.num_cpus=2", "faults.slow_cloud_s=0.2",
                "edges.count=3", "edges.per_host=2", "stream.samples_per_domain=192", "cloud.checkpoint_every=2",
                "edges.groups=[{name: paced, fraction: 1.0, frame_rate: 4.0}]", "--out", str(out))
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    marker = out / "resume" / "hosts" / "state-00000002.json"  # the first journal (the next comes 10 s later)
    deadline = time.monotonic() + 240
    while not marker.is_file() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # the edges go on, the cloud checkpoints again (pruning all but the pinned and the newest)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    assert "resumed at the cloud's checkpoint" in capsys.readouterr().err
    done = json.loads((out / "summary.json").read_text())
    ids = _sample_ids(out)
    assert done["status"] == "complete" and done["resumed_at"] == 2 and done["samples"] == 3 * 2 * 192
    assert len(ids) == len(set(ids)) == 3 * 2 * 192  # every sample once: none lost, none twice
    assert done["uploaded"] == done["cloud_ingested"] + done["dropped"]  # every upload trained on or counted
    assert not list((out / "resume" / "hosts").glob("state-*"))


def test_a_pinned_cloud_checkpoint_outlives_newer_ones(tmp_path):
    """The async journal points at one cloud checkpoint; the cloud keeps it (and its two newest) until the pin
    moves, also after a restart (the pin is a file)."""
    store = CloudCheckpointStore(tmp_path, "run")
    store.save({"x": 1}, 1)
    store.pin(1)
    for position in (2, 3, 4):
        store.save({"x": position}, position)
    assert store.positions() == [1, 3, 4] and store.at(1) == {"x": 1}
    CloudCheckpointStore(tmp_path, "run").pin(3)  # the next journal, from another process
    store.save({"x": 5}, 5)
    assert store.positions() == [3, 4, 5]
