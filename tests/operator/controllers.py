"""Test-side controllers that play Argo Workflows, the Kubeflow Training Operator and KServe on the
API emulator, by running the real commands of the pods they would create as local processes.

What stands in for what:

- `LocalPods` is the kubelet and the container runtime: a pod is a local process whose "image" is
  this machine's Python environment. Volumes become directories under a per-pod sandbox
  (configMap and secret volumes are written out, emptyDirs are empty) and a path that starts with
  a mount path (`/config/job.yaml`, HOME=/tmp) is rebased into the sandbox, which plays the
  container's filesystem. `env`, `envFrom` (ConfigMaps and Secrets, `optional` honoured) and the
  kubelet's `$(VAR)` expansion in command and args are as in Kubernetes. A failed container's
  termination message is the tail of its log (`terminationMessagePolicy: FallbackToLogsOnError`).
  Not emulated: images, resources and GPUs, node selection, security contexts, podSpecPatch.
- `ArgoController` is Argo's workflow controller: it resolves the `workflowTemplateRef`, merges
  the parameters, substitutes `{{workflow.*}}` and `{{inputs.parameters.*}}`, runs a steps
  template's steps in order, container templates as local pods and resource templates by creating
  the manifest (owned by the Workflow when `setOwnerReference`) and waiting for its success or
  failure condition (label-selector syntax over JSON paths, as Argo evaluates them). It records
  nodes, phases and messages in `status` as Argo does. Retries (retryStrategy) are not played.
- `TrainingOperatorController` is the Training Operator for PyTorchJobs: it runs the Master and
  every Worker replica's `pytorch` container with the variables the operator sets (MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK and the PET_* ones torchrun reads), on 127.0.0.1, and sets the
  Created/Running/Succeeded/Failed conditions and `replicaStatuses` counters.
- `KServeController` is KServe with Tessera's ServingRuntime (tessera runtime + adapter agent, as the
  chart's): for an InferenceService it starts, per replica, `tessera serve --model <storageUri>`
  and `tessera adapter-agent` beside it on free 127.0.0.1 ports, sharing an adapters directory (the
  pod's emptyDir), the agent with the store Secret the chart gives it (`tessera-store`); the same
  Secret's keys stand in for KServe's storage initializer, which fetches the base model (here the
  server reads `storageUri` itself). It registers a Pod (label `serving.kserve.io/inferenceservice`,
  containers `kserve-container` and `adapter-agent` declaring their ports, podIP 127.0.0.1) that
  turns Ready when both answer, and marks the InferenceService Ready with the server's URL.
  `restart_replica` restarts a replica's server in place, as a container restart would, emptying it
  of adapters; the agent beside it stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.operator.emulator import ApiError, ApiServer, Kind, _now

TERMINATION_LOG_LINES = 80
TERMINATION_LOG_BYTES = 2048


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path) -> str:
    if not path.exists():
        return ""
    lines = path.read_bytes()[-64 * 1024:].decode(errors="replace").splitlines()[-TERMINATION_LOG_LINES:]
    return "\n".join(lines)[-TERMINATION_LOG_BYTES:].strip()


class PodStartError(Exception):
    """The container cannot start (CreateContainerConfigError, a missing executable): the pod's fault."""


@dataclass
class PodProcess:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    async def wait(self) -> int:
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def termination_message(self) -> str:
        return _tail(self.log)


# A pod does not inherit the host's environment: credentials and cluster access must come through
# the pod spec (env, envFrom), as in a cluster.
HOST_ONLY = ("AWS_", "S3_", "KUBECONFIG", "TESSERA_STORE")


def pod_base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY)}


