"""YAML documents that remember where each value came from.

Configuration and policy errors must name the file, the line and the key (as cloud-init does), so we compose the
YAML node tree once, construct plain Python values from it, and keep a map from key paths to line numbers.
Duplicate keys, which PyYAML silently collapses, are rejected: in an allowlist the second one would hide the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from .errors import ConfigError

KeyPath = tuple[Union[str, int], ...]


@dataclass(frozen=True)
class Document:
    """Parsed YAML: ``data`` is the plain value; ``lines`` maps key paths to 1-based line numbers."""

    path: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, keypath: KeyPath) -> int | None:
        """Return the line of ``keypath`` or of its nearest ancestor that has one."""
        for end in range(len(keypath), -1, -1):
            line = self.lines.get(keypath[:end])
            if line is not None:
                return line
        return None

    def error(self, keypath: KeyPath, message: str) -> ConfigError:
        """Build a ConfigError located at ``keypath``."""
        return ConfigError(message, path=self.path, line=self.line_of(keypath), key=dotted(keypath) or None)


def dotted(keypath: KeyPath) -> str:
    """Render a key path the way an operator writes it: ``redirect.backend``, ``rules[2].exe``."""
    out = ""
    for part in keypath:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def parse(text: str, path: str) -> Document:
    """Parse one YAML document from ``text``; ``path`` is used in error messages only."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", path=path, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index(node, (), lines, path)
    return Document(path=path, data=data, lines=lines)


def load(path: str) -> Document:
    """Read and parse the YAML file at ``path``; unreadable files become ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    return parse(text, path)


def _index(node: yaml.Node, keypath: KeyPath, lines: dict[KeyPath, int], path: str) -> None:
    lines.setdefault(keypath, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise ConfigError(
                    "duplicate key", path=path, line=key_node.start_mark.line + 1, key=dotted(keypath + (key,))
                )
            seen.add(key)
            lines[keypath + (key,)] = key_node.start_mark.line + 1
            _index(value_node, keypath + (key,), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, keypath + (i,), lines, path)
