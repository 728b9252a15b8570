"""A store that is a directory on this machine, with the same key layout as a bucket.

Files are written through a temporary sibling and `os.replace`, a directory is published by
building it in a hidden temporary directory beside its final place and `os.rename`-ing it there,
and a recursive delete renames the directory away before removing it: each is one atomic step
for readers. Temporary names start with `.tessera-` and are never listed.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from tessera.errors import ObjectNotFoundError, StoreError
from tessera.scratch import scratch_dir
from tessera.store.base import ObjectInfo, Progress, Store, read_chunks, write_atomically
from tessera.store.keys import (
    COMPLETE_MARKER,
    TEMP_PREFIX,
    AlreadyPublishedError,
    complete_marker,
    local_files,
    normalize_key,
    sha256_file,
)


class LocalStore(Store):
    """Keys are paths under `root` (`open_store` uses `/`, so a key is an absolute path without its '/')."""

    def __init__(self, root: str | Path = "/") -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def uri(self, key: str) -> str:
        return self._path(normalize_key(key)).as_uri()

    def local_path(self, key: str) -> Path:
        return self._path(normalize_key(key))

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    # ---- primitives ----

    def _put_file(self, path: Path, key: str, progress: Progress | None) -> str:
        return self._write(key, read_chunks(path), progress)

    def _get_file(self, key: str, path: Path, progress: Progress | None) -> str:
        source = self._existing_file(key)
        try:
            return write_atomically(read_chunks(source), path, progress)
        except OSError as error:
            raise StoreError(f"cannot copy {self.uri(key)} to {path}: {error.strerror or error}") from error

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, [data], None)

    def _get_bytes(self, key: str) -> bytes:
        return self._existing_file(key).read_bytes()

    def _sha256(self, key: str) -> str:
        return sha256_file(self._existing_file(key))

    def _walk(self, prefix: str) -> list[ObjectInfo]:
        directory = self._path(prefix.rstrip("/"))
        if not directory.is_dir():
            return []
        found = []
        for current, dirnames, filenames in os.walk(directory):
            dirnames[:] = [name for name in dirnames if not name.startswith(TEMP_PREFIX)]
            relative = Path(current).relative_to(directory).as_posix()
            base = prefix if relative == "." else f"{prefix}{relative}/"
            for name in filenames:
                if not name.startswith(TEMP_PREFIX):
                    found.append(ObjectInfo(base + name, Path(current, name).stat().st_size))
        return sorted(found, key=lambda info: info.key)

    def _stat(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if key and path.is_file() else None

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def _delete_prefix(self, prefix: str, raw_keys: list[str]) -> None:
        if not prefix:
            raise StoreError(f"refusing to delete the whole store {self.uri('')}")
        directory = self._path(prefix.rstrip("/"))
        with scratch_dir("trash", directory.parent, prefix=TEMP_PREFIX) as trash:
            os.rename(directory, trash / directory.name)

    # ---- atomic publish ----

    def publish_dir(self, local_dir: str | Path, prefix: str, *, progress: Progress | None = None) -> dict[str, str]:
        files = local_files(Path(local_dir))
        key = normalize_key(prefix)
        if not key:
            raise StoreError("cannot publish to the root of a store: name a directory")
        final = self._path(key)
        self._refuse_taken(key, final)
        # The staging directory is locked while in use, and a publish killed midway leaves one that
        # the next publish (or delete) beside it reaps.
        with scratch_dir("publish", final.parent, prefix=TEMP_PREFIX) as staging:
            if progress:
                progress.begin(sum(path.stat().st_size for path in files.values()))
            manifest = {
                rel: write_atomically(read_chunks(path), staging / rel, progress) for rel, path in files.items()
            }
            completed_at = datetime.now(timezone.utc).isoformat()
            marker = complete_marker(manifest, staging.name, completed_at)
            (staging / COMPLETE_MARKER).write_bytes(marker)
            try:
                os.rename(staging, final)
            except OSError:
                # Someone else got there first (rename refuses a non-empty target).
                self._refuse_taken(key, final)
                raise
        return manifest

    def _refuse_taken(self, key: str, final: Path) -> None:
        if (final / COMPLETE_MARKER).is_file():
            raise AlreadyPublishedError(f"{self.uri(key)} is already published; publish a new version instead")
        if final.is_file() or (final.is_dir() and any(final.iterdir())):
            raise StoreError(f"{self.uri(key)} already exists and is not a publish: delete it or pick another name")

    # ---- helpers ----

    def _existing_file(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"{self.uri(key)} does not exist")
        return path

    def _write(self, key: str, chunks, progress: Progress | None) -> str:
        dest = self._path(key)
        try:
            return write_atomically(chunks, dest, progress)
        except (NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as error:
            raise StoreError(f"cannot write {self.uri(key)}: {error.strerror or error}") from error
