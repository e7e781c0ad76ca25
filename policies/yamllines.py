"""YAML read with a line number for every mapping key and sequence item.

Configuration files and rule files both report problems as ``file:line: field: message``;
this is the one place that composes the YAML node tree, remembers where each value stood,
and notices repeated keys (which PyYAML would silently collapse to the last value).
"""

from __future__ import annotations

from typing import Any

import yaml

YamlPath = tuple[Any, ...]


class YamlSyntaxError(Exception):
    """The text is not YAML; ``line`` (1-based) is where the parser gave up, if known."""

    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.problem = problem


def load_with_lines(
    text: str, loader_class: type[yaml.SafeLoader] = yaml.SafeLoader
) -> tuple[Any, dict[YamlPath, int], list[tuple[int, YamlPath]]]:
    """The document, the line of each path in it, and every repeated key (line, path)."""
    lines: dict[YamlPath, int] = {}
    duplicates: list[tuple[int, YamlPath]] = []

    def walk(node: yaml.Node, path: YamlPath) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    duplicates.append((line, (*path, key)))
                seen.add(key)
                lines[(*path, key)] = line
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))

    try:
        loader = loader_class(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None, lines, duplicates
            walk(root, ())
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlSyntaxError(mark.line + 1 if mark is not None else None, problem) from None
    return data, lines, duplicates
