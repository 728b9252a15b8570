"""The comparison report of an experiment: JSON for machines, a Markdown table, and a self-contained
HTML page whose plots are PNGs inside it (data URIs: it opens offline, with no CDN).

It is written beside the experiment in the store: `experiments/<namespace>/<name>/report.{json,md,html}`.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from tessera.api import Experiment
from tessera.api.experiment import Selection
from tessera.experiment import plots
from tessera.experiment.results import CellResult
from tessera.experiment.selection import Choice, select
from tessera.store import Store, join_key, open_store

REPORT_FILES = ("report.json", "report.md", "report.html")


def report_prefix(experiment: Experiment) -> str:
    return f"experiments/{experiment.metadata.namespace}/{experiment.metadata.name}"


def build_report(experiment: Experiment, results: list[CellResult], choice: Choice | None = None) -> dict[str, Any]:
    """The report document: the rule, the winner and why, a row per cell, and what makes cells incomparable."""
    return comparison(experiment.metadata.name, experiment.metadata.namespace,
                      [{"name": a.name, "path": a.path} for a in experiment.spec.matrix.axes],
                      experiment.spec.selection, results, choice)


def compare_adapters(results: list[CellResult], selection: Selection) -> dict[str, Any]:
    """The same report over published adapters that no experiment grouped (`tessera compare`)."""
    return comparison("adapters", "-", [], selection, results)


def comparison(name: str, namespace: str, axes: list[dict[str, str]], selection: Selection,
               results: list[CellResult], choice: Choice | None = None) -> dict[str, Any]:
    choice = choice or select(results, selection)
    by_cell = {cell: candidate for candidate in choice.ranking for cell in candidate.cells}
    rows = []
    for result in results:
        candidate = by_cell.get(result.name)
        row = result.model_dump(mode="json", by_alias=True, exclude={"curve"})
        row["score"] = result.score(selection.metric)
        row["baseScore"] = _number(result.base_scores.get(selection.metric))
        row["interval95"] = [candidate.low, candidate.high] if candidate and candidate.low is not None else None
        row["eligible"] = bool(candidate and candidate.eligible)
        row["ineligibleBecause"] = candidate.reason if candidate and not candidate.eligible else None
        row["curve"] = [p.model_dump() for p in result.curve]
        rows.append(row)
    return {
        "experiment": name,
        "namespace": namespace,
        "axes": axes,
        "selection": selection.model_dump(mode="json", by_alias=True, exclude_none=True),
        "metric": selection.metric,
        "maximize": selection.maximize,
        "winner": None if choice.winner is None else {
            "cell": choice.winner.best_cell, "cells": choice.winner.cells, "values": choice.winner.values,
            "score": choice.winner.score, "spread": choice.winner.spread,
            "interval95": [choice.winner.low, choice.winner.high] if choice.winner.low is not None else None,
            "adapterUri": choice.winner.adapter_uri,
        },
        "reason": choice.reason,
        "separated": choice.separated,
        "comparability": comparability(results),
        "ranking": [c.model_dump(mode="json") for c in choice.ranking],
        "cells": rows,
    }


def comparability(results: list[CellResult]) -> list[str]:
    """Notes on what differs between cells beyond the axes: a loss curve compares only on the same data and base."""
    notes = []
    done = [r for r in results if r.phase == "Succeeded"]
    for what, attribute in (("base model", "base_model"), ("data", "dataset_sha256")):
        distinct = {getattr(r, attribute) for r in done}
        if len(distinct) > 1:
            notes.append(f"cells differ in {what} ({len(distinct)} distinct): their losses are not on one scale, "
                         "compare their held-out scores")
    if not notes and done:
        notes.append("every cell has the same base model and data: their loss curves compare directly")
    return notes


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows) shared by Markdown, HTML and `tessera experiment report`."""
    metric = report["metric"]
    axes = [a["name"] for a in report["axes"]]
    header = ["cell", *axes, "phase", f"{metric} (95% CI)", "base zero-shot", "F1 (weighted)", "eval loss",
              "train loss final / mean", "tokens", "wall (min)", "tokens/s", "device h", "cost", "adapter MB",
              "s / example"]
    rows = []
    winner = (report.get("winner") or {}).get("cells") or []
    for row in report["cells"]:
        interval = row.get("interval95")
        score = _fmt(row["score"]) + (f" ({interval[0]:.3f}–{interval[1]:.3f})" if interval else "")
        name = row["name"] + (" ★" if row["name"] in winner else "")
        values = [plots._text(row["values"].get(a)) for a in axes]
        adapter = row.get("adapterScores") or {}
        size = row.get("adapterBytes")
        rows.append([
            name, *values, row["phase"] + (f": {row['reason']}" if row.get("reason") else ""), score,
            _fmt(row.get("baseScore")), _fmt(_number(adapter.get("f1_weighted"))),
            _fmt(_number(adapter.get("eval_loss"))),
            f"{_fmt(row.get('trainLossFinal'))} / {_fmt(row.get('trainLossMean'))}", _fmt(row.get("trainedTokens")),
            _fmt(row["wallSeconds"] / 60 if row.get("wallSeconds") is not None else None, 1),
            _fmt(row.get("tokensPerSecond"), 0), _fmt(row.get("deviceHours"), 4),
            f"{_fmt(row.get('cost'), 4)} {row.get('currency', '')}".strip(),
            _fmt(size / 1e6 if size else None, 2), _fmt(_number(adapter.get("secondsPerExample")), 3),
        ])
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [f"# Experiment {report['namespace']}/{report['experiment']}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", f"**Winner**: {(report.get('winner') or {}).get('cell') or 'none'} — {report['reason']}.", ""]
    lines += [f"- {note}" for note in report["comparability"]]
    return "\n".join(lines) + "\n"


