"""Training throughput: Tessera's trainer vs TRL's `SFTTrainer` with packing, the baseline users pick.

    python benchmarks/train_throughput.py [--steps 12] [--warmup 2] [--batch-size 8] [--bits 4]
        [--model DIR] [--runners trl,trainer,tessera] [--repeats 1]

Runners (each in a fresh child process, so that its peak memory is its own):

- `trl`: TRL `SFTTrainer` with `packing=True, packing_strategy="bfd"` (which makes it padding-free:
  each micro-batch is one flattened row with `position_ids`, from which transformers builds the
  block-diagonal mask for SDPA), `completion_only_loss=True` (labels from a `completion_mask`), and
  TRL's own chunked LM-head loss.
- `trainer`: a plain `transformers.Trainer` + `peft`, each batch padded to its longest example
  (`DataCollatorForSeq2Seq`), its micro-batch sized to carry as many real tokens as a packed one.
- `tessera`: Tessera's trainer (`train_job`).

The same for all: the base model (the tiny LLaMA unless --model), quantized the same way (NF4
double-quant by default), the compute dtype, the LoRA (rank 8, alpha 32, dropout 0.1, all linear
layers), the tokenised sequences (Tessera's chat rendering and prompt masking; the runners get the
token ids, not text), the optimizer steps, learning rate and schedule, gradient checkpointing,
threads. Tessera and TRL both pack best-fit decreasing into blocks of --max-seq-length with
--batch-size blocks per micro-batch, so they see the same real tokens per optimizer step (the
table shows it); the data order differs (each shuffles with its own seed).

Steady state only: the first --warmup optimizer steps are excluded; tokens/s is the non-padding
tokens of the remaining steps over their wall time (tokens/CPU-s too: steadier on a shared
machine). Peak memory is the process's max RSS on CPU, `torch.cuda.max_memory_allocated` on GPU.
Loss: the last step's, and the mean over all steps (the runners see batches in different orders,
so the mean is the one to compare). On a GPU the table adds the model-FLOPs utilisation (see
`model_flops_per_token`). With --repeats R the runners run R rounds, alternating their order, so
that all see the same load; the table gives each runner's median round. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "examples" / "data" / "tfns-sample.csv"
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
LORA = {"rank": 8, "alpha": 32, "dropout": 0.1}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-3
RUNNERS = ("trl", "trainer", "tessera")
RUNNER_NAMES = {"trl": "TRL SFTTrainer, packed (bfd)", "trainer": "transformers.Trainer, padded"}
# Dense bf16 peak of a GPU (TFLOP/s, without sparsity), by a part of its name, for the MFU.
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "4090": 165.2}


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
            "lora": LORA,
            "training": {"maxSteps": args.steps, "batchSize": args.batch_size, "learningRate": LEARNING_RATE,
                         "maxSeqLength": args.max_seq_length, "gradientCheckpointing": args.gradient_checkpointing,
                         "checkpointEverySteps": args.steps, "loggingSteps": 1, "packing": True},
            "distribution": {"gpusPerWorker": 1 if args.cuda else 0},
            "store": {"uri": str(store)},
        },
    })


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def steady(steps: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """Tokens and seconds of the steps after the warm-up ones (`steps`: one dict per optimizer step)."""
    kept = steps[warmup:] or steps[-1:]
    return {"tokens": sum(s["tokens"] for s in kept), "seconds": sum(s["seconds"] for s in kept),
            "cpuSeconds": sum(s["cpuSeconds"] for s in kept), "steadySteps": len(kept),
            "tokensPerStep": sum(s["tokens"] for s in steps) / len(steps),
            "loss": steps[-1]["loss"], "meanLoss": statistics.fmean(s["loss"] for s in steps)}


def run_tessera(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    import tessera.train.trainer as trainer
    from tessera.api import paths
    from tessera.data import prepare
    from tessera.train.progress import TRAIN_LOG

    class StepClock(trainer.ProgressReporter):
        """The trainer's progress reporter, noting the wall and CPU clocks at the end of every step."""

        marks: list[tuple[float, float]] = []

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.marks.append((time.perf_counter(), time.process_time()))

        def advance(self, steps: int = 1) -> None:
            super().advance(steps)
            self.marks.append((time.perf_counter(), time.process_time()))

    job = job_for(args, workdir / "store", model_dir)
    prepare(job)
    trainer.ProgressReporter = StepClock  # a benchmark's probe; the trainer has no step hook
    result = trainer.train_job(job, show_progress=False)
    log = workdir / "store" / paths.logs_prefix(job) / TRAIN_LOG
    history = [json.loads(line) for line in log.read_text().splitlines()]  # one entry per step (loggingSteps 1)
    marks = StepClock.marks
    steps = [{"tokens": entry["tokens"], "seconds": end[0] - start[0], "cpuSeconds": end[1] - start[1],
              "loss": entry["loss"]} for entry, start, end in zip(history, marks[:-1], marks[1:], strict=True)]
    return steady(steps, args.warmup) | {"engine": f"Tessera ({result.engine})"}


