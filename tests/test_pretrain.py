"""Pretraining mechanics on a tiny Fashion-MNIST tree: a checkpoint with its card, and a second stage
that starts from the first stage's weights (model.init_checkpoint). Mechanics only, no accuracy claims."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cema_ray.config import load_pretrain_config
from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.models.checkpoint import load_checkpoint, read_card, save_checkpoint
from cema_ray.models.factory import create_model
from cema_ray.pretrain import run_pretrain

REPO = Path(__file__).resolve().parents[1]


def write_fmnist(root: Path, n: int = 48) -> None:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))


def config(tmp_path: Path, stage: str, *extra: str) -> dict:
    return load_pretrain_config(REPO / "configs" / "pretrain_fmnist_edge.yaml", [
        f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
        "train.batch_size=16", "train.threads=1", f"output.work_dir={tmp_path / stage}",
        f"output.checkpoint={tmp_path / stage / 'model.safetensors'}", *extra])


@pytest.fixture
def stage1(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    write_fmnist(tmp_path / "data")
    torch.manual_seed(0)
    run_pretrain(config(tmp_path, "stage1"))
    return tmp_path / "stage1" / "model.safetensors"


def test_second_stage_starts_from_the_first(tmp_path: Path, stage1: Path) -> None:
    first, card1 = load_checkpoint(stage1)
    assert card1["role"] == "edge" and "init_from" not in card1 and len(card1["history"]) == 1
    # A learning rate so small that stage 2 cannot move far: its weights must stay next to stage 1's,
    # far closer than a fresh random initialisation is.
    card2 = run_pretrain(config(tmp_path, "stage2", f"model.init_checkpoint={stage1}", "train.lr=0.000000001"))
    second, _ = load_checkpoint(tmp_path / "stage2" / "model.safetensors")
    assert card2["init_from"]["sha256"] == card1["sha256"] and card2["init_from"]["checkpoint"] == str(stage1)
    assert read_card(tmp_path / "stage2" / "model.safetensors")["init_from"]["recipe"]["epochs"] == 1
    w1, w2 = first.state_dict(), second.state_dict()
    conv = next(k for k in w1 if k.endswith("weight") and w1[k].ndim == 4)
    fresh = create_model("cema_resnet_s", 10, 1, (0.5,), (0.5,)).state_dict()[conv]
    assert (w2[conv] - w1[conv]).abs().max() < 1e-4 < (fresh - w1[conv]).abs().max()


def test_init_checkpoint_must_fit_and_exist(tmp_path: Path, stage1: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_checkpoint(create_model("cema_resnet_l", 10, 1, (0.5,), (0.5,)), other,
                    {"architecture": "cema_resnet_l", "num_classes": 10, "in_chans": 1, "mean": [0.5], "std": [0.5]})
    with pytest.raises(CheckpointError, match="does not fit"):
        run_pretrain(config(tmp_path, "bad", f"model.init_checkpoint={other}"))
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        config(tmp_path, "missing", f"model.init_checkpoint={tmp_path / 'nope.safetensors'}")
