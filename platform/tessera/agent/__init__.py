"""The adapter agent: a sidecar of every predictor pod that brings LoRA adapters from the store
into a volume it shares with the serving runtime, and loads them there through the runtime's own
adapter API (vLLM's, which Tessera's server speaks too).

    tessera adapter-agent --runtime vllm --runtime-url http://127.0.0.1:8080 --adapters-dir /mnt/adapters

vLLM loads adapters only from a local directory and knows nothing of MinIO (as AIBrix's sidecar
does for it, this agent fetches them); the operator calls the agent, never the runtime, so both
runtimes are driven the same way. Modules: `rules` (pure: what a runtime can serve, what its
answers mean), `agent` (download, verify, check, load, unload, reload after a runtime restart),
`app` (the HTTP server). Nothing here imports torch: the agent runs in the operator image.
"""
