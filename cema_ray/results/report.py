"""report.md and its plots, written from the per-batch table and the summary alone.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no global figure state), so a report
can be written from any thread or actor without a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from cema_ray.results.summary import SKIP_COLUMNS

ACCURACY_PNG = "accuracy_over_time.png"
UPLOADS_PNG = "cumulative_uploads.png"
DOMAINS_PNG = "upload_fraction_by_domain.png"
MAX_EDGE_LINES = 16  # above this, one line per group (or a quantile band) instead of one per edge
ROLLING_BATCHES = 10


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def rolling_accuracy(batch_index: np.ndarray, correct: np.ndarray, samples: np.ndarray,
                     window: int = ROLLING_BATCHES) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy over the last `window` rounds at each round (rounds summed over the rows given)."""
    rounds = np.unique(batch_index)
    c = np.array([correct[batch_index == r].sum() for r in rounds], dtype=np.float64)
    n = np.array([samples[batch_index == r].sum() for r in rounds], dtype=np.float64)
    cc, nn = np.cumsum(c), np.cumsum(n)
    cc[window:] = cc[window:] - cc[:-window]
    nn[window:] = nn[window:] - nn[:-window]
    return rounds, np.divide(cc, nn, out=np.full_like(cc, np.nan), where=nn > 0)


def _edge_groups(summary: Mapping[str, Any]) -> dict[int, str]:
    groups = summary.get("edge_groups") or {}
    return {int(k): str(v) for k, v in groups.items()}


