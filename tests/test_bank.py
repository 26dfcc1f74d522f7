"""cema-bank: domain keys, the cloud's bank of students, the edge's choice per batch (tiny conv+BN models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cema_ray.algorithms.domain_bank import DomainBank, bank_entries, bank_wire, nearest
from cema_ray.algorithms.domain_key import batch_keys, key_distance, key_scale, normalise
from cema_ray.errors import ConfigError
from cema_ray.methods.base import METHODS
from cema_ray.models.norm import state_nbytes
from cema_ray.models.preprocess import to_input
from cema_ray.models.publish import scope_parameters

torch.set_num_threads(1)
C = 10


def tiny(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, C))


def images(n: int, seed: int = 0, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, 6, 6, 3), dtype=np.uint8)


def tiny_edge() -> nn.Module:
    """The conftest checkpoints' architecture (Fashion-MNIST shaped)."""
    from cema_ray.models.factory import create_model

    return create_model("cema_resnet_s", 10, 1, (0.5,), (0.5,))


def bank_cloud(settings: dict | None = None):
    return METHODS.get("cema-bank").make_cloud(tiny(6, 1), tiny(4, 2), {"chunk_size": 4, "bank_gate": False,
                                                                         "bank_sure_steps": 0,
                                                                         **(settings or {})},
                                               torch.Generator().manual_seed(0))


# --- the domain key --------------------------------------------------------------------------

def test_the_key_runs_the_stem_only_and_groups_equal_separate_batches() -> None:
    model = tiny(4, 2).eval()
    calls = []
    model[5].register_forward_hook(lambda *_: calls.append(1))
    a, b = to_input(images(8, 1)), to_input(images(8, 2, lo=100, hi=140))  # b: low contrast
    both = batch_keys(model, torch.cat([a, b]), groups=2)
    assert not calls  # the classifier never ran: the forward stopped at the first BatchNorm2d
    assert both.shape == (2, 8)
    assert np.allclose(both[0], batch_keys(model, a)[0], atol=1e-5)
    assert np.allclose(both[1], batch_keys(model, b)[0], atol=1e-5)
    scale = key_scale(model)
    ka, kb = normalise(both[0], scale), normalise(both[1], scale)
    ka2 = normalise(batch_keys(model, to_input(images(8, 3)))[0], scale)  # same domain, other images
    assert key_distance(ka, kb) > 10 * key_distance(ka, ka2)


def test_a_model_without_batch_norm_has_no_key() -> None:
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        key_scale(nn.Sequential(nn.Flatten(), nn.Linear(108, C)))


# --- the bank's routing ----------------------------------------------------------------------

def test_bank_routes_near_keys_together_starts_far_ones_and_merges_the_nearest_pair_when_full() -> None:
    bank = DomainBank(capacity=3, radius=0.1)
    a, b, c, d = (np.full(4, v, np.float32) for v in (0.0, 1.0, 3.0, -5.0))
    assert bank.route(a).new and bank.route(a + 0.1).slot == 0  # 0.01 from a: the same entry
    assert np.allclose(bank.keys[0], 0.05)  # the entry's key is the mean of its keys
    assert bank.route(b).slot == 1 and bank.route(c).slot == 2 and len(bank) == 3
    r = bank.route(d)  # full: entries 0 and 1 are the nearest pair; 1 merges into 0 and takes d
    assert r.new and r.slot == 1 and r.merged_into == 0 and r.weights == (2, 1)
    assert np.allclose(bank.keys[0], (2 * 0.05 + 1.0) / 3) and bank.counts[0] == 3 and bank.merges == 1
    assert len(bank) == 3 and bank.created == 4
    copy = DomainBank(3, 0.1)
    copy.load_state_dict(bank.state_dict())
    assert copy.route(d + 0.01).slot == bank.route(d + 0.01).slot == 1


