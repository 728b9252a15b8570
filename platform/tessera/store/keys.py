"""Keys, markers and manifests: the pure rules every store shares.

A key is a '/'-separated path inside a store (a bucket, or the store's root directory). A
"directory" is a key prefix; it exists when an object lies under it, as in S3.

Atomic publish works with two marker objects at the root of a published directory:
`_INCOMPLETE` is written before any file and removed last; `_COMPLETE` holds the sha256 manifest
and is written after every file. A directory holding `_INCOMPLETE` but no `_COMPLETE` is a publish
in progress (or an interrupted one, or a delete in progress): readers treat it as absent.
Markers are the store's bookkeeping: `list`, `manifest` and `get_dir` never return them.
The rule is applied to what a reader looks at: the directory itself or anything above it. A
listing that starts inside a directory being published does not look upward for its markers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tessera.errors import StoreError

COMPLETE_MARKER = "_COMPLETE"
INCOMPLETE_MARKER = "_INCOMPLETE"
MARKERS = frozenset({COMPLETE_MARKER, INCOMPLETE_MARKER})
# Names a store gives its own temporary files and directories; never listed as objects.
TEMP_PREFIX = ".tessera-"
CHUNK_SIZE = 1024 * 1024


class AlreadyPublishedError(StoreError):
    """The prefix already holds a complete publish; published directories are immutable."""


def normalize_key(key: str) -> str:
    """`a//b/./c/` → `a/b/c`; refuses `..` so that no key escapes its store, and NUL characters."""
    parts = [part for part in str(key).split("/") if part not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"invalid key {key!r}: '..' is not allowed in a store key")
    if "\x00" in key:
        raise StoreError("invalid key: it contains a NUL character")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    """Join key parts with '/', ignoring empty ones: `join_key("", "jobs/a")` → `jobs/a`."""
    return normalize_key("/".join(str(part) for part in parts))


def dir_prefix(key: str) -> str:
    """The listing prefix of a directory key: `a/b` → `a/b/`, the root `` stays ``."""
    return f"{key}/" if key else ""


def basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def parent_prefix(key: str) -> str:
    """The directory prefix holding `key`: `a/b/c` → `a/b/`, `c` → ``."""
    return key.rsplit("/", 1)[0] + "/" if "/" in key else ""


def is_marker(key: str) -> bool:
    return basename(key) in MARKERS


def visible_keys(raw_keys: Iterable[str]) -> list[str]:
    """What readers see of a raw recursive listing: no markers, nothing of an incomplete publish."""
    keys = list(raw_keys)
    started = {parent_prefix(k) for k in keys if basename(k) == INCOMPLETE_MARKER}
    completed = {parent_prefix(k) for k in keys if basename(k) == COMPLETE_MARKER}
    hidden = started - completed
    return [
        key for key in keys
        if not is_marker(key) and not any(key.startswith(prefix) for prefix in hidden)
    ]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(directory: Path) -> dict[str, Path]:
    """Relative path → file for every file under `directory`, sorted, without markers or temp files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreError(f"{directory} is not a directory")
    files: dict[str, Path] = {}
    for current, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(TEMP_PREFIX))
        for name in sorted(filenames):
            if name in MARKERS or name.startswith(TEMP_PREFIX):
                continue
            path = Path(current, name)
            files[path.relative_to(directory).as_posix()] = path
    return files


def local_manifest(directory: str | Path) -> dict[str, str]:
    """The sha256 manifest of a local directory, comparable with `Store.manifest(prefix)`."""
    return {rel: sha256_file(path) for rel, path in local_files(Path(directory)).items()}


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 for a whole directory: over the sorted `path sha256` lines of its manifest."""
    lines = "".join(f"{rel} {sha}\n" for rel, sha in sorted(manifest.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def complete_marker(manifest: dict[str, str], publish_id: str, completed_at: str) -> bytes:
    record = {
        "files": dict(sorted(manifest.items())),
        "sha256": manifest_digest(manifest),
        "publishId": publish_id,
        "completedAt": completed_at,
    }
    return json.dumps(record, indent=2).encode()


def safe_relative(rel: str, where: str) -> str:
    """A relative path from a listing or a marker, refused if it would leave the target directory."""
    if not rel or rel.startswith("/") or ".." in rel.split("/") or normalize_key(rel) != rel:
        raise StoreError(f"{where}: refusing unsafe path {rel!r}")
    return rel


def parse_complete_marker(data: bytes, where: str) -> dict:
    try:
        record = json.loads(data)
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError("files must be an object")
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{where} is not a valid publish marker ({error}); delete the directory") from None
    for rel in files:
        safe_relative(rel, where)
    return record
