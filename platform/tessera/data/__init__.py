"""Datasets: load (CSV, JSONL, Parquet from any store URI), validate row by row, split, render with
the base model's chat template, tokenise with prompt tokens masked, pack, and `prepare` a job.

    from tessera.data import prepare, load_prepared, build_features, Collator
"""

from tessera.data.features import IGNORE_INDEX, Collator, build_features, pack, tokenize
from tessera.data.load import FORMATS, SourceData, detect_format, load_records, read_dataset
from tessera.data.prepare import PreparedDataset, load_prepared, prepare
from tessera.data.split import sample, split_train_eval
from tessera.data.template import (
    TokenizerError,
    encode_example,
    encode_examples,
    encode_prompt,
    load_tokenizer,
    prompt_text,
)
from tessera.data.validate import BadRow, BadRowsError, CheckedRecord, check_records, record_examples, validate_records
from tessera.tasks.base import apply_label_map

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BadRow",
    "BadRowsError",
    "CheckedRecord",
    "Collator",
    "PreparedDataset",
    "SourceData",
    "TokenizerError",
    "apply_label_map",
    "build_features",
    "check_records",
    "detect_format",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "load_prepared",
    "load_records",
    "load_tokenizer",
    "pack",
    "prepare",
    "prompt_text",
    "read_dataset",
    "record_examples",
    "sample",
    "split_train_eval",
    "tokenize",
    "validate_records",
]