def plot_accuracy(table: pa.Table, summary: Mapping[str, Any], path: Path) -> None:
    """Rolling accuracy by round: per edge (few edges), per group, or median and 10-90% band."""
    edge, idx = _col(table, "edge_id"), _col(table, "batch_index")
    correct, samples = _col(table, "correct"), _col(table, "samples")
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.unique(edge)
    groups = _edge_groups(summary)
    if len(edges) <= MAX_EDGE_LINES:
        for e in edges:
            m = edge == e
            ax.plot(*rolling_accuracy(idx[m], correct[m], samples[m]), lw=1, label=f"edge {e}")
    elif groups:
        labels = np.array([groups.get(int(e), "other") for e in edge])
        for g in dict.fromkeys(labels):
            m = labels == g
            ax.plot(*rolling_accuracy(idx[m], correct[m], samples[m]), lw=1.5, label=f"group {g}")
    else:
        _quantile_band(ax, edges, edge, idx, correct, samples)
    ax.plot(*rolling_accuracy(idx, correct, samples), color="black", lw=2, ls="--", label="fleet")
    ax.set(xlabel="edge batch (round)", ylabel=f"accuracy (last {ROLLING_BATCHES} rounds)", ylim=(0, 1))
    ax.legend(fontsize=6, ncol=2 if len(edges) > 6 else 1, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def _quantile_band(ax: Any, edges: np.ndarray, edge: np.ndarray, idx: np.ndarray, correct: np.ndarray,
                   samples: np.ndarray) -> None:
    rounds = np.unique(idx)
    grid = np.full((len(edges), len(rounds)), np.nan)
    for i, e in enumerate(edges):
        m = edge == e
        r, acc = rolling_accuracy(idx[m], correct[m], samples[m])
        grid[i, np.searchsorted(rounds, r)] = acc
    valid = ~np.all(np.isnan(grid), axis=0)
    lo, med, hi = np.nanpercentile(grid[:, valid], [10, 50, 90], axis=0)
    ax.fill_between(rounds[valid], lo, hi, alpha=0.3, label="edges 10-90%")
    ax.plot(rounds[valid], med, lw=1.5, label="edge median")


def plot_uploads(table: pa.Table, path: Path) -> None:
    """Cumulative uploads against wall time, with every sample seen for scale."""
    order = np.argsort(_col(table, "t_wall"), kind="stable")
    t = _col(table, "t_wall")[order]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(t, np.cumsum(_col(table, "samples")[order]), color="grey", ls=":", label="samples seen")
    ax.plot(t, np.cumsum(_col(table, "uploaded")[order]), label="uploaded")
    ax.set(xlabel="wall time since start (s)", ylabel="samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_domains(summary: Mapping[str, Any], path: Path) -> None:
    """Upload fraction (and accuracy) per domain, side by side."""
    per = summary.get("per_domain", {})
    names = list(per)
    x = np.arange(len(names))
    up = [per[n]["upload_fraction"] or 0.0 for n in names]
    acc = [per[n]["accuracy"] or 0.0 for n in names]
    fig = _figure(max(7.0, 0.5 * len(names) + 2), 4.0)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, up, 0.4, label="upload fraction")
    ax.bar(x + 0.2, acc, 0.4, label="accuracy")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="fraction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: Any, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """report.md's text: headline numbers, per-domain table, version lag, the plots."""
    lag = summary.get("version_lag", {})
    lines = [
        f"# Run report: {summary.get('name', summary.get('method'))}", "",
        f"Method `{summary.get('method')}`, runtime `{summary.get('runtime')}`, mode `{summary.get('mode')}`, "
        f"{summary.get('num_edges')} edges.", "",
        "| metric | value |", "| --- | --- |",
        f"| samples | {_num(summary.get('samples'))} |",
        f"| edge accuracy | {_pct(summary.get('accuracy'))} |",
        f"| uploaded | {_num(summary.get('uploaded'))} ({_pct(summary.get('upload_fraction'))}) |",
        f"| bytes up / down | {_num(summary.get('bytes_up'))} / {_num(summary.get('bytes_down'))} |",
        f"| wall time | {_num(summary.get('wall_seconds'), '.1f')} s "
        f"({_num(summary.get('samples_per_second'), ',.1f')} samples/s) |",
        f"| dropped by the cloud / rejected at edges | {_num(summary.get('dropped'))} / "
        f"{_num(summary.get('rejected'))} |",
        f"| version lag median / p95 / max | {_num(lag.get('median'), 'g')} / {_num(lag.get('p95'), 'g')} / "
        f"{_num(lag.get('max'), 'g')} |", "",
        "## Per domain", "",
        "Not uploaded, as fractions of the samples: turned away by the entropy threshold (unreliable), the entropy "
        "floor (confident), the redundancy filter (redundant), the method's upload budget per batch (budget), or "
        "the uplink (throttled).", "",
        "| domain | samples | accuracy | upload fraction | "
        + " | ".join(c.removeprefix("skipped_") for c in SKIP_COLUMNS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in SKIP_COLUMNS) + " |",
    ]
    for name, d in summary.get("per_domain", {}).items():
        skipped = d.get("skipped", {})
        why = " | ".join(_pct(skipped.get(c)) for c in SKIP_COLUMNS)
        lines.append(f"| {name} | {_num(d['samples'])} | {_pct(d['accuracy'])} | {_pct(d['upload_fraction'])} | {why} |")
    lines += _per_model_lines(summary.get("per_model") or {})
    lines += ["", "## Plots", "",
              f"Edge accuracy over time (rolling over {ROLLING_BATCHES} rounds):", "", f"![accuracy]({ACCURACY_PNG})",
              "", "Cumulative uploads:", "", f"![uploads]({UPLOADS_PNG})", "",
              "Upload fraction and accuracy per domain:", "", f"![domains]({DOMAINS_PNG})", ""]
    return "\n".join(lines)


def _per_model_lines(per: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A mixed fleet's table, one row per edge architecture (each trained by its own student in the cloud)."""
    if not per:
        return []
    lines = ["", "## Per edge architecture", "",
             "| model | edges | samples | accuracy | upload fraction | bytes down | publications loaded | "
             "version lag median / max |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in per.items():
        lag = m.get("version_lag", {})
        lines.append(f"| {name} | {m['edges']} | {_num(m['samples'])} | {_pct(m['accuracy'])} | "
                     f"{_pct(m['upload_fraction'])} | {_num(m['bytes_down'])} | {_num(m['publications_loaded'])} | "
                     f"{_num(lag.get('median'), 'g')} / {_num(lag.get('max'), 'g')} |")
    return lines


def write_report(out_dir: str | Path, table: pa.Table, summary: Mapping[str, Any]) -> Path:
    """Write report.md and its three PNGs into `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table.num_rows:
        plot_accuracy(table, summary, out / ACCURACY_PNG)
        plot_uploads(table, out / UPLOADS_PNG)
        plot_domains(summary, out / DOMAINS_PNG)
    path = out / "report.md"
    path.write_text(render_markdown(summary))
    return path
