"""CEMA's edge policy and cloud trainer on tiny conv+BN models: mechanics, not accuracy."""
from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cema_ray.errors import ConfigError
from cema_ray.methods.base import METHODS
from cema_ray.methods.cema import SETTINGS, CemaCloud, CemaEdge
from cema_ray.models.norm import norm_affine_parameters, norm_state
from cema_ray.models.preprocess import to_input
from cema_ray.models.tbr import TBRBatchNorm2d, convert_bn_to_tbr

torch.set_num_threads(1)
C = 10


def tiny(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # model construction only; every draw under test uses explicit generators
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, C))


def images(n: int, seed: int = 0, start: int | None = None) -> np.ndarray:
    """uint8 (n, 4, 4, 3); with ``start`` pixel [0, 0, 0] holds a running id (start, start + 1, ...)."""
    out = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    if start is not None:
        out[:, 0, 0, 0] = (start + np.arange(n)) % 256
    return out


def cloud(settings: dict | None = None, seed: int = 0) -> CemaCloud:
    return METHODS.get("cema").make_cloud(tiny(6, 1), tiny(4, 2), settings or {}, torch.Generator().manual_seed(seed))


def record_sizes(c: CemaCloud) -> list[int]:
    sizes: list[int] = []
    original = c._distill_step

    def spy(lane, x):
        sizes.append(int(x.shape[0]))
        return original(lane, x)

    c._distill_step = spy
    return sizes


# --- presets ----------------------------------------------------------------------------------

def test_presets_and_defaults() -> None:
    for name in ("cema", "cema-paper", "cema-edgebn", "upload-all"):
        spec = METHODS.get(name)
        assert set(spec.defaults) == set(SETTINGS) and spec.uses_foundation
    d = METHODS.get("cema").defaults
    assert (d["lr_foundation"], d["lr_student"], d["momentum"], d["chunk_size"], d["replay_capacity"]) == \
        (2.5e-4, 2.5e-3, 0.9, 32, 10000)
    assert (d["alpha"], d["beta"], d["gamma"], d["tau"], d["publish_every"]) == (3.0, 3.0, 1.0, 1.0, 1)
    assert d["dynamic_e_max"] is False and d["entropy_floor"] is None and d["edge_stats"] == "published"
    paper = METHODS.get("cema-paper").defaults
    assert paper["dynamic_e_max"] and paper["dynamic_lambda"] == 0.6 and paper["entropy_floor"] == 0.02
    assert METHODS.get("cema-edgebn").defaults["edge_stats"] == "batch"
    assert METHODS.get("upload-all").defaults["select"] is False
    with pytest.raises(ConfigError, match="lr_studnet = 1.0: unknown setting"):
        cloud({"lr_studnet": 1.0})
    with pytest.raises(ConfigError, match="settings.student_scope = 'group': must be one of 'shared', 'per_edge'"):
        cloud({"student_scope": "group"})
    with pytest.raises(ConfigError, match="foundation"):
        METHODS.get("cema").make_cloud(None, tiny(4, 2), {}, torch.Generator())


# --- edge -------------------------------------------------------------------------------------

def test_edge_is_forward_only_and_reports_a_result() -> None:
    edge = METHODS.get("cema").make_edge(tiny(4, 2), {"e_max_factor": 1.0, "d_margin": 0.999})
    seen = []
    edge.model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
    x = to_input(images(16))
    res = edge.process(x)
    assert seen == [(False, False)] and x.grad_fn is None and not x.requires_grad
    assert not any(p.requires_grad for p in edge.model.parameters())
    assert res.predictions.dtype == np.int64 and res.upload.dtype == bool and res.entropy.dtype == np.float32
    assert res.predictions.shape == res.upload.shape == res.entropy.shape == (16,)
    assert res.e_max == pytest.approx(math.log(C))
    assert np.array_equal(res.upload, res.entropy < res.e_max)  # first batch: entropy filter only
    assert all(isinstance(m, TBRBatchNorm2d) for m in edge.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_upload_all_and_edge_batch_stats() -> None:
    res = METHODS.get("upload-all").make_edge(tiny(4, 2), {}).process(to_input(images(8)))
    assert res.upload.all() and math.isnan(res.e_max)
    model = tiny(4, 2)
    edge = METHODS.get("cema-edgebn").make_edge(model, {})
    x = to_input(images(8))
    bn = model[1]
    h = model[0](x)
    expected = model[5](model[4](model[3](model[2](
        F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)))))
    torch.testing.assert_close(torch.as_tensor(edge.process(x).predictions), expected.argmax(1))


