"""Soak of inference access control: does one subject's flood hurt the others?

    flock /tmp/tessera-heavy.lock python benchmarks/access_soak.py    # tiny model, CPU, ~2 minutes

`tessera serve` (tiny random LLaMA, keys mode: the same middleware as on a cluster, with the keys
file standing in for TokenReview/SubjectAccessReview) serves four subjects, each with its own key
and adapter. Three "steady" subjects send Poisson traffic well within their quota; the "flooder"
sends ten times its tokens-per-minute quota. Open loop: arrivals do not wait for answers.

  (a) baseline   the three steady subjects alone, quotas on
  (b) flood      the same three plus the flooder, quotas on
  (c) no quotas  the same flood on a server without quotas: what the quotas buy

The stated bound, fixed before measuring: under the flood (b) the steady subjects' p95 latency
stays within max(1.5 x p95 of (a), p95 of (a) + 50 ms). It also checks that the flooder gets 429s
with Retry-After, that every request sent has exactly one audit line (matched by X-Request-Id), and
that no prompt text or key appears in the audit file or the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from tessera.serve.readiness import wait_until_ready

STEADY = ["steady-a", "steady-b", "steady-c"]
FLOODER = "flooder"
MAX_TOKENS = 8
MARKER = "PROMPT-TEXT-MUST-NOT-LEAK"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """The tiny base model, one adapter per subject, the keys file; returns (base, adapters file, keys)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tessera.model.tiny import init_tiny
    from transformers import AutoModelForCausalLM

    base = init_tiny(root / "tiny-llama")
    lines, keys, grants = [], {}, []
    for seed, subject in enumerate([*STEADY, FLOODER]):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        model.peft_config["default"].base_model_name_or_path = "tessera/tiny-llama"
        model.save_pretrained(root / f"adapter-{subject}")
        lines.append(f"- name: adapter-{subject}\n  path: {root / f'adapter-{subject}'}\n")
        keys[subject] = f"key-{uuid.uuid4().hex}"
        grants.append({"subject": subject, "models": [f"adapter-{subject}"]})
    (root / "adapters.yaml").write_text("".join(lines))
    (root / "keys.json").write_text(json.dumps({
        "keys": {hashlib.sha256(k.encode()).hexdigest(): {"subject": s, "groups": ["desks"]} for s, k in keys.items()},
        "grants": grants}))
    return base, root / "adapters.yaml", keys


def start_server(root: Path, name: str, base: Path, adapters: Path, quotas: dict | None) -> tuple[str, Any, Path, Path]:
    workdir = root / name
    workdir.mkdir()
    port = _free_port()
    args = [sys.executable, "-m", "tessera", "serve", "--model", str(base), "--port", str(port),
            "--adapters-file", str(adapters), "--allowed-prefix", str(root), "--auth-mode", "keys",
            "--api-keys", str(root / "keys.json"), "--audit-file", str(workdir / "audit.jsonl"),
            "--max-batch-size", "32", "--max-wait-ms", "5"]
    if quotas is not None:
        (workdir / "quotas.json").write_text(json.dumps(quotas))
        args += ["--quotas-file", str(workdir / "quotas.json")]
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, process, timeout=300)
    return url, process, workdir / "audit.jsonl", workdir / "server.log"


async def drive(url: str, keys: dict[str, str], rates: dict[str, float], seconds: float,
                seed: int) -> list[dict[str, Any]]:
    """Open-loop Poisson arrivals per subject for `seconds`; one record per request sent."""
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(subject: str, n: int) -> None:
            request_id = f"{subject}-{n}-{uuid.uuid4().hex[:8]}"
            body = {"model": f"adapter-{subject}", "prompt": f"{MARKER} {n}: Nordea's profit rose.",
                    "max_tokens": MAX_TOKENS, "temperature": 0}
            started = time.perf_counter()
            try:
                response = await client.post("/v1/completions", json=body, headers={
                    "Authorization": f"Bearer {keys[subject]}", "X-Request-Id": request_id})
                status, retry = response.status_code, response.headers.get("retry-after")
            except httpx.HTTPError as error:
                status, retry = f"error {type(error).__name__}", None
            records.append({"subject": subject, "id": request_id, "status": status, "retry_after": retry,
                            "latency": time.perf_counter() - started})

        async def arrivals(subject: str, rate: float, rng: random.Random) -> list[asyncio.Task]:
            tasks, n, deadline = [], 0, time.perf_counter() + seconds
            while True:
                await asyncio.sleep(rng.expovariate(rate))
                if time.perf_counter() >= deadline:
                    return tasks
                tasks.append(asyncio.create_task(one(subject, n)))
                n += 1

        spawned = await asyncio.gather(*(arrivals(s, r, random.Random(seed + i)) for i, (s, r) in
                                         enumerate(rates.items())))
        await asyncio.gather(*(t for tasks in spawned for t in tasks))
    return records


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] if ordered else float("nan")


