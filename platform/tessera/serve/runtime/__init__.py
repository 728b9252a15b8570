"""The server's runtime, free of any protocol: what a request becomes once parsed.

`service` (name resolution, tokenization off the event loop, request limits, async streams),
`registry` (loading beside serving, reloads of evicted adapters), `adapters` (allowed sources and
compatibility rules), `engine` (the batching thread: queue and scheduler), `slots` (which adapter
sits in which LoRA slot, LRU eviction), `lora` (per-row adapters in one forward pass), `sampling`,
`base_model`.
"""
