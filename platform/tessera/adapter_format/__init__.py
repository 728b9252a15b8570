"""The PEFT LoRA adapter format, one definition below every runtime: what an adapter directory holds,
how it is read and what no runtime serves. Torch-free, so the adapter agent, the operator and
`tessera publish` use it as Tessera's server does.

    peft       the config, LoRA tensor names, pattern keys and the checks every runtime shares (pure)
    directory  where an adapter may be read from, its files, and the read → check path

The file names and the model card are the adapter directory contract of `tessera.api.adapter_dir`.
Every refusal is an `AdapterFormatError` whose code is in `tessera.errors.ERROR_STATUS`.
"""

from tessera.adapter_format.directory import (
    AdapterFiles,
    adapter_file,
    check_allowed,
    read_adapter,
    read_checked_adapter,
    safetensors_shapes,
    store_refusals,
    weights_sha256,
)
from tessera.adapter_format.peft import (
    ADAPTER_NAME,
    AdapterConfig,
    LoraTensors,
    Problem,
    adapter_rank,
    as_model_card,
    declared_base_name,
    embedding_copy_module,
    looks_like_path,
    parse_lora_key,
    pattern_value,
    shared_problems,
    some,
)
from tessera.api.adapter_dir import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE, ModelCard
from tessera.errors import AdapterFormatError

__all__ = [
    "ADAPTER_NAME", "CONFIG_FILE", "MODEL_CARD_FILE", "WEIGHTS_FILE", "AdapterConfig", "AdapterFiles",
    "AdapterFormatError", "LoraTensors", "ModelCard", "Problem", "adapter_file", "adapter_rank", "as_model_card",
    "check_allowed", "declared_base_name", "embedding_copy_module", "looks_like_path", "parse_lora_key",
    "pattern_value", "read_adapter", "read_checked_adapter", "safetensors_shapes", "shared_problems", "some",
    "store_refusals", "weights_sha256",
]
