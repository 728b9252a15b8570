"""The one interface of an artifact store; S3 and a local directory sit behind it (LoRAX's `sources/` idea).

Backends implement a few raw primitives (`_put_file`, `_walk`, `_stat`, ...). This class builds
every public operation on them, so the directory, manifest and marker rules are written once
and behave the same on MinIO and on a laptop's disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tessera.errors import ObjectNotFoundError, StoreError
from tessera.store.keys import (
    CHUNK_SIZE,
    COMPLETE_MARKER,
    INCOMPLETE_MARKER,
    TEMP_PREFIX,
    AlreadyPublishedError,
    basename,
    dir_prefix,
    is_marker,
    join_key,
    local_files,
    normalize_key,
    parent_prefix,
    parse_complete_marker,
    safe_relative,
    visible_keys,
)


class Progress(Protocol):
    """Receives byte counts of a transfer (a tqdm bar fits: see `tessera.store.progress`)."""

    def begin(self, total_bytes: int) -> None: ...

    def update(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as stream:
        yield from iter(lambda: stream.read(CHUNK_SIZE), b"")


def write_atomically(chunks: Iterable[bytes], dest: Path, progress: Progress | None = None) -> str:
    """Stream `chunks` into `dest` through a temporary sibling, so no reader sees half a file.

    Returns the sha256 of what was written. On failure the progress given is taken back,
    so a retried transfer does not count its bytes twice.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}"
    digest = hashlib.sha256()
    written = 0
    try:
        with temp.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                if progress:
                    progress.update(len(chunk))
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        if progress and written:
            progress.update(-written)
        raise
    return digest.hexdigest()


