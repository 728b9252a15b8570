"""URIs → stores, and `fetch`/`push`, the helpers other components load and save artifacts with.

S3 cases talk to a moto S3 server on 127.0.0.1, standing in for MinIO.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tessera.errors import ObjectNotFoundError, StoreError
from tessera.store import LocalStore, S3Store, fetch, join_key, local_manifest, open_store, push


def test_open_store_parses_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, key = open_store("s3://tessera/adapters//default/fpb/v1/")
    assert isinstance(store, S3Store) and store.bucket == "tessera"
    assert key == "adapters/default/fpb/v1"
    assert store.uri(key) == "s3://tessera/adapters/default/fpb/v1"

    store, key = open_store(f"file://{tmp_path}/my%20store")
    assert isinstance(store, LocalStore)
    assert store.local_path(key) == tmp_path / "my store"
    assert open_store(store.uri(key))[1] == key  # a file:// URI from the store reads back the same

    monkeypatch.chdir(tmp_path)
    store, key = open_store(".tessera/store")
    assert store.local_path(join_key(key, "jobs/default/a")) == tmp_path / ".tessera/store/jobs/default/a"

    with pytest.raises(StoreError, match="needs a bucket"):
        open_store("s3:///models")
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket/models")
    with pytest.raises(StoreError, match="must be local"):
        open_store("file://fileserver/share/models")


def test_fetch_and_push_local_and_s3(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\x01" * 5000)

    assert fetch(model, tmp_path / "unused") == model  # local: used where it is, no copy
    assert fetch(f"file://{model}/config.json", tmp_path / "unused") == model / "config.json"
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ObjectNotFoundError):
        fetch(tmp_path / "absent", tmp_path / "unused")

    assert push(model, f"s3://{s3_bucket}/models/m") == f"s3://{s3_bucket}/models/m"
    assert push(model / "config.json", f"s3://{s3_bucket}/configs/") == f"s3://{s3_bucket}/configs/config.json"

    copy = fetch(f"s3://{s3_bucket}/models/m", tmp_path / "cache" / "m")
    assert local_manifest(copy) == local_manifest(model)
    single = fetch(f"s3://{s3_bucket}/configs/config.json", tmp_path / "cache")
    assert single == tmp_path / "cache" / "config.json" and single.read_text() == "{}"
    with pytest.raises(ObjectNotFoundError, match=f"s3://{s3_bucket}/models/none"):
        fetch(f"s3://{s3_bucket}/models/none", tmp_path / "cache" / "none")


@pytest.mark.parametrize(("uri", "key"), [
    ("file:///srv/allowed/%2e%2e/outside/adp", "srv/outside/adp"),  # decoded once, then normalised
    ("file:///srv/a/%2E%2e%2Fb", "srv/b"),  # an encoded slash too
    ("file:///srv/a/%252e%252e/b", "srv/a/%2e%2e/b"),  # double encoding is decoded once only
    ("/srv/a/./b//c/", "srv/a/b/c"),
    ("/srv/a/%2e%2e/b", "srv/a/%2e%2e/b"),  # a plain path is literal
])
def test_uris_are_decoded_once_and_normalised(uri: str, key: str) -> None:
    from tessera.store import parse_uri

    location = parse_uri(uri)
    assert location.key == key
    assert parse_uri(str(location)) == location  # what the store prints reads back as the same place
    store, store_key = open_store(uri)
    assert store_key == key


@pytest.mark.parametrize("uri", ["s3://tessera/../../x", "s3://tessera/a/../../x", "s3://tessera/a/..",
                                 "s3://user:pass@bucket/x", "s3://bucket%40evil/x", "file:///a/%00b"])
def test_escaping_or_credential_bearing_uris_are_refused_everywhere(uri: str, tmp_path: Path) -> None:
    from tessera.store import parse_uri

    for use in (parse_uri, open_store, lambda u: fetch(u, tmp_path), lambda u: push(tmp_path, u)):
        with pytest.raises(StoreError) as caught:
            use(uri)
        assert "pass" not in str(caught.value)
