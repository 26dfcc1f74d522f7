"""jobs/soak.py in a short form: the async quick start with actors killed by SIGKILL from outside."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_short_soak_finishes_with_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "soak.py"), "--minutes", "0.5", "--host-every", "10",
                           "--cloud-every", "22", "--scale", "1", "--edges", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=REPO)
    result = json.loads((out / "soak.json").read_text())
    assert done.returncode == 0, (done.stdout[-1500:], (out / "run.log").read_text()[-2000:])
    assert result["host_kills"] >= 2 and result["cloud_kills"] >= 1 and all(result["checks"].values())
    assert result["faults"]["host_failures_seen"] >= 1 and result["faults"]["cloud_failures_seen"] >= 1
