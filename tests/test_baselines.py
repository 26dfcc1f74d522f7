"""Baselines in the edge/cloud harness: each checked against a hand-written reference of its math.

Tiny conv+BN models on 8x8 synthetic images, one thread, seeded; the whole file runs in seconds.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cema_ray.methods  # noqa: F401  (registers every method)
from cema_ray.algorithms.selection import EntropyFilter
from cema_ray.errors import CheckpointError, ConfigError
from cema_ray.methods.base import METHODS, CloudTrainer
from cema_ray.methods.cotta import soft_cross_entropy, tta_augment
from cema_ray.methods.eata import reweighted_entropy
from cema_ray.methods.sar import SAM, sar_parameters, top_block_start
from cema_ray.models.preprocess import to_input

torch.set_num_threads(1)
BASELINES = ["source", "bn", "tent", "tent-edge", "eata", "cotta", "sar"]


class Tiny(nn.Module):
    """conv-BN stem, two conv-BN "layer" stages, linear head: enough structure for every rule."""

    def __init__(self, num_classes: int = 10, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width * 16, num_classes)  # on a 4x4 pooled map: spatial layout matters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.avg_pool2d(out, 2).flatten(1))


def tiny(seed: int = 0, head_scale: float = 8.0) -> Tiny:
    """Random weights, non-trivial source statistics, and a sharp head so some entropies are low."""
    torch.manual_seed(seed)  # model init only; every method under test takes explicit generators
    m = Tiny()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.num_features, generator=g))
        m.fc.weight.mul_(head_scale)
    return m.eval()


def batches(n: int = 4, size: int = 16, seed: int = 1) -> list[np.ndarray]:
    """8x8 images with a per-image colour, colour ramp and noise level, so predictions differ."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, size=(size, 1, 1, 3))
        ramp = np.linspace(-1, 1, 8)[None, :, None, None] * rng.uniform(-100, 100, size=(size, 1, 1, 3))
        noise = rng.uniform(0, 120, size=(size, 1, 1, 1)) * rng.standard_normal((size, 8, 8, 3))
        out.append(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))
    return out


def build(name: str, model: nn.Module, **settings):
    spec = METHODS.get(name)
    edge = spec.make_edge(copy.deepcopy(model), settings)
    cloud = spec.make_cloud(None, copy.deepcopy(model), settings, torch.Generator().manual_seed(0))
    return edge, cloud


def run_harness(edge, cloud, images: list[np.ndarray]):
    """The synchronous reference order of DESIGN.md, K = 1."""
    preds, uploads = [], []
    for imgs in images:
        res = edge.process(to_input(imgs))
        preds.append(res.predictions)
        uploads.append(res.upload)
        cloud.ingest(0, imgs[res.upload])
        cloud.on_edge_batch(0)
        state = cloud.export(0)
        if state is not None:
            with torch.inference_mode():  # as runtime.edge loads publications
                edge.apply_update(state)
    return preds, uploads


def entropy_by_hand(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, 1)
    return -(log_p.exp() * log_p).sum(1)


def reference_tent(model: nn.Module, images: list[np.ndarray], lr: float) -> tuple[list[np.ndarray], nn.Module]:
    """Tent as its authors wrote it: BN without running stats, affine only, Adam, predict-then-step."""
    ref = copy.deepcopy(model).train()
    ref.requires_grad_(False)
    params = []
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    preds = []
    for imgs in images:
        logits = ref(to_input(imgs))
        preds.append(logits.argmax(1).numpy())
        loss = entropy_by_hand(logits).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return preds, ref


# --- registry and settings ------------------------------------------------------------------------

def test_every_baseline_is_registered_with_defaults():
    for name in BASELINES:
        spec = METHODS.get(name)
        assert spec.name == name and spec.description and not spec.uses_foundation
        assert isinstance(spec.defaults, dict)
        assert spec.forward_only_edge == (name != "tent-edge")
    assert METHODS.get("tent").defaults == {
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert METHODS.get("eata").defaults["d_margin"] == 0.4
    assert METHODS.get("cotta").defaults["n_views"] == 32 and METHODS.get("cotta").defaults["p_th"] == 0.92
    assert METHODS.get("sar").defaults["reset_constant"] == 0.2


def test_unknown_setting_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="settings.lrr = 1.0: unknown setting of method 'tent' .did you mean 'lr'.*known"):
        METHODS.get("tent").make_edge(tiny(), {"lrr": 1.0})
    with pytest.raises(ConfigError, match="settings.optimizer = 'rmsprop': must be one of 'adam', 'sgd'"):
        build("tent", tiny(), optimizer="rmsprop")
    with pytest.raises(ConfigError, match="alpha"):
        build("bn", tiny(), alpha=1.5)


