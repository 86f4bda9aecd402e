"""Config files checked in-process, as `sockd --check` checks them."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
import warnings
from pathlib import Path

from sockd.config import Config, ConfigError
from sockd.tls.material import load_config

# ---------------------------------------------------------------------------------------------
# Config files, checked in-process: `sockd --check -c FILE` prints `FILE: OK, N listeners`, or
# exactly ConfigError.problems of sockd.tls.material.load_config(FILE) (the config, and the TLS files
# it names), one per line, and exits 78 (test_cli.py pins that contract with the real command; the
# config tests read the same lines from `load_config`).

Expected = tuple[int, str, str]  # (line, field, message)

# One problem of a file shown as "c.yaml" (as `parse(text, "c.yaml")` names it), any problem.
PROBLEM = re.compile(
    r"c\.yaml:(?P<line>\d+): (?:"
    r"[^\n]+: [^\n]+"  # field: message
    r"|invalid YAML: [^\n]+"
    r"|the file must be a mapping with a `listeners` list"
    r")"
)


def yaml_text(text: str) -> str:
    """A test's YAML literal as a file: dedented, line 1 the first line after the opening quotes."""
    return textwrap.dedent(text).lstrip("\n")


def write_config(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml_text(text))
    return path


def check(path: Path) -> tuple[Config | None, list[str]]:
    """What `sockd --check -c path` decides, in-process: (the config, []) or (None, the problems).
    Loading must print nothing and warn nothing, as the command's output is only its verdict; any
    other exception than ConfigError (the command's traceback) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("error")
        try:
            config = load_config(path).config
        except ConfigError as exc:
            config, problems = None, exc.problems
        else:
            problems = []
    assert (out.getvalue(), err.getvalue()) == ("", "")
    return config, problems


def stderr_of(problems: list[str]) -> str:
    """The command's stderr for these problems (sockd.cli prints them joined by newlines)."""
    return "\n".join(problems) + "\n"


def assert_rejected(directory: Path, text: str, *expected: Expected) -> None:
    """Rejected with exactly the expected `FILE:LINE: FIELD: message` lines, in line-number order."""
    path = write_config(directory, text)
    config, problems = check(path)
    assert config is None
    assert problems == [f"{path}:{line}: {field}: {message}" for line, field, message in sorted(expected)]


def assert_rejected_raw(directory: Path, text: str, *lines: str) -> None:
    """Like `assert_rejected`, for the lines with no field: `{path}` in `lines` is the file."""
    path = write_config(directory, text)
    config, problems = check(path)
    assert config is None
    assert problems == [line.format(path=path) for line in lines]


def assert_accepted(directory: Path, text: str, listeners: int) -> None:
    config, problems = check(write_config(directory, text))
    assert problems == []
    assert config is not None
    assert len(config.listeners) == listeners
