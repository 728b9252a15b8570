"""Rendering with the base model's chat template, prompt masking, packing and the collator."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from tessera.data import IGNORE_INDEX, Collator, build_features, encode_prompt, load_records, pack, tokenize
from tessera.data.validate import record_examples
from tessera.tasks import Example, get_task

from tests.data.locations import EXAMPLES

TFNS_MAP = {"0": "negative", "1": "positive", "2": "neutral"}


def sentiment(text: str, label: str) -> Example:
    return get_task("sentiment").to_example({"text": text, "label": label})


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def tfns_examples(count: int) -> list[Example]:
    task = get_task("sentiment")
    records = load_records(str(EXAMPLES / "tfns-sample.csv"))[:count]
    return [example for record in records for example in record_examples(task, record, TFNS_MAP)]


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template, as many base (non-instruct) models ship."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_prompt_tokens_are_masked_and_the_answer_is_learnt_in_the_chat_template(tokenizer):
    example = sentiment("Profit rose 20%.", "positive")
    ids, labels = tokenize(example, tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nInstruction: What is")
    assert trained_text(tokenizer, ids, labels) == "positive<|eot_id|>"
    prompt = encode_prompt(example, tokenizer)
    assert ids[: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenize(example, tokenizer, mask_prompt=False)[1] == ids


def test_without_a_chat_template_the_plain_layout_gets_bos_and_eos(plain_tokenizer):
    example = sentiment("Profit rose 20%.", "positive")
    ids, labels = tokenize(example, plain_tokenizer)
    assert ids[0] == plain_tokenizer.bos_token_id and ids[-1] == plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(ids[1:]).startswith("Instruction: What is the sentiment")
    assert trained_text(plain_tokenizer, ids, labels) == "positive<|eot_id|>"
    prompt = encode_prompt(example, plain_tokenizer)
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
    assert plain_tokenizer.decode(prompt).endswith("Answer: ")


def test_every_assistant_turn_of_a_chat_is_learnt_and_nothing_else(tokenizer, plain_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is EBITDA?"},
                {"role": "assistant", "content": "Operating earnings."}, {"role": "user", "content": "And FCF?"},
                {"role": "assistant", "content": "Free cash flow."}]
    example = get_task("chat").to_example({"messages": messages})
    ids, labels = tokenize(example, tokenizer)
    assert trained_text(tokenizer, ids, labels) == "Operating earnings.<|eot_id|>Free cash flow.<|eot_id|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = encode_prompt(example, tokenizer)
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                                     add_generation_prompt=True)
    ids, labels = tokenize(example, plain_tokenizer)
    assert trained_text(plain_tokenizer, ids, labels) == "Operating earnings.\nFree cash flow.\n<|eot_id|>"
    assert plain_tokenizer.decode(encode_prompt(example, plain_tokenizer)).endswith("User: And FCF?\nAssistant: ")


def test_a_template_that_rewrites_past_turns_trains_the_last_answer_only(tokenizer):
    """Some templates (e.g. reasoning models') render earlier assistant turns differently later on."""
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[past]{{ m['content'] }}"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    ids, labels = tokenize(get_task("chat").to_example({"messages": messages}), rewriting)
    assert rewriting.decode(ids) == "<user>q1<|eot_id|>[past]a1<user>q2<|eot_id|><assistant>a2<|eot_id|>"
    assert trained_text(rewriting, ids, labels) == "a2<|eot_id|>"


def test_packing_keeps_every_answer_token_and_fills_blocks(tokenizer):
    examples = tfns_examples(120)
    unpacked = build_features(examples, tokenizer, max_seq_length=256, packing=False)
    packed = build_features(examples, tokenizer, max_seq_length=256, packing=True)
    assert len(unpacked) == len(examples) and len(packed) < len(examples) / 2

    def answers(features):
        return Counter(t for f in features for t, label in zip(f["input_ids"], f["labels"], strict=True)
                       if label != IGNORE_INDEX)

    assert answers(packed) == answers(unpacked)
    assert sum(len(f["input_ids"]) for f in packed) == sum(len(f["input_ids"]) for f in unpacked)
    for feature in packed:
        assert len(feature["input_ids"]) <= 256 and "attention_mask" not in feature
        starts = [i for i, p in enumerate(feature["position_ids"]) if p == 0]
        assert starts[0] == 0
        ends = [*starts[1:], len(feature["input_ids"])]
        for start, end in zip(starts, ends, strict=True):
            assert feature["position_ids"][start:end] == list(range(end - start))
            assert feature["input_ids"][start] == tokenizer.bos_token_id  # whole examples only
    assert build_features(examples, tokenizer, 256, True) == packed  # deterministic


def test_best_fit_packing():
    assert pack([5, 4, 3, 2, 1], capacity=6) == [[0, 4], [1, 3], [2]]
    with pytest.raises(ValueError, match="more than the block size"):
        pack([7], capacity=6)


def test_a_packed_example_computes_what_it_computes_alone(tiny_model_dir, tokenizer):
    """Position-id restarts give each packed example a block-diagonal causal mask under SDPA."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    examples = tfns_examples(7)
    packed = build_features(examples, tokenizer, max_seq_length=256, packing=True)
    assert len(packed) >= 2 and any(len({*f["position_ids"]}) < len(f["position_ids"]) for f in packed)
    batch = Collator.for_tokenizer(tokenizer)(packed[:2])  # rows of different lengths: padding added
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        checked = 0
        for row in range(2):
            ids = batch["input_ids"][row].tolist()
            for example in examples:
                alone, _ = tokenize(example, tokenizer)
                starts = [i for i in range(len(ids)) if ids[i : i + len(alone)] == alone]
                if not starts:
                    continue
                expected = model(input_ids=torch.tensor([alone]), use_cache=False).logits[0]
                got = logits[row, starts[0] : starts[0] + len(alone)]
                assert torch.allclose(got, expected, atol=1e-4), (row, starts[0])
                checked += starts[0] > 0
    assert checked >= 2, "examples placed after another one in a block were compared"


def test_collator_pads_unpacked_batches_with_a_mask(tokenizer):
    features = build_features([sentiment("Up.", "positive"), sentiment("Sales fell sharply again.", "negative")],
                              tokenizer, 256, packing=False)
    batch = Collator.for_tokenizer(tokenizer, pad_to_multiple_of=8)(features)
    short, width = len(features[0]["input_ids"]), batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(features[1]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()


def test_documents_are_chunked_not_refused(tokenizer):
    document = json.loads((EXAMPLES / "text.jsonl").read_text().splitlines()[0])["text"]
    example = get_task("text").to_example({"text": document})
    ids, labels = tokenize(example, tokenizer)
    assert len(ids) > 256 and labels == ids  # all of a document is learnt
    pieces = build_features([example], tokenizer, max_seq_length=128, packing=False)
    assert all(len(p["input_ids"]) <= 128 for p in pieces)
    assert [t for p in pieces for t in p["input_ids"]] == ids


def test_overlong_examples_are_truncated_or_dropped_when_no_answer_is_left(tokenizer, caplog):
    long_text = "Profit rose. " * 60
    fits_prompt = sentiment("Profit rose.", "positive")
    prompt_length = len(encode_prompt(fits_prompt, tokenizer))
    features = build_features([sentiment(long_text, "positive"), fits_prompt], tokenizer,
                              max_seq_length=prompt_length + 1, packing=False)
    # Both are cut to the limit; the long one has no answer token left, the other keeps its answer.
    assert len(features) == 1
    assert "2 examples were longer than max_seq_length" in caplog.text and "1 of them left no answer" in caplog.text
    assert trained_text(tokenizer, features[0]["input_ids"], features[0]["labels"]) == "positive"
