"""The adapter directory: its file names and its model card, one definition for every reader and writer.

    adapters/<ns>/<name>/<version>/{adapter_config.json, adapter_model.safetensors, model-card.json}

The directory is standard PEFT (vLLM, LoRAX and `PeftModel` load it as is); `model-card.json` is
Tessera's. `tessera publish` writes the card, the server checks an adapter against its base with
it, and `tessera evaluate` recognises an adapter directory by its config file.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tessera.api.records import Record

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CARD_FILE = "model-card.json"


# A card may come from elsewhere (an adapter applied by hand): unknown keys are kept, never refused (Record).


class CardBaseModel(Record):
    name: str | None = None
    uri: str | None = None
    sha256: str | None = None


class ModelCard(Record):
    """`model-card.json`: what the adapter was trained on and from, and how well it did.

    `architecture` and `vocabSize` are the base's identity (from its `config.json`): the server
    refuses an adapter whose card names another one. Every field is optional on read.
    """

    kind: ClassVar[str] = "model card"
    file: ClassVar[str] = MODEL_CARD_FILE

    name: str | None = None
    version: str | None = None
    created_at: str | None = None
    task: str | None = None
    base_model: CardBaseModel | str | None = None
    architecture: str | None = None
    vocab_size: int | None = Field(None, ge=1)
    dataset: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None

    @property
    def base_model_name(self) -> str | None:
        return self.base_model.name if isinstance(self.base_model, CardBaseModel) else self.base_model
