"""`tessera experiment run` on this machine: cells one after the other, a failed cell reported while the
others go on, a rerun that skips finished cells, and the report's numbers read against the cells'
own model cards.

Real parts: the `tessera` CLI in a subprocess, PEFT, bitsandbytes on the CPU, matplotlib, the
local-directory store. Stand-in: the tiny random LLaMA for a real base model (seconds per cell).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.train.conftest import run_tessera

from .conftest import experiment_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    from tests.experiment.conftest import tiny_template_for

    workdir = tmp_path_factory.mktemp("experiment")
    template = tiny_template_for(workdir, tiny_model_dir)
    missing = str(workdir / "no-such-data.csv")
    document = experiment_manifest(
        [{"name": "rank", "path": "lora.rank", "values": [2, 8]},
         {"name": "data", "path": "dataset.uri", "values": [template["dataset"]["uri"], missing]}],
        name="tiny", template=template, matrix={"exclude": [{"rank": 8, "data": missing}]},
    )
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    first = run_tessera("experiment", "run", "-f", path, "--json", "--no-progress", timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    return {"path": path, "store": Path(template["store"]["uri"]), "outcome": json.loads(first.stdout),
            "missing": missing}


def test_every_cell_runs_and_a_failed_cell_is_reported_with_its_reason(finished: dict[str, Any]) -> None:
    report = finished["outcome"]["report"]
    rows = {(r["values"]["rank"], r["values"]["data"] == finished["missing"]): r for r in report["cells"]}
    assert set(rows) == {(2, False), (8, False), (2, True)}
    failed = rows[(2, True)]
    assert failed["phase"] == "Failed" and "no-such-data.csv" in failed["reason"]
    assert {rows[(2, False)]["phase"], rows[(8, False)]["phase"]} == {"Succeeded"}
    assert report["winner"]["cell"] in {rows[(2, False)]["name"], rows[(8, False)]["name"]}
    assert failed["name"] not in {c["key"] for c in report["ranking"] if c["eligible"]}


def test_the_report_carries_each_cells_model_card_numbers(finished: dict[str, Any]) -> None:
    for row in finished["outcome"]["report"]["cells"]:
        if row["phase"] != "Succeeded":
            continue
        adapter = Path(row["adapterUri"].removeprefix("file://"))
        card = json.loads((adapter / "model-card.json").read_text())
        assert row["score"] == card["metrics"]["adapter"]["accuracy"]
        assert row["baseScore"] == card["metrics"]["base"]["accuracy"]
        assert row["trainedTokens"] == card["training"]["trainedTokens"]
        assert row["cost"] == card["cost"]["amount"] and row["cost"] > 0
        assert row["adapterBytes"] == sum(p.stat().st_size for p in adapter.iterdir() if p.name != "_COMPLETE")
        assert row["curve"] and row["curve"][-1]["tokens"] == card["training"]["trainedTokens"]
        assert row["trainLossFinal"] == card["training"]["trainLoss"]


def test_report_files_are_written_beside_the_experiment(finished: dict[str, Any]) -> None:
    prefix = finished["store"] / "experiments" / "team-a" / "tiny"
    assert json.loads((prefix / "report.json").read_text()) == finished["outcome"]["report"]
    table = (prefix / "report.md").read_text()
    assert table.count("\n| tiny-") == 3 and "Failed" in table
    page = (prefix / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline


def test_a_rerun_skips_finished_cells_and_retries_the_failed_one(finished: dict[str, Any]) -> None:
    again = run_tessera("experiment", "run", "-f", finished["path"], "--json", "--no-progress", timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    outcome = json.loads(again.stdout)
    succeeded = {r["name"] for r in finished["outcome"]["report"]["cells"] if r["phase"] == "Succeeded"}
    assert set(outcome["skipped"]) == succeeded
    assert len(outcome["ran"]) == 1 and outcome["ran"][0] not in succeeded


def test_report_command_prints_the_table(finished: dict[str, Any]) -> None:
    shown = run_tessera("experiment", "report", "tiny", "-n", "team-a", "--store", finished["store"])
    assert shown.returncode == 0, shown.stderr
    assert "| cell | rank | data | phase | accuracy (95% CI)" in shown.stdout
    assert shown.stdout.count("★") == 1


def test_the_html_report_renders_its_plots_in_headless_chromium(finished: dict[str, Any], tmp_path: Path) -> None:
    """Debian's chromium opens the page from a file URL, with no network: every plot must decode."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the HTML is not opened")
    page = tmp_path / "report.html"
    source = (finished["store"] / "experiments" / "team-a" / "tiny" / "report.html").read_text()
    # The probe counts the images the browser decoded, once the page has loaded.
    probe = ('<script>addEventListener("load",()=>{document.body.dataset.rendered='
             '[...document.images].filter(i=>i.complete&&i.naturalWidth>200).length})</script>')
    page.write_text(source.replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + str(tmp_path / "profile"),
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="3"' in dom.stdout
    assert '<table id="cells">' in dom.stdout


def test_compare_reads_any_published_adapters_from_their_cards_and_logs(finished: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    cells = [r for r in finished["outcome"]["report"]["cells"] if r["phase"] == "Succeeded"]
    page = tmp_path / "compare.html"
    shown = run_tessera("compare", *[r["adapterUri"] for r in cells], "--json", "--html", page)
    assert shown.returncode == 0, shown.stderr[-2000:]
    document = json.loads(shown.stdout)
    by_uri = {row["adapterUri"]: row for row in document["cells"]}
    for cell in cells:
        row = by_uri[cell["adapterUri"]]
        assert row["score"] == cell["score"] and row["cost"] == cell["cost"]
        assert row["curve"] == cell["curve"]  # found through the card's lineage, in the same store
    assert page.read_text().count("data:image/png;base64,") == 3
    refused = run_tessera("compare", str(finished["store"] / "jobs"))
    assert refused.returncode == 1 and "is not a published adapter" in refused.stderr


def test_status_command_lists_the_recorded_cells(finished: dict[str, Any]) -> None:
    shown = run_tessera("experiment", "status", "-f", finished["path"], "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    status = json.loads(shown.stdout)
    assert (status["cellsTotal"], status["cellsDone"]) == (3, 3)
    assert sorted(c["phase"] for c in status["cells"]) == ["Failed", "Succeeded", "Succeeded"]
    assert status["winner"]["cell"] == finished["outcome"]["report"]["winner"]["cell"]
