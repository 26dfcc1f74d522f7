"""Issue 15 from outside: faults during recovery, deterministic errors inside actors, unverifiable checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cema_ray.errors import CheckpointError, DataError
from cema_ray.models.checkpoint import card_path, load_checkpoint
from cema_ray.runtime import run_experiment

from batch_tables import COMPARED, batch_table


def _same_records(a: Path, b: Path) -> None:
    ta, tb = batch_table(a), batch_table(b)
    for col in COMPARED:
        assert ta[col] == tb[col], col


@pytest.mark.ray
def test_a_cloud_killed_again_during_its_replay_recovers(ray_session, make_run_config, tmp_path, monkeypatch):
    """The cloud dies mid-run, then again while the driver replays what its checkpoint misses: the second
    recovery starts over from the checkpoint, and every record equals an undisturbed run's."""
    import ray

    from cema_ray.runtime import ray_runner

    torch.set_num_threads(1)
    common = ("method.name=cema-fleet", "edges.count=2", "edges.per_host=1", "stream.samples_per_domain=128",
              "cloud.checkpoint_every=5")
    run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    kills = []

    def kill_once(link, seq):
        if not kills:
            kills.append(seq)
            ray.kill(link.cloud, no_restart=False)  # a second fault, during the recovery of the first

    monkeypatch.setattr(ray_runner.CloudLink, "before_replay", kill_once)
    hit = run_experiment(make_run_config("runtime=ray", "faults.kill_cloud=1", "faults.seed=1", *common),
                         tmp_path / "hit")
    f = hit["faults"]
    assert kills, "the planned kill left nothing to replay: the test did not test a fault during recovery"
    assert f["cloud_recovery_retries"] >= 1 and f["cloud_recoveries"] == f["cloud_failures_seen"] == 1
    _same_records(tmp_path / "local", tmp_path / "hit")


@pytest.mark.ray
def test_a_host_killed_again_while_it_is_restored_recovers(ray_session, make_run_config, tmp_path, monkeypatch):
    import ray

    from cema_ray.runtime.host_pool import HostPool

    torch.set_num_threads(1)
    common = ("method.name=cema-fleet", "edges.count=2", "edges.per_host=1", "stream.samples_per_domain=128")
    run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    original = HostPool.revive
    kills = []

    def revive_after_another_kill(pool, i, exc, pubs):
        if not kills:
            kills.append(i)
            ray.kill(pool.hosts[i], no_restart=False)  # the restore about to be sent meets a dead host
        return original(pool, i, exc, pubs)

    monkeypatch.setattr(HostPool, "revive", revive_after_another_kill)
    hit = run_experiment(make_run_config("runtime=ray", "faults.kill_hosts=1", *common), tmp_path / "hit")
    f = hit["faults"]
    assert kills and f["host_recovery_retries"] >= 1 and f["host_recoveries"] == f["host_failures_seen"] == 1
    _same_records(tmp_path / "local", tmp_path / "hit")


def _image_tree(root: Path, corrupt_one: bool) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "test" / c).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "test" / c / f"{i}.png")
    if corrupt_one:
        (root / "test" / "dog" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def _folder_overrides(root: Path, runtime: str) -> list[str]:
    from conftest import REPO

    return [f"runtime={runtime}", "edges.count=1", "edges.per_host=1", "stream.samples_per_domain=32",
            "stream.batch_size=8", "stream.corruptions=[fog]", "data.source=image-folder", f"data.root={root}",
            "output.progress=false", "output.report=false", "method.name=bn", "method.settings={}",
            "ray.include_dashboard=false",
            f"models.edge.checkpoint={REPO / 'checkpoints/cifar10/edge.safetensors'}",
            f"models.foundation.checkpoint={REPO / 'checkpoints/cifar10/foundation.safetensors'}"]


@pytest.mark.ray
def test_a_project_error_inside_a_host_ends_the_run_at_once(ray_session, tmp_path, capsys):
    """A corrupt image met inside an EdgeHost is deterministic: one line naming the file, exit 1, no restarts
    (the host is never revived: a revive would print its restore attempts)."""
    from conftest import REPO

    from cema_ray.cli import main

    root = _image_tree(tmp_path / "data", corrupt_one=True)
    code = main(["run", str(REPO / "configs" / "cifar10c.yaml"), *_folder_overrides(root, "ray"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "DataError: edge host 0:" in err and "7.png" in err
    assert "Traceback" not in err and "kept failing" not in err


def test_a_tampered_checkpoint_fails_before_ray_starts(make_run_config, tiny_checkpoints, tmp_path, monkeypatch):
    from cema_ray.runtime import ray_runner

    bad = tmp_path / "edge.safetensors"
    shutil.copy(tiny_checkpoints["edge"], bad)
    shutil.copy(card_path(tiny_checkpoints["edge"]), card_path(bad))
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(ray_runner, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    cfg = make_run_config("runtime=ray", checkpoints={"edge": str(bad), "foundation": tiny_checkpoints["foundation"]})
    with pytest.raises(CheckpointError, match="does not match its card"):
        run_experiment(cfg, tmp_path / "out")


def test_a_card_without_sha256_is_refused_unless_allowed(make_run_config, tiny_checkpoints, tmp_path):
    path = tmp_path / "edge.safetensors"
    shutil.copy(tiny_checkpoints["edge"], path)
    card = json.loads(card_path(tiny_checkpoints["edge"]).read_text())
    del card["sha256"]
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="has no sha256.*allow_unverified: true"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="without an integrity check"):
        load_checkpoint(path, allow_unverified=True)
    checkpoints = {"edge": str(path), "foundation": tiny_checkpoints["foundation"]}
    with pytest.raises(CheckpointError, match="has no sha256"):
        run_experiment(make_run_config("runtime=local", checkpoints=checkpoints), tmp_path / "a")
    with pytest.warns(UserWarning, match="without an integrity check"):
        summary = run_experiment(make_run_config("runtime=local", "models.edge.allow_unverified=true",
                                                 checkpoints=checkpoints), tmp_path / "b")
    assert summary["samples"] > 0


def test_a_corrupt_image_is_a_data_error_in_the_local_runtime_too(tmp_path):
    from conftest import REPO

    from cema_ray.config import load_config

    root = _image_tree(tmp_path / "data", corrupt_one=True)
    cfg = load_config(REPO / "configs" / "cifar10c.yaml", _folder_overrides(root, "local"))
    with pytest.raises(DataError, match="7.png"):
        run_experiment(cfg, tmp_path / "out")
