"""How long another namespace waits while one tenant floods the operator (issue 24, "fair operator").

    python benchmarks/tenant_flood.py [--adapters 20] [--probes 3] [--operator-path DIR]

Runs the real operator (`tessera operator`, one kopf process) against the Kubernetes API emulator of
tests/operator, with no simulated controllers. Namespace `flood` gets one predictor replica whose
adapter load never answers (tests/operator/flood.py) and `--adapters` Adapters aimed at it; namespace
`quiet` then gets a FineTuneJob with an invalid spec, which the operator only has to mark Failed. The
number reported is that job's wait: from its creation until its status says Failed, once with no
flood (the baseline) and `--probes` times during the flood.

`--operator-path` runs the operator from another checkout (its repository root; e.g. the code before
the per-namespace cap), with this checkout's emulator and harness, so one script measures both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.operator.flood import HangingReplica, flooding_adapters, serve_on_hanging_replica  # noqa: E402
from tests.operator.harness import OperatorProcess, SimulatedCluster, finetunejob  # noqa: E402

FLOOD, QUIET = "flood", "quiet"


def pythonpath_for(checkout: Path, scratch: Path) -> str:
    """A PYTHONPATH that imports tessera, tessera_operator and tessera_pipelines from `checkout`."""
    shim = scratch / "shim"
    shim.mkdir()
    for name, where in (("tessera", "platform/tessera"), ("tessera_operator", "operators"),
                        ("tessera_pipelines", "pipelines")):
        (shim / name).symlink_to(checkout / where)
    return f"{shim}:{checkout}"


def probe(cluster: SimulatedCluster, store: Path, name: str, timeout: float) -> float:
    """Seconds until an invalid job in the quiet namespace is marked Failed (inf after `timeout`)."""
    job = finetunejob(name, QUIET, str(store / "models" / "tiny"), str(store),
                      dataset={"uri": "s3://tessera/datasets/quiet/needs-a-secret.csv"})  # no credentialsSecret
    start = time.monotonic()
    cluster.create(job)
    while time.monotonic() - start < timeout:
        if ((cluster.job(QUIET, name) or {}).get("status") or {}).get("phase") == "Failed":
            return time.monotonic() - start
        time.sleep(0.05)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=150.0, help="Give up on a probe after this long.")
    parser.add_argument("--spacing", type=float, default=0.0, help="Seconds between probes (to reach the retries).")
    parser.add_argument("--operator-path", type=Path, default=None)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="tenant-flood-"))
    store = scratch / "store"
    store.mkdir()
    env = {"TESSERA_TENANCY_ROOTS": f'["{store}"]'}
    if args.operator_path is not None:
        env["PYTHONPATH"] = pythonpath_for(args.operator_path.resolve(), scratch)
    cluster = SimulatedCluster(scratch, controllers=False)
    replica = HangingReplica()
    operator = OperatorProcess(cluster, [FLOOD, QUIET], scratch / "operator.log", env).start()
    try:
        probe(cluster, store, "warm-up", args.timeout)  # the operator's start is not the wait measured
        baseline = probe(cluster, store, "baseline", args.timeout)
        serve_on_hanging_replica(cluster, FLOOD, replica)
        for adapter in flooding_adapters(store, FLOOD, args.adapters):
            cluster.create(adapter)
        deadline = time.monotonic() + 30
        while replica.open_loads < min(args.adapters, 4) and time.monotonic() < deadline:
            time.sleep(0.1)
        waits, in_flight = [], []
        for i in range(args.probes):
            time.sleep(args.spacing if i else 0.0)
            in_flight.append(replica.open_loads)
            waits.append(probe(cluster, store, f"probe-{i}", args.timeout))
    finally:
        operator.stop()
        replica.stop()
        cluster.stop()
    label = args.label or (f"operator from {args.operator_path}" if args.operator_path else "this checkout")
    finite = [w for w in waits if w != float("inf")]
    print(f"\n{label}: {args.adapters} adapters flooding namespace '{FLOOD}', "
          f"os.cpu_count()={os.cpu_count()}")
    print("| measurement | seconds |")
    print("| --- | --- |")
    print(f"| quiet namespace's invalid job handled, no flood | {baseline:.2f} |")
    for i, (wait, loads) in enumerate(zip(waits, in_flight, strict=True)):
        shown = f"{wait:.2f}" if wait != float("inf") else f"> {args.timeout:.0f} (gave up)"
        print(f"| same, during the flood, probe {i + 1} ({loads} loads hanging) | {shown} |")
    if finite:
        print(f"| median / max during the flood | {statistics.median(finite):.2f} / {max(finite):.2f} |")
    print(f"| load calls the hanging replica received | {replica.loads} |")


if __name__ == "__main__":
    main()
