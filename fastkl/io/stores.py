"""Object stores: a SOURCE or DEST URL -> a pyarrow filesystem and a path in it (docs/guide/storage.md).

`s3://` and `gs://` go to pyarrow's native filesystems (C++ clients, range
reads) for listings and copies; on S3 the reads of SOURCE objects (pinned
to a version, `store_reads`), the uploads of parts and small objects and
the conditional writes (`store_conditional`) go through boto3, which sends
what pyarrow cannot (conditions) in fewer requests. Any other protocol
(`memory://`, `abfs://`, `hf://` ...) goes through fsspec, wrapped in
`pyarrow.fs.PyFileSystem(FSSpecHandler(...))` so that everything downstream
speaks one API. Local paths and `file://` URLs never come here: they keep the
local code path (flock, rename) of `fastkl.io.output`.

A `Store` is small and picklable (protocol + options): tasks on other
machines rebuild the filesystem from it (cached per process), so no
connection object travels with a task. Credentials and endpoints come from
the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
`AWS_REGION`, ...) and from `storage_options`, which win over it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow.fs as pafs

from ..errors import OptionError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)

# fsspec-style spellings of pyarrow.fs.S3FileSystem's arguments (s3fs users write these)
_S3_ALIASES = {"key": "access_key", "secret": "secret_key", "token": "session_token",
               "region_name": "region", "endpoint": "endpoint_override"}
S3_RETRIES = 6  # attempts of one S3 request (pyarrow's AWS retry strategy, exponential backoff)


def scheme_of(arg: Any) -> str | None:
    """The URL scheme of a SOURCE / DEST argument (lower case), None for a plain path."""
    if not isinstance(arg, str):
        return None
    m = _URL.match(arg)
    return m.group(1).lower() if m else None


def is_store_url(arg: Any) -> bool:
    """A URL that is not `file://`: served by this module, not by the local code path."""
    s = scheme_of(arg)
    return s is not None and s != "file"


class _Frozen(tuple):
    """A dict value inside storage_options (client_kwargs=...), hashable for the filesystem cache."""


def _frozen(options: Mapping[str, Any] | None) -> tuple:
    """storage_options as a hashable, picklable tuple (nested dicts too)."""
    def freeze(v):
        return _Frozen(_frozen(v)) if isinstance(v, Mapping) else v

    return tuple(sorted(((k, freeze(v)) for k, v in (options or {}).items()), key=lambda kv: kv[0]))


def _thawed(options: tuple) -> dict:
    return {k: _thawed(v) if isinstance(v, _Frozen) else v for k, v in options}


@dataclass(frozen=True)
class Store:
    """A protocol and its options: enough to rebuild the filesystem in any process."""

    protocol: str
    options: tuple = field(default=())

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.protocol, self.options)

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    def url(self, path: str) -> str:
        """The URL of a path in this store, as the user would write it."""
        return f"{self.protocol}://{path.lstrip('/')}"

    def option_dict(self) -> dict:
        return _thawed(self.options)


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Store, str]:
    """A store URL -> (Store, path inside it without the scheme; no trailing slash)."""
    m = _URL.match(url)
    if not m:
        raise OptionError(f"{url!r} is not a URL")
    protocol, rest = m.group(1).lower(), m.group(2)
    store = Store(protocol, _frozen(storage_options))
    try:
        store.fs  # noqa: B018 - build it now: a bad option or protocol is a usage error, before any work
    except OptionError:
        raise
    except (ImportError, ValueError, TypeError, OSError) as e:
        raise OptionError(f"{url!r}: cannot use the {protocol}:// store ({_first_line(e)})") from None
    path = rest.rstrip("/")
    if protocol == "memory":
        path = "/" + path.lstrip("/")
    if not path.strip("/"):
        raise OptionError(f"{url!r} names no bucket or path")
    return store, path


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


@functools.lru_cache(maxsize=32)
def _filesystem(protocol: str, options: tuple) -> pafs.FileSystem:
    """One filesystem per protocol and options in a process (clients are costly to build)."""
    opts = _thawed(options)
    if protocol in ("s3", "s3a"):
        return pafs.S3FileSystem(**s3_arguments(opts))
    if protocol in ("gs", "gcs"):
        return pafs.GcsFileSystem(**opts)
    return _fsspec(protocol, opts)


def endpoint_from_env() -> str | None:
    """The S3 endpoint the AWS SDKs read from the environment (service-specific one first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_arguments(opts: dict) -> dict:
    """pyarrow.fs.S3FileSystem's arguments from storage_options and the environment.

    pyarrow's constructor does not read AWS_ENDPOINT_URL (only `from_uri`
    does), so the endpoint, its scheme and the region are taken from the
    environment here, as boto3 does; an explicit option wins.
    """
    args = {_S3_ALIASES.get(k, k): v for k, v in opts.items() if k not in ("endpoint_url", "client_kwargs")}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    endpoint = endpoint or args.pop("endpoint_override", None) or endpoint_from_env()
    if endpoint:
        m = _URL.match(endpoint)
        if m:
            args.setdefault("scheme", m.group(1).lower())
            endpoint = m.group(2).rstrip("/")
        args["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "region" not in args:
        args["region"] = region
    if "retry_strategy" not in args:
        args["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRIES)
    return args


def _fsspec(protocol: str, opts: dict) -> pafs.FileSystem:
    """Any other protocol: fsspec's filesystem, seen through pyarrow's API."""
    try:
        import fsspec
    except ImportError:
        raise OptionError(f"{protocol}:// needs fsspec (pip install fsspec)") from None
    try:
        fs = fsspec.filesystem(protocol, **opts)
    except ValueError as e:  # unknown protocol
        raise OptionError(f"unknown storage protocol {protocol}:// ({_first_line(e)})") from None
    except ImportError as e:
        raise OptionError(f"{protocol}:// needs a package that is not installed ({_first_line(e)})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def fsspec_of(store: Store):
    """The fsspec filesystem behind a store served by fsspec, else None."""
    fs = store.fs
    if isinstance(fs, pafs.PyFileSystem):
        return fs.handler.fs
    return None


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict:
    """`--storage-option KEY=VALUE` words -> a dict; values `true`/`false`/numbers become those."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise OptionError(f"--storage-option {pair!r}: expected KEY=VALUE")
        out[key] = _value(value)
    return out


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
