"""Another client's latency while abusive callers hit the same `tessera serve`, in one run.

    python benchmarks/serve_abuse.py            # tiny model, CPU, a few minutes on 2 cores

One server on 127.0.0.1. The victim sends short completions (4 tokens) one after another; first
alone, then while `--abusers` callers send, again and again, one of the requests issue 23 found
to hurt others:

  echo scoring        64 prompts of 1,500 token ids, echo, logprobs 5, max_tokens 0
  4 MB of messages    one chat request whose messages each fit the context, but not together
  long stop strings   4 stop strings of 100,000 characters, n=16, 1,000 tokens
  stops at the bound  4 stop strings of 256 characters (the most now accepted), n=16, 200 tokens
  (and its control: the same request without stop strings, whose rows alone fill the batch)

It prints, per abuse, what the abusers got (status codes, mean seconds per request) and the
victim's p50 and worst latency, beside the victim alone. The same script runs against older code
(it uses only options every version has), which is how the closing note compares before and after.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from tessera.serve.readiness import wait_until_ready


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def abuses(model: str) -> dict[str, tuple[str, dict]]:
    prompts = [[10 + (i * 7 + j) % 4000 for j in range(1500)] for i in range(64)]
    return {
        "echo scoring": ("/v1/completions", {"model": model, "prompt": prompts, "max_tokens": 0, "echo": True,
                                             "logprobs": 5}),
        "4 MB of messages": ("/v1/chat/completions", {
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 46_000}] * 80}),
        "long stop strings": ("/v1/completions", {
            "model": model, "prompt": "Profit rose", "n": 16, "max_tokens": 1000, "ignore_eos": True,
            "stop": [c * 100_000 for c in "wxyz"]}),
        "stops at the bound": ("/v1/completions", {
            "model": model, "prompt": "Profit rose", "n": 16, "max_tokens": 200, "ignore_eos": True,
            "stop": [c * 256 for c in "wxyz"]}),
        # The control for the row above: the same rows without stop strings (a full batch alone).
        "n=16 x 200 tokens, no stops": ("/v1/completions", {
            "model": model, "prompt": "Profit rose", "n": 16, "max_tokens": 200, "ignore_eos": True}),
    }


def victim(url: str, model: str, requests: int) -> list[float]:
    latencies = []
    with httpx.Client(timeout=600) as http:
        for _ in range(requests):
            started = time.perf_counter()
            http.post(f"{url}/v1/completions", json={"model": model, "prompt": "Gold prices fell", "max_tokens": 4,
                                                     "temperature": 0, "ignore_eos": True}).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


def abuser(url: str, path: str, body: dict, stop: threading.Event, outcomes: list[tuple[int, float]]) -> None:
    with httpx.Client(timeout=600) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = http.post(f"{url}{path}", json=body).status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append((status, time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Base model directory (default: the tiny model, built here)")
    parser.add_argument("--abusers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10, help="The victim's requests per phase")
    args = parser.parse_args()

    from tessera.model.tiny import init_tiny

    work = Path(tempfile.mkdtemp(prefix="tessera-abuse-"))
    base = args.model or init_tiny(work / "tiny")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with (work / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from tessera.cli import main; main()", "serve", "--model", str(base),
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = []
    try:
        wait_until_ready(url, process, timeout=300)
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        victim(url, model, 2)  # warm-up
        alone = victim(url, model, args.requests)
        rows.append(("(none: the victim alone)", "", "", alone))
        for label, (path, body) in abuses(model).items():
            stop = threading.Event()
            outcomes: list[tuple[int, float]] = []
            threads = [threading.Thread(target=abuser, args=(url, path, body, stop, outcomes))
                       for _ in range(args.abusers)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)  # the abusers' first requests are in
            latencies = victim(url, model, args.requests)
            stop.set()
            for thread in threads:
                thread.join()
            statuses = Counter(status for status, _ in outcomes)
            rows.append((label, ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items())),
                         f"{statistics.mean(t for _, t in outcomes):.2f}", latencies))
            print(f"  {label}: victim p50 {statistics.median(latencies):.3f} s", flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()

    print(f"\nAnother client's latency beside {args.abusers} abusive callers: "
          f"{'tiny model (tessera/tiny-llama)' if args.model is None else args.model}, {os.cpu_count()} CPUs, "
          f"victim: {args.requests} sequential 4-token completions per row\n")
    print("| abuse | abusers' answers | abuser s/request | victim p50 (s) | victim max (s) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, statuses, seconds, latencies in rows:
        print(f"| {label} | {statuses} | {seconds} | {statistics.median(latencies):.3f} | {max(latencies):.3f} |")


if __name__ == "__main__":
    main()
