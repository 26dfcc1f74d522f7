"""End to end on real data: the committed Fashion-MNIST checkpoints, real corruptions, one edge.

The only tests that use the real models; everything else runs on tiny random ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cema_ray.runtime import run_experiment

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion-mnist"
REAL = {"edge": str(CHECKPOINTS / "edge.safetensors"), "foundation": str(CHECKPOINTS / "foundation.safetensors")}


@pytest.mark.timeout(600)
def test_cema_beats_the_source_model_on_corrupted_fashion_mnist(make_run_config, tmp_path):
    torch.set_num_threads(2)
    common = ("runtime=local", "edges.count=1", "stream.protocol=continual", "stream.batch_size=64",
              "stream.corruptions=[contrast,fog,gaussian_noise,motion_blur]", "stream.samples_per_domain=320",
              "models.edge.name=cema_resnet_s", "models.foundation.name=cema_resnet_l")
    source = run_experiment(make_run_config("method.name=source", *common, checkpoints=REAL), tmp_path / "s")
    cema = run_experiment(make_run_config("method.name=cema", *common, checkpoints=REAL), tmp_path / "c")
    assert source["samples"] == cema["samples"] == 4 * 320
    assert source["uploaded"] == 0
    assert 0.0 < cema["upload_fraction"] < 1.0  # the entropy filters select, they do not take everything
    assert cema["accuracy"] > source["accuracy"] + 0.10, (cema["accuracy"], source["accuracy"])
