"""Prometheus metrics of the server, per adapter (the base model is labelled `base`).

They live in the default registry, beside KServe's own request histograms, and are served at
`/metrics`. An adapter's series are removed when it is unloaded (`forget_adapter`), so the
`adapter` label holds only names the registry serves (and `base`, `unknown`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from tessera.access.audit import forget_adapter_usage

BASE_LABEL = "base"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "tessera_requests", "Inference requests by adapter, endpoint and HTTP status.", ["adapter", "endpoint", "status"]
)
PROMPT_TOKENS = Counter("tessera_prompt_tokens", "Prompt tokens processed.", ["adapter"])
GENERATED_TOKENS = Counter("tessera_generation_tokens", "Tokens generated.", ["adapter"])
REQUEST_LATENCY = Histogram(
    "tessera_request_latency_seconds", "Time from request to last token.", ["adapter"], buckets=_LATENCY_BUCKETS
)
FIRST_TOKEN_LATENCY = Histogram(
    "tessera_time_to_first_token_seconds", "Time from request to first token.", ["adapter"], buckets=_LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "tessera_queue_time_seconds", "Time a request waited before joining the batch.", ["adapter"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_SECONDS = Histogram(
    "tessera_http_request_seconds", "Time from a request's arrival to the end of its answer, by endpoint.",
    ["endpoint"], buckets=_LATENCY_BUCKETS,
)
RUNNING = Gauge("tessera_sequences_running", "Sequences in the running batch.")
WAITING = Gauge("tessera_sequences_waiting", "Sequences waiting to join the batch (or for their adapter).")
BATCH_ROWS = Histogram(
    "tessera_batch_rows", "Rows (sequences) in one forward step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STEP_SECONDS = Histogram(
    "tessera_step_seconds", "Duration of one generation step (forward passes and sampling).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
ADAPTERS_REGISTERED = Gauge("tessera_adapters_registered", "Adapters the server can serve (loaded or evicted).")
ADAPTERS_RESIDENT = Gauge("tessera_adapters_loaded", "Adapters whose weights are in the model now.")
ADAPTER_LOAD_SECONDS = Histogram(
    "tessera_adapter_load_seconds", "Time to fetch, check and install an adapter.", ["outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ADAPTER_LOAD_FAILURES = Counter("tessera_adapter_load_failures", "Adapter loads refused or failed.", ["code"])
ADAPTER_EVICTIONS = Counter("tessera_adapter_evictions", "Adapters evicted to make room (LRU).")


PER_ADAPTER = (REQUESTS, PROMPT_TOKENS, GENERATED_TOKENS, REQUEST_LATENCY, FIRST_TOKEN_LATENCY, QUEUE_TIME)


def forget_adapter(name: str) -> None:
    """Remove every series of an adapter that is no longer served."""
    for metric in PER_ADAPTER:
        metric.remove_by_labels({"adapter": name})
    forget_adapter_usage(name)