def test_edge_update_reset_and_snapshot() -> None:
    edge = METHODS.get("cema").make_edge(tiny(4, 2), {"e_max_factor": 1.0})
    edge.process(to_input(images(8)))  # discarded source stats: adopts this batch's
    state = norm_state(edge.model)
    state = {k: v + 1.0 for k, v in state.items()}
    edge.apply_update(state)
    assert np.allclose(norm_state(edge.model)["1.running_mean"], state["1.running_mean"])
    snap = edge.snapshot()
    other = METHODS.get("cema").make_edge(tiny(4, 2), {"e_max_factor": 1.0})
    other.restore(pickle.loads(pickle.dumps(snap)))
    x = to_input(images(8, seed=5))
    a, b = edge.process(x), other.process(x)
    assert np.array_equal(a.upload, b.upload) and np.allclose(a.entropy, b.entropy)
    edge.reset()
    assert edge.filter.m is None and not bool(edge.model[1].stats_ready)


# --- cloud ------------------------------------------------------------------------------------

def test_only_norm_affine_parameters_train() -> None:
    c = cloud()
    f0 = {k: v.clone() for k, v in c.foundation.state_dict().items()}
    s0 = {k: v.clone() for k, v in c.student.state_dict().items()}
    c.ingest(0, images(32))
    assert c.on_edge_batch(0) == 1
    for model, before in ((c.foundation, f0), (c.student, s0)):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in norm_affine_parameters(model)} == {"1.weight", "1.bias"}
        for name, p in model.named_parameters():
            changed = not torch.equal(p, before[name])
            assert changed == (name in trainable), name
            assert (p.grad is None) == (name not in trainable)


def test_queue_chunking_fifo() -> None:
    c = cloud()
    chunks = []
    original = c._chunk_step
    c._chunk_step = lambda lane, chunk: (chunks.append(chunk[:, 0, 0, 0].tolist()), original(lane, chunk))
    c.ingest(0, images(30, start=0))
    c.ingest(0, images(40, seed=1, start=30))
    assert c.on_edge_batch(0) == 2
    assert chunks == [list(range(32)), list(range(32, 64))]
    assert c._lanes[0].queue.size == 6 and len(c._lanes[0].buffer) == 70


def test_replay_mix_after_256_buffered() -> None:
    c = cloud()
    sizes = record_sizes(c)
    c.ingest(0, images(200))
    assert c.on_edge_batch(0) == 6 and sizes == [32] * 6  # buffer 200 < 256: the chunk alone
    c.ingest(0, images(60, seed=1))  # buffer 260, queue 68
    assert c.on_edge_batch(0) == 2 and sizes[6:] == [128, 128]  # 32 new + 96 replayed


def test_replay_only_step_condition() -> None:
    c = cloud()
    sizes = record_sizes(c)
    c.ingest(0, images(256))
    assert c.on_edge_batch(0) == 8 and sizes == [128] * 8  # 256 buffered is no longer "fewer than 256"
    assert c.on_edge_batch(0) == 0  # no step, but the buffer holds exactly 256: not more
    c.ingest(0, images(1, seed=2))  # buffer 257, queue 1
    f_before = norm_state(c.foundation)
    assert c.on_edge_batch(0) == 1 and sizes[-1] == 128 and c.counters["replay_only_steps"] == 1
    assert all(np.array_equal(f_before[k], v) for k, v in norm_state(c.foundation).items())  # f not updated
    c.ingest(0, images(31, seed=3))  # a chunk step happens: no replay-only step on top
    assert c.on_edge_batch(0) == 1 and c.counters["replay_only_steps"] == 1 and sizes[-1] == 128
    off = cloud({"replay_only_step": False})
    off.ingest(0, images(257))
    off.on_edge_batch(0)
    assert off.on_edge_batch(0) == 0