def figures(results: list[CellResult], choice: Choice) -> dict[str, bytes]:
    drawn = {
        "loss": plots.loss_curves(results),
        "score-vs-cost": plots.score_vs_cost(results, choice),
        "winner-per-class": plots.winner_per_class(results, choice),
    }
    return {name: png for name, png in drawn.items() if png is not None}


def html_page(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One HTML file, no external resource: the table, the verdict, and the plots as data URIs."""
    header, rows = table_rows(report)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(name)}</figcaption></figure>"
        for name, png in pngs.items()
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in report["comparability"])
    winner = (report.get("winner") or {}).get("cell") or "none"
    title = f"Experiment {report['namespace']}/{report['experiment']}"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}figure{display:inline-block;margin:1em}img{max-width:100%}"
        f"</style></head><body><h1>{esc(title)}</h1>"
        f"<p id=verdict><b>Winner: {esc(winner)}</b> — {esc(report['reason'])}.</p>"
        f"<table id=cells><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<ul>{notes}</ul>{images}</body></html>"
    )


def write_report(experiment: Experiment, results: list[CellResult],
                 store_root: tuple[Store, str] | None = None) -> tuple[str, dict[str, Any]]:
    """Write report.json, report.md and report.html to the experiment's prefix; returns (its URI, the report).

    `store_root` is the template's store opened by the caller (the operator opens it with the Secret)."""
    import json

    choice = select(results, experiment.spec.selection)
    report = build_report(experiment, results, choice)
    store, root = store_root or open_store(experiment.spec.template.spec.store.uri)
    prefix = join_key(root, report_prefix(experiment))
    store.put_bytes(f"{prefix}/report.json", json.dumps(report, indent=2).encode())
    store.put_bytes(f"{prefix}/report.md", markdown(report).encode())
    store.put_bytes(f"{prefix}/report.html", html_page(report, figures(results, choice)).encode())
    return store.uri(prefix), report


def read_report(store_uri: str, namespace: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The report JSON: from the experiment's prefix under a store root, or from a report prefix URI."""
    from tessera.errors import TesseraError

    store, root = open_store(store_uri)
    prefix = join_key(root, f"experiments/{namespace}/{name}") if name else root
    key = f"{prefix}/report.json"
    if not store.exists(key):
        raise TesseraError(f"no report at {store.uri(key)}: has the experiment finished?")
    return store.get_json(key)
