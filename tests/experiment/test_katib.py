"""`spec.search` on Katib: the rendered Katib Experiment checked against Katib's own API models
(`kubeflow-katib-api`) and the shape of Katib's upstream custom-kind example; a trial's FineTuneJob as
Katib's template substitution makes it; and the metric push with the `kubeflow-katib` SDK's
`report_metrics` against a stand-in DB manager.

Stand-ins: the DB manager is a gRPC server on 127.0.0.1 built from Katib's own stubs
(`kubeflow.katib.katib_api_pb2_grpc`), recording what it is sent; Katib's substitution of
`${trialParameters.x}` is replayed as Katib's manifest generator does it (text replacement in the
JSON of the trial template, then parsed back); the pod's namespace file the SDK reads is patched in.
"""

from __future__ import annotations

import json
from concurrent import futures
from pathlib import Path

import pytest
import yaml
from tessera.api import FineTuneJob, parse_resource
from tessera.api.records import EvaluationReport
from tessera.errors import InvalidSpecError
from tessera.experiment.katib import TRIAL_NAME_ENV, katib_experiment, push_metrics

from .conftest import experiment_manifest

UPSTREAM = Path(__file__).parent / "katib" / "trainjob-pytorch.yaml"


def search_experiment(algorithm: str = "bayesianoptimization"):
    axes = [{"name": "rank", "path": "lora.rank", "values": [4, 8, 16]},
            {"name": "lr", "path": "training.learningRate", "min": 0.0001, "max": 0.001,
             "distribution": "logUniform"},
            {"name": "epochs", "path": "training.epochs", "min": 1, "max": 3, "step": 1},
            {"name": "task", "path": "dataset.task", "values": ["sentiment", "headline"]}]
    return parse_resource(experiment_manifest(axes, name="search", maxParallel=3,
                                              search={"algorithm": algorithm, "maxTrials": 12},
                                              selection={"metric": "f1_weighted"}))


def keys(node: object) -> set[str]:
    return set(node) if isinstance(node, dict) else set()


def test_the_katib_experiment_is_valid_for_katibs_own_api_models() -> None:
    models = pytest.importorskip("kubeflow_katib_api.models")
    rendered = katib_experiment(search_experiment())
    parsed = models.V1beta1Experiment.model_validate(rendered)
    # Katib's models ignore unknown fields: a round trip that loses nothing means every field is Katib's.
    assert parsed.model_dump(by_alias=True, exclude_none=True) == rendered
    spec = parsed.spec
    assert spec.algorithm.algorithm_name == "bayesianoptimization"
    assert spec.parallel_trial_count == 3 and spec.max_trial_count == 12
    assert spec.objective.type == "maximize" and spec.objective.objective_metric_name == "f1_weighted"
    assert spec.metrics_collector_spec.collector.kind == "Push"
    assert [(p.name, p.parameter_type) for p in spec.parameters] == [
        ("rank", "discrete"), ("lr", "double"), ("epochs", "int"), ("task", "categorical")]
    assert spec.parameters[0].feasible_space.list == ["4", "8", "16"]
    assert (spec.parameters[2].feasible_space.min, spec.parameters[2].feasible_space.max) == ("1", "3")
    assert spec.trial_template.trial_spec["kind"] == "FineTuneJob"


def test_it_has_the_shape_of_katibs_upstream_custom_kind_example() -> None:
    upstream = yaml.safe_load(UPSTREAM.read_text())
    ours = katib_experiment(search_experiment())
    assert (ours["apiVersion"], ours["kind"]) == (upstream["apiVersion"], upstream["kind"])
    assert keys(upstream["spec"]) <= keys(ours["spec"])
    assert keys(upstream["spec"]["objective"]) - {"goal"} <= keys(ours["spec"]["objective"])
    assert keys(upstream["spec"]["trialTemplate"]) <= keys(ours["spec"]["trialTemplate"])
    for theirs, mine in ((upstream["spec"]["parameters"][0], ours["spec"]["parameters"][1]),
                         (upstream["spec"]["trialTemplate"]["trialParameters"][0],
                          ours["spec"]["trialTemplate"]["trialParameters"][0])):
        assert keys(theirs) == keys(mine)
    references = {p["reference"] for p in ours["spec"]["trialTemplate"]["trialParameters"]}
    assert references == {p["name"] for p in ours["spec"]["parameters"]}


