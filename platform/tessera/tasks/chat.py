"""Generic chat: `messages` records ([{"role": "system"|"user"|"assistant", "content": ...}, ...]).

The conversation must end with an assistant turn; every assistant turn is trained on, everything
else is context. It is rendered with the base model's own chat template (see `tessera.data.template`),
or, when the tokenizer has none, with the plain 'Role: content' layout of `plain_transcript`.
Evaluation generates the last assistant turn from the ones before and scores it with ROUGE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tessera.tasks.base import Example, GenerativeTask, RowError, loads_json_field, require_value

ROLES = ("system", "user", "assistant")


def plain_turn(message: Mapping[str, str]) -> str:
    return f"{message['role'].capitalize()}: {message['content']}\n"


def plain_transcript(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation as plain text, for tokenizers without a chat template."""
    text = "".join(plain_turn(message) for message in messages)
    return text + "Assistant: " if add_generation_prompt else text


def check_messages(value: Any) -> list[dict[str, str]]:
    """The conversation as clean {role, content} dicts, or a `RowError` saying what is wrong."""
    if not isinstance(value, list) or not value:
        raise RowError("messages must be a non-empty list of {role, content}", "messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowError(f"messages[{index}] is not an object with role and content", "messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{index}].role {role!r} is not one of {', '.join(ROLES)}", "messages")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"messages[{index}].content is empty", "messages")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (the answer to learn)", "messages")
    if not any(message["role"] == "user" for message in messages):
        raise RowError("messages has no user turn", "messages")
    return messages


class ChatTask(GenerativeTask):
    name = "chat"
    fields = ("messages",)

    def to_example(self, record: Mapping[str, Any]) -> Example:
        require_value(record, "messages")
        messages = check_messages(loads_json_field(record, "messages"))
        return Example(
            prompt=plain_transcript(messages[:-1], add_generation_prompt=True),
            completion=messages[-1]["content"],
            messages=messages,
        )
