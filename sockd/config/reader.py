"""Reading a config file as YAML, hardened: a regular file of bounded size, a document of bounded
values however aliased, PyYAML's errors turned into a line and a sentence, and no key said twice."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

import yaml

from sockd.config.problems import dotted

# A config file is a few kB. Parsing a 20 MB one would block the supervisor's loop (its
# watchdog pings included) for seconds.
MAX_FILE_BYTES = 4 << 20


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The file's first MAX_FILE_BYTES + 1 bytes (one past the most: a bigger file is refused
    without being read whole). Opened without blocking, and refused unless a regular file: a
    FIFO or a device would hold the supervisor in open() or read() until someone wrote to it.
    A symlink is followed: config managers link /etc files into place."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file.read(MAX_FILE_BYTES + 1)


# A config is tens of values, thousands with a long `allow` list or a thousand listeners: at
# most this many, whether written out or repeated by aliases. Bounded so that no file under
# MAX_FILE_BYTES holds the supervisor's loop for long: PyYAML composes some 35,000 nodes a second,
# and a 4 MiB `[1,1,…]` is two million of them (a "billion laughs" of a few hundred bytes, far more).
MAX_VALUES = 100_000


# PyYAML's constructors for the standard tags (!!int, !!float, !!bool, !!timestamp, …) raise
# these plain Python errors, not YAMLError, on a value they cannot read.
CONSTRUCTOR_ERRORS = (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError)


class Unreadable(Exception):
    """YAML that parses but cannot be read as a config's data."""

    def __init__(self, line: int, message: str, what: str = "invalid YAML") -> None:
        super().__init__(message)
        self.line, self.message, self.what = line, message, what


def read_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for lines) and its data, read from the tree once composed."""
    loader = _CountingLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:  # PyYAML composes and constructs recursively: some 500 levels deep
            raise Unreadable(1, "nested too deeply") from None
        _bounded(root)
        try:
            return root, loader.construct_document(root) if root is not None else None
        except RecursionError:
            raise Unreadable(1, "nested too deeply") from None
        except CONSTRUCTOR_ERRORS:
            line, tag, value = _unreadable_scalar(root)
            raise Unreadable(line, f"{value[:40]!r} cannot be read as {tag}") from None
    finally:
        loader.dispose()


class _CountingLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document of more than MAX_VALUES nodes as it composes
    them, before the rest of the file is parsed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.AliasEvent):  # an alias is counted by _bounded
            self.nodes += 1
            if self.nodes > MAX_VALUES:
                line = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
                raise Unreadable(
                    line,
                    f"more than {MAX_VALUES} values (scalars, lists and mappings) by this line:"
                    " a sockd config has far fewer",
                    "too large",
                )
        return super().compose_node(parent, index)


def _bounded(root: yaml.Node | None) -> None:
    """Refuse a document whose aliases expand it past MAX_VALUES, before anything expands it."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # an alias of a node inside itself loops: counted once
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not children_done:
            if id(node) in visiting:
                continue
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes and id(child) not in visiting)
            continue
        sizes[id(node)] = size = 1 + sum(sizes.get(id(child), 0) for child in children)
        if size > MAX_VALUES:
            line = node.start_mark.line + 1
            raise Unreadable(line, f"aliases expand this to more than {MAX_VALUES} values")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _unreadable_scalar(root: yaml.Node | None) -> tuple[int, str, str]:
    """The first scalar with a tag whose constructor fails on it: (line, tag, value)."""
    constructor = yaml.SafeLoader("")
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                constructor.construct_object(node)
            except CONSTRUCTOR_ERRORS:
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                return node.start_mark.line + 1, tag, str(node.value)
        stack.extend(reversed(_children(node)))
    return 1, "data", ""


# PyYAML's words name the parser's state; these say what in the file most likely causes it.
_YAML_HINTS = (
    (
        "mapping values are not allowed here",
        "a `key: value` line is probably indented wrongly, or a colon needs quoting",
    ),
    ("expected <block end>", "a line is probably indented differently from the others of its block"),
    ("found character '\\t'", "indent with spaces: YAML does not allow tabs"),
    ("found character", "a value that starts with this character needs quoting"),
    ("could not find expected ':'", "a line of a mapping is not `key: value`, or a quote is not closed"),
    ("expected ',' or", "a [ or { is not closed, or a comma is missing between its items"),
    ("expected the node content, but found '<stream end>'", "a [ or { is not closed"),
    ("found unexpected end of stream (while scanning a quoted", "a quote is not closed"),
    ("found undefined alias", "a value that starts with * needs quoting"),
    ("could not determine a constructor", "sockd reads plain YAML: remove the tag"),
)


def yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int, str]:
    """The line and a one-sentence account of a YAML syntax error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or ""
        if exc.context:
            where = exc.context_mark
            started = f" started at line {where.line + 1}" if where and where.line != (mark and mark.line) else ""
            message = f"{message} ({exc.context}{started})" if message else exc.context
        hint = next((words for start, words in _YAML_HINTS if message.startswith(start)), None)
        return (mark.line + 1 if mark else 1), f"{message}; {hint}" if hint else message
    if isinstance(exc, yaml.reader.ReaderError):
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return text.count("\n", 0, exc.position) + 1, f"unacceptable character #x{character:04x}: {exc.reason}"
    return 1, str(exc)


def duplicate_keys(
    node: yaml.Node | None, at: tuple[str | int, ...] = (), visited: set[int] | None = None
) -> Iterator[tuple[int, str]]:
    # PyYAML silently keeps the last of two equal keys; a config that says a thing twice is a mistake.
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias: already checked where its anchor stands (and it may loop)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key, value in node.value:
            name = getattr(key, "value", None)
            if name in seen:
                yield key.start_mark.line + 1, dotted((*at, name))
            seen.add(name)
            yield from duplicate_keys(value, (*at, str(name)), visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from duplicate_keys(item, (*at, index), visited)
