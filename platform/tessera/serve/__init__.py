"""The model server: one base model, many LoRA adapters hot-loaded without a restart.

    tessera serve --model s3://tessera/models/llama-3.1-8b-instruct --allowed-prefix s3://tessera/adapters

`app` (FastAPI app, settings, uvicorn) puts together two layers that import only downwards:
`http` (the protocols: OpenAI, vLLM's adapter API, KServe v1/v2, and the one error mapper) over
`runtime` (the model service, adapter registry and rules, the batching engine, LoRA slots,
sampling, the base model). Both raise `errors.ServeError`, the one error type of the boundary;
`metrics` holds the Prometheus series.
Nothing here is imported by `import tessera.serve`, so the package costs nothing until used.
"""
