"""cema-ray CLI, called in-process: exit codes, messages, dispatch to the runtime/pretrain/bench modules."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import cema_ray.runtime
from cema_ray.cli import main
from cema_ray.errors import DataError

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "cli", "runtime": "local", "data": {"root": str(root)},
                                    "edges": {"count": 2, "per_host": 2}, "stream": {"corruptions": ["fog"]}}))
    return path


def test_list_names_methods_models_corruptions_and_sources(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("methods:", "\n  cema ", "models:", "cema_resnet_s", "cema_resnet_l", "timm:<name>", "corruptions:",
                 "gaussian_noise", "jpeg_compression", "clean", "data sources:", "fashion-mnist",
                 "$CEMA_FASHION_MNIST_ROOT"):
        assert text in out


def test_bad_config_exits_2_naming_the_key(run_yaml: Path, capsys) -> None:
    assert main(["run", str(run_yaml), "stream.severity=7"]) == 2
    err = capsys.readouterr().err
    assert "stream.severity = 7" in err and "Traceback" not in err
    assert main(["run", str(run_yaml), "edges.cuont=3"]) == 2
    assert "edges.cuont = 3" in capsys.readouterr().err
    assert main(["pretrain", str(run_yaml)]) == 2  # a run config is not a pretrain config
    assert "edges = {count: 2, per_host: 2}: unknown key" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(run_yaml: Path, capsys, tmp_path: Path) -> None:
    assert main(["run", str(run_yaml), "edges.count=3", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["edges"]["count"] == 3 and cfg["output"]["dir"] == str(tmp_path / "o")
    assert cfg["stream"]["severity"] == 5


def test_run_calls_runtime_and_prints_summary(run_yaml: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    calls = []

    def fake_run(cfg, out_dir):
        calls.append((cfg, out_dir))
        return {"method": "cema", "runtime": "local", "mode": "sync", "num_edges": 2, "samples": 1000,
                "accuracy": 0.5, "uploaded": 250, "upload_fraction": 0.25, "bytes_up": 10, "bytes_down": 20,
                "wall_seconds": 3.0, "version_lag": {"median": 0.0, "p95": 1.0, "max": 2.0}, "dropped": 0,
                "rejected": 0}

    monkeypatch.setattr(cema_ray.runtime, "run_experiment", fake_run, raising=False)
    out = tmp_path / "out"
    assert main(["run", str(run_yaml), "seed=3", "--out", str(out)]) == 0
    (cfg, out_dir), = calls
    assert cfg["seed"] == 3 and Path(out_dir) == out
    text = capsys.readouterr().out
    assert "50.00% over 1,000 samples" in text and "250 (25.00%)" in text and f"{out / 'report.md'}" in text


def test_runtime_errors_exit_1_without_traceback(run_yaml: Path, capsys, monkeypatch) -> None:
    def broken(cfg, out_dir):
        raise DataError("fashion-mnist: t10k-images-idx3-ubyte.gz is truncated")

    monkeypatch.setattr(cema_ray.runtime, "run_experiment", broken, raising=False)
    assert main(["run", str(run_yaml), "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "DataError: fashion-mnist" in err and "Traceback" not in err


def test_pretrain_and_bench_dispatch(tmp_path: Path, monkeypatch, capsys) -> None:
    seen: dict = {}
    pre = types.ModuleType("cema_ray.pretrain")
    pre.run_pretrain = lambda cfg: seen.setdefault("pretrain", cfg)
    bench = types.ModuleType("cema_ray.bench")
    bench.main = lambda argv: seen.setdefault("bench", argv) and 0
    monkeypatch.setitem(sys.modules, "cema_ray.pretrain", pre)
    monkeypatch.setitem(sys.modules, "cema_ray.bench", bench)
    path = CONFIGS / "pretrain_fmnist_edge.yaml"
    monkeypatch.setenv("CEMA_FASHION_MNIST_ROOT", str(tmp_path))
    assert main(["pretrain", str(path), "train.epochs=1"]) == 0
    assert seen["pretrain"]["train"]["epochs"] == 1 and seen["pretrain"]["data"]["root"] == str(tmp_path)
    assert "checkpoints/fashion-mnist/edge.safetensors" in capsys.readouterr().out
    assert main(["bench", "--quick", "--edges", "4"]) == 0
    assert seen["bench"] == ["--quick", "--edges", "4"]


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_project_shape_matches_readme() -> None:
    """README's two commands are the ones CI runs; the console script and the torch pin are in place."""
    import tomllib

    root = CONFIGS.parent
    readme = (root / "README.md").read_text().splitlines()
    assert "bash setup.sh && .venv/bin/cema-ray run configs/quickstart.yaml" in readme[:6]
    assert "bash setup.sh && .venv/bin/python -m pytest -q" in readme[:6]
    ci = (root / ".ci" / "run").read_text()
    assert "bash setup.sh && .venv/bin/python -m pytest -q" in ci and "set -euo pipefail" in ci
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["cema-ray"] == "cema_ray.cli:main"
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(project["project"]["dependencies"])
    assert project["tool"]["pytest"]["ini_options"]["timeout"] == 300


def test_every_run_writes_a_resolved_config_that_reruns_it(make_run_config, tmp_path) -> None:
    """resolved_config.yaml holds every key with the value used; running it gives the same records."""
    from batch_tables import COMPARED, batch_table

    from cema_ray.config import load_config
    from cema_ray.runtime import run_experiment

    cfg = make_run_config("runtime=local", "method.name=cema-fleet", "method.settings.upload_budget=0.25")
    run_experiment(cfg, tmp_path / "a")
    resolved = load_config(tmp_path / "a" / "resolved_config.yaml", [f"output.dir={tmp_path / 'b'}"])
    assert resolved["method"]["settings"]["upload_budget"] == 0.25 and "chunk_size" in resolved["method"]["settings"]
    assert {k: v for k, v in resolved.items() if k != "output"} == {k: v for k, v in cfg.items() if k != "output"}
    run_experiment(resolved, tmp_path / "b")
    a, b = batch_table(tmp_path / "a"), batch_table(tmp_path / "b")
    assert all(a[c] == b[c] for c in COMPARED)


def test_readme_methods_table_is_generated_from_the_declarations():
    from cema_ray.config import method_registry
    from cema_ray.methods.tables import README_END, README_START, methods_markdown

    method_registry()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shipped = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert shipped == methods_markdown(), "regenerate the README's methods table from cema_ray.methods.tables"


def test_list_prints_a_methods_settings_and_refuses_an_unknown_one(capsys):
    assert main(["list", "cema-fleet"]) == 0
    out = capsys.readouterr().out
    assert "upload_budget       0.3" in out and "a number in (0, 1]" in out
    assert main(["list", "cemma"]) == 2
    assert "unknown method 'cemma'" in capsys.readouterr().err


def test_ctrl_c_while_starting_ends_in_one_line(monkeypatch, capsys, tmp_path):
    """A KeyboardInterrupt before the runner's loop (Ray starting, actors building) is not a traceback."""
    import cema_ray.runtime as runtime

    def interrupted(cfg, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "run_experiment", interrupted)
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "cema-ray: interrupted while starting; nothing was predicted yet"