def test_evicting_the_smallest_merges_a_stray_entry_and_keeps_busy_domains_apart() -> None:
    bank = DomainBank(capacity=3, radius=0.1, evict="smallest")
    a, b, stray, d = (np.full(4, v, np.float32) for v in (0.0, 1.0, 3.0, -5.0))
    for _ in range(3):
        bank.route(a), bank.route(b)  # two busy domains, 3 keys each
    assert bank.route(stray).slot == 2
    r = bank.route(d)  # full: the stray (1 key) merges into its nearest, b, and its slot takes d
    assert r.new and r.slot == 2 and r.merged_into == 1 and r.weights == (3, 1)
    assert np.allclose(bank.keys[0], 0.0) and np.allclose(bank.keys[1], (3 * 1.0 + 3.0) / 4)
    assert np.allclose(bank.keys[2], -5.0) and bank.counts == [3, 4, 1]
    with pytest.raises(ValueError, match="evict"):
        DomainBank(3, 0.1, evict="oldest")


def test_nearest_respects_its_reach() -> None:
    keys = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    assert nearest(np.array([0.9, 0.9], np.float32), keys, reach=0.1) == 1
    assert nearest(np.array([5.0, 5.0], np.float32), keys, reach=0.1) is None
    assert nearest(np.zeros(2, np.float32), np.zeros((0, 2), np.float32), reach=1.0) is None


# --- the cloud's bank ------------------------------------------------------------------------

def test_uploads_teach_the_entry_of_their_key_and_the_bank_goes_down_whole() -> None:
    cloud = bank_cloud()
    far, near = np.zeros(8, np.float32), np.full(8, 3.0, np.float32)
    cloud.ingest(0, images(4, 1), key=far)
    cloud.ingest(1, images(4, 2), key=near)
    assert cloud.on_edge_batch(0) == 2  # one chunk per entry (each its own domain)
    residuals = cloud.learners[0].residuals
    assert [r.steps for r in residuals] == [1, 1] and cloud.students[0].steps == 2  # one step per chunk
    wire = cloud.export(0)
    keys, entries, base, _ = bank_entries(wire)
    assert np.array_equal(keys, np.stack([far, near])) and len(entries) == 2 and base is not None
    one = cloud.students[0].export()
    assert set(base) == set(one) and all(np.array_equal(base[k], one[k]) for k in one)
    for entry, r in zip(entries, residuals):  # an entry: the fleet's student plus its domain's offset
        offset = r.published()
        assert set(entry) == set(one) and all(np.allclose(entry[k], one[k] + offset[k].numpy()) for k in one)
        assert any(float(v.abs().max()) > 0 for v in offset.values())
    # on the wire: each entry's norm scope and its key, plus the fleet's student; nothing else
    assert state_nbytes(wire) == 3 * state_nbytes(one) + 2 * far.nbytes
    assert not np.allclose(entries[0]["1.weight"], entries[1]["1.weight"])  # each entry learnt its own chunk


def test_a_reset_edge_resets_nothing_other_edges_use() -> None:
    cloud = bank_cloud()
    cloud.ingest(0, images(4, 1), key=np.zeros(8, np.float32))
    cloud.on_edge_batch(0)
    cloud.ingest(1, images(2, 2), key=np.zeros(8, np.float32))  # waiting in entry 0's queue
    before = cloud.export(0)
    cloud.reset(1)
    assert cloud.queued() == 2 and cloud.students[0].steps == 1 and cloud.learners[0].residuals[0].steps == 1
    cloud.version += 1  # what export would send now
    after = cloud.export(0)
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)


def test_bank_state_round_trip_continues_identically() -> None:
    a = bank_cloud()
    a.ingest(0, images(6, 1), key=np.zeros(8, np.float32))
    a.on_edge_batch(0)
    b = bank_cloud()
    b.load_state_dict(a.state_dict())
    for c in (a, b):
        c.ingest(1, images(4, 3), key=np.full(8, 2.0, np.float32))
        c.on_edge_batch(1)
    wa, wb = a.export(1), b.export(1)
    assert set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_bank_with_scope_all_fails_at_load_in_one_line() -> None:
    with pytest.raises(ConfigError, match="train_scope"):
        METHODS.get("cema-bank").resolve({"train_scope": "all"})