# --- source and BN adapt ----------------------------------------------------------------------------

def test_source_predicts_like_the_eval_model_and_uploads_nothing():
    model = tiny()
    edge, cloud = build("source", model)
    imgs = batches(1)[0]
    res = edge.process(to_input(imgs))
    with torch.no_grad():
        expected = model(to_input(imgs)).argmax(1).numpy()
    np.testing.assert_array_equal(res.predictions, expected)
    assert res.predictions.dtype == np.int64 and res.entropy.dtype == np.float32
    assert not res.upload.any() and math.isnan(res.e_max)
    assert type(cloud) is CloudTrainer and cloud.export(0) is None


def test_bn_adapt_uses_the_batch_statistics_and_keeps_the_source_ones():
    model = tiny()
    edge, _ = build("bn", model)
    x = to_input(batches(1)[0])
    with torch.no_grad():
        train_mode = copy.deepcopy(model).train()(x).argmax(1).numpy()
        eval_mode = model(x).argmax(1).numpy()
    res = edge.process(x)
    np.testing.assert_array_equal(res.predictions, train_mode)
    assert (train_mode != eval_mode).any()  # the statistics matter for this model
    np.testing.assert_array_equal(edge.model.bn1.running_mean.numpy(), model.bn1.running_mean.numpy())
    assert not res.upload.any()


def test_bn_alpha_zero_is_the_source_model():
    model = tiny()
    edge, _ = build("bn", model, alpha=0.0)
    x = to_input(batches(1)[0])
    with torch.no_grad():
        expected = model(x).argmax(1).numpy()
    np.testing.assert_array_equal(edge.process(x).predictions, expected)


# --- Tent -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tent", "tent-edge"])
def test_tent_matches_a_hand_written_tent_loop(name):
    model, images, lr = tiny(), batches(5), 0.05
    edge, cloud = build(name, model, lr=lr)
    preds, uploads = run_harness(edge, cloud, images)
    ref_preds, ref = reference_tent(model, images, lr)
    for p, r in zip(preds, ref_preds):
        np.testing.assert_array_equal(p, r)
    assert any((p != q).any() for p, q in zip(preds[1:], reference_tent(model, images, 0.0)[0][1:]))
    adapted = cloud.model if name == "tent" else edge.model
    for k, v in ref.named_parameters():
        torch.testing.assert_close(dict(adapted.named_parameters())[k], v, rtol=0, atol=0)
    uploaded = np.concatenate(uploads)
    assert uploaded.all() if name == "tent" else not uploaded.any()


def test_tent_publishes_norm_affine_only_and_only_when_changed():
    edge, cloud = build("tent", tiny())
    assert cloud.export(0) is None  # nothing trained yet: the edge already holds it
    imgs = batches(1)[0]
    cloud.ingest(0, imgs)
    assert cloud.on_edge_batch(0) == 1
    state = cloud.export(0)
    assert set(state) == {f"{n}.{leaf}" for n in ("bn1", "layer1.1", "layer2.1") for leaf in ("weight", "bias")}
    assert cloud.export(0) is None and cloud.export(1) is not None
    assert cloud.on_edge_batch(0) == 0  # no uploads queued: no step


@pytest.mark.parametrize("name", ["tent", "eata", "cotta", "sar"])
def test_cloud_checkpoint_round_trip_and_reset(name):
    model, images = tiny(), batches(3, size=32)
    settings = {"lr": 0.05, **({"n_views": 2, "p_th": 1.0} if name == "cotta" else {})}
    _, a = build(name, model, **settings)
    for imgs in images[:2]:
        a.ingest(0, imgs)
        a.on_edge_batch(0)
    _, b = build(name, model, **settings)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for c in (a, b):
        c.ingest(0, images[2])
        assert c.on_edge_batch(0) == 1
    sa, sb = a.export(0), b.export(0)
    assert sa.keys() == sb.keys()
    for k in sa:  # optimiser state, teacher, generator and SAR's EMA all survived
        np.testing.assert_array_equal(sa[k], sb[k])
    assert not np.array_equal(sa["bn1.weight"], model.bn1.weight.detach().numpy())
    a.reset(0)
    after = a.export(0)  # the reset is news to the edge
    np.testing.assert_array_equal(after["bn1.weight"], model.bn1.weight.detach().numpy())


