"""The sans-IO handlers on their own: bytes in, bytes out, no sockets."""

from __future__ import annotations

import datetime
import time
from typing import get_args

import pytest

from sockd.config import HandlerName, InetListener
from sockd.handlers import AGENT_ANSWERS, HANDLERS, Agent, Echo, SeedClock, Timestamp, Told, TooLarge, build


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


def test_discard_answers_nothing() -> None:
    session = build(_listener(handler="discard")).session()
    assert session.greeting() is None
    assert session.feed(b"anything") == b""
    assert not session.closing
    assert build(_listener(handler="discard")).datagram(b"dropped") is None


def test_time_counts_seconds_since_1900_big_endian() -> None:
    # RFC 868's own examples: 2,208,988,800 is 1970-01-01 00:00 GMT.
    epoch_1970 = datetime.datetime(1970, 1, 1) - datetime.datetime(1900, 1, 1)
    assert epoch_1970.total_seconds() == 2_208_988_800
    handler = build(_listener(handler="time"))
    said = handler.session().greeting()
    assert said is not None
    assert len(said) == 4
    assert abs(int.from_bytes(said, "big") - (time.time() + 2_208_988_800)) < 2
    assert (
        handler.datagram(b"") == said
        or abs(int.from_bytes(handler.datagram(b"") or b"", "big") - int.from_bytes(said, "big")) <= 1
    )


def test_daytime_is_one_readable_line() -> None:
    said = build(_listener(handler="daytime")).session().greeting()
    assert said is not None
    assert said.endswith(b"\r\n")
    assert b"\n" not in said[:-1]
    when = datetime.datetime.strptime(said.decode().rstrip("\r\n").rsplit("-", 1)[0], "%A, %B %d, %Y %H:%M:%S")
    assert abs(when - datetime.datetime.now()) < datetime.timedelta(minutes=1)


def test_max_message_size_bounds_requests_and_datagrams_not_a_streams_chunks() -> None:
    stamp = build(_listener(handler="timestamp", max_message_size=10))
    assert stamp.session().feed(b"x" * 10)
    with pytest.raises(TooLarge):
        stamp.session().feed(b"x" * 11)
    with pytest.raises(TooLarge):
        stamp.datagram(b"x" * 11)
    echo = build(_listener(handler="echo", max_message_size=10))
    assert echo.session().feed(b"y" * 1000) == b"y" * 1000  # a chunk of a stream, not a request
    assert echo.datagram(b"y" * 10) == b"y" * 10
    with pytest.raises(TooLarge):
        echo.datagram(b"y" * 11)


def test_every_handler_name_has_a_handler_and_every_handler_a_name() -> None:
    # The agent answers from what its worker is told as well as from its listener, and exec is
    # given its worker's shutdown_timeout: build makes them.
    assert set(get_args(HandlerName)) == {*HANDLERS, "agent", "exec"}


def test_the_agent_answers_one_line_from_the_state_it_was_last_told_and_closes() -> None:
    told = Told()
    handler = build(_listener(handler="agent"), told=told)
    assert isinstance(handler, Agent)
    assert handler.session().greeting() == b"maint\n"  # told nothing yet: not known to be up
    said = {}
    for state in ("up", "drain", "maint", "up"):
        told.state = state
        session = handler.session()
        said[state] = session.greeting()
    # "ready" with "up": only it takes a server out of the DRAIN or MAINT an earlier answer set.
    assert said == {"up": b"up ready\n", "drain": b"drain\n", "maint": b"maint\n"}
    assert set(AGENT_ANSWERS) == {"up", "drain", "maint"}
    for answer in said.values():
        assert answer is not None
        assert answer.isascii()
        assert answer.endswith(b"\n")
        assert b"\n" not in answer[:-1]  # one line: HAProxy reads up to the first end of line
    # A greeting is all the session says: the lifecycle writes it at connect and closes.
    assert handler.datagram(b"?") is None
    assert build(_listener(handler="agent", max_message_size=1), told=told).session().greeting() == b"up ready\n"


def rfc864_lines(count: int) -> bytes:
    """The RFC's figure, built as the RFC draws it: line n starts n characters along the 95
    printable characters (32 to 126), wraps, is 72 long and ends CRLF."""
    printable = [chr(c) for c in range(32, 127)]
    return b"".join(("".join(printable[(n + i) % 95] for i in range(72)) + "\r\n").encode() for n in range(count))


def test_chargen_flows_the_rfc_pattern_and_answers_datagrams_of_0_to_512() -> None:
    handler = build(_listener(handler="chargen"))
    session = handler.session()
    assert session.flowing
    assert session.greeting() is None
    assert session.feed(b"ignored") == b""
    flowed = b"".join(session.more() for _ in range(106))  # 10,070 lines
    assert flowed[: 10_000 * 74] == rfc864_lines(10_000)
    pattern = rfc864_lines(7)
    lengths = set()
    for _ in range(2000):
        reply = handler.datagram(b"?")
        assert reply is not None
        assert len(reply) <= 512
        assert reply == pattern[: len(reply)]
        lengths.add(len(reply))
    assert len(lengths) > 100  # random, not one length


@pytest.mark.parametrize("ns", [1_765_000_000_123_456_789, 1_765_000_000_000_000_000, 1_765_000_000_000_000_999])
def test_seed_clock_says_what_the_seed_said(ns: int) -> None:
    """The seed's str(datetime.now()), microseconds floored and left out when zero, twice within a
    second (the second's text kept) and once in the next."""
    now = [ns]
    clock = SeedClock(lambda: now[0])
    for now[0] in (ns, ns + 1_000, ns + 1_000_000_000):
        seconds, nanos = divmod(now[0], 1_000_000_000)
        expected = datetime.datetime.fromtimestamp(seconds).replace(microsecond=nanos // 1000)
        assert clock() == str(expected)
