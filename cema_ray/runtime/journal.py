"""What a run leaves on disk while it goes: a readable partial table, and for Ray runs a resumable state.

A driver killed by SIGKILL (or a lost node) cannot write anything at its end, and a run of hours must not
vanish with it. So the driver writes, as it goes:

- `batches.parquet` and `summary.json` (`"status": "interrupted"`) with every batch recorded so far, each
  replaced atomically: readable at any moment, never half written. `PartialWriter` does it every few
  seconds for every runtime; the finished run overwrites both with `"status": "complete"`.
- for Ray runs with cloud checkpoints, `resume/`: `run.json` (the run id and the config) and, at every round
  the cloud checkpoints at, every edge's snapshot and the publications the hosts hold (`resume/hosts/`, the
  cloud checkpoint's format: JSON + safetensors, sha256-checked). Sync: the state at round P is written
  *before* delivery P reaches the cloud, which checkpoints on receiving it, so whatever position the cloud's
  newest checkpoint has, the hosts' state of that round is on disk too. Async (one cloud shard): written when
  the driver learns of checkpoint P, before that delivery's publications reach an edge, with the records the
  snapshots cover that still wait for the cloud (`pending`) and the publication log.

`cema-ray run --resume DIR` restarts the cloud from its checkpoint, restores every edge from its snapshot,
keeps the recorded batches before that point, and continues: in sync mode the same records as an
uninterrupted run, in async mode every sample once (tested by killing the driver process).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from cema_ray.errors import ConfigError
from cema_ray.results import RunRecorder
from cema_ray.results.records import undelivered
from cema_ray.runtime.cloud import Publication
from cema_ray.atomic import atomic_write
from cema_ray.runtime.cloud_checkpoint import CloudCheckpointStore

RESUME_DIR = "resume"
FLUSH_EVERY_S = 10.0

WriteFn = Callable[[RunRecorder], None]


class PartialWriter:
    """Writes the table and summary so far every `every_s` seconds (and when forced)."""

    def __init__(self, write: WriteFn, every_s: float = FLUSH_EVERY_S) -> None:
        self.write, self.every_s = write, every_s
        self.last = time.monotonic()
        self.written = 0

    def maybe(self, recorder: RunRecorder, force: bool = False) -> None:
        if len(recorder) == self.written or (not force and time.monotonic() - self.last < self.every_s):
            return
        self.write(recorder)
        self.written, self.last = len(recorder), time.monotonic()


@dataclass
class RoundState:
    """What the journal holds of one round: every edge's snapshot, the publications the hosts hold, the
    newest version per student key, and (async) the pending records and the publication log."""

    snapshots: dict[int, Any]
    pubs: list[Publication]
    newest: dict[int, int]
    pending: list[dict[str, Any]]
    pub_log: list[tuple[float, int, int]]


def redo_horizons(out: Path, cursors: dict[int, int]) -> dict[int, int]:
    """Per edge, one past the last batch the interrupted run recorded at or after the edge's resume cursor:
    the batches a resumed run predicts again (its hosts count them as redone work, `cema_edge_redone_samples`)."""
    path = Path(out) / "batches.parquet"
    horizons: dict[int, int] = {}
    if path.is_file():
        for e, b in zip(*pq.read_table(path, columns=["edge_id", "batch_index"]).to_pydict().values()):
            if b >= cursors.get(e, 0):
                horizons[e] = max(horizons.get(e, 0), b + 1)
    return horizons


def rows_to_resume(out: Path, cursors: dict[int, int], pending: list[dict[str, Any]]
                   ) -> tuple[list[dict[str, Any]], int]:
    """An async run's table at its resume point: for every edge, its batches before the cursor its snapshot
    holds, each once (the recorded row where the partial table has it, else the journal's pending record,
    whose uploads the dead driver never delivered: counted as dropped). Returns (rows, rows discarded):
    batches recorded after the resume point are predicted again."""
    path = Path(out) / "batches.parquet"
    recorded = pq.read_table(path).to_pylist() if path.is_file() else []
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for rec in pending:
        if rec["batch_index"] < cursors.get(rec["edge_id"], 0):
            rows[(rec["edge_id"], rec["batch_index"])] = undelivered(rec)
    discarded = 0
    for rec in recorded:
        if rec["batch_index"] < cursors.get(rec["edge_id"], 0):
            rows[(rec["edge_id"], rec["batch_index"])] = rec
        else:
            discarded += 1
    missing = sum(cursors.values()) - len(rows)
    if missing:
        raise ConfigError(f"cannot resume: {path} and the journal hold {len(rows)} of the {sum(cursors.values())} "
                          f"batches the edges' snapshots had predicted")
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))], discarded


class ResumeJournal:
    """The resumable state of a Ray run in `<out>/resume/`."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.dir = Path(out) / RESUME_DIR
        self.run_id = run_id
        self.hosts = CloudCheckpointStore(self.dir / "hosts", run_id)

    def start(self, cfg: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "run.json", json.dumps({"run_id": self.run_id, "config": cfg}, indent=2).encode())

    @staticmethod
    def read(out: Path) -> tuple[dict[str, Any], str]:
        """(config, run id) of the run in `out`; one line when there is nothing to resume."""
        path = Path(out) / RESUME_DIR / "run.json"
        if not path.is_file():
            raise ConfigError(f"--resume {out}: no {RESUME_DIR}/run.json there; only Ray runs with "
                              "cloud.checkpoint_every > 0 (async: with one cloud shard) can be resumed")
        summary = Path(out) / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "complete":
            raise ConfigError(f"--resume {out}: that run finished (summary.json: status complete)")
        data = json.loads(path.read_text())
        return data["config"], data["run_id"]

    def save_round(self, position: int, snapshots: dict[int, Any], pubs: list[Publication],
                   newest: dict[int, int], pending: list[dict[str, Any]] | None = None,
                   pub_log: list[tuple[float, int, int]] | None = None) -> None:
        """``pending`` (async): the records of batches the snapshots cover that the table does not hold yet
        (their uploads wait for the cloud); ``pub_log``: the publications so far, for the version lags."""
        state = {"snapshots": snapshots, "newest": newest, "pending": pending or [], "pub_log": pub_log or [],
                 "pubs": [{"state": p.state, "version": p.version, "edge_id": p.edge_id, "shard": p.shard}
                          for p in pubs]}
        self.hosts.save(state, position)

    def newest_round(self, below: int | None = None) -> int | None:
        """The newest round whose hosts' state is on disk (async runs resume there), or the newest up to
        ``below`` (a sync run whose cloud checkpointed a round the hosts' state misses falls back to it)."""
        rounds = self.hosts.positions()
        if below is not None:
            rounds = [r for r in rounds if r <= below]
        return max(rounds, default=None)

    def has_round(self, position: int) -> bool:
        return position in self.hosts.positions()

    def load_round(self, position: int) -> RoundState:
        state = self.hosts.at(position)
        if state is None:
            raise ConfigError(f"cannot resume: the cloud's newest checkpoint is at round {position}, but the hosts' "
                              f"state of that round is not in {self.hosts.folder}")
        pubs = [Publication(p["state"], int(p["version"]), p["edge_id"], int(p.get("shard", 0))) for p in state["pubs"]]
        return RoundState({int(k): v for k, v in state["snapshots"].items()}, pubs,
                          {int(k): int(v) for k, v in state["newest"].items()}, list(state.get("pending", [])),
                          [tuple(e) for e in state.get("pub_log", [])])

    @staticmethod
    def rows_before(out: Path, position: int) -> list[dict[str, Any]]:
        """The recorded batches of rounds before `position` (in sync runs a batch's index is its round)."""
        path = Path(out) / "batches.parquet"
        if not path.is_file():
            return []
        return [r for r in pq.read_table(path).to_pylist() if r["batch_index"] < position]

    def finish(self) -> None:
        """The run completed: the hosts' states are no longer needed (run.json stays, as the run's record)."""
        for p in self.hosts.folder.glob("*"):
            p.unlink(missing_ok=True)

