"""The artifact store: MinIO/S3 through the `minio` SDK, or a local directory with the same layout.

    store, key = open_store("s3://tessera/adapters/default/fpb/v1")   # or file:///..., or a path
    store.publish_dir("out/adapter", key)                              # atomic
    path = fetch("s3://tessera/models/tiny", "/cache/tiny")            # a local copy

The rules for keys, directories and atomic publish are in `tessera.store.keys`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tessera.errors import ObjectNotFoundError, StoreError
from tessera.store.base import ObjectInfo, Progress, Store
from tessera.store.keys import (
    COMPLETE_MARKER,
    INCOMPLETE_MARKER,
    AlreadyPublishedError,
    join_key,
    local_manifest,
    manifest_digest,
    normalize_key,
)
from tessera.store.local import LocalStore
from tessera.store.retry import RetryPolicy
from tessera.store.s3 import S3Config, S3Store

__all__ = [
    "COMPLETE_MARKER",
    "INCOMPLETE_MARKER",
    "AlreadyPublishedError",
    "LocalStore",
    "ObjectInfo",
    "Progress",
    "RetryPolicy",
    "S3Config",
    "S3Store",
    "Store",
    "fetch",
    "is_remote",
    "join_key",
    "local_manifest",
    "manifest_digest",
    "open_store",
    "push",
]


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def open_store(uri: str | Path, *, retry: RetryPolicy | None = None) -> tuple[Store, str]:
    """The store a URI lives in and the key inside it.

    `s3://bucket/prefix` → (S3Store(bucket) configured from the environment, "prefix");
    `file:///abs/path` or a plain path → (LocalStore("/"), "abs/path"): a local key is the
    absolute path without its leading '/', so `store.uri(key)` gives back a `file://` URI.
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{text!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        return S3Store(bucket, retry=retry), normalize_key(key)
    if text.startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"{text!r}: file:// URIs must be local (file:///absolute/path)")
        path = Path(unquote(parts.path))
    elif "://" in text:
        raise StoreError(f"{text!r}: unsupported store URI; use s3://bucket/prefix, file:///path or a path")
    else:
        path = Path(text).expanduser()
    # abspath, not Path.absolute: `../data/x.csv` must become a key without '..'.
    return LocalStore("/"), normalize_key(Path(os.path.abspath(path)).as_posix())


def fetch(uri: str | Path, dest_dir: str | Path, *, progress: Progress | None = None) -> Path:
    """Make a file or directory URI local. A local path is returned as it is (no copy); a remote
    object lands in `dest_dir/<name>`, a remote directory's files in `dest_dir`."""
    store, key = open_store(uri)
    local = store.local_path(key)
    if local is not None:
        if not local.exists():
            raise ObjectNotFoundError(f"{store.uri(key)} does not exist")
        return local
    if store.stat(key) is not None:
        return store.get_file(key, Path(dest_dir) / key.rsplit("/", 1)[-1], progress=progress)
    return store.get_dir(key, dest_dir, progress=progress)


def push(local_path: str | Path, uri: str | Path, *, progress: Progress | None = None) -> str:
    """Upload a file or a directory to a URI; a file pushed to a URI ending in '/' keeps its name.
    Returns the URI of what was written."""
    source = Path(local_path)
    store, key = open_store(uri)
    if source.is_dir():
        store.put_dir(source, key, progress=progress)
    elif source.is_file():
        if str(uri).endswith("/") or not key:
            key = join_key(key, source.name)
        store.put_file(source, key, progress=progress)
    else:
        raise ObjectNotFoundError(f"{source} does not exist")
    return store.uri(key)
