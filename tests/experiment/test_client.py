"""`tessera.Client()`, the local backend: an experiment run on this machine, its status and report as
pydantic objects and JSON, and a single fine-tune whose status says where its adapter is.

Stand-in: the tiny random LLaMA for a real base model (one cell, seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tessera import Client
from tessera.api import FineTuneJob, parse_resource
from tessera.api.experiment import ExperimentStatus
from tessera.client.backends import ClientError
from tessera.experiment.cells import cell_jobs

from .conftest import experiment_manifest, tiny_template_for

pytestmark = pytest.mark.slow


def test_the_local_backend_runs_reports_and_fine_tunes(tmp_path: Path, tiny_model_dir: Path) -> None:
    template = tiny_template_for(tmp_path, tiny_model_dir)
    experiment = parse_resource(experiment_manifest(
        [{"name": "rank", "path": "lora.rank", "values": [4]}], name="one", template=template))
    client = Client()
    with pytest.raises(ClientError, match="was not run by this client"):
        client.experiment_status("one")

    outcome = client.run_experiment(experiment, show_progress=False)
    (cell_name,) = outcome.ran
    status = client.experiment_status("one")
    assert isinstance(status, ExperimentStatus)
    assert (status.phase, status.cells_done, status.cells_total) == ("Succeeded", 1, 1)
    assert status.cells[0].name == cell_name and status.cells[0].adapter_uri
    report = client.report("one", namespace="team-a", store=template["store"]["uri"])
    assert report == outcome.report and report["winner"]["cell"] == cell_name

    (_, job), = cell_jobs(experiment)
    done = client.fine_tune(job, show_progress=False)
    assert isinstance(done, FineTuneJob) and done.status is not None and done.status.phase == "Succeeded"
    # The cell was published already: the same adapter, not a second version.
    assert done.status.adapter_ref.uri == status.cells[0].adapter_uri
