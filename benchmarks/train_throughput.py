"""Training throughput: Tessera's trainer vs a plain `transformers.Trainer` + `peft`, same everything.

    python benchmarks/train_throughput.py [--steps 40] [--batch-size 8] [--bits 4] [--data CSV]

Both train the same LoRA (rank, alpha, dropout, target modules) on the same base (the tiny
LLaMA unless --model is given), quantized the same way, from the same prepared examples with the
same prompt masking, for the same number of optimizer steps at the same micro-batch size,
learning rate and schedule. What differs is what Tessera does on purpose: packing (no padding),
the vocabulary projection on answer tokens only, and its own lean loop. The baseline pads each
batch to its longest example (DataCollatorForSeq2Seq), as a plain SFT script does.

Each side runs in a fresh child process (so peak memory is its own): tokens/s counts the
non-padding tokens trained on, per second of training loop (model loading excluded), and per
CPU-second (steadier than wall time on a shared machine). Peak memory is the process's max RSS
on CPU, `torch.cuda.max_memory_allocated` on GPU. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "examples" / "data" / "tfns-sample.csv"
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}


def job_for(args: argparse.Namespace, store: Path, model_dir: Path) -> Any:
    from tessera.api import FineTuneJob

    return FineTuneJob.model_validate({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "throughput"},
        "spec": {
            "baseModel": {"uri": str(model_dir), "quantization": {"bits": args.bits},
                          "computeDtype": args.dtype},
            "dataset": {"uri": str(args.data), "task": "sentiment", "labelMap": TFNS_LABELS, "onBadRows": "skip"},
            "lora": {"rank": 8, "alpha": 32, "dropout": 0.1},
            "training": {"maxSteps": args.steps, "batchSize": args.batch_size, "learningRate": 2e-3,
                         "maxSeqLength": args.max_seq_length, "gradientCheckpointing": args.gradient_checkpointing,
                         "checkpointEverySteps": args.steps, "loggingSteps": args.steps, "packing": True},
            "distribution": {"gpusPerWorker": 1 if args.cuda else 0},
            "store": {"uri": str(store)},
        },
    })


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_tessera(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    from tessera.data import prepare
    from tessera.train.trainer import train_job

    job = job_for(args, workdir / "store", model_dir)
    prepare(job)
    cpu_started = time.process_time()
    result = train_job(job, show_progress=False)
    cpu_seconds = time.process_time() - cpu_started
    seconds = result.trained_tokens / result.tokens_per_second
    return {"tokens": result.trained_tokens, "seconds": seconds, "cpuSeconds": cpu_seconds,
            "loss": result.train_loss, "engine": result.engine}


def run_baseline(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tessera.data import load_prepared, prepare, tokenize
    from tessera.tasks import Example
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    job = job_for(args, workdir / "store", model_dir)
    prepare(job)
    examples = [Example.from_dict(row) for row in load_prepared(job).train]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for example in examples:
        ids, labels = tokenize(example, tokenizer)
        rows.append({"input_ids": ids[: args.max_seq_length], "labels": labels[: args.max_seq_length],
                     "attention_mask": [1] * min(len(ids), args.max_seq_length)})

    dtype = getattr(torch, args.dtype)
    quantization = None
    if args.bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif args.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype,
                                                 attn_implementation="sdpa")
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ))
    counted = {"tokens": 0}

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    training_args = TrainingArguments(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=int(0.03 * args.steps), max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=args.steps, save_strategy="no", report_to=[], seed=42, optim="adamw_torch",
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.dtype == "bfloat16",
        use_cpu=not args.cuda, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = CountingTrainer(
        model=model, args=training_args, train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    cpu_started, started = time.process_time(), time.perf_counter()
    output = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"tokens": counted["tokens"], "seconds": seconds, "cpuSeconds": cpu_seconds,
            "loss": output.training_loss, "engine": "transformers.Trainer"}


def child(args: argparse.Namespace) -> None:
    from tessera.model import init_tiny

    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as scratch:
        workdir = Path(scratch)
        model_dir = Path(args.model) if args.model else init_tiny(workdir / "tiny")
        run = run_tessera if args.child == "tessera" else run_baseline
        result = run(args, workdir, model_dir)
    result |= {"runner": args.child, "peakMemoryMiB": peak_memory_mib()}
    print("RESULT " + json.dumps(result), flush=True)


def measure(argv: list[str]) -> list[dict[str, Any]]:
    """Baseline then Tessera, each in a fresh child process; their result dicts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Both sides get the same OpenMP policy: the one `tessera train` sets (threads sleep when idle).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = []
    for runner in ("baseline", "tessera"):
        completed = subprocess.run(
            [sys.executable, __file__, *argv, "--child", runner], capture_output=True, text=True, check=False, env=env,
        )
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            sys.exit(f"{runner} run failed:\n{completed.stderr[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells)))


def result_row(result: dict[str, Any], *prefix: str) -> tuple[str, ...]:
    runner = f"Tessera ({result['engine']})" if result["runner"] == "tessera" else "transformers.Trainer + peft"
    return (*prefix, runner, str(result["tokens"]), f"{result['seconds']:.1f}",
            f"{result['tokens'] / result['seconds']:.0f}", f"{result['tokens'] / result['cpuSeconds']:.0f}",
            f"{result['peakMemoryMiB']:.0f}", f"{result['loss']:.4f}")


RESULT_HEADER = ("runner", "tokens", "loop s", "tokens/s", "tokens/CPU-s", "peak MiB", "final loss")


def speedup(baseline: dict[str, Any], tessera: dict[str, Any]) -> float:
    return (tessera["tokens"] / tessera["seconds"]) / (baseline["tokens"] / baseline["seconds"])


def parent(args: argparse.Namespace) -> None:
    baseline, tessera = measure(sys.argv[1:])
    device = "CUDA" if args.cuda else f"CPU, {os.cpu_count()} cores"
    print(f"\nLoRA training throughput: {args.steps} steps, micro-batch {args.batch_size}, max length "
          f"{args.max_seq_length}, {args.bits or 'no'}-bit base, {args.dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} ({device})")
    print_table([RESULT_HEADER, result_row(baseline), result_row(tessera)])
    print(f"Tessera / baseline tokens/s: {speedup(baseline, tessera):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--bits", type=int, choices=[4, 8, 0], default=4, help="0: no quantization")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TFNS-format CSV (text,label 0/1/2).")
    parser.add_argument("--model", help="Base model directory (default: the tiny LLaMA, built in a temp dir).")
    parser.add_argument("--child", choices=["tessera", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bits = args.bits or None
    import torch

    args.cuda = torch.cuda.is_available()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
