"""Write the example datasets in this folder: synthetic fixtures for the tasks with no public data
here, and the TFNS sample copied from the real dataset.

    python examples/data/generate.py                         # synthetic fixtures only
    python examples/data/generate.py --tfns ../shared/data/tfns/train.csv

Deterministic: the same script writes the same bytes (a test checks the committed files against
it). The synthetic rows follow simple rules, so a model that learns the task does visibly better
than chance; they are for trying the pipeline, not for judging a model.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TFNS_SAMPLE_ROWS = 400
TFNS_SEED = 7
# examples/tfns-distilled.yaml: tweets for a teacher to label (labels removed) and human-labelled held-out
# tweets, none of them in tfns-sample.csv (the teacher's own training data).
TFNS_UNLABELLED_ROWS, TFNS_HELDOUT_ROWS = 300, 200
TFNS_DISTILLED_SEED = 11

PEOPLE = ["Maria Lindqvist", "John Carter", "Akira Tanaka", "Sofia Rossi", "David Okafor", "Emma Schmidt",
          "Lucas Martin", "Priya Natarajan", "Olli Virtanen", "Hannah Becker", "Carlos Mendez", "Grace Liu"]
ORGANIZATIONS = ["Nordea", "Stora Enso", "Kone", "Fortum", "Siemens", "Barclays", "HSBC", "Nokia", "Wartsila",
                 "Goldman Sachs", "JPMorgan", "Roche", "Nestle", "UPM-Kymmene", "Deutsche Bank", "Tesla"]
LOCATIONS = ["Helsinki", "London", "New York", "Frankfurt", "Stockholm", "Tokyo", "Zurich", "Singapore",
             "Paris", "Oslo", "Chicago", "Hong Kong"]
TICKERS = ["ACME", "NRDX", "KONE", "FORT", "SIEM", "BARC", "HSBA", "NOKI", "WRTS", "GSCO", "JPMX", "ROCH",
           "NEST", "UPMK", "DBKX", "TSLX", "ORCL", "INTX", "AMDX", "SHLX"]

NER_TEMPLATES = [
    ("{person} was appointed chief executive of {org} , the company said in {loc} .", ("person", "org", "loc")),
    ("{org} opened a new office in {loc} headed by {person} .", ("org", "loc", "person")),
    ("Shares of {org} rose after {person} spoke to investors in {loc} .", ("org", "person", "loc")),
    ("In {loc} , {person} said {org} expects higher net sales next year .", ("loc", "person", "org")),
    ("{org} signed a supply agreement worth EUR 40 million with a customer in {loc} , {person} said .",
     ("org", "loc", "person")),
]
ENTITY_TYPES = {"person": "person", "org": "organization", "loc": "location"}

XBRL_ITEMS = [
    ("total revenues", "Revenues"),
    ("net income", "NetIncomeLoss"),
    ("total assets", "Assets"),
    ("total liabilities", "Liabilities"),
    ("stockholders' equity", "StockholdersEquity"),
    ("basic earnings per share", "EarningsPerShareBasic"),
    ("operating income", "OperatingIncomeLoss"),
    ("cash and cash equivalents", "CashAndCashEquivalents"),
]
XBRL_TEMPLATES = [
    "{company} reported {item} of ${value} for the fiscal year ended December 31, {year}.",
    "For {year}, {item} amounted to ${value}, compared with the prior year.",
    "As of December 31, {year}, the Company's {item} were ${value}.",
    "The Company recorded {item} of ${value} in fiscal {year}.",
]

CHAT_FACTS = [
    ("What does EBITDA stand for?",
     "EBITDA stands for earnings before interest, taxes, depreciation and amortization."),
    ("What is a price-to-earnings ratio?",
     "The price-to-earnings ratio is the share price divided by earnings per share."),
    ("What is free cash flow?",
     "Free cash flow is operating cash flow minus capital expenditure."),
    ("What is a bond's yield to maturity?",
     "Yield to maturity is the total return of a bond held until it matures, as an annual rate."),
    ("What does a current ratio measure?",
     "The current ratio measures current assets against current liabilities, a test of liquidity."),
    ("What is market capitalization?",
     "Market capitalization is the share price multiplied by the number of shares outstanding."),
    ("What is a dividend payout ratio?",
     "The dividend payout ratio is dividends paid divided by net income."),
    ("What is working capital?",
     "Working capital is current assets minus current liabilities."),
]
SYSTEM_PROMPT = "You are a concise assistant for a bank's analysts."

TEXT_SUBJECTS = ["net sales", "operating profit", "order intake", "gross margin", "free cash flow", "net debt"]
TEXT_MOVES = [("rose", "on stronger demand"), ("fell", "as prices weakened"), ("increased", "after new contracts"),
              ("decreased", "because of higher costs"), ("stayed flat", "despite a weaker currency")]
TEXT_PERIODS = ["in the first quarter", "in the second quarter", "in the third quarter", "in the fourth quarter"]


def _csv(rows: list[dict[str, object]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _jsonl(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def ner(rng: random.Random) -> str:
    rows = []
    for _ in range(180):
        template, slots = rng.choice(NER_TEMPLATES)
        values = {"person": rng.choice(PEOPLE), "org": rng.choice(ORGANIZATIONS), "loc": rng.choice(LOCATIONS)}
        asked = rng.choice(slots)
        rows.append({"text": template.format(**values), "entity": values[asked], "label": ENTITY_TYPES[asked]})
    return _jsonl(rows)


def _figure(rng: random.Random, tag: str) -> str:
    if tag == "EarningsPerShareBasic":
        return f"{rng.randint(10, 900) / 100:.2f}"
    return f"{rng.randint(1_000, 999_999):,}"


def xbrl_tags(rng: random.Random) -> str:
    rows = []
    for _ in range(160):
        item, tag = rng.choice(XBRL_ITEMS)
        value = _figure(rng, tag)
        text = rng.choice(XBRL_TEMPLATES).format(company=rng.choice(ORGANIZATIONS), item=item, value=value,
                                                 year=rng.randint(2015, 2024))
        rows.append({"text": text, "value": value, "label": f"us-gaap:{tag}"})
    return _csv(rows, ["text", "value", "label"])


def xbrl_values(rng: random.Random) -> str:
    rows = []
    for _ in range(160):
        (item_a, tag_a), (item_b, tag_b) = rng.sample(XBRL_ITEMS, 2)
        value_a, value_b = _figure(rng, tag_a), _figure(rng, tag_b)
        text = (f"{rng.choice(ORGANIZATIONS)} reported {item_a} of ${value_a} and {item_b} of ${value_b} "
                f"for fiscal {rng.randint(2015, 2024)}.")
        tag, value = (tag_a, value_a) if rng.random() < 0.5 else (tag_b, value_b)
        rows.append({"text": text, "tag": tag, "label": value.replace(",", "")})
    return _jsonl(rows)


def recommendation(rng: random.Random) -> str:
    rows = []
    for _ in range(200):
        metrics = {
            "pe_ratio": round(rng.uniform(5, 45), 1),
            "revenue_growth_pct": round(rng.uniform(-15, 30), 1),
            "operating_margin_pct": round(rng.uniform(-5, 35), 1),
            "debt_to_equity": round(rng.uniform(0.0, 3.0), 2),
            "momentum_3m_pct": round(rng.uniform(-25, 25), 1),
        }
        score = (metrics["revenue_growth_pct"] / 15 + metrics["operating_margin_pct"] / 20
                 + metrics["momentum_3m_pct"] / 20 - metrics["pe_ratio"] / 30 - metrics["debt_to_equity"] / 2)
        action = "buy" if score > 0.15 else "sell" if score < -0.9 else "hold"
        conviction = round(min(1.0, 0.5 + abs(score + 0.4) / 4), 2)
        rows.append({"ticker": rng.choice(TICKERS), "table": metrics, "label": action, "conviction": conviction})
    return _jsonl(rows)


def forecast(rng: random.Random) -> str:
    good = ["beats earnings estimates", "raises full-year guidance", "wins a large contract", "announces buyback"]
    bad = ["misses earnings estimates", "cuts guidance", "faces a regulatory probe", "loses a key customer"]
    rows = []
    for _ in range(200):
        history = [round(rng.gauss(0, 2.5), 1) for _ in range(4)]
        tone = rng.choice([1, -1])
        ticker = rng.choice(TICKERS)
        news = [f"{ticker} {rng.choice(good if tone > 0 else bad)}"]
        move = round(tone * abs(rng.gauss(2.0, 1.5)) + sum(history) / 10, 2)
        rows.append({"ticker": ticker, "history": history, "news": news, "label": move})
    return _jsonl(rows)


def chat(rng: random.Random) -> str:
    rows = []
    for i in range(80):
        question, answer = rng.choice(CHAT_FACTS)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if i % 4 == 0:
            follow_up, follow_answer = rng.choice(CHAT_FACTS)
            messages += [{"role": "user", "content": f"And: {follow_up}"},
                         {"role": "assistant", "content": follow_answer}]
        rows.append({"messages": messages})
    return _jsonl(rows)


def text(rng: random.Random) -> str:
    rows = []
    for i in range(60):
        company = rng.choice(ORGANIZATIONS)
        sentences = []
        for _ in range(3 if i % 10 else 40):  # every tenth document is long enough to be chunked
            subject, (move, why) = rng.choice(TEXT_SUBJECTS), rng.choice(TEXT_MOVES)
            sentences.append(f"{company}'s {subject} {move} {rng.randint(1, 40)}% {rng.choice(TEXT_PERIODS)} {why}.")
        rows.append({"text": " ".join(sentences)})
    return _jsonl(rows)


def tfns_sample(source: Path) -> str:
    """A stratified random sample of TFNS's train split (MIT licence; see README.md)."""
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(TFNS_SEED)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    picked: list[dict[str, str]] = []
    for label in sorted(by_label):
        share = round(TFNS_SAMPLE_ROWS * len(by_label[label]) / len(rows))
        picked += rng.sample(by_label[label], share)
    rng.shuffle(picked)
    return _csv(picked[:TFNS_SAMPLE_ROWS], ["text", "label"])


