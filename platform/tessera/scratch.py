"""Scratch directories that do not outlive their process, even one killed with SIGKILL.

`tempfile.TemporaryDirectory` cleans up in `finally`, which a killed process never reaches, so
every killed publish left tens of megabytes in /tmp and beside the store's directories. Here the
owner holds an exclusive `flock` on a sibling `<dir>.lock` for the directory's lifetime; the kernel
drops the lock when the process dies, however it dies. Whoever makes a new scratch directory in
the same place first reaps those whose lock it can take. flock also works between containers that
share a volume but not a PID namespace, where a PID check would be wrong.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"
SCRATCH_PREFIX = "tessera-scratch-"
# A directory without a lock file is only reaped this long after its last change: its owner may be
# between creating it and locking it, or (a store's trash) still deleting it.
UNLOCKED_GRACE_SECONDS = 600.0


@contextlib.contextmanager
def scratch_dir(purpose: str, parent: str | Path | None = None, prefix: str = SCRATCH_PREFIX) -> Iterator[Path]:
    """A new empty directory `parent/<prefix><purpose>-<id>`, removed on exit (the caller may also
    rename it away). Leftovers of dead processes under `parent` with the same prefix are reaped first."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    reap(base, prefix)
    path = base / f"{prefix}{purpose}-{uuid.uuid4().hex[:12]}"
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    lock = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # before the directory exists: a reaper never sees it unlocked
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(lock)


def reap(parent: str | Path, prefix: str = SCRATCH_PREFIX) -> list[Path]:
    """Remove the scratch entries under `parent` whose owner is gone; returns what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(Path(parent).iterdir()):
            if not entry.name.startswith(prefix) or entry.name.endswith(LOCK_SUFFIX):
                continue
            if _owner_gone(entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                entry.with_name(entry.name + LOCK_SUFFIX).unlink(missing_ok=True)
                removed.append(entry)
        for lock_path in Path(parent).glob(f"{prefix}*{LOCK_SUFFIX}"):  # a lock whose directory is gone
            owner = lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX))
            if not owner.exists() and _lock_free(lock_path):
                lock_path.unlink(missing_ok=True)
    return removed


def _owner_gone(entry: Path) -> bool:
    lock_path = entry.with_name(entry.name + LOCK_SUFFIX)
    if lock_path.exists():
        return _lock_free(lock_path)
    try:
        return time.time() - entry.lstat().st_mtime > UNLOCKED_GRACE_SECONDS
    except FileNotFoundError:
        return False


def _lock_free(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases the lock we may have taken
    return True
