"""`cema-ray bench`: tiny random checkpoints, real Fashion-MNIST, output files and their consistency."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cema_ray import bench
from cema_ray.cli import main as cli_main
from cema_ray.data.corruptions import CORRUPTIONS
from cema_ray.data.sources import DATA_SOURCES
from cema_ray.errors import ConfigError
from cema_ray.models.checkpoint import save_checkpoint
from cema_ray.models.factory import create_model

torch.set_num_threads(1)
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST is not installed")


def _checkpoint(path: Path, seed: int) -> None:
    info = DATA_SOURCES.get("fashion-mnist")
    torch.manual_seed(seed)
    model = create_model("cema_resnet_s", 10, 1, info.mean, info.std)
    save_checkpoint(model, path, {"architecture": "cema_resnet_s", "num_classes": 10, "in_chans": 1,
                                  "mean": list(info.mean), "std": list(info.std)})


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run config for the ray runtime with groups and 4 edges: bench must turn it into one local edge."""
    root = tmp_path_factory.mktemp("bench")
    _checkpoint(root / "edge.safetensors", 0)
    _checkpoint(root / "foundation.safetensors", 1)
    cfg = {
        "name": "tiny", "runtime": "ray", "seed": 0, "data": {"source": "fashion-mnist", "root": str(FMNIST)},
        "models": {"edge": {"name": "cema_resnet_s", "checkpoint": str(root / "edge.safetensors")},
                   "foundation": {"name": "cema_resnet_s", "checkpoint": str(root / "foundation.safetensors")}},
        "stream": {"batch_size": 32, "samples_per_domain": 500},
        "edges": {"count": 4, "per_host": 2, "hosts": 2, "groups": [{"fraction": 0.5, "stream": {"batch_size": 16}}]},
        "method": {"name": "cema", "settings": {"d_margin": 0.4}},
        "output": {"progress": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------- bench models
def test_models_table_covers_clean_and_all_corruptions(run_yaml: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models"
    assert bench.main(["models", str(run_yaml), "--samples", "40", "--out", str(out)]) == 0
    result = json.loads((out / "models.json").read_text())
    assert result["domains"] == ["clean", *CORRUPTIONS] and result["samples"] == 40
    for role in ("edge", "foundation"):
        acc = result["accuracy"][role]
        assert set(acc) == set(result["domains"])
        # 40 samples: every accuracy is a multiple of 1/40 in [0, 1]
        assert all(0 <= a <= 1 and abs(a * 40 - round(a * 40)) < 1e-9 for a in acc.values())
        expected_mean = np.mean([acc[c] for c in CORRUPTIONS])
        assert result["mean_corruption_accuracy"][role] == pytest.approx(expected_mean)
    # different random weights: the two columns cannot be identical everywhere
    assert result["accuracy"]["edge"] != result["accuracy"]["foundation"]
    md = (out / "models.md").read_text()
    assert md.count("\n| ") == 2 + 16 + 1  # header, rule, 16 domains, mean
    assert f"cema-ray bench models {run_yaml} --samples 40 --out {out}" in md
    assert "| **mean (15 corruptions)** |" in capsys.readouterr().out


def test_models_is_deterministic_and_matches_a_direct_evaluation(run_yaml: Path) -> None:
    """Clean accuracy equals a hand-rolled eval of the same seeded subset; corrupted ones repeat exactly."""
    from cema_ray.models.checkpoint import load_checkpoint
    from cema_ray.models.preprocess import to_input

    cfg = bench.bench_config(run_yaml, [])
    a = bench.evaluate_models(cfg, ["edge"], 5, 30)
    b = bench.evaluate_models(cfg, ["edge"], 5, 30)
    assert a.accuracy == b.accuracy
    clean = DATA_SOURCES.get("fashion-mnist").loader(FMNIST, "test")
    idx = bench.subset_indices(len(clean), 30, cfg["seed"])
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    model, _ = load_checkpoint(cfg["models"]["edge"]["checkpoint"])
    with torch.inference_mode():
        pred = model.eval()(to_input(clean.images[idx])).argmax(1).numpy()
    assert a.accuracy["edge"]["clean"] == pytest.approx(float((pred == clean.labels[idx]).mean()))


def test_subset_indices() -> None:
    assert bench.subset_indices(5, None, 0).tolist() == [0, 1, 2, 3, 4]
    assert bench.subset_indices(5, 9, 0).tolist() == [0, 1, 2, 3, 4]
    s = bench.subset_indices(100, 10, 3)
    assert s.tolist() == sorted(set(s.tolist())) and len(s) == 10 and s.max() < 100
    assert s.tolist() == bench.subset_indices(100, 10, 3).tolist()
    assert s.tolist() != bench.subset_indices(100, 10, 4).tolist()


# ---------------------------------------------------------------------------------- bench methods
def cells(line: str) -> list[str]:
    """The cells of a Markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.ray
def test_methods_quick_table(run_yaml: Path, tmp_path: Path, capsys, ray_session) -> None:
    """Fanned out as Ray tasks (the default); a serial rerun of one row gives the same numbers."""
    out = tmp_path / "methods"
    argv = ["methods", str(run_yaml), "--quick", "--methods", "source,upload-all,bn", "--protocols",
            "continual,reset", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert [(r["protocol"], r["method"]) for r in rows] == [
        (p, m) for p in ("continual", "reset") for m in ("source", "upload-all", "bn")]
    quick_samples = 4 * 64  # --quick: 4 corruptions x 64 samples, on ONE edge (the config has 4)
    for r in rows:
        assert r["status"] == "ok" and r["error"] == ""
        assert r["samples"] == quick_samples and 0 <= r["accuracy"] <= 1
        summary = json.loads((Path(r["out_dir"]) / "summary.json").read_text())
        assert summary["num_edges"] == 1 and summary["runtime"] == "local" and summary["method"] == r["method"]
        assert summary["accuracy"] == r["accuracy"] and summary["uploaded"] == r["uploaded"]
        assert Path(r["out_dir"]) == out / r["protocol"] / r["method"]
        assert not (Path(r["out_dir"]) / "report.md").exists()  # output.report=false
        if r["method"] in ("source", "bn"):
            assert r["uploaded"] == 0 and r["upload_fraction"] == 0 and r["bytes_up"] == 0
        else:
            assert r["uploaded"] == quick_samples and r["upload_fraction"] == 1.0
            assert r["bytes_up"] >= quick_samples * 28 * 28  # uint8 images at least
    by = {(r["protocol"], r["method"]): r for r in rows}
    # source never adapts: the protocol cannot change its predictions
    assert by["continual", "source"]["accuracy"] == by["reset", "source"]["accuracy"]
    with open(out / "methods.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    md = (out / "methods.md").read_text()
    assert md.count("\n| continual |") == 3 and md.count("\n| reset |") == 3
    assert "cema-ray bench " + " ".join(argv) in md
    assert "| reset | upload-all |" in capsys.readouterr().out
    # per-domain tables: one per protocol, a row per corruption, the values of each run's own summary
    assert md.count("accuracy (%) per domain") == 2 and "| domain | source | upload-all | bn |" in md
    per = json.loads((out / "reset" / "bn" / "summary.json").read_text())["per_domain"]
    first = next(iter(per))
    reset_part = md[md.index("reset: accuracy (%) per domain"):]
    row = next(line for line in reset_part.splitlines() if line.startswith(f"| {first} |"))
    assert cells(row)[3] == f"{100 * per[first]['accuracy']:.2f}"  # bn is the 3rd method
    assert "as Ray tasks" in json.loads((out / "methods.json").read_text())["executed"]
    agg = {(a["protocol"], a["method"]): a for a in json.loads((out / "methods.json").read_text())["aggregates"]}
    assert agg["reset", "bn"]["accuracy_mean"] == by["reset", "bn"]["accuracy"] and agg["reset", "bn"]["seeds"] == [0]
    serial = tmp_path / "serial"
    assert bench.main(["methods", str(run_yaml), "--quick", "--methods", "bn,upload-all", "--protocols", "reset",
                       "--serial", "--out", str(serial)]) == 0
    again = {r["method"]: r for r in json.loads((serial / "methods.json").read_text())["rows"]}
    for m in ("bn", "upload-all"):
        assert again[m]["accuracy"] == by["reset", m]["accuracy"] and again[m]["uploaded"] == by["reset", m]["uploaded"]


def test_methods_reports_a_failed_run(run_yaml: Path, tmp_path: Path, monkeypatch) -> None:
    import cema_ray.runtime

    real = cema_ray.runtime.run_experiment

    def flaky(cfg, out):
        if cfg["method"]["name"] == "bn":
            raise RuntimeError("boom in bn")
        return real(cfg, out)

    monkeypatch.setattr(cema_ray.runtime, "run_experiment", flaky)
    out = tmp_path / "m"
    argv = ["methods", str(run_yaml), "--quick", "--methods", "bn,source", "--protocols", "continual", "--serial",
            "--override", "stream.samples_per_domain=32", "--out", str(out)]
    assert bench.main(argv) == 1
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("bn", "failed"), ("source", "ok")]
    assert rows[0]["error"] == "RuntimeError: boom in bn" and rows[0]["accuracy"] is None
    assert "boom in bn" in (out / "continual" / "bn" / "error.txt").read_text()
    assert "failed: RuntimeError: boom in bn" in (out / "methods.md").read_text()
    assert rows[1]["samples"] == 4 * 32  # user overrides win over --quick's


def test_bench_config_drops_settings_the_method_lacks(run_yaml: Path) -> None:
    cema = bench.bench_config(run_yaml, [], ["method.name=cema"])
    assert cema["method"]["settings"]["d_margin"] == 0.4
    source = bench.bench_config(run_yaml, [], ["method.name=source", "edges.count=1", "edges.hosts=null"])
    assert "d_margin" not in source["method"]["settings"]
    assert source["edges"]["count"] == 1


# -------------------------------------------------------------------------------------- bad args
@pytest.mark.parametrize("argv, text", [
    (["methods", "{cfg}", "--methods", "cema,nope"], "unknown method 'nope'"),
    (["methods", "{cfg}", "--protocols", "continual,sideways"], "unknown protocol 'sideways'"),
    (["methods", "{cfg}", "--methods", "cema,cema"], "given twice"),
    (["methods", "{cfg}", "--override", "stream.severity=9"], "stream.severity"),
    (["models", "{cfg}", "--severity", "6"], "--severity = 6"),
    (["models", "{cfg}", "--samples", "0"], "--samples = 0"),
    (["models", "{cfg}", "--roles", "edge,teacher"], "unknown role 'teacher'"),
])
def test_bad_arguments_raise_config_errors(run_yaml: Path, tmp_path: Path, argv: list[str], text: str) -> None:
    argv = [a.replace("{cfg}", str(run_yaml)) for a in argv] + ["--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=re.escape(text)):
        bench.main(argv)
    assert not (tmp_path / "o").exists()  # nothing ran


def test_cli_dispatch_and_exit_codes(run_yaml: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["bench", "methods", str(run_yaml), "--methods", "tent,bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "frobnicate"])
    assert info.value.code == 2
    missing = yaml.safe_load(run_yaml.read_text())
    missing["models"]["foundation"]["checkpoint"] = str(tmp_path / "absent.safetensors")
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(missing))
    assert cli_main(["bench", "models", str(path), "--samples", "8", "--out", str(tmp_path / "o")]) == 1
    assert "absent.safetensors" in capsys.readouterr().err
    # --roles edge skips the missing foundation
    assert cli_main(["bench", "models", str(path), "--samples", "8", "--roles", "edge",
                     "--out", str(tmp_path / "o")]) == 0


# ------------------------------------------------------------------------------------ bench configs
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name, source, ckpt", [("bench_fmnist", "fashion-mnist", "fashion-mnist"),
                                                ("bench_cifar10", "cifar10-folder", "cifar10")])
def test_bench_configs_follow_the_standard_protocol(name: str, source: str, ckpt: str) -> None:
    from cema_ray.config import load_config

    cfg = load_config(CONFIGS / f"{name}.yaml", check_paths=False)
    assert cfg["stream"]["corruptions"] == list(CORRUPTIONS) and cfg["stream"]["severity"] == 5
    assert cfg["stream"]["batch_size"] == 64 and cfg["runtime"] == "local" and cfg["data"]["source"] == source
    for role in ("edge", "foundation"):
        assert cfg["models"][role]["checkpoint"] == f"checkpoints/{ckpt}/{role}.safetensors"


def test_default_plan_is_every_method_on_one_local_edge(tmp_path: Path) -> None:
    """The default table of bench_fmnist: 2 protocols x 10 methods, all valid configs, one edge each."""
    plan = bench.plan_method_runs(CONFIGS / "bench_fmnist.yaml", [], bench.DEFAULT_METHODS,
                                  bench.DEFAULT_PROTOCOLS, tmp_path)
    n = 2 * len(bench.DEFAULT_METHODS)
    assert len(plan) == n and len({(p, m) for p, m, _ in plan}) == n
    foundation = plan[0][2]["models"]["foundation"]
    for protocol, method, cfg in plan:
        assert cfg["method"]["name"] == bench.REFERENCES.get(method, method) and cfg["stream"]["protocol"] == protocol
        # a reference runs the foundation's checkpoint in the edge's place; every other row the edge's own
        assert (cfg["models"]["edge"] == foundation) == (method in bench.REFERENCES)
        assert cfg["edges"]["count"] == 1 and cfg["edges"]["groups"] == [] and cfg["runtime"] == "local"
        assert cfg["output"]["dir"] == str(tmp_path / protocol / method) and cfg["output"]["report"] is False


@pytest.mark.ray
def test_scale_measures_ray_and_local_side_by_side(run_yaml: Path, tmp_path: Path, ray_session) -> None:
    out = tmp_path / "scale"
    code = bench.main(["scale", str(run_yaml), "--edges", "2", "--hosts", "2", "--modes", "sync",
                       "--local-up-to", "2", "--override", "stream.samples_per_domain=32", "--limit-seconds", "0.05",
                       "--override", "stream.corruptions=[gaussian_noise,fog,snow]", "--limit-batches", "32,128",
                       "--override", "method.name=upload-all", "--override", "method.settings={}",
                       "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "scale.json").read_text())
    assert [(r["runtime"], r["edges"]) for r in rows] == [("ray", 2), ("local", 2)]
    ray_row, local_row = rows
    assert ray_row["hosts"] == 2 and ray_row["samples"] == local_row["samples"] > 0
    assert ray_row["accuracy"] == local_row["accuracy"]  # same math in both runtimes
    assert ray_row["workers"] >= 3 and ray_row["worker_uss_mb"] > 0  # 2 hosts + the cloud were measured
    assert "Ray/local" in (out / "scale.md").read_text()
    assert all(r["edge_samples_per_s"] is None or r["edge_samples_per_s"] > 0 for r in rows)
    for r in rows:  # the forward limit, measured on the cores the run had, bounds the edges' pace
        assert r["forward_limit_samples_per_s"] >= r["forward_one_thread"]["samples_per_s"] > 0
        assert r["limit_ratio"] == pytest.approx(r["edge_samples_per_s"] / r["forward_limit_samples_per_s"])
        assert 0 <= r["published_fraction"] <= 1
    assert ray_row["forward_cores"] == 2 and ray_row["published_fraction"] > 0  # upload-all publishes every round
    # the cloud's load: ms per step, the share of the wall time it stepped, its sync phase's own step rate
    assert ray_row["shards"] == 1 and ray_row["cloud_ms_per_step"] > 0 and 0 < ray_row["cloud_busy"] <= 1
    assert ray_row["cloud_phase_steps_per_s"] > ray_row["cloud_steps_per_s"]  # the phase is part of the wall time
    assert 0 < local_row["cloud_busy"] <= 1  # the local runner times its cloud steps too (cloud_step_seconds)
    assert [json.loads(line)["runtime"] for line in (out / "scale.jsonl").read_text().splitlines()] == ["ray", "local"]


def test_scale_summary_quotes_medians_of_paired_ratios() -> None:
    """Ray/local is the median of ratios within a repeat: a slow minute that hits one pair does not skew it."""
    from cema_ray.bench.scale import markdown, summary_markdown

    base = {"mode": "sync", "edges": 4, "hosts": 2, "samples": 128, "edge_samples_per_s": None,
            "cloud_steps_per_s": 1.0, "startup_s": None, "worker_uss_mb": 0.0, "workers": 0,
            "version_lag_median": 0.0, "accuracy": 0.5, "upload_fraction": 0.5, "dropped": 0}
    rates = [(100.0, 200.0), (50.0, 60.0), (90.0, 100.0)]  # (ray, local) per repeat: ratios 0.5, 0.83, 0.9
    rows = [dict(base, runtime=rt, samples_per_s=rate, repeat=rep)
            for rep, pair in enumerate(rates) for rt, rate in zip(("ray", "local"), pair)]
    summary = summary_markdown(rows)
    ray_line = next(line for line in summary.splitlines() if line.startswith("| ray |"))
    assert cells(ray_line)[3:10] == ["1", "3", "90", "50 - 100", "", "1.00", "0.83"]  # 1 shard: rows without one
    local_line = next(line for line in summary.splitlines() if line.startswith("| local |"))
    assert cells(local_line)[5] == "100"  # median of 200, 60, 100
    page = markdown(rows, "cmd")
    assert page.index("(median of paired ratios)") < page.index("Every run:")
    assert "| 1 | ray | sync | 4 |" in page and page.count("| 0.83 |") == 2  # the summary and repeat 1's row


def test_scale_bytes_per_edge_compare_fleets_with_as_many_hosts() -> None:
    from cema_ray.bench.scale import bytes_per_edge

    rows = [dict(runtime="ray", mode="async", repeat=0, hosts=h, edges=e, worker_uss_mb=m)
            for h, e, m in [(1, 1, 300.0), (2, 64, 600.0), (2, 1088, 601.0)]]
    assert bytes_per_edge(rows) == {0: None, 1: None, 2: pytest.approx(2**20 / 1024)}


# ------------------------------------------------------------------------------------ bench cloud
@pytest.mark.ray
def test_cloud_bench_times_every_placement(run_yaml: Path, tmp_path: Path, ray_session) -> None:
    """Four placements of the same cloud step; each timed step really stepped the cloud."""
    out = tmp_path / "cloud"
    argv = ["cloud", str(run_yaml), "--threads", "2", "--steps", "2", "--fill", "64", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "cloud.json").read_text())
    assert {r["fill"] for r in rows} == {64}
    assert [(r["where"], r["processes"], r["threads"]) for r in rows] == [
        ("this process", 1, 1), ("this process", 1, 2), ("concurrent processes", 2, 1), ("Ray task", 1, 2)]
    assert [r["steps"] for r in rows] == [2, 2, 4, 2]
    assert all(r["ms_per_step"] > 0 for r in rows) and rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[2]["steps_per_s"] == pytest.approx(2000 / rows[2]["ms_per_step"])  # two processes at once
    assert "speed-up over 1 thread" in (out / "cloud.md").read_text()


def test_cloud_bench_refuses_a_method_without_a_cloud(run_yaml: Path) -> None:
    from cema_ray.bench.cloud import time_steps

    cfg = bench.bench_config(run_yaml, ["method.name=bn", "method.settings={}"])
    with pytest.raises(ConfigError, match="method 'bn' has none"):
        time_steps(cfg, 1, 1, 32)
    with pytest.raises(ConfigError, match="--fill 10000000 needs at least"):
        time_steps(bench.bench_config(run_yaml, []), 1, 1, 32, fill=10_000_000)
    with pytest.raises(ConfigError, match="--fill -1: must be >= 0"):
        bench.main(["cloud", str(run_yaml), "--fill", "-1"])


def test_methods_with_seeds_references_and_ablations(run_yaml: Path, tmp_path: Path) -> None:
    """--seeds runs every row once per seed into seed<k>/ and the table gives mean ± std and the gap closed."""
    out = tmp_path / "seeded"
    argv = ["methods", str(run_yaml), "--quick", "--methods", "bn,foundation-bn,cema-fleet", "--protocols",
            "continual", "--seeds", "0,1", "--serial", "--override", "stream.samples_per_domain=32", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("bn", "foundation-bn", "cema-fleet")
                                                        for s in (0, 1)]
    assert all(Path(r["out_dir"]) == out / "continual" / r["method"] / f"seed{r['seed']}" for r in rows)
    acc = {m: float(np.mean([r["accuracy"] for r in rows if r["method"] == m])) for m in ("bn", "foundation-bn",
                                                                                          "cema-fleet")}
    md = (out / "methods.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| continual | cema-fleet |"))
    gap = bench.gap_closed(acc["cema-fleet"], acc["bn"], acc["foundation-bn"])
    assert cells(line)[3] == ("n/a" if gap is None else f"{100 * gap:.2f}") and "±" in cells(line)[2]
    assert cells(line)[9] == "2"
    # --resume reads the runs back instead of running them again: the same table
    assert bench.main([*argv, "--resume"]) == 0
    assert json.loads((out / "methods.json").read_text())["rows"][0]["accuracy"] == rows[0]["accuracy"]
    # ...but a summary a stopped run left behind (status: interrupted) is run again, not read back as a result
    stopped = Path(rows[0]["out_dir"]) / "summary.json"
    stopped.write_text(json.dumps({**json.loads(stopped.read_text()), "status": "interrupted", "accuracy": 0.0}))
    assert bench.main([*argv, "--resume"]) == 0
    assert json.loads((out / "methods.json").read_text())["rows"][0]["accuracy"] == rows[0]["accuracy"]
    plan = bench.plan_method_runs(run_yaml, [], ["fleet-no-budget"], ["continual"], tmp_path)
    assert plan[0][2]["method"]["name"] == "cema-fleet"
    assert plan[0][2]["method"]["settings"]["upload_budget"] == 1.0


def test_gap_closed() -> None:
    assert bench.gap_closed(0.70, 0.64, 0.74) == pytest.approx(0.6)
    assert bench.gap_closed(0.70, None, 0.74) is None and bench.gap_closed(0.7, 0.74, 0.64) is None


# ---------------------------------------------------------------------------------- bench fleet
@pytest.mark.ray
def test_fleet_quick_curve(run_yaml: Path, tmp_path: Path, ray_session) -> None:
    """Sizes x orders x budgets, the references once per (size, order); the table's cells match each run's own
    outputs, every header has a value, and a bad axis fails in one line."""
    out = tmp_path / "fleet"
    argv = ["fleet", str(run_yaml), "--quick", "--edges", "1,3", "--orders", "same,permute", "--budgets", "0.3",
            "--methods", "cema-fleet", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "fleet.json").read_text())["rows"]
    assert [(r["cell"]["edges"], r["cell"]["order"], r["method"]) for r in rows] == [
        (e, o, m) for e in (1, 3) for o in ("same", "permute") for m in ("bn", "foundation-bn", "cema-fleet")]
    for r in rows:
        assert r["status"] == "ok" and r["samples"] == r["cell"]["edges"] * 2 * 64
        assert len(r["edge_accuracy"]) == r["cell"]["edges"]
        assert np.isclose(np.mean(r["edge_accuracy"]), r["accuracy"])  # equal streams' lengths: mean of edges
        summary = json.loads((Path(r["out_dir"]) / "summary.json").read_text())
        assert summary["num_edges"] == r["cell"]["edges"] and summary["runtime"] == "local"
        assert (r["uploaded"] > 0) == (r["method"] == "cema-fleet") and r["upload_fraction"] <= 0.3
    permuted = [json.loads((Path(r["out_dir"]) / "summary.json").read_text())["per_domain"]
                for r in rows if r["cell"] == {"edges": 3, "order": "permute", "budget": None, "mode": "sync"}
                and r["method"] == "bn"]
    assert permuted  # the permuted fleet sees both domains
    md = (out / "fleet.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows) and len({len(cells(line)) for line in table}) == 1  # header = row cells
    assert (out / "fleet.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="--orders"):
        bench.main(["fleet", str(run_yaml), "--orders", "sideways"])
    with pytest.raises(ConfigError, match="--modes"):
        bench.main(["fleet", str(run_yaml), "--modes", "later"])
    with pytest.raises(ConfigError, match="--budgets"):
        bench.main(["fleet", str(run_yaml), "--budgets", "0"])


@pytest.mark.ray
def test_fleet_groups_order_keeps_the_configs_groups_and_compares_each_with_its_own_bn(run_yaml: Path,
                                                                                      tmp_path: Path) -> None:
    """`--orders groups`: the config's edge groups stay (here with a lane each); every run reports each group's
    accuracy, and the table gives the worst group's difference to the same group under `bn`."""
    out = tmp_path / "fleet-groups"
    argv = ["fleet", str(run_yaml), "--quick", "--edges", "4", "--orders", "groups", "--budgets", "0.3",
            "--methods", "cema-fleet", "--serial", "--override", "method.lanes=group", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "fleet.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["bn", "foundation-bn", "cema-fleet"]
    groups = [r["group_accuracy"] for r in rows]
    assert all(g is not None and len(g) == 2 and set(g) == set(groups[0]) for g in groups)  # the config's 2 groups
    fleet, bn = groups[2], groups[0]
    line = [ln for ln in (out / "fleet.md").read_text().splitlines() if "| cema-fleet |" in ln][0]
    assert cells(line)[-2] == f"{100 * min(fleet[g] - bn[g] for g in fleet):+.2f}"
    summary = json.loads((Path(rows[2]["out_dir"]) / "summary.json").read_text())
    assert len(set(summary["edge_groups"].values())) == 2
    with pytest.raises(ConfigError, match="--orders groups: .* has no edges.groups"):
        bench.main(["fleet", str(run_yaml), "--orders", "groups", "--override", "edges.groups=[]"])


def test_fleet_async_mode_runs_on_ray_beside_the_sync_references(run_yaml: Path, tmp_path: Path, ray_session) -> None:
    """`--modes async`: the method runs on the Ray runtime in async mode (the uplink following the cloud), the
    references in sync on the local runner; the row reports what the cloud dropped, and the gap uses the references.
    A recurring order reports each visit's accuracy and uploads."""
    out = tmp_path / "fleet-async"
    argv = ["fleet", str(run_yaml), "--quick", "--edges", "3", "--orders", "recurring", "--budgets", "0.3",
            "--modes", "async", "--methods", "cema-fleet", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads((out / "fleet.json").read_text())["rows"]
    assert [(r["cell"]["mode"], r["method"]) for r in rows] == [("sync", "bn"), ("sync", "foundation-bn"),
                                                                ("async", "cema-fleet")]
    run = rows[-1]
    summary = json.loads((Path(run["out_dir"]) / "summary.json").read_text())
    assert summary["runtime"] == "ray" and summary["mode"] == "async" and summary["uplink"] == "follow"
    assert run["status"] == "ok" and run["samples"] == 3 * 4 * 64 and run["dropped"] == summary["dropped"]
    assert summary["uploaded"] == summary["cloud_ingested"] + summary["dropped"]
    for r in rows:  # the recurring stream's two visits: each half of every edge's batches
        acc1, up1, acc2, up2 = r["visits"]
        assert np.isclose((acc1 + acc2) / 2, r["accuracy"]) and up1 + up2 == r["uploaded"]
    line = [ln for ln in (out / "fleet.md").read_text().splitlines() if "| async | cema-fleet |" in ln]
    assert len(line) == 1 and all(c for c in cells(line[0])[:-2])  # filled up to the groups column: the gap, visits