# --- the edge's choice -------------------------------------------------------------------------

def edge_key(edge, x: torch.Tensor) -> np.ndarray:
    return normalise(batch_keys(edge.host.model, x)[0], edge.scale)


def _edge(settings: dict | None = None):
    return METHODS.get("cema-bank").make_edge(tiny(4, 2), settings or {})


def test_the_edge_runs_the_entry_nearest_its_batch_forward_only_and_sends_its_key() -> None:
    edge = _edge({"bank_radius": 1e-4})
    xa, xb = to_input(images(16, 1)), to_input(images(16, 2, lo=100, hi=140))
    ka = normalise(batch_keys(edge.host.model, xa)[0], edge.scale)
    kb = normalise(batch_keys(edge.host.model, xb)[0], edge.scale)
    names = [n for n, _ in scope_parameters(edge.host.model, "norm")]
    shapes = {n: p.shape for n, p in scope_parameters(edge.host.model, "norm")}
    entry = lambda v: {n: np.full(shapes[n], v, np.float32) for n in names}  # noqa: E731
    edge.apply_update(bank_wire({0: (ka, entry(0.5)), 3: (kb, entry(2.0))}, base=entry(1.0)))
    for x, key, want in ((xa, ka, 0.5), (xb, kb, 2.0)):
        result = edge.process(x)
        assert np.array_equal(result.domain_key, key)
        assert float(edge.state[names[0]][0]) == want  # the entry of its own domain
        plain = METHODS.get("cema-fleet").make_edge(tiny(4, 2), {})
        plain.apply_update(entry(want))
        assert np.array_equal(result.predictions, plain.process(x).predictions)
    assert all(not p.requires_grad for p in edge.host.model.parameters())
    far = to_input(images(16, 4, lo=250, hi=256))  # nearly white: no entry within reach -> the fleet's student
    edge.process(far)
    assert float(edge.state[names[0]][0]) == 1.0


def test_edges_on_one_publication_share_entry_objects_so_they_fuse() -> None:
    edge = _edge()
    twin = edge.fork()
    x = to_input(images(16, 1))
    key = normalise(batch_keys(edge.host.model, x)[0], edge.scale)
    state = {n: p.detach().numpy().copy() for n, p in scope_parameters(edge.host.model, "norm")}
    wire = bank_wire({0: (key, state)})
    for e in (edge, twin):
        e.apply_update(wire)
        e.prepare(x)
    assert edge.state is twin.state and edge.fuse_key() == twin.fuse_key()


def test_a_batch_near_a_sure_entry_uploads_a_share_of_the_budget() -> None:
    """bank_sure_steps: the publication says how many chunks trained each entry; a batch whose nearest entry took
    at least that many uploads bank_sure_budget x the budget, a batch near an unsure one the whole budget."""
    edge = _edge({"bank_sure_steps": 5, "bank_sure_budget": 0.5, "upload_budget": 0.5, "e_max_factor": 10.0,
                  "upload_balance": False})
    x = to_input(images(16, 1))
    key = normalise(batch_keys(edge.host.model, x)[0], edge.scale)
    state = {n: p.detach().numpy().copy() for n, p in scope_parameters(edge.host.model, "norm")}
    uploads = {}
    for steps in (4, 5):
        wire = bank_wire({0: (key, state)}, steps={0: steps})
        assert bank_entries(wire).steps.tolist() == [steps] and state_nbytes(wire) == state_nbytes(state) + 40
        edge.apply_update(wire)
        uploads[steps] = int(edge.process(x).upload.sum())
    assert uploads == {4: 8, 5: 4}  # 50 % of 16, then half of that
    cloud = bank_cloud({"bank_sure_steps": 1})
    cloud.ingest(0, images(4, 1), key=key)
    cloud.on_edge_batch(0)
    assert bank_entries(cloud.export(0)).steps.tolist() == [1]


