"""Periodic, atomic checkpoints of the cloud's state, so a restarted cloud actor resumes its training.

The state is a method's `state_dict` tree (norm parameters of foundation and students, optimiser
states, replay buffers, queues, counters, RNG states) plus the service's versions. It is written
without pickle: every tensor and array goes into one safetensors file, the tree around them into
a JSON file naming each leaf, and the JSON records the tensors file's SHA-256 and the run it
belongs to. A `LATEST` file, replaced atomically after both are complete, names the newest pair,
so a crash mid-write leaves the previous checkpoint intact and a reader never sees half a one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cema_ray.atomic import atomic_write, replacing
from cema_ray.errors import CheckpointError
from cema_ray.models.checkpoint import sha256_file

FORMAT = "cema-cloud-state/1"
KEEP = 2  # checkpoints kept on disk: the newest and the one before it


def encode_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``tree``; tensors and arrays move into ``tensors`` and leave a reference.

    Dict keys keep their type (optimiser states are keyed by int) and tuples stay tuples, so
    ``decode_tree`` returns a tree equal to the one saved.
    """
    if isinstance(tree, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = tree.detach().cpu().clone().contiguous()
        return {"__tensor__": name}
    if isinstance(tree, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(tree).copy())
        return {"__ndarray__": name}
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, dict):
        return {"__dict__": [[encode_tree(k, tensors), encode_tree(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [encode_tree(v, tensors) for v in tree]}
    if isinstance(tree, list):
        return [encode_tree(v, tensors) for v in tree]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot checkpoint a {type(tree).__name__}: state trees hold tensors, arrays and plain values")


def decode_tree(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode_tree``."""
    if isinstance(node, list):
        return [decode_tree(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__tuple__" in node:
        return tuple(decode_tree(v, tensors) for v in node["__tuple__"])
    if "__dict__" in node:
        return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in node["__dict__"]}
    raise CheckpointError(f"unknown node in a cloud checkpoint: keys {sorted(node)}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


class CloudCheckpointStore:
    """The cloud checkpoints of one run in one folder: `state-<position>.{json,safetensors}` + `LATEST`.

    ``position`` is how many deliveries the state includes: a restarted cloud resumes there and the
    driver re-delivers what came after. ``run_id`` keeps a restarted cloud from loading a checkpoint
    another run left in the same folder.
    """

    def __init__(self, folder: str | Path, run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id

    def save(self, state: dict[str, Any], position: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        tree = encode_tree(state, tensors)
        stem = f"state-{position:08d}"
        weights = self.folder / f"{stem}.safetensors"
        with replacing(weights) as tmp:
            save_file(tensors, str(tmp))
        meta = {"format": FORMAT, "run_id": self.run_id, "position": position, "sha256": sha256_file(weights),
                "tensors": len(tensors), "tree": tree}
        atomic_write(self.folder / f"{stem}.json", json.dumps(meta).encode())
        atomic_write(self.folder / "LATEST", stem.encode())  # the commit point
        self._prune()
        return weights

    def pin(self, position: int) -> None:
        """Keep the checkpoint of `position` whatever comes after it (an async run's journal points at it: a
        resumed run restores exactly that one). A file, so a restarted cloud honours it too."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / "PINNED", f"state-{position:08d}".encode())

    def _prune(self) -> None:
        stems = sorted({p.name.split(".")[0] for p in self.folder.glob("state-*.json")})
        pinned = self.folder / "PINNED"
        keep = pinned.read_text().strip() if pinned.is_file() else None
        for stem in [s for s in stems[:-KEEP] if s != keep]:
            for suffix in (".json", ".safetensors"):
                (self.folder / f"{stem}{suffix}").unlink(missing_ok=True)

    def latest(self) -> tuple[dict[str, Any], int] | None:
        """The newest checkpoint of this run as (state, position); None when there is none."""
        pointer = self.folder / "LATEST"
        if not pointer.is_file():
            return None
        return self._load(pointer.read_text().strip())

    def positions(self) -> list[int]:
        """The positions whose checkpoint is on disk (the JSON is written after the tensors: it marks a whole one)."""
        return sorted(int(p.name[len("state-"):-len(".json")]) for p in self.folder.glob("state-*.json"))

    def at(self, position: int) -> dict[str, Any] | None:
        """The state saved at `position` (None when it is not kept or is another run's)."""
        stem = f"state-{position:08d}"
        if not (self.folder / f"{stem}.json").is_file():
            return None
        found = self._load(stem)
        return None if found is None else found[0]

    def _load(self, stem: str) -> tuple[dict[str, Any], int] | None:
        meta_path, weights = self.folder / f"{stem}.json", self.folder / f"{stem}.safetensors"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cloud checkpoint {meta_path} is unreadable: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"cloud checkpoint {meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("run_id") != self.run_id:
            return None  # another run's checkpoint: not ours to resume from
        if not weights.is_file() or sha256_file(weights) != meta["sha256"]:
            raise CheckpointError(f"cloud checkpoint {weights} is missing, truncated or modified (sha256 mismatch)")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cloud checkpoint {weights} is not a readable safetensors file: {exc}") from exc
        return decode_tree(meta["tree"], tensors), int(meta["position"])
