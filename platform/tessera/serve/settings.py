"""`tessera serve`'s settings: one definition of every option, its default and its bounds.

Light on purpose (pydantic only): the CLI reads its defaults from here without importing the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from tessera.access.settings import AccessSettings
from tessera.serve.runtime.base_model import DType, Quantization


class ServeSettings(BaseModel):
    model: str = Field(description="Base model: store URI (s3://...) or Hugging Face model directory.")
    served_model_name: str | None = Field(
        None, description="Name of the base in requests; default: its own (upstream) name. KServe routes, which "
                          "cannot address a slash, know it by the last part of the name.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    adapters_file: Path | None = None
    max_loras: int = Field(8, ge=1, description="Adapters resident at once; more are evicted (LRU) and reloaded.")
    max_lora_rank: int = Field(64, ge=1)
    allowed_prefixes: list[str] = Field(default_factory=list, description="Where adapters may come from.")
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    max_model_len: int | None = Field(None, ge=16)
    quantization: Quantization = "auto"
    dtype: DType = "auto"
    cache_dir: Path | None = None
    cpu_threads: int | None = Field(None, ge=1, description="Torch threads on a CPU; default: all cores but one.")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="Largest request body; larger ones get 413.")
    max_prompts: int = Field(64, ge=1, description="Most prompts (or KServe instances) in one request.")
    max_request_tokens: int = Field(65536, ge=1, description="Most tokens one request may generate: "
                                    "prompts x n x max_tokens.")
    max_prompt_tokens: int = Field(131072, ge=1, description="Most prompt tokens in one request, over all its "
                                   "prompts, chat messages or KServe instances.")
    max_response_bytes: int = Field(16 << 20, ge=1024, description="Largest answer one request may ask for "
                                    "(estimated before it runs: text, echoed prompts, logprobs).")
    read_timeout: float = Field(30.0, gt=0, description="Seconds a client has to send a whole request (headers and "
                                "body) once it connected or began it; then 408 and the connection is closed.")
    keep_alive_timeout: float = Field(65.0, gt=0, description="Seconds an idle keep-alive connection stays open "
                                      "(above a load balancer's usual 60 s idle timeout).")
    max_connections: int = Field(1000, ge=1, description="Open client connections at most; a connection beyond "
                                 "them is answered 503 and closed (kept below the process's file limit).")
    adapter_api_loopback_only: bool = Field(
        False, description="Answer the adapter API (vLLM's load/unload, KServe's repository load/unload) only to "
                           "callers on this pod's loopback, as the adapter agent beside the server is.")
    # Inference access (tessera.access): who may call which model, quotas, the audit trail.
    auth_mode: Literal["kubernetes", "keys", "none"] | None = Field(
        None, description="kubernetes (TokenReview + SubjectAccessReview), keys (--api-keys) or none. Unset: none "
                          "when bound to loopback only, refused on any other address.")
    api_keys: Path | None = Field(None, description="Keys file (JSON: key SHA-256 -> subject, groups; grants).")
    quotas_file: Path | None = Field(None, description="Quotas per subject and group (JSON; see tessera.access.quota).")
    auth_namespace: str | None = Field(None, description="Namespace adapters are authorized in; default: the pod's.")
    audit_include_content: bool = Field(False, description="Write prompts into the audit lines (not only hashes).")
    audit_file: Path | None = Field(None, description="Audit lines go to this file instead of stdout.")
    kube_api_url: str | None = Field(None, description="Kubernetes API for the reviews; default: in-cluster.")
    kube_token_file: Path | None = Field(None, description="Token this server presents to that API.")

    @model_validator(mode="after")
    def _auth_chosen(self):
        if self.auth_mode is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"serving on {self.host} needs --auth-mode: kubernetes, keys, or none (anyone who "
                             "reaches the port may then use every model)")
        if self.auth_mode == "keys" and self.api_keys is None:
            raise ValueError("--auth-mode keys needs --api-keys (the keys file)")
        return self

    def access_settings(self, base: str | None = None) -> AccessSettings:
        return AccessSettings(
            mode=self.auth_mode or "none", api_keys_file=self.api_keys, quotas_file=self.quotas_file,
            namespace=self.auth_namespace, audit_include_content=self.audit_include_content,
            audit_file=self.audit_file, kube_api_url=self.kube_api_url, kube_token_file=self.kube_token_file,
            # Twice the server's own limit: bodies in between reach its limit_body_size and get its 413.
            max_body_bytes=2 * self.max_request_bytes + (64 << 10), base=base)
