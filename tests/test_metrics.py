"""The fleet's series: declared once, exported by the actors, read back by `cema-ray status` and by a real
Prometheus, and their totals equal summary.json's; the shipped Grafana dashboard reads only declared series."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cema_ray.runtime import run_experiment
from cema_ray.runtime.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
# summary.json key -> the edge counter whose total must equal it
TOTALS = {"samples": "cema_edge_samples", "uploaded": "cema_edge_uploads", "bytes_up": "cema_edge_bytes_up",
          "bytes_down": "cema_edge_bytes_down"}

PAGE = """# HELP ray_cema_edge_samples_total samples
# TYPE ray_cema_edge_samples_total counter
ray_cema_edge_samples_total{WorkerId="a",group="g1",host="0",run="r"} 64.0
ray_cema_edge_samples_total{WorkerId="b",group="g1",host="0",run="r"} 32.0
ray_cema_edge_samples_total{WorkerId="c",group="g2",host="1",run="r"} 10.0
# HELP ray_cema_edge_correct_total correct
# TYPE ray_cema_edge_correct_total counter
ray_cema_edge_correct_total{WorkerId="a",group="g1",host="0",run="r"} 48.0
# HELP ray_cema_edge_version_lag lag
# TYPE ray_cema_edge_version_lag gauge
ray_cema_edge_version_lag{WorkerId="a",group="g1",host="0",run="r"} 1.0
ray_cema_edge_version_lag{WorkerId="b",group="g1",host="0",run="r"} 3.0
# HELP ray_cema_cloud_queue_depth backlog
# TYPE ray_cema_cloud_queue_depth gauge
ray_cema_cloud_queue_depth{WorkerId="z",run="r"} 7.0
# HELP ray_other_total not ours
# TYPE ray_other_total counter
ray_other_total{x="1"} 5.0
"""


def test_status_sums_counters_over_workers_and_keeps_the_worst_gauge():
    from cema_ray.status import cloud, parse, render, rows

    now = parse(PAGE)
    assert all(name.startswith("ray_cema_") for name, _ in now)
    (g1, g2) = rows(now)
    assert (g1.group, g1.totals["samples"], g1.totals["correct"], g1.lag) == ("g1", 96.0, 48.0, 3.0)
    assert g2.totals == {"samples": 10.0}
    assert cloud(now, "r")["backlog"] == 7.0
    before = parse(PAGE.replace("} 64.0", "} 44.0"))
    assert rows(now, before, 4.0)[0].rate == pytest.approx(5.0)  # 20 more samples in 4 s
    text = render(now, before, 4.0)
    assert "50.00%" in text and "backlog 7" in text  # g1: 48 of 96 correct
    assert "no cema_ray series" in render(now, None, 0.0, run_filter="another-run")


def test_grafana_dashboard_is_the_generated_one_and_reads_only_declared_series():
    from cema_ray.grafana import dashboard, render, series_in

    shipped = REPO / "configs" / "monitoring" / "cema_fleet_grafana.json"
    assert shipped.read_text() == render(), "regenerate: python -m cema_ray.grafana > " + str(shipped)
    exported = {spec.exported for spec in METRICS.values()}
    read = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            names = series_in(target["expr"])
            assert names and names <= exported, (panel["title"], names - exported)
            read |= names
    edge_series = {METRICS[n].exported for n in ("cema_edge_samples", "cema_edge_correct", "cema_edge_uploads",
                                                 "cema_edge_bytes_up", "cema_edge_bytes_down", "cema_edge_e_max",
                                                 "cema_edge_version_lag", "cema_cloud_queue_depth")}
    assert edge_series <= read  # what the issue asks a person to see


def test_readme_lists_every_series():
    readme = (REPO / "README.md").read_text()
    missing = [spec.exported for spec in METRICS.values() if f"`{spec.exported}`" not in readme]
    assert not missing, missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(read, want: dict[str, float], timeout: float = 60.0) -> dict[str, float]:
    """Poll `read()` until it equals `want` (Ray exports about every 10 s); returns the last reading."""
    deadline = time.time() + timeout
    got: dict[str, float] = {}
    while time.time() < deadline:
        got = read()
        if got == want:
            return got
        time.sleep(1.0)
    return got


@pytest.fixture(scope="module")
def metered_run(ray_session, tmp_path_factory, tiny_raw_config):
    """One short Ray run (uploads, publications, two edge groups) and its summary."""
    import yaml

    from cema_ray.config import load_config

    out = tmp_path_factory.mktemp("metered")
    raw = tiny_raw_config()
    raw.update(name="metered", runtime="ray", method={"name": "cema-fleet"})
    raw["edges"] = {"count": 3, "per_host": 2, "groups": [{"name": "north", "fraction": 0.67}, {"name": "south", "fraction": 0.33}]}
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    summary = run_experiment(load_config(out / "config.yaml"), out / "run")
    assert summary["uploaded"] > 0 and summary["bytes_down"] > 0  # the series below are not all zero
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray_session.nodes() if n["Alive"]]
    return summary, targets


@pytest.mark.ray
@pytest.mark.xdist_group("metered")  # one metered run for both
def test_status_reads_the_runs_totals_from_the_nodes(metered_run, capsys):
    from cema_ray.cli import main
    from cema_ray.status import rows, scrape

    summary, targets = metered_run
    run = summary["ray_run"]
    want = {key: float(summary[key]) for key in TOTALS}
    want["correct"] = float(round(summary["accuracy"] * summary["samples"]))

    def read() -> dict[str, float]:
        got = {key: 0.0 for key in want}
        for row in rows(scrape(targets)):
            if row.run == run:
                for key in want:
                    got[key] += row.totals.get({"uploaded": "uploads"}.get(key, key), 0.0)
        return got

    assert _until(read, want) == want
    groups = {r.group for r in rows(scrape(targets)) if r.run == run}
    assert groups == {"north", "south"}
    assert main(["status", "--metrics", ",".join(targets), "--once", "--interval", "0.2", "--run", run]) == 0
    text = capsys.readouterr().out
    assert run in text and f"{summary['samples']:>9}" not in text.split(run)[0]
    assert "north" in text and "south" in text and "cloud:" in text


def test_status_refuses_a_bad_interval(capsys):
    from cema_ray.cli import main

    assert main(["status", "--metrics", "127.0.0.1:1", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary (setup.sh installs the Debian package `prometheus`)")
@pytest.mark.xdist_group("metered")  # one metered run for both
def test_a_real_prometheus_scrapes_the_fleet_and_its_totals_equal_the_summary(metered_run, tmp_path):
    summary, targets = metered_run
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}))
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = summary["ray_run"]

    def query(expr: str) -> float:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            data = json.loads(urllib.request.urlopen(url, timeout=5).read())
        except OSError:
            return -1.0  # not up yet
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else -1.0

    def read() -> dict[str, float]:
        return {key: query(f'sum({METRICS[name].exported}{{run="{run}"}})') for key, name in TOTALS.items()}

    try:
        want = {key: float(summary[key]) for key in TOTALS}
        assert _until(read, want, timeout=90) == want
        by_group = query(f'count(count by (group) ({METRICS["cema_edge_accuracy"].exported}{{run="{run}"}}))')
        assert by_group == 2.0  # an accuracy series per edge group
        one = f'{METRICS["cema_edge_samples"].exported}{{run="{run}",model="cema_resnet_s"}}'
        assert query(f"sum({one})") == summary["samples"]  # every edge runs models.edge: one model label
        assert query(f'sum({METRICS["cema_cloud_publications"].exported}{{run="{run}"}})') == summary["publications"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Recorded:
    """A stand-in for a Ray metric: what was added, set or observed."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def inc(self, value: float, tags: dict) -> None:
        self.values.append(value)

    set = observe = inc


