"""Test-side controllers that play Argo Workflows, the Kubeflow Training Operator and KServe on the
API emulator, by running the real commands of the pods they would create as local processes.

What stands in for what:

- `LocalPods` is the kubelet and the container runtime: a pod is a local process whose "image" is
  this machine's Python environment. Volumes become directories under a per-pod sandbox
  (configMap and secret volumes are written out, emptyDirs are empty) and a path that starts with
  a mount path (`/config/job.yaml`, HOME=/tmp) is rebased into the sandbox, which plays the
  container's filesystem. `env` (values and Secret keys), `envFrom` (ConfigMaps and Secrets, `optional`
  honoured) and the kubelet's `$(VAR)` expansion in command and args are as in Kubernetes. A failed container's
  termination message is the tail of its log (`terminationMessagePolicy: FallbackToLogsOnError`).
  Not emulated: images, resources and GPUs, node selection, security contexts, podSpecPatch.
- `ArgoController` is Argo's workflow controller: it resolves the `workflowTemplateRef`, merges
  the parameters, substitutes `{{workflow.*}}` and `{{inputs.parameters.*}}`, runs a steps
  template's steps in order, container templates as local pods and resource templates by creating
  the manifest (owned by the Workflow when `setOwnerReference`) and waiting for its success or
  failure condition (label-selector syntax over JSON paths, as Argo evaluates them). It records
  nodes, phases and messages in `status` as Argo does. Retries (retryStrategy) are not played.
  Steps templates nest (a step whose template has steps is a Steps node) and a step's `when`
  (`a == b`, `a != b` after substitution) skips it when false, as Argo records it.
- `TrainingOperatorController` is the Training Operator for PyTorchJobs: it runs the Master and
  every Worker replica's `pytorch` container with the variables the operator sets (MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK and the PET_* ones torchrun reads), on 127.0.0.1, and sets the
  Created/Running/Restarting/Succeeded/Failed conditions, `replicaStatuses` and `completionTime`.
- `TrainerController` is Kubeflow Trainer v2 (with JobSet and the Job controller) for TrainJobs
  on a namespaced TrainingRuntime of the torch runtime's shape: it runs `numNodes` copies of the
  runtime's `node` container with the TrainJob's `trainer` overrides (image, command, args, env,
  resourcesPerNode), the PET_* variables the torch plugin sets, and what the TrainJobStatus plugin
  gives the trainer: `KUBEFLOW_TRAINER_SERVER_URL` of a real HTTPS status server
  (trainer_status_server.py, whose accepted reports become `status.trainerStatus`), the CA file
  and a token file for this TrainJob. It sets `jobsStatus` (one entry, `node`) and the
  Complete/Failed conditions copied from the JobSet's.
- Both training controllers restart failed pods as `restartPolicy: OnFailure` does, the whole
  group at once (torchrun needs every node back), within the PyTorchJob's `runPolicy.backoffLimit`
  or the `node` Job's `backoffLimit`; `kill_master`/`kill_node` SIGKILL rank 0, as a preemption or a
  lost node would.
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
import psutil
import yaml

from tests.operator.emulator import ApiError, ApiServer, Kind, _now
from tests.operator.trainer_status_server import TrainerStatusServer

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
        """SIGKILL every process of the pod, as the container runtime does: also the ones that left
        its process group (torchrun starts its workers in sessions of their own)."""
        if self.process.returncode is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
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
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                ref = var["valueFrom"]["secretKeyRef"]
                data = self._data_of("secrets", namespace, ref["name"], bool(ref.get("optional"))) or {}
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise PodStartError(f"CreateContainerConfigError: key {ref['key']} not in Secret {ref['name']}")
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
    """A gjson path as Argo resolves it: `.`-separated keys, a number indexes a list."""
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit():
            obj = obj[int(part)] if int(part) < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(part)
        else:
            return None
    return obj


def condition_holds(condition: str, obj: dict[str, Any]) -> bool:
    """An Argo resource success/failure condition: a label selector whose keys are gjson paths.

    Comma-separated requirements, all of which must hold: `path op value`, or a bare `path` that
    must exist. As in Kubernetes' label selectors, `!=` also holds when the path is missing.
    """
    for requirement in condition.split(","):
        match = re.match(r"\s*([\w.-]+)\s*(?:(==|!=|=|>|<|\s+in\s+)\s*(.*?))?\s*$", requirement)
        if not match:
            raise ValueError(f"cannot parse condition {requirement!r}")
        path, op, expected = match.group(1), (match.group(2) or "").strip(), match.group(3) or ""
        actual = _lookup(obj, path)
        if actual is None:
            if op == "!=":
                continue
            return False
        if not op:
            continue
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
        run = _StepsRun(self, wf, templates, globals_, pod_spec, nodes, update)
        phase, failed_child = await run.steps(templates[tspec["entrypoint"]], name)
        nodes[name].update(phase=phase, finishedAt=_now())
        if phase != "Succeeded":
            await update(phase="Failed", finishedAt=_now(), message=f"child '{failed_child}' failed")
            return
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
        if not resource.get("successCondition") and not resource.get("failureCondition"):
            return "Succeeded", ""  # Argo: a created object with no condition to wait for is done
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


@dataclass
class _StepsRun:
    """One Workflow's steps templates, run as Argo runs them: groups in order, `when` evaluated after
    substitution (a false one is Skipped), a steps template inside a step as a nested Steps node."""

    argo: ArgoController
    wf: dict[str, Any]
    templates: dict[str, dict[str, Any]]
    globals_: dict[str, str]
    pod_spec: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    update: Any

    async def steps(self, template: dict[str, Any], parent: str) -> tuple[str, str]:
        """Run `template`'s step groups under the node `parent`: (phase, the failed child's id)."""
        for index, group in enumerate(template["steps"]):
            for step in group:  # parallel steps of a group run one after the other here
                node_id = f"{parent}-{abs(hash((parent, index, step['name']))) % 10**10}"
                self.nodes[parent].setdefault("children", []).append(node_id)
                node = {"id": node_id, "name": f"{self.nodes[parent]['name']}[{index}].{step['name']}",
                        "displayName": step["name"], "type": "Pod", "phase": "Running",
                        "templateName": step["template"], "boundaryID": parent, "startedAt": _now()}
                self.nodes[node_id] = node
                when = substitute(step.get("when", ""), self.globals_)
                if when and not _when_holds(when):
                    node.update(type="Skipped", phase="Skipped", finishedAt=_now(),
                                message=f"when '{when}' evaluated false")
                    await self.update()
                    continue
                await self.update()
                phase, message = await self.step(step, node_id)
                node.update(phase=phase, finishedAt=_now(), **({"message": message} if message else {}))
                if phase != "Succeeded":
                    await self.update()
                    return "Failed", node_id
        return "Succeeded", ""

    async def step(self, step: dict[str, Any], node_id: str) -> tuple[str, str]:
        tmpl = self.templates[step["template"]]
        if "steps" in tmpl:
            self.nodes[node_id]["type"] = "Steps"
            phase, failed = await self.steps(tmpl, node_id)
            return phase, f"child '{failed}' failed" if failed else ""
        step_args = {p["name"]: p.get("value", "") for p in step.get("arguments", {}).get("parameters", [])}
        step_args = {k: substitute(v, self.globals_) for k, v in step_args.items()}
        inputs = {p["name"]: p.get("default", p.get("value", ""))
                  for p in tmpl.get("inputs", {}).get("parameters", [])} | step_args
        values = self.globals_ | {f"inputs.parameters.{k}": v for k, v in inputs.items()}
        return await self.argo._run_template(self.wf, tmpl, values, self.pod_spec, node_id)


def _when_holds(expression: str) -> bool:
    """Argo's `when`, for the `a == b` / `a != b` comparisons of words that the templates here use."""
    match = re.fullmatch(r"\s*(\S+)\s*(==|!=)\s*(\S+)\s*", expression)
    if not match:
        raise ValueError(f"cannot evaluate when {expression!r}")
    left, op, right = (part.strip("'\"") for part in match.groups())
    return (left == right) == (op == "==")


