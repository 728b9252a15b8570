"""The model server: one base model, many LoRA adapters hot-loaded without a restart.

    tessera serve --model s3://tessera/models/llama-3.1-8b-instruct --allowed-prefix s3://tessera/adapters

Modules, from the outside in: `app` (FastAPI app, settings, uvicorn), `openai_api` (OpenAI
completions/chat/models and vLLM's adapter API), `kserve_api` (KServe v1/v2 on KServe's own data
plane), `service` (name resolution, async streams), `registry` (loading beside serving, LRU
reloads), `adapters` (allowed sources and compatibility rules), `engine` (the batching thread),
`lora` (per-row adapters in one forward pass), `sampling`, `base_model`, `metrics`.
Nothing here is imported by `import tessera.serve`, so the package costs nothing until used.
"""
