"""YAML as every spec, values file and adapters file is read: safe types only, and bounded.

`yaml.safe_load` shares an aliased node instead of copying it, so a billion-laughs document is
small in memory until something walks or dumps it (`render` did, and ran out of memory). Here a
document's size is measured as it would be with every alias expanded, before it is constructed,
and refused beyond `MAX_NODES`; an alias that contains itself is refused too.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 100_000  # far above any FineTuneJob or values file, far below what exhausts memory


class YamlLimitError(yaml.YAMLError):
    """A document too large once its aliases are expanded, or one that refers to itself."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise YamlLimitError("an alias refers to a node that contains it (a recursive document)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, sizes, open_nodes)
            _check(size)
    elif isinstance(node, yaml.MappingNode):
        for item_key, item_value in node.value:
            size += _expanded_size(item_key, sizes, open_nodes) + _expanded_size(item_value, sizes, open_nodes)
            _check(size)
    open_nodes.discard(key)
    sizes[key] = size
    return size


def _check(size: int) -> None:
    if size > MAX_NODES:
        raise YamlLimitError(
            f"the document expands to more than {MAX_NODES} nodes through its aliases (&anchor/*alias); "
            "write the values out or use fewer aliases"
        )


def safe_load_all(text: str | bytes) -> list[Any]:
    """Every document of `text`, each checked before it is built (`yaml.YAMLError` on any problem)."""
    loader = yaml.SafeLoader(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            try:
                _expanded_size(node, {}, set())
            except RecursionError:
                raise YamlLimitError("the document is nested too deeply") from None
            documents.append(loader.construct_document(node))
    except RecursionError:
        raise YamlLimitError("the document is nested too deeply") from None
    finally:
        loader.dispose()
    return documents


def safe_load(text: str | bytes) -> Any:
    """The one document of `text` (None when empty), checked like `safe_load_all`."""
    documents = safe_load_all(text)
    if len(documents) > 1:
        raise YamlLimitError(f"expected one YAML document, found {len(documents)}")
    return documents[0] if documents else None
