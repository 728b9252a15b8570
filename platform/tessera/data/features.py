"""Prepared examples -> tokenised training features, packed or not, and the batch collator.

Loss masking: label -100 on every prompt token (and padding), so only answers are learnt.

Packing places whole examples into blocks of `max_seq_length` tokens (best-fit decreasing, so
little is left empty) and restarts `position_ids` at 0 for every example in a block. The batch
then carries no `attention_mask`, and transformers' Llama turns the position restarts into a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`; flash-attention reads
them as variable-length sequences): examples sharing a block do not attend to each other, and a
packed example computes exactly what it would alone. The model must run without a KV cache
(`use_cache=False`, as in training): with a cache transformers skips that detection.

Documents (`text` task) are cut into pieces of at most `max_seq_length` tokens first; each piece
is a sequence of its own. An instruction example longer than `max_seq_length` (validation with a
tokenizer refuses those first) is truncated, and dropped when no answer token would remain.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tessera.data.template import encode_example, encode_examples, is_document
from tessera.tasks import Example

IGNORE_INDEX = -100
log = logging.getLogger(__name__)

Tokens = tuple[list[int], list[int]]


def _labels(ids: list[int], trained: list[bool], mask_prompt: bool) -> list[int]:
    return [t if is_trained or not mask_prompt else IGNORE_INDEX for t, is_trained in zip(ids, trained, strict=True)]


def tokenize(example: Example, tokenizer: Any, mask_prompt: bool = True) -> Tokens:
    """(input_ids, labels) of one example, labels -100 on prompt tokens when `mask_prompt`."""
    ids, trained = encode_example(example, tokenizer)
    return ids, _labels(ids, trained, mask_prompt)


def _learns_something(labels: Sequence[int]) -> bool:
    # Label 0 is never predicted (the model shifts labels by one), so a sequence needs a later one.
    return any(label != IGNORE_INDEX for label in labels[1:])


def _pieces(ids: list[int], labels: list[int], size: int) -> list[Tokens]:
    return [(ids[i : i + size], labels[i : i + size]) for i in range(0, len(ids), size)]


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` total length, best-fit decreasing (deterministic)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the block size {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, target = free.pop(slot)
            bins[target].append(index)
        else:
            room, target = capacity, len(bins)
            bins.append([index])
        bisect.insort(free, (room - length, target))
    return bins


def build_features(
    examples: Sequence[Example | Mapping[str, Any]],
    tokenizer: Any,
    max_seq_length: int,
    packing: bool,
    mask_prompt: bool = True,
) -> list[dict[str, list[int]]]:
    """Training features: `input_ids`, `labels`, and `position_ids` (packed) or `attention_mask` (not)."""
    sequences: list[Tokens] = []
    truncated = dropped = 0
    items = [item if isinstance(item, Example) else Example.from_dict(item) for item in examples]
    for example, (ids, trained) in zip(items, encode_examples(items, tokenizer), strict=True):
        labels = _labels(ids, trained, mask_prompt)
        if is_document(example):
            pieces = _pieces(ids, labels, max_seq_length)
        elif len(ids) > max_seq_length:
            truncated += 1
            pieces = [(ids[:max_seq_length], labels[:max_seq_length])]
        else:
            pieces = [(ids, labels)]
        for piece in pieces:
            if _learns_something(piece[1]):
                sequences.append(piece)
            elif not is_document(example):
                dropped += 1
    if truncated:
        log.warning("%d examples were longer than max_seq_length %d and were truncated (%d of them left no "
                    "answer token and were dropped)", truncated, max_seq_length, dropped)
    if not packing:
        return [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in sequences]
    features = []
    for members in pack([len(ids) for ids, _ in sequences], max_seq_length):
        feature: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            ids, labels = sequences[index]
            feature["input_ids"] += ids
            feature["labels"] += labels
            feature["position_ids"] += range(len(ids))
        features.append(feature)
    return features


@dataclass(frozen=True)
class Collator:
    """Pads a batch of features into tensors: pad id on inputs, -100 on labels.

    Unpacked features get `attention_mask` 0 on padding. Packed ones keep no mask: their padding is
    one more sequence (positions restarting at 0) that no real token attends to.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> Collator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [],
                                             "position_ids" if packed else "attention_mask": []}
        for feature in features:
            pad = width - len(feature["input_ids"])
            batch["input_ids"].append([*feature["input_ids"], *[self.pad_token_id] * pad])
            batch["labels"].append([*feature["labels"], *[IGNORE_INDEX] * pad])
            if packed:
                batch["position_ids"].append([*feature["position_ids"], *range(pad)])
            else:
                batch["attention_mask"].append([*feature["attention_mask"], *[0] * pad])
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
