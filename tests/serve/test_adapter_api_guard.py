"""`tessera serve --adapter-api-loopback-only` (the chart's Tessera runtime): the adapter API (vLLM's
load/unload, KServe's repository load/unload) answers only callers on the pod's loopback, where the
adapter agent runs; any other caller gets 403 and the adapters stay as they were, while inference
stays open to every caller. The server listens on 127.0.0.1; a client whose connections leave from
this machine's non-loopback address stands in for a peer pod."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.serve.helpers import make_adapter, serving


def _outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None on a machine without one)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def guarded(tiny_base, tmp_path_factory):
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    root = tmp_path_factory.mktemp("guarded")
    adapter = make_adapter(tiny_base, root / "a", seed=3)
    with serving(tiny_base, root, "--allowed-prefix", str(root), "--adapter-api-loopback-only") as url:
        # The peer: the same server, but the connection's source address is not loopback.
        peer = httpx.Client(transport=httpx.HTTPTransport(local_address=outside), timeout=60)
        yield url, peer, adapter
        peer.close()


def _served(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def test_only_loopback_callers_load_and_unload(guarded):
    local, peer, adapter = guarded
    body = {"lora_name": "guarded", "lora_path": str(adapter)}
    refused = peer.post(f"{local}/v1/load_lora_adapter", json=body)
    assert refused.status_code == 403 and "adapter agent" in refused.text
    assert "guarded" not in _served(local)

    assert httpx.post(f"{local}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    for path, payload in (("/v1/unload_lora_adapter", {"lora_name": "guarded"}),
                          ("//v1//unload_lora_adapter/", {"lora_name": "guarded"}),
                          ("/v2/repository/models/guarded/unload", {})):
        assert peer.post(f"{local}{path}", json=payload).status_code == 403, path
    assert "guarded" in _served(local)

    # Inference is for everyone, the adapter included.
    completion = {"model": "guarded", "prompt": "Profit rose", "max_tokens": 2}
    answer = peer.post(f"{local}/v1/completions", json=completion)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] is not None
    assert httpx.post(f"{local}/v2/repository/models/guarded/unload", timeout=60).status_code == 200
    assert "guarded" not in _served(local)
