"""Nothing read back from a checkpoint runs code (issue 24): whoever can write a job's prefix must not
get code run in its training pod on the next resume.

Each test plants a pickle whose unpickling writes a marker file (the control shows that it really
does, with a plain unpickler), puts it where a resume reads, resumes, and checks the marker is absent.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tessera.api import FineTuneJob
from tessera.job_artifacts import JobArtifacts
from tessera.train.checkpoint import ENGINE_DIR, RNG_DIR, STATE_FILE, TrainState, restore, rng_state, set_rng_state
from tessera.train.distributed import DistEnv
from tessera.train.engine import TORCH_STATE_FILE, load_weights_only

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this writes `marker`: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state": _Payload(marker)}))


def test_the_payload_runs_when_unpickled_plainly(tmp_path):
    """The control: the planted file is live, so its absence below means it was never unpickled."""
    marker = tmp_path / "marker"
    plant(tmp_path / "evil.pt", marker)
    with (tmp_path / "evil.pt").open("rb") as stream:
        pickle.load(stream)  # noqa: S301 (the point: this is what must never happen to a checkpoint)
    assert marker.read_text() == "pwned"


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))  # what the file holds: numbers only
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _RecordingEngine:
    def __init__(self) -> None:
        self.loaded_from: Path | None = None

    def load(self, directory: Path) -> None:
        self.loaded_from = directory


def _job(store: Path) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "metadata": {"name": "resumed", "namespace": "tenant-a"},
        "spec": {"baseModel": {"uri": str(store / "models" / "tiny")},
                 "dataset": {"uri": str(store / "datasets" / "tenant-a" / "d.csv"), "task": "sentiment"},
                 "store": {"uri": str(store)}}})


def test_a_pickled_rng_state_planted_in_a_checkpoint_is_never_unpickled(tmp_path, caplog):
    store = tmp_path / "store"
    artifacts = JobArtifacts.open(_job(store))
    marker = tmp_path / "marker"
    local = tmp_path / "checkpoint"
    (local / ENGINE_DIR).mkdir(parents=True)
    (local / STATE_FILE).write_text(json.dumps(TrainState(step=1).to_json()))
    plant(local / RNG_DIR / "rank-0.pt", marker)  # where the RNG states used to be read from
    artifacts.store.publish_dir(local, artifacts.key(artifacts.checkpoint(1)))

    engine = _RecordingEngine()
    with caplog.at_level("WARNING"):
        restore(artifacts, engine, TrainState(step=1), DistEnv(), tmp_path / "work")
    assert engine.loaded_from is not None  # the resume went ahead
    assert not marker.exists()
    assert "never read" in caplog.text


def test_a_planted_torch_engine_state_fails_to_load_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / ENGINE_DIR / TORCH_STATE_FILE, marker)
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(tmp_path / ENGINE_DIR / TORCH_STATE_FILE)
    assert not marker.exists()


DEEPSPEED_RESUME = textwrap.dedent('''
    import os, pickle, sys, types
    from pathlib import Path
    import torch, deepspeed
    from tessera.train.engine import DEEPSPEED_TAG, DeepSpeedEngine

    work, mode = Path(sys.argv[1]), sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        model[0].requires_grad_(False)  # a frozen base and a trainable part, as with LoRA
        trainable = [p for p in model.parameters() if p.requires_grad]
        ds, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=1e-3),
            config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
        return ds

    first = engine()
    loss = first(torch.randn(2, 8).bfloat16()).float().sum()
    first.backward(loss)
    first.step()
    first.save_checkpoint(str(work / "ckpt"), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False)
    holder = types.SimpleNamespace(engine=engine())
    if mode == "plant":
        [optim] = (work / "ckpt" / DEEPSPEED_TAG).glob("*optim_states.pt")
        optim.write_bytes(Path(sys.argv[4]).read_bytes())
    try:
        DeepSpeedEngine.load(holder, work / "ckpt")
    except pickle.UnpicklingError as error:
        print("REFUSED", str(error).splitlines()[0])
        sys.exit(3)
    print("LOADED", holder.engine.global_steps)
''')


def _free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.parametrize("mode", ["clean", "plant"])
def test_deepspeed_resumes_its_own_checkpoint_weights_only_and_refuses_a_planted_pickle(tmp_path, mode):
    """DeepSpeed's own loader unpickles with weights_only=False; Tessera's resume goes through
    `load_weights_only`. A real ZeRO-2 bf16 checkpoint loads that way; a planted one is refused."""
    marker = tmp_path / "marker"
    plant(tmp_path / "payload.pt", marker)
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(tmp_path), mode, _free_port(),
                           str(tmp_path / "payload.pt")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if mode == "clean":
        assert done.returncode == 0 and "LOADED 1" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode == 3 and "REFUSED" in done.stdout, done.stdout + done.stderr[-3000:]
    assert not marker.exists()
