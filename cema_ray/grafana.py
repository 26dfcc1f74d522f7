"""The fleet's Grafana dashboard, built from the declared series (`runtime/metrics.py`).

The shipped JSON (`configs/monitoring/cema_fleet_grafana.json`) is this module's output; a test checks
that the two agree and that every query names a declared series, so the dashboard cannot drift from
what the actors export. Regenerate with `python -m cema_ray.grafana > configs/monitoring/cema_fleet_grafana.json`.

Queries are per edge group and filtered by the `$run` variable (the run's actor prefix); the data
source is a variable too, so the JSON imports into any Grafana, Ray's own integration included.
"""
from __future__ import annotations

import json
import re
from typing import Any

from cema_ray.runtime.metrics import METRICS

UID = "cema-ray-fleet"
E = {name: spec.exported for name, spec in METRICS.items()}
SEL = '{run=~"$run"}'
W = "[$__rate_interval]"


def _rate(name: str, by: str = "group") -> str:
    return f"sum by ({by}) (rate({E[name]}{SEL}{W}))"


# (title, unit, [(expr, legend)], description)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("Edge samples/s", "short", [(_rate("cema_edge_samples"), "{{group}}")],
     "samples predicted per second, per edge group"),
    ("Accuracy (last minutes)", "percentunit",
     [(f"{_rate('cema_edge_correct')} / {_rate('cema_edge_samples')}", "{{group}}")],
     "correct / predicted over the rate window: follows the shift"),
    ("Accuracy so far", "percentunit",
     [(f"sum by (group) ({E['cema_edge_correct']}{SEL}) / sum by (group) ({E['cema_edge_samples']}{SEL})",
       "{{group}}")], "cumulative correct / predicted, as summary.json counts it"),
    ("Upload fraction", "percentunit",
     [(f"{_rate('cema_edge_uploads')} / {_rate('cema_edge_samples')}", "{{group}}")],
     "uploaded / predicted over the rate window"),
    ("Bytes up and down per second", "Bps",
     [(_rate("cema_edge_bytes_up"), "up {{group}}"), (_rate("cema_edge_bytes_down"), "down {{group}}")],
     "uint8 images up; published parameters loaded, down"),
    ("E_max", "short", [(f"avg by (group) ({E['cema_edge_e_max']}{SEL})", "{{group}}")],
     "entropy threshold in force at the last batch, mean over hosts"),
    ("Version lag", "short", [(f"max by (group) ({E['cema_edge_version_lag']}{SEL})", "{{group}}")],
     "versions behind the newest at the last batch, worst host"),
    ("Edge batch time p95", "ms",
     [(f"histogram_quantile(0.95, sum by (le, group) (rate({E['cema_edge_batch_ms']}_bucket{SEL}{W})))",
       "{{group}}")], "95th percentile of edge inference time per batch"),
    ("Cloud backlog", "short", [(f"max by (run) ({E['cema_cloud_queue_depth']}{SEL})", "{{run}}")],
     "uploaded samples waiting for a cloud step"),
    ("Cloud step time", "s",
     [(f"{_rate('cema_cloud_step_seconds', 'run')} / {_rate('cema_cloud_steps', 'run')}", "{{run}}")],
     "seconds per training step over the rate window"),
    ("Cloud intake per second", "short",
     [(_rate("cema_cloud_ingested", "run"), "received {{run}}"), (_rate("cema_cloud_refused", "run"),
                                                                 "refused {{run}}"),
      (_rate("cema_cloud_steps", "run"), "steps {{run}}"), (_rate("cema_cloud_publications", "run"),
                                                            "publications {{run}}")],
     "samples received and refused (dropped), steps and publications per second"),
]


def _panel(i: int, title: str, unit: str, targets: list[tuple[str, str]], description: str) -> dict[str, Any]:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + k), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for k, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    runs = {"name": "run", "label": "run", "type": "query", "multi": True, "includeAll": True,
            "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
            "query": {"query": f"label_values({E['cema_edge_samples']}, run)", "refId": "runs"},
            "definition": f"label_values({E['cema_edge_samples']}, run)",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}
    source = {"name": "datasource", "label": "data source", "type": "datasource", "query": "prometheus",
              "current": {}, "hide": 0}
    return {
        "uid": UID, "title": "cema_ray fleet", "tags": ["cema_ray", "ray"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "description": "Edges and cloud of cema_ray runs (series declared in cema_ray/runtime/metrics.py)",
        "templating": {"list": [source, runs]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression reads (histogram suffixes folded back to their metric)."""
    names = set(re.findall(r"\bray_cema_[a-z_]+", expr))
    return {re.sub(r"_bucket$", "", n) for n in names}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
