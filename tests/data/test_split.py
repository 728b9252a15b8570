"""Train/eval splits and samples: deterministic by seed, stratified by label, source order kept."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from tessera.data import sample, split_train_eval

# 100 items: 70 "neutral", 20 "positive", 10 "negative", interleaved.
ITEMS = [{"id": i, "label": "neutral" if i % 10 < 7 else "positive" if i % 10 < 9 else "negative"}
         for i in range(100)]


def label(item):
    return item["label"]


def test_split_is_deterministic_and_depends_on_the_seed():
    first = split_train_eval(ITEMS, 0.2, seed=42, key=label)
    assert first == split_train_eval(ITEMS, 0.2, seed=42, key=label)
    assert first != split_train_eval(ITEMS, 0.2, seed=43, key=label)


def test_split_is_the_same_in_another_process_with_another_hash_seed():
    code = (
        "from tessera.data import split_train_eval\n"
        "items = [{'id': i, 'label': str(i % 3)} for i in range(50)]\n"
        "print([x['id'] for x in split_train_eval(items, 0.3, 7, key=lambda x: x['label'])[1]])\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_split_is_stratified_by_label_and_keeps_source_order():
    train, held_out = split_train_eval(ITEMS, 0.2, seed=1, key=label)
    assert len(held_out) == 20 and len(train) == 80
    assert Counter(map(label, held_out)) == {"neutral": 14, "positive": 4, "negative": 2}
    assert [x["id"] for x in train] == sorted(x["id"] for x in train)
    assert {x["id"] for x in train}.isdisjoint(x["id"] for x in held_out)


def test_uneven_strata_are_rounded_to_the_requested_total():
    items = [{"label": "a"}] * 5 + [{"label": "b"}] * 5 + [{"label": "c"}] * 5
    items = [dict(x, id=i) for i, x in enumerate(items)]
    _, held_out = split_train_eval(items, 0.3, seed=0, key=label)
    # 15 * 0.3 = 4.5 rounds (half to even) to 4; each stratum's 1.5 gets 1, the leftover goes to one.
    assert sorted(Counter(map(label, held_out)).values()) == [1, 1, 2]


def test_tiny_datasets_keep_one_item_on_each_side():
    train, held_out = split_train_eval([{"id": 0}, {"id": 1}], 0.01, seed=0)
    assert len(train) == 1 and len(held_out) == 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_train_eval(ITEMS, 1.0, seed=0)


def test_sample_is_deterministic_stratified_and_a_no_op_when_large_enough():
    kept = sample(ITEMS, 30, seed=5, key=label)
    assert kept == sample(ITEMS, 30, seed=5, key=label)
    assert Counter(map(label, kept)) == {"neutral": 21, "positive": 6, "negative": 3}
    assert sample(ITEMS, None, seed=5) == ITEMS and sample(ITEMS, 500, seed=5) == ITEMS
