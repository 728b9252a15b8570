"""What an interrupted publish leaves behind, and who cleans it: multipart uploads, incomplete versions
in every listing (`tessera store ls`, recursive or not), and scratch directories of killed processes.

S3 is moto's server on 127.0.0.1 standing in for MinIO, through the store's minio client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tessera.scratch import SCRATCH_PREFIX, reap, scratch_dir
from tessera.store import INCOMPLETE_MARKER, LocalStore, S3Store, join_key, open_store

MiB = 1024 * 1024


def _uploads(store: S3Store, prefix: str) -> list[str]:
    return [u.object_name for u in store._client._list_multipart_uploads(store.bucket, prefix=prefix).uploads]


def _adapter(tmp_path: Path, size: int = 1024) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text("{}")
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return directory


def test_a_killed_publishs_multipart_uploads_are_aborted_by_the_next(s3_env: str, s3_bucket: str,
                                                                     tmp_path: Path) -> None:
    """A SIGKILL cannot abort its multipart uploads: the next publish to the prefix does."""
    store = S3Store(s3_bucket, part_size=5 * MiB)
    prefix = "adapters/ns/a/v1"
    store.put_bytes("keep/me", b"x")  # creates the bucket
    store._put_bytes(f"{prefix}/{INCOMPLETE_MARKER}", b"{}")  # what the killed publish had written...
    for name in ("adapter_model.safetensors", "other.bin"):  # ...and the uploads it had started
        store._client._create_multipart_upload(s3_bucket, f"{prefix}/{name}", {})
    store._client._create_multipart_upload(s3_bucket, "adapters/ns/b/v1/adapter_model.safetensors", {})
    assert len(_uploads(store, f"{prefix}/")) == 2

    store.publish_dir(_adapter(tmp_path), prefix)
    assert _uploads(store, f"{prefix}/") == []
    assert _uploads(store, "adapters/ns/b/") != []  # another prefix's upload is not this publish's business


def test_a_publish_that_fails_midway_aborts_its_upload_and_clears_its_files(s3_env: str, s3_bucket: str,
                                                                           tmp_path: Path) -> None:
    store = S3Store(s3_bucket, part_size=5 * MiB)
    adapter = _adapter(tmp_path, size=11 * MiB)  # three parts: multipart

    class DiesMidFile:
        def begin(self, total: int) -> None: ...

        def update(self, nbytes: int) -> None:
            self.seen = getattr(self, "seen", 0) + nbytes
            if self.seen > 6 * MiB:
                raise OSError("the staged file could not be read")

    with pytest.raises(OSError, match="could not be read"):
        store.publish_dir(adapter, "adapters/ns/a/v2", progress=DiesMidFile())
    assert _uploads(store, "adapters/") == []
    assert [o.object_name for o in store._client.list_objects(s3_bucket, prefix="adapters/", recursive=True)] == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_incomplete_versions_are_hidden_from_every_listing(backend: str, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
    """Listings at any depth, recursive or not, and `tessera store ls`, show no interrupted version,
    and no directory whose only content is one."""
    if backend == "s3":
        request.getfixturevalue("s3_env")
        root = f"s3://{request.getfixturevalue('s3_bucket')}"
    else:
        root = str(tmp_path / "store")
    store, base = open_store(root)

    def key(relative: str) -> str:
        return join_key(base, relative)

    store.publish_dir(_adapter(tmp_path), key("adapters/ns/a/v1"))
    for half in ("adapters/ns/a/v2", "adapters/ns/b/v1"):  # interrupted: a marker and half the files
        store._put_bytes(key(f"{half}/{INCOMPLETE_MARKER}"), b"{}")
        store._put_bytes(key(f"{half}/adapter_config.json"), b"{}")

    # Non-recursive listings name directories with a trailing slash (join_key drops it: add it back).
    assert store.list(key("adapters/ns"), recursive=False) == [key("adapters/ns/a") + "/"]
    assert store.list(key("adapters/ns/a"), recursive=False) == [key("adapters/ns/a/v1") + "/"]
    assert store.list(key("adapters/ns/b"), recursive=False) == []
    assert store.list(key("adapters"), recursive=False) == [key("adapters/ns") + "/"]
    assert all("/v2/" not in k and "/b/" not in k for k in store.list(key("adapters")))
    env = {**os.environ}
    listed = subprocess.run([sys.executable, "-m", "tessera", "store", "ls", f"{root}/adapters/ns"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "a/" in listed.stdout and "b/" not in listed.stdout.replace("a/", "")


def _kill_holding_scratch(parent: Path, prefix: str) -> Path:
    code = ("import sys, time; from tessera.scratch import scratch_dir\n"
            f"with scratch_dir('publish', {str(parent)!r}, prefix={prefix!r}) as p:\n"
            "    (p / 'weights').write_bytes(b'x' * 4096); print(p, flush=True); time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = Path(process.stdout.readline().strip())
    assert path.is_dir()
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    process.stdout.close()
    return path


def test_scratch_of_a_killed_process_is_reaped_a_live_ones_is_not(tmp_path: Path) -> None:
    dead = _kill_holding_scratch(tmp_path, SCRATCH_PREFIX)
    assert dead.exists()  # SIGKILL: no finally ran
    with scratch_dir("mine", tmp_path) as mine:
        assert not dead.exists() and not Path(f"{dead}.lock").exists()
        assert reap(tmp_path) == [] and mine.exists()  # our own, locked, stays
    assert not mine.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_local_stores_staging_left_by_a_killed_publish_is_reaped(tmp_path: Path) -> None:
    """LocalStore stages a publish beside its final place; a killed publish's staging (tens of MB in
    practice) goes when the next publish or delete happens there, and was never listed meanwhile."""
    store = LocalStore(tmp_path / "store")
    parent = tmp_path / "store" / "adapters" / "ns" / "a"
    parent.mkdir(parents=True)
    dead = _kill_holding_scratch(parent, ".tessera-")
    assert store.list("adapters", recursive=False) == []
    old_temp = parent / ".tessera-0123456789ab-adapter_model.safetensors"  # a killed write_atomically
    old_temp.write_bytes(b"x")
    os.utime(old_temp, (time.time() - 3600, time.time() - 3600))
    store.publish_dir(_adapter(tmp_path), "adapters/ns/a/v1")
    assert sorted(p.name for p in parent.iterdir()) == ["v1"]
    assert not dead.exists()
