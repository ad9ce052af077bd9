"""Files that every node must see: a local/shared folder or an object-store URI (s3://, gs://, file://).

On a cluster the driver, rank 0 and the other workers run on different machines, so run state
(``run.json``, ``sweep.json``) and caches go through pyarrow's filesystems, never through a
driver-local temp file.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    location = str(location)
    return pafs.FileSystem.from_uri(location) if is_uri(location) else (pafs.LocalFileSystem(), location)


def join(root: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | os.PathLike) -> int:
    """Size in bytes of one file."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).size


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as src:
        return src.read()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole: to a temporary name first, then renamed (atomic on local and shared
    filesystems; object stores publish an object only when its upload completes)."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_json(location: str | os.PathLike) -> dict:
    return json.loads(read_bytes(location).decode("utf-8"))


def write_json(location: str | os.PathLike, data: dict) -> None:
    write_bytes(location, json.dumps(data, indent=2).encode("utf-8"))