def katib_trial(rendered: dict, assignments: dict[str, str], name: str = "search-x7k2p") -> dict:
    """What Katib's manifest generator makes of the trial template for one assignment."""
    text = json.dumps(rendered["spec"]["trialTemplate"]["trialSpec"])
    for parameter in rendered["spec"]["trialTemplate"]["trialParameters"]:
        text = text.replace(f"${{trialParameters.{parameter['name']}}}", assignments[parameter["reference"]])
    trial = json.loads(text)
    trial["metadata"] |= {"name": name, "namespace": "team-a"}
    return trial


def test_a_trial_is_a_finetunejob_with_the_sampled_values_typed_on_its_spec() -> None:
    rendered = katib_experiment(search_experiment())
    job = parse_resource(katib_trial(rendered, {"rank": "16", "lr": "0.00042", "epochs": "2", "task": "headline"}))
    assert isinstance(job, FineTuneJob)
    assert job.spec.lora.rank == 16 and job.spec.training.learning_rate == 0.00042
    assert job.spec.training.epochs == 2 and job.spec.dataset.task == "headline"
    assert job.spec.serving.enabled is False  # only the experiment's winner is ever served
    # A value Katib could never draw still meets the FineTuneJob rules.
    with pytest.raises(InvalidSpecError) as caught:
        parse_resource(katib_trial(rendered, {"rank": "512", "lr": "0.001", "epochs": "1", "task": "sentiment"}))
    assert caught.value.problems == ["spec.lora.rank: must be between 1 and 256"]


def test_a_search_axis_takes_numbers_or_strings_only() -> None:
    axes = [{"name": "bits", "path": "baseModel.quantization.bits", "values": [4, None]}]
    with pytest.raises(InvalidSpecError) as caught:
        parse_resource(experiment_manifest(axes, search={"algorithm": "random"}))
    assert caught.value.problems == ["spec.matrix.axes.0.values: a search samples numbers or strings "
                                     "(Katib's feasibleSpace); null is neither"]


def test_no_push_outside_a_katib_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRIAL_NAME_ENV, raising=False)
    assert push_metrics(EvaluationReport(task="sentiment", metric="accuracy", samples=1,
                                         adapter={"accuracy": 0.8})) is None


def test_the_evaluate_step_pushes_its_metrics_to_katibs_db_manager(free_port: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(
        "kubeflow.katib",
        reason="kubeflow-katib pins protobuf<5 and kserve needs protobuf>=6.33.5, so `.[all]` cannot carry it; "
               "install it beside them (`pip install --no-deps kubeflow-katib`) to run this test")
    import grpc
    from kubeflow.katib import katib_api_pb2, katib_api_pb2_grpc
    from kubeflow.katib.utils import utils as katib_utils

    # The SDK reads the pod's namespace from the service-account mount the kubelet provides.
    monkeypatch.setattr(katib_utils, "get_current_k8s_namespace", lambda: "team-a")

    received: list = []

    class DBManager(katib_api_pb2_grpc.DBManagerServicer):
        def ReportObservationLog(self, request, context):  # noqa: N802 - Katib's RPC name
            received.append(request)
            return katib_api_pb2.ReportObservationLogReply()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    katib_api_pb2_grpc.add_DBManagerServicer_to_server(DBManager(), server)
    server.add_insecure_port(f"127.0.0.1:{free_port}")
    server.start()
    try:
        report = EvaluationReport(task="sentiment", metric="accuracy", samples=16,
                                  adapter={"accuracy": 0.8125, "f1_weighted": 0.79, "eval_loss": 0.41,
                                           "per_class": {}, "samplesPerSecond": 3.2})
        monkeypatch.setenv(TRIAL_NAME_ENV, "search-x7k2p")
        monkeypatch.setenv("TESSERA_KATIB_DB_MANAGER", f"127.0.0.1:{free_port}")
        pushed = push_metrics(report)
    finally:
        server.stop(None)
    assert pushed == {"accuracy": 0.8125, "f1_weighted": 0.79, "eval_loss": 0.41}
    (request,) = received
    assert request.trial_name == "search-x7k2p"
    assert {m.metric.name: float(m.metric.value) for m in request.observation_log.metric_logs} == pushed
