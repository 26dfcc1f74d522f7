"""Edge streams: purity of batch(k), fleet-unique ids, protocols, label skew, validation."""
import numpy as np
import pytest
import torch

from cema_ray.data.sources import LabeledImages
from cema_ray.data.streams import GRADUAL_SEVERITIES, EdgeStream, StreamSpec, dirichlet_order
from cema_ray.errors import ConfigError

torch.set_num_threads(1)

N_CLASSES = 5


def source(n: int = 60, size: int = 8) -> LabeledImages:
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # pixel (0, 0, red) identifies the sample on clean domains
    return LabeledImages(images, np.arange(n) % N_CLASSES, [f"c{i}" for i in range(N_CLASSES)])


def spec(**kw) -> StreamSpec:
    base = dict(corruptions=("gaussian_noise", "clean", "contrast"), severity=3, batch_size=7,
                samples_per_domain=20, seed=11)
    base.update(kw)
    return StreamSpec(**base)


def all_batches(stream: EdgeStream):
    return [stream.batch(k) for k in range(len(stream))]


def test_batch_k_is_pure_and_order_independent():
    a, b = EdgeStream(source(), spec(), edge_id=2), EdgeStream(source(), spec(), edge_id=2)
    forward = all_batches(a)
    backward = [b.batch(k) for k in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward):
        assert x.images.tobytes() == y.images.tobytes()
        assert x.labels.tolist() == y.labels.tolist() and x.ids.tolist() == y.ids.tolist()
        assert (x.domain, x.reset, x.index) == (y.domain, y.reset, y.index)
    assert a.batch(1).images.tobytes() == forward[1].images.tobytes()  # repeated calls too


def test_seed_and_edge_change_the_stream():
    base = EdgeStream(source(), spec(), edge_id=0).batch(0).images
    assert EdgeStream(source(), spec(), edge_id=1).batch(0).images.tobytes() != base.tobytes()
    assert EdgeStream(source(), spec(seed=12), edge_id=0).batch(0).images.tobytes() != base.tobytes()


def test_ids_unique_across_edges_and_cover_each_offset_once():
    stride = 1000
    streams = [EdgeStream(source(), spec(), edge_id=e, id_stride=stride) for e in range(3)]
    ids = np.concatenate([b.ids for s in streams for b in all_batches(s)])
    assert len(ids) == len(np.unique(ids)) == 3 * 60
    for e, s in enumerate(streams):
        offsets = np.concatenate([b.ids for b in all_batches(s)]) - e * stride
        assert sorted(offsets.tolist()) == list(range(s.total_samples))
        assert all(b.ids.dtype == np.int64 and b.labels.dtype == np.int64 for b in all_batches(s))


def test_continual_domain_order_batches_and_no_mixing():
    s = EdgeStream(source(), spec(), edge_id=0)
    assert s.domains() == ["gaussian_noise-3", "clean", "contrast-3"]
    batches = all_batches(s)
    assert len(s) == 3 * 3  # 20 samples per domain in batches of 7: 7, 7, 6
    assert [b.domain for b in batches] == ["gaussian_noise-3"] * 3 + ["clean"] * 3 + ["contrast-3"] * 3
    assert [len(b.labels) for b in batches] == [7, 7, 6] * 3
    assert not any(b.reset for b in batches)
    assert all(b.images.shape[1:] == (8, 8, 3) and b.images.dtype == np.uint8 for b in batches)


def test_clean_domain_is_the_source_and_corruptions_change_it():
    src = source()
    s = EdgeStream(src, spec(), edge_id=0)
    for b in all_batches(s):
        positions = b.images[:, 0, 0, 0]  # valid only for clean batches
        if b.domain == "clean":
            np.testing.assert_array_equal(b.images, src.images[positions])
            np.testing.assert_array_equal(b.labels, src.labels[positions])
    chosen = np.concatenate([b.images[:, 0, 0, 0] for b in all_batches(s) if b.domain == "clean"])
    assert len(np.unique(chosen)) == 20  # without replacement
    contrast = [b for b in all_batches(s) if b.domain == "contrast-3"][0]
    assert contrast.images.std() < src.images.std() * 0.6  # contrast 0.4 applied


def test_reset_protocol_flags_first_batch_of_each_domain():
    batches = all_batches(EdgeStream(source(), spec(protocol="reset"), edge_id=0))
    assert [b.reset for b in batches] == [True, False, False] * 3


def test_gradual_severity_sequence():
    s = EdgeStream(source(), spec(protocol="gradual", corruptions=("fog", "clean"), samples_per_domain=7),
                   edge_id=0)
    assert s.domains() == [f"fog-{v}" for v in GRADUAL_SEVERITIES] + ["clean"]
    assert GRADUAL_SEVERITIES == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert [b.domain for b in all_batches(s)] == s.domains()  # one batch of 7 per domain


