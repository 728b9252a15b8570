"""The simulated cluster the operator tests (and benchmarks/operator_scale.py) run against.

`SimulatedCluster` = the API emulator (tests/operator/emulator.py) with Tessera's CRDs (generated
by `tessera.api.crd`, as `tessera crds` prints them) and the vendored upstream ones registered,
the `tessera-finetune` WorkflowTemplate from pipelines/workflowtemplate.yaml applied, optionally
the simulated Argo, Training Operator, Trainer v2 and KServe controllers (tests/operator/controllers.py), and
a kubeconfig for kubectl, kopf and the `kubernetes` client.

`OperatorProcess` runs the real operator, `tessera operator`, as a subprocess against it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tessera.api.crd import custom_resource_definitions

from tests.operator.controllers import Controllers, pod_base_env
from tests.operator.emulator import EmulatorThread, Kind

REPO = Path(__file__).resolve().parents[2]
# The vendored CRDs; the TrainJob of Trainer v2.3.0 (with status.trainerStatus, which the simulated
# Trainer fills) replaces the older one vendored from ../shared/crds.
UPSTREAM_CRDS = [*sorted((REPO / "tests" / "crds").glob("*.yaml")),
                 *sorted((REPO / "tests" / "crds" / "trainer-v2.3.0").glob("*.yaml"))]
WORKFLOW_TEMPLATE = REPO / "pipelines" / "workflowtemplate.yaml"
SAMPLE_CSV = REPO / "examples" / "data" / "tfns-sample.csv"


class SimulatedCluster:
    def __init__(self, root: Path, controllers: bool = True) -> None:
        self.root = root
        self.emulator = EmulatorThread().start()
        self.server = self.emulator.server
        self.server.register_crds(custom_resource_definitions())
        self.server.register_crd_files(UPSTREAM_CRDS)
        self.kubeconfig = self.emulator.kubeconfig(root / "kubeconfig")
        self.controllers: Controllers | None = None
        if controllers:
            self.controllers = self.emulator.call(Controllers.start(self.server, root / "pods"))

    def kind(self, api_version: str, kind: str) -> Kind:
        return self.server.kind_of(api_version, kind)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = self.kind(obj["apiVersion"], obj["kind"])
        return self.emulator.call(self.server.create(kind, obj["metadata"].get("namespace"), obj))

    def apply_workflow_template(self, namespace: str) -> None:
        template = yaml.safe_load(WORKFLOW_TEMPLATE.read_text())
        template["metadata"]["namespace"] = namespace
        self.create(template)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.emulator.run(lambda: self.server.get(self.kind(api_version, kind), namespace, name))

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.emulator.run(lambda: self.server.list(self.kind(api_version, kind), namespace))

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("tessera.dev/v1alpha1", "FineTuneJob", namespace, name)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Events about the object `name` in `namespace` (as `kubectl describe` lists them)."""
        return [e for e in self.list("v1", "Event", namespace) if e.get("involvedObject", {}).get("name") == name]

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float, operator: OperatorProcess | None = None,
                 interval: float = 0.2) -> Any:
        """Poll until `predicate()` is truthy; on timeout fail with `what` and the operator's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            failures = self.controllers.failures if self.controllers else []
            if failures:
                raise AssertionError(f"a simulated controller failed: {failures}")
            if time.monotonic() > deadline:
                log = operator.log_tail() if operator else ""
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n--- operator log ---\n{log}")
            time.sleep(interval)

    def stop(self) -> None:
        if self.controllers is not None:
            self.emulator.call(self.controllers.stop())
        self.emulator.stop()


class OperatorProcess:
    """`tessera operator` in its own process, watching the given namespaces of the cluster."""

    def __init__(self, cluster: SimulatedCluster, namespaces: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.cluster, self.namespaces, self.log_path = cluster, namespaces, log
        # No store credentials of its own: the operator must read them from the job's Secret.
        self.env = {**pod_base_env(), "KUBECONFIG": str(cluster.kubeconfig), "TESSERA_POLL_SECONDS": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        args = [sys.executable, "-m", "tessera", "operator", "--verbose"]
        for namespace in self.namespaces:
            args += ["--namespace", namespace]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.cluster.root, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator's pod."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def finetunejob(name: str, namespace: str, base_model: str, store_uri: str, **spec: Any) -> dict[str, Any]:
    """A small sentiment job on the tiny model: 48 rows, 2 optimizer steps, CPU."""
    body = {
        "baseModel": {"uri": base_model, "name": "tessera/tiny-llama", "quantization": {"bits": None},
                      "computeDtype": "float32"},
        "dataset": {"uri": str(SAMPLE_CSV), "task": "sentiment", "onBadRows": "skip", "maxRows": 48,
                    "maxEvalRows": 8, "labelMap": {"0": "negative", "1": "positive", "2": "neutral"}},
        "lora": {"rank": 4},
        "training": {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 256, "checkpointEverySteps": 1,
                     "loggingSteps": 1},
        "distribution": {"workers": 1, "gpusPerWorker": 0},
        "evaluation": {"maxSamples": 8, "maxNewTokens": 4, "batchSize": 8},
        "store": {"uri": store_uri},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "tessera.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}
