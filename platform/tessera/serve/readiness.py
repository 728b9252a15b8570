"""Waiting for a `tessera serve` process to answer, for the scripts that start one (demo, benchmarks)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_ready(
    base_url: str, process: subprocess.Popen, timeout: float = 300.0, path: str = "/v2/health/ready"
) -> None:
    """Poll `path` (KServe's readiness endpoint) until it answers 200; fail at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server at {base_url} was not ready within {timeout:.0f} s")
