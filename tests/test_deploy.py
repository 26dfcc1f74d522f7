"""The deployment files in deploy/, checked offline (no cloud, no Kubernetes, no Docker here).

- `deploy/cluster.yaml` (`ray up`) passes Ray's own config preparation and validation, which read the cluster-
  config schema shipped in the Ray package (`ray/autoscaler/ray-schema.json`).
- the KubeRay manifests validate against the CRDs of the KubeRay release committed in `deploy/kuberay/crds/`,
  and their job entrypoints are valid cema_ray commands (the config exists, every override is a known key).
- `deploy/Dockerfile` lints clean with hadolint and builds on the Ray and Python this project is tested with.
"""
from __future__ import annotations

import copy
import functools
import gzip
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cema_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = ("raycluster.yaml", "rayjob-quickstart.yaml", "rayjob-cifar10.yaml")
CRDS = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}


def test_the_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    head, workers = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert """--resources='{"cloud": 1}'""" in head and """--resources='{"edge": 4}'""" in workers
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "prometheus --config.file=/tmp/ray/session_latest/metrics/prometheus/prometheus.yml" in head
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):  # the check can fail: a misspelt key
        validate_config(prepare_config({**copy.deepcopy(cfg), "setup_command": ["true"]}))


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict[str, Any]:
    """The storage version's OpenAPI v3 schema of a committed KubeRay CRD, closed the way `kubectl apply`'s
    default strict field validation closes it: an unknown field is an error, where the API server would
    otherwise drop it silently (a misspelt key)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.open(DEPLOY / "kuberay" / "crds" / CRDS[kind]).read(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return strict(version["schema"]["openAPIV3Schema"])


def strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_validate_against_the_committed_crds(name):
    doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__  # the Ray the project is tested with, as in the image
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {"cema-ray:0.1.0"}
    assert spec["headGroupSpec"]["resources"] == {"cloud": "1"}
    assert all("edge" in g["resources"] for g in spec["workerGroupSpecs"])


@pytest.mark.parametrize("name", [m for m in MANIFESTS if m.startswith("rayjob")])
def test_rayjob_entrypoints_are_valid_runs_placed_on_their_groups(name):
    doc = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/adapt.py"] and (REPO / argv[1]).is_file()
    config, rest = argv[2], argv[3:]
    overrides = rest[: rest.index("--out")]
    cfg = load_config(REPO / config, overrides, check_paths=False)  # every key known, every value in range
    spec = cluster_spec(doc)
    offered_head = {k: float(v) for k, v in spec["headGroupSpec"]["resources"].items()}
    offered_worker = {k: float(v) for k, v in spec["workerGroupSpecs"][0]["resources"].items()}
    assert all(offered_head.get(k, 0) >= v for k, v in cfg["cloud"]["resources"].items())
    assert all(offered_worker.get(k, 0) >= v for k, v in cfg["ray"]["host_resources"].items())
    assert cfg["cloud"]["checkpoint_dir"].startswith("/shared/")  # the volume every pod mounts
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == dockerfile_workdir()


def test_a_manifest_that_breaks_the_crd_is_caught():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    doc["spec"]["headGroupSpec"]["rayStartParam"] = {}
    errors = crd_errors(doc)
    assert any("replicas" in e for e in errors) and any("rayStartParam" in e for e in errors), errors


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    return workdir


def test_the_dockerfile_lints_clean_and_builds_on_the_tested_ray_and_python():
    text = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-cpu"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    assert ray.__version__ in ray_pin.specifier and "3.11" in SpecifierSet(project["requires-python"])
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    hadolint = str(Path(sys.executable).parent / "hadolint")
    lint = subprocess.run([hadolint, "--failure-threshold", "warning", "--no-color", str(DEPLOY / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_committed_crds_are_the_release_files_named_in_their_source_note():
    import hashlib

    note = (DEPLOY / "kuberay" / "crds" / "SOURCE.md").read_text()
    for name in CRDS.values():
        digest = hashlib.sha256(gzip.open(DEPLOY / "kuberay" / "crds" / name).read()).hexdigest()
        assert f"| `{name}` | `{digest}` |" in note, name
