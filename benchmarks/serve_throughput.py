"""Serving throughput with many LoRA adapters, against the baselines the issue names, in one run.

    python benchmarks/serve_throughput.py            # tiny model, CPU, a few minutes on 2 cores

Every variant is a server process on 127.0.0.1 driven over HTTP by the same asyncio client
(closed loop: `concurrency` clients, each sending its next request when the last one returns):

  (a) one adapter        `tessera serve`, every request to the same adapter
  (b) 8 adapters mixed   `tessera serve`, request i to adapter i % 8
  (c) naive server       per request: take a lock, `set_adapter` on a peft model, `generate`
  (d) merged model       `tessera serve` on the base with adapter 0 merged in (no LoRA at all)

It prints generated tokens/s and p50/p95 request latency at each concurrency, the ratios the
issue sets goals for ((b)/(a) >= 0.8 and (b)/(c) >= 3 at concurrency 32), and hot-load latency
(`POST /v1/load_lora_adapter`, adapter on local disk) p50/p95 by rank.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tessera.serve.readiness import wait_until_ready

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "Nordea's net profit rose 12% in the third quarter.",
    "Gold prices fell after the Fed decision.",
    "What is the sentiment of this news? Nokia signs a 5G deal with Vodafone.",
    "Analysts rate Tesla a buy with a price target of 250.",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    model.save_pretrained(out)
    return out


def merge(base_dir: Path, adapter: Path, out: Path) -> Path:
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    merged.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tessera.json",
                 "generation_config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / name)
    return out


# ---- the naive baseline server ----


def naive_server(base_dir: Path, adapters: list[Path], port: int) -> None:
    """One request at a time behind a lock, switching the active adapter per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from tessera.serve.runtime.base_model import cpu_threads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cpu_threads(None))  # the same threads as `tessera serve` gets, for a fair comparison
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters[0],
                                      adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{index}")
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict) -> dict:
        ids = tokenizer(body["prompt"], return_tensors="pt")
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            output = model.generate(**ids, max_new_tokens=body["max_tokens"], min_new_tokens=body["max_tokens"],
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = output[0, ids.input_ids.shape[1]:]
        return {"choices": [{"text": tokenizer.decode(new, skip_special_tokens=True)}],
                "usage": {"completion_tokens": int(new.shape[0])}}

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        return await asyncio.to_thread(generate, body)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- driving servers ----


class ServerProcess:
    def __init__(self, command: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log.open("wb") as stream:
            self.process = subprocess.Popen([*command, "--port", str(self.port)], stdout=stream,
                                            stderr=subprocess.STDOUT, env=env)
        self.log = log

    def wait_ready(self, timeout: float = 300) -> None:
        try:
            # /v1/models: the naive baseline server has no KServe health routes.
            wait_until_ready(self.url, self.process, timeout, path="/v1/models")
        except RuntimeError as error:
            raise RuntimeError(f"{error}:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def closed_loop(url: str, models: list[str], concurrency: int, per_client: int, max_tokens: int,
                      stop: threading.Event | None = None) -> dict:
    """`concurrency` clients, `per_client` requests each (or until `stop`): tokens/s over the wall time."""
    latencies: list[float] = []
    tokens = 0
    counter = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, counter
        for _ in range(per_client):
            if stop is not None and stop.is_set():
                return
            index = counter
            counter += 1
            body = {"model": models[index % len(models)], "prompt": PROMPTS[index % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"tokens_per_s": tokens / wall, "latencies": latencies}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def hot_load_latency(url: str, adapters_by_rank: dict[int, Path], repeats: int, tag: str) -> dict[int, list[float]]:
    """Seconds per `POST /v1/load_lora_adapter` (a fresh name each time, unloaded after), by rank."""
    timings: dict[int, list[float]] = {}
    for rank, path in adapters_by_rank.items():
        for attempt in range(repeats):
            name = f"hot-{tag}-r{rank}-{attempt}"
            started = time.perf_counter()
            response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                                  timeout=120)
            timings.setdefault(rank, []).append(time.perf_counter() - started)
            response.raise_for_status()
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60).raise_for_status()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Base model directory (default: the tiny model, built here)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--per-client", type=int, default=6, help="Requests per client in each round")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per concurrency; the variants take turns")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--load-repeats", type=int, default=10)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dirs", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.naive_server:
        naive_server(args.model, args.adapter_dirs, args.port)
        return

    from tessera.model.tiny import init_tiny

    work = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    base = args.model or init_tiny(work / "tiny")
    print(f"preparing {args.adapters} adapters and the merged model in {work} ...", flush=True)
    adapters = [make_adapter(base, work / f"adapter-{i}", seed=i, rank=8) for i in range(args.adapters)]
    by_rank = {rank: make_adapter(base, work / f"rank-{rank}", seed=100 + rank, rank=rank) for rank in (8, 16, 32, 64)}
    merged = merge(base, adapters[0], work / "merged")
    tessera = [sys.executable, "-c", "from tessera.cli import main; main()", "serve",
               "--max-loras", str(max(args.adapters, 2)), "--max-batch-size", str(max(args.concurrency)),
               "--quantization", args.quantization]
    names = [f"adapter-{i}" for i in range(args.adapters)]
    # All servers run side by side and the variants take turns, so background load on a shared
    # machine falls on every variant alike; idle servers use no CPU.
    servers = {
        "tessera": ServerProcess([*tessera, "--model", str(base)], work / "tessera.log"),
        "naive": ServerProcess([sys.executable, __file__, "--naive-server", "--model", str(base),
                                "--adapter-dirs", *map(str, adapters)], work / "naive.log"),
        "merged": ServerProcess([*tessera, "--model", str(merged)], work / "merged.log"),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        url = servers["tessera"].url
        for name, path in zip(names, adapters, strict=True):
            httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       timeout=120).raise_for_status()
        merged_name = httpx.get(f"{servers['merged'].url}/v1/models").json()["data"][0]["id"]
        variants = [
            ("(a) one adapter", url, names[:1]),
            (f"(b) {args.adapters} adapters mixed", url, names),
            ("(c) naive, lock + switch", servers["naive"].url, [f"a{i}" for i in range(args.adapters)]),
            ("(d) merged model", servers["merged"].url, [merged_name]),
        ]
        for _, variant_url, models in variants:
            asyncio.run(closed_loop(variant_url, models, 2, 2, args.max_tokens))  # warm-up
        results: dict[tuple[str, int], list[dict]] = {}
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                for label, variant_url, models in variants:
                    result = asyncio.run(
                        closed_loop(variant_url, models, concurrency, args.per_client, args.max_tokens))
                    results.setdefault((label, concurrency), []).append(result)
                    print(f"  {label:<26} c={concurrency:<3} {result['tokens_per_s']:8.1f} tok/s", flush=True)

        idle = hot_load_latency(url, by_rank, args.load_repeats, "idle")
        stop = threading.Event()
        traffic = threading.Thread(
            target=lambda: asyncio.run(closed_loop(url, names, 8, 1_000_000, args.max_tokens, stop)))
        traffic.start()
        time.sleep(1)
        try:
            busy = hot_load_latency(url, by_rank, args.load_repeats, "busy")
        finally:
            stop.set()
            traffic.join()
    finally:
        for server in servers.values():
            server.stop()

    print(f"\nServing throughput: {'tiny model (tessera/tiny-llama)' if args.model is None else args.model}, "
          f"{args.max_tokens} generated tokens per request, {os.cpu_count()} CPUs, {args.rounds} rounds "
          f"(tokens/s: median round; latency: all rounds)\n")
    print("| variant | concurrency | requests | generated tokens/s | p50 latency (s) | p95 latency (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    throughput = {}
    for (label, concurrency), rounds in results.items():
        latencies = [value for result in rounds for value in result["latencies"]]
        throughput[(label[:3], concurrency)] = statistics.median(r["tokens_per_s"] for r in rounds)
        print(f"| {label} | {concurrency} | {len(latencies)} | {throughput[(label[:3], concurrency)]:.0f} | "
              f"{percentile(latencies, 0.5):.3f} | {percentile(latencies, 0.95):.3f} |")
    top = max(args.concurrency)
    print(f"\n(b)/(a) at concurrency {top}: {throughput[('(b)', top)] / throughput[('(a)', top)]:.2f} (goal >= 0.8)")
    print(f"(b)/(c) at concurrency {top}: {throughput[('(b)', top)] / throughput[('(c)', top)]:.2f} (goal >= 3)")
    print(f"(b)/(d) at concurrency {top}: {throughput[('(b)', top)] / throughput[('(d)', top)]:.2f}")
    print("\nHot-load latency (`POST /v1/load_lora_adapter`, adapter on local disk, all 7 projections):\n")
    print("| adapter rank | loads | idle p50 (ms) | idle p95 (ms) | under traffic p50 (ms) | under traffic p95 (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for rank in by_rank:
        print(f"| {rank} | {args.load_repeats} | {percentile(idle[rank], 0.5) * 1000:.1f} | "
              f"{percentile(idle[rank], 0.95) * 1000:.1f} | {percentile(busy[rank], 0.5) * 1000:.1f} | "
              f"{percentile(busy[rank], 0.95) * 1000:.1f} |")


if __name__ == "__main__":
    main()
