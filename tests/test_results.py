"""Results: records -> Parquet, summary numbers checked by hand, report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cema_ray.results import RECORD_KEYS, RunRecorder, summarize, write_outputs, write_report
from cema_ray.results.report import ACCURACY_PNG, DOMAINS_PNG, UPLOADS_PNG, rolling_accuracy

torch.set_num_threads(1)


def rec(edge: int, idx: int, domain: str, samples: int, correct: int, uploaded: int, lag: int, t: float,
        rejected: int = 0) -> dict:
    return {
        "edge_id": edge, "host_id": edge // 2, "domain": domain, "batch_index": idx, "samples": samples,
        "correct": correct, "uploaded": uploaded, "bytes_up": uploaded * 784, "bytes_down": 100,
        "weight_version": idx, "version_lag": lag, "latency_ms": 1.5, "e_max": 0.921, "mean_entropy": 0.5,
        "cloud_steps": 1, "t_wall": t, "rejected": rejected, "skipped_unreliable": samples - uploaded - rejected,
    }


RECORDS = [
    rec(0, 0, "fog-5", 10, 6, 4, 0, 0.5),
    rec(1, 0, "fog-5", 20, 10, 10, 1, 1.0, rejected=2),
    rec(0, 1, "snow-5", 10, 9, 0, 2, 1.5),
    rec(1, 1, "snow-5", 20, 15, 6, 4, 2.0),
]


def recorder() -> RunRecorder:
    r = RunRecorder()
    r.add(RECORDS[0])
    r.extend(RECORDS[1:])
    return r


def test_summary_numbers_by_hand() -> None:
    s = summarize(recorder().to_table(), {"method": "cema", "runtime": "local", "mode": "sync", "dropped": 3})
    assert s["samples"] == 60
    assert s["accuracy"] == pytest.approx(40 / 60)  # 6+10+9+15 over every sample, not a mean of batches
    assert s["uploaded"] == 20 and s["upload_fraction"] == pytest.approx(20 / 60)
    assert s["bytes_up"] == 20 * 784 and s["bytes_down"] == 400
    assert s["wall_seconds"] == 2.0 and s["samples_per_second"] == pytest.approx(30.0)
    assert s["num_edges"] == 2 and s["dropped"] == 3 and s["rejected"] == 2
    assert (s["method"], s["runtime"], s["mode"]) == ("cema", "local", "sync")
    assert list(s["per_domain"]) == ["fog-5", "snow-5"]
    assert s["per_domain"]["fog-5"] == {"accuracy": pytest.approx(16 / 30), "upload_fraction":
                                        pytest.approx(14 / 30), "samples": 30,
                                        "skipped": {"skipped_unreliable": pytest.approx(14 / 30)}}  # (10-4) + (20-10-2)
    assert s["skipped"] == {"skipped_unreliable": pytest.approx(38 / 60)}  # only the columns the table has
    assert s["per_domain"]["snow-5"]["accuracy"] == pytest.approx(24 / 30)
    # lags 0, 1, 2, 4: median 1.5; p95 by linear interpolation = 2 + 0.85 * (4 - 2) = 3.7
    assert s["version_lag"] == {"median": 1.5, "p95": pytest.approx(3.7), "max": 4.0}


def test_meta_overrides_and_collisions() -> None:
    table = recorder().to_table()
    s = summarize(table, {"wall_seconds": 4.0, "num_edges": 5, "config_name": "x"})
    assert s["samples_per_second"] == pytest.approx(15.0) and s["num_edges"] == 5 and s["config_name"] == "x"
    with pytest.raises(ValueError, match="accuracy"):
        summarize(table, {"accuracy": 1.0})


def test_empty_run_summary_is_strict_json(tmp_path) -> None:
    s = write_outputs(tmp_path, RunRecorder(), {"method": "source"})
    assert s["samples"] == 0 and s["accuracy"] is None and s["version_lag"]["max"] is None
    loaded = json.loads((tmp_path / "summary.json").read_text())
    assert loaded["accuracy"] is None and loaded["method"] == "source"


def test_missing_record_key_is_named() -> None:
    bad = dict(RECORDS[0])
    del bad["version_lag"]
    with pytest.raises(ValueError, match="version_lag"):
        RunRecorder().add(bad)


def test_parquet_round_trip(tmp_path) -> None:
    summary = write_outputs(tmp_path, recorder(), {"method": "cema"})
    table = pq.read_table(tmp_path / "batches.parquet")
    assert table.column_names == [*RECORD_KEYS, "skipped_unreliable"]  # the schema first, then extra keys
    assert table.num_rows == 4
    assert table.column("correct").to_pylist() == [6, 10, 9, 15]
    assert table.column("domain").to_pylist() == ["fog-5", "fog-5", "snow-5", "snow-5"]
    assert str(table.schema.field("t_wall").type) == "double"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == pytest.approx(summary["accuracy"])
    assert on_disk["per_domain"]["fog-5"]["samples"] == 30


def test_extra_record_keys_become_columns() -> None:
    r = RunRecorder()
    r.add({**RECORDS[0], "group": "a"})
    assert r.to_table().column("group").to_pylist() == ["a"]


def test_nan_e_max_survives_parquet_and_json(tmp_path) -> None:
    r = RunRecorder()
    r.add({**RECORDS[0], "e_max": float("nan")})
    write_outputs(tmp_path, r, {"method": "bn", "note": float("nan")})
    assert math.isnan(pq.read_table(tmp_path / "batches.parquet").column("e_max")[0].as_py())
    assert json.loads((tmp_path / "summary.json").read_text())["note"] is None


def test_rolling_accuracy_by_hand() -> None:
    idx = np.array([0, 1, 2, 0])
    correct = np.array([1, 2, 3, 1])
    samples = np.array([2, 4, 4, 2])
    rounds, acc = rolling_accuracy(idx, correct, samples, window=2)
    assert rounds.tolist() == [0, 1, 2]
    # round 0: (1+1)/(2+2); round 1: (2+2)/(4+4); round 2: (2+3)/(4+4)
    assert acc.tolist() == pytest.approx([0.5, 0.5, 5 / 8])


def test_report_files_and_links(tmp_path) -> None:
    write_outputs(tmp_path, recorder(), {"method": "cema", "runtime": "ray", "mode": "async"})
    text = (tmp_path / "report.md").read_text()
    for png in (ACCURACY_PNG, UPLOADS_PNG, DOMAINS_PNG):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "66.67%" in text and "| fog-5 | 30 | 53.33% | 46.67% |" in text


@pytest.mark.parametrize("groups", [False, True])
def test_report_many_edges_uses_bands_or_groups(tmp_path, groups: bool) -> None:
    rng = np.random.default_rng(0)
    r = RunRecorder()
    for e in range(20):
        for k in range(12):
            c = int(rng.integers(0, 9))
            r.add(rec(e, k, "fog-5", 8, c, 2, 0, 0.1 * k + 0.001 * e))
    table = r.to_table()
    summary = summarize(table, {"method": "cema", "edge_groups": {e: "ab"[e % 2] for e in range(20)}} if groups
                        else {"method": "cema"})
    path = write_report(tmp_path, table, summary)
    assert path.name == "report.md" and (tmp_path / ACCURACY_PNG).stat().st_size > 1000


def test_async_progress_counts_predictions_and_shows_what_the_cloud_still_has(capsys) -> None:
    """In async runs the bar follows the edges (batches predicted), and the line says how many batches still
    wait for the cloud, instead of counting only what the cloud has taken in (which lags far behind)."""
    from cema_ray.runtime.progress import RunProgress

    record = {k: 0 for k in ("edge_id", "host_id", "batch_index", "samples", "correct", "uploaded", "bytes_up",
                             "bytes_down", "weight_version", "version_lag", "cloud_steps", "rejected")}
    record.update(domain="fog-5", latency_ms=1.0, e_max=0.0, mean_entropy=0.0, samples=8)
    progress = RunProgress("t", 10, enabled=True, count_predictions=True)
    progress.predicted(6)
    progress.add(dict(record))
    progress.refresh()
    assert progress.bar.n == 6 and progress.bar.postfix and "cloud_todo=5" in progress.bar.postfix
    sync = RunProgress("t", 10, enabled=True)
    sync.add(dict(record))
    assert sync.bar.n == 1


def test_every_report_table_has_as_many_cells_in_each_row_as_in_its_header(tmp_path) -> None:
    """report.md's tables parsed back: the headline, per-domain and (a mixed fleet's) per-architecture tables."""
    from cema_ray.results.report import render_markdown

    meta = {"method": "cema", "runtime": "ray", "mode": "sync",
            "edge_models": {str(r["edge_id"]): ("cema_resnet_s" if r["edge_id"] % 2 else "cema_resnet_m")
                            for r in RECORDS}}
    write_outputs(tmp_path, recorder(), meta)
    summary = json.loads((tmp_path / "summary.json").read_text())
    tables, current = [], []
    for line in render_markdown(summary).splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 3 and set(summary["per_model"]) == {"cema_resnet_s", "cema_resnet_m"}
    for table in tables:
        widths = {len(row.strip().strip("|").split("|")) for row in table}
        assert len(widths) == 1, table