def test_a_publication_with_a_foreign_key_is_refused_by_name():
    edge, _ = build("tent", tiny())
    with pytest.raises(CheckpointError, match="'head.weight'"):
        edge.apply_update({"head.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="'bn1.weight'.*shape"):
        edge.apply_update({"bn1.weight": np.zeros(3, np.float32)})


# --- EATA -----------------------------------------------------------------------------------------

def test_reweighted_entropy_by_hand():
    logits = torch.zeros(1, 2)  # H = ln 2, E0 = 0.4 ln 2, weight exp(E0 - H) = 2 ** -0.6
    expected = 2 ** -0.6 * math.log(2)
    assert reweighted_entropy(0.4)(logits).item() == pytest.approx(expected, rel=1e-6)


def test_eata_uploads_what_the_filters_select_and_trains_norm_affine_only():
    model, images = tiny(), batches(6)
    edge, cloud = build("eata", model, lr=0.01)
    filt = EntropyFilter(10, e_max_factor=0.4, dynamic=False, d_margin=0.4, redundancy=True)
    uploads = []
    for imgs in images:
        # Reference: the filter fed by a plain train-mode (batch statistics) forward of the edge's weights.
        ref = copy.deepcopy(model).train()
        ref.load_state_dict({k: v for k, v in edge.model.state_dict().items() if k in ref.state_dict()})
        with torch.no_grad():
            logits = ref(to_input(imgs))
        expected = filt.select(logits.softmax(1), entropy_by_hand(logits)).numpy()
        res = edge.process(to_input(imgs))
        np.testing.assert_array_equal(res.upload, expected)
        assert res.e_max == pytest.approx(0.4 * math.log(10))
        uploads.append(res.upload)
        cloud.ingest(0, imgs[res.upload])
        assert cloud.on_edge_batch(0) == int(res.upload.any())
        state = cloud.export(0)
        if state is not None:
            edge.apply_update(state)
    uploaded = np.concatenate(uploads)
    assert 0 < uploaded.sum() < len(uploaded)
    source = dict(model.named_parameters())
    trained = {n for n, _ in cloud.model.named_parameters() if n.startswith(("bn1.", "layer1.1.", "layer2.1."))}
    for n, p in cloud.model.named_parameters():
        if n not in trained:
            assert torch.equal(p, source[n]), n
    assert all(not torch.equal(p, source[n]) for n, p in cloud.model.named_parameters() if n in trained)


def test_eata_edge_snapshot_restores_its_filter():
    model, images = tiny(), batches(3)
    edge, _ = build("eata", model)
    edge.process(to_input(images[0]))
    snap = edge.snapshot()
    first = edge.process(to_input(images[1])).upload
    edge.restore(snap)
    np.testing.assert_array_equal(edge.process(to_input(images[1])).upload, first)
    edge.reset()
    assert edge.filter is None and edge.snapshot() == {"state": None}


# --- CoTTA ----------------------------------------------------------------------------------------

def test_cotta_publishes_the_whole_teacher_which_moves_by_ema():
    model, imgs = tiny(), batches(1)[0]
    edge, cloud = build("cotta", model, n_views=4, p_th=1.0, ema=0.5, restore_prob=0.0, lr=0.01)
    teacher_before = {k: v.detach().clone() for k, v in cloud.teacher.named_parameters()}
    cloud.ingest(0, imgs)
    assert cloud.on_edge_batch(0) == 1 and cloud.augmented_steps == 1  # p_th 1.0: always augment
    student = dict(cloud.model.named_parameters())
    for k, t in cloud.teacher.named_parameters():
        torch.testing.assert_close(t, 0.5 * teacher_before[k] + 0.5 * student[k])
        assert not torch.equal(t, teacher_before[k])
    state = cloud.export(0)
    assert set(state) == set(cloud.teacher.state_dict()) and "fc.weight" in state and "bn1.running_mean" in state
    edge.apply_update(state)
    for k, v in edge.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k])
    assert edge.process(to_input(imgs)).upload.all()


def test_cotta_skips_augmentation_when_the_anchor_is_confident_and_restores_to_source():
    model, imgs = tiny(), batches(1)[0]
    _, cloud = build("cotta", model, n_views=4, p_th=0.0, restore_prob=1.0)
    cloud.ingest(0, imgs)
    cloud.on_edge_batch(0)
    assert cloud.augmented_steps == 0
    for k, p in cloud.model.named_parameters():  # every element restored to its source value
        torch.testing.assert_close(p, dict(model.named_parameters())[k], rtol=0, atol=0)


def test_soft_cross_entropy_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    teacher = torch.zeros(1, 2)  # softmax (1/2, 1/2)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_tta_augment_is_seeded_and_stays_in_range():
    x = to_input(batches(1)[0])
    a = tta_augment(x, torch.Generator().manual_seed(3))
    b = tta_augment(x, torch.Generator().manual_seed(3))
    c = tta_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


# --- SAR ------------------------------------------------------------------------------------------

