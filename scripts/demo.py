"""The README's first command, after set-up: a FineTuneJob end to end on this machine.

On the real pretrained SmolLM2-135M-Instruct (imported from its GGUF file by the set-up), run the
job (prepare → train → evaluate → publish into the local store), print the base's zero-shot score
beside the adapter's and the majority class, then start `tessera serve`, hot-load the adapter the
run just published through the adapter API, and ask the base and the adapter the same question
through the OpenAI SDK, as a user of the cluster would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI
from tessera.serve.readiness import wait_until_ready

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "tfns-sentiment.yaml"
BASE_MODEL = REPO / ".tessera" / "models" / "smollm2-135m-instruct"
QUESTIONS = [
    "$AAPL beats estimates and raises its full-year guidance; shares jump 6% after hours",
    "Fed's Powell says the central bank will keep rates unchanged until data improve",
]


def tessera(*args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tessera", *args], cwd=REPO, check=True, text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout if capture else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summary(report: dict) -> str:
    base, adapter, majority = report["base"] or {}, report["adapter"], report.get("majority") or {}
    return (
        f"accuracy on {report['samples']} held-out tweets the training never saw: "
        f"base zero-shot {base.get('accuracy', float('nan')):.3f} "
        f"({base.get('unparsed_rate', 0):.0%} of its answers name no label), "
        f"majority class {majority.get('accuracy', float('nan')):.3f}, adapter {adapter['accuracy']:.3f}"
    )


def main() -> None:
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    subprocess.run(["bash", str(REPO / "scripts" / "fetch-model.sh")], check=True)  # kept when already there
    tessera("validate", str(JOB))
    result = json.loads(tessera("run", "-f", str(JOB), "--fresh", "--json", capture=True))
    adapter_uri = result["adapterUri"]
    print(f"\npublished adapter: {adapter_uri}")
    print(summary(result["evaluation"]))

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tessera", "serve", "--model", str(BASE_MODEL), "--port", str(port),
         "--allowed-prefix", str(REPO / ".tessera" / "store"),
         # One audit line per call (tessera.access): kept in a file, so the answers read on their own.
         "--audit-file", str(REPO / ".tessera" / "demo-audit.jsonl")],
        cwd=REPO,
    )
    try:
        wait_until_ready(base_url, server, timeout=180)
        load = httpx.post(
            f"{base_url}/v1/load_lora_adapter",
            json={"lora_name": "tfns-sentiment", "lora_path": adapter_uri},
            timeout=120,
        )
        load.raise_for_status()
        print(f"hot-loaded tfns-sentiment into the running server: {load.text.strip()}")

        client = OpenAI(base_url=f"{base_url}/openai/v1", api_key="not-needed-locally")
        from tessera.tasks import get_task

        base_name = client.models.list().data[0].id
        task = get_task("sentiment")
        for question in QUESTIONS:
            prompt = task.to_example({"text": question, "label": "neutral"}).prompt
            print(f"\nQ: {question}")
            for model in (base_name, "tfns-sentiment"):
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0
                )
                print(f"A ({model}): {answer.choices[0].message.content.strip()}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
