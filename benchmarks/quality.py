"""What fine-tuning gains on a real model: the layout of Table 3 in the QLoRA FinGPT paper.

For each dataset in `../shared/data` (FPB, TFNS, gold headlines) this runs the example job as a
user would (`tessera run -f examples/<job>.yaml --set ...`: prepare, train, evaluate, publish) on
a real pretrained base (SmolLM2-135M-Instruct by default), then scores, on the same held-out rows
the job's evaluation used (rows the training never saw):

- the majority class of the training rows,
- TF-IDF + logistic regression trained on the same training rows (the classical line a sceptical
  reviewer draws; scikit-learn),
- the base model zero-shot, with the same free-text answer parsing as the adapter,
- the adapter.

It prints accuracy and weighted F1 for each, the base's and adapter's unparsed rate, and each
dataset's wall time. The default row caps (FPB and TFNS 1,600 training and 400 held-out rows,
headlines 250 and 70 rows, 400 scored examples each) keep a CPU run near an hour on 2 cores;
`--device cuda` with bigger caps runs the same on a GPU:

    python benchmarks/quality.py                                   # FPB, TFNS, headlines on CPU
    python benchmarks/quality.py --datasets tfns --train-rows 3000
    python benchmarks/quality.py --device cuda --train-rows 8000 --eval-rows 1000 --max-scored 1000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_MODEL = REPO / ".tessera" / "models" / "smollm2-135m-instruct"


@dataclass(frozen=True)
class Dataset:
    label: str
    job: Path
    csv: Path
    # Default caps in source rows, sized for about 20 minutes each on 2 CPU cores. A headline row
    # is one example per question (about six), so it takes fewer rows.
    train_rows: int
    eval_rows: int


DATASETS = {
    "fpb": Dataset("FPB", REPO / "examples" / "fpb-sentiment.yaml", DATA / "fpb" / "fpb.csv", 1600, 400),
    "tfns": Dataset("TFNS", REPO / "examples" / "tfns-sentiment.yaml", DATA / "tfns" / "train.csv", 1600, 400),
    "headlines": Dataset("Headline", REPO / "examples" / "gold-headlines.yaml",
                         DATA / "headlines" / "gold_headlines.csv", 250, 70),
}


def overrides(dataset: Dataset, args: argparse.Namespace, store: Path) -> list[str]:
    from tessera.model import base_model_name

    train_rows = args.train_rows or dataset.train_rows
    eval_rows = args.eval_rows or dataset.eval_rows
    sets = [
        f"spec.dataset.uri={dataset.csv}",
        f"spec.baseModel.uri={args.model}",
        f"spec.baseModel.name={base_model_name(args.model)}",
        f"spec.store.uri={store}",
        f"spec.dataset.maxRows={train_rows + eval_rows}",
        f"spec.dataset.evalSplit={eval_rows / (train_rows + eval_rows):.6f}",
        f"spec.evaluation.maxSamples={args.max_scored}",
        f"spec.training.epochs={args.epochs}",
    ]
    if args.bits == 0:
        sets.append("spec.baseModel.quantization.bits=null")
    elif args.bits:
        sets.append(f"spec.baseModel.quantization.bits={args.bits}")
    return sets


def run_job(dataset: Dataset, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`tessera run --json` in its own process, progress on the terminal; returns its JSON result."""
    command = [sys.executable, "-m", "tessera", "run", "-f", str(dataset.job), "--fresh", "--json"]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, cwd=REPO, env=env, check=True, text=True, stdout=subprocess.PIPE)
    return json.loads(result.stdout)


def classical_lines(dataset: Dataset, sets: list[str]) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """Majority class and TF-IDF + logistic regression, on the job's own train rows and scored rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from tessera.api.loader import load_job
    from tessera.data import load_prepared, sample
    from tessera.tasks import get_task
    from tessera.tasks.metrics import classification_metrics

    job = load_job(dataset.job, sets)
    task = get_task(job.spec.dataset.task)
    prepared = load_prepared(job)
    # The rows the evaluator scored: the same sample of the eval split, drawn the same way.
    scored = sample(prepared.eval, job.spec.evaluation.max_samples, job.spec.training.seed, lambda r: r.get("label"))
    golds = [row["label"] for row in scored]
    train_labels = [row["label"] for row in prepared.train]
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    majority_scores = classification_metrics([majority] * len(golds), golds, task.labels)
    # The prompt holds the input text (and, for headlines, the question): TF-IDF sees what the model sees.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    features = vectorizer.fit_transform([row["prompt"] for row in prepared.train])
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(features, train_labels)
    predictions = list(classifier.predict(vectorizer.transform([row["prompt"] for row in scored])))
    tfidf_scores = classification_metrics(predictions, golds, task.labels)
    return majority_scores, tfidf_scores, len(prepared.train), len(scored)


def cell(scores: dict[str, Any] | None, key: str) -> str:
    value = (scores or {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="fpb,tfns,headlines", help="Comma-separated: fpb, tfns, headlines.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Base model directory.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--train-rows", type=int, default=None, help="Training rows (source rows) of every dataset.")
    parser.add_argument("--eval-rows", type=int, default=None, help="Held-out rows (source rows) of every dataset.")
    parser.add_argument("--max-scored", type=int, default=400, help="Held-out examples scored per dataset.")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--bits", type=int, choices=[0, 4, 8], default=None,
                        help="Quantization of the base (0: none); default: the example job's.")
    parser.add_argument("--store", type=Path, default=None, help="Scratch store (default: a temporary directory).")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is not a model directory: run `make setup` (it imports SmolLM2-135M-Instruct)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""

    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-quality-") as scratch:
        store = args.store or Path(scratch) / "store"
        for key in args.datasets.split(","):
            dataset = DATASETS[key.strip()]
            if not dataset.csv.is_file():
                print(f"skipping {dataset.label}: {dataset.csv} is absent", file=sys.stderr)
                continue
            sets = overrides(dataset, args, store)
            started = time.perf_counter()
            result = run_job(dataset, sets, env)
            minutes = (time.perf_counter() - started) / 60
            majority, tfidf, train_rows, eval_rows = classical_lines(dataset, sets)
            report = result["evaluation"]
            rows.append((dataset.label, train_rows, eval_rows, majority, tfidf, report["base"], report["adapter"],
                         result["training"], minutes))

    print(f"\nQuality on held-out rows ({args.model.name}, {args.device}, {args.epochs:g} epoch(s); "
          "acc / weighted F1; unparsed share of the model's answers in brackets)\n")
    header = ("| dataset | train examples | scored | majority | TF-IDF + LR | base zero-shot | adapter "
              "| train tokens/s | minutes |")
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for label, train_rows, eval_rows, majority, tfidf, base, adapter, training, minutes in rows:
        tokens_per_second = training.get("tokensPerSecond")
        print(
            f"| {label} | {train_rows} | {eval_rows} "
            f"| {cell(majority, 'accuracy')} / {cell(majority, 'f1_weighted')} "
            f"| {cell(tfidf, 'accuracy')} / {cell(tfidf, 'f1_weighted')} "
            f"| {cell(base, 'accuracy')} / {cell(base, 'f1_weighted')} ({cell(base, 'unparsed_rate')}) "
            f"| {cell(adapter, 'accuracy')} / {cell(adapter, 'f1_weighted')} ({cell(adapter, 'unparsed_rate')}) "
            f"| {'-' if tokens_per_second is None else f'{tokens_per_second:.0f}'} | {minutes:.1f} |"
        )


if __name__ == "__main__":
    main()
