"""Loading a config file: read it (sockd.config.reader), validate it (sockd.config.recovery), and
turn every problem into one line `file:line: field: message` of a ConfigError."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from sockd.config.problems import ConfigError, Problem, line_of, locate, one_line, reason
from sockd.config.reader import MAX_FILE_BYTES, Unreadable, duplicate_keys, read_regular, read_yaml, yaml_problem
from sockd.config.recovery import validate
from sockd.config.schema import Config


@dataclass(frozen=True)
class Document:
    """A valid config, and what places a problem found beyond it (in a file it names, see
    sockd.tls.material) at its line."""

    config: Config
    root: yaml.Node | None
    shown: str

    def error(self, problems: Iterable[Problem]) -> ConfigError:
        return ConfigError(self.lines(problems))

    def lines(self, problems: Iterable[Problem]) -> list[str]:
        """Problems (or warnings) as `file:line: field: message`, in line order."""
        return _lines(self.shown, locate(self.root, problems))


def parse(text: str, shown: str) -> Config:
    """Validate YAML `text`; `shown` is the file name the errors start with."""
    return parse_document(text, shown).config


def load_document(path: str | os.PathLike[str]) -> Document:
    """Read, parse and validate a config file; every problem becomes a one-line `ConfigError`.
    The file's YAML is kept, to place later problems by."""
    shown = os.fspath(path)
    try:
        raw = read_regular(path)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError([f"{shown}: larger than {MAX_FILE_BYTES >> 20} MiB: not a config file sockd reads"])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{shown}: cannot read: {reason(exc)}"]) from None
    return parse_document(text, shown)


def parse_document(text: str, shown: str) -> Document:
    """As `parse`, keeping the YAML to place later problems by."""
    try:
        root, data = read_yaml(text)
    except yaml.YAMLError as exc:
        line, message = yaml_problem(exc, text)
        raise ConfigError([f"{shown}:{line}: invalid YAML: {one_line(message)}"]) from None
    except Unreadable as exc:
        raise ConfigError([f"{shown}:{exc.line}: {exc.what}: {one_line(exc.message)}"]) from None

    found: list[tuple[int, str, str]] = [(line, field, "duplicate key") for line, field in duplicate_keys(root)]
    config = None
    if not isinstance(data, dict):
        found.append((line_of(root, ()), "(top level)", "the file must be a mapping with a `listeners` list"))
    else:
        config, problems = validate(data)
        found += locate(root, problems)
    if found or config is None:
        raise ConfigError(_lines(shown, found))
    return Document(config, root, shown)


def _lines(shown: str, found: Iterable[tuple[int, str, str]]) -> list[str]:
    return [f"{shown}:{line}: {one_line(field)}: {one_line(msg)}" for line, field, msg in sorted(found)]
