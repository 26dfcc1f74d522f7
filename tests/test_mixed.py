"""A mixed fleet: groups of edges running different architectures, one student per architecture in the cloud."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cema_ray.algorithms.domain_bank import bank_entries
from cema_ray.errors import CemaError, ConfigError
from cema_ray.methods.base import METHODS
from cema_ray.methods.parts import MODEL, view

from batch_tables import COMPARED, batch_table
from test_bank import images, tiny  # the tiny conv+BN model and uint8 uploads the bank's tests use

HALVES = "edges.groups=[{name: small, fraction: 0.5}, {name: medium, fraction: 0.5, model: {name: cema_resnet_m, " \
         "checkpoint: %s}, stream: {corruptions: [fog]}}]"


@pytest.fixture(scope="session")
def medium_checkpoint(tmp_path_factory) -> str:
    """A random-init ResNet-14 (width 16) on Fashion-MNIST's shapes: a second edge architecture for mechanics."""
    from cema_ray.data.sources import DATA_SOURCES
    from cema_ray.models.checkpoint import save_checkpoint
    from cema_ray.models.factory import create_model

    info = DATA_SOURCES.get("fashion-mnist")
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("medium") / "edge_m.safetensors"
    save_checkpoint(create_model("cema_resnet_m", 10, 1, info.mean, info.std), path,
                    {"architecture": "cema_resnet_m", "num_classes": 10, "in_chans": 1, "mean": list(info.mean),
                     "std": list(info.std)})
    return str(path)


def mixed_cloud(lr_foundation: float = 2.5e-4):
    """cema-fleet over two architectures (indices 0 and 1) of the tiny model family, widths 4 and 8."""
    return METHODS.get("cema-fleet").make_cloud(tiny(6, 1), {0: tiny(4, 2), 1: tiny(8, 3)},
                                                {"chunk_size": 4, "lr_foundation": lr_foundation},
                                                torch.Generator().manual_seed(0))


def _forwards(cloud) -> list[int]:
    calls = [0]
    cloud.foundation.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_teacher_labels_each_chunk_once_and_every_architecture_learns_from_it() -> None:
    """Uploads of one edge teach both students; the foundation's forwards are those of a one-student cloud."""
    mixed, alone = mixed_cloud(), METHODS.get("cema-fleet").make_cloud(
        tiny(6, 1), tiny(4, 2), {"chunk_size": 4, "lr_foundation": 2.5e-4}, torch.Generator().manual_seed(0))
    counts = [_forwards(mixed), _forwards(alone)]
    for cloud in (mixed, alone):
        cloud.ingest(0, images(8, 1))
        assert cloud.on_edge_batch(0) == 2
    assert counts[0][0] == counts[1][0] == 4  # per chunk: the entropy step's forward and the labelling one
    assert [st.steps for st in mixed.students] == [2, 2]
    wire = mixed.export(0)
    small, medium = view(wire, MODEL, 0), view(wire, MODEL, 1)
    assert small and medium and set(wire) == {f"model.0.{k}" for k in small} | {f"model.1.{k}" for k in medium}
    assert all(np.array_equal(small[k], v) for k, v in alone.export(0).items())  # architecture 0 alone, the same
    assert {v.shape for v in small.values()} != {v.shape for v in medium.values()}  # widths 4 and 8


def test_a_mixed_cloud_resets_and_round_trips_every_student() -> None:
    a = mixed_cloud()
    a.ingest(1, images(4, 1))
    a.on_edge_batch(1)
    b = mixed_cloud()
    b.load_state_dict(a.state_dict())
    for c in (a, b):
        c.ingest(2, images(4, 3))
        c.on_edge_batch(2)
    wa, wb = a.export(2), b.export(2)
    assert set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)
    a.reset(1)
    assert [st.steps for st in a.students] == [0, 0]


def mixed_bank(model_of: dict[int, int] | None = {0: 0, 1: 1}):
    """cema-bank over the two tiny architectures; edge 0 runs architecture 0, edge 1 architecture 1."""
    return METHODS.get("cema-bank").make_cloud(tiny(6, 1), {0: tiny(4, 2), 1: tiny(8, 3)},
                                               {"chunk_size": 4, "bank_gate": False, "bank_sure_steps": 0},
                                               torch.Generator().manual_seed(0), model_of=model_of)


