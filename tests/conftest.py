"""Shared fixtures: one Ray instance per test session, tiny checkpoints, run configs.

Ray's settings are environment variables read when `ray` is imported, so they are set here,
before any test module imports it. The session's Ray keeps token authentication on, with a
token file of its own.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="cema-test-auth-"))
(_TOKEN_DIR / "token").write_text(secrets.token_hex(32))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(_TOKEN_DIR / "token"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (`"local"` never attaches to a running cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init("local", num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False,
                 namespace="cema-test", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Random-init Fashion-MNIST-shaped checkpoints: mechanics only, never accuracy claims."""
    import torch

    from cema_ray.data.sources import DATA_SOURCES
    from cema_ray.models.checkpoint import save_checkpoint
    from cema_ray.models.factory import create_model

    info = DATA_SOURCES.get("fashion-mnist")
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for role in ("edge", "foundation"):
        torch.manual_seed(1 if role == "edge" else 2)
        model = create_model("cema_resnet_s", 10, 1, info.mean, info.std)
        path = out / f"{role}.safetensors"
        save_checkpoint(model, path, {"architecture": "cema_resnet_s", "num_classes": 10, "in_chans": 1,
                                      "mean": list(info.mean), "std": list(info.std)})
        paths[role] = str(path)
    return paths


@pytest.fixture(scope="session")
def tiny_raw_config(tiny_checkpoints) -> Callable[..., dict[str, Any]]:
    """A fresh raw (unvalidated) run config on real Fashion-MNIST with the tiny checkpoints."""

    def make(checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
        ck = checkpoints or tiny_checkpoints
        return {
            "name": "test", "runtime": "local", "seed": 0,
            "data": {"source": "fashion-mnist"},
            "models": {"edge": {"name": "cema_resnet_s", "checkpoint": ck["edge"]},
                       "foundation": {"name": "cema_resnet_s", "checkpoint": ck["foundation"]}},
            "stream": {"corruptions": ["gaussian_noise", "fog"], "severity": 5, "batch_size": 32,
                       "samples_per_domain": 64},
            "edges": {"count": 2, "per_host": 1},
            "method": {"name": "upload-all"},
            "ray": {"include_dashboard": False},
            "output": {"progress": False, "report": False},
        }

    return make


@pytest.fixture
def make_run_config(tmp_path, tiny_raw_config) -> Callable[..., dict[str, Any]]:
    """`tiny_raw_config`, validated, with `key=value` overrides."""
    from cema_ray.config import load_config

    def make(*overrides: str, checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_raw_config(checkpoints)))
        return load_config(path, list(overrides))

    return make