def summarise(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    steady = [r["latency"] for r in records if r["subject"] in STEADY and r["status"] == 200]
    by_subject: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        by_subject[r["subject"]][str(r["status"])] += 1
    return {"arm": name, "requests": len(records), "steady_ok": len(steady),
            "steady_failed": sum(1 for r in records if r["subject"] in STEADY and r["status"] != 200),
            "steady_p50_ms": 1000 * sorted(steady)[len(steady) // 2] if steady else float("nan"),
            "steady_p95_ms": 1000 * p95(steady), "by_subject": {s: dict(c) for s, c in by_subject.items()}}


def audit_check(records: list[dict[str, Any]], audit: Path, log: Path, keys: dict[str, str]) -> dict[str, Any]:
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = defaultdict(int)
    for line in lines:
        counts[line["request_id"]] += 1
    sent = {r["id"] for r in records}
    texts = audit.read_text() + log.read_text(errors="replace")
    return {"audit_lines": len(lines), "requests_sent": len(sent),
            "each_request_exactly_one_line": all(counts.get(i) == 1 for i in sent) and set(counts) == sent,
            "prompt_or_key_in_logs": MARKER in texts or any(k in texts for k in keys.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of each arm.")
    parser.add_argument("--steady-rate", type=float, default=2.0, help="Requests/s of each steady subject.")
    parser.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()

    # Steady subjects use about 2 req/s x 38 tokens x 60 = 4600 tokens/min, within their 12000; the
    # flooder's quota is 6000 tokens/min (about 2.6 req/s), and it sends ten times that.
    flooder_tpm = 6000
    quotas = {"default": {"tokensPerMinute": 12000, "concurrentRequests": 8},
              "subjects": {FLOODER: {"tokensPerMinute": flooder_tpm, "concurrentRequests": 4}}}
    results: dict[str, Any] = {"arms": [], "checks": []}
    with tempfile.TemporaryDirectory(prefix="access-soak-") as scratch:
        root = Path(scratch)
        base, adapters, keys = prepare(root)
        servers = {"quotas": start_server(root, "quotas", base, adapters, quotas),
                   "no-quotas": start_server(root, "no-quotas", base, adapters, None)}
        try:
            steady = {s: args.steady_rate for s in STEADY}
            # Warm-up (first-call costs), then measure: tokens per request from the audit.
            asyncio.run(drive(servers["quotas"][0], keys, steady, 5, seed=99))
            tokens = [line["tokens_in"] + line["tokens_out"] for line in
                      map(json.loads, servers["quotas"][2].read_text().splitlines()) if line["status"] == 200]
            per_request = sum(tokens) / len(tokens)
            flood_rate = 10 * flooder_tpm / per_request / 60  # requests/s worth ten times its quota
            results["tokens_per_request"], results["flood_rate_rps"] = per_request, flood_rate
            arms = [("(a) baseline, quotas on", "quotas", steady),
                    ("(b) flood, quotas on", "quotas", {**steady, FLOODER: flood_rate}),
                    ("(c) flood, no quotas", "no-quotas", {**steady, FLOODER: flood_rate})]
            for i, (name, server, rates) in enumerate(arms):
                url, _, audit, log = servers[server]
                before = len(audit.read_text().splitlines())
                records = asyncio.run(drive(url, keys, rates, args.seconds, seed=i))
                summary = summarise(name, records)
                fresh = root / f"arm-{i}.jsonl"
                fresh.write_text("\n".join(audit.read_text().splitlines()[before:]) + "\n")
                summary |= audit_check(records, fresh, log, keys)
                summary["flooder_429_with_retry_after"] = sum(
                    1 for r in records if r["subject"] == FLOODER and r["status"] == 429 and r["retry_after"])
                results["arms"].append(summary)
        finally:
            for _, process, _, _ in servers.values():
                process.terminate()
                process.wait(30)

    a, b, c = results["arms"]
    bound = max(1.5 * a["steady_p95_ms"], a["steady_p95_ms"] + 50)
    results["bound_ms"] = bound
    results["within_bound"] = b["steady_p95_ms"] <= bound
    print(f"tokens/request {results['tokens_per_request']:.1f}; flooder quota {flooder_tpm} tokens/min, "
          f"flood {results['flood_rate_rps']:.1f} req/s (10x); steady subjects {args.steady_rate} req/s each; "
          f"{args.seconds:.0f} s per arm")
    print(f"{'arm':26} {'requests':>8} {'steady ok':>9} {'steady fail':>11} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'flooder 200/429':>16} {'audit 1:1':>9} {'leak':>5}")
    for arm in results["arms"]:
        flood = arm["by_subject"].get(FLOODER, {})
        print(f"{arm['arm']:26} {arm['requests']:>8} {arm['steady_ok']:>9} {arm['steady_failed']:>11} "
              f"{arm['steady_p50_ms']:>8.1f} {arm['steady_p95_ms']:>8.1f} "
              f"{flood.get('200', 0):>7}/{flood.get('429', 0):<8} {str(arm['each_request_exactly_one_line']):>9} "
              f"{str(arm['prompt_or_key_in_logs']):>5}")
    print(f"bound on (b) steady p95: max(1.5 x {a['steady_p95_ms']:.1f}, {a['steady_p95_ms']:.1f} + 50) = "
          f"{bound:.1f} ms -> {'within' if results['within_bound'] else 'EXCEEDED'} ({b['steady_p95_ms']:.1f} ms)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
