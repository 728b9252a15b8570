"""The README's first command, after set-up: a FineTuneJob end to end on this machine.

Build the tiny base model, run the job (prepare → train → evaluate → publish into the local store),
then start `tessera serve`, hot-load the adapter the run just published through the adapter API,
and ask it one question through the OpenAI SDK, as a user of the cluster would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from openai import OpenAI
from tessera.serve.readiness import wait_until_ready

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "tfns-sentiment.yaml"
BASE_MODEL = REPO / ".tessera" / "models" / "tiny-llama"
QUESTION = "$AAPL beats estimates and raises its full-year guidance; shares jump 6% after hours"


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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tessera("model", "init-tiny", str(BASE_MODEL))
    tessera("validate", str(JOB))
    result = json.loads(tessera("run", "-f", str(JOB), "--json", capture=True))
    adapter_uri = result["adapter_uri"]
    print(f"\npublished adapter: {adapter_uri}")

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tessera", "serve", "--model", str(BASE_MODEL), "--port", str(port),
         "--allowed-prefix", str(REPO / ".tessera" / "store")],
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

        prompt = get_task("sentiment").to_example({"text": QUESTION, "label": "positive"}).prompt
        answer = client.chat.completions.create(
            model="tfns-sentiment", messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0
        )
        print(f"\nQ: {QUESTION}\nA (tfns-sentiment): {answer.choices[0].message.content.strip()}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
