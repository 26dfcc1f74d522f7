"""Pretraining of the edge and foundation models on the clean training split.

Sessions on this machine end abruptly, so training resumes from its own state: every
`save_every` steps the model, optimiser, scheduler and position (epoch, step) are written
atomically to the work folder, and the epoch's sample order is a pure function of
(seed, epoch), so a resumed run continues exactly where it stopped. The foundation uses
AugMix (generic augmentation that excludes the test corruptions by design); the edge only
random crops and flips. The result is a safetensors checkpoint with a JSON card.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cema_ray.atomic import atomic_write, replacing
from cema_ray.data.catalog import load_clean_split, source_info
from cema_ray.errors import CheckpointError
from cema_ray.models.checkpoint import load_checkpoint, save_checkpoint
from cema_ray.models.factory import create_model
from cema_ray.models.preprocess import to_input

AUGMIX_CHUNK = 4  # AugMix ops are drawn per chunk of images: 4x cheaper, still diverse across chunks


def random_crop_flip(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Pad-and-crop plus horizontal flip on a uint8 NCHW batch, vectorised with one gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if images.is_floating_point() else "constant")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def augmix(images: torch.Tensor, seed: int) -> torch.Tensor:
    """torchvision's AugMix on uint8 NCHW, one draw of operations per chunk of images."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)  # v2.AugMix draws from the global RNG; seed it per batch for reproducibility
    op = v2.AugMix()
    return torch.cat([op(chunk) for chunk in images.split(AUGMIX_CHUNK)])


def _nchw_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (source statistics)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(to_input(images[i : i + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[i : i + batch_size]).sum())
    return correct / len(images)


class TrainState:
    """Model + optimiser + schedule + position, saved atomically so training can resume."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "train_state.pt"
        self.meta_path = work_dir / "train_state.json"

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, pos: dict[str, Any]) -> None:
        with replacing(self.path) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
        atomic_write(self.meta_path, json.dumps(pos).encode())

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any] | None:
        if not (self.path.is_file() and self.meta_path.is_file()):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        return json.loads(self.meta_path.read_text())


def run_pretrain(cfg: dict[str, Any], save_every: int = 100) -> dict[str, Any]:
    """Train ``cfg['model']`` on the clean training split; returns the card of the checkpoint."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    if train_cfg.get("threads"):
        torch.set_num_threads(int(train_cfg["threads"]))
    info = source_info(data_cfg["source"])
    train = load_clean_split(data_cfg, "train")
    test = load_clean_split(data_cfg, "test")
    in_chans = train.images.shape[-1]
    num_classes = len(train.classes)
    model = create_model(cfg["model"]["name"], num_classes, in_chans, info.mean, info.std)
    init = init_from(model, cfg["model"]["name"], cfg["model"].get("init_checkpoint"), num_classes, in_chans)
    model = model.to(memory_format=torch.channels_last)
    decay, no_decay = _param_groups(model)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg["lr"], momentum=train_cfg["momentum"], nesterov=True,
    )
    bs, epochs = int(train_cfg["batch_size"]), int(train_cfg["epochs"])
    steps_per_epoch = len(train) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=train_cfg["lr"], total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    work_dir = Path(cfg["output"]["work_dir"])
    state = TrainState(work_dir)
    pos = state.load(model, opt, sched) or {"epoch": 0, "step": 0, "history": []}
    if pos["epoch"] > 0 or pos["step"] > 0:
        print(f"resuming {cfg['name']} at epoch {pos['epoch']} step {pos['step']} from {state.path}")
    seed = int(cfg["seed"])
    pad = max(2, train.images.shape[1] // 8)
    use_augmix = train_cfg["augment"] == "augmix"
    while pos["epoch"] < epochs:
        epoch = pos["epoch"]
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        model.train()
        bar = tqdm(range(pos["step"], steps_per_epoch), desc=f"{cfg['name']} epoch {epoch + 1}/{epochs}",
                   unit="step", initial=pos["step"], total=steps_per_epoch, mininterval=5)
        t0, seen = time.time(), 0
        for step in bar:
            idx = order[step * bs : (step + 1) * bs]
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]))
            x = _nchw_uint8(train.images[idx])
            if use_augmix:
                x = augmix(x, seed * 1_000_003 + epoch * 10_007 + step)
            x = random_crop_flip(x, pad, gen)
            x = x.float().div_(255.0).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[idx])
            loss = F.cross_entropy(model(x), y, label_smoothing=train_cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
            if (step + 1) % save_every == 0:
                state.save(model, opt, sched, dict(pos, step=step + 1))
        acc = evaluate(model, test.images, test.labels)
        pos = {"epoch": epoch + 1, "step": 0, "history": pos["history"] + [{"epoch": epoch + 1, "test_acc": acc}]}
        state.save(model, opt, sched, pos)
        print(f"{cfg['name']}: epoch {epoch + 1}/{epochs} clean test accuracy {acc:.4f}", flush=True)
    model = model.to(memory_format=torch.contiguous_format)
    acc = evaluate(model, test.images, test.labels)
    card = {
        "architecture": cfg["model"]["name"],
        "role": cfg["model"]["role"],
        "num_classes": num_classes,
        "in_chans": in_chans,
        "mean": list(info.mean),
        "std": list(info.std),
        "classes": list(train.classes),
        "data": {"source": data_cfg["source"], "train_samples": len(train), "test_samples": len(test)},
        "recipe": {**train_cfg, "optimizer": "SGD nesterov", "schedule": "one-cycle", "seed": seed,
                   "augmentation": ("AugMix + " if use_augmix else "") + f"pad-{pad} crop + flip"},
        "clean_accuracy": acc,
        "history": pos["history"],
        "params": sum(p.numel() for p in model.parameters()),
    }
    if init is not None:
        card["init_from"] = init
    card = save_checkpoint(model, cfg["output"]["checkpoint"], card)
    print(f"{cfg['name']}: wrote {cfg['output']['checkpoint']} (clean test accuracy {acc:.4f})")
    return card


def init_from(model: nn.Module, name: str, path: str | None, num_classes: int, in_chans: int) -> dict[str, Any] | None:
    """Load a previous stage's weights (verified against its card) into ``model``; returns its provenance.

    A second training stage from a finished checkpoint (a warm restart of the schedule) reaches a
    given accuracy in fewer epochs than a longer run from scratch; the card keeps the chain.
    """
    if path is None:
        return None
    source, card = load_checkpoint(path)
    if (card["architecture"], card["num_classes"], card["in_chans"]) != (name, num_classes, in_chans):
        raise CheckpointError(f"model.init_checkpoint {path}: a {card['architecture']} for {card['num_classes']} classes "
                              f"and {card['in_chans']} channels does not fit this run's model")
    model.load_state_dict(source.state_dict(), strict=True)
    return {"checkpoint": str(path), "sha256": card["sha256"], "clean_accuracy": card.get("clean_accuracy"),
            "recipe": card.get("recipe"), "init_from": card.get("init_from")}


def _param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weight decay on conv/linear weights only, not on norm parameters or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return decay, no_decay
