"""Outputs at a filesystem URI, for real: a local S3-compatible server (moto) on loopback, pyarrow's S3 filesystem."""
from __future__ import annotations

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cema_ray.cli import main
from cema_ray.errors import ConfigError
from cema_ray.results.storage import _redact, check_uri_writable, is_uri
from cema_ray.runtime import run_experiment


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A moto S3 server on a free loopback port, with dummy credentials; yields the URI query to reach it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pyproject.toml)")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CEMA_RAY_STORAGE", str(tmp_path / "storage"))  # the staging folder goes here
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    server.stop()


def test_a_run_writes_its_outputs_to_an_s3_uri(s3, make_run_config, tmp_path) -> None:
    uri = f"s3://cema-runs/exp/one?{s3}"
    summary = run_experiment(make_run_config("runtime=local", "output.report=true"), uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    names = {info.path.split(f"{path}/")[-1] for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert {"summary.json", "batches.parquet", "report.md", "resolved_config.yaml",
            "accuracy_over_time.png"} <= names
    with fs.open_input_stream(f"{path}/summary.json") as f:
        remote = json.loads(f.read())
    assert remote["samples"] == summary["samples"] > 0 and remote["status"] == "complete"
    assert pq.read_table(f"{path}/batches.parquet", filesystem=fs).num_rows == len(pq.read_table(
        tmp_path / "storage" / ".staging" / summary["staging_dir"].split("/.staging/")[1] / "batches.parquet"))
    assert summary["out_dir"] == uri


def test_a_uri_that_cannot_be_written_fails_before_the_run(s3, make_run_config, monkeypatch, capsys) -> None:
    from cema_ray.runtime import local

    monkeypatch.setattr(local, "run_local", lambda *a: pytest.fail("the run started"))
    no_bucket = s3.replace("allow_bucket_creation=true", "allow_bucket_creation=false")
    with pytest.raises(ConfigError, match="output.dir = s3://missing/x.*cannot write there"):
        run_experiment(make_run_config("runtime=local"), f"s3://missing/x?{no_bucket}")
    with pytest.raises(ConfigError, match="not a location pyarrow"):
        check_uri_writable("nosuchscheme://x/y")


def test_uri_helpers() -> None:
    assert is_uri("s3://b/k") and is_uri("file:///tmp/x") and not is_uri("runs/x") and not is_uri("/abs/path")
    assert _redact("s3://b/k?access_key=AK&secret_key=SECRET&scheme=http") == \
        "s3://b/k?access_key=***&secret_key=***&scheme=http"


def test_the_cli_takes_a_uri_for_out(s3, tmp_path, capsys, tiny_raw_config) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config()))
    assert main(["run", str(path), "--out", f"s3://cema-runs/cli?{s3}"]) == 0
    out = capsys.readouterr()
    assert "outputs: s3://cema-runs/cli?" in out.out and "outputs will go to s3://cema-runs/cli?" in out.err
    fs, key = pafs.FileSystem.from_uri(f"s3://cema-runs/cli?{s3}")
    assert fs.get_file_info(f"{key}/summary.json").type == pafs.FileType.File


def test_checkpoints_on_a_multi_node_cluster_need_an_absolute_shared_folder(make_run_config, monkeypatch, tmp_path):
    from cema_ray.runtime import ray_runner

    monkeypatch.setattr(ray_runner.ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    cfg = make_run_config("runtime=ray", "output.dir=runs/relative")
    with pytest.raises(ConfigError, match="2 nodes .*cloud.checkpoint_dir"):
        ray_runner.checkpoint_folder(cfg, "runs/relative")
    shared = tmp_path / "shared"
    cfg = make_run_config("runtime=ray", f"cloud.checkpoint_dir={shared}")
    assert ray_runner.checkpoint_folder(cfg, "runs/relative") == str(shared)
    monkeypatch.setattr(ray_runner.ray, "nodes", lambda: [{"Alive": True}])
    cfg = make_run_config("runtime=ray")
    assert ray_runner.checkpoint_folder(cfg, tmp_path / "o").endswith("/o/cloud_checkpoints")
