"""Where a resumed Ray run starts (`cema-ray run --resume DIR`): the cloud back at a checkpoint, every edge at
its snapshot of that round, and the table at the batches before it. The journal (`journal.py`) is what the
killed driver left; this module reads it back against the restarted cloud and hands the drivers their start.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayTaskError

from cema_ray.errors import ConfigError
from cema_ray.runtime.actor_calls import project_error, wait_for_actor
from cema_ray.runtime.async_driver import AsyncStart
from cema_ray.runtime.fleet import EdgePlan
from cema_ray.runtime.journal import ResumeJournal, redo_horizons, rows_to_resume
from cema_ray.runtime.placement import cloud_key
from cema_ray.runtime.progress import RunProgress
from cema_ray.runtime.shards import average_states
from cema_ray.runtime.sync_driver import ResumePoint


def resume_hosts(clouds: list[Any], hosts: list[Any], groups: list[list[EdgePlan]], journal: ResumeJournal,
                 out: Path, lengths: dict[int, int], progress: RunProgress, clean_ref: Any) -> ResumePoint:
    """The cloud restored its newest checkpoint (round P): restore every edge from its round-P snapshot and
    take back the recorded batches of the rounds before P.

    A sharded cloud resumes at the oldest of its shards' newest checkpoints (the driver may have died while
    the shards were checkpointing one round; each keeps the one before too), and the mean of the shards'
    pending shares is the merge the dead driver would have sent with round P."""
    found = [wait_for_actor(c.position, where=cloud_key(k, len(clouds))) for k, c in enumerate(clouds)]
    if any(restored is None for _, restored in found):
        raise ConfigError(f"cannot resume: no cloud checkpoint of this run in {out / 'cloud_checkpoints'}")
    position = min(p for p, _ in found)
    if not journal.has_round(position):  # the hosts' state of that round is missing: the newest round both hold
        older = journal.newest_round(below=position)
        if older is None:
            raise ConfigError(f"cannot resume: the cloud's newest checkpoint is at round {position}, and the hosts' "
                              f"state of no round up to it is in {journal.hosts.folder}")
        position = older
    try:
        ray.get([c.restore_at.remote(position) for c, (p, _) in zip(clouds, found) if p != position])
    except RayTaskError as exc:
        raise project_error(exc, "the cloud") or exc from None
    merge = None
    if len(clouds) > 1:
        shares = ray.get([c.pending_share.remote() for c in clouds])
        merge = average_states(shares) if all(s is not None for s in shares) else None
    saved = journal.load_round(position)
    snapshots, pubs, newest = saved.snapshots, saved.pubs, saved.newest
    rows = journal.rows_before(out, position)
    expected = sum(min(n, position) for n in lengths.values())
    if len(rows) != expected:
        raise ConfigError(f"cannot resume: {out / 'batches.parquet'} holds {len(rows)} batches of the rounds before "
                          f"{position}, the run had {expected}")
    redo = redo_horizons(out, {p.edge_id: position for group in groups for p in group})
    ray.get([h.restore.remote({p.edge_id: snapshots[p.edge_id] for p in group}, pubs, clean_ref, redo)
             for h, group in zip(hosts, groups)])
    for row in sorted(rows, key=lambda r: (r["batch_index"], r["edge_id"])):
        progress.add(row)
    print(f"resumed at round {position}: {len(rows)} batches kept, the cloud restored from its checkpoint",
          file=sys.stderr, flush=True)
    return ResumePoint(position, pubs, newest, merge, redo)


def resume_async(clouds: list[Any], hosts: list[Any], groups: list[list[EdgePlan]], journal: ResumeJournal,
                 out: Path, progress: RunProgress, clean_ref: Any) -> tuple[AsyncStart, dict[str, int]]:
    """An async run resumes at the newest round whose hosts' state the journal holds (Q): the cloud goes back
    to its checkpoint of Q (it keeps the one before its newest), every edge to its snapshot of Q, and the
    table to every edge's batches before its snapshot's cursor. Returns the start and its counts: the recorded
    batches discarded (predicted again), and the kept batches' uploads that the cloud took after its checkpoint
    (their training died with it: counted as dropped, so uploaded = cloud_ingested + dropped still holds)."""
    position = journal.newest_round()
    if position is None:
        raise ConfigError(f"cannot resume: the run in {out} saved no hosts' state yet (it stopped before the cloud's "
                          f"first checkpoint); run it again")
    found, _ = wait_for_actor(clouds[0].position, where="the cloud")
    if found != position:
        try:
            ray.get(clouds[0].restore_at.remote(position))
        except RayTaskError as exc:
            raise project_error(exc, "the cloud") or exc from None
    saved = journal.load_round(position)
    cursors = {e: int(snap["cursor"]) for e, snap in saved.snapshots.items()}
    rows, discarded = rows_to_resume(out, cursors, saved.pending)
    redo = redo_horizons(out, cursors)
    ray.get([h.restore.remote({p.edge_id: saved.snapshots[p.edge_id] for p in group}, saved.pubs, clean_ref, redo)
             for h, group in zip(hosts, groups)])
    for row in rows:
        progress.add(row)
    progress.predicted(len(rows))
    ingested = wait_for_actor(clouds[0].stats, where="the cloud")["ingested"]
    lost = max(0, sum(r["uploaded"] - r["dropped"] for r in rows) - ingested)
    print(f"resumed at the cloud's checkpoint {position}: {len(rows)} batches kept, {discarded} recorded after it "
          f"are predicted again", file=sys.stderr, flush=True)
    return (AsyncStart(position, saved.pubs, saved.newest, saved.pub_log, redo),
            {"batches_redone": discarded, "uploads_lost_in_resume": lost})
