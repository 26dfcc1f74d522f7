"""cema_ray.atomic: every file the project writes is replaced whole or not at all."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cema_ray.atomic import atomic_write, replacing


def test_a_file_is_replaced_whole_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "summary.json"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "batches.parquet"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["batches.parquet"]
