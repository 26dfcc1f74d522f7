"""Where the cloud computes: `cloud.device` (cpu, cuda, or auto) and `cloud.amp`, resolved once per process.

The edges always run on CPU (they are the small devices); only the cloud's models, optimisers and the
tensors of its steps move. What the cloud publishes is CPU numpy either way (norm states and scoped
parameters are copied to the host when exported), so edges and records do not depend on the device.
The default is `cpu`: the single-process runner and the Ray runner then give the same records, and a GPU
is something a user asks for (`auto` takes one when CUDA is visible, `cuda` insists).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, ContextManager

import torch

from cema_ray.errors import ConfigError


def resolve_device(name: str, quiet: bool = False) -> torch.device:
    """The torch device for `cloud.device`; `cuda` without a visible CUDA device is a config error."""
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "cuda":
        if not available:
            raise ConfigError("cloud.device = 'cuda': no CUDA device is visible to this process "
                              "(on Ray, give the cloud one with cloud.num_gpus >= 1); use 'auto' or 'cpu'")
        return torch.device("cuda")
    if not available and not quiet:
        print("cloud: cloud.device=auto and no CUDA device here: the cloud runs on CPU", file=sys.stderr, flush=True)
    return torch.device("cuda" if available else "cpu")


def autocast(device: torch.device, amp: bool) -> ContextManager[Any]:
    """bfloat16 autocast for the cloud's forward and backward on CUDA when `cloud.amp`; a no-op otherwise
    (bfloat16 keeps float32's range, so no loss scaling is needed)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
