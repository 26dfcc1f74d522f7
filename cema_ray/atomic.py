"""Files written whole or not at all: one way for every file a run, a checkpoint or a cache writes.

A reader (the dashboard, `cema-ray status`, a resumed run) or a kill must never meet half a file. Every writer
writes to a temporary file in the target's own folder (so that the rename stays on one file system), syncs it to
disk (so that a crash right after the rename does not leave an empty file), makes it readable by others like any
file written plainly (0644), and renames it over the target; on failure the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path to write the new ``path`` to. When the block ends without an error it becomes ``path``
    (synced, then renamed); when the block raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
