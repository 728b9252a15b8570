"""One behaviour suite, run against both stores: the local directory and S3.

The S3 runs talk HTTP to a moto S3 server on 127.0.0.1 (standing in for MinIO) through the
`minio` SDK; each test gets its own bucket.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from minio import Minio
from tessera.errors import ObjectNotFoundError, StoreError
from tessera.store import (
    AlreadyPublishedError,
    LocalStore,
    RetryPolicy,
    S3Store,
    Store,
    local_manifest,
)


class Backend:
    """A store under test and a raw view of what it physically holds (every file, hidden or not)."""

    def __init__(self, store: Store, raw_paths: Callable[[], list[str]]) -> None:
        self.store = store
        self.raw_paths = raw_paths


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Backend(
            LocalStore(root),
            lambda: [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()],
        )
    endpoint = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    raw = Minio(endpoint.removeprefix("http://"), os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")

    def raw_paths() -> list[str]:
        if not raw.bucket_exists(bucket):
            return []
        return [o.object_name for o in raw.list_objects(bucket, recursive=True)]

    return Backend(S3Store(bucket, retry=RetryPolicy(total_seconds=5)), raw_paths)


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A small PEFT-like directory: nested files, an empty file, binary data."""
    root = tmp_path / "adapter"
    (root / "tokenizer").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 32}')
    (root / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (root / "tokenizer" / "special_tokens_map.json").write_text("{}")
    (root / "model-card.json").write_text('{"task": "sentiment"}')
    (root / "empty.txt").write_bytes(b"")
    return root


class Observer:
    """A `Progress` that runs a check each time the store reports bytes moved."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check
        self.calls = 0

    def begin(self, total_bytes: int) -> None:
        pass

    def update(self, nbytes: int) -> None:
        self.calls += 1
        self.check()


def test_bytes_and_json_round_trip(store: Store) -> None:
    store.put_bytes("jobs/ns/a/logs/raw.bin", b"\x00\x01payload")
    store.put_json("jobs/ns/a/logs/progress.json", {"step": 3, "percent": 37.5})
    store.put_json("jobs/ns/a/logs/progress.json", {"step": 4, "percent": 50.0})

    assert store.get_bytes("jobs/ns/a/logs/raw.bin") == b"\x00\x01payload"
    assert store.get_json("jobs/ns/a/logs/progress.json") == {"step": 4, "percent": 50.0}
    assert store.exists("jobs/ns/a/logs/raw.bin") and store.exists("jobs/ns/a")
    assert store.stat("jobs/ns/a/logs/raw.bin").size == 9
    assert not store.exists("jobs/ns/b")


def test_missing_objects_and_bad_json_are_clear_errors(store: Store, tmp_path: Path) -> None:
    store.put_bytes("present.txt", b"not json")
    with pytest.raises(ObjectNotFoundError, match="does not exist") as missing:
        store.get_bytes("models/none/config.json")
    assert store.uri("models/none/config.json") in str(missing.value)
    with pytest.raises(ObjectNotFoundError, match="models/none/weights"):
        store.get_file("models/none/weights", tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
    with pytest.raises(ObjectNotFoundError):
        store.get_dir("models/none", tmp_path / "dir")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.get_json("present.txt")
    with pytest.raises(StoreError, match=r"'\.\.' is not allowed"):
        store.get_bytes("jobs/../../etc/passwd")


def test_files_and_listing(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "prepared.jsonl"
    source.write_text('{"prompt": "p", "completion": "c"}\n' * 100)
    for key in ("jobs/ns/a/prepared/train.jsonl", "jobs/ns/a/prepared/eval.jsonl", "jobs/ns/ab/x.json"):
        store.put_file(source, key)

    downloaded = store.get_file("jobs/ns/a/prepared/train.jsonl", tmp_path / "out" / "train.jsonl")
    assert downloaded.read_bytes() == source.read_bytes()

    assert store.list("jobs/ns/a") == ["jobs/ns/a/prepared/eval.jsonl", "jobs/ns/a/prepared/train.jsonl"]
    assert store.list("jobs/ns", recursive=False) == ["jobs/ns/a/", "jobs/ns/ab/"]
    assert store.list("jobs/ns/a/prepared/eval.jsonl") == ["jobs/ns/a/prepared/eval.jsonl"]
    assert store.list("jobs/none") == []


def test_delete_objects_and_directories(store: Store, tmp_path: Path, adapter_dir: Path) -> None:
    store.put_dir(adapter_dir, "checkpoints/step-10")
    store.put_bytes("checkpoints/latest", b"step-10")

    store.delete("checkpoints/latest")
    assert not store.exists("checkpoints/latest")
    with pytest.raises(StoreError, match="is a directory"):
        store.delete("checkpoints/step-10")
    assert store.exists("checkpoints/step-10")
    store.delete("checkpoints/step-10", recursive=True)
    assert store.list("checkpoints") == []
    with pytest.raises(ObjectNotFoundError):
        store.delete("checkpoints/step-10", recursive=True)
    store.delete("checkpoints/step-10", recursive=True, missing_ok=True)


def test_directory_round_trip_keeps_every_byte(store: Store, tmp_path: Path, adapter_dir: Path) -> None:
    expected = local_manifest(adapter_dir)
    assert len(expected) == 6

    uploaded = store.put_dir(adapter_dir, "models/tiny")
    assert uploaded == expected
    assert store.manifest("models/tiny") == expected  # hashed from what the store holds

    copy = store.get_dir("models/tiny", tmp_path / "copy")
    assert local_manifest(copy) == expected


def test_publish_is_immutable(store: Store, tmp_path: Path, adapter_dir: Path) -> None:
    prefix = "adapters/default/fpb/v1"
    manifest = store.publish_dir(adapter_dir, prefix)
    assert manifest == local_manifest(adapter_dir)
    assert store.is_published(prefix)
    assert store.manifest(prefix) == manifest
    assert local_manifest(store.get_dir(prefix, tmp_path / "loaded")) == manifest
    assert store.list(prefix) == sorted(f"{prefix}/{rel}" for rel in manifest)  # markers stay hidden

    with pytest.raises(AlreadyPublishedError, match="already published"):
        store.publish_dir(adapter_dir, prefix)
    with pytest.raises(AlreadyPublishedError):
        store.put_dir(adapter_dir, prefix)

    store.delete(prefix, recursive=True)
    assert not store.exists(prefix)
    store.publish_dir(adapter_dir, prefix)
    assert store.is_published(prefix)


def test_publish_refuses_a_plain_directory(store: Store, adapter_dir: Path) -> None:
    store.put_dir(adapter_dir, "adapters/default/fpb/v2")
    with pytest.raises(StoreError, match="not a publish"):
        store.publish_dir(adapter_dir, "adapters/default/fpb/v2")


def test_readers_never_see_a_partial_publish(backend: Backend, tmp_path: Path, adapter_dir: Path) -> None:
    store = backend.store
    prefix = "adapters/default/fpb/v1"
    store.put_bytes("adapters/default/fpb/v0/adapter_config.json", b"{}")
    files = local_manifest(adapter_dir)
    physically_present: list[int] = []

    def reader_view() -> None:
        assert store.list(prefix) == []
        assert store.list("adapters") == ["adapters/default/fpb/v0/adapter_config.json"]
        assert store.list(prefix, recursive=False) == []
        assert not store.exists(prefix)
        assert not store.is_published(prefix)
        with pytest.raises(ObjectNotFoundError):
            store.get_dir(prefix, tmp_path / "reader")
        with pytest.raises(ObjectNotFoundError):
            store.manifest(prefix)
        raw = backend.raw_paths()
        physically_present.append(sum(any(p.endswith(f"/{rel}") for p in raw) for rel in files))

    observer = Observer(reader_view)
    store.publish_dir(adapter_dir, prefix, progress=observer)

    assert observer.calls >= 4
    # The files really were arriving while readers saw nothing: the hiding did the work.
    assert any(0 < count < len(files) for count in physically_present), physically_present
    assert store.manifest(prefix) == files
    assert local_manifest(store.get_dir(prefix, tmp_path / "after")) == files


def test_interrupted_publish_stays_absent_and_can_be_finished(
    store: Store, tmp_path: Path, adapter_dir: Path
) -> None:
    prefix = "adapters/default/fpb/v3"

    def crash_midway() -> None:
        if observer.calls == 3:
            raise RuntimeError("pod evicted")

    observer = Observer(crash_midway)
    with pytest.raises(RuntimeError, match="pod evicted"):
        store.publish_dir(adapter_dir, prefix, progress=observer)

    assert not store.exists(prefix)
    assert store.list(prefix) == []
    with pytest.raises(ObjectNotFoundError):
        store.get_dir(prefix, tmp_path / "half")

    (adapter_dir / "model-card.json").unlink()
    store.publish_dir(adapter_dir, prefix)
    assert store.manifest(prefix) == local_manifest(adapter_dir)
    assert store.list(prefix) == sorted(f"{prefix}/{rel}" for rel in local_manifest(adapter_dir))


def test_a_modified_publish_is_detected_on_read(store: Store, tmp_path: Path, adapter_dir: Path) -> None:
    prefix = "adapters/default/fpb/v4"
    store.publish_dir(adapter_dir, prefix)
    store.put_bytes(f"{prefix}/adapter_model.safetensors", b"tampered")
    with pytest.raises(StoreError, match="does not match its published sha256"):
        store.get_dir(prefix, tmp_path / "loaded")
