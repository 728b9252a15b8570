"""examples/tfns-distilled.yaml end to end: a teacher labels tweets, a student learns the labels, both are scored.

1. The teacher: the adapter examples/tfns-sentiment.yaml trains (trained here first if the store has
   none), served by `tessera serve` on SmolLM2-135M-Instruct on a free port of 127.0.0.1.
2. `tessera run` on the distillation job: label (the teacher, over the OpenAI API) → prepare →
   train the student on the teacher's labels only → evaluate (student, and the teacher on the same
   human-labelled held-out tweets) → publish.
3. Serving cost, measured on the running server: the student is hot-loaded beside the teacher and
   both answer the held-out prompts through the OpenAI SDK at the same concurrency; predictions
   per second at `spec.cost.pricePerDeviceHour` give each one's cost per 1,000 predictions.

Prints the numbers and writes them to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from openai import AsyncOpenAI
from tessera.serve.readiness import wait_until_ready

REPO = Path(__file__).resolve().parents[1]
TEACHER_JOB = REPO / "examples" / "tfns-sentiment.yaml"
JOB = REPO / "examples" / "tfns-distilled.yaml"
BASE_MODEL = REPO / ".tessera" / "models" / "smollm2-135m-instruct"
STORE = REPO / ".tessera" / "store"
THROUGHPUT_PROMPTS = 100  # held-out prompts each model answers for the serving measurement


def tessera(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tessera", *args, "--json"], cwd=REPO, check=True, text=True,
                            stdout=subprocess.PIPE)
    return json.loads(result.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teacher_adapter() -> str:
    """The published teacher adapter's URI: the one in the store, or a fresh run of its job."""
    record = STORE / "jobs" / "default" / "tfns-sentiment" / "published.json"
    if record.exists():
        return json.loads(record.read_text())["uri"]
    return tessera("run", "-f", str(TEACHER_JOB))["adapterUri"]


async def throughput(base_url: str, model: str, prompts: list[str], concurrency: int) -> float:
    """Predictions per second of `model` on the running server, `concurrency` requests in flight."""
    client = AsyncOpenAI(base_url=base_url, api_key="not-needed-locally")
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=8, temperature=0)

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return len(prompts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=STORE / "jobs" / "default" / "tfns-distilled" / "distill.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    teacher_uri = teacher_adapter()
    job = yaml.safe_load(JOB.read_text())
    spec = job["spec"]
    name = spec["dataset"]["teacher"]["model"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tessera", "serve", "--model", str(BASE_MODEL), "--port", str(port),
         "--allowed-prefix", str(STORE)], cwd=REPO,
    )
    try:
        wait_until_ready(base_url, server, timeout=300)
        httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": teacher_uri},
                   timeout=120).raise_for_status()
        print(f"teacher {name} ({teacher_uri}) served at {base_url}/openai/v1", flush=True)
        result = tessera("run", "-f", str(JOB), "--fresh", "--no-progress",
                         "--set", f"spec.dataset.teacher.url={base_url}/openai/v1")
        report = result["evaluation"]
        distillation = report["distillation"]

        httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "tfns-distilled",
                                                              "lora_path": result["adapterUri"]},
                   timeout=120).raise_for_status()
        from tessera.tasks import get_task

        task = get_task("sentiment")
        heldout = (REPO / spec["dataset"]["evalUri"]).read_text()
        texts = [row["text"] for row in csv.DictReader(io.StringIO(heldout))][:THROUGHPUT_PROMPTS]
        prompts = [task.to_example({"text": text, "label": "neutral"}).prompt for text in texts]
        concurrency = spec["dataset"]["teacher"]["maxConcurrency"]
        rates = {model: asyncio.run(throughput(f"{base_url}/openai/v1", model, prompts, concurrency))
                 for model in (name, "tfns-distilled")}
    finally:
        server.terminate()
        server.wait(timeout=60)

    price = spec["cost"]["pricePerDeviceHour"]
    serving = {model: {"predictionsPerSecond": rate, "costPer1000": 1000 * price / 3600 / rate}
               for model, rate in rates.items()}
    summary = {"distillation": distillation, "serving": serving, "pricePerDeviceHour": price,
               "studentAdapter": result["adapterUri"], "teacherAdapter": teacher_uri,
               "student": {k: report["adapter"].get(k) for k in ("accuracy", "f1_weighted", "unparsed_rate")},
               "base": {k: (report["base"] or {}).get(k) for k in ("accuracy", "f1_weighted")},
               "wallMinutes": (time.perf_counter() - started) / 60}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
