"""Conditional writes on object stores: the one primitive the rename-free commit is built on.

pyarrow.fs has no conditional PUT, so S3 goes through boto3 here, and only
here: `put_object(IfNoneMatch="*")` creates an object only if the key is
free, `put_object(IfMatch=etag)` replaces it only if it is still the version
read (S3 has both since late 2024; MinIO, R2 and moto too). fsspec stores use
an exclusive-create open mode (`"xb"`) where the filesystem honours it
(memory://, local); a replace there compares the content first (not atomic:
such stores serve one machine). Stores with neither (pyarrow's GCS here, S3
servers that ignore the headers) are found by `probe` and the job is refused
unless the user accepts last-writer-wins.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from .stores import S3_RETRIES, Store, endpoint_from_env, fsspec_of


@dataclass(frozen=True)
class Version:
    """An object as read: its bytes, an opaque version tag (ETag) and its age."""

    data: bytes
    etag: str
    mtime: float  # seconds since the epoch (the store's clock)


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


@functools.lru_cache(maxsize=8)
def _s3_client(options: tuple):
    """A boto3 client from the same options and environment as pyarrow's S3 filesystem."""
    import boto3
    from botocore.config import Config

    o = Store("s3", options).option_dict()
    kw: dict[str, Any] = {}
    for ours, theirs in (("access_key", "aws_access_key_id"), ("key", "aws_access_key_id"),
                         ("secret_key", "aws_secret_access_key"), ("secret", "aws_secret_access_key"),
                         ("session_token", "aws_session_token"), ("token", "aws_session_token"),
                         ("region", "region_name")):
        if ours in o:
            kw[theirs] = o[ours]
    endpoint = (o.get("endpoint_url") or (o.get("client_kwargs") or {}).get("endpoint_url")
                or o.get("endpoint_override") or endpoint_from_env())
    if endpoint and "://" not in endpoint:
        endpoint = f"{o.get('scheme', 'https')}://{endpoint}"
    if endpoint:
        kw["endpoint_url"] = endpoint
    cfg = Config(retries={"max_attempts": S3_RETRIES, "mode": "standard"}, connect_timeout=10, read_timeout=30,
                 max_pool_connections=32)  # pinned reads (store_reads): tasks x concurrent GETs
    return boto3.client("s3", config=cfg, **kw)


class Conditional:
    """create / replace / read / delete of small objects (claims, manifests) on one store."""

    supported = True

    def __init__(self, store: Store):
        self.store = store

    def create(self, path: str, data: bytes) -> str | None:
        """Write `data` only if nothing is at `path`: its ETag, or None if something was there."""
        raise NotImplementedError

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        """Overwrite only the version `etag`: the new ETag, or None if it changed or vanished."""
        raise NotImplementedError

    def read(self, path: str) -> Version | None:
        fs = self.store.fs
        try:
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                return None
            with fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Version(data, hashlib.md5(data).hexdigest(), (info.mtime_ns or 0) / 1e9)

    def delete(self, path: str) -> None:
        try:
            self.store.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def abort_uploads(self, prefix: str) -> int:
        """Abort pending multipart uploads under a prefix (S3 only): how many."""
        return 0

    def probe(self, path: str) -> bool:
        """Whether the store honours conditional creates: create twice, the second must fail."""
        try:
            if self.create(path, b"probe") is None:
                return True  # taken already: nothing to learn, assume the store refused it
            return self.create(path, b"probe") is None
        finally:
            self.delete(path)


class S3Conditional(Conditional):
    """S3 and compatible servers: If-None-Match / If-Match on PutObject (boto3)."""

    def _client(self):
        return _s3_client(self.store.options)

    def _put(self, path: str, data: bytes, **cond) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split(path)
        try:
            return self._client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except BotoCoreError as e:  # no credentials, endpoint unreachable: one line naming the store
            raise OSError(f"{self.store.url(path)}: {e}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the condition failed; 409: a concurrent conditional write won meanwhile; 404: gone
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return None
            raise OSError(f"{self.store.url(path)}: {code or status}: {e}") from None

    def create(self, path: str, data: bytes) -> str | None:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        return self._put(path, data, IfMatch=etag)

    def read(self, path: str) -> Version | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split(path)
        try:
            r = self._client().get_object(Bucket=bucket, Key=key)
        except BotoCoreError as e:
            raise OSError(f"{self.store.url(path)}: {e}") from None
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"{self.store.url(path)}: {e}") from None
        return Version(r["Body"].read(), r["ETag"], r["LastModified"].timestamp())

    def abort_uploads(self, prefix: str) -> int:
        bucket, key = _split(prefix)
        c, n = self._client(), 0
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key + "/"):
            for u in page.get("Uploads", []):
                c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                n += 1
        return n


class ExclusiveConditional(Conditional):
    """fsspec stores with an exclusive-create mode ("xb"); replace compares content (not atomic)."""

    def __init__(self, store: Store):
        super().__init__(store)
        self.fs = fsspec_of(store)

    def create(self, path: str, data: bytes) -> str | None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return None
        return hashlib.md5(data).hexdigest()

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        now = self.read(path)
        if now is None or now.etag != etag:
            return None
        with self.fs.open(path, "wb") as f:
            f.write(data)
        return hashlib.md5(data).hexdigest()


class UnconditionalWrites(Conditional):
    """A store without conditional writes: plain writes, last writer wins (probe says so)."""

    supported = False

    def create(self, path: str, data: bytes) -> str | None:
        if self.read(path) is not None:
            return None
        return self._write(path, data)

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        now = self.read(path)
        return self._write(path, data) if now is not None and now.etag == etag else None

    def _write(self, path: str, data: bytes) -> str:
        with self.store.fs.open_output_stream(path) as f:
            f.write(data)
        return hashlib.md5(data).hexdigest()

    def probe(self, path: str) -> bool:
        return False


def conditional(store: Store) -> Conditional:
    """The conditional-write backend of a store."""
    if store.is_s3:
        return S3Conditional(store)
    if fsspec_of(store) is not None:
        return ExclusiveConditional(store)
    return UnconditionalWrites(store)
