"""Files that every node must see: a local/shared folder or an object-store URI (s3://, gs://, file://).

On a cluster the driver, rank 0 and the other workers run on different machines, so run state
(``run.json``, ``sweep.json``) and caches go through pyarrow's filesystems, never through a
driver-local temp file.

Object stores are reached with the standard credential chain only (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws``, instance roles), and an S3-compatible server
other than AWS through ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), which pyarrow, boto3 and
MLflow all read: nothing about access is ever part of a config, a log line or an MLflow param. A
failure to reach or use the store is a :class:`StorageError`: one line naming the URI and the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class StorageError(OSError):
    """An object store that cannot be reached or used (no such bucket, access denied, connection
    refused): the message is one line naming the URI and the cause."""


def endpoint() -> str:
    """The S3 endpoint in use: ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``, else AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


# What the AWS SDK (pyarrow) and botocore say, by cause; matched against the error text.
_CAUSES = (
    (r"NETWORK_CONNECTION|Could not connect|Could not resolve|Connection refused|"
     r"EndpointConnectionError|Failed to connect|Connection was closed|timed out",
     lambda uri: f"cannot reach the object store at {endpoint()} (is it running, and is "
                 "AWS_ENDPOINT_URL right?)"),
    (r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist",
     lambda uri: f"bucket {bucket(uri)!r} does not exist at {endpoint()}"),
    (r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|HTTP response code: 403"
     r"|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH",
     lambda uri: "access denied (the credentials come from the environment or the AWS profile: "
                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"),
)


def bucket(uri: str) -> str:
    """The bucket (host) of ``scheme://bucket/key``."""
    return str(uri).split("://", 1)[1].split("/", 1)[0]


def storage_error(uri: str | os.PathLike, err: BaseException) -> StorageError | None:
    """A :class:`StorageError` naming ``uri`` when ``err`` is an access failure (reach, bucket,
    credentials) rather than a missing or damaged file; else None."""
    text = str(err)
    for pattern, cause in _CAUSES:
        if re.search(pattern, text):
            return StorageError(f"{uri}: {cause(str(uri))}")
    return None


@contextlib.contextmanager
def errors_named(uri: str | os.PathLike) -> Iterator[None]:
    """Turn an object store's access failures inside the block into a one-line :class:`StorageError`
    naming ``uri``; other errors (a missing key: FileNotFoundError) pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) or (named := storage_error(uri, err)) is None:
            raise
        raise named from None


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    with errors_named(location):
        return pafs.FileSystem.from_uri(location)


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` inside ``fs`` as this module takes it: a local path, or a URI with the
    scheme that Ray's results (a ``Checkpoint``'s path) leave out."""
    scheme = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs"}.get(fs.type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme and not is_uri(path) else path


def like(root: str | os.PathLike, path: str) -> str:
    """``path`` (a path that Ray's results give without a scheme) as a location beside ``root``: with
    ``root``'s scheme when ``root`` is a URI, unchanged otherwise."""
    root = str(root)
    if not is_uri(root) or is_uri(path) or root.startswith("file://"):
        return path
    return f"{root.split('://', 1)[0]}://{path.lstrip('/')}"


def join(root: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    with errors_named(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | os.PathLike) -> int:
    """Size in bytes of one file."""
    fs, path = filesystem(location)
    with errors_named(location):
        return fs.get_file_info(path).size


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with errors_named(location), fs.open_input_stream(path) as src:
        return src.read()


def list_files(location: str | os.PathLike) -> list[str]:
    """Every file under the folder or prefix ``location``, as paths relative to it (sorted); [] when
    there is none."""
    fs, path = filesystem(location)
    root = path.rstrip("/")
    with errors_named(location):
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(info.path[len(root) + 1:] for info in infos if info.type == pafs.FileType.File)


def delete(location: str | os.PathLike, relative: list[str] | None = None) -> None:
    """Delete the files ``relative`` under ``location`` (all of them when None) and, on a local disk,
    the folder; missing files are no error."""
    fs, path = filesystem(location)
    root = path.rstrip("/")
    with errors_named(location):
        if relative is None:
            if fs.get_file_info(root).type == pafs.FileType.Directory:
                fs.delete_dir(root)
            return
        for name in relative:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(f"{root}/{name}")


def upload(folder: str | os.PathLike, location: str | os.PathLike, files: list[str]) -> None:
    """Copy the local files ``files`` (relative to ``folder``) to ``location``, in that order."""
    fs, path = filesystem(location)
    root = path.rstrip("/")
    with errors_named(location):
        for name in files:
            if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
                fs.create_dir(f"{root}/{name}".rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(os.path.join(folder, name), f"{root}/{name}", destination_filesystem=fs)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole: to a temporary name first, then renamed (atomic on local and shared
    filesystems; object stores publish an object only when its upload completes)."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    with errors_named(location):
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


def copy(source: str | os.PathLike, location: str | os.PathLike, files: list[str]) -> None:
    """Copy ``files`` (relative) from ``source`` to ``location`` on the same store, in that order (a
    server-side copy on an object store: nothing travels through this machine)."""
    fs, src = filesystem(source)
    _, dst = filesystem(location)
    with errors_named(location):
        for name in files:
            fs.copy_file(f"{src.rstrip('/')}/{name}", f"{dst.rstrip('/')}/{name}")


def require_bucket(location: str | os.PathLike) -> None:
    """For an object-store URI: a :class:`StorageError` unless its bucket exists and can be listed
    with the credentials in use (checked before any work, so nothing is half-written)."""
    if not is_uri(location) or str(location).startswith("file://"):
        return
    fs, path = filesystem(location)
    name = path.split("/", 1)[0]
    with errors_named(location):
        if fs.get_file_info(name).type == pafs.FileType.NotFound:
            raise StorageError(f"{location}: bucket {name!r} does not exist at {endpoint()}")
        fs.get_file_info(pafs.FileSelector(name, recursive=False, allow_not_found=True))


def read_json(location: str | os.PathLike) -> dict:
    return json.loads(read_bytes(location).decode("utf-8"))


def write_json(location: str | os.PathLike, data: dict) -> None:
    write_bytes(location, json.dumps(data, indent=2).encode("utf-8"))