@dataclass
class LocalPods:
    """Runs a pod spec's container as a local process (see the module docstring)."""

    server: ApiServer
    root: Path
    processes: list[PodProcess] = field(default_factory=list)

    def _data_of(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self.server.get(self.server.kinds[("", "v1", kind)], namespace, name)
        if obj is None:
            if optional:
                return None
            raise PodStartError(f"CreateContainerConfigError: {kind[:-1]} {namespace}/{name} not found")
        if kind == "secrets":
            import base64

            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | (
                obj.get("stringData") or {})
        return dict(obj.get("data") or {})

    def _volumes(self, namespace: str, pod_spec: dict[str, Any], sandbox: Path) -> dict[str, Path]:
        paths = {}
        for volume in pod_spec.get("volumes") or []:
            path = sandbox / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            for source_key, kind in (("configMap", "configmaps"), ("secret", "secrets")):
                source = volume.get(source_key)
                if source is not None:
                    name = source.get("name") or source.get("secretName")
                    data = self._data_of(kind, namespace, name, bool(source.get("optional"))) or {}
                    for key, value in data.items():
                        (path / key).write_text(value)
            paths[volume["name"]] = path
        return paths

    def _env(self, namespace: str, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            for ref_key, kind in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                ref = source.get(ref_key)
                if ref is not None:
                    data = self._data_of(kind, namespace, ref["name"], bool(ref.get("optional"))) or {}
                    env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = _expand(var["value"], env)
        return env

    async def start(self, name: str, namespace: str, pod_spec: dict[str, Any], container: dict[str, Any],
                    extra_env: dict[str, str] | None = None) -> PodProcess:
        sandbox = self.root / namespace / name
        sandbox.mkdir(parents=True, exist_ok=True)
        volumes = self._volumes(namespace, pod_spec, sandbox)
        mounts = sorted(((m["mountPath"], volumes[m["name"]]) for m in container.get("volumeMounts") or []
                         if m["name"] in volumes), key=lambda m: -len(m[0]))

        def rebase(value: str) -> str:
            for mount_path, local in mounts:
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    return str(local) + value[len(mount_path.rstrip("/")):]
            return value

        env = {k: rebase(v) for k, v in {**self._env(namespace, container), **(extra_env or {})}.items()}
        argv = [rebase(_expand(a, env)) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        log = sandbox / f"{container['name']}.log"
        with log.open("ab") as out:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, cwd=sandbox, env={**pod_base_env(), **env}, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True)
            except OSError as error:
                raise PodStartError(f"StartError: {error}") from None
        pod = PodProcess(name, process, log)
        self.processes.append(pod)
        return pod

    def kill_all(self) -> None:
        for pod in self.processes:
            pod.kill()


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion; `$$(VAR)` stays literal."""
    return re.sub(r"\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$(" if m.group(0) == "$$(" else env.get(m.group(1), m.group(0)), value)


def substitute(text: str, values: dict[str, str]) -> str:
    """Argo's `{{name}}` substitution of known names; unknown ones are left as they are."""
    return re.sub(r"\{\{\s*([\w.-]+)\s*\}\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _json_substitute(obj: Any, values: dict[str, str]) -> Any:
    """Substitution inside a template's JSON text, values JSON-escaped as Argo does."""
    escaped = {k: json.dumps(v)[1:-1] for k, v in values.items()}
    return json.loads(substitute(json.dumps(obj), escaped))


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def condition_holds(condition: str, obj: dict[str, Any]) -> bool:
    """An Argo resource success/failure condition: comma-separated `path op value` requirements."""
    for requirement in condition.split(","):
        match = re.match(r"\s*([\w.-]+)\s*(==|!=|=|>|<|\s+in\s+)\s*(.*?)\s*$", requirement)
        if not match:
            raise ValueError(f"cannot parse condition {requirement!r}")
        path, op, expected = match.group(1), match.group(2).strip(), match.group(3)
        actual = _lookup(obj, path)
        if actual is None:
            return False
        if op in (">", "<"):
            try:
                ok = float(actual) > float(expected) if op == ">" else float(actual) < float(expected)
            except (TypeError, ValueError):
                ok = False
        elif op == "in":
            ok = str(actual) in {v.strip() for v in expected.strip("()").split(",")}
        else:
            ok = (str(actual).lower() == expected.lower()) == (op != "!=")
        if not ok:
            return False
    return True


class Controller:
    """A watch loop over one kind on the emulator, with a task per object and cleanup on deletion."""

    def __init__(self, server: ApiServer, pods: LocalPods, kind: Kind) -> None:
        self.server, self.pods, self.kind = server, pods, kind
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.failures: list[str] = []

    async def run(self) -> None:
        async for event in self.server.subscribe([self.kind], replay=True):
            obj = event["object"]
            key = f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
            if event["type"] == "DELETED":
                task = self.tasks.pop(key, None)
                if task is not None:
                    task.cancel()
            elif key not in self.tasks and not obj.get("status", {}).get(self.started_field):
                self.tasks[key] = asyncio.get_running_loop().create_task(self._guarded(key, obj))
            else:
                await self.on_modified(obj)

    started_field = "startTime"

    async def _guarded(self, key: str, obj: dict[str, Any]) -> None:
        try:
            await self.reconcile(obj)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a broken simulation must show in the test, not vanish
            self.failures.append(f"{key}: {type(error).__name__}: {error}")
            raise

    async def reconcile(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    async def on_modified(self, obj: dict[str, Any]) -> None:
        """Changes to an object already being handled."""

    async def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        meta = obj["metadata"]
        sub = "status" if self.kind.status_subresource else None
        with contextlib.suppress(ApiError):  # deleted meanwhile
            await self.server.patch(self.kind, meta.get("namespace"), meta["name"], {"status": status},
                                    subresource=sub)


class ArgoController(Controller):
    started_field = "phase"

    def __init__(self, server: ApiServer, pods: LocalPods) -> None:
        super().__init__(server, pods, server.kind_of("argoproj.io/v1alpha1", "Workflow"))
        self.templates = server.kind_of("argoproj.io/v1alpha1", "WorkflowTemplate")
        self.running: dict[str, list[PodProcess]] = {}

    async def on_modified(self, obj: dict[str, Any]) -> None:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        if obj.get("spec", {}).get("shutdown") and key in self.tasks and not self.tasks[key].done():
            self.tasks[key].cancel()
            for pod in self.running.pop(key, []):
                pod.kill()
            await self.patch_status(obj, {"phase": "Failed", "finishedAt": _now(),
                                          "message": f"Stopped with strategy '{obj['spec']['shutdown']}'"})

    async def reconcile(self, wf: dict[str, Any]) -> None:
        meta, spec = wf["metadata"], wf["spec"]
        namespace, name = meta["namespace"], meta["name"]
        nodes: dict[str, dict[str, Any]] = {}

        async def update(**fields: Any) -> None:
            await self.patch_status(wf, {"nodes": nodes, **fields})

        ref = spec.get("workflowTemplateRef", {}).get("name")
        template = self.server.get(self.templates, namespace, ref) if ref else {"spec": spec}
        if template is None:
            await update(phase="Error", message=f'workflowtemplates.argoproj.io "{ref}" not found')
            return
        tspec = template["spec"]
        params = {p["name"]: p.get("value", "") for p in tspec.get("arguments", {}).get("parameters", [])}
        params |= {p["name"]: p.get("value", "") for p in spec.get("arguments", {}).get("parameters", [])}
        globals_ = {f"workflow.parameters.{k}": v for k, v in params.items()}
        globals_ |= {"workflow.name": name, "workflow.namespace": namespace}
        templates = {t["name"]: t for t in tspec["templates"]}
        pod_spec = _json_substitute({"volumes": tspec.get("volumes", [])}, globals_)
        nodes[name] = {"id": name, "name": name, "displayName": name, "type": "Steps", "phase": "Running",
                       "templateName": tspec["entrypoint"], "startedAt": _now(), "children": []}
        await update(phase="Running", startedAt=_now())
        for index, group in enumerate(templates[tspec["entrypoint"]]["steps"]):
            for step in group:  # parallel steps of a group run one after the other here
                step_args = {p["name"]: p.get("value", "") for p in step.get("arguments", {}).get("parameters", [])}
                step_args = {k: substitute(v, globals_) for k, v in step_args.items()}
                tmpl = templates[step["template"]]
                inputs = {p["name"]: p.get("default", p.get("value", ""))
                          for p in tmpl.get("inputs", {}).get("parameters", [])} | step_args
                values = globals_ | {f"inputs.parameters.{k}": v for k, v in inputs.items()}
                node_id = f"{name}-{abs(hash((name, index, step['name']))) % 10**10}"
                nodes[name]["children"].append(node_id)
                nodes[node_id] = {"id": node_id, "name": f"{name}[{index}].{step['name']}",
                                  "displayName": step["name"], "type": "Pod", "phase": "Running",
                                  "templateName": step["template"], "boundaryID": name, "startedAt": _now()}
                await update()
                phase, message = await self._run_template(wf, tmpl, values, pod_spec, node_id)
                nodes[node_id].update(phase=phase, finishedAt=_now(), **({"message": message} if message else {}))
                if phase != "Succeeded":
                    nodes[name].update(phase="Failed", finishedAt=_now())
                    await update(phase="Failed", finishedAt=_now(), message=f"child '{node_id}' failed")
                    return
        nodes[name].update(phase="Succeeded", finishedAt=_now())
        await update(phase="Succeeded", finishedAt=_now())

    async def _run_template(self, wf: dict[str, Any], tmpl: dict[str, Any], values: dict[str, str],
                            pod_spec: dict[str, Any], node_id: str) -> tuple[str, str]:
        namespace = wf["metadata"]["namespace"]
        key = f"{namespace}/{wf['metadata']['name']}"
        if "container" in tmpl:
            container = {"name": "main", **_json_substitute(tmpl["container"], values)}
            try:
                pod = await self.pods.start(node_id, namespace, pod_spec, container)
            except PodStartError as error:
                return "Error", str(error)
            self.running.setdefault(key, []).append(pod)
            try:
                code = await pod.wait()
            finally:
                pod.kill()
            if code == 0:
                return "Succeeded", ""
            tail = pod.termination_message()
            return "Failed", f"Error (exit code {code})" + (f": {tail}" if tail else "")
        if "resource" in tmpl:
            return await self._run_resource(wf, tmpl["resource"], values)
        return "Error", f"template {tmpl['name']}: only container and resource templates are simulated"

    async def _run_resource(self, wf: dict[str, Any], resource: dict[str, Any],
                            values: dict[str, str]) -> tuple[str, str]:
        namespace = wf["metadata"]["namespace"]
        manifest = yaml.safe_load(substitute(resource["manifest"], values))
        if resource.get("setOwnerReference"):
            manifest.setdefault("metadata", {})["ownerReferences"] = [{
                "apiVersion": wf["apiVersion"], "kind": "Workflow", "name": wf["metadata"]["name"],
                "uid": wf["metadata"]["uid"], "blockOwnerDeletion": True, "controller": True}]
        kind = self.server.kind_of(manifest["apiVersion"], manifest["kind"])
        try:
            created = await self.server.create(kind, namespace, manifest)
        except ApiError as error:
            return "Failed", error.message
        name = created["metadata"]["name"]
        since = int(created["metadata"]["resourceVersion"])
        current: dict[str, Any] | None = created
        while True:
            if current is None:
                return "Failed", f"{kind.kind} {name} was deleted"
            if resource.get("failureCondition") and condition_holds(resource["failureCondition"], current):
                return "Failed", f"failed condition: {resource['failureCondition']}"
            if resource.get("successCondition") and condition_holds(resource["successCondition"], current):
                return "Succeeded", ""
            async for event in self.server.subscribe([kind], since=since):
                since = int(event["object"]["metadata"]["resourceVersion"])
                if event["object"]["metadata"]["name"] == name and \
                        event["object"]["metadata"].get("namespace") == namespace:
                    current = None if event["type"] == "DELETED" else event["object"]
                    break


class TrainingOperatorController(Controller):
    def __init__(self, server: ApiServer, pods: LocalPods) -> None:
        super().__init__(server, pods, server.kind_of("kubeflow.org/v1", "PyTorchJob"))

    async def reconcile(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name = meta["namespace"], meta["name"]
        replicas: list[tuple[str, int, dict[str, Any]]] = []
        for replica_type in ("Master", "Worker"):
            replica_spec = spec["pytorchReplicaSpecs"].get(replica_type)
            for index in range(int((replica_spec or {}).get("replicas", 0))):
                replicas.append((replica_type, index, replica_spec["template"]))
        world, port = len(replicas), free_port()
        conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                       "message": f"PyTorchJob {name} is created.", "lastTransitionTime": _now()}]
        await self.patch_status(job, {"startTime": _now(), "conditions": conditions})
        processes = []
        try:
            for rank, (replica_type, index, template) in enumerate(replicas):
                container = next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                       "PET_NNODES": str(world), "PET_NODE_RANK": str(rank),
                       "PET_NPROC_PER_NODE": str(spec.get("nprocPerNode", "1"))}
                pod_name = f"{name}-{replica_type.lower()}-{index}"
                try:
                    processes.append(await self.pods.start(pod_name, namespace, template["spec"], container, env))
                except PodStartError as error:
                    conditions.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                                       "message": f"{pod_name}: {error}", "lastTransitionTime": _now()})
                    failed = {replica_type: {"failed": 1}}
                    await self.patch_status(job, {"conditions": conditions, "replicaStatuses": failed})
                    return
            counts = {t: {"active": sum(1 for r in replicas if r[0] == t)} for t in {r[0] for r in replicas}}
            conditions.append({"type": "Running", "status": "True", "reason": "PyTorchJobRunning",
                               "message": f"PyTorchJob {name} is running.", "lastTransitionTime": _now()})
            await self.patch_status(job, {"conditions": conditions, "replicaStatuses": counts})
            code = await processes[0].wait()
        finally:
            for process in processes:
                process.kill()
        outcome = "succeeded" if code == 0 else "failed"
        counts["Master"] = {"active": 0, outcome: 1}
        conditions[-1] = {**conditions[-1], "status": "False", "lastTransitionTime": _now()}
        if code == 0:
            conditions.append({"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                               "message": f"PyTorchJob {name} is successfully completed.",
                               "lastTransitionTime": _now()})
        else:
            tail = processes[0].termination_message().splitlines()
            conditions.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                               "message": f"PyTorchJob {namespace}/{name} is failed because 1 Master replica(s) "
                                          f"failed." + (f" Last log line: {tail[-1]}" if tail else ""),
                               "lastTransitionTime": _now()})
        await self.patch_status(job, {"conditions": conditions, "replicaStatuses": counts,
                                      "completionTime": _now()})