class Store(ABC):
    """An artifact store addressed by '/'-separated keys. See `tessera.store.keys` for the rules."""

    # ---- raw primitives, one set per backend; keys arrive normalized ----

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI a user or another component would use for `key` (`s3://b/k`, `file:///p/k`)."""

    @abstractmethod
    def _put_file(self, path: Path, key: str, progress: Progress | None) -> str:
        """Store the file at `key` (whole or not at all); return its sha256."""

    @abstractmethod
    def _get_file(self, key: str, path: Path, progress: Progress | None) -> str:
        """Write object `key` to `path` (whole or not at all); return its sha256."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _sha256(self, key: str) -> str:
        """sha256 of the stored object, streamed."""

    @abstractmethod
    def _walk(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` ('' or ending in '/'), markers included; missing root raises."""

    @abstractmethod
    def _stat(self, key: str) -> int | None:
        """Size of object `key`, or None when no object has that exact key."""

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """Where `key` lives on this machine's disk, for stores that are a directory; else None."""
        return None

    # ---- objects ----

    def put_file(self, local: str | Path, key: str, *, progress: Progress | None = None) -> str:
        """Upload one file (streamed, multipart when large). Returns its sha256."""
        path = Path(local)
        if not path.is_file():
            raise ObjectNotFoundError(f"{path} is not a file")
        if progress:
            progress.begin(path.stat().st_size)
        return self._put_file(path, self._object_key(key), progress)

    def get_file(self, key: str, local: str | Path, *, progress: Progress | None = None) -> Path:
        """Download one object to the file `local` (parents created). Returns the path."""
        key = self._object_key(key)
        path = Path(local)
        if path.is_dir():
            raise StoreError(f"cannot write {self.uri(key)} to {path}: it is a directory")
        if progress:
            progress.begin(self._stat(key) or 0)
        self._get_file(key, path, progress)
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put_bytes(self._object_key(key), bytes(data))

    def get_bytes(self, key: str) -> bytes:
        return self._get_bytes(self._object_key(key))

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2).encode())

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as error:
            raise StoreError(f"{self.uri(normalize_key(key))} is not valid JSON: {error}") from None

    def stat(self, key: str) -> ObjectInfo | None:
        """The object with exactly this key (None for a directory or nothing)."""
        key = normalize_key(key)
        size = self._stat(key) if key and not is_marker(key) else None
        return None if size is None else ObjectInfo(key, size)

    # ---- directories ----

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under a directory (full keys, sorted). Non-recursive: sub-directories end in '/'.

        A prefix that names one object lists that object. Markers and incomplete publishes are
        hidden, at any depth: a non-recursive listing is derived from the same visible keys, so a
        sub-directory whose only content is an interrupted publish is not shown either.
        """
        key = normalize_key(prefix)
        base = dir_prefix(key)
        keys = visible_keys(info.key for info in self._walk(base))
        if not recursive:
            keys = sorted({base + rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                           for rest in (k[len(base):] for k in keys)})
        if not keys and self.stat(key) is not None:
            keys = [key]
        return sorted(keys)

    def exists(self, key: str) -> bool:
        """True for an object, or for a directory a reader may use (not an incomplete publish)."""
        key = normalize_key(key)
        if self.stat(key) is not None or self._stat(dir_prefix(key) + COMPLETE_MARKER) is not None:
            return True
        try:
            return bool(self._visible_objects(dir_prefix(key)))
        except ObjectNotFoundError:
            return False

    def put_dir(self, local_dir: str | Path, prefix: str, *, progress: Progress | None = None) -> dict[str, str]:
        """Upload every file of `local_dir` under `prefix`. Returns the sha256 manifest.

        Not atomic (use `publish_dir` for that); refused on a published prefix, which is immutable.
        """
        files = local_files(Path(local_dir))
        key = normalize_key(prefix)
        if self._read_complete(dir_prefix(key)) is not None:
            raise AlreadyPublishedError(f"{self.uri(key)} is a published directory and cannot be changed")
        if progress:
            progress.begin(sum(path.stat().st_size for path in files.values()))
        return {rel: self._put_file(path, join_key(key, rel), progress) for rel, path in files.items()}

    def get_dir(self, prefix: str, local_dir: str | Path, *, progress: Progress | None = None) -> Path:
        """Download a directory into `local_dir`. A published one is checked against its manifest.

        An incomplete publish is absent: `ObjectNotFoundError`, never half a directory.
        """
        key = normalize_key(prefix)
        base = dir_prefix(key)
        target = Path(local_dir)
        complete = self._read_complete(base)
        if complete is not None:
            expected: dict[str, str] = complete["files"]
            if progress:
                progress.begin(sum(info.size for info in self._walk(base) if info.key[len(base):] in expected))
            for rel, sha in expected.items():
                got = self._get_file(base + rel, target / rel, progress)
                if got != sha:
                    raise StoreError(
                        f"{self.uri(base + rel)} does not match its published sha256 "
                        f"(expected {sha}, got {got}): the directory was modified after publishing"
                    )
            return target
        objects = self._visible_objects(base)
        if not objects:
            raise ObjectNotFoundError(self._absent_message(key))
        if progress:
            progress.begin(sum(info.size for info in objects))
        for info in objects:
            rel = safe_relative(info.key[len(base):], self.uri(info.key))
            self._get_file(info.key, target / rel, progress)
        return target

    def manifest(self, prefix: str) -> dict[str, str]:
        """Relative path → sha256 of every file of a directory (a publish's recorded manifest)."""
        key = normalize_key(prefix)
        complete = self._read_complete(dir_prefix(key))
        if complete is not None:
            return dict(complete["files"])
        objects = self._visible_objects(dir_prefix(key))
        if not objects:
            raise ObjectNotFoundError(self._absent_message(key))
        return {info.key[len(dir_prefix(key)):]: self._sha256(info.key) for info in objects}

    def is_published(self, prefix: str) -> bool:
        """True when `prefix` holds a complete publish."""
        return self._read_complete(dir_prefix(normalize_key(prefix))) is not None

    @abstractmethod
    def publish_dir(self, local_dir: str | Path, prefix: str, *, progress: Progress | None = None) -> dict[str, str]:
        """Upload `local_dir` to `prefix` atomically: readers see all of it or nothing.

        Refused (`AlreadyPublishedError`) when `prefix` already holds a complete publish.
        Returns the sha256 manifest, also recorded in the `_COMPLETE` marker.
        """

    def delete(self, key_or_prefix: str, recursive: bool = False, *, missing_ok: bool = False) -> None:
        """Delete an object, or with `recursive` a whole directory (a published one vanishes at once)."""
        key = normalize_key(key_or_prefix)
        if self.stat(key) is not None:
            self._delete_keys([key])
            return
        try:
            raw = [info.key for info in self._walk(dir_prefix(key))]
        except ObjectNotFoundError:
            raw = []
        if not raw:
            if missing_ok:
                return
            raise ObjectNotFoundError(f"{self.uri(key)} does not exist")
        if not recursive:
            raise StoreError(f"{self.uri(key)} is a directory: delete it recursively (CLI: rm -r)")
        self._delete_prefix(dir_prefix(key), raw)

    def _delete_prefix(self, prefix: str, raw_keys: list[str]) -> None:
        """Delete in an order that keeps every published directory whole or absent to readers.

        Each complete publish first gets `_INCOMPLETE` (now hidden), then loses `_COMPLETE`,
        then its files; the `_INCOMPLETE` markers go last.
        """
        completes = [k for k in raw_keys if basename(k) == COMPLETE_MARKER]
        for marker in completes:
            self._put_bytes(parent_prefix(marker) + INCOMPLETE_MARKER, b"{}")
        self._delete_keys(completes)
        self._delete_keys([k for k in raw_keys if not is_marker(k)])
        self._delete_keys([k for k in self._walk_or_empty(prefix) if basename(k) == INCOMPLETE_MARKER])

    # ---- helpers ----

    def _object_key(self, key: str) -> str:
        key = normalize_key(key)
        if not key:
            raise StoreError(f"{self.uri(key)} names a directory, not an object")
        if is_marker(key):
            raise StoreError(f"{self.uri(key)} is a publish marker, managed by the store itself")
        return key

    def _walk_or_empty(self, prefix: str) -> Iterator[str]:
        try:
            yield from (info.key for info in self._walk(prefix))
        except ObjectNotFoundError:
            return

    def _visible_objects(self, prefix: str) -> list[ObjectInfo]:
        objects = self._walk(prefix)
        shown = set(visible_keys(info.key for info in objects))
        return [info for info in objects if info.key in shown]

    def _read_complete(self, prefix: str) -> dict | None:
        try:
            data = self._get_bytes(prefix + COMPLETE_MARKER)
        except ObjectNotFoundError:
            return None
        return parse_complete_marker(data, self.uri(prefix + COMPLETE_MARKER))

    def _absent_message(self, key: str) -> str:
        if self._stat(dir_prefix(key) + INCOMPLETE_MARKER) is not None:
            return (
                f"{self.uri(key)} is not complete: a publish is in progress or was interrupted "
                "(publish again to finish it)"
            )
        return f"{self.uri(key)} does not exist"
