"""Conditional writes on object stores: the one primitive the rename-free commit is built on.

pyarrow.fs has no conditional PUT, so S3 goes through boto3 here (and in
`store_reads`, for reads pinned by If-Match): `put_object(IfNoneMatch="*")`
creates an object only if the key is free, `put_object(IfMatch=etag)`
replaces it only if it is still the version read (S3 has both since late
2024; MinIO, R2 and moto too). Plain writes and deletes of S3 objects go
here too, one request each (`put`, `delete`, `S3Upload`). fsspec stores use
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
from typing import Any, Callable

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
    attempts = getattr(o.get("retry_strategy"), "max_attempts", S3_RETRIES)  # as pyarrow's client is told
    cfg = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=30,
                 max_pool_connections=32)  # pinned reads (store_reads): tasks x concurrent GETs
    return boto3.client("s3", config=cfg, **kw)


class Conditional:
    """create / replace / read / delete of small objects (claims, manifests) on one store."""

    supported = True
    flat = False  # a prefix is nothing but its objects (no directories to remove after them)

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

    def delete_if(self, path: str, etag: str) -> bool:
        """Delete `path` only if it is still the version `etag`: whether it was deleted
        (here a read and a compare before the delete; S3 does it in one conditional request)."""
        now = self.read(path)
        if now is None or now.etag != etag:
            return False
        self.delete(path)
        return True

    def put(self, path: str, data: bytes) -> None:
        """A small object written unconditionally (whole or absent)."""
        with self.store.fs.open_output_stream(path) as f:
            f.write(data)

    def delete_prefix(self, path: str) -> None:
        """Everything under `path/`; nothing there is fine."""
        fs = self.store.fs
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass
        except OSError:
            for e in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
                if e.type == pafs.FileType.File:
                    fs.delete_file(e.path)

    def keys(self, path: str) -> list[str]:
        """Every object under `path/` (for `delete_keys`: a listing taken ahead of the deletion)."""
        sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        try:
            return [e.path for e in self.store.fs.get_file_info(sel) if e.type == pafs.FileType.File]
        except FileNotFoundError:
            return []

    def delete_keys(self, paths: list[str]) -> None:
        for p in paths:
            self.delete(p)

    def pending_uploads(self, prefix: str) -> list[tuple[str, str]]:
        """Pending multipart uploads under a prefix (S3 only): (path, upload id)."""
        return []

    def drop_if_empty(self, path: str) -> None:
        """Remove the directory `path` if nothing is left in it (stores with directories)."""
        fs = self.store.fs
        try:
            if not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
                fs.delete_dir(path)
        except OSError:
            pass

    def open_upload(self, path: str) -> Any:
        """A writable file whose bytes appear at `path` only once it is closed."""
        return self.store.fs.open_output_stream(path)

    def abort_uploads(self, prefix: str, pending: list[tuple[str, str]] | None = None) -> int:
        """Abort pending multipart uploads under a prefix (S3 only; `pending`: listed already): how many."""
        return 0

    def probe(self, path: str, answered: Callable[[bool], None] | None = None) -> bool:
        """Whether the store honours conditional creates: create twice, the second must fail
        (`answered` is told before the probe object is deleted). A first create refused means the
        key was taken already: nothing to learn, the store is assumed to have refused it."""
        try:
            ok = self.create(path, b"probe") is None or self.create(path, b"probe") is None
            if answered is not None:
                answered(ok)
            return ok
        finally:
            self.delete(path)


class S3Conditional(Conditional):
    """S3 and compatible servers: If-None-Match / If-Match on PutObject (boto3)."""

    flat = True

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

    def _call(self, path: str, method: str, **kw) -> dict:
        """One boto3 call; its failure an OSError naming the URL (transient ones say so: retried)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client(), method)(**kw)
        except (BotoCoreError, ClientError) as e:
            raise OSError(f"{self.store.url(path)}: {e}") from None

    # pyarrow's S3 filesystem would add a HEAD before a delete, a marker object for the "directory"
    # left empty after it, and three requests (a multipart upload) for any write: one request here.
    def put(self, path: str, data: bytes) -> None:
        bucket, key = _split(path)
        self._call(path, "put_object", Bucket=bucket, Key=key, Body=data)

    def delete(self, path: str) -> None:
        bucket, key = _split(path)
        self._call(path, "delete_object", Bucket=bucket, Key=key)

    def delete_if(self, path: str, etag: str) -> bool:
        """One DeleteObject with If-Match (S3 has conditional deletes, moto too): a claim taken over
        by another job meanwhile is not deleted (412), and no read is needed before."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split(path)
        try:
            self._client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except BotoCoreError as e:
            raise OSError(f"{self.store.url(path)}: {e}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict") or status in (404, 409, 412):
                return False
            raise OSError(f"{self.store.url(path)}: {code or status}: {e}") from None
        return True

    def delete_prefix(self, path: str) -> None:
        """One listing page and one batch delete per 1,000 objects (an empty prefix is no object)."""
        self.delete_keys(self.keys(path))

    def keys(self, path: str) -> list[str]:
        bucket, key = _split(path.rstrip("/") + "/")
        out: list[str] = []
        token: dict = {}
        while True:
            page = self._call(path, "list_objects_v2", Bucket=bucket, Prefix=key, **token)
            out += [f"{bucket}/{o['Key']}" for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_keys(self, paths: list[str]) -> None:
        """One batch delete per 1,000 objects of one bucket."""
        for i in range(0, len(paths), 1000):
            bucket = _split(paths[i])[0]
            doomed = [{"Key": _split(p)[1]} for p in paths[i:i + 1000]]
            self._call(paths[i], "delete_objects", Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})

    def drop_if_empty(self, path: str) -> None:
        """Nothing to do: on S3 a prefix without objects does not exist (and fastkl writes no markers)."""

    def open_upload(self, path: str) -> "S3Upload":
        return S3Upload(self, path)

    def pending_uploads(self, prefix: str) -> list[tuple[str, str]]:
        bucket, key = _split(prefix)
        return [(f"{bucket}/{u['Key']}", u["UploadId"])
                for page in self._client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                                           Prefix=key + "/")
                for u in page.get("Uploads", [])]

    def abort_uploads(self, prefix: str, pending: list[tuple[str, str]] | None = None) -> int:
        pending = self.pending_uploads(prefix) if pending is None else pending
        for path, upload in pending:
            bucket, key = _split(path)
            self._client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        return len(pending)


class S3Upload:
    """A file written into memory and uploaded by one PUT when closed (a part, most often a few
    MB: one request where a multipart upload takes three); from PART bytes on, by a multipart
    upload of PART-sized pieces, so memory stays bounded whatever the size."""

    PART = 64 << 20

    def __init__(self, cond: S3Conditional, path: str):
        self.cond, self.path = cond, path
        self.bucket, self.key = _split(path)
        self.size = 0
        self.closed = False
        self._buf = bytearray()
        self._upload: str | None = None
        self._parts: list[dict] = []

    def write(self, data) -> int:
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= self.PART:
            self._send_part()
        return len(data)

    def _send_part(self) -> None:
        if self._upload is None:
            self._upload = self.cond._call(self.path, "create_multipart_upload", Bucket=self.bucket,
                                           Key=self.key)["UploadId"]
        n = len(self._parts) + 1
        r = self.cond._call(self.path, "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload,
                            PartNumber=n, Body=bytes(self._buf))
        self._parts.append({"PartNumber": n, "ETag": r["ETag"]})
        self._buf = bytearray()

    def close(self) -> None:
        """Upload what is written: the object appears whole, now."""
        if self.closed:
            return
        self.closed = True
        if self._upload is None:
            self.cond._call(self.path, "put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))
        else:
            if self._buf or not self._parts:
                self._send_part()
            self.cond._call(self.path, "complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                            UploadId=self._upload, MultipartUpload={"Parts": self._parts})
        self._buf = bytearray()

    def abort(self) -> None:
        """Drop what was written; nothing appears."""
        self.closed = True
        self._buf = bytearray()
        if self._upload is not None:
            try:
                self.cond._call(self.path, "abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload)
            except OSError:
                pass  # `fastkl clean` and the next job abort what is left under staging

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


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

    def probe(self, path: str, answered: Callable[[bool], None] | None = None) -> bool:
        if answered is not None:
            answered(False)
        return False


def conditional(store: Store) -> Conditional:
    """The conditional-write backend of a store."""
    if store.is_s3:
        return S3Conditional(store)
    if fsspec_of(store) is not None:
        return ExclusiveConditional(store)
    return UnconditionalWrites(store)
