"""The adapter agent of a predictor in namespace N brings adapters from N's prefixes and the shared
ones only (issue 24: another tenant's adapter must never be served, whatever the operator sends).

No runtime or store runs here: the refusal is decided before anything is fetched, and an allowed
path gets as far as the store (which does not answer), which shows the prefix check let it through.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tessera.agent.agent import AdapterAgent, LoadRequest
from tessera.agent.app import AgentSettings
from tessera.agent.rules import AgentError

ROOT = "s3://agent-adapters"


def agent_in(namespace: str, tmp_path: Path) -> AdapterAgent:
    settings = AgentSettings(runtime="tessera", adapters_dir=tmp_path / "adapters", namespace=namespace,
                             store_roots=[ROOT], allowed_prefixes=[ROOT])  # tenancy wins over the whole store
    return AdapterAgent(settings.profile(), "http://127.0.0.1:9", settings.adapters_dir,
                        allowed_prefixes=settings.prefixes())


@pytest.mark.parametrize("path", [f"{ROOT}/adapters/tenant-b/secret-adapter/v1", f"{ROOT}/jobs/tenant-b/j/adapter",
                                  f"{ROOT}/adapters/tenant-a/../tenant-b/secret-adapter/v1",
                                  f"{ROOT}/adapters/tenant-ab/x/v1", "/var/run/secrets/kubernetes.io"])
def test_another_namespaces_adapter_is_refused_before_anything_is_fetched(tmp_path, path, monkeypatch):
    monkeypatch.setenv("TESSERA_STORE_RETRY_SECONDS", "1")
    agent = agent_in("tenant-a", tmp_path)
    with pytest.raises(AgentError) as refused:
        asyncio.run(agent.load(LoadRequest(lora_name="stolen", lora_path=path)))
    assert refused.value.status in (400, 403) and refused.value.code in ("path_not_allowed", "invalid_path")
    assert not any((tmp_path / "adapters").glob("stolen*"))


@pytest.mark.parametrize("path", [f"{ROOT}/adapters/tenant-a/mine/v1", f"{ROOT}/models/shared-adapter"])
def test_its_own_and_the_shared_prefixes_pass_the_check(tmp_path, path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "127.0.0.1:9")  # nothing listens: the fetch fails after the check
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("TESSERA_STORE_RETRY_SECONDS", "1")
    with pytest.raises(AgentError) as failed:
        asyncio.run(agent_in("tenant-a", tmp_path).load(LoadRequest(lora_name="mine", lora_path=path)))
    assert failed.value.code.startswith("store_"), failed.value.code