def training_sequences(args: argparse.Namespace, workdir: Path, model_dir: Path) -> tuple[list[dict], Any]:
    """The tokenised training sequences Tessera trains on (before packing), and the tokenizer."""
    from tessera.data import build_features, load_prepared, prepare
    from transformers import AutoTokenizer

    job = job_for(args, workdir / "store", model_dir)
    prepare(job)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    features = build_features(load_prepared(job).train, tokenizer, args.max_seq_length, packing=False)
    return features, tokenizer


def load_hf_model(args: argparse.Namespace, model_dir: Path) -> Any:
    """The base model as a Hugging Face user loads it for QLoRA (bitsandbytes config, SDPA)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, args.dtype)
    quantization = None
    if args.bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif args.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype,
                                                attn_implementation="sdpa")


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
                      target_modules=LORA_TARGETS)


def hf_training_arguments(args: argparse.Namespace, workdir: Path, batch_size: int) -> dict[str, Any]:
    """The `TrainingArguments` both Hugging Face runners share (Tessera's defaults: cosine, 3% warm-up)."""
    return {
        "output_dir": str(workdir / "hf"), "per_device_train_batch_size": batch_size, "max_steps": args.steps,
        "learning_rate": LEARNING_RATE, "lr_scheduler_type": "cosine", "warmup_steps": int(0.03 * args.steps),
        "max_grad_norm": 1.0, "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "report_to": [],
        "seed": 42, "optim": "adamw_torch_fused", "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "bf16": args.dtype == "bfloat16",
        "use_cpu": not args.cuda, "dataloader_num_workers": 0, "disable_tqdm": True,
    }


def step_timer(counted: dict[str, int]) -> Any:
    """A `TrainerCallback` that records each optimizer step's tokens, wall and CPU time, and loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.mark = (time.perf_counter(), time.process_time())

        def on_step_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
            if not self.steps and state.global_step == 0:
                self.mark = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
            now = (time.perf_counter(), time.process_time())
            self.steps.append({"tokens": counted.pop("tokens", 0), "seconds": now[0] - self.mark[0],
                               "cpuSeconds": now[1] - self.mark[1], "loss": float("nan")})
            self.mark = now

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001
            # Logging (every step) comes after on_step_end; its time counts towards the next step.
            if logs and "loss" in logs and self.steps:
                self.steps[-1]["loss"] = float(logs["loss"])

    return StepTimer()


def count_tokens(counted: dict[str, int], inputs: dict[str, Any]) -> None:
    mask = inputs.get("attention_mask")
    counted["tokens"] = counted.get("tokens", 0) + int(mask.sum() if mask is not None else inputs["input_ids"].numel())


def run_trl(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    features, tokenizer = training_sequences(args, workdir, model_dir)
    # Pre-tokenised prompt-completion rows: TRL builds labels from the mask (completion_only_loss).
    dataset = Dataset.from_list([
        {"input_ids": f["input_ids"], "completion_mask": [int(label != -100) for label in f["labels"]]}
        for f in features
    ])
    model = load_hf_model(args, model_dir)
    counted: dict[str, int] = {}

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            count_tokens(counted, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    config = SFTConfig(
        **hf_training_arguments(args, workdir, args.batch_size),
        max_length=args.max_seq_length, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, dataset_num_proc=None,
    )
    timer = step_timer(counted)
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora_config(), callbacks=[timer])
    trainer.train()
    return steady(timer.steps, args.warmup) | {"engine": RUNNER_NAMES["trl"]}


def run_trainer(args: argparse.Namespace, workdir: Path, model_dir: Path) -> dict[str, Any]:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from tessera.data import pack
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    features, tokenizer = training_sequences(args, workdir, model_dir)
    # As many examples per micro-batch as `batch_size` packed blocks hold on average: the same real tokens.
    blocks = len(pack([len(f["input_ids"]) for f in features], args.max_seq_length))
    batch_size = max(1, round(args.batch_size * len(features) / blocks))
    model = load_hf_model(args, model_dir)
    if args.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = get_peft_model(model, lora_config())
    counted: dict[str, int] = {}

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            count_tokens(counted, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    timer = step_timer(counted)
    trainer = CountingTrainer(
        model=model, args=TrainingArguments(**hf_training_arguments(args, workdir, batch_size),
                                            remove_unused_columns=False),
        train_dataset=features, callbacks=[timer],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    return steady(timer.steps, args.warmup) | {"engine": f"{RUNNER_NAMES['trainer']} (micro-batch {batch_size})"}


def model_flops_per_token(model_dir: Path, gradient_checkpointing: bool, mean_length: float) -> float:
    """Model FLOPs per trained token: forward, backward to the activations (the frozen base has no
    weight gradients; LoRA's are negligible), and the forward again when checkpointing recomputes it.

    Forward: 2 FLOPs per weight of every matmul (all decoder projections and the LM head over the
    whole vocabulary, as the model defines it, whatever a trainer skips), plus causal attention
    (QK^T and AV, 2 x 2 x head dims x half the sequence on average, per layer).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dims, kv_dims = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q_dims + 2 * kv_dims) + 3 * hidden * config.intermediate_size
    weights = layers * per_layer + hidden * config.vocab_size
    forward = 2 * weights + layers * 2 * 2 * q_dims * mean_length / 2
    return forward * (3 if gradient_checkpointing else 2)


def gpu_peak_flops() -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def child(args: argparse.Namespace) -> None:
    from tessera.model import init_tiny

    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as scratch:
        workdir = Path(scratch)
        model_dir = Path(args.model) if args.model else init_tiny(workdir / "tiny")
        run = {"tessera": run_tessera, "trl": run_trl, "trainer": run_trainer}[args.child]
        result = run(args, workdir, model_dir)
        if args.cuda:
            features, _ = training_sequences(args, workdir / "mfu", model_dir)
            mean_length = statistics.fmean(len(f["input_ids"]) for f in features)
            peak = gpu_peak_flops()
            flops = model_flops_per_token(model_dir, args.gradient_checkpointing, mean_length)
            result["mfu"] = flops * result["tokens"] / result["seconds"] / peak if peak else None
    result |= {"runner": args.child, "peakMemoryMiB": peak_memory_mib()}
    print("RESULT " + json.dumps(result), flush=True)


def run_child(runner: str, argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Every runner gets the same OpenMP policy: the one `tessera train` sets (threads sleep when idle).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    completed = subprocess.run([sys.executable, __file__, *argv, "--child", runner], capture_output=True, text=True,
                               check=False, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        sys.exit(f"{runner} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def measure(argv: list[str], runners: list[str], repeats: int = 1) -> dict[str, dict[str, Any]]:
    """Each runner's median round (by tokens/s), the rounds alternating their order."""
    rounds: dict[str, list[dict[str, Any]]] = {runner: [] for runner in runners}
    for round_ in range(repeats):
        for runner in runners if round_ % 2 == 0 else runners[::-1]:
            rounds[runner].append(run_child(runner, argv))
    return {runner: sorted(results, key=tokens_per_second)[len(results) // 2] for runner, results in rounds.items()}


def tokens_per_second(result: dict[str, Any]) -> float:
    return result["tokens"] / result["seconds"]


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells)))


RESULT_HEADER = ("runner", "tokens/step", "steady tokens", "s", "tokens/s", "tokens/CPU-s", "peak MiB",
                 "last loss", "mean loss", "MFU")


def result_row(result: dict[str, Any], *prefix: str) -> tuple[str, ...]:
    mfu = result.get("mfu")
    return (*prefix, result["engine"], f"{result['tokensPerStep']:.0f}", str(result["tokens"]),
            f"{result['seconds']:.1f}", f"{tokens_per_second(result):.0f}",
            f"{result['tokens'] / result['cpuSeconds']:.0f}", f"{result['peakMemoryMiB']:.0f}",
            f"{result['loss']:.4f}", f"{result['meanLoss']:.4f}", "-" if mfu is None else f"{100 * mfu:.1f}%")


def ratios(results: dict[str, dict[str, Any]]) -> list[str]:
    """`Tessera / X: tokens/s 1.80x, peak memory 0.90x` for each baseline measured."""
    tessera = results.get("tessera")
    if tessera is None:
        return []
    return [f"Tessera / {RUNNER_NAMES[name]}: tokens/s {tokens_per_second(tessera) / tokens_per_second(base):.2f}x, "
            f"peak memory {tessera['peakMemoryMiB'] / base['peakMemoryMiB']:.2f}x"
            for name, base in results.items() if name != "tessera"]


def parent(args: argparse.Namespace) -> None:
    results = measure(sys.argv[1:], args.runners, args.repeats)
    device = "CUDA" if args.cuda else f"CPU, {os.cpu_count()} cores"
    print(f"\nLoRA training throughput: {args.steps} steps ({args.warmup} warm-up excluded), micro-batch "
          f"{args.batch_size} x {args.max_seq_length} packed, {args.bits or 'no'}-bit base, {args.dtype}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'} ({device}; median of {args.repeats})")
    print_table([RESULT_HEADER, *(result_row(result) for result in results.values())])
    for line in ratios(results):
        print(line)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="First optimizer steps left out of tokens/s.")
    parser.add_argument("--batch-size", type=int, default=8, help="Packed blocks per micro-batch.")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--bits", type=int, choices=[4, 8, 0], default=4, help="0: no quantization")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TFNS-format CSV (text,label 0/1/2).")
    parser.add_argument("--model", help="Base model directory (default: the tiny LLaMA, built in a temp dir).")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"Comma-separated, of {', '.join(RUNNERS)}.")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of all runners, alternating their order.")
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.bits = args.bits or None
    args.runners = [name.strip() for name in args.runners.split(",")]
    unknown = set(args.runners) - set(RUNNERS)
    if unknown:
        sys.exit(f"--runners: unknown {', '.join(sorted(unknown))} (choose from {', '.join(RUNNERS)})")
    import torch

    args.cuda = torch.cuda.is_available()
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