def test_replay_only_cadence_fleet_round() -> None:
    """A shared student serving 4 edges: the authors' cadence replays after every step-less edge batch,
    "fleet_round" once per 4 (as many as the edges it serves); a chunk step restarts the count."""
    per_batch, per_round = cloud(), cloud({"replay_only_cadence": "fleet_round"})
    for c in (per_batch, per_round):
        c.ingest(0, images(257))  # 8 chunk steps, then 1 queued and a buffer above the warm-up
        assert c.on_edge_batch(0) == 8
    steps = {id(c): [c.on_edge_batch(e) for e in (1, 2, 3, 0, 1, 2)] for c in (per_batch, per_round)}
    assert steps[id(per_batch)] == [1, 1, 1, 1, 1, 1]
    assert steps[id(per_round)] == [0, 0, 0, 1, 0, 0]  # 4 edges served: one replay per 4 idle batches
    per_round.ingest(3, images(31, seed=1))  # 32 queued: a chunk step, which resets the idle count
    assert per_round.on_edge_batch(3) == 1 and per_round._lanes[0].idle_batches == 0
    assert [per_round.on_edge_batch(e) for e in (0, 1, 2, 3)] == [0, 0, 0, 1]
    assert per_round.counters["replay_only_steps"] == 2
    restored = cloud({"replay_only_cadence": "fleet_round"})
    restored.load_state_dict(pickle.loads(pickle.dumps(per_round.state_dict())))
    assert restored._lanes[0].served == {0, 1, 2, 3} and restored._lanes[0].idle_batches == 0
    with pytest.raises(ConfigError, match="replay_only_cadence"):
        cloud({"replay_only_cadence": "sometimes"})


def test_single_edge_cadences_agree() -> None:
    """With one edge, "fleet_round" is the authors' cadence: the same steps and the same student."""
    a, b = cloud(), cloud({"replay_only_cadence": "fleet_round"})
    for c in (a, b):
        for i in range(16):
            c.ingest(0, images(50 if i % 3 == 0 else 9, seed=i))  # the buffer passes 256 at i = 12
            c.on_edge_batch(0)
    assert a.counters == b.counters and a.counters["replay_only_steps"] > 0
    sa, sb = norm_state(a.student), norm_state(b.student)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_export_contents_and_cadence() -> None:
    c = cloud({"publish_every": 2})
    c.ingest(0, images(32))
    c.on_edge_batch(0)
    assert c.export(0) is None  # batch 1 of K = 2
    c.on_edge_batch(0)
    state = c.export(0)
    assert set(state) == {"1.weight", "1.bias", "1.running_mean", "1.running_var"}
    assert all(v.dtype == np.float32 for v in state.values())
    assert np.array_equal(state["1.running_var"], c.student[1].running_var.numpy())
    assert not np.allclose(state["1.running_mean"], 0.0)  # adopted from the uploads, not a placeholder
    c.on_edge_batch(0)
    c.on_edge_batch(0)
    assert c.export(0) is None  # nothing changed since the last publication
    fresh = cloud()
    fresh.on_edge_batch(0)
    assert fresh.export(0) is None  # never stepped: nothing to send


