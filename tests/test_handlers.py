"""The sans-IO handlers on their own: bytes in, bytes out, no sockets."""

from __future__ import annotations

import datetime
import time

import pytest

from sockd.config import InetListener
from sockd.handlers import Echo, Timestamp, build


def _listener(**options: object) -> InetListener:
    base = {"name": "x", "protocol": "tcp", "host": "127.0.0.1", "port": 0, "concurrency": "selector"}
    return InetListener.model_validate(base | options)


def test_echo_returns_every_byte_and_keeps_the_stream_open() -> None:
    session = Echo().session()
    assert session.feed(b"abc") == b"abc"
    assert session.feed(b"\x00\xff") == b"\x00\xff"
    assert not session.closing
    assert session.eof() == b""
    assert Echo().datagram(b"dgram") == b"dgram"


def test_timestamp_answers_the_first_chunk_and_then_closes() -> None:
    handler = build(_listener(handler="timestamp"))
    assert isinstance(handler, Timestamp)
    session = handler.session()
    reply = session.feed(b"hello world").decode()
    assert session.closing
    assert abs(
        datetime.datetime.strptime(reply, "%Y-%m-%d %H:%M:%S.%f") - datetime.datetime.now()
    ) < datetime.timedelta(minutes=1)
    assert session.eof() == b""


@pytest.mark.parametrize(
    ("fmt", "parse"),
    [
        ("seed", lambda text: datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()),
        ("iso8601", lambda text: datetime.datetime.fromisoformat(text).timestamp()),
        ("unix", float),
    ],
)
def test_timestamp_formats_all_tell_the_current_time(fmt: str, parse: object) -> None:
    handler = build(_listener(handler="timestamp", timestamp_format=fmt))
    reply = handler.datagram(b"any")
    assert reply is not None
    assert callable(parse)
    assert abs(parse(reply.decode()) - time.time()) < 60


def test_iso8601_is_utc_with_an_explicit_offset() -> None:
    reply = build(_listener(handler="timestamp", timestamp_format="iso8601")).datagram(b"")
    assert reply is not None
    assert reply.decode().endswith("+00:00")


def test_build_picks_the_handler_by_name() -> None:
    assert isinstance(build(_listener(handler="echo")), Echo)