def test_sar_top_block_rule():
    model = tiny()
    names = [n for n, _ in model.named_modules()]
    assert names[top_block_start(model)] == "layer2"
    assert [n for n, _ in sar_parameters(model)] == ["bn1.weight", "bn1.bias", "layer1.1.weight", "layer1.1.bias"]
    wrapped = nn.Sequential()
    wrapped.add_module("net", model)
    assert [n for n, _ in sar_parameters(wrapped)][0] == "net.bn1.weight" and len(sar_parameters(wrapped)) == 4


def test_sam_steps_by_hand():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    sam = SAM([p], lr=0.1, momentum=0.9, rho=0.05)
    (p**2 / 2).sum().backward()  # grad = p = (1, 2), norm sqrt(5)
    sam.first_step()
    ascended = torch.tensor([1.0, 2.0]) * (1 + 0.05 / math.sqrt(5))
    torch.testing.assert_close(p.detach(), ascended)
    (p**2 / 2).sum().backward()  # grad at the ascended point
    sam.second_step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0]) - 0.1 * ascended)


def test_sar_updates_only_allowed_params_with_two_forwards():
    model, imgs = tiny(), batches(1, size=32)[0]
    edge, cloud = build("sar", model, lr=0.05, reset_constant=0.0)
    calls = []
    cloud.model.register_forward_hook(lambda *_: calls.append(1))
    cloud.ingest(0, imgs)
    assert cloud.on_edge_batch(0) == 1 and len(calls) == 2
    allowed = {"bn1.weight", "bn1.bias", "layer1.1.weight", "layer1.1.bias"}
    source = dict(model.named_parameters())
    for n, p in cloud.model.named_parameters():
        assert torch.equal(p, source[n]) != (n in allowed), n
    state = cloud.export(0)
    assert set(state) == allowed
    edge.apply_update(state)
    assert torch.equal(edge.model.bn1.weight, cloud.model.bn1.weight)


def test_sar_matches_a_hand_written_sar_loop():
    """SAR's forward_and_adapt as the authors wrote it (two filters, SAM over SGD), two batches."""
    model, images, lr, rho = tiny(), batches(2, size=32), 0.05, 0.05
    _, cloud = build("sar", model, lr=lr, rho=rho, reset_constant=0.0)
    ref = copy.deepcopy(model).train()
    ref.requires_grad_(False)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [ref.bn1.weight, ref.bn1.bias, ref.layer1[1].weight, ref.layer1[1].bias]
    for p in params:
        p.requires_grad_(True)
    sgd, margin, ema = torch.optim.SGD(params, lr=lr, momentum=0.9), 0.4 * math.log(10), None
    for imgs in images:
        x = to_input(imgs)
        ent = entropy_by_hand(ref(x))
        keep = torch.where(ent < margin)
        sgd.zero_grad()
        ent[keep].mean().backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
            old = [p.clone() for p in params]
            for p in params:
                p.add_(p.grad * rho / (norm + 1e-12))
        sgd.zero_grad()
        ent2 = entropy_by_hand(ref(x))[keep]
        loss2 = ent2[torch.where(ent2 < margin)].mean()
        ema = loss2.item() if ema is None else 0.9 * ema + 0.1 * loss2.item()
        loss2.backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        sgd.step()
        cloud.ingest(0, imgs)
        assert cloud.on_edge_batch(0) == 1
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(cloud.model.named_parameters())[name], p, rtol=1e-5, atol=1e-6)  # a hand-written loop: other ops, other last bits
    assert cloud.ema == pytest.approx(ema)


def test_sar_model_recovery_resets_to_source():
    model, imgs = tiny(), batches(1, size=32)[0]
    _, cloud = build("sar", model, lr=0.05, reset_constant=100.0)
    cloud.ingest(0, imgs)
    cloud.on_edge_batch(0)
    assert cloud.model_resets == 1 and cloud.ema is not None
    assert torch.equal(cloud.model.bn1.weight, model.bn1.weight)


# --- the forward-only rule ------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
def test_edges_build_no_autograd_graph(name):
    edge, _ = build(name, tiny(), **({"n_views": 2} if name == "cotta" else {}))
    seen = []
    edge.model.register_forward_hook(lambda m, i, o: seen.append((torch.is_inference_mode_enabled(), o.requires_grad)))
    edge.process(to_input(batches(1)[0]))
    assert seen
    if name == "tent-edge":
        assert seen == [(False, True)]
        assert any(p.grad is not None for p in edge.model.parameters())
    else:
        assert seen == [(True, False)]
        assert all(p.grad is None for p in edge.model.parameters())


@pytest.mark.parametrize("name", BASELINES)
def test_edge_reset_restores_the_deployed_model(name):
    model = tiny()
    edge, cloud = build(name, model, **({"n_views": 2} if name == "cotta" else {}))
    run_harness(edge, cloud, batches(2))
    edge.reset()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(edge.model.state_dict()[k], v, rtol=0, atol=0)
