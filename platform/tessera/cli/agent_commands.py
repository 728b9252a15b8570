"""`tessera adapter-agent`: the predictor pod's sidecar that brings adapters from the store into the
runtime (vLLM or `tessera serve`). Runs in the operator image: nothing here imports torch."""

from __future__ import annotations

import logging
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("adapter-agent")(adapter_agent_command)


def adapter_agent_command(
    runtime: str = typer.Option(..., help="The runtime beside the agent: vllm or tessera."),
    runtime_url: str = typer.Option("http://127.0.0.1:8080", help="The runtime's address inside the pod."),
    adapters_dir: Path = typer.Option(..., help="Volume shared with the runtime, mounted at the same path in both."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 in a pod."),
    port: int = typer.Option(8085, help="Port of the adapter API (the operator's only way in)."),
    max_lora_rank: int = typer.Option(64, help="The runtime's --max-lora-rank: adapters above it are refused."),
    base_model: str = typer.Option(None, help="Name of the served base model; adapters declaring another are refused."),
    target_module: list[str] = typer.Option(
        [], "--target-module", help="A module the runtime applies LoRA to (repeatable; default: LLaMA's)."
    ),
    allowed_prefix: list[str] = typer.Option(
        [], "--allowed-prefix", help="Store URI or directory adapters may come from (repeatable)."
    ),
    namespace: str = typer.Option(None, envvar="POD_NAMESPACE",
                                  help="The pod's namespace (a tenant): with --store-root, adapters come only from "
                                  "its prefixes or the shared ones."),
    store_root: list[str] = typer.Option([], "--store-root", help="A store root tenants share (repeatable)."),
    shared_prefix: list[str] = typer.Option([], "--shared-prefix",
                                            help="A read-only prefix under every root all tenants may read "
                                            "(repeatable; default: models)."),
    resync_seconds: float = typer.Option(5.0, help="How often the runtime is checked for adapters it lost."),
) -> None:
    """Serve vLLM's adapter API in front of a runtime, fetching adapters from the store first."""
    from pydantic import ValidationError

    from tessera.agent.app import AgentSettings, run
    from tessera.errors import InvalidSpecError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"runtime": runtime, "runtime_url": runtime_url, "adapters_dir": adapters_dir, "host": host,
               "port": port, "max_lora_rank": max_lora_rank, "base_model": base_model,
               "allowed_prefixes": allowed_prefix, "resync_seconds": resync_seconds, "namespace": namespace,
               "store_roots": store_root}
    if shared_prefix:
        options["shared_prefixes"] = shared_prefix
    if target_module:
        options["target_modules"] = target_module
    try:
        settings = AgentSettings(**options)
    except ValidationError as error:
        raise InvalidSpecError([f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()],
                               source="tessera adapter-agent") from None
    run(settings)
