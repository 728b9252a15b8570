"""`tessera prepare`: a FineTuneJob's dataset -> validated, split examples in the job's store prefix.

    prepared = prepare(job)                 # writes jobs/<ns>/<job>/prepared/...
    prepared = load_prepared(job)           # what the train and evaluate steps read back
    features = build_features(prepared.train, tokenizer, max_seq_length, packing)

Files under `prepared_prefix(job)`:
- `train.jsonl`, `eval.jsonl`: one example per line, {"prompt", "completion", "label"?,
  "messages"?, "row", "line"} (row/line: where the example's record is in its source);
- `bad_rows.json`: every refused record, [{"row", "line", "reason", "field"}], written even
  when the job then fails on them, so the whole list can be read;
- `manifest.json`: counts, labels, tokens and sha256 digests. It holds no timestamp: the same
  data, spec and tokenizer always give the same bytes.

Order of operations: read, validate every row (fail or skip per `spec.dataset.onBadRows`),
sample `maxRows` of the good records, split by `spec.training.seed` stratified by label (or
read `evalUri`), cap the eval records at `maxEvalRows`, then expand records into examples. The
split is made on records, so every question about one headline lands on the same side.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tessera.data.load import LINE_KEY, ROW_KEY, SourceData, read_dataset
from tessera.data.split import sample, split_train_eval
from tessera.data.template import load_tokenizer
from tessera.data.validate import CheckedRecord, check_columns, check_records, enforce_policy
from tessera.tasks import Example, get_task
from tessera.tasks.base import single_label

if TYPE_CHECKING:
    from tessera.api import FineTuneJob
    from tessera.store import Store

TRAIN_FILE, EVAL_FILE, MANIFEST_FILE, BAD_ROWS_FILE = "train.jsonl", "eval.jsonl", "manifest.json", "bad_rows.json"


@dataclass
class PreparedDataset:
    """The prepared examples of a job, as rows (Example dicts with their source row and line)."""

    task: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    manifest: dict[str, Any]
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    uri: str | None = None

    def train_examples(self) -> list[Example]:
        return [Example.from_dict(row) for row in self.train]

    def eval_examples(self) -> list[Example]:
        return [Example.from_dict(row) for row in self.eval]


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(items: Sequence[CheckedRecord]) -> list[dict[str, Any]]:
    return [
        {**example.to_dict(), "row": item.record[ROW_KEY], "line": item.record.get(LINE_KEY)}
        for item in items
        for example in item.examples
    ]


def _stratum(item: CheckedRecord) -> str | None:
    return single_label(item.examples)


def _label_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(row["label"] for row in rows if row.get("label")).items()))


def _token_counts(items: Sequence[CheckedRecord]) -> dict[str, int]:
    lengths = [length for item in items for length in item.lengths or ()]
    return {"total": sum(lengths), "max": max(lengths, default=0)}


def _source(data: SourceData, good: int, bad: int) -> dict[str, Any]:
    return {"uri": data.uri, "format": data.format, "sha256": data.sha256, "rows": good + bad, "badRows": bad}


def _training_source(job: FineTuneJob, store: Store, root: str) -> SourceData:
    """`spec.dataset.uri`, or for a job with a teacher the label step's rows (JSONL keyed by task field)."""
    from tessera.api.paths import labelled_data_key, labelled_manifest_key
    from tessera.errors import DatasetError
    from tessera.store.keys import join_key

    spec = job.spec.dataset
    if spec.teacher is None:
        return read_dataset(spec.uri, spec.format, spec.columns)
    if not store.exists(join_key(root, labelled_manifest_key(job))):
        raise DatasetError(f"{spec.uri} is labelled by a teacher first (spec.dataset.teacher): "
                           "run `tessera label` for this job before prepare")
    return read_dataset(store.uri(join_key(root, labelled_data_key(job))), "jsonl")


