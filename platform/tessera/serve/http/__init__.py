"""The server's protocols over the runtime: `openai_api` (completions, chat completions, models),
`admin` (vLLM's adapter API), `kserve_api` (KServe v1/v2 on KServe's own data plane) and `errors`
(every refusal in each protocol's error shape, the body size limit)."""