def test_a_bank_per_architecture_keys_each_edges_uploads_in_its_own_bank() -> None:
    """An edge's key routes its uploads in its own architecture's bank; the chunk is labelled once and the other
    architecture keys it with its own stem, so both banks grow an entry and both students learn from it."""
    cloud = mixed_bank()
    calls = _forwards(cloud)
    cloud.ingest(0, images(4, 1), key=np.zeros(8, np.float32))  # architecture 0: width 4, keys of 2 x 4
    assert [learner.queued() for learner in cloud.learners] == [4, 0]
    assert cloud.on_edge_batch(0) == 1 and calls[0] == 1  # one chunk, one teacher forward (cema-bank: no step)
    cloud.ingest(1, images(4, 2, lo=100, hi=140), key=np.full(16, 3.0, np.float32))  # architecture 1: 2 x 8
    assert [learner.queued() for learner in cloud.learners] == [0, 4]
    assert cloud.on_edge_batch(1) == 1 and calls[0] == 2
    assert [st.steps for st in cloud.students] == [2, 2]
    assert [len(learner.bank) for learner in cloud.learners] == [2, 2]  # each chunk its own domain, in both banks
    assert [[r.steps for r in learner.residuals] for learner in cloud.learners] == [[1, 1], [1, 1]]
    assert np.array_equal(cloud.learners[1].bank.keys[1], np.full(16, 3.0, np.float32))  # the edge's own key
    wire = cloud.export(1)
    for k, width in ((0, 4), (1, 8)):
        keys, entries, base, _ = bank_entries(view(wire, MODEL, k))
        assert keys.shape == (2, 2 * width) and len(entries) == 2 and base["1.weight"].shape == (width,)
    other = mixed_bank()
    other.load_state_dict(cloud.state_dict())
    for c in (cloud, other):
        c.ingest(1, images(4, 3, lo=100, hi=140), key=np.full(16, 3.0, np.float32))
        c.on_edge_batch(1)
    wa, wb = cloud.export(1), other.export(1)
    assert set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_mixed_bank_needs_every_edges_architecture() -> None:
    with pytest.raises(ConfigError, match="needs every edge's architecture"):
        mixed_bank(model_of=None)


