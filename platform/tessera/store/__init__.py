"""The artifact store: MinIO/S3 through the `minio` SDK, or a local directory with the same layout.

    store, key = open_store("s3://tessera/adapters/default/fpb/v1")   # or file:///..., or a path
    store.publish_dir("out/adapter", key)                              # atomic
    path = fetch("s3://tessera/models/tiny", "/cache/tiny")            # a local copy

The rules for keys, directories and atomic publish are in `tessera.store.keys`.
"""

from __future__ import annotations

from pathlib import Path

from tessera.errors import ObjectNotFoundError
from tessera.store.base import ObjectInfo, Progress, Store
from tessera.store.keys import (
    COMPLETE_MARKER,
    INCOMPLETE_MARKER,
    AlreadyPublishedError,
    join_key,
    local_manifest,
    manifest_digest,
)
from tessera.store.local import LocalStore
from tessera.store.retry import RetryPolicy
from tessera.store.s3 import S3Config, S3Store
from tessera.store.uri import Location, parse_uri

__all__ = [
    "COMPLETE_MARKER",
    "INCOMPLETE_MARKER",
    "AlreadyPublishedError",
    "Location",
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
    "parse_uri",
    "push",
]


def is_remote(uri: str | Path | Location) -> bool:
    return uri.is_remote if isinstance(uri, Location) else str(uri).startswith("s3://")


def open_store(uri: str | Path | Location, *, retry: RetryPolicy | None = None) -> tuple[Store, str]:
    """The store a URI lives in and the key inside it (the URI is parsed by `tessera.store.uri`).

    `s3://bucket/prefix` → (S3Store(bucket) configured from the environment, "prefix");
    `file:///abs/path` or a plain path → (LocalStore("/"), "abs/path"): a local key is the
    absolute path without its leading '/', so `store.uri(key)` gives back a `file://` URI.
    """
    location = parse_uri(uri)
    if location.is_remote:
        return S3Store(location.bucket, retry=retry), location.key
    return LocalStore("/"), location.key


def fetch(uri: str | Path, dest_dir: str | Path, *, progress: Progress | None = None) -> Path:
    """Make a file or directory URI local. A local path is returned as it is (no copy); a remote
    object lands in `dest_dir/<name>`, a remote directory's files in `dest_dir`."""
    location = parse_uri(uri)
    store, key = open_store(location)
    local = store.local_path(key)
    if local is not None:
        if not local.exists():
            raise ObjectNotFoundError(f"{store.uri(key)} does not exist")
        location.resolved()  # refuses /proc, /sys and /dev, also behind a symlink
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
