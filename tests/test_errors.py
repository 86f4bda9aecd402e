"""Every error that ends the `sockd` command is a SockdError, carrying its exit code and its lines."""

from __future__ import annotations

import pytest

from sockd import systemd
from sockd.config import ConfigError
from sockd.descriptors import DescriptorLimit
from sockd.errors import EX_CONFIG, EX_OSERR, SockdError
from sockd.forkserver import ForkServerError
from sockd.sockets import BindError


def test_a_config_error_is_its_problems_and_exit_78() -> None:
    error = ConfigError(["sockd.yaml:3: port: required", "sockd.yaml:9: name: required"])
    assert isinstance(error, SockdError)
    assert error.exit_code == EX_CONFIG == 78
    assert error.lines() == ["sockd.yaml:3: port: required", "sockd.yaml:9: name: required"]


@pytest.mark.parametrize(
    "error",
    [
        BindError("listener 'a'", "tcp 127.0.0.1:1", "permission denied"),
        DescriptorLimit("the descriptor limit (64) is too low"),
        ForkServerError("the fork server died (exit code 1)"),
        systemd.NotASocket("systemd passed descriptor 3 ('a'), a FIFO, not a socket"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_operating_system_error_is_one_line_and_exit_71(error: SockdError) -> None:
    assert isinstance(error, SockdError)
    assert error.exit_code == EX_OSERR == 71
    assert error.lines() == [f"sockd: {error}"]
