"""`tessera model`: build the tiny base model, import a GGUF file, bring a model directory into the store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tessera.errors import TesseraError

app = typer.Typer(no_args_is_help=True)


class ModelDirectoryError(TesseraError):
    """The directory is not a Hugging Face model directory."""


@app.command("init-tiny")
def init_tiny_command(
    directory: Path = typer.Argument(..., help="Where to write the model (created if missing)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write the tiny LLaMA base model (random weights, local tokenizer). Kept if already complete."""
    from tessera.model.tiny import init_tiny

    path = init_tiny(directory, seed=seed)
    typer.echo(f"tiny model ready at {path}")


@app.command("import")
def import_command(
    source: Path = typer.Argument(..., help="A GGUF file (llama.cpp LLaMA, Mistral or Qwen model)."),
    directory: Path = typer.Argument(..., help="Where to write the Hugging Face model directory."),
    name: str = typer.Option(
        None, help="The upstream name (e.g. HuggingFaceTB/SmolLM2-135M-Instruct); adapters are checked against it."
    ),
    dtype: str = typer.Option("bfloat16", help="Dtype of the saved weights (bfloat16, float16, float32)."),
) -> None:
    """Convert a GGUF file into a Hugging Face model directory (dequantized). Kept if already imported."""
    from tessera.model.gguf import import_gguf

    path = import_gguf(source, directory, name=name, dtype=dtype)
    from tessera.model import base_model_name

    typer.echo(f"imported {source.name} into {path} (name: {base_model_name(path) or 'unnamed'})")


@app.command("upload")
def upload_command(
    directory: Path = typer.Argument(..., help="A Hugging Face model directory (config.json, weights, tokenizer)."),
    uri: str = typer.Argument(..., help="Destination, e.g. s3://tessera/models/llama-3.1-8b-instruct"),
    name: str = typer.Option(
        None, help="The model's name (e.g. meta-llama/Llama-3.1-8B-Instruct); adapters are checked against it."
    ),
) -> None:
    """Copy a model directory into the store, as an air-gapped site brings its base model in."""
    from tessera.model import IDENTITY_FILE, base_model_name

    if not (directory / "config.json").is_file():
        raise ModelDirectoryError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise ModelDirectoryError(f"{directory} has no weights (*.safetensors or *.bin)")
    if name:
        identity_path = directory / IDENTITY_FILE
        identity = json.loads(identity_path.read_text()) if identity_path.is_file() else {}
        identity["name"] = name
        identity_path.write_text(json.dumps(identity, indent=2) + "\n")
    from tessera.store import push
    from tessera.store.progress import TqdmProgress

    with TqdmProgress(f"upload {directory.name}") as progress:
        push(directory, uri, progress=progress)
    typer.echo(f"uploaded {directory} to {uri} (name: {name or base_model_name(directory) or 'unnamed'})")
