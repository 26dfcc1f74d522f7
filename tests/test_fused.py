"""Many virtual edges, one model and few forwards: grouped TBR, fused rounds == one forward per edge, and
what a virtual edge keeps (its state, never a model copy)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cema_ray.methods.host_model import HostModel
from cema_ray.models.factory import create_model
from cema_ray.models.preprocess import to_input
from cema_ray.models.tbr import grouped_norm, set_norm_stats_mode
from cema_ray.runtime import run_experiment

from batch_tables import COMPARED, batch_table

MIXED_SIZES = ("edges.count=6", "stream.samples_per_domain=40",
               "edges.groups=[{name: b16, fraction: 0.5, stream: {batch_size: 16}}, "
               "{name: b24, fraction: 0.5, stream: {batch_size: 24}}]")


def _tbr_model(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("cema_resnet_s", 10, 1, (0.5,), (0.25,)).eval()
    set_norm_stats_mode(model, mode, alpha=0.3)
    return model


def _real_batches(make_run_config, count: int, size: int) -> list[torch.Tensor]:
    """Corrupted Fashion-MNIST batches (fog and noise): real images are where reduction orders round apart."""
    from cema_ray.runtime.fleet import DataContext, edge_plans

    cfg = make_run_config(f"edges.count={count}", f"stream.batch_size={size}")
    data = DataContext(cfg["data"])
    return [to_input(data.stream(p).batch(k).images) for p in edge_plans(cfg) for k in (0, 2)]


@pytest.mark.parametrize("mode", ["batch", "mix", "running"])
def test_grouped_tbr_gives_each_batch_what_its_own_forward_gives(make_run_config, mode):
    """Bit for bit: G stacked batches, each normalised by its own statistics, equal G separate forwards (the
    convolutions hand channels-last activations to the norm layers: the regrouping must keep that layout)."""
    torch.set_num_threads(1)
    model = _tbr_model(mode)
    xs = _real_batches(make_run_config, 3, 16)
    with torch.inference_mode():
        alone = torch.cat([model(x) for x in xs])
        with grouped_norm(model, len(xs)):
            stacked = model(torch.cat(xs))
        pooled = model(torch.cat(xs))  # one batch's statistics for all: what grouping must avoid
    assert torch.equal(alone, stacked)
    if mode != "running":  # TBR in eval normalises with running statistics: only its rounding sees the batch
        assert not torch.allclose(alone, pooled)


def test_grouped_tbr_refuses_batches_that_do_not_split_evenly():
    model = _tbr_model("batch")
    with torch.inference_mode(), grouped_norm(model, 3), pytest.raises(ValueError, match="equal batches"):
        model(torch.rand(8, 1, 28, 28))


@pytest.mark.parametrize("method,extra,fuses", [
    ("bn", (), True), ("cema", ("method.settings={e_max_factor: 0.97}",), True),
    ("cema-edgebn", ("method.settings={e_max_factor: 0.97}",), True), ("cema-fleet", (), True),
    ("cema", ("method.student_scope=per_edge",), False)])
def test_fused_rounds_equal_one_forward_per_edge(make_run_config, tmp_path, monkeypatch, method, extra, fuses):
    """Sync, mixed batch sizes (16 and 24, and the short last batch of each domain): same records either way,
    and the fused run really stacked batches where the edges hold one state (a student per edge: never)."""
    torch.set_num_threads(1)
    stacked = []
    real = HostModel.infer

    def counting(self, state, x, groups=1):
        stacked.append(groups)
        return real(self, state, x, groups)

    monkeypatch.setattr(HostModel, "infer", counting)
    common = (f"method.name={method}", *MIXED_SIZES, *extra)
    run_experiment(make_run_config("edges.fuse_samples=0", *common), tmp_path / "one")
    alone = list(stacked)
    stacked.clear()
    run_experiment(make_run_config("edges.fuse_samples=64", *common), tmp_path / "fused")
    a, b = batch_table(tmp_path / "one"), batch_table(tmp_path / "fused")
    for col in (*COMPARED, "e_max", "mean_entropy"):
        assert np.array_equal(np.asarray(a[col]), np.asarray(b[col]), equal_nan=col in ("e_max", "mean_entropy")), col
    assert set(alone) == {1} and len(alone) == len(a["edge_id"])
    if fuses:  # edges of one batch size ran together, in stacks of at most 64 samples
        assert max(stacked) >= 3 and len(stacked) < len(alone)
        assert 4 in stacked and max(stacked) <= 4  # 4 x 16 samples; 24-sample batches go 2 at a time
    else:
        assert set(stacked) == {1}


def test_virtual_edges_share_one_model_and_keep_kilobytes(make_run_config):
    """Forward-only edges borrow their host's model; a fresh edge's snapshot is its filter state, and edges
    that load one publication hold one object."""
    from cema_ray.runtime.assembly import build_edges, load_edge_model
    from cema_ray.runtime.fleet import DataContext, edge_plans

    cfg = make_run_config("method.name=cema-fleet", "edges.count=40")
    edges = build_edges(cfg, DataContext(cfg["data"]), [load_edge_model(cfg)], edge_plans(cfg))
    assert len({id(e.policy.host) for e in edges}) == 1
    assert len({id(e.policy.filter) for e in edges}) == 40  # filters are each edge's own
    assert max(len(pickle.dumps(e.snapshot())) for e in edges) < 4096
    published = {k: v.detach().numpy() + 0.5 for k, v in edges[0].policy.model.state_dict().items()
                 if k.endswith(("bn1.weight", "bn1.bias"))}
    for e in edges:
        e.apply_update(published, 1)
    assert len({id(e.policy.state) for e in edges}) == 1
    shared = pickle.dumps([e.snapshot() for e in edges])
    assert len(shared) < 40 * 4096  # pickled once for the host, not once per edge


def test_a_fresh_edge_and_a_forked_edge_predict_alike(make_run_config):
    """`fork` after the first edge's batches still gives a new edge (deployed weights, fresh filters)."""
    from cema_ray.runtime.assembly import build_edges, load_edge_model
    from cema_ray.runtime.fleet import DataContext, edge_plans

    torch.set_num_threads(1)
    cfg = make_run_config("method.name=cema", "edges.count=2")
    data = DataContext(cfg["data"])
    first, second = build_edges(cfg, data, [load_edge_model(cfg)], edge_plans(cfg))
    for _ in range(2):
        first.step(0)
    twin = first.policy.fork()
    batch = second.stream.batch(0)
    expect = second.policy.process(to_input(batch.images))
    got = twin.process(to_input(batch.images))
    assert np.array_equal(expect.predictions, got.predictions) and np.array_equal(expect.upload, got.upload)
