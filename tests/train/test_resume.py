"""Kill `tessera train` midway, run it again: it resumes from the last checkpoint and the loss curve goes on.

The kill is a real SIGKILL of the CLI process, as a preempted pod or an OOM kill gets.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT, make_job_file, run_tessera, tessera_command

pytestmark = pytest.mark.slow

CHECKPOINT_EVERY = 3


def read_curve(path: Path) -> dict[int, float]:
    if not path.is_file():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry["step"]: entry["loss"] for entry in entries}


def complete_checkpoints(job_dir: Path) -> list[int]:
    root = job_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if (p / "_COMPLETE").is_file())


def test_killed_training_resumes_from_its_last_checkpoint_and_the_loss_curve_continues(job_file, tmp_path) -> None:
    job = job_file(name="resume", rows=160, training={
        "checkpointEverySteps": CHECKPOINT_EVERY, "loggingSteps": 1, "epochs": 1, "batchSize": 2, "packing": False,
    })
    prepared = run_tessera("prepare", "-f", job)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    job_dir = tmp_path / "store" / "jobs" / "default" / "resume"
    curve_file = job_dir / "logs" / "train-log.jsonl"

    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(tessera_command("train", "-f", str(job), "--no-progress"), cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            # Kill once a checkpoint exists and steps after it have been logged: they are the ones redone.
            while not (complete_checkpoints(job_dir) and max(read_curve(curve_file), default=0)
                       >= complete_checkpoints(job_dir)[-1] + 2):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within the time limit"
                time.sleep(0.05)
        finally:
            process.kill()
            process.wait()
    killed_curve = read_curve(curve_file)
    last_checkpoint = complete_checkpoints(job_dir)[-1]
    killed_at = max(killed_curve)
    assert killed_at > last_checkpoint

    resumed = run_tessera("train", "-f", job, "--json", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout)
    assert outcome["resumedFrom"] == last_checkpoint
    assert f"resuming resume from checkpoint step {last_checkpoint}" in resumed.stderr
    assert outcome["step"] == outcome["totalSteps"] > killed_at

    curve = read_curve(curve_file)
    assert sorted(curve) == list(range(1, outcome["totalSteps"] + 1)), "the loss curve has a gap or a repeat"
    for step in range(1, last_checkpoint + 1):
        assert curve[step] == killed_curve[step], f"step {step} was rewritten"
    # The steps the kill lost are trained again on the same data with the same dropout: same losses.
    for step in range(last_checkpoint + 1, killed_at + 1):
        assert curve[step] == pytest.approx(killed_curve[step], rel=1e-4), f"step {step} differs after resume"


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A job trained for 3 steps with a checkpoint after each (prepared and trained, not evaluated)."""
    job = make_job_file(tmp_path_factory.mktemp("three"), tiny_model_dir, name="three", rows=40,
                        training={"maxSteps": 3, "checkpointEverySteps": 1})
    for step in (["prepare"], ["train", "--no-progress"]):
        result = run_tessera(*step, "-f", job)
        assert result.returncode == 0, result.stderr[-3000:]
    return job


def test_resuming_with_a_changed_setup_is_refused_with_what_changed(three_checkpoints: Path) -> None:
    again = run_tessera("train", "-f", three_checkpoints, "--no-progress",
                        "--set", "spec.training.learningRate=0.001")
    assert again.returncode != 0
    assert "spec.training.learningRate: 0.005 -> 0.001" in again.stderr
    assert "Traceback" not in again.stderr


def test_the_best_checkpoint_by_a_metric_is_the_one_published(three_checkpoints: Path) -> None:
    evaluated = run_tessera("evaluate", "-f", three_checkpoints, "--json", "--no-progress",
                            "--set", "spec.evaluation.selectCheckpointBy=eval_loss")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    scores = report["checkpoints"]
    assert sorted(scores) == [f"jobs/default/three/checkpoints/step-{n}" for n in (1, 2, 3)]
    best = min(scores, key=scores.get)
    assert report["checkpoint"] == best
    assert report["adapter"]["eval_loss"] == scores[best]
    published = run_tessera("publish", "-f", three_checkpoints, "--json")
    assert published.returncode == 0, published.stderr[-3000:]
    record = json.loads(published.stdout)
    assert record["checkpoint"] == best
    assert record["metrics"]["eval_loss"] == scores[best]