@dataclass
class Replica:
    pod_name: str
    port: int
    agent_port: int
    process: PodProcess | None = None
    agent: PodProcess | None = None
    restarts: int = 0


# The Secret the chart's adapter agent (and KServe's storage initializer) reads: store.existingSecret.
STORE_SECRET = "tessera-store"  # noqa: S105 (a Secret's name)


class KServeController(Controller):
    started_field = "url"

    def __init__(self, server: ApiServer, pods: LocalPods, ready_timeout: float = 300.0) -> None:
        super().__init__(server, pods, server.kind_of("serving.kserve.io/v1beta1", "InferenceService"))
        self.pod_kind = server.kinds[("", "v1", "pods")]
        self.replicas: dict[str, list[Replica]] = {}
        self.ready_timeout = ready_timeout

    async def reconcile(self, isvc: dict[str, Any]) -> None:
        meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
        namespace, name = meta["namespace"], meta["name"]
        model = predictor["model"]
        replicas = [Replica(f"{name}-predictor-{i}", free_port(), free_port())
                    for i in range(int(predictor.get("minReplicas", 1)))]
        self.replicas[f"{namespace}/{name}"] = replicas
        try:
            for replica in replicas:
                try:
                    await self._start(namespace, name, replica, model)
                except PodStartError as error:
                    await self._pod_status(namespace, replica, ready=False, reason=str(error))
                    await self.patch_status(isvc, {"conditions": [
                        {"type": t, "status": "False", "reason": "PredictorNotReady", "message": str(error),
                         "lastTransitionTime": _now()} for t in ("PredictorReady", "Ready")]})
                    await asyncio.Event().wait()  # stuck, as a pod in CrashLoopBackOff is
            await self.patch_status(isvc, {
                "url": f"http://127.0.0.1:{replicas[0].port}",
                "address": {"url": f"http://127.0.0.1:{replicas[0].port}"},
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()}
                               for t in ("PredictorReady", "Ready")],
            })
            await asyncio.Event().wait()  # serve until the InferenceService is deleted
        finally:
            for replica in replicas:
                for process in (replica.process, replica.agent):
                    if process is not None:
                        process.kill()
                with contextlib.suppress(ApiError):
                    await self.server.delete(self.pod_kind, namespace, replica.pod_name)

    def _adapters_dir(self, namespace: str, replica: Replica) -> Path:
        path = self.pods.root / namespace / replica.pod_name / "volumes" / "adapters"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def _start(self, namespace: str, isvc: str, replica: Replica, model: dict[str, Any],
                     server_only: bool = False) -> None:
        shared = self._adapters_dir(namespace, replica)
        server, agent = self._containers(model, replica, shared)
        pod = {"metadata": {"name": replica.pod_name, "namespace": namespace,
                            "labels": {"serving.kserve.io/inferenceservice": isvc, "component": "predictor"}},
               "spec": {"containers": [server, agent]}}
        if self.server.get(self.pod_kind, namespace, replica.pod_name) is None:
            await self.server.create(self.pod_kind, namespace, pod)
        await self._pod_status(namespace, replica, ready=False)
        replica.process = await self.pods.start(replica.pod_name, namespace, {}, server)
        if not server_only:
            replica.agent = await self.pods.start(replica.pod_name, namespace, {}, agent)
        deadline = asyncio.get_running_loop().time() + self.ready_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            for process, url in ((replica.process, f"http://127.0.0.1:{replica.port}/v2/health/ready"),
                                 (replica.agent, f"http://127.0.0.1:{replica.agent_port}/healthz")):
                while True:
                    if process.process.returncode is not None:
                        raise PodStartError(f"CrashLoopBackOff: {process.termination_message()[-500:]}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            break
                    if asyncio.get_running_loop().time() > deadline:
                        raise PodStartError(f"{replica.pod_name} not ready after {self.ready_timeout}s")
                    await asyncio.sleep(0.2)
        await self._pod_status(namespace, replica, ready=True)

    async def _pod_status(self, namespace: str, replica: Replica, ready: bool, reason: str = "") -> None:
        def container(name: str, restarts: int) -> dict[str, Any]:
            return {"name": name, "ready": ready, "started": ready, "restartCount": restarts,
                    "image": "ghcr.io/tessera-ml/tessera-server:local", "imageID": "",
                    "state": {"running": {"startedAt": _now()}} if ready else
                    {"waiting": {"reason": reason.split(":")[0] or "ContainerCreating", "message": reason}}}

        status = {"phase": "Running" if ready else "Pending", "podIP": "127.0.0.1",
                  "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": _now()}],
                  "containerStatuses": [container("kserve-container", replica.restarts),
                                        container("adapter-agent", 0)]}
        await self.server.patch(self.pod_kind, namespace, replica.pod_name, {"status": status}, subresource="status")

    async def restart_replica(self, namespace: str, isvc: str, index: int = 0) -> None:
        """Kill a replica's server and start it again on the same port: it comes back with no adapters,
        and the agent beside it, still running, loads them again."""
        obj = self.server.get(self.kind, namespace, isvc)
        replica = self.replicas[f"{namespace}/{isvc}"][index]
        if replica.process is not None:
            replica.process.kill()
            await replica.process.wait()
        replica.restarts += 1
        await self._start(namespace, isvc, replica, obj["spec"]["predictor"]["model"], server_only=True)

    @staticmethod
    def _containers(model: dict[str, Any], replica: Replica, shared: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """The serving container and the adapter agent Tessera's ServingRuntime gives a predictor."""
        store = [{"secretRef": {"name": STORE_SECRET}}]
        server = {
            "name": "kserve-container",
            "image": "ghcr.io/tessera-ml/tessera-server:local",
            "command": ["tessera", "serve", "--model", model["storageUri"], "--host", "127.0.0.1",
                        "--port", str(replica.port), "--allowed-prefix", str(shared), *model.get("args", [])],
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, *model.get("env", [])],
            "envFrom": store,  # the storage initializer's credentials (see the module docstring)
            "ports": [{"containerPort": replica.port, "protocol": "TCP"}],
        }
        agent = {
            "name": "adapter-agent",
            "image": "ghcr.io/tessera-ml/tessera-operator:local",
            "command": ["tessera", "adapter-agent", "--runtime", "tessera", "--runtime-url",
                        f"http://127.0.0.1:{replica.port}", "--adapters-dir", str(shared), "--host", "127.0.0.1",
                        "--port", str(replica.agent_port), "--resync-seconds", "1"],
            "envFrom": store,
            "ports": [{"name": "adapter-api", "containerPort": replica.agent_port, "protocol": "TCP"}],
        }
        return server, agent


@dataclass
class Controllers:
    """The three simulated controllers, running as tasks on the emulator's loop."""

    argo: ArgoController
    training: TrainingOperatorController
    kserve: KServeController
    pods: LocalPods
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    async def start(cls, server: ApiServer, root: Path) -> Controllers:
        pods = LocalPods(server, root)
        controllers = cls(ArgoController(server, pods), TrainingOperatorController(server, pods),
                          KServeController(server, pods), pods)
        loop = asyncio.get_running_loop()
        controllers.tasks = [loop.create_task(c.run()) for c in (controllers.argo, controllers.training,
                                                                 controllers.kserve)]
        return controllers

    async def stop(self) -> None:
        for controller in (self.argo, self.training, self.kserve):
            for task in controller.tasks.values():
                task.cancel()
        for task in self.tasks:
            task.cancel()
        self.pods.kill_all()
        await asyncio.sleep(0)

    @property
    def failures(self) -> list[str]:
        return self.argo.failures + self.training.failures + self.kserve.failures

