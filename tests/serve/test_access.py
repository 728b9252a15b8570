"""Who may call which adapter, against a real `tessera serve` (tiny model) with the openai SDK and
KServe's REST client: no token is 401; a subject allowed adapter `wealth` but not `trading` gets
answers from `wealth`, 403 from `trading` (and from a name that does not exist: no hint), and sees
only `wealth` in the model lists; every call leaves one audit line with a prompt hash, never the
prompt or the token; quotas answer 429 with Retry-After.

Kubernetes mode: TokenReview and SubjectAccessReview are answered by the Kubernetes API stand-in the
operator tests use (tests/operator/emulator.py, kmock), extended in tests/access/reviews.py with a
token table and RBAC evaluated over the Role and RoleBinding that `kubectl` applies to it, as a
platform team would on a real cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve.helpers import TINY_NAME, make_adapter, serving

NAMESPACE = "team-a"
WEALTH_TOKEN = "eyJ.wealth-bot.token-value-1"  # noqa: S105 - test tokens
TRADING_TOKEN = "eyJ.trading-bot.token-value-2"  # noqa: S105
ROLE = f"""apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: wealth-sentiment-user, namespace: {NAMESPACE}}}
rules:
- apiGroups: [tessera.dev]
  resources: [adapters]
  resourceNames: [wealth]
  verbs: [use]