def prepare(
    job: FineTuneJob,
    store: Store | None = None,
    *,
    tokenizer: Any = None,
    check_lengths: bool = True,
) -> PreparedDataset:
    """Validate, split and write the job's dataset under `prepared_prefix(job)` in `spec.store.uri`.

    `store` defaults to the one `spec.store.uri` names. Lengths are checked against
    `spec.training.maxSeqLength` with `tokenizer`, by default the base model's own (only its
    tokenizer files are read); `check_lengths=False` skips that and the token counts.
    Raises `DatasetError` (missing or unreadable data, bad rows under onBadRows=fail, no usable row).
    """
    from tessera.api.paths import prepared_prefix
    from tessera.store import open_store
    from tessera.store.keys import join_key

    spec = job.spec.dataset
    seed = job.spec.training.seed
    task = get_task(spec.task)
    check_columns(task, spec.columns)
    opened, root = open_store(job.spec.store.uri)
    store = store or opened
    prefix = join_key(root, prepared_prefix(job))
    if check_lengths and tokenizer is None:
        tokenizer = load_tokenizer(job.spec.base_model.uri, job.spec.base_model.name)
    # A manifest vouches for the files beside it: take down the previous one before changing them.
    store.delete(join_key(prefix, MANIFEST_FILE), missing_ok=True)

    sources = [_training_source(job, store, root)]
    if spec.eval_uri:
        sources.append(read_dataset(spec.eval_uri, spec.format, spec.columns))
    bad_rows: list[dict[str, Any]] = []
    validated = []
    for data in sources:
        good, bad = check_records(data.records, task, spec.label_map, tokenizer, job.spec.training.max_seq_length)
        bad_rows += [{"source": data.uri, **b.to_dict()} for b in bad]
        validated.append((data, good, bad))
    bad_bytes = _json(bad_rows)
    store.put_bytes(join_key(prefix, BAD_ROWS_FILE), bad_bytes)
    for data, good, bad in validated:
        enforce_policy(data.uri, len(good), bad, spec.on_bad_rows, store.uri(join_key(prefix, BAD_ROWS_FILE)))

    (source, good, bad), *held_out = validated
    key = _stratum if task.labels is not None else None
    kept = sample(good, spec.max_rows, seed, key)
    if held_out:
        train_items, eval_items = kept, held_out[0][1]
    else:
        train_items, eval_items = split_train_eval(kept, spec.eval_split, seed, key)
    eval_items = sample(eval_items, spec.max_eval_rows, seed, key)
    train, evaluation = _rows(train_items), _rows(eval_items)

    files = {TRAIN_FILE: _jsonl(train), EVAL_FILE: _jsonl(evaluation), BAD_ROWS_FILE: bad_bytes}
    manifest = {
        "task": task.name,
        "datasetSha256": source.sha256,
        "source": _source(source, len(good), len(bad)),
        "evalSource": _source(held_out[0][0], len(held_out[0][1]), len(held_out[0][2])) if held_out else None,
        "columns": dict(spec.columns),
        "labelMap": dict(spec.label_map),
        "onBadRows": spec.on_bad_rows,
        "split": {"seed": seed, "evalSplit": None if held_out else spec.eval_split,
                  "stratified": task.labels is not None, "maxRows": spec.max_rows, "maxEvalRows": spec.max_eval_rows},
        "records": {"train": len(train_items), "eval": len(eval_items)},
        "examples": {"train": len(train), "eval": len(evaluation)},
        "labels": {"train": _label_counts(train), "eval": _label_counts(evaluation)},
        "tokens": None,
        "files": {name: _sha256(data) for name, data in files.items()},
    }
    if tokenizer is not None:
        manifest["tokens"] = {
            "baseModel": job.spec.base_model.uri,
            "maxSeqLength": job.spec.training.max_seq_length,
            "train": _token_counts(train_items),
            "eval": _token_counts(eval_items),
        }
    for name in (TRAIN_FILE, EVAL_FILE):
        store.put_bytes(join_key(prefix, name), files[name])
    # Written last: a manifest means the files it lists are all there.
    store.put_bytes(join_key(prefix, MANIFEST_FILE), _json(manifest))
    return PreparedDataset(task.name, train, evaluation, manifest, bad_rows, store.uri(prefix))


def load_prepared(job: FineTuneJob, store: Store | None = None) -> PreparedDataset:
    """Read back what `prepare` wrote for the job, checking each file against the manifest's sha256."""
    from tessera.api.paths import prepared_prefix
    from tessera.errors import DatasetError
    from tessera.store import open_store
    from tessera.store.keys import join_key

    opened, root = open_store(job.spec.store.uri)
    store = store or opened
    prefix = join_key(root, prepared_prefix(job))
    if not store.exists(join_key(prefix, MANIFEST_FILE)):
        raise DatasetError(f"no prepared data at {store.uri(prefix)}: run `tessera prepare` for this job first")
    manifest = json.loads(store.get_bytes(join_key(prefix, MANIFEST_FILE)))
    contents = {}
    for name in (TRAIN_FILE, EVAL_FILE, BAD_ROWS_FILE):
        data = store.get_bytes(join_key(prefix, name))
        if _sha256(data) != manifest["files"][name]:
            raise DatasetError(f"{store.uri(join_key(prefix, name))} does not match its manifest: run "
                               "`tessera prepare` again")
        contents[name] = data
    rows = {name: [json.loads(line) for line in contents[name].decode().split("\n") if line]
            for name in (TRAIN_FILE, EVAL_FILE)}
    return PreparedDataset(
        manifest["task"], rows[TRAIN_FILE], rows[EVAL_FILE], manifest,
        json.loads(contents[BAD_ROWS_FILE]), store.uri(prefix),
    )
