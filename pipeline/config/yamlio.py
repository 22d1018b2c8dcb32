"""Config YAML in and out: a bounded, duplicate-refusing reader and the atomic writer of a resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config.choices import MAX_ALIAS_VALUES, MAX_CONFIG_BYTES
from pipeline.errors import ConfigError
from pipeline.errors import clip as _clip
from pipeline.errors import short as _short

if TYPE_CHECKING:
    from pipeline.config.sections import Config


class YAMLRefused(yaml.YAMLError):
    """Well-formed YAML that a config may not contain; the message is one line, shown as is."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias bombs.

    Duplicate keys: YAML says a mapping's keys are unique, PyYAML keeps the last silently, so a
    second `lr:` in a section would override the first unnoticed. Checked on the node's own
    pairs, before `<<` merge keys are flattened (a key that overrides a merged one is fine).

    Aliases: a document of nested aliases ("billion laughs") is tiny as text and as composed
    nodes (an alias is the same node again), but everything that walks the loaded value --
    type checks, error messages -- sees its full expansion. Refusing aliases altogether would be
    simplest, but anchors are a legitimate way to share a block between sections, so instead
    every alias is charged the expanded size of the node it repeats (memoized per node, so the
    counting is linear in the document) and the document is refused once the aliases add more
    than MAX_ALIAS_VALUES values. An alias to a node still being composed (a recursive
    document) never expands to a finite config and is refused too.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._alias_values = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined alias is reported by the composer itself
                line = event.start_mark.line + 1
                if node.end_mark is None:
                    raise YAMLRefused(f"recursive alias *{_clip(event.anchor)} at line {line}")
                self._alias_values += self._size(node)
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise YAMLRefused(f"aliases expand to more than {MAX_ALIAS_VALUES} values "
                                      f"(at *{_clip(event.anchor)}, line {line})")
        return super().compose_node(parent, index)

    def _size(self, node: yaml.Node) -> int:
        """How many values `node` stands for once every alias in it is expanded."""
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return size

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise YAMLRefused(f"duplicate key {_short(key)} at line {line} "
                                      f"(first at line {first_line[key]})")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def _first_line(exc: BaseException) -> str:
    """A YAML error in one line: its problem and where, else the first line of its text."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return _clip(f"{exc.problem}{where}", 200)
    lines = str(exc).strip().splitlines()
    return _clip(lines[0].strip() if lines else type(exc).__name__, 200)


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        return _yaml_load(text)
    except YAMLRefused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically: a full disk leaves the old file or none, never half of one."""
    from pipeline.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} for a nested mapping (lists are leaves)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
