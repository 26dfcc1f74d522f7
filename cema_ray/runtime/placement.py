"""Where the cloud and the edge hosts run on a cluster, and a pre-flight check of every node that may run them.

Placement is Ray's own: `cloud.resources` and `ray.host_resources` are custom resources (`ray start
--resources '{"cloud": 1}'`, a KubeRay group's `rayStartParams.resources`) that the cloud shards and the hosts
reserve, so they can only start on the nodes that offer them. The pre-flight check runs one small task on
every such node before any actor starts: a node that lacks a checkpoint or the data files the hosts will read
fails the run in one line that names the node and the path, instead of an actor dying after the start-up.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cema_ray.config import RAY_BUILTIN_RESOURCES as RESERVED
from cema_ray.errors import ConfigError, DataError
from cema_ray.models.checkpoint import card_path, card_sha, sha256_file


@dataclass(frozen=True)
class Demand:
    """What one actor reserves: the node must offer at least this of each resource."""

    role: str  # "the cloud" or "edge hosts", as a message names it
    resources: dict[str, float]

    def fits(self, node: dict[str, Any]) -> bool:
        offered = node.get("Resources", {})
        return all(offered.get(name, 0.0) >= amount for name, amount in self.resources.items() if amount > 0)


def cloud_demand(cfg: dict[str, Any]) -> Demand:
    c = cfg["cloud"]
    return Demand("the cloud", {"CPU": c["num_cpus"], "GPU": c["num_gpus"], **c["resources"]})


def host_demand(cfg: dict[str, Any]) -> Demand:
    r = cfg["ray"]
    return Demand("edge hosts", {"CPU": r["host_num_cpus"], "GPU": r["host_num_gpus"], **r["host_resources"]})


@dataclass
class NodeCheck:
    """The files one node must hold, with the sha256 a checkpoint must match (None: only present)."""

    files: dict[str, str | None] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)


def needed_files(cfg: dict[str, Any], role: str, foundation: bool, lazy_files: list[str]) -> dict[str, str | None]:
    """The checkpoints (and their cards) an actor of `role` loads, and the image files a host decodes."""
    roles = ["edge"] + (["foundation"] if role == "the cloud" and foundation else [])
    files: dict[str, str | None] = {}
    for name in roles:
        path = cfg["models"][name].get("checkpoint")
        if path:
            files[str(path)] = card_sha(path)
            if card_path(path).is_file():
                files[str(card_path(path))] = None
    if role == "edge hosts":
        files.update(dict.fromkeys(lazy_files))
    return files


@ray.remote(num_cpus=0, max_retries=0)
def _check_node(files: dict[str, str | None], corrupted: tuple[str, str, list[str]] | None) -> list[str]:
    """On the node itself: what is missing or does not match (empty when all is well)."""
    problems = []
    for path, sha in files.items():
        p = Path(path)
        if not p.is_file():
            problems.append(f"{path}: not found")
        elif sha is not None and sha256_file(p) != sha:
            problems.append(f"{path}: sha256 differs from the driver's copy (another version of the file)")
    if corrupted is not None:
        from cema_ray.data.sources import DATA_SOURCES

        source, root, names = corrupted
        try:
            DATA_SOURCES.get(source).check_files(Path(root), names)
        except DataError as exc:
            problems.append(f"data.root: {exc}")
    return problems


def preflight(cfg: dict[str, Any], clean: Any, uses_foundation: bool, skip_own_node: bool = True) -> int:
    """Check every other alive node that can take the cloud or a host; returns how many were checked.

    The driver's own node was checked before Ray started (`verify_models`, the data loaded), so a one-node
    run sends no task (`skip_own_node=False` checks it too). A demand no alive node meets fails at once on a
    local instance; on a joined cluster one line says so and the actors wait for a node to join (an autoscaler
    may add one)."""
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    lazy = [str(f) for f in getattr(clean, "files", [])]
    corrupted = _corrupted_check(cfg)
    checks: dict[str, NodeCheck] = {}
    for demand in (cloud_demand(cfg), host_demand(cfg)):
        nodes = [n for n in alive if demand.fits(n)]
        if not nodes:
            _no_node(cfg, demand)
        files = needed_files(cfg, demand.role, uses_foundation, lazy)  # the cards read once, not once per node
        for node in nodes:
            if node["NodeID"] == here and skip_own_node:
                continue
            check = checks.setdefault(node["NodeID"], NodeCheck())
            check.files.update(files)
            check.roles.add(demand.role)
    by_node = {n["NodeID"]: n for n in alive}
    refs = {node_id: _check_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote(check.files, corrupted if "edge hosts" in check.roles else None)
            for node_id, check in checks.items()}
    for node_id, ref in refs.items():
        problems = ray.get(ref)
        if problems:
            node = by_node[node_id]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"pre-flight: node {node.get('NodeManagerAddress')} ({node_id[:8]}), which may run "
                              f"{' and '.join(sorted(checks[node_id].roles))}: {problems[0]}{more}")
    return len(refs)


def _corrupted_check(cfg: dict[str, Any]) -> tuple[str, str, list[str]] | None:
    """A source that reads its corrupted domains from files on each host: (source, root, domains)."""
    from cema_ray.config import needed_corruptions
    from cema_ray.data.sources import DATA_SOURCES

    source = cfg["data"]["source"]
    info = DATA_SOURCES.get(source) if source in DATA_SOURCES else None
    if getattr(info, "kind", None) != "corrupted" or info.check_files is None or cfg["data"]["root"] is None:
        return None
    return source, str(cfg["data"]["root"]), needed_corruptions(cfg)


def _no_node(cfg: dict[str, Any], demand: Demand) -> None:
    wanted = ", ".join(f"{k} {v:g}" for k, v in demand.resources.items() if v > 0)
    if not cfg["ray"].get("address"):
        raise ConfigError(f"no node of this Ray instance offers what {demand.role} reserve ({wanted}): lower the "
                          f"reservation, or join a cluster whose nodes offer it (ray.address)")
    print(f"placement: no node of the cluster offers what {demand.role} reserve ({wanted}) yet; they wait for "
          f"one to join", file=sys.stderr, flush=True)


def node_facts(cloud_nodes: list[str], host_nodes: list[str]) -> dict[str, Any]:
    """`summary.json: placement`: each cloud shard's and host's node, and those nodes' address and custom
    resources (what a user checks their placement against)."""
    used = set(cloud_nodes) | set(host_nodes)
    nodes = {n["NodeID"]: {"address": n.get("NodeManagerAddress"),
                           "resources": {k: v for k, v in n.get("Resources", {}).items()
                                         if k not in RESERVED and not k.startswith("node:")}}
             for n in ray.nodes() if n["NodeID"] in used}
    return {"cloud": cloud_nodes, "hosts": host_nodes, "nodes": nodes}


class NodeWatch:
    """Which node each host and cloud shard runs on, and the nodes the run lost (one log line each).

    A lost node shows up to the driver as its actors failing; Ray restarts them elsewhere and the driver
    restores them as after any crash. The watch tells the two apart once the actor is back: if it came
    back on another node and its old node is dead (by then Ray's control store knows, since it restarted
    the actor because of it), the first such actor names the node and every actor that was on it."""

    def __init__(self, hosts: list[str], clouds: list[str]) -> None:
        self.where: dict[str, str] = {**{f"edge host {i}": n for i, n in enumerate(hosts)},
                                      **{cloud_key(k, len(clouds)): n for k, n in enumerate(clouds)}}
        self.lost: list[dict[str, Any]] = []

    def moved(self, actor: str, node: str) -> None:
        """`actor` (as messages name it) is back, on `node`: if its old node is gone, say so once."""
        old = self.where.get(actor)
        self.where[actor] = node
        if old is None or old == node:
            return
        known = [entry for entry in self.lost if entry["node"] == old]
        if known:
            known[0]["moved_to"][actor] = node
            return
        info = {n["NodeID"]: n for n in ray.nodes()}.get(old, {})
        if info.get("Alive", False):
            return
        on_it = sorted([actor] + [a for a, n in self.where.items() if n == old])
        self.lost.append({"node": old, "address": info.get("NodeManagerAddress"), "actors": on_it,
                          "moved_to": {actor: node}})
        print(f"node {info.get('NodeManagerAddress')} ({old[:8]}) lost: {', '.join(on_it)} restart on other nodes "
              f"and resume from their last snapshots (the cloud from its last checkpoint)", file=sys.stderr,
              flush=True)


def cloud_key(shard: int, shards: int) -> str:
    """The cloud (or shard) as a message names it."""
    return "the cloud" if shards == 1 else f"cloud shard {shard}"