async def run_group(start: Any, backoff_limit: int, on_restart: Any,
                    running: list[PodProcess]) -> tuple[int, PodProcess | None, int]:
    """Run a group of training pods until rank 0 exits, restarting the whole group after a failure
    (`restartPolicy: OnFailure`: torchrun's rendezvous needs every node back) while the restarts
    stay within `backoff_limit`. `start(attempt)` starts the pods; `running` always holds the
    current ones (so a test can kill one). Returns (rank 0's exit code, rank 0, restarts made)."""
    restarts = 0
    while True:
        running[:] = []
        try:
            running.extend(await start(restarts))
            code = await running[0].wait()
        finally:
            for process in running:
                process.kill()
        if code == 0 or restarts >= backoff_limit:
            return code, running[0], restarts
        restarts += 1
        await on_restart(restarts, running[0])


def _condition(type_: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


def _last_line(process: PodProcess | None) -> str:
    tail = process.termination_message().splitlines() if process is not None else []
    return f" Last log line: {tail[-1]}" if tail else ""


class TrainingOperatorController(Controller):
    def __init__(self, server: ApiServer, pods: LocalPods) -> None:
        super().__init__(server, pods, server.kind_of("kubeflow.org/v1", "PyTorchJob"))
        self.running: dict[str, list[PodProcess]] = {}

    async def reconcile(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name = meta["namespace"], meta["name"]
        replicas: list[tuple[str, int, dict[str, Any]]] = []
        for replica_type in ("Master", "Worker"):
            replica_spec = spec["pytorchReplicaSpecs"].get(replica_type)
            for index in range(int((replica_spec or {}).get("replicas", 0))):
                replicas.append((replica_type, index, replica_spec["template"]))
        world = len(replicas)
        conditions = [_condition("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")]
        await self.patch_status(job, {"startTime": _now(), "conditions": conditions})
        counts = {t: {"active": sum(1 for r in replicas if r[0] == t)} for t in {r[0] for r in replicas}}

        async def start(attempt: int) -> list[PodProcess]:
            port, processes = free_port(), []
            for rank, (replica_type, index, template) in enumerate(replicas):
                container = next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                       "PET_NNODES": str(world), "PET_NODE_RANK": str(rank),
                       "PET_NPROC_PER_NODE": str(spec.get("nprocPerNode", "1"))}
                processes.append(await self.pods.start(f"{name}-{replica_type.lower()}-{index}", namespace,
                                                       template["spec"], container, env))
            if attempt == 0:
                conditions.append(_condition("Running", "PyTorchJobRunning", f"PyTorchJob {name} is running."))
            await self.patch_status(job, {"conditions": conditions, "replicaStatuses": counts})
            return processes

        async def restarting(restarts: int, master: PodProcess) -> None:
            # The Training Operator's Restarting condition; the container's restartCount counts against
            # runPolicy.backoffLimit.
            conditions.append(_condition("Restarting", "PyTorchJobRestarting",
                                         f"PyTorchJob {name} is restarting because 1 Master replica(s) failed."))
            await self.patch_status(job, {"conditions": conditions})

        limit = int(spec.get("runPolicy", {}).get("backoffLimit", 0))
        running = self.running.setdefault(f"{namespace}/{name}", [])
        try:
            code, master, restarts = await run_group(start, limit, restarting, running)
        except PodStartError as error:
            conditions.append(_condition("Failed", "PyTorchJobFailed", f"{name}-master-0: {error}"))
            await self.patch_status(job, {"conditions": conditions, "replicaStatuses": {"Master": {"failed": 1}},
                                          "completionTime": _now()})
            return
        outcome = "succeeded" if code == 0 else "failed"
        counts["Master"] = {"active": 0, outcome: 1}
        conditions[:] = [{**c, "status": "False"} if c["type"] in ("Running", "Restarting") else c for c in conditions]
        if code == 0:
            conditions.append(_condition("Succeeded", "PyTorchJobSucceeded",
                                         f"PyTorchJob {name} is successfully completed."))
        else:
            conditions.append(_condition("Failed", "PyTorchJobFailed",
                                         f"Job {namespace}/{name} has failed because it has reached the specified "
                                         f"backoff limit ({restarts} restart(s))." + _last_line(master)))
        await self.patch_status(job, {"conditions": conditions, "replicaStatuses": counts, "completionTime": _now()})

    def kill_master(self, namespace: str, name: str) -> int:
        """SIGKILL the Master's process, as when its node is lost; returns the killed pid."""
        master = self.running[f"{namespace}/{name}"][0]
        master.kill()
        return master.process.pid


TRAINER_TOKEN_VOLUME = "kubeflow-trainer-token"  # noqa: S105 (a volume name)


class TrainerController(Controller):
    """Kubeflow Trainer v2 for TrainJobs on the torch runtime (see the module docstring)."""

    def __init__(self, server: ApiServer, pods: LocalPods, status_server: TrainerStatusServer) -> None:
        super().__init__(server, pods, server.kind_of("trainer.kubeflow.org/v1alpha1", "TrainJob"))
        self.runtimes = server.kind_of("trainer.kubeflow.org/v1alpha1", "TrainingRuntime")
        self.status_server = status_server
        self.running: dict[str, list[PodProcess]] = {}
        self.loop = asyncio.get_running_loop()

    started_field = "jobsStatus"

    def _runtime(self, namespace: str, ref: dict[str, Any]) -> dict[str, Any] | None:
        # Only namespaced TrainingRuntimes, the kind Tessera's workflow creates, are simulated.
        if ref.get("kind", "ClusterTrainingRuntime") != "TrainingRuntime":
            return None
        return self.server.get(self.runtimes, namespace, ref["name"])

    async def reconcile(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name = meta["namespace"], meta["name"]
        trainer = spec.get("trainer") or {}
        jobs_status = {"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}

        async def status(**fields: Any) -> None:
            await self.patch_status(job, {"jobsStatus": [jobs_status], **fields})

        runtime = self._runtime(namespace, spec["runtimeRef"])
        if runtime is None:
            await status(conditions=[_condition("Failed", "TrainingRuntimeNotSupported",
                                                f"{spec['runtimeRef'].get('kind', 'ClusterTrainingRuntime')} "
                                                f"{spec['runtimeRef']['name']} not found")])
            return
        policy = runtime["spec"].get("mlPolicy") or {}
        replicated = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
        job_spec = replicated["template"]["spec"]
        pod_spec = job_spec["template"]["spec"]
        base = next(c for c in pod_spec["containers"] if c["name"] == "node")
        # The TrainJob's trainer overrides the runtime's `node` container, as the torch plugin does.
        container = {**base, **{k: trainer[k] for k in ("image", "command", "args") if k in trainer}}
        if trainer.get("resourcesPerNode"):
            container["resources"] = trainer["resourcesPerNode"]
        container["env"] = [*[e for e in base.get("env", []) if e["name"] not in
                              {t["name"] for t in trainer.get("env", [])}], *trainer.get("env", [])]
        nodes = int(trainer.get("numNodes") or policy.get("numNodes") or 1)
        nproc = trainer.get("numProcPerNode") or (policy.get("torch") or {}).get("numProcPerNode") or 1
        # The TrainJobStatus plugin: a projected volume with a token for this TrainJob and the status
        # server's CA, and the variables that point at them.
        mount = "/var/run/secrets/kubeflow/trainer"
        pod_spec = {**pod_spec, "volumes": [*pod_spec.get("volumes", []), {"name": TRAINER_TOKEN_VOLUME,
                                                                            "projected": {"sources": []}}]}
        container["volumeMounts"] = [*container.get("volumeMounts", []),
                                     {"name": TRAINER_TOKEN_VOLUME, "mountPath": mount, "readOnly": True}]
        progress_env = {"KUBEFLOW_TRAINER_SERVER_URL": self.status_server.url(namespace, name),
                        "KUBEFLOW_TRAINER_SERVER_CA_CERT": f"{mount}/ca.crt",
                        "KUBEFLOW_TRAINER_SERVER_TOKEN": f"{mount}/token"}
        token = self.status_server.issue_token(namespace, name)

        def project(pod_name: str) -> None:
            volume = self.pods.root / namespace / pod_name / "volumes" / TRAINER_TOKEN_VOLUME
            volume.mkdir(parents=True, exist_ok=True)
            (volume / "token").write_text(token)
            (volume / "ca.crt").write_bytes(self.status_server.ca_file.read_bytes())

        async def start(attempt: int) -> list[PodProcess]:
            port, processes = free_port(), []
            for rank in range(nodes):
                env = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
                       "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), **progress_env}
                project(f"{name}-node-0-{rank}")
                processes.append(await self.pods.start(f"{name}-node-0-{rank}", namespace, pod_spec, container, env))
            jobs_status.update(active=1, ready=1)
            await status()
            return processes

        async def restarting(restarts: int, _: PodProcess) -> None:
            # The Job controller replaces the failed pod; the Job stays active within its backoffLimit.
            await status()

        running = self.running.setdefault(f"{namespace}/{name}", [])
        try:
            code, node, restarts = await run_group(start, int(job_spec.get("backoffLimit", 6)), restarting, running)
        except PodStartError as error:
            jobs_status["failed"] = 1
            await status(conditions=[_condition("Failed", "FailedJobs", f"{name}-node-0-0: {error}")])
            return
        jobs_status.update(active=0, ready=0, **({"succeeded": 1} if code == 0 else {"failed": 1}))
        if code == 0:
            condition = _condition("Complete", "AllJobsCompleted", "jobset completed successfully")
        else:
            message = f"jobset failed due to one or more job failures: {name}-node-0 reached its backoffLimit"
            condition = _condition("Failed", "FailedJobs", f"{message} ({restarts} restart(s))." + _last_line(node))
        await status(conditions=[condition])

    def apply_trainer_status(self, namespace: str, name: str, trainer_status: dict[str, Any]) -> None:
        """What the status server does with an accepted report (from its thread)."""
        asyncio.run_coroutine_threadsafe(self.server.patch(self.kind, namespace, name,
                                                           {"status": {"trainerStatus": trainer_status}},
                                                           subresource="status"), self.loop)

    def kill_node(self, namespace: str, name: str) -> int:
        """SIGKILL rank 0's process, as when its node is preempted; returns the killed pid."""
        node = self.running[f"{namespace}/{name}"][0]
        node.kill()
        return node.process.pid


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
    """The simulated controllers, running as tasks on the emulator's loop."""

    argo: ArgoController
    training: TrainingOperatorController
    trainer: TrainerController
    kserve: KServeController
    pods: LocalPods
    status_server: TrainerStatusServer
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    async def start(cls, server: ApiServer, root: Path) -> Controllers:
        pods = LocalPods(server, root)
        status_server = TrainerStatusServer(root / "trainer-status-tls")
        trainer = TrainerController(server, pods, status_server)
        status_server.on_status = trainer.apply_trainer_status
        status_server.start()
        controllers = cls(ArgoController(server, pods), TrainingOperatorController(server, pods), trainer,
                          KServeController(server, pods), pods, status_server)
        loop = asyncio.get_running_loop()
        controllers.tasks = [loop.create_task(c.run()) for c in controllers.all]
        return controllers

    @property
    def all(self) -> tuple[Controller, ...]:
        return (self.argo, self.training, self.trainer, self.kserve)

    async def stop(self) -> None:
        for controller in self.all:
            for task in controller.tasks.values():
                task.cancel()
        for task in self.tasks:
            task.cancel()
        self.pods.kill_all()
        self.status_server.stop()
        await asyncio.sleep(0)

    @property
    def failures(self) -> list[str]:
        return [failure for controller in self.all for failure in controller.failures]