"""
PROMPT = "Quarterly revenue of ACME rose"


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """`wealth` and `trading`, each with a model card naming its task (KServe's predict needs one)."""
    from tessera.adapter_format import weights_sha256

    root = tmp_path_factory.mktemp("access-adapters")
    lines = []
    for seed, name in enumerate(("wealth", "trading")):
        directory = make_adapter(tiny_base, root / name, seed=seed + 20)
        (directory / "model-card.json").write_text(json.dumps({"task": "sentiment", "baseModel": {"name": TINY_NAME}}))
        lines.append(f"- name: {name}\n  path: {directory}\n  sha256: {weights_sha256(directory)}\n")
    adapters_file = root / "adapters.yaml"
    adapters_file.write_text("".join(lines))
    return root, adapters_file


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The API stand-in with two ServiceAccount tokens, and the Role and RoleBinding kubectl applies."""
    from tests.access.reviews import service_account_user, start_reviewing_emulator

    emulator = start_reviewing_emulator({WEALTH_TOKEN: service_account_user(NAMESPACE, "wealth-bot"),
                                         TRADING_TOKEN: service_account_user(NAMESPACE, "trading-bot")})
    root = Path(__file__).resolve().parents[2]
    emulator.server.register_crd_files([root / "charts/tessera/crds/tessera.dev_crds.yaml"])
    workdir = tmp_path_factory.mktemp("cluster")
    config = emulator.kubeconfig(workdir / "kubeconfig", NAMESPACE)

    def kubectl(*args: str, stdin: str | None = None) -> str:
        result = subprocess.run(["kubectl", "--kubeconfig", str(config), *args], input=stdin, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # What docs/install.md shows. `kubectl create role --verb=use` is refused by kubectl itself (it
    # allows `use` on PodSecurityPolicies only), so the Role is a manifest; the binding is
    # `kubectl create rolebinding` (rendered, then applied: the stand-in speaks JSON, not protobuf).
    kubectl("apply", "-f", "-", stdin=ROLE)
    binding = kubectl("create", "rolebinding", "wealth-bot-uses-wealth", "--role=wealth-sentiment-user",
                      f"--serviceaccount={NAMESPACE}:wealth-bot", "-n", NAMESPACE, "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", stdin=binding)
    try:
        yield emulator, workdir
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def k8s_server(tiny_base, two_adapters, cluster):
    emulator, workdir = cluster
    root, adapters_file = two_adapters
    token_file = workdir / "server-token"
    token_file.write_text("the-predictor-service-account-token")
    audit = workdir / "audit.jsonl"
    with serving(tiny_base, workdir, "--adapters-file", str(adapters_file), "--allowed-prefix", str(root),
                 "--auth-mode", "kubernetes", "--kube-api-url", emulator.url, "--kube-token-file", str(token_file),
                 "--auth-namespace", NAMESPACE, "--audit-file", str(audit)) as url:
        yield url, audit, workdir / "server.log", emulator


def sdk(url: str, token: str | None) -> openai.OpenAI:
    # The SDK always sends a bearer header; "no token" is a client without one (httpx, below).
    return openai.OpenAI(base_url=f"{url}/openai/v1", api_key=token or "unused", max_retries=0, timeout=60)


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_kubernetes_mode_allows_wealth_refuses_trading_and_hides_it(k8s_server):
    url, audit, server_log, emulator = k8s_server
    before = len(audit_lines(audit))

    no_token = httpx.post(f"{url}/openai/v1/completions", json={"model": "wealth", "prompt": PROMPT, "max_tokens": 2})
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert no_token.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "not-a-token").completions.create(model="wealth", prompt=PROMPT, max_tokens=2)

    wealth = sdk(url, WEALTH_TOKEN)
    answer = wealth.completions.create(model="wealth", prompt=PROMPT, max_tokens=3)
    assert answer.usage.completion_tokens == 3
    chat = wealth.chat.completions.create(model="wealth", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=2)
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError) as denied:
        wealth.completions.create(model="trading", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError) as unknown:
        wealth.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert denied.value.body == unknown.value.body  # the same answer whether the adapter exists or not
    assert {m.id for m in wealth.models.list()} == {"wealth"}  # neither trading nor the ungranted base
    with pytest.raises(openai.PermissionDeniedError):
        wealth.models.retrieve("trading")

    # The trading bot has no binding at all: it sees nothing and may call nothing.
    trading = sdk(url, TRADING_TOKEN)
    assert [m.id for m in trading.models.list()] == []
    with pytest.raises(openai.PermissionDeniedError):
        trading.completions.create(model="trading", prompt=PROMPT, max_tokens=2)

    # The adapter agent in the pod (loopback, no token) still reads the whole list.
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} >= {"wealth", "trading"}

    lines = audit_lines(audit)[before:]
    assert [(line["status"], line["decision"]) for line in lines] == [
        (401, "unauthenticated"), (401, "unauthenticated"), (200, "allowed"), (200, "allowed"), (403, "denied"),
        (403, "denied"), (200, "allowed"), (403, "denied"), (200, "allowed"), (403, "denied")]
    completion = lines[2]
    assert completion["subject"] == f"system:serviceaccount:{NAMESPACE}:wealth-bot"
    assert completion["adapter"] == "wealth" and completion["namespace"] == NAMESPACE
    assert completion["tokens_out"] == 3 and completion["tokens_in"] == answer.usage.prompt_tokens
    assert completion["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert completion["version"] and len(completion["version"]) == 64  # the adapter's weights digest
    assert "prompt" not in completion
    for text in (audit.read_text(), server_log.read_text()):
        assert PROMPT not in text and WEALTH_TOKEN not in text and TRADING_TOKEN not in text
    metrics = httpx.get(f"{url}/metrics").text
    assert (f'tessera_tokens_total{{adapter="wealth",direction="out",subject="system:serviceaccount:{NAMESPACE}:'
            f'wealth-bot"}}') in metrics
    assert set(emulator.server.reviews) == {"tokenreviews", "subjectaccessreviews"}


def test_kubernetes_mode_on_kserve_routes(k8s_server):
    from kserve import InferenceRESTClient, RESTConfig

    url, audit, _, _ = k8s_server
    granted, refused = {"Authorization": f"Bearer {WEALTH_TOKEN}"}, {"Authorization": f"Bearer {TRADING_TOKEN}"}

    async def drive():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            assert await v2.is_server_ready(url)  # probes need no token
            assert await v2.is_model_ready(url, "wealth", headers=granted)
            answer = await v1.infer(url, {"instances": ["Profit rose 20%."]}, model_name="wealth", headers=granted)
            failures = []
            for headers in (refused, None):
                with pytest.raises(Exception) as failed:  # kserve's client raises on any 4xx
                    await v1.infer(url, {"instances": ["Profit rose."]}, model_name="wealth", headers=headers)
                failures.append(failed.value)
            return answer, failures
        finally:
            await v1.close()
            await v2.close()

    answer, failures = asyncio.run(drive())
    assert len(answer["predictions"]) == 1
    assert [f.response.status_code for f in failures] == [403, 401]
    assert all("error" in f.response.json() for f in failures)  # KServe's own error shape
    index = httpx.get(f"{url}/v2/models", headers=granted).json()
    assert "trading" not in index["models"] and "wealth" in index["models"]
    # KServe's answers carry no usage: the server counts the tokens in process, for the audit and quotas.
    predict = [line for line in audit_lines(audit) if line["route"] == "POST /v1/models/wealth:predict"]
    assert [line["status"] for line in predict] == [200, 403, 401]
    assert predict[0]["tokens_in"] > 0 and predict[0]["tokens_out"] > 0 and predict[0]["prompt_sha256"]


@pytest.fixture(scope="module")
def keys_server(tiny_base, two_adapters, tmp_path_factory):
    root, adapters_file = two_adapters
    workdir = tmp_path_factory.mktemp("keys")
    keys = {"alice-key-1": ("alice", ["wealth-desk"]), "bob-key-2": ("bob", ["trading-desk"])}
    (workdir / "keys.json").write_text(json.dumps({
        "keys": {hashlib.sha256(k.encode()).hexdigest(): {"subject": s, "groups": g} for k, (s, g) in keys.items()},
        "grants": [{"group": "wealth-desk", "models": ["wealth"]}, {"subject": "bob", "models": ["trading"]}]}))
    (workdir / "quotas.json").write_text(json.dumps({"subjects": {"bob": {"tokensPerMinute": 1}}}))
    audit = workdir / "audit.jsonl"
    with serving(tiny_base, workdir, "--adapters-file", str(adapters_file), "--allowed-prefix", str(root),
                 "--auth-mode", "keys", "--api-keys", str(workdir / "keys.json"),
                 "--quotas-file", str(workdir / "quotas.json"), "--audit-file", str(audit)) as url:
        yield url, audit


def test_keys_mode_allows_by_grant_and_limits_by_quota(keys_server):
    url, audit = keys_server
    alice = sdk(url, "alice-key-1")
    assert alice.completions.create(model="wealth", prompt=PROMPT, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError):
        alice.completions.create(model="trading", prompt=PROMPT, max_tokens=2)
    assert {m.id for m in alice.models.list()} == {"wealth"}
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "alice-key-9").models.list()

    # bob may use trading, at 1 token a minute: the first call takes the bucket into debt, the next is 429.
    bob = sdk(url, "bob-key-2")
    assert bob.completions.create(model="trading", prompt=PROMPT, max_tokens=2).choices
    with pytest.raises(openai.RateLimitError) as limited:
        bob.completions.create(model="trading", prompt=PROMPT, max_tokens=2)
    assert int(limited.value.response.headers["retry-after"]) >= 60  # the debt, refilled at 1 token a minute
    assert alice.completions.create(model="wealth", prompt=PROMPT, max_tokens=2).choices  # others unaffected
    decisions = [(line["subject"], line["decision"]) for line in audit_lines(audit)]
    assert decisions[-3:] == [("bob", "allowed"), ("bob", "rate_limited"), ("alice", "allowed")]
    assert "alice-key-1" not in audit.read_text()


def test_streams_are_charged_without_the_client_seeing_the_usage_chunk(keys_server):
    url, audit = keys_server
    stream = sdk(url, "alice-key-1").completions.create(model="wealth", prompt=PROMPT, max_tokens=4, stream=True)
    chunks = list(stream)
    assert chunks and all(chunk.choices for chunk in chunks)  # no usage-only chunk the client did not ask for
    line = audit_lines(audit)[-1]
    assert line["subject"] == "alice" and line["tokens_out"] == 4 and line["tokens_in"] > 0