def test_mixed_pools_all_domains_and_shuffles():
    s = EdgeStream(source(), spec(protocol="mixed", batch_size=10), edge_id=0)
    batches = all_batches(s)
    assert len(s) == 6 and all(b.domain == "mixed" for b in batches)
    per_sample = [d for k in range(len(s)) for d in s.sample_domains(k)]
    assert {d: per_sample.count(d) for d in set(per_sample)} == {"gaussian_noise-3": 20, "clean": 20,
                                                                   "contrast-3": 20}
    assert sum(len(set(s.sample_domains(k))) > 1 for k in range(len(s))) >= 4  # really interleaved


def class_entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_label_shift_batches_are_class_skewed():
    kw = dict(corruptions=("clean",), samples_per_domain=200, batch_size=20, dirichlet_alpha=0.1)
    src = source(400)
    skewed = all_batches(EdgeStream(src, spec(protocol="label_shift", **kw), edge_id=0))
    iid = all_batches(EdgeStream(src, spec(protocol="continual", **kw), edge_id=0))
    h_skew = np.mean([class_entropy(b.labels) for b in skewed])
    h_iid = np.mean([class_entropy(b.labels) for b in iid])
    assert h_iid > 1.3 and h_skew < 0.6 * h_iid, (h_skew, h_iid)
    assert sorted(np.concatenate([b.labels for b in skewed]).tolist()) == \
        sorted(np.concatenate([b.labels for b in iid]).tolist())  # same selection, only reordered


def test_dirichlet_order_is_a_permutation_and_seeded():
    labels = np.repeat(np.arange(4), 25)
    a = dirichlet_order(labels, 0.1, np.random.default_rng(3))
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() == dirichlet_order(labels, 0.1, np.random.default_rng(3)).tolist()
    assert a.tolist() != dirichlet_order(labels, 0.1, np.random.default_rng(4)).tolist()


def test_more_samples_than_source_repeats_whole_passes():
    s = EdgeStream(source(10), spec(corruptions=("clean",), samples_per_domain=25, batch_size=5), edge_id=0)
    seen = np.concatenate([b.images[:, 0, 0, 0] for b in all_batches(s)])
    counts = np.bincount(seen, minlength=10)
    assert counts.sum() == 25 and set(counts.tolist()) == {2, 3}


def test_corrupted_source_is_used_as_is_and_loaded_once_per_domain():
    calls = []

    def corrupted(corruption: str, severity: int) -> LabeledImages:
        calls.append((corruption, severity))
        marker = 100 + 10 * ["fog", "snow"].index(corruption) + severity
        return LabeledImages(np.full((30, 4, 4, 3), marker, np.uint8), np.arange(30) % 3, ["a", "b", "c"])

    s = EdgeStream(None, spec(corruptions=("fog", "snow"), severity=2), edge_id=1, corrupted_source=corrupted)
    batches = all_batches(s)
    assert sorted(calls) == [("fog", 2), ("snow", 2)]
    assert {int(np.unique(b.images)[0]) for b in batches if b.domain == "fog-2"} == {102}
    assert {int(np.unique(b.images)[0]) for b in batches if b.domain == "snow-2"} == {112}
    with pytest.raises(ConfigError, match="clean source"):
        EdgeStream(None, spec(corruptions=("clean",)), edge_id=0, corrupted_source=corrupted)


@pytest.mark.parametrize("kw,field", [
    (dict(protocol="shuffled"), "stream.protocol"),
    (dict(batch_size=0), "stream.batch_size"),
    (dict(severity=6), "stream.severity"),
    (dict(severity=0), "stream.severity"),
    (dict(corruptions=("fog", "rain")), "stream.corruptions"),
    (dict(corruptions=()), "stream.corruptions"),
    (dict(samples_per_domain=0), "stream.samples_per_domain"),
    (dict(dirichlet_alpha=0.0), "stream.dirichlet_alpha"),
    (dict(seed=-1), "stream.seed"),
])
def test_spec_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        spec(**kw)


def test_stream_argument_errors():
    with pytest.raises(ConfigError, match="id_stride"):
        EdgeStream(source(), spec(), edge_id=0, id_stride=10)
    with pytest.raises(ConfigError, match="edge_id"):
        EdgeStream(source(), spec(), edge_id=-1)
    s = EdgeStream(source(), spec(), edge_id=0)
    with pytest.raises(IndexError, match="9 batches"):
        s.batch(9)
    assert StreamSpec(corruptions=["fog"]).corruptions == ("fog",)


@pytest.mark.parametrize("protocol", ["continual", "reset", "mixed", "gradual", "label_shift"])
@pytest.mark.parametrize("per,bs", [(7, 3), (12, 4), (5, 10)])
def test_stream_length_counts_the_batches_without_building_the_stream(protocol, per, bs):
    from cema_ray.data.streams import stream_length

    s = spec(protocol=protocol, corruptions=("fog", "clean"), samples_per_domain=per, batch_size=bs)
    assert stream_length(s) == len(EdgeStream(source(), s, edge_id=3))
