"""What every benchmark shares: its config, its output folder, and the Markdown page that names the command."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from cema_ray.config import RUN_SCHEMA, method_registry, read_yaml, validate_run_config
from cema_ray.schema import apply_overrides
from cema_ray.errors import ConfigError


def _write_table(out: Path, kind: str, title: str, rows: list[dict[str, Any]], table: str, command: str,
                 t0: float) -> int:
    """`<kind>.json` (every number) and `<kind>.md` (the table and the command that made it); prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{kind}.md").write_text(_markdown_page(title, table, command, time.perf_counter() - t0))
    print(table)
    return 0


def _split_names(text: str, what: str, known: Sequence[str], flag: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against `known`, duplicates refused (they would share a folder)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{flag} = {text!r}: give at least one {what}; known: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ConfigError(f"{flag}: unknown {what} '{name}'; known: {', '.join(known)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{flag}: {what} {', '.join(dupes)} given twice")
    return names


def _out_dir(out: Path | None, kind: str, config: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(out) if out is not None else Path("runs") / f"bench-{kind}-{config.stem}-{stamp}"


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ configs
def bench_config(path: Path, overrides: Sequence[str], fixed: Sequence[str] = ()) -> dict[str, Any]:
    """The run config with user overrides, then the benchmark's fixed keys, validated once.

    `method.settings` belong to the method the config was written for; a benchmark swaps methods, so
    settings the swapped-in method does not know are dropped (and reported) instead of failing the run.
    """
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, [*overrides, *fixed], RUN_SCHEMA)
    method = raw.get("method") or {}
    settings = method.get("settings") or {}
    if isinstance(method, dict) and isinstance(settings, dict) and settings:
        name = method.get("name", RUN_SCHEMA.fields["method"].fields["name"].default)
        if name in method_registry():
            known = method_registry().get(name).defaults
            dropped = sorted(k for k in settings if k not in known)
            if dropped:
                _progress(f"  note: method '{name}' has no setting(s) {', '.join(dropped)}; ignored")
            method["settings"] = {k: v for k, v in settings.items() if k in known}
    return validate_run_config(raw)


# ---------------------------------------------------------------------------------------- shared
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "commit": _git_commit(), "date": datetime.now().isoformat(timespec="seconds")}


def _git_commit() -> str | None:
    """HEAD of the working tree (read-only), so a table names the code that produced it."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _markdown_page(title: str, body: str, command: str, seconds: float) -> str:
    env = _environment()
    return (f"# {title}\n\n{body}\n\nReproduce:\n\n```\n{command}\n```\n\n"
            f"commit {env['commit'] or 'unknown'}, torch {env['torch']}, {env['threads']} thread(s), "
            f"{seconds:.0f} s in all, {env['date']}.\n")
