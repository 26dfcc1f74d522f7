"""Test-time batch renormalisation (TBR), the BatchNorm forward of both CEMA models.

TBR normalises with the running statistics but lets gradients flow through the batch statistics:
x_hat = (x - mu_B) / sigma_B * r + d with r = sigma_B / sigma_run and d = (mu_B - mu_run) / sigma_run
both detached. Numerically this is normalisation by the running statistics, which is why an edge
running TBR in eval mode changes its behaviour only when the cloud publishes new statistics.

The same layer offers two forward-only edge alternatives ("batch": the test batch's own statistics,
as BN adapt; "mix": alpha * batch + (1 - alpha) * running), chosen per layer with ``set_norm_stats_mode``.

``grouped_norm(model, G)`` makes every TBR layer treat its input as G stacked batches of equal size and
normalise each with its own statistics: G virtual edges run one forward and get, bit for bit, what G
forwards would give them. Each batch is normalised on its own slice of the input (a view: same kernel,
same memory layout as its own forward, so the same rounding); the convolutions, where the time goes,
run on the whole stack.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cema_ray.errors import ConfigError

STATS_MODES = ("running", "batch", "mix")


def _chan(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


class TBRBatchNorm2d(nn.BatchNorm2d):
    """Drop-in BatchNorm2d with the TBR forward (METHOD.md, "TBR").

    ``stats_ready`` is a bool buffer: False once the source statistics are discarded, so the next
    forward (train or eval) adopts that batch's statistics as the running ones, as the authors do.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)
        self.register_buffer("stats_ready", torch.ones((), dtype=torch.bool, device=device))
        self.stats_mode = "running"
        self.mix_alpha = 1.0
        self.groups = 1  # stacked batches in the input, each normalised by itself (`grouped_norm`)

    def discard_running_stats(self) -> None:
        """Forget the source statistics; the next batch's statistics replace them."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.stats_ready.fill_(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_mode={self.stats_mode}, mix_alpha={self.mix_alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"TBRBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        if self.groups == 1:
            return self._forward_mode(x, _Params(self.weight, self.bias, self.running_mean, self.running_var))
        return self._forward_grouped(x, self.groups)

    def _forward_mode(self, x: torch.Tensor, p: "_Params") -> torch.Tensor:
        if self.stats_mode == "batch":
            return self._forward_batch(x, p)
        if self.stats_mode == "mix":
            return self._forward_mix(x, p)
        return self._forward_tbr(x, p)

    def _forward_grouped(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """(g * n, C, H, W) as g batches of n: each slice (a view, in the input's memory layout) normalised with
        the layer's own parameters, exactly as its own forward would; only the convolutions run stacked."""
        if self.training or not bool(self.stats_ready):
            raise ValueError("grouped TBR is for inference with statistics present (an edge whose next batch "
                             "adopts its statistics runs alone)")
        if x.shape[0] % g:
            raise ValueError(f"grouped TBR: {x.shape[0]} samples do not split into {g} equal batches")
        p = _Params(self.weight, self.bias, self.running_mean, self.running_var)
        return torch.cat([self._forward_mode(part, p) for part in x.split(x.shape[0] // g)])

    def _affine(self, x_hat: torch.Tensor, p: "_Params") -> torch.Tensor:
        if p.weight is None:
            return x_hat
        return _chan(p.weight) * x_hat + _chan(p.bias)

    def _adopt_if_missing(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        if not bool(self.stats_ready):
            with torch.no_grad():
                self.running_mean.copy_(mean.detach())
                self.running_var.copy_(var.detach())
                self.stats_ready.fill_(True)

    def _forward_tbr(self, x: torch.Tensor, p: "_Params") -> torch.Tensor:
        n_per_channel = x.numel() // max(x.shape[1], 1)
        if n_per_channel < 2:
            return self._forward_single(x, p)
        var_b, mu_b = torch.var_mean(x, dim=(0, 2, 3), correction=1)
        sigma_b = torch.sqrt(var_b + self.eps)
        self._adopt_if_missing(mu_b, var_b)
        sigma_run = torch.sqrt(p.var + self.eps)
        r = (sigma_b / sigma_run).detach()
        d = ((mu_b - p.mean) / sigma_run).detach()
        x_hat = (x - _chan(mu_b)) / _chan(sigma_b) * _chan(r) + _chan(d)
        if self.training:
            with torch.no_grad():
                self.running_mean.add_(self.momentum * (mu_b.detach() - self.running_mean))
                self.running_var.add_(self.momentum * (var_b.detach() - self.running_var))
        return self._affine(x_hat, p)

    def _forward_single(self, x: torch.Tensor, p: "_Params") -> torch.Tensor:
        """One value per channel has no unbiased variance; in eval mode the TBR formula reduces to
        normalising with the running statistics, which is what this computes."""
        if self.training or not bool(self.stats_ready):
            raise ValueError("TBRBatchNorm2d needs more than one value per channel (N*H*W >= 2) "
                             f"to compute batch statistics, got input shape {tuple(x.shape)}")
        x_hat = (x - _chan(p.mean)) / _chan(torch.sqrt(p.var + self.eps))
        return self._affine(x_hat, p)

    def _forward_batch(self, x: torch.Tensor, p: "_Params") -> torch.Tensor:
        """BN adapt: the batch's mean and biased variance, exactly as BatchNorm2d in training mode,
        but the running statistics are left alone (forward-only edge mode)."""
        return F.batch_norm(x, None, None, p.weight, p.bias, True, 0.0, self.eps)

    def _forward_mix(self, x: torch.Tensor, p: "_Params") -> torch.Tensor:
        var_b, mu_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        self._adopt_if_missing(mu_b, var_b)
        a = self.mix_alpha
        mean = a * mu_b + (1.0 - a) * p.mean
        var = a * var_b + (1.0 - a) * p.var
        x_hat = (x - _chan(mean)) / _chan(torch.sqrt(var + self.eps))
        return self._affine(x_hat, p)


class _Params(NamedTuple):
    """What a TBR forward normalises with: the layer's own tensors, or g copies of them side by side."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor


def _to_tbr(bn: nn.BatchNorm2d, discard: bool, momentum: float) -> TBRBatchNorm2d:
    """A TBR layer sharing ``bn``'s Parameter objects (so existing optimisers keep working)."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    tbr = TBRBatchNorm2d(bn.num_features, eps=bn.eps, momentum=momentum, affine=bn.affine,
                         device=None if ref is None else ref.device)
    if bn.affine:
        tbr.weight, tbr.bias = bn.weight, bn.bias
    has_stats = bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        if has_stats:
            tbr.running_mean.copy_(bn.running_mean)
            tbr.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                tbr.num_batches_tracked.copy_(bn.num_batches_tracked)
    if discard or not has_stats:
        tbr.discard_running_stats()
    tbr.train(bn.training)
    return tbr


def convert_bn_to_tbr(model: nn.Module, discard_running_stats: bool = False, momentum: float = 0.1) -> nn.Module:
    """Replace every BatchNorm2d below ``model`` by a TBRBatchNorm2d, in place; returns ``model``.

    With ``discard_running_stats`` (the authors' setting) each layer starts from its first batch's
    statistics instead of the source ones. Layers already converted are left as they are (apart from
    discarding, when asked). A bare BatchNorm2d cannot be replaced in place: the new layer is returned.
    """
    if isinstance(model, TBRBatchNorm2d):
        if discard_running_stats:
            model.discard_running_stats()
        return model
    if isinstance(model, nn.BatchNorm2d):
        return _to_tbr(model, discard_running_stats, momentum)
    for name, child in list(model.named_children()):
        converted = convert_bn_to_tbr(child, discard_running_stats, momentum)
        if converted is not child:
            setattr(model, name, converted)
    return model


def tbr_layers(model: nn.Module) -> list[tuple[str, TBRBatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TBRBatchNorm2d)]


def set_norm_stats_mode(model: nn.Module, mode: str, alpha: float = 1.0) -> int:
    """Choose which statistics every BatchNorm2d layer normalises with; returns how many layers.

    "running": TBR (running statistics, gradients through batch statistics); "batch": the test
    batch's statistics (BN adapt); "mix": alpha * batch + (1 - alpha) * running. Plain BatchNorm2d
    layers are converted to TBR in place first, keeping their statistics and Parameter objects.
    """
    if mode not in STATS_MODES:
        raise ConfigError(f"norm statistics mode '{mode}' is unknown; allowed: {', '.join(STATS_MODES)}")
    if mode == "mix" and not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"mix alpha must lie in [0, 1], got {alpha!r}")
    convert_bn_to_tbr(model, discard_running_stats=False)
    layers = tbr_layers(model)
    if not layers:
        raise ConfigError(f"set_norm_stats_mode('{mode}'): the model has no BatchNorm2d layer to switch")
    for _, layer in layers:
        layer.stats_mode = mode
        layer.mix_alpha = float(alpha)
    return len(layers)



@contextlib.contextmanager
def grouped_norm(model: nn.Module, groups: int) -> Iterator[nn.Module]:
    """Within the block, every TBR layer of ``model`` normalises ``groups`` equal stacked batches separately."""
    layers = [m for _, m in tbr_layers(model)]
    for layer in layers:
        layer.groups = int(groups)
    try:
        yield model
    finally:
        for layer in layers:
            layer.groups = 1
