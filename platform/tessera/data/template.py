"""Examples as the model sees them: the base model's own chat template, token ids, trainable spans.

An instruction example becomes a two-turn conversation (user: the prompt, assistant: the answer)
rendered with `tokenizer.apply_chat_template`, so an instruct base model is trained in the
format it was aligned in. A tokenizer without a chat template gets the plain layout instead:
BOS, prompt, answer, EOS. A `text` example (no prompt) is a document: BOS, text, EOS, all trained.

Each rendered span is tokenised on its own, so the prompt's token ids are identical in training
and in evaluation (`encode_prompt`), whatever the tokenizer would merge across the boundary.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.scratch import scratch_dir
from tessera.tasks import Example
from tessera.tasks.chat import plain_turn

# What AutoTokenizer reads; fetched alone so validating lengths never downloads a model's weights.
TOKENIZER_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def _messages(example: Example) -> list[dict[str, str]]:
    if example.messages:
        return [dict(m) for m in example.messages]
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]


def is_document(example: Example) -> bool:
    """A raw document (the `text` task): no prompt, all of it is trained on."""
    return not example.prompt and not example.messages


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def template_segments(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is-assistant-turn) spans.

    Every assistant turn is located by rendering the conversation up to it (with the generation
    prompt) and through it. Templates that render earlier turns differently once later ones exist
    (some drop past reasoning) break that; then only the last turn is trained.
    """
    full = _template(tokenizer, messages)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:index], generation_prompt=True)
        through = full if index == len(messages) - 1 else _template(tokenizer, messages[: index + 1])
        if not (full.startswith(before) and full.startswith(through) and cursor <= len(before) < len(through)):
            prompt = _template(tokenizer, messages[:-1], generation_prompt=True)
            split = _common_prefix_length(prompt, full)
            return [(full[:split], False), (full[split:], True)]
        segments += [(full[cursor : len(before)], False), (full[len(before) : len(through)], True)]
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def _plain_segments(example: Example) -> list[tuple[str, bool]]:
    if not example.messages:
        return [(example.prompt, False), (example.completion, True)]
    segments: list[tuple[str, bool]] = []
    for message in example.messages:
        if message["role"] == "assistant":
            segments += [("Assistant: ", False), (message["content"] + "\n", True)]
        else:
            segments.append((plain_turn(message), False))
    return segments


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# Texts per tokenizer call: big enough to keep its threads busy, small enough that the per-token
# objects a call returns (offsets, strings) stay a few MB.
ENCODE_CHUNK = 2048


def _encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = list(texts[start : start + ENCODE_CHUNK])
        ids += tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return ids


def text_segments(example: Example, tokenizer: Any) -> tuple[list[tuple[str, bool]], bool]:
    """The example as (text, trained) spans, and whether BOS/EOS must be added around them
    (a chat template writes its own BOS and end-of-turn markers)."""
    if is_document(example):
        return [(example.completion, True)], True
    if uses_chat_template(tokenizer):
        return template_segments(tokenizer, _messages(example)), False
    return _plain_segments(example), True


def encode_segments_batch(examples: Sequence[Example], tokenizer: Any) -> list[list[tuple[list[int], bool]]]:
    """Each example's token ids in (ids, trained) spans, as training sees them.

    Every span is encoded without special tokens, all of them in one batch call (the tokenizer's
    Rust side runs it in parallel: an order of magnitude faster than a call per span).
    """
    rendered = [text_segments(example, tokenizer) for example in examples]
    texts = [text for segments, _ in rendered for text, _ in segments]
    encoded = iter(_encode_texts(tokenizer, texts))
    out = []
    for segments, add_specials in rendered:
        spans = [(next(encoded), trained) for _, trained in segments]
        if add_specials:
            spans[0] = (_bos(tokenizer) + spans[0][0], spans[0][1])
            spans[-1] = (spans[-1][0] + _eos(tokenizer), spans[-1][1])
        out.append(spans)
    return out


def _flatten(spans: Sequence[tuple[list[int], bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    for span, is_trained in spans:
        ids += span
        trained += [is_trained] * len(span)
    return ids, trained


def encode_examples(examples: Sequence[Example], tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """(input ids, trained flag per token) of each example."""
    return [_flatten(spans) for spans in encode_segments_batch(examples, tokenizer)]


def encode_example(example: Example, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """(input ids, trained flag per token) of one example."""
    return encode_examples([example], tokenizer)[0]


def encode_prompt(example: Example, tokenizer: Any) -> list[int]:
    """The token ids the model generates the example's last answer after: exactly those it was trained
    with, so evaluation never sees a tokenisation that training did not."""
    spans = encode_segments_batch([example], tokenizer)[0]
    last_trained = max(i for i, (_, trained) in enumerate(spans) if trained)
    return [token for span, _ in spans[:last_trained] for token in span]


def prompt_text(example: Example, tokenizer: Any) -> str:
    """The prompt as text (for a text-in API such as the server's completions endpoint)."""
    return tokenizer.decode(encode_prompt(example, tokenizer))


class TokenizerError(TesseraError):
    """The base model's tokenizer cannot be read."""


def _from_pretrained(directory: str | Path, model_uri: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise TokenizerError(
            f"cannot read the tokenizer of the base model {model_uri} (spec.baseModel.uri): "
            f"{' '.join(str(error).split())[:300]}"
        ) from None


def load_tokenizer(model_uri: str, model_name: str | None = None) -> Any:
    """The base model's tokenizer from a directory or an s3:// model prefix (tokenizer files only)."""
    from tessera.store import open_store
    from tessera.store.keys import join_key

    store, prefix = open_store(model_uri)
    local = store.local_path(prefix)
    if local is not None:
        if not local.is_dir():
            problem = "is not a directory" if local.exists() else "does not exist"
            raise TokenizerError(f"the base model {model_uri} (spec.baseModel.uri) {problem}")
        from tessera.model.load import fetch_model

        # A GGUF base (`baseModel.format: gguf`) is converted here first, into the cache training reuses.
        return _from_pretrained(fetch_model(model_uri, name=model_name), model_uri)
    with scratch_dir("tokenizer") as workdir:
        fetched = [name for name in TOKENIZER_FILES if store.exists(join_key(prefix, name))]
        if not fetched:
            raise TokenizerError(
                f"the base model {model_uri} (spec.baseModel.uri) has no tokenizer files; a GGUF base in the "
                "store must be converted first: `tessera model import FILE DIR`, then `tessera model upload DIR URI`"
            )
        for name in fetched:
            store.get_file(join_key(prefix, name), Path(workdir) / name)
        return _from_pretrained(workdir, model_uri)
