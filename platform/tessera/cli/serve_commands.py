"""`tessera serve`: one base model, many LoRA adapters, OpenAI-compatible and KServe endpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from tessera.serve.settings import ServeSettings


def _default(name: str):
    """The server's own default for an option, so the CLI never repeats it."""
    return ServeSettings.model_fields[name].get_default(call_default_factory=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def serve_command(
    model: str = typer.Option(..., "--model", help="Base model: store URI (s3://...) or model directory."),
    port: int = typer.Option(_default("port"), help="Port (a KServe predictor listens on 8080)."),
    host: str = typer.Option(_default("host"), help="Address to bind; 0.0.0.0 in a pod."),
    adapters_file: Path = typer.Option(
        _default("adapters_file"),
        help="JSON or YAML list of {name, path, sha256} loaded at start-up (a mounted ConfigMap)."
    ),
    max_loras: int = typer.Option(_default("max_loras"),
        help="Adapters resident at once; the least recently used is evicted."),
    max_lora_rank: int = typer.Option(_default("max_lora_rank"), help="Adapters of higher rank are refused."),
    allowed_prefix: list[str] = typer.Option(
        _default("allowed_prefixes"), "--allowed-prefix",
        help="Store URI or directory adapters may be loaded from (repeatable)."
    ),
    served_model_name: str = typer.Option(
        _default("served_model_name"),
        help="Name of the base model in requests (default: the last part of its own name)."),
    max_batch_size: int = typer.Option(_default("max_batch_size"), help="Most sequences in one forward pass."),
    max_wait_ms: float = typer.Option(_default("max_wait_ms"),
        help="How long an idle server gathers a burst into one batch."),
    max_model_len: int = typer.Option(_default("max_model_len"), help="Context length limit (default: the model's)."),
    quantization: str = typer.Option(_default("quantization"),
        help="auto (4bit on GPU, none on CPU), 4bit, 8bit or none."),
    dtype: str = typer.Option(_default("dtype"), help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32."),
    cache_dir: Path = typer.Option(_default("cache_dir"),
        help="Where store downloads go (default: a temporary directory)."),
    cpu_threads: int = typer.Option(_default("cpu_threads"),
        help="Torch threads on a CPU (default: all cores but one)."),
    max_request_bytes: int = typer.Option(_default("max_request_bytes"),
        help="Largest request body in bytes; larger ones get 413."),
    max_prompts: int = typer.Option(_default("max_prompts"), help="Most prompts (or KServe instances) in one request."),
    max_request_tokens: int = typer.Option(_default("max_request_tokens"),
        help="Most tokens one request may generate (prompts x n x max_tokens)."),
    max_prompt_tokens: int = typer.Option(_default("max_prompt_tokens"),
        help="Most prompt tokens in one request, over all its prompts, messages or instances."),
    max_response_bytes: int = typer.Option(_default("max_response_bytes"),
        help="Largest answer one request may ask for (estimated before it runs)."),
    read_timeout: float = typer.Option(_default("read_timeout"),
        help="Seconds a client has to send a whole request; then 408 and the connection is closed."),
    keep_alive_timeout: float = typer.Option(_default("keep_alive_timeout"),
        help="Seconds an idle keep-alive connection stays open."),
    max_connections: int = typer.Option(_default("max_connections"),
        help="Open client connections at most; more are answered 503 and closed."),
    adapter_api_loopback_only: bool = typer.Option(_default("adapter_api_loopback_only"),
        help="Answer load/unload only to callers on this pod's loopback (the adapter agent); 403 to others."),
    auth_mode: str = typer.Option(_default("auth_mode"), help="Who may call which model: kubernetes (TokenReview "
        "and SubjectAccessReview `use` on adapters.tessera.dev), keys (--api-keys) or none. Needed off loopback."),
    api_keys: Path = typer.Option(_default("api_keys"), help="Keys file for --auth-mode keys (a mounted Secret)."),
    quotas_file: Path = typer.Option(_default("quotas_file"),
        help="Quotas per subject and group: tokens per minute, concurrent requests (JSON)."),
    auth_namespace: str = typer.Option(_default("auth_namespace"),
        help="Namespace adapters are authorized in (default: this pod's)."),
    audit_include_content: bool = typer.Option(_default("audit_include_content"),
        help="Write prompts into the audit lines, not only their SHA-256."),
    audit_file: Path = typer.Option(_default("audit_file"), help="Audit lines to this file instead of stdout."),
    kube_api_url: str = typer.Option(_default("kube_api_url"),
        help="Kubernetes API for TokenReview and SubjectAccessReview (default: in-cluster)."),
    kube_token_file: Path = typer.Option(_default("kube_token_file"), help="Token presented to that API."),
) -> None:
    """Serve a base model and hot-loaded LoRA adapters (OpenAI, vLLM adapter API, KServe v1/v2)."""
    from pydantic import ValidationError

    from tessera.errors import InvalidSpecError
    from tessera.redact import install_log_redaction
    from tessera.serve.app import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    try:
        settings = ServeSettings(
            model=model, port=port, host=host, adapters_file=adapters_file, max_loras=max_loras,
            max_lora_rank=max_lora_rank, allowed_prefixes=allowed_prefix, served_model_name=served_model_name,
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_model_len=max_model_len,
            quantization=quantization, dtype=dtype, cache_dir=cache_dir, cpu_threads=cpu_threads,
            max_request_bytes=max_request_bytes, max_prompts=max_prompts, max_request_tokens=max_request_tokens,
            adapter_api_loopback_only=adapter_api_loopback_only, max_prompt_tokens=max_prompt_tokens,
            max_response_bytes=max_response_bytes, read_timeout=read_timeout, keep_alive_timeout=keep_alive_timeout,
            max_connections=max_connections,
            auth_mode=auth_mode, api_keys=api_keys,
            quotas_file=quotas_file, auth_namespace=auth_namespace, audit_include_content=audit_include_content,
            audit_file=audit_file, kube_api_url=kube_api_url, kube_token_file=kube_token_file,
        )
    except ValidationError as error:
        raise InvalidSpecError([f"--{'-'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()],
                               source="tessera serve") from None
    serve(settings)
