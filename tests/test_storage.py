"""Unit tests of llmrec_dist.storage that need no store: how the store's failures are named, and how Ray's
scheme-less paths become locations again."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from llmrec_dist import storage


@pytest.mark.parametrize("message, cause", [
    ("When getting information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
     "operation: curlCode: 7, Could not connect to server", "cannot reach the object store at http://store:9000"),
    ("When initiating multiple part upload for key 'x/a' in bucket 'nob': AWS Error NO_SUCH_BUCKET during "
     "CreateMultipartUpload operation: The specified bucket does not exist", "bucket 'data' does not exist"),
    ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", "access denied"),
    ("AWS Error UNKNOWN (HTTP status 403) during ListObjectsV2 operation: InvalidAccessKeyId", "access denied"),
])
def test_an_access_failure_is_one_line_naming_the_uri(message, cause, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    err = storage.storage_error("s3://data/ds/items.parquet", OSError(message))
    assert isinstance(err, storage.StorageError)
    assert str(err).startswith("s3://data/ds/items.parquet: ") and cause in str(err) and "\n" not in str(err)


def test_a_missing_or_damaged_file_is_not_an_access_failure():
    assert storage.storage_error("s3://data/ds", OSError("Parquet magic bytes not found in footer")) is None
    with pytest.raises(FileNotFoundError):
        with storage.errors_named("s3://data/ds"):
            raise FileNotFoundError("s3://data/ds/manifest.json")


def test_paths_from_ray_get_their_scheme_back():
    assert storage.like("s3://bucket/sweeps", "bucket/sweeps/trials/t1/checkpoint_0") == \
        "s3://bucket/sweeps/trials/t1/checkpoint_0"
    assert storage.like("/data/sweeps", "/data/sweeps/trials/t1") == "/data/sweeps/trials/t1"
    assert storage.like("s3://bucket/x", "s3://bucket/x/y") == "s3://bucket/x/y"
    assert storage.uri_of(pafs.LocalFileSystem(), "/tmp/run") == "/tmp/run"
    assert storage.uri_of(pafs.S3FileSystem(region="us-east-1"), "bucket/run") == "s3://bucket/run"


def test_local_files_are_listed_deleted_and_uploaded(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "one.txt").write_text("1")
    (tmp_path / "src" / "two.txt").write_text("2")
    assert storage.list_files(tmp_path / "src") == ["a/one.txt", "two.txt"]
    assert storage.list_files(tmp_path / "nothing") == []
    storage.upload(tmp_path / "src", tmp_path / "dst", ["two.txt", "a/one.txt"])
    assert storage.list_files(tmp_path / "dst") == ["a/one.txt", "two.txt"]
    storage.delete(tmp_path / "dst", ["two.txt", "missing.txt"])
    assert storage.list_files(tmp_path / "dst") == ["a/one.txt"]
    storage.delete(tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
