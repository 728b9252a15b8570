"""How the operator copes with many FineTuneJobs at once: 1,000 jobs applied to the simulated cluster.

    python benchmarks/operator_scale.py [--jobs 1000] [--poll-seconds 10]

Runs the real operator (`tessera operator`, one kopf process) against the Kubernetes API emulator of
tests/operator (no Argo, Training Operator or KServe: the Workflows are created and stay queued),
creates N valid FineTuneJobs at once and reports, as a table:

- the time until every job's Workflow exists, and until every job's status records it;
- duplicates (Workflows created more than once) and jobs left without status (must both be 0),
  with the operator killed (SIGKILL) and restarted when half of the Workflows exist (`--kill-at`);
- the operator's peak resident memory (VmHWM, the larger of the two processes) and the API
  requests both made.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.operator.harness import OperatorProcess, SimulatedCluster, finetunejob  # noqa: E402

NAMESPACE = "scale"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="the operator's TESSERA_POLL_SECONDS")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="kill and restart the operator when this fraction of Workflows exists (0: never)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cluster = SimulatedCluster(root, controllers=False)
        cluster.apply_workflow_template(NAMESPACE)
        env = {"TESSERA_POLL_SECONDS": str(args.poll_seconds)}
        operator = OperatorProcess(cluster, [NAMESPACE], root / "operator.log", env=env).start()
        peaks = []
        try:
            cluster.wait_for("the operator to watch", lambda: "Timer" in operator.log_tail(200) or
                             any(r.params.get("watch") == "true" and "finetunejobs" in str(r.url)
                                 for r in list(cluster.server._requests)), 60, operator)
            requests_before = len(cluster.server._requests)
            workflows = cluster.kind("argoproj.io/v1alpha1", "Workflow")
            jobs = cluster.kind("tessera.dev/v1alpha1", "FineTuneJob")
            started = time.monotonic()
            for index in range(args.jobs):
                cluster.create(finetunejob(f"job-{index:04d}", NAMESPACE, "/models/tiny", "/store"))
            created = time.monotonic() - started

            def count_workflows() -> int:
                return len(cluster.emulator.run(lambda: cluster.server.list(workflows, NAMESPACE)))

            if args.kill_at > 0:
                cluster.wait_for("the first Workflows", lambda: count_workflows() >= args.kill_at * args.jobs,
                                 args.timeout, operator, 0.1)
                peaks.append(peak_rss_mib(operator.process.pid))
                operator.kill()
                operator = OperatorProcess(cluster, [NAMESPACE], root / "operator-2.log", env=env).start()
            cluster.wait_for("every Workflow", lambda: count_workflows() == args.jobs, args.timeout, operator, 0.5)
            all_workflows = time.monotonic() - started
            cluster.wait_for("every status to record its Workflow", lambda: all(
                (j.get("status") or {}).get("workflowRef") for j in cluster.list(*("tessera.dev/v1alpha1",
                                                                                   "FineTuneJob"), NAMESPACE)),
                args.timeout, operator, 0.5)
            all_statuses = time.monotonic() - started
            time.sleep(2 * args.poll_seconds)  # let the timers run over every job a couple of times
            duplicates = cluster.emulator.run(lambda: sum(
                cluster.server.created_count(workflows, NAMESPACE, w["metadata"]["name"]) - 1
                for w in cluster.server.list(workflows, NAMESPACE)))
            lost = cluster.emulator.run(lambda: sum(
                1 for j in cluster.server.list(jobs, NAMESPACE)
                if (j.get("status") or {}).get("phase") != "Queued" or not j["status"].get("workflowRef")))
            peak = max([*peaks, peak_rss_mib(operator.process.pid)])
            requests = len(cluster.server._requests) - requests_before
        finally:
            operator.stop()
            cluster.stop()

    rows = [
        ("FineTuneJobs", f"{args.jobs}"),
        ("creating them (test harness)", f"{created:.1f} s"),
        ("until every Workflow exists", f"{all_workflows:.1f} s"),
        ("until every status records its Workflow", f"{all_statuses:.1f} s"),
        ("Workflows per second", f"{args.jobs / all_workflows:.1f}"),
        ("operator killed and restarted at", f"{args.kill_at:.0%} of the Workflows" if args.kill_at else "never"),
        ("duplicate Workflows", f"{duplicates}"),
        ("jobs not Queued with a workflowRef", f"{lost}"),
        ("operator peak RSS (VmHWM)", f"{peak:.0f} MiB"),
        ("API requests by the operator", f"{requests}"),
        ("poll interval", f"{args.poll_seconds:g} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|-------")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")


if __name__ == "__main__":
    main()