# --- a whole local run -------------------------------------------------------------------------

def test_a_local_bank_run_predicts_every_sample_once_and_publishes_its_entries(make_run_config, tmp_path) -> None:
    from cema_ray.runtime import run_experiment
    from batch_tables import batch_table

    cfg = make_run_config("method.name=cema-bank", "edges.count=3", "stream.corruptions=[gaussian_noise, fog]",
                          "method.settings={bank_gate: false}")  # random models: the gate would send keys only
    summary = run_experiment(cfg, tmp_path / "o")
    t = batch_table(tmp_path / "o")
    assert summary["samples"] == sum(t["samples"]) == 3 * 2 * 64
    assert 0 < summary["upload_fraction"] <= 0.3 and summary["publications"] > 0
    downs = {b for b in t["bytes_down"] if b}
    one = sum(p.numel() * 4 for _, p in scope_parameters(tiny_edge(), "norm"))
    assert downs and all(b > one for b in downs)  # each publication: the fleet's student and >= 1 entry


def test_a_full_bank_merges_offsets_and_waiting_uploads_and_loses_none() -> None:
    cloud = bank_cloud({"bank_size": 2, "bank_radius": 0.01})
    keys = [np.full(8, v, np.float32) for v in (0.0, 0.05, 3.0)]
    cloud.ingest(0, images(4, 1), key=keys[0])
    cloud.ingest(1, images(4, 2), key=keys[1])  # 0.0025 away: within the radius -> entry 0
    cloud.ingest(2, images(3, 3), key=keys[2] + 9)  # a second entry, 3 uploads waiting
    cloud.on_edge_batch(0)
    r0 = {n: v.clone() for n, v in cloud.learners[0].residuals[0].delta.items()}
    cloud.ingest(3, images(2, 4), key=keys[2])  # beyond the radius of both: the full bank merges 0 and 1
    assert cloud.learners[0].bank.merges == 1 and cloud.queued() == 5  # 3 + 2 uploads: none lost
    assert cloud.learners[0].residuals[1].steps == 0  # the freed slot starts at zero offset for the new domain
    w = cloud.learners[0].bank.counts[0]
    merged = cloud.learners[0].residuals[0].delta
    assert w == 3 and all(torch.allclose(merged[n], r0[n] * 2 / 3) for n in r0)  # 2:1 with zero


def test_the_gate_sends_an_entry_only_while_it_beats_the_deployed_weights() -> None:
    cloud = bank_cloud({"bank_gate": True})
    cloud.ingest(0, images(4, 1), key=np.zeros(8, np.float32))
    cloud.ingest(1, images(4, 2), key=np.full(8, 3.0, np.float32))
    cloud.on_edge_batch(0)
    r0, r1 = cloud.learners[0].residuals
    assert r0.gain.count == r1.gain.count == 1 and cloud.learners[0].base_gain.count == 2  # scored before each step
    r0.gain.mean, r1.gain.mean, cloud.learners[0].base_gain.mean = 0.25, -0.25, 0.1
    keys, entries, base, _ = bank_entries(cloud.export(0))
    assert len(keys) == 2 and entries[0] is not None and entries[1] is None and base is not None
    cloud.learners[0].base_gain.mean, cloud.version = 0.0, cloud.version + 1
    wire = cloud.export(0)
    assert bank_entries(wire)[2] is None and not any(k.startswith("base.") for k in wire)
    # an edge whose batch is nearest entry 1 runs the deployed weights; near entry 0, entry 0
    edge = _edge({"bank_radius": 1e9})
    edge.apply_update(wire)
    x = to_input(images(8, 5))
    edge.bank = bank_wire({0: (np.full(8, 50.0, np.float32), entries[0]), 1: (edge_key(edge, x), None)})
    edge.process(x)
    assert edge.state is None
