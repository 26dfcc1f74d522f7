"""`cema-ray sweep`: a grid over config keys and seeds run as Ray Tune trials, the trade-off table and its front."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cema_ray.cli import main
from cema_ray.sweep import aggregate, parse_grid, points

pytest.importorskip("ray.tune", reason="ray[tune] is a dependency (pyproject.toml)")


def test_grid_parsing_and_points() -> None:
    grid = parse_grid(["method.settings.upload_budget=[0.1, 0.3]", "stream.batch_size=[16,32]"])
    assert grid == {"method.settings.upload_budget": [0.1, 0.3], "stream.batch_size": [16, 32]}
    assert len(points(grid, [0, 1])) == 8 and points(grid, [5])[0] == {
        "method.settings.upload_budget": 0.1, "stream.batch_size": 16, "seed": 5}
    for bad in ("x=3", "x=[]"):
        with pytest.raises(Exception, match="KEY=\\[v1,v2"):
            parse_grid([bad])


def test_the_pareto_front_is_the_points_nothing_beats_on_both() -> None:
    rows = [{"b": b, "seed": 0, "status": "ok", "accuracy": a, "upload_fraction": u}
            for b, a, u in ((1, 0.80, 0.10), (2, 0.82, 0.30), (3, 0.79, 0.30), (4, 0.82, 0.50))]
    front = {p["b"]: p["pareto"] for p in aggregate(rows, ["b"])}
    assert front == {1: True, 2: True, 3: False, 4: False}


@pytest.mark.ray
def test_a_sweep_runs_every_point_and_seed_as_a_tune_trial(ray_session, tiny_raw_config, tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    raw = tiny_raw_config()
    raw["method"] = {"name": "cema-fleet"}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    code = main(["sweep", str(config), "--grid", "method.settings.upload_budget=[0.1,0.5]", "--seeds", "0,1",
                 "--override", "edges.count=1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["trials"]) == 4 and all(t["status"] == "ok" for t in data["trials"])
    assert {(t["method.settings.upload_budget"], t["seed"]) for t in data["trials"]} == {
        (0.1, 0), (0.1, 1), (0.5, 0), (0.5, 1)}
    for t in data["trials"]:  # each trial is an ordinary run folder
        summary = json.loads((Path(t["out_dir"]) / "summary.json").read_text())
        assert summary["accuracy"] == t["accuracy"] and summary["seed"] == t["seed"]
    by_budget = {p["method.settings.upload_budget"]: p for p in data["points"]}
    assert by_budget[0.1]["upload_fraction_mean"] < by_budget[0.5]["upload_fraction_mean"]
    assert by_budget[0.1]["seeds"] == [0, 1] and by_budget[0.1]["pareto"]
    assert (out / "sweep.png").stat().st_size > 1000 and "Pareto" in (out / "sweep.md").read_text()
    stamps = {t["out_dir"]: (Path(t["out_dir"]) / "summary.json").stat().st_mtime_ns for t in data["trials"]}
    assert main(["sweep", str(config), "--grid", "method.settings.upload_budget=[0.1,0.5]", "--seeds", "0,1",
                 "--override", "edges.count=1", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert len(again["trials"]) == 4  # restored from <out>/tune: finished trials are not run again
    assert all((Path(p) / "summary.json").stat().st_mtime_ns == t for p, t in stamps.items())
    assert main(["sweep", str(config)]) == 2  # no --grid: one line
    assert main(["sweep", str(config), "--grid", "stream.batch_size=[0]"]) == 2  # validated before any trial
