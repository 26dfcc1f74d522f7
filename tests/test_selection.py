"""Entropy, the edge's selection filter, the replay buffer and the distillation loss, by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cema_ray.algorithms import EntropyFilter, ReplayBuffer, e0, entropy, reweight, selective_distillation_loss

torch.set_num_threads(1)


def f32(v: float) -> float:
    return float(np.float32(v))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- entropy ----------------------------------------------------------------------------------

def test_entropy_e0_and_reweight() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [200.0, 0.0, 0.0]])
    h = entropy(logits)
    expected = [math.log(3.0), -(0.6 * math.log(0.6) + 0.4 * math.log(0.2)), 0.0]
    np.testing.assert_allclose(h.numpy(), expected, atol=1e-6)
    assert math.isclose(e0(10), 0.4 * math.log(10)) and math.isclose(e0(1000), 2.7631021, rel_tol=1e-7)
    assert math.isclose(e0(10, factor=1.0), math.log(10))
    ent = torch.tensor([0.5, 1.0], requires_grad=True)
    w = reweight(ent, 0.8)
    assert not w.requires_grad
    np.testing.assert_allclose(w.numpy(), [math.exp(0.3), math.exp(-0.2)], rtol=1e-6)


# --- EntropyFilter ----------------------------------------------------------------------------

def uniform(n: int, c: int) -> torch.Tensor:
    return torch.full((n, c), 1.0 / c)


def test_static_threshold_is_strict() -> None:
    flt = EntropyFilter(10, redundancy=False)
    E0 = 0.4 * math.log(10)
    below = float(np.nextafter(np.float32(E0), np.float32(0)))
    ent = t(f32(E0), below, 0.1, 2.0)
    assert flt.select(uniform(4, 10), ent).tolist() == [False, True, True, False]
    assert flt.e_max == pytest.approx(E0)


def test_dynamic_threshold_after_warmup() -> None:
    E0 = 0.4 * math.log(10)
    flt = EntropyFilter(10, dynamic=True, dynamic_lambda=0.6, warmup_samples=4, redundancy=False)
    # 3 samples seen: not warmed up, static E0
    assert flt.select(uniform(3, 10), t(0.2, 0.4, 0.6)).tolist() == [True, True, True]
    assert flt.e_max == pytest.approx(E0)
    # 6 seen; the first 4 have mean 0.5; all 6 mean 3.5 / 6 -> E_max = E0 * 0.6 * (3.5 / 6) / 0.5 = 0.6447
    mask = flt.select(uniform(3, 10), t(0.8, 0.6, 0.9))
    e_max = E0 * 0.6 * (3.5 / 6) / 0.5
    assert flt.e_max == pytest.approx(e_max, rel=1e-6) and math.isclose(e_max, 0.644724, rel_tol=1e-5)
    assert mask.tolist() == [False, True, False]
    # 9 seen, mean (3.5 + 1.25) / 9; warm mean still 0.5 (the first 4 samples only)
    mask = flt.select(uniform(3, 10), t(0.1, 0.5, 0.65))
    e_max = E0 * 0.6 * ((3.5 + 1.25) / 9) / 0.5
    assert flt.e_max == pytest.approx(e_max, rel=1e-6) and e_max < 0.65
    assert mask.tolist() == [True, True, False]


def test_redundancy_filter_and_moving_average_over_three_batches() -> None:
    flt = EntropyFilter(3, e_max_factor=1.0, d_margin=0.5)  # E_max = ln 3
    low, high = 0.1, 1.2
    # batch 1: m unset, every entropy-passing sample kept, m = their mean
    mask = flt.select(t([1, 0, 0], [0, 1, 0], [0, 0, 1]), t(low, low, high))
    assert mask.tolist() == [True, True, False]
    np.testing.assert_allclose(flt.m.numpy(), [0.5, 0.5, 0.0])
    # batch 2: cos with m = 0 (keep), 0.7071 (drop), 0.686 (drop); the last passes cos but not entropy
    mask = flt.select(t([0, 0, 1], [1, 0, 0], [0.8, 0, 0.2], [0, 0, 1]), t(low, low, low, high))
    assert mask.tolist() == [True, False, False, False]
    np.testing.assert_allclose(flt.m.numpy(), [0.45, 0.45, 0.1], rtol=1e-6)
    # batch 3: |m| = sqrt(0.415); cos = 0.155 (keep), 0.699 (drop), 0.17/(|m|*sqrt(0.68)) = 0.32 (keep)
    mask = flt.select(t([0, 0, 1], [0, 1, 0], [0.2, 0, 0.8]), t(low, low, low))
    assert mask.tolist() == [True, False, True]
    np.testing.assert_allclose(flt.m.numpy(), [0.415, 0.405, 0.18], rtol=1e-6)


def test_skipped_counts_name_the_filter_that_turned_each_sample_away() -> None:
    flt = EntropyFilter(3, e_max_factor=1.0, d_margin=0.5, entropy_floor=0.05)  # E_max = ln 3, e_min = 0.055
    assert flt.last_skipped == {"unreliable": 0, "confident": 0, "redundant": 0}
    flt.select(t([1, 0, 0], [0, 1, 0]), t(0.1, 0.1))  # m = [0.5, 0.5, 0]
    # unreliable (1.2), confident (0.01), redundant (cos 0.71 with m), kept
    mask = flt.select(t([0.1, 0.9, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]), t(1.2, 0.01, 0.1, 0.1))
    assert mask.tolist() == [False, False, False, True]
    assert flt.last_skipped == {"unreliable": 1, "confident": 1, "redundant": 1}
    no_floor = EntropyFilter(3, e_max_factor=1.0, redundancy=False)
    no_floor.select(t([1, 0, 0], [0, 1, 0]), t(2.0, 0.1))
    assert no_floor.last_skipped == {"unreliable": 1, "confident": 0, "redundant": 0}


def test_first_batch_without_reliable_samples_leaves_m_unset() -> None:
    flt = EntropyFilter(3, e_max_factor=1.0, d_margin=0.01)
    assert flt.select(t([1, 0, 0]), t(2.0)).tolist() == [False]
    assert flt.m is None
    # next batch acts as the first: everything reliable kept even though d_margin is tiny
    assert flt.select(t([1, 0, 0], [0.9, 0.1, 0]), t(0.1, 0.1)).tolist() == [True, True]


def test_d_margin_defaults_by_class_count() -> None:
    assert EntropyFilter(10).d_margin == 0.4 and EntropyFilter(100).d_margin == 0.4
    assert EntropyFilter(1000).d_margin == 0.05 and EntropyFilter(1000, d_margin=0.3).d_margin == 0.3


def test_entropy_floor() -> None:
    flt = EntropyFilter(10, entropy_floor=0.02, redundancy=False)
    e_min = 0.02 * math.log(10)
    assert math.isclose(flt.e_min, 0.0460517, rel_tol=1e-6)
    ent = t(0.04, 0.05, f32(e_min), 0.5, 0.95)
    assert flt.select(uniform(5, 10), ent).tolist() == [False, True, False, True, False]


def test_snapshot_restore_reproduces_decisions() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.rand(6, 4, generator=gen).softmax(1), torch.rand(6, generator=gen)) for _ in range(3)]
    a = EntropyFilter(4, dynamic=True, warmup_samples=5, d_margin=0.99)
    for p, h in batches[:2]:
        a.select(p, h)
    snap = a.snapshot()
    b = EntropyFilter(4, dynamic=True, warmup_samples=5, d_margin=0.99)
    b.restore(snap)
    assert torch.equal(a.select(*batches[2]), b.select(*batches[2])) and a.e_max == b.e_max
    assert np.allclose(a.m.numpy(), b.m.numpy())


# --- ReplayBuffer -----------------------------------------------------------------------------

def imgs(ids) -> np.ndarray:
    return np.stack([np.full((2, 2, 1), i, dtype=np.uint8) for i in ids])


def ids_of(images: np.ndarray) -> list[int]:
    return [int(x[0, 0, 0]) for x in images]


def test_replay_fifo_eviction() -> None:
    buf = ReplayBuffer(5, torch.Generator().manual_seed(0))
    buf.add(imgs([0, 1, 2]))
    buf.add(imgs([3, 4, 5, 6]))
    assert len(buf) == 5 and ids_of(buf.ordered()) == [2, 3, 4, 5, 6]
    buf.add(imgs(range(10, 17)))  # more than the capacity at once: the newest 5 stay
    assert ids_of(buf.ordered()) == [12, 13, 14, 15, 16]
    with pytest.raises(ValueError, match="cannot draw 6"):
        buf.sample(6)
    with pytest.raises(ValueError, match="uint8"):
        buf.add(np.zeros((1, 2, 2, 1), np.float32))


@pytest.mark.parametrize("make_gen", [lambda: torch.Generator().manual_seed(7), lambda: np.random.default_rng(7)])
def test_replay_draws_distinct_and_deterministic(make_gen) -> None:
    a, b = ReplayBuffer(50, make_gen()), ReplayBuffer(50, make_gen())
    for buf in (a, b):
        buf.add(imgs(range(40)))
    draws_a = [ids_of(a.sample(30)) for _ in range(3)]
    draws_b = [ids_of(b.sample(30)) for _ in range(3)]
    assert draws_a == draws_b
    assert all(len(set(d)) == 30 and set(d) <= set(range(40)) for d in draws_a)
    assert draws_a[0] != draws_a[1]


def test_replay_state_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    buf = ReplayBuffer(4, gen)
    buf.add(imgs(range(6)))
    state, rng_state = buf.state_dict(), gen.get_state()
    expected = ids_of(buf.sample(3))
    other = ReplayBuffer(4, torch.Generator().manual_seed(99))
    other.load_state_dict(state)
    other.generator.set_state(rng_state)
    assert ids_of(other.ordered()) == [2, 3, 4, 5] and ids_of(other.sample(3)) == expected


# --- distillation loss ------------------------------------------------------------------------

def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_selective_distillation_loss_by_hand() -> None:
    s = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    tl = np.array([[1.0, 1.5, 0.0], [-0.5, 0.0, 2.5]])
    E0, tau = 0.4 * math.log(3), 2.0
    ps, pt = _np_softmax(s), _np_softmax(tl)
    hs, ht = -(ps * np.log(ps)).sum(1), -(pt * np.log(pt)).sum(1)
    a, b = np.exp(E0 - hs), np.exp(E0 - ht)
    pst, ptt = _np_softmax(s / tau), _np_softmax(tl / tau)
    kl = (ptt * (np.log(ptt) - np.log(pst))).sum(1) * tau ** 2
    ce = -np.log(ps[[0, 1], tl.argmax(1)])  # pseudo-labels 1 and 2
    ent_term, kl_term, ce_term = (a * hs).mean(), (b * kl).mean(), (b * ce).mean()
    expected = 3 * ent_term + 3 * kl_term + 1 * ce_term

    student = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(tl, dtype=torch.float64, requires_grad=True)
    loss, parts = selective_distillation_loss(student, teacher, E0, alpha=3, beta=3, gamma=1, tau=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert parts["entropy"] == pytest.approx(ent_term) and parts["kl"] == pytest.approx(kl_term)
    assert parts["ce"] == pytest.approx(ce_term) and parts["loss"] == pytest.approx(expected)

    loss.backward()
    assert teacher.grad is None  # the teacher is a target only
    # a and b are constants: the gradient equals that of the same loss with the weights frozen
    ref = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ls = torch.log_softmax(ref, 1)
    lst = torch.log_softmax(ref / tau, 1)
    h = -(ls.exp() * ls).sum(1)
    ref_loss = (3 * (torch.tensor(a) * h).mean()
                + 3 * (torch.tensor(b) * (torch.tensor(ptt) * (torch.log(torch.tensor(ptt)) - lst)).sum(1) * tau ** 2).mean()
                + (torch.tensor(b) * -ls[[0, 1], [1, 2]]).mean())
    ref_loss.backward()
    torch.testing.assert_close(student.grad, ref.grad)
