"""Runtimes: `local` (one process, the reference) and `ray` (edge hosts + a cloud actor)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def default_out_dir(cfg: dict[str, Any]) -> Path | str:
    from cema_ray.config import resolve_output_dir

    return resolve_output_dir(cfg)


def check_writable(out: Path) -> None:
    """Create the output folder and write a probe file now, so a folder that cannot hold the results
    fails in one line before the run, not with a traceback after it."""
    from cema_ray.errors import ConfigError

    probe = out / ".cema-write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out}: cannot write there ({exc.strerror or exc})") from None


RESOLVED_CONFIG = "resolved_config.yaml"


def write_resolved_config(cfg: dict[str, Any], out: Path) -> Path:
    """Every key of the run with the value it used (defaults filled, method settings resolved, the data folder
    found), before the run starts: `cema-ray run <out>/resolved_config.yaml` runs the same experiment again."""
    import yaml

    from cema_ray.atomic import atomic_write

    path = out / RESOLVED_CONFIG
    text = ("# what this run used, every key resolved; `cema-ray run` this file to run it again\n"
            + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    atomic_write(path, text.encode())
    return path


def run_experiment(cfg: dict[str, Any], out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run a validated config on its runtime and write batches.parquet, summary.json, report.md.

    While it runs, the table and summary so far are rewritten every few seconds (`status: interrupted`), so a
    killed driver leaves them readable; `resume=True` continues the sync Ray run in `out_dir`
    (`runtime.journal`). On Ctrl-C the batches predicted so far are written all the same and the interrupt
    is re-raised, carrying the folder (`RunInterrupted.out`)."""
    from cema_ray.config import runs_root
    from cema_ray.results.storage import check_uri_writable, is_uri, publish, staging_dir

    target = out_dir if out_dir else default_out_dir(cfg)
    uri = str(target) if is_uri(target) else None
    if uri is not None:  # outputs for a filesystem URI: work in a local staging folder, copy it there at the end
        check_uri_writable(uri)
        out = staging_dir(uri, runs_root())
    else:
        out = Path(target)
    check_writable(out)
    write_resolved_config(cfg, out)
    from cema_ray.errors import RunInterrupted
    from cema_ray.runtime.journal import PartialWriter

    partial = PartialWriter(lambda rec: _write(cfg, out, rec, INTERRUPTED, report=False))
    try:
        if cfg["runtime"] == "local":
            from cema_ray.runtime.local import run_local

            recorder, facts = run_local(cfg, partial)
        else:
            from cema_ray.runtime.ray_runner import run_ray

            recorder, facts = run_ray(cfg, out, partial=partial, resume=resume)
    except RunInterrupted as stop:  # Ctrl-C: what was predicted so far is written, marked interrupted
        stop.out = uri or out
        stop.batches = len(stop.recorder.rows)
        if stop.batches:
            _write(cfg, out, stop.recorder, {**stop.facts, **INTERRUPTED})
        if uri is not None:
            publish(out, uri)
        raise
    summary = _write(cfg, out, recorder, {**facts, "interrupted": False, "status": "complete"})
    if uri is not None:
        publish(out, uri)
        summary["out_dir"], summary["staging_dir"] = uri, str(out)
    return summary


INTERRUPTED = {"interrupted": True, "status": "interrupted"}


def _write(cfg: dict[str, Any], out: Path, recorder: Any, facts: dict[str, Any],
           report: bool | None = None) -> dict[str, Any]:
    from cema_ray.results import write_outputs
    from cema_ray.runtime.fleet import edge_model_names, edge_plans

    plans, models = edge_plans(cfg), edge_model_names(cfg)
    meta = {
        "edge_groups": {p.edge_id: p.profile.group for p in plans},
        **({"edge_models": {p.edge_id: models[p.model] for p in plans}} if len(models) > 1 else {}),
        "name": cfg["name"], "method": cfg["method"]["name"], "runtime": cfg["runtime"], "mode": cfg["mode"],
        "num_edges": cfg["edges"]["count"], "seed": cfg["seed"], "data_source": cfg["data"]["source"], **facts,
    }
    summary = write_outputs(out, recorder, meta, report=cfg["output"].get("report", True) if report is None else report)
    summary["out_dir"] = str(out)
    return summary
