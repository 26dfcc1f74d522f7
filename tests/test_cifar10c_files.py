"""CIFAR-10-C from its published files: configs/cifar10c_npy.yaml is checked before a run and runs."""
from pathlib import Path

import numpy as np
import pytest

from cema_ray.cli import main
from cema_ray.config import load_config
from cema_ray.errors import ConfigError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cifar10c_npy.yaml"
N = 16  # images per severity in the tiny stand-in folder


def fake_cifar10_c(root: Path, names: tuple[str, ...] = ("fog", "snow"), n: int = N) -> Path:
    """RobustBench's layout with `n` images per severity: <name>.npy (5n, 32, 32, 3) uint8, labels.npy (5n,)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.arange(10, dtype=np.int64), n)[:5 * n])
    return root


def short(root: Path, *more: str) -> list[str]:
    return [f"data.root={root}", "stream.corruptions=[fog,snow]", *more]


def test_dry_run_of_a_folder_without_its_files_exits_2_naming_the_file(tmp_path: Path, capsys) -> None:
    root = fake_cifar10_c(tmp_path / "c10c", names=("fog",))
    assert main(["run", str(CONFIG), *short(root), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "snow.npy" in err and "not found" in err and "present: fog" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(CONFIG), f"data.root={empty}", "--dry-run"]) == 2
    assert "gaussian_noise.npy" in capsys.readouterr().err  # the default stream's first corruption


def test_files_are_checked_for_shape_dtype_and_labels(tmp_path: Path) -> None:
    root = fake_cifar10_c(tmp_path / "c10c")
    np.save(root / "snow.npy", np.zeros((5 * N, 32, 32, 3), np.float32))
    with pytest.raises(ConfigError, match=r"snow.npy: expected uint8 \(5N, H, W, 3\).*float32"):
        load_config(CONFIG, short(root))
    np.save(root / "snow.npy", np.zeros((5 * N + 1, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="snow.npy: expected uint8"):
        load_config(CONFIG, short(root))
    fake_cifar10_c(root)
    np.save(root / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ConfigError, match="labels.npy: expected integer labels"):
        load_config(CONFIG, short(root))
    (root / "labels.npy").unlink()
    with pytest.raises(ConfigError, match="labels.npy"):
        load_config(CONFIG, short(root))


def test_settings_the_source_ignores_are_refused(tmp_path: Path) -> None:
    root = fake_cifar10_c(tmp_path / "c10c")
    with pytest.raises(ConfigError, match="data.split = 'train': data source 'cifar10-c' ships"):
        load_config(CONFIG, short(root, "data.split=train"))
    with pytest.raises(ConfigError, match="data.cache_dir"):
        load_config(CONFIG, short(root, f"data.cache_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="no clean images"):
        load_config(CONFIG, [f"data.root={root}", "stream.corruptions=[fog,clean]"])


def test_group_and_distribution_corruptions_are_checked_too(tmp_path: Path) -> None:
    root = fake_cifar10_c(tmp_path / "c10c")
    group = "edges.groups=[{fraction: 0.5, stream: {corruptions: [frost]}}]"
    with pytest.raises(ConfigError, match="frost.npy"):
        load_config(CONFIG, short(root, group))
    dist = "edges.distributions={corruptions: {permute: [fog, contrast]}}"
    with pytest.raises(ConfigError, match="contrast.npy"):
        load_config(CONFIG, short(root, dist))


def test_the_npy_config_runs_on_a_cifar10_c_folder(tmp_path: Path, capsys) -> None:
    root = fake_cifar10_c(tmp_path / "c10c")
    out = tmp_path / "out"
    args = short(root, "runtime=local", "edges.count=2", f"stream.samples_per_domain={N}", "stream.batch_size=8",
                 "output.report=false", "output.progress=false", "threads=1")
    assert main(["run", str(CONFIG), *args, "--out", str(out)]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 * 2 * N and summary["threads"] == {"local": 1}
    assert set(summary["per_domain"]) == {"fog-5", "snow-5"}
