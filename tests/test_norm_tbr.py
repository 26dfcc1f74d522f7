"""Norm-layer utilities and TBR, checked against hand computations on tiny tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.models.norm import (freeze_all_but_norm_affine, is_norm_layer, load_norm_state, norm_affine_parameters,
                                  norm_layers, norm_state, state_nbytes)
from cema_ray.models.tbr import TBRBatchNorm2d, convert_bn_to_tbr, set_norm_stats_mode

torch.set_num_threads(1)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.BatchNorm2d(4, affine=False))
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.ln(self.bn1d(self.fc(x))))


def test_norm_discovery_and_freezing() -> None:
    model = Mixed()
    assert [n for n, _ in norm_layers(model)] == ["bn", "block.1", "block.2", "bn1d", "ln"]
    assert is_norm_layer(TBRBatchNorm2d(3)) and not is_norm_layer(nn.Conv2d(1, 1, 1))
    names = [n for n, _ in norm_affine_parameters(model)]
    assert names == ["bn.weight", "bn.bias", "block.1.weight", "block.1.bias", "bn1d.weight", "bn1d.bias",
                     "ln.weight", "ln.bias"]
    params = freeze_all_but_norm_affine(model)
    assert len(params) == 8
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(names)


def test_norm_state_keys_copies_and_bytes() -> None:
    model = Mixed()
    state = norm_state(model)
    stats = {"bn.running_mean", "bn.running_var", "block.2.running_mean", "block.2.running_var",
             "bn1d.running_mean", "bn1d.running_var"}
    assert set(state) == {n for n, _ in norm_affine_parameters(model)} | stats
    assert set(norm_state(model, include_stats=False)) == {n for n, _ in norm_affine_parameters(model)}
    assert all(v.dtype == np.float32 for v in state.values())
    state["bn.weight"][:] = 7.0
    assert torch.all(model.bn.weight == 1.0)  # a copy, not a view
    # 4 (bn w,b,rm,rv) * 4 + 2*4 (gn) + 2*4 (affine-free bn stats) + 4*6 (bn1d) + 2*6 (ln) floats
    assert state_nbytes(state) == 4 * (16 + 8 + 8 + 24 + 12)


def test_load_norm_state_round_trip_and_strictness() -> None:
    src, dst = Mixed(), Mixed()
    with torch.no_grad():
        src.bn.weight.fill_(2.5)
        src.bn.running_var.fill_(3.0)
    load_norm_state(dst, norm_state(src))
    assert torch.all(dst.bn.weight == 2.5) and torch.all(dst.bn.running_var == 3.0)
    load_norm_state(dst, norm_state(Mixed(), include_stats=False))  # affine only is allowed
    assert torch.all(dst.bn.weight == 1.0) and torch.all(dst.bn.running_var == 3.0)

    state = norm_state(src)
    with pytest.raises(CheckpointError, match="'fc.weight'"):
        load_norm_state(dst, {**state, "fc.weight": np.zeros((6, 4), np.float32)})
    missing = dict(state)
    del missing["ln.bias"]
    with pytest.raises(CheckpointError, match="'ln.bias'"):
        load_norm_state(dst, missing)
    partial = dict(state)
    del partial["bn1d.running_var"]
    with pytest.raises(CheckpointError, match="'bn1d.running_var'"):
        load_norm_state(dst, partial)
    with pytest.raises(CheckpointError, match="'bn.bias'.*\\(3,\\)"):
        load_norm_state(dst, {**state, "bn.bias": np.zeros(3, np.float32)})


def _tbr(c: int = 2) -> TBRBatchNorm2d:
    layer = TBRBatchNorm2d(c).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.25, 1.0], dtype=torch.float64))
        layer.running_mean.copy_(torch.tensor([0.5, -1.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([2.0, 0.5], dtype=torch.float64))
    return layer


X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 1.0]]],
                  [[[0.0, 1.0], [-2.0, 3.0]], [[1.0, 1.0], [3.0, -3.0]]]], dtype=torch.float64)


def test_tbr_forward_matches_hand_computation() -> None:
    layer = _tbr().train()
    out = layer(X)
    eps = 1e-5
    # channel 0 values: 1,2,3,4,0,1,-2,3 -> mean 1.5, unbiased var = sum((v-1.5)^2)/7 = 26/7
    v0 = np.array([1, 2, 3, 4, 0, 1, -2, 3], dtype=np.float64)
    mu, var = 1.5, 26.0 / 7.0
    assert v0.mean() == mu and np.isclose(((v0 - mu) ** 2).sum() / 7, var)
    sb, sr = np.sqrt(var + eps), np.sqrt(2.0 + eps)
    r, d = sb / sr, (mu - 0.5) / sr
    expected = 1.5 * ((v0 - mu) / sb * r + d) + 0.25
    got = out[:, 0].reshape(-1).detach().numpy()  # order n, h, w matches v0
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, 1.5 * (v0 - 0.5) / sr + 0.25, rtol=1e-10)  # = running-stat normalisation
    # momentum 0.1 update in training mode
    assert np.isclose(layer.running_mean[0].item(), 0.9 * 0.5 + 0.1 * mu)
    assert np.isclose(layer.running_var[0].item(), 0.9 * 2.0 + 0.1 * var)


def test_tbr_eval_equals_running_stat_normalisation_and_keeps_stats() -> None:
    layer = _tbr().eval()
    before = layer.running_mean.clone(), layer.running_var.clone()
    out = layer(X)
    ref = F.batch_norm(X, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.1, layer.eps)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


def test_tbr_gradients_flow_through_batch_stats_with_r_d_constant() -> None:
    layer = _tbr().train()
    x = X.clone().requires_grad_(True)
    g = torch.linspace(-1.0, 1.0, X.numel(), dtype=torch.float64).view_as(X)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    (layer(x) * g).sum().backward()

    M, eps = 8, layer.eps
    xv = X.detach().transpose(0, 1).reshape(2, -1)  # (C, M)
    gv = g.transpose(0, 1).reshape(2, -1)
    mu = xv.mean(1, keepdim=True)
    sb = torch.sqrt(xv.var(1, unbiased=True, keepdim=True) + eps)
    sr = torch.sqrt(rv.view(2, 1) + eps)
    r, d = sb / sr, (mu - rm.view(2, 1)) / sr
    xh0 = (xv - mu) / sb
    w = layer.weight.detach().view(2, 1)
    torch.testing.assert_close(layer.bias.grad, gv.sum(1))
    torch.testing.assert_close(layer.weight.grad, (gv * (xh0 * r + d)).sum(1))
    G = gv * w * r  # dL/d((x-mu)/sigma_B), r constant
    dx = (G - G.mean(1, keepdim=True) - xh0 * (G * xh0).sum(1, keepdim=True) / (M - 1)) / sb
    torch.testing.assert_close(x.grad, dx.reshape(2, 2, 2, 2).transpose(0, 1), rtol=1e-9, atol=1e-12)
    # had r and d been differentiated, the output (= running-stat normalisation) would have
    # d out / d x = w / sigma_run exactly; the TBR gradient differs from that
    assert not torch.allclose(x.grad, (g * w.view(1, 2, 1, 1) / sr.view(1, 2, 1, 1)))


def test_tbr_discarded_stats_start_from_first_batch_in_any_mode() -> None:
    for train in (True, False):
        layer = _tbr().train(train)
        layer.discard_running_stats()
        assert not bool(layer.stats_ready)
        out = layer(X)
        assert bool(layer.stats_ready)
        var, mu = torch.var_mean(X, dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(layer.running_mean, mu)  # momentum step towards itself: unchanged
        torch.testing.assert_close(layer.running_var, var)
        # with running == batch stats, r = 1 and d = 0: plain batch normalisation (unbiased variance)
        ref = (X - mu.view(1, 2, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1) + layer.eps)
        torch.testing.assert_close(out, ref * layer.weight.view(1, 2, 1, 1) + layer.bias.view(1, 2, 1, 1))


def test_batch_and_mix_modes() -> None:
    layer = _tbr().train()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer.stats_mode = "batch"
    ref = F.batch_norm(X, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(layer(X), ref)
    assert torch.equal(layer.running_mean, rm)  # forward-only: running stats untouched even in train mode
    layer.stats_mode, layer.mix_alpha = "mix", 0.25
    var_b, mu_b = torch.var_mean(X, dim=(0, 2, 3), correction=0)
    mean, var = 0.25 * mu_b + 0.75 * rm, 0.25 * var_b + 0.75 * rv
    expected = (X - mean.view(1, 2, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1) + layer.eps)
    expected = expected * layer.weight.view(1, 2, 1, 1) + layer.bias.view(1, 2, 1, 1)
    torch.testing.assert_close(layer(X), expected)
    layer.mix_alpha = 1.0
    torch.testing.assert_close(layer(X), ref)


def test_convert_keeps_parameters_and_stats_and_set_mode() -> None:
    model = Mixed()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
    weight = model.bn.weight
    convert_bn_to_tbr(model, discard_running_stats=False)
    assert isinstance(model.bn, TBRBatchNorm2d) and isinstance(model.block[2], TBRBatchNorm2d)
    assert not isinstance(model.bn1d, TBRBatchNorm2d)
    assert model.bn.weight is weight and torch.all(model.bn.running_mean == 0.3) and bool(model.bn.stats_ready)
    assert model.block[2].weight is None
    convert_bn_to_tbr(model, discard_running_stats=True)
    assert not bool(model.bn.stats_ready)

    plain = Mixed()
    assert set_norm_stats_mode(plain, "mix", alpha=0.5) == 2
    assert isinstance(plain.bn, TBRBatchNorm2d) and plain.bn.stats_mode == "mix" and plain.bn.mix_alpha == 0.5
    with pytest.raises(ConfigError, match="'median'"):
        set_norm_stats_mode(plain, "median")
    with pytest.raises(ConfigError, match="alpha"):
        set_norm_stats_mode(plain, "mix", alpha=1.5)


def test_loading_stats_marks_tbr_layers_ready() -> None:
    src, dst = Mixed(), Mixed()
    convert_bn_to_tbr(dst, discard_running_stats=True)
    with torch.no_grad():
        src.bn.running_mean.fill_(4.0)
    load_norm_state(dst, norm_state(src))
    assert bool(dst.bn.stats_ready)
    dst.eval()
    dst(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.all(dst.bn.running_mean == 4.0)  # used, not replaced by the batch's
