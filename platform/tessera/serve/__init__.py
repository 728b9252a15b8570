"""The model server: one base model, many LoRA adapters hot-loaded without a restart.

    tessera serve --model s3://tessera/models/llama-3.1-8b-instruct --allowed-prefix s3://tessera/adapters

Modules, from the outside in: `app` (FastAPI app, settings, uvicorn), `openai_api` (OpenAI
completions/chat/models and vLLM's adapter API), `kserve_api` (KServe v1/v2 on KServe's own data
plane, over the same registry), `http_errors` (every refusal in each protocol's error shape, body
size limit), `service` (name resolution, tokenization off the event loop, request limits, async
streams), `registry` (loading beside serving, LRU reloads), `adapters` (allowed sources and
compatibility rules), `engine` (the batching thread), `lora` (per-row adapters in one forward pass),
`sampling`, `base_model`, `metrics`, `errors` (`ServeError`, the one error type of the boundary).
Nothing here is imported by `import tessera.serve`, so the package costs nothing until used.
"""
