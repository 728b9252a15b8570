"""The shipped Experiment examples: they validate, expand to the cells the README describes, and the
two-base one runs end to end with tiny models standing in for both bases (SmolLM2 is for the real
run, not for tests), its report saying that the cells differ in base model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tessera.api import load_experiment
from tessera.experiment.cells import cell_jobs

ROOT = Path(__file__).resolve().parents[2]


def test_rank_precision_is_the_qlora_papers_two_by_two() -> None:
    experiment = load_experiment(ROOT / "examples" / "experiment-rank-precision.yaml")
    jobs = [job for _, job in cell_jobs(experiment)]
    assert sorted((j.spec.lora.rank, j.spec.base_model.quantization.bits or 16) for j in jobs) == [
        (4, 4), (4, 16), (16, 4), (16, 16)]
    assert {j.spec.base_model.name for j in jobs} == {"HuggingFaceTB/SmolLM2-135M-Instruct"}


@pytest.mark.slow
def test_two_bases_runs_and_its_report_says_the_bases_differ(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tessera.local.experiment import run_experiment
    from tessera.model.tiny import init_tiny

    other = init_tiny(tmp_path / "tiny-seed-1", seed=1)
    experiment = load_experiment(ROOT / "examples" / "experiment-two-bases.yaml", [
        f"spec.template.spec.store.uri={tmp_path / 'store'}",
        f"spec.template.spec.dataset.uri={ROOT / 'examples' / 'data' / 'tfns-sample.csv'}",
        "spec.template.spec.dataset.maxRows=64", "spec.template.spec.evaluation.maxSamples=8",
        "spec.template.spec.training.epochs=1", "spec.template.spec.evaluation.maxNewTokens=3",
    ])
    axis = experiment.spec.matrix.axes[0]
    assert [v["name"] for v in axis.values] == ["HuggingFaceTB/SmolLM2-135M-Instruct",
                                                 "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF-Q4_1"]
    axis.values = [{"uri": str(other), "name": "tiny-seed-1", "quantization": {"bits": None}},
                   {"uri": str(tiny_model_dir), "name": "tessera/tiny-llama", "quantization": {"bits": None}}]
    outcome = run_experiment(experiment, show_progress=False)
    rows = outcome.report["cells"]
    assert [r["phase"] for r in rows] == ["Succeeded", "Succeeded"]
    assert {r["baseModel"] for r in rows} == {"tiny-seed-1", "tessera/tiny-llama"}
    assert outcome.report["comparability"][0].startswith("cells differ in base model (2 distinct)")