def test_a_batch_predicted_again_after_resume_counts_as_redone_work_only():
    """The interrupted run's hosts counted a batch it had recorded past the resume point; the resumed run
    predicts it again and counts it in cema_edge_redone_samples, not a second time in the edge counters."""
    from cema_ray.runtime.metrics import EDGE_TAGS, HostMetrics

    metrics = HostMetrics.__new__(HostMetrics)  # no Ray metric objects: stand-ins record what they get
    metrics.host, metrics.run, metrics.seen, metrics.models = "0", "run", {}, {3: "cema_resnet_s"}
    metrics.m = {name: _Recorded() for name, spec in METRICS.items() if spec.tags == EDGE_TAGS}
    rec = {"edge_id": 3, "group": "g", "samples": 32, "correct": 20, "uploaded": 8, "bytes_up": 6272, "bytes_down": 0,
           "rejected": 0, "version_lag": 0, "e_max": 0.4, "latency_ms": 3.0}
    metrics.record(rec, redone=True)
    assert metrics.m["cema_edge_redone_samples"].values == [32] and metrics.m["cema_edge_samples"].values == []
    metrics.record(rec)
    assert metrics.m["cema_edge_samples"].values == [32] and metrics.m["cema_edge_uploads"].values == [8]
    assert metrics.m["cema_edge_redone_samples"].values == [32]


def test_redo_horizons_are_the_batches_recorded_past_each_edges_cursor(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cema_ray.runtime.journal import redo_horizons

    pq.write_table(pa.table({"edge_id": [0, 0, 0, 1, 1, 2], "batch_index": [0, 1, 2, 0, 1, 0]}),
                   tmp_path / "batches.parquet")
    assert redo_horizons(tmp_path, {0: 1, 1: 2, 2: 0}) == {0: 3, 2: 1}
    assert redo_horizons(tmp_path / "none", {0: 1}) == {}