@pytest.mark.parametrize("overrides,text", [
    (["method.name=cema-fleet", "edges.groups=[{fraction: 0.5, model: {name: cema_resnet_x}}]"],
     "edges.groups.0.model.name = 'cema_resnet_x': unknown model"),
    (["method.name=cema", "edges.groups=[{fraction: 0.5, model: {name: cema_resnet_m}}]"],
     "needs a method that trains a student per architecture"),
])
def test_a_bad_group_model_fails_at_load_in_one_line(make_run_config, overrides, text) -> None:
    with pytest.raises(ConfigError, match=text.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        make_run_config(*overrides)


def test_a_group_model_without_its_file_or_with_other_classes_fails_before_the_run(make_run_config, tmp_path,
                                                                                  tiny_checkpoints) -> None:
    from cema_ray.data.sources import DATA_SOURCES
    from cema_ray.models.checkpoint import save_checkpoint
    from cema_ray.models.factory import create_model
    from cema_ray.runtime.fleet import verify_models

    cfg = make_run_config("method.name=cema-fleet", HALVES % (tmp_path / "missing.safetensors"))
    with pytest.raises(CemaError, match=r"edges\.groups\.1\.model\.checkpoint = .*missing.safetensors: file not found"):
        verify_models(cfg)
    info = DATA_SOURCES.get("fashion-mnist")
    seven = tmp_path / "seven.safetensors"
    save_checkpoint(create_model("cema_resnet_m", 7, 1, info.mean, info.std), seven,
                    {"architecture": "cema_resnet_m", "num_classes": 7, "in_chans": 1, "mean": list(info.mean),
                     "std": list(info.std)})
    with pytest.raises(CemaError, match=r"edges\.groups\.1\.model: 'cema_resnet_m' has num_classes 7, "
                                        r"models\.foundation has 10"):
        verify_models(make_run_config("method.name=cema-fleet", HALVES % seven))


def test_a_mixed_fleet_runs_each_architecture_with_its_own_student(make_run_config, medium_checkpoint,
                                                                   tmp_path: Path) -> None:
    """Local: every sample once; each architecture's edges load publications of their own architecture's size,
    counted per architecture in the summary."""
    from cema_ray.results.report import render_markdown
    from cema_ray.runtime import run_experiment
    from cema_ray.runtime.fleet import edge_plans

    torch.set_num_threads(1)
    cfg = make_run_config("method.name=cema-fleet", "edges.count=4", "method.settings={upload_budget: 0.5}",
                          HALVES % medium_checkpoint)
    assert sorted(p.model for p in edge_plans(cfg)) == [0, 0, 1, 1]
    summary = run_experiment(cfg, tmp_path / "mixed")
    t = batch_table(tmp_path / "mixed")
    assert summary["samples"] == sum(t["samples"]) == 2 * 2 * 64 + 2 * 64  # the medium group: fog only
    per = summary["per_model"]
    assert set(per) == {"cema_resnet_s", "cema_resnet_m"} and all(p["edges"] == 2 for p in per.values())
    assert sum(p["samples"] for p in per.values()) == summary["samples"]
    assert all(p["publications_loaded"] > 0 for p in per.values())
    models = summary["edge_models"]
    sizes = {name: {b for e, b in zip(t["edge_id"], t["bytes_down"]) if b and models[e] == name} for name in per}
    assert len(sizes["cema_resnet_s"]) == len(sizes["cema_resnet_m"]) == 1  # one student's norm state each
    assert sizes["cema_resnet_m"] != sizes["cema_resnet_s"]  # ResNet-14 has more norm layers than ResNet-8
    text = render_markdown(summary)
    table = text[text.index("## Per edge architecture"):].split("\n\n")[1].splitlines()
    assert len(table) == 4 and len({row.count("|") for row in table}) == 1  # header cells = row cells


def test_a_mixed_fleet_runs_a_bank_per_architecture(make_run_config, medium_checkpoint, tmp_path: Path) -> None:
    """cema-bank on two architectures, locally: every sample once, and each architecture's edges load their own
    bank (entries keyed in their own stem's space)."""
    from cema_ray.runtime import run_experiment

    torch.set_num_threads(1)
    cfg = make_run_config("method.name=cema-bank", "edges.count=4", "method.settings={upload_budget: 0.5}",
                          HALVES % medium_checkpoint)
    summary = run_experiment(cfg, tmp_path / "bank")
    t = batch_table(tmp_path / "bank")
    assert summary["samples"] == sum(t["samples"]) == 2 * 2 * 64 + 2 * 64
    assert all(p["publications_loaded"] > 0 for p in summary["per_model"].values())


def test_bn_runs_a_mixed_fleet_without_a_cloud(make_run_config, medium_checkpoint, tmp_path: Path) -> None:
    from cema_ray.runtime import run_experiment

    summary = run_experiment(make_run_config("method.name=bn", "edges.count=2", HALVES % medium_checkpoint),
                             tmp_path / "bn")
    assert summary["uploaded"] == 0 and set(summary["per_model"]) == {"cema_resnet_s", "cema_resnet_m"}


@pytest.mark.ray
def test_ray_sync_reproduces_local_on_a_mixed_fleet(ray_session, make_run_config, medium_checkpoint,
                                                    tmp_path: Path) -> None:
    """Hosts of 3 edges: one host runs both architectures, the other one; cema-bank, so the edges' keys travel
    with their uploads and each architecture's bank travels in its part of the publication."""
    from cema_ray.runtime import run_experiment

    torch.set_num_threads(1)
    common = ("method.name=cema-bank", "edges.count=5", "edges.per_host=3", "stream.samples_per_domain=32",
              HALVES % medium_checkpoint)
    local = run_experiment(make_run_config("runtime=local", *common), tmp_path / "local")
    remote = run_experiment(make_run_config("runtime=ray", *common), tmp_path / "ray")
    a, b = batch_table(tmp_path / "local"), batch_table(tmp_path / "ray")
    for col in COMPARED:
        assert a[col] == b[col], col
    assert local["per_model"] == remote["per_model"] and max(a["weight_version"]) > 0


def test_the_shipped_mixed_fleet_has_two_architectures_with_verified_checkpoints() -> None:
    from cema_ray.config import load_config
    from cema_ray.runtime.fleet import edge_model_names, edge_plans, verify_models

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mixed_fleet.yaml", check_paths=False)
    verify_models(cfg)  # both edge cards' sha256, and the same classes and channels as the foundation
    assert edge_model_names(cfg) == ["cema_resnet_s", "cema_resnet_m"]
    assert sorted({p.profile.group: p.model for p in edge_plans(cfg)}.values()) == [0, 1, 1]


def test_bench_fleet_keeps_each_groups_architecture_and_puts_the_foundation_everywhere_for_its_ceiling(
        tmp_path: Path) -> None:
    """`bench fleet configs/mixed_fleet.yaml --orders groups`: bn and the methods run each group on its own model;
    foundation-bn runs every edge, a mixed group's included, on the foundation."""
    from cema_ray.bench.fleet import plan_fleet_runs
    from cema_ray.runtime.fleet import edge_model_specs

    config = Path(__file__).resolve().parents[1] / "configs" / "mixed_fleet.yaml"
    plan, _ = plan_fleet_runs(config, ["data.root=null"], [8], ["groups"], [0.3], ["cema-fleet"], tmp_path)
    specs = {row: [m["name"] for _, m in edge_model_specs(cfg)] for _, row, cfg in plan}
    assert specs == {"bn": ["cema_resnet_s", "cema_resnet_m"], "cema-fleet": ["cema_resnet_s", "cema_resnet_m"],
                     "foundation-bn": ["cema_resnet_l"]}


def test_a_timm_model_can_be_a_groups_architecture(make_run_config, tmp_path: Path) -> None:
    """A group on a timm model (random weights: no file given), beside the tiny ResNet-8: its own student's norm
    layers reach its edges, sized as its own (mechanics only)."""
    from cema_ray.runtime import run_experiment
    from cema_ray.runtime.fleet import verify_models

    torch.set_num_threads(1)
    cfg = make_run_config("method.name=cema-fleet", "edges.count=2", "edges.per_host=2", "stream.corruptions=[fog]",
                          "edges.groups=[{name: t, fraction: 0.5, model: {name: 'timm:mobilenetv3_small_050'}}]")
    verify_models(cfg)
    summary = run_experiment(cfg, tmp_path / "timm")
    per = summary["per_model"]
    assert set(per) == {"cema_resnet_s", "timm:mobilenetv3_small_050"} and summary["samples"] == 2 * 64
    assert per["timm:mobilenetv3_small_050"]["bytes_down"] > per["cema_resnet_s"]["bytes_down"] > 0
