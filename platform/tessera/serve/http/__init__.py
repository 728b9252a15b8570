"""The server's protocols over the runtime: `request_path` (the one middleware every request passes:
id, timing, the request counter), `openai_api` (completions, chat completions, models), `admin`
(vLLM's adapter API), `kserve_api` (KServe v1/v2 on KServe's own data plane and model hooks), `errors`
(every refusal in each protocol's error shape, the body size limit) and `connections` (read
deadlines and the connection cap on uvicorn's protocol)."""
