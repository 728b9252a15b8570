"""The pure parts of inference access: routes, the quota ledger (on a fake clock), the keys file,
the caches, and the settings a runtime reads from its environment."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from tessera.access.identity import Identity, KeyRing, KeysFileError
from tessera.access.kube import TtlCache
from tessera.access.middleware import keep_models, listed_models, resource_name
from tessera.access.quota import QuotaExceeded, QuotaFileError, QuotaLedger, QuotaPolicy
from tessera.access.routes import Kind, Protocol, classify
from tessera.access.settings import AccessSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("method", "path", "kind", "protocol", "model"), [
    ("POST", "/v1/completions", Kind.MODEL, Protocol.OPENAI, None),
    ("POST", "/openai/v1/chat/completions", Kind.MODEL, Protocol.OPENAI, None),
    ("POST", "/tokenize", Kind.MODEL, Protocol.OPENAI, None),  # any POST names a model
    ("GET", "/v1/models", Kind.LIST, Protocol.OPENAI, None),
    ("GET", "//openai/v1/models/", Kind.LIST, Protocol.OPENAI, None),
    ("GET", "/v2/models", Kind.LIST, Protocol.KSERVE, None),
    ("GET", "/v1/models/tessera/tiny-llama", Kind.MODEL, Protocol.OPENAI, "tessera/tiny-llama"),
    ("POST", "/v1/models/wealth:predict", Kind.MODEL, Protocol.KSERVE, "wealth"),
    ("POST", "/v2/models/wealth/versions/3/infer", Kind.MODEL, Protocol.KSERVE, "wealth"),
    ("GET", "/v2/models/wealth/ready", Kind.MODEL, Protocol.KSERVE, "wealth"),
    ("GET", "/v2/health/ready", Kind.EXEMPT, Protocol.OPENAI, None),
    ("GET", "/health", Kind.EXEMPT, Protocol.OPENAI, None),
    ("GET", "/metrics", Kind.EXEMPT, Protocol.OPENAI, None),
    ("POST", "/v1/load_lora_adapter", Kind.EXEMPT, Protocol.OPENAI, None),
    ("POST", "/v2/repository/models/wealth/unload", Kind.EXEMPT, Protocol.OPENAI, None),
    ("GET", "/openapi.json", Kind.OTHER, Protocol.OPENAI, None),
])
def test_routes(method: str, path: str, kind: Kind, protocol: Protocol, model: str | None) -> None:
    route = classify(method, path)
    assert (route.kind, route.protocol, route.model) == (kind, protocol, model)


def test_the_base_is_one_resource_name_on_both_protocols() -> None:
    assert resource_name("tessera/tiny-llama") == resource_name("tiny-llama") == "tiny-llama"
    body = {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}
    assert listed_models(body) == ["a", "b"] and keep_models(body, {"b"})["data"] == [{"id": "b"}]
    assert keep_models({"models": ["a", "b"]}, {"a"}) == {"models": ["a"]}


def test_tokens_per_minute_admit_until_debt_then_retry_after_the_refill() -> None:
    clock = Clock()
    ledger = QuotaLedger(QuotaPolicy.parse({"subjects": {"bot": {"tokensPerMinute": 600}}}), clock=clock)
    bot = Identity("bot")
    ledger.release(ledger.admit(bot), 900)  # 600 in the bucket, 900 spent: 300 in debt
    with pytest.raises(QuotaExceeded) as refused:
        ledger.admit(bot)
    assert refused.value.limit == "tokens" and refused.value.retry_after == 31  # (300 + 1) / 10 per s
    clock.now += 31
    ledger.release(ledger.admit(bot), 0)
    other = Identity("someone-else")  # no limit of its own, no default: never refused, no account kept
    for _ in range(100):
        ledger.release(ledger.admit(other), 10_000)
    assert "subject:someone-else" not in ledger.accounts


def test_concurrency_per_subject_and_a_group_shared_by_its_members() -> None:
    ledger = QuotaLedger(QuotaPolicy.parse({"default": {"concurrentRequests": 2},
                                            "groups": {"desk": {"concurrentRequests": 3}}}), clock=Clock())
    alice, bob = Identity("alice", ("desk",)), Identity("bob", ("desk",))
    held = [ledger.admit(alice), ledger.admit(alice)]
    with pytest.raises(QuotaExceeded) as refused:
        ledger.admit(alice)  # her own limit
    assert (refused.value.limit, refused.value.retry_after) == ("concurrency", 1)
    held.append(ledger.admit(bob))
    with pytest.raises(QuotaExceeded):
        ledger.admit(bob)  # the desk's 3 slots are taken, though bob holds one
    ledger.release(held.pop(), 5)
    ledger.admit(bob)


@pytest.mark.parametrize(("document", "message"), [
    ({"default": {"tokensPerMinute": -1}}, "default.tokensPerMinute"),
    ({"subjects": {"x": {"concurrentRequests": "4"}}}, "subjects.x.concurrentRequests"),
    ({"groups": []}, "groups"),
])
def test_bad_quota_files_are_refused_clearly(document: dict, message: str) -> None:
    with pytest.raises(QuotaFileError, match=message):
        QuotaPolicy.parse(document)


def test_keys_file_maps_key_hashes_to_identities_and_grants(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    digest = hashlib.sha256(b"s3cret-key").hexdigest()
    grants = [{"group": "wealth", "models": ["a"]}, {"subject": "alice", "models": ["b"]}]
    path.write_text(json.dumps({"keys": {digest: {"subject": "alice", "groups": ["wealth"]}}, "grants": grants}))
    ring = KeyRing.load(path)
    alice = asyncio.run(ring.authenticate("s3cret-key"))
    assert alice == Identity("alice", ("wealth",)) and asyncio.run(ring.authenticate("other")) is None
    assert [asyncio.run(ring.allowed(alice, m)) for m in ("a", "b", "c")] == [True, True, False]


@pytest.mark.parametrize("content", ["not json", '{"keys": {"abc": {"subject": "x"}}}',
                                     json.dumps({"keys": {"a" * 64: {"groups": []}}})])
def test_bad_keys_files_are_refused_without_their_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeysFileError) as refused:
        KeyRing.load(path)
    assert content not in str(refused.value) and "a" * 64 not in str(refused.value)


def test_caches_are_bounded_and_expire() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(size=2, ttl=30, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    cache.put("c", 3)  # "b" was used least recently
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
    clock.now += 31
    assert cache.get("a") is None


def test_settings_from_a_runtime_environment() -> None:
    settings = AccessSettings.from_environment({"TESSERA_AUTH_MODE": "keys", "TESSERA_API_KEYS": "/k/keys.json",
                                                "TESSERA_AUDIT_INCLUDE_CONTENT": "true"})
    assert (settings.mode, settings.api_keys_file, settings.audit_include_content) == ("keys", Path("/k/keys.json"),
                                                                                       True)
    with pytest.raises(ValueError, match="one of kubernetes, keys, none"):
        AccessSettings(mode="open")
    with pytest.raises(ValueError, match="keys file"):
        AccessSettings(mode="keys")


def test_tessera_serve_off_loopback_needs_an_explicit_mode() -> None:
    from pydantic import ValidationError
    from tessera.serve.settings import ServeSettings

    with pytest.raises(ValidationError, match="needs --auth-mode"):
        ServeSettings(model="m", host="10.1.2.3")  # a pod's address, not loopback
    assert ServeSettings(model="m", host="10.1.2.3", auth_mode="none").access_settings().mode == "none"
    assert ServeSettings(model="m").access_settings().mode == "none"  # loopback only: the laptop default
    with pytest.raises(ValidationError, match="needs --api-keys"):
        ServeSettings(model="m", auth_mode="keys")


def test_prompt_digest_is_hashlib_of_the_field_and_survives_lone_surrogates() -> None:
    from tessera.access.audit import prompt_digest

    assert prompt_digest("Profit rose") == hashlib.sha256(b"Profit rose").hexdigest()
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_digest(messages) == hashlib.sha256(b'[{"content":"hi","role":"user"}]').hexdigest()
    assert len(prompt_digest("a\ud800b")) == 64 and prompt_digest(None) is None
