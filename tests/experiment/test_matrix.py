"""Matrix expansion: the product of the axes, excludes, includes, repeats, names, limits and bad paths."""

from __future__ import annotations

import hashlib
import json

import pytest
from tessera.api import parse_resource
from tessera.api.experiment import DEFAULT_MAX_CELLS, MAX_CELLS_ENV
from tessera.errors import InvalidSpecError
from tessera.experiment.cells import CELL_LABEL, EXPERIMENT_LABEL, cell_jobs

from .conftest import experiment_manifest

RANK = {"name": "rank", "path": "lora.rank", "values": [4, 16]}
BITS = {"name": "bits", "path": "baseModel.quantization.bits", "values": [4, None]}


def problems(document: dict) -> list[str]:
    with pytest.raises(InvalidSpecError) as caught:
        parse_resource(document)
    return caught.value.problems


def test_the_product_of_the_axes_sets_each_path_on_a_copy_of_the_template() -> None:
    experiment = parse_resource(experiment_manifest([RANK, BITS]))
    jobs = cell_jobs(experiment)
    assert [(job.spec.lora.rank, job.spec.base_model.quantization.bits) for _, job in jobs] == [
        (4, 4), (4, None), (16, 4), (16, None)]
    # Paths not on an axis keep the template's value; the template itself is not changed.
    assert {job.spec.dataset.task for _, job in jobs} == {"sentiment"}
    assert experiment.spec.template.spec.lora.rank == 8


def test_exclude_drops_matching_cells_and_include_adds_whole_cells() -> None:
    document = experiment_manifest([RANK, BITS], matrix={
        "exclude": [{"rank": 16, "bits": None}],
        "include": [{"rank": 64, "bits": 8}, {"rank": 4, "bits": 4}],  # the second is already in the grid
    })
    cells = parse_resource(document).spec.cells()
    assert [c.values for c in cells] == [
        {"rank": 4, "bits": 4}, {"rank": 4, "bits": None}, {"rank": 16, "bits": 4}, {"rank": 64, "bits": 8}]


def test_a_partial_exclude_drops_every_cell_it_matches() -> None:
    cells = parse_resource(experiment_manifest([RANK, BITS], matrix={"exclude": [{"bits": None}]})).spec.cells()
    assert [c.values["bits"] for c in cells] == [4, 4]


def test_an_axis_may_replace_a_whole_mapping_such_as_the_base_model() -> None:
    bases = {"name": "base", "path": "baseModel", "values": [
        {"uri": "models/smollm2", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        {"uri": "models/tiny", "name": "tessera/tiny-llama", "quantization": {"bits": None}},
    ]}
    jobs = cell_jobs(parse_resource(experiment_manifest([bases])))
    assert [(j.spec.base_model.uri, j.spec.base_model.quantization.bits) for _, j in jobs] == [
        ("models/smollm2", 4), ("models/tiny", None)]


def test_cell_names_come_from_a_hash_of_the_cell_and_label_its_job() -> None:
    experiment = parse_resource(experiment_manifest([RANK, BITS]))
    cell, job = cell_jobs(experiment)[1]
    digest = hashlib.sha256(json.dumps([{"lora.rank": 4, "baseModel.quantization.bits": None}, 0],
                                       sort_keys=True).encode()).hexdigest()
    assert job.metadata.name == f"ranks-{digest[:8]}"
    assert job.metadata.namespace == "team-a"
    assert job.adapter_name == job.metadata.name
    assert job.spec.serving.enabled is False
    assert job.metadata.labels[EXPERIMENT_LABEL] == "ranks"
    assert job.metadata.labels[CELL_LABEL] == job.metadata.name
    assert job.metadata.labels["experiment.tessera.dev/bits"] == "null"
    # Reordering the axes keeps every cell's name: a restart finds the same jobs.
    reordered = parse_resource(experiment_manifest([BITS, RANK]))
    assert {j.metadata.name for _, j in cell_jobs(reordered)} == {j.metadata.name for _, j in cell_jobs(experiment)}


def test_repeats_run_each_cell_under_successive_seeds() -> None:
    experiment = parse_resource(experiment_manifest([RANK], repeats=3))
    jobs = cell_jobs(experiment)
    assert [(c.values["rank"], c.repeat, j.spec.training.seed) for c, j in jobs] == [
        (4, 0, 42), (4, 1, 43), (4, 2, 44), (16, 0, 42), (16, 1, 43), (16, 2, 44)]
    assert len({j.metadata.name for _, j in jobs}) == 6


@pytest.mark.parametrize(("axis", "expected"), [
    ({"name": "rank", "path": "lora.rnak", "values": [4]},
     "spec.matrix.axes.0.path: 'lora.rnak' is not a field: lora has no 'rnak'"),
    ({"name": "rank", "path": "lora.rank.x", "values": [4]},
     "spec.matrix.axes.0.path: 'lora.rank.x' is not a field: 'rank' holds a value, not a mapping"),
    ({"name": "rank", "path": "lora.rank", "values": []},
     "spec.matrix.axes.0.values: must have at least 1 item(s)"),
    ({"name": "rank", "path": "lora.rank", "values": [4, 512]},
     "spec.matrix: the cell rank=512 makes an invalid FineTuneJob: lora.rank: must be between 1 and 256"),
    ({"name": "Rank", "path": "lora.rank", "values": [4]}, "spec.matrix.axes.0.name: must match the pattern"),
])
def test_a_bad_axis_is_refused_with_the_path_that_is_wrong(axis: dict, expected: str) -> None:
    found = problems(experiment_manifest([axis]))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_include_and_exclude_must_name_axes() -> None:
    assert problems(experiment_manifest([RANK], matrix={"exclude": [{"rnak": 4}]})) == [
        "spec.matrix.exclude.0: 'rnak' is not an axis (axes: rank)"]
    assert problems(experiment_manifest([RANK, BITS], matrix={"include": [{"rank": 8}]})) == [
        "spec.matrix.include.0: an included cell gives every axis a value (missing: bits)"]


def test_a_mapping_field_takes_any_key_but_a_typo_in_a_section_does_not() -> None:
    parse_resource(experiment_manifest([{"name": "text", "path": "dataset.columns.text", "values": ["a", "b"]}]))
    assert problems(experiment_manifest([{"name": "lr", "path": "trainig.learningRate", "values": [1e-4]}]))[0] \
        .startswith("spec.matrix.axes.0.path: 'trainig.learningRate' is not a field: the spec has no 'trainig'")


def test_more_cells_than_the_installation_allows_are_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    many = {"name": "lr", "path": "training.learningRate", "values": [i / 1000 for i in range(1, 12)]}
    assert DEFAULT_MAX_CELLS == 32
    assert problems(experiment_manifest([many, RANK, BITS])) == [
        f"spec.matrix: 44 cells (44 x 1 repeats) is more than the 32 this installation allows ({MAX_CELLS_ENV})"]
    monkeypatch.setenv(MAX_CELLS_ENV, "3")
    assert problems(experiment_manifest([RANK, BITS]))[0].startswith("spec.matrix: 4 cells")
    assert len(parse_resource(experiment_manifest([RANK, BITS], matrix={"exclude": [{"rank": 16, "bits": 4}]})
                              ).spec.cells()) == 3


def test_the_experiment_name_leaves_room_for_the_cell_hash() -> None:
    document = experiment_manifest([RANK], name="x" * 55)
    assert problems(document) == ["metadata.name: at most 54 characters (cell jobs add -<8 hex>)"]
