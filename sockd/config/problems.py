"""How a config's problems are worded and placed: a problem is a location in the document and a
message; each is shown as `file:line: field: message`, one line, in the words of the file's
format rather than pydantic's."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from sockd.config.schema import LISTENER_KINDS, MODE_PATTERN, NAME_PATTERN, UPSTREAM_PATTERN, InetListener, UnixListener
from sockd.errors import EX_CONFIG, SockdError


class ConfigError(SockdError):
    """One or more problems in a config file, each already rendered as `file:line: field: message`."""

    exit_code = EX_CONFIG

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def lines(self) -> list[str]:
        return self.problems


Problem = tuple[tuple[str | int, ...], str]


def locate(root: yaml.Node | None, problems: Iterable[Problem]) -> list[tuple[int, str, str]]:
    return [(line_of(root, loc), _field(root, loc), message) for loc, message in problems]


def quoted(value: object, limit: int = 40) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str) -> str:
    # A key or value may hold a line break or a control character; the message must stay one line.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def explain(loc: tuple[Any, ...], error: ErrorDetails, model: type[BaseModel]) -> Problem:
    """Turn one pydantic error at `loc`, in a mapping validated as `model`, into (location,
    message) in the words of this file's format."""
    kind = error["type"]
    if loc[-1:] == ("[key]",):  # a mapping's key, not its value, is wrong: the key is named already
        loc = loc[:-1]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc += ("protocol",)
        if kind == "union_tag_not_found":
            return loc, "required"
        return loc, f"input should be 'tcp', 'udp' or 'unix', not {quoted(error['input']['protocol'])}"
    if kind == "missing":
        return loc, "required"
    if kind == "extra_forbidden":
        key = loc[-1]
        if model in LISTENER_KINDS.values() and len(loc) == 1:
            for variant, protocols in ((InetListener, "tcp or udp"), (UnixListener, "unix")):
                if key in variant.model_fields:
                    return loc, f"only valid with protocol: {protocols}"
        known = _model_at(model, loc[:-1]) or model
        near = difflib.get_close_matches(str(key), list(known.model_fields), n=1)
        return loc, f"unknown key; did you mean {near[0]!r}?" if near else "unknown key"
    if kind == "string_pattern_mismatch":
        return loc, _PATTERN_MEANINGS[error["ctx"]["pattern"]]
    if kind == "too_short" and loc == ("listeners",):
        return loc, "needs at least one listener"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return loc, "should be a mapping of keys to values"
    message = error["msg"].removeprefix("Value error, ")
    return loc, message[:1].lower() + message[1:]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model of the mapping at `loc` within `model` (a listener's `tls`, a name's entry under
    its `sni`), or None if none is there."""
    found: object = model
    for part in loc:
        found = _inner(found, part)
    return _model(found)


def _inner(annotation: object, part: object) -> object:
    """The type of `part` of a value of type `annotation`: a model's field, a list's item, a dict's value."""
    if model := _model(annotation):
        field = model.model_fields.get(str(part))
        return None if field is None else field.annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _inner(args[0], part)
    if origin is list:
        return args[0] if isinstance(part, int) else None
    return args[1] if origin is dict else None


def _model(annotation: object) -> type[BaseModel] | None:
    """The model a type is (or, X | None, holds)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is typing.Annotated:
        return _model(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType):
        return next((model for arm in typing.get_args(annotation) if (model := _model(arm))), None)
    return None


_PATTERN_MEANINGS = {
    NAME_PATTERN: "may hold only letters, digits, '_', '.' and '-'",
    MODE_PATTERN: 'should be octal permission bits, as in "0660"',
    UPSTREAM_PATTERN: "should be tcp://host:port, tls://host:port, udp://host:port or unix:///path",
}


def _walk(root: yaml.Node | None, loc: tuple[Any, ...]) -> Iterator[tuple[yaml.Node, Any]]:
    """Follow a problem's location through the YAML node tree, yielding (node, loc part).

    Parts with no node behind them (a missing key) are yielded with the deepest node reached, so
    that the line is still found."""
    node = root
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is not None:
            node = child
            yield node, part
        elif node is not None:
            yield node, part


def line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    reached = [node for node, _ in _walk(root, loc)]
    node = reached[-1] if reached else root
    return node.start_mark.line + 1 if node is not None else 1


def _field(root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    return dotted(part for _, part in _walk(root, loc))


def dotted(parts: Iterable[Any]) -> str:
    shown = ""
    for part in parts:
        if isinstance(part, int):
            shown += f"[{part}]"
        elif part is not None:
            shown += f".{part}" if shown else str(part)
    return shown or "(top level)"


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc)
