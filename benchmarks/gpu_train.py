"""4-bit QLoRA throughput on a GPU, on models shaped like Llama-3.2-1B and Llama-3.1-8B.

    python benchmarks/gpu_train.py [--shapes 1b,8b] [--steps 20] [--warmup 3] [--batch-size 4]
        [--max-seq-length 1024] [--runners trl,tessera] [--layers N]

For a machine with a CUDA GPU. Throughput needs no real weights: each shape is built with random
weights (bf16, once, cached under --cache-dir; the 8B one takes 16 GB of disk), with the tiny
model's tokenizer (a smaller vocabulary than Llama 3's only changes which ids occur). Then
`train_throughput.py` runs Tessera's trainer (DeepSpeed on CUDA, NF4 double-quant base, bf16) and
the baselines (TRL's `SFTTrainer` packed best-fit decreasing, padding-free, completion-only loss;
`trainer`: a plain `transformers.Trainer` + `peft`, padded) on the same model, data and settings,
each in its own process, and this prints one table: steady-state tokens/s (warm-up steps left
out), peak GPU memory (`torch.cuda.max_memory_allocated`), losses, and the model-FLOPs
utilisation against the GPU's dense bf16 peak (`train_throughput.model_flops_per_token`).
`--layers N` keeps a shape's widths with fewer layers, for a quick check (also on a CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import train_throughput

# From the published config.json of each model.
SHAPES = {
    "1b": {"name": "Llama-3.2-1B", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "8b": {"name": "Llama-3.1-8B", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
}
LLAMA3_VOCAB = 128256
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_shape(key: str, layers: int | None, cache_dir: Path) -> Path:
    """A random-weight model directory of the shape `key` (kept across runs)."""
    import torch
    from tessera.model import init_tiny
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[key])
    name = shape.pop("name")
    if layers:
        shape["num_hidden_layers"] = layers
    target = cache_dir / f"{key}-{shape['num_hidden_layers']}layers"
    if (target / "config.json").is_file():
        return target
    tiny = init_tiny(cache_dir / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(
        vocab_size=LLAMA3_VOCAB, max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )
    print(f"building a random {name} ({shape['num_hidden_layers']} layers) in {target}", file=sys.stderr)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(staging)
    for file in TOKENIZER_FILES:
        if (tiny / file).is_file():
            shutil.copy(tiny / file, staging / file)
    (staging / "tessera.json").write_text(json.dumps({"name": f"random/{name}"}))
    staging.rename(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,8b", help="Comma-separated: 1b, 8b.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="First optimizer steps left out of tokens/s.")
    parser.add_argument("--runners", default="trl,tessera", help="Of trl, trainer, tessera.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--layers", type=int, help="Fewer layers than the real model (quick check).")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/tessera-gpu-models"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("warning: no CUDA GPU here; this measures the CPU path", file=sys.stderr)
    rows = [("shape", *train_throughput.RESULT_HEADER)]
    ratios = []
    runners = [name.strip() for name in args.runners.split(",")]
    for key in args.shapes.split(","):
        model_dir = build_shape(key.strip(), args.layers, args.cache_dir)
        argv = ["--model", str(model_dir), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length), "--bits", "4",
                "--dtype", "bfloat16"]
        if not args.no_gradient_checkpointing:
            argv.append("--gradient-checkpointing")
        results = train_throughput.measure(argv, runners)
        label = SHAPES[key.strip()]["name"] + (f" ({args.layers} layers)" if args.layers else "")
        rows += [train_throughput.result_row(result, label) for result in results.values()]
        ratios += [f"{label}: {line}" for line in train_throughput.ratios(results)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n4-bit NF4 QLoRA (rank 8, all linear layers), {args.steps} steps ({args.warmup} warm-up left out), "
          f"micro-batch {args.batch_size} x {args.max_seq_length} packed, bf16, gradient checkpointing "
          f"{'off' if args.no_gradient_checkpointing else 'on'} on {device}; peak MiB = "
          f"{'max GPU memory allocated' if torch.cuda.is_available() else 'max RSS'}")
    train_throughput.print_table(rows)
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