def tfns_distilled(source: Path, sample: str) -> dict[str, str]:
    """tfns-unlabelled.csv (label column empty) and tfns-heldout.csv, drawn from the rows not in `sample`."""
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    taken = {row["text"] for row in csv.DictReader(io.StringIO(sample))}
    rest = [row for row in rows if row["text"] not in taken]
    picked = random.Random(TFNS_DISTILLED_SEED).sample(rest, TFNS_UNLABELLED_ROWS + TFNS_HELDOUT_ROWS)
    unlabelled = [{"text": row["text"], "label": ""} for row in picked[:TFNS_UNLABELLED_ROWS]]
    return {"tfns-unlabelled.csv": _csv(unlabelled, ["text", "label"]),
            "tfns-heldout.csv": _csv(picked[TFNS_UNLABELLED_ROWS:], ["text", "label"])}


SYNTHETIC: dict[str, Callable[[random.Random], str]] = {
    "ner.jsonl": ner,
    "xbrl-tags.csv": xbrl_tags,
    "xbrl-values.jsonl": xbrl_values,
    "recommendation.jsonl": recommendation,
    "forecast.jsonl": forecast,
    "chat.jsonl": chat,
    "text.jsonl": text,
}


def synthetic_files() -> dict[str, str]:
    """File name -> content of every synthetic fixture (each from its own seeded generator)."""
    return {name: make(random.Random(f"tessera-{name}")) for name, make in SYNTHETIC.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tfns", type=Path, help="TFNS train.csv to sample tfns-sample.csv from")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    files = synthetic_files()
    if args.tfns:
        files["tfns-sample.csv"] = tfns_sample(args.tfns)
        files |= tfns_distilled(args.tfns, files["tfns-sample.csv"])
    for name, content in files.items():
        (args.out / name).write_text(content, encoding="utf-8")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