def test_cloud_step_matches_method_formulas() -> None:
    """One chunk step, recomputed by hand: weights a, b, alpha = beta = 3, gamma = 1, both SGD steps."""
    c = cloud()
    f, s = copy.deepcopy(c.foundation), copy.deepcopy(c.student)
    x = to_input(images(32))
    c.ingest(0, images(32))
    c.on_edge_batch(0)

    E0 = 0.4 * math.log(C)
    H = lambda z: -(z.softmax(1) * z.log_softmax(1)).sum(1)  # noqa: E731
    f_opt = torch.optim.SGD([f[1].weight, f[1].bias], lr=2.5e-4, momentum=0.9)
    s_opt = torch.optim.SGD([s[1].weight, s[1].bias], lr=2.5e-3, momentum=0.9)
    f[1].train()
    hf = H(f(x))
    (torch.exp(E0 - hf).detach() * hf).mean().backward()
    f_opt.step()
    f[1].eval()
    with torch.no_grad():
        tl = f(x)
    s[1].train()
    sl = s(x)
    hs, ht = H(sl), H(tl)
    a, b = torch.exp(E0 - hs.detach()), torch.exp(E0 - ht)
    kl = (tl.softmax(1) * (tl.log_softmax(1) - sl.log_softmax(1))).sum(1)
    ce = -sl.log_softmax(1).gather(1, tl.argmax(1, keepdim=True)).squeeze(1)
    (3 * (a * hs).mean() + 3 * (b * kl).mean() + 1 * (b * ce).mean()).backward()
    s_opt.step()
    for k, v in c.export(0).items():
        torch.testing.assert_close(torch.as_tensor(v), s.state_dict()[k].float(), rtol=1e-5, atol=1e-7)
    for k, v in norm_state(c.foundation).items():
        torch.testing.assert_close(torch.as_tensor(v), f.state_dict()[k].float(), rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_reproduces_next_step() -> None:
    a = cloud(seed=0)
    a.ingest(0, images(300))
    a.on_edge_batch(0)
    a.ingest(0, images(40, seed=1))
    a.on_edge_batch(0)
    a.export(0)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = cloud(seed=123)  # a different generator: the checkpoint must carry the RNG state
    b.load_state_dict(state)
    for c in (a, b):
        c.ingest(0, images(30, seed=2))  # 20 queued + 30: one step with replay, 18 left
        assert c.on_edge_batch(0) == 1
    sa, sb = a.export(0), b.export(0)
    assert sa is not None and sa.keys() == sb.keys()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    fa, fb = norm_state(a.foundation), norm_state(b.foundation)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert a.counters == b.counters and a._lanes[0].queue.size == b._lanes[0].queue.size == 18


def test_per_edge_scope_keeps_separate_states() -> None:
    c = cloud({"student_scope": "per_edge"})
    c.ingest(0, images(32, seed=0))
    c.on_edge_batch(0)
    c.on_edge_batch(1)
    s0 = c.export(0)
    assert s0 is not None and c.export(1) is None  # edge 1 uploaded nothing: its student never moved
    c.ingest(1, (255 - images(64, seed=4)) // 3)  # a different distribution
    assert c.on_edge_batch(1) == 2
    s1 = c.export(1)
    assert not np.allclose(s0["1.running_mean"], s1["1.running_mean"])
    lane0 = c.state_dict()["lanes"][0]["student"]
    assert np.array_equal(lane0["1.running_mean"].numpy(), s0["1.running_mean"])  # edge 1 left edge 0 alone
    assert c._lanes[0].version == 1 and c._lanes[1].version == 2
    shared = cloud()
    shared.ingest(0, images(32))
    shared.on_edge_batch(0)
    shared.on_edge_batch(1)
    e0, e1 = shared.export(0), shared.export(1)
    assert all(np.array_equal(e0[k], e1[k]) for k in e0)  # one student for the fleet


def test_reset_restores_deployed_student() -> None:
    c = cloud()
    init = {k: v.clone() for k, v in c.student.state_dict().items()}
    f_init = {k: v.clone() for k, v in c.foundation.state_dict().items()}
    c.ingest(0, images(70))
    c.on_edge_batch(0)
    c.reset(0)
    assert all(torch.equal(v, init[k]) for k, v in c.student.state_dict().items())
    assert all(torch.equal(v, f_init[k]) for k, v in c.foundation.state_dict().items())
    assert c._lanes[0].queue.size == 0 and len(c._lanes[0].buffer) == 0
    c.on_edge_batch(0)
    assert c.export(0) is None  # the reset edge already runs the deployed model


def test_tbr_conversion_uses_discarded_stats() -> None:
    c = cloud()
    assert isinstance(c.student[1], TBRBatchNorm2d) and not bool(c.student[1].stats_ready)
    plain = cloud({"tbr": False})
    assert type(plain.student[1]) is nn.BatchNorm2d
    ref = convert_bn_to_tbr(tiny(4, 2), discard_running_stats=False)
    assert bool(ref[1].stats_ready)
