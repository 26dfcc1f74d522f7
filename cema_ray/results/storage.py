"""Where a run's outputs go: a local folder, or a URI that pyarrow's filesystems understand.

`output.dir` (or `--out`) may be `s3://bucket/prefix` (with `?endpoint_override=host:port&scheme=http` for an
S3-compatible server), `gs://...`, `hdfs://...` or `file:///...`; pyarrow is already the project's Parquet
library, and its filesystems speak all of these with one API (credentials come from the usual environment:
`AWS_ACCESS_KEY_ID`, ...). A run with a URI works in a local staging folder (`<runs root>/.staging/...`: the
partial table, the cloud's checkpoints, the report's plots) and copies the whole folder to the URI when it ends
(also when it is interrupted). Before anything runs, a probe object is written to the URI and deleted, so a
wrong bucket or missing credentials is one line at once, not a lost run.
"""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cema_ray.errors import ConfigError


def is_uri(target: str | Path) -> bool:
    return isinstance(target, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", target) is not None


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI; one line when pyarrow cannot open it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as exc:
        raise ConfigError(f"output.dir = {uri!r}: not a location pyarrow's filesystems can open ({exc})") from None


def check_uri_writable(uri: str) -> None:
    """Create the folder (a bucket too where the URI allows it) and write and delete a probe object."""
    fs, path = open_uri(uri)
    probe = f"{path.rstrip('/')}/.cema-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"output.dir = {_redact(uri)}: cannot write there ({str(exc).splitlines()[0]})") from None


def staging_dir(uri: str, root: Path) -> Path:
    """The local working folder of a run whose outputs go to `uri`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", _redact(uri).split("?")[0]).strip("-")[-80:]
    return root / ".staging" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def publish(local: Path, uri: str) -> None:
    """Copy every file of the run's local folder to the URI (temporary files left out)."""
    fs, path = open_uri(uri)
    try:
        fs.create_dir(path, recursive=True)
        for file in sorted(p for p in Path(local).rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = file.relative_to(local).as_posix()
            pafs.copy_files(str(file), f"{path.rstrip('/')}/{rel}", destination_filesystem=fs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"output.dir = {_redact(uri)}: copying the run's outputs failed ({exc}); they are in "
                          f"{local}") from None


def _redact(uri: str) -> str:
    """The URI without secrets a user may have put in its query (access_key, secret_key, session_token)."""
    return re.sub(r"((?:access_key|secret_key|session_token)=)[^&]*", r"\1***", uri)
