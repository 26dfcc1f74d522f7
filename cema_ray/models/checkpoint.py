"""Checkpoints as safetensors plus a JSON card: no pickle is ever loaded.

The card records what the model is (architecture, input, normalisation), how it was made
(data, recipe) and how good it is (clean accuracy), plus the SHA-256 of the weights file,
so a truncated or tampered file is refused with a clear message instead of half-loading.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cema_ray.atomic import atomic_write, replacing
from cema_ray.errors import CheckpointError
from cema_ray.models.factory import create_model

REQUIRED_CARD_KEYS = ("architecture", "num_classes", "in_chans", "mean", "std")


def card_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def card_sha(path: str | Path) -> str | None:
    """The sha256 a checkpoint's card vouches for (None: no card, or a card without one)."""
    cpath = card_path(path)
    if not cpath.is_file():
        return None
    try:
        return json.loads(cpath.read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (safetensors) and its card atomically; returns the card written."""
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"checkpoint card lacks {missing}")
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with replacing(path) as tmp:
        save_file(state, str(tmp))
    full = dict(card, sha256=sha256_file(path), format="safetensors")
    atomic_write(card_path(path), json.dumps(full, indent=2, sort_keys=True).encode())
    return full


def read_card(path: str | Path) -> dict[str, Any]:
    cpath = card_path(path)
    if not cpath.is_file():
        raise CheckpointError(f"checkpoint card not found: {cpath} (every checkpoint needs its JSON card)")
    try:
        card = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint card {cpath} is not valid JSON: {exc}") from exc
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"checkpoint card {cpath} lacks keys {missing}")
    return card


def verify_checkpoint(path: str | Path, allow_unverified: bool = False) -> dict[str, Any]:
    """The card of a checkpoint whose bytes match the card's sha256; returns the card.

    A card without a sha256 cannot vouch for its file (a flipped byte would load silently): it is refused
    unless the user allows it (`models.<role>.allow_unverified: true`), and then a warning says so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    card = read_card(path)
    if not card.get("sha256"):
        if not allow_unverified:
            raise CheckpointError(
                f"checkpoint card {card_path(path)} has no sha256, so {path.name} cannot be verified: re-save it "
                "(`cema-ray pretrain` writes the hash), or set models.<role>.allow_unverified: true to load it as is")
        warnings.warn(f"loading {path} without an integrity check: its card has no sha256 (allow_unverified)",
                      stacklevel=2)
        return card
    digest = sha256_file(path)
    if card["sha256"] != digest:
        raise CheckpointError(
            f"checkpoint {path} does not match its card (sha256 {digest[:12]}... != {card['sha256'][:12]}...): "
            "the file is truncated or was modified"
        )
    return card


def load_checkpoint(path: str | Path, allow_unverified: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model its card describes and load the weights, verifying the file's hash."""
    path = Path(path)
    card = verify_checkpoint(path, allow_unverified)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    model = create_model(card["architecture"], card["num_classes"], card["in_chans"], card["mean"], card["std"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit '{card['architecture']}': {exc}") from exc
    return model, card

