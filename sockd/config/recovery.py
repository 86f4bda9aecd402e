"""Validating a config's data, and recovering what did validate of a listener that failed in
part, so that one reading reports every problem: each field's own, and each rule's on the fields
that validated (see sockd.config.rules)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from sockd.config.problems import Problem, explain
from sockd.config.rules import Fields, conflicts
from sockd.config.schema import (
    LISTENER_KINDS,
    OPTION_SCOPE,
    Config,
    InetListener,
    Listener,
    LoggingConfig,
    MetricsConfig,
    UnixListener,
)


def validate(data: dict[str, Any]) -> tuple[Config | None, list[Problem]]:
    """The config, or every problem in it at once: each field's, and each rule's across fields
    and listeners on what did validate (see _listener)."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return config, list(conflicts([dict(listener) for listener in config.listeners]))
    problems: list[Problem] = []
    by_listener: dict[int, list[ErrorDetails]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if loc[0] == "listeners" and len(loc) > 1 and isinstance(loc[1], int):
            by_listener.setdefault(loc[1], []).append(error)
        else:
            problems.append(explain(loc, error, _MODEL_AT.get(loc[:-1], Config)))
    items = data.get("listeners")
    listeners: list[Fields | None] = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        fields, found = _listener(item, by_listener.get(index, []))
        listeners.append(fields)
        problems += [(("listeners", index, *loc), message) for loc, message in found]
    problems += conflicts(listeners)
    return None, problems


_MODEL_AT: dict[tuple[str | int, ...], type[BaseModel]] = {
    (): Config,
    ("metrics",): MetricsConfig,
    ("logging",): LoggingConfig,
}
Located = tuple[tuple[Any, ...], ErrorDetails]  # an error, and where it is within its listener
_LISTENER: TypeAdapter[InetListener | UnixListener] = TypeAdapter(Listener)


def _listener(item: object, errors: list[ErrorDetails]) -> tuple[Fields | None, list[Problem]]:
    """One listener of a config that failed: what of it validated, for the rules, and its
    problems (located within it).

    What validated is the whole listener, or its fields less each with an error of its own, or
    None. A `protocol` that picks no kind of listener would hide every other problem of it: the
    listener is then validated as the kind it was most likely meant to be (`TCP` as tcp; a
    `path` as unix, a `host` or `port` as tcp or udp, leaving out what would depend on which)."""
    if not errors:
        return dict(_LISTENER.validate_python(item)), []
    if not isinstance(item, dict):
        return None, [explain((), error, InetListener) for error in errors]
    tag = errors[0]["loc"][2] if len(errors[0]["loc"]) > 2 else None
    if tag in LISTENER_KINDS:
        kind = LISTENER_KINDS[str(tag)]
        found: list[Problem] = []
        located = [(tuple(error["loc"][3:]), error) for error in errors]
        failed: set[str] = set()
    else:
        found = [explain((), error, InetListener) for error in errors]
        meant = _as_meant(item)
        if meant is None:
            return None, found
        kind, located = meant
        failed = {"protocol"}
    found += [explain(loc, error, kind) for loc, error in located]
    failed |= {str(loc[0]) for loc, _ in located if loc}
    return _validated_fields(kind, item, failed), found


def _as_meant(item: dict[Any, Any]) -> tuple[type[InetListener | UnixListener], list[Located]] | None:
    """A listener whose `protocol` picks no kind, validated as the kind it most likely meant: that
    kind and its errors (those that would depend on the protocol left out, unless sure); or None
    if nothing says which."""
    guess = _meant_protocol(item)
    if guess is None:
        return None
    protocol, sure = guess
    kind = LISTENER_KINDS[protocol]
    try:
        kind.model_validate({**item, "protocol": protocol})
        located = []
    except ValidationError as exc:
        located = [(tuple(error["loc"]), error) for error in exc.errors(include_url=False)]
    if not sure:
        located = [(loc, error) for loc, error in located if not _depends_on_protocol(loc, error)]
    return kind, located


def _validated_fields(kind: type[InetListener | UnixListener], item: dict[Any, Any], failed: set[str]) -> Fields:
    """The fields of `item`, read as a listener of `kind`, but those that `failed`: each value
    written (strict validation takes a value as it is, or fails it) and each default of one not
    written."""
    fields = {
        name: info.get_default(call_default_factory=True)
        for name, info in kind.model_fields.items()
        if not info.is_required()
    }
    fields.update((name, value) for name, value in item.items() if name in kind.model_fields)
    return {name: value for name, value in fields.items() if name not in failed}


def _meant_protocol(item: dict[Any, Any]) -> tuple[str, bool] | None:
    """The protocol a listener whose `protocol` is not one most likely meant, and whether that
    is sure (a case or spacing slip) or a guess from its keys."""
    value = item.get("protocol")
    normal = value.strip().lower() if isinstance(value, str) else None
    if normal in LISTENER_KINDS:
        return str(normal), True
    if "path" in item:
        return "unix", False
    if "host" in item or "port" in item:
        return "tcp", False
    return None


def _depends_on_protocol(loc: tuple[Any, ...], error: ErrorDetails) -> bool:
    field = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        return any(field in kind.model_fields for kind in LISTENER_KINDS.values())
    # The option-scope validator's error; a value of the wrong type is wrong whatever the protocol.
    return error["type"] == "value_error" and OPTION_SCOPE.get(str(field), ("",))[0] == "protocol"
