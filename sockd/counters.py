"""What a worker counts, and how the count reaches the supervisor.

On its hot path a worker only adds to plain Python ints on a `Recorder` (one per thread, so no
lock and no lost update). A publisher thread copies the totals a few times a second into a shared
memory file that the supervisor created and keeps, so what was published outlives the worker,
even one killed with SIGKILL. Each field only ever grows, which makes every reading, even one torn
by a concurrent write, a valid lower bound; a sequence number lets the supervisor take consistent
snapshots of a live worker.
"""

from __future__ import annotations

import array
import bisect
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from sockd import logging

# sockd_errors_total{kind}: a client gone mid-request; a reply not sent; a connection ended by
# idle_timeout or first_byte_timeout; a message over max_message_size; accept() out of descriptors;
# a relay's upstream refused, unreachable or failing.
ERROR_KINDS = ("reset", "send", "timeout", "too_large", "resources", "upstream")
RESET, SEND, TIMEOUT, TOO_LARGE, RESOURCES, UPSTREAM = range(len(ERROR_KINDS))
# sockd_connections_rejected_total{reason}: closed at once, or a datagram dropped, by a limit; a
# relay's own limits: a client past the connections its worker's descriptors allow, a UDP session
# closed to make room for a new one; a datagram dropped for its source port (see
# lifecycle.REFLECTORS); a connection without a valid PROXY header, or from a source
# `proxy_trusted` does not name (see sockd.proxy); a datagram past its source's datagram_rate.
REJECT_REASONS = (
    "max_connections",
    "max_connections_per_source",
    "connection_rate",
    "acl",
    "relay_connections",
    "relay_sessions",
    "reflection",
    "proxy_protocol",
    "datagram_rate",
)
# sockd_tls_handshakes_total{result}: a TLS listener's handshakes by how they ended (see
# sockd.tls.stage); sockd_tls_sessions_total{version}: the handshakes that succeeded, by the
# protocol version they agreed (a bounded label: the versions a listener may allow).
HANDSHAKE_RESULTS = ("ok", "failed", "timeout", "client_cert_rejected")
HANDSHAKE_OK, HANDSHAKE_FAILED, HANDSHAKE_TIMEOUT, CLIENT_CERT_REJECTED = range(len(HANDSHAKE_RESULTS))
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
# sockd_tls_handshake_duration_seconds's upper bounds: from a loopback handshake (about half a
# millisecond of CPU) up to the longest handshake_timeout worth waiting for.
HANDSHAKE_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# sockd_exec_exits_total{result}: an exec listener's children by how they ended (see sockd.exec):
# exit 0; another exit code; killed by a signal; killed at exec_timeout; could not be started.
EXEC_RESULTS = ("ok", "error", "signal", "timeout", "failed")
EXEC_OK, EXEC_ERROR, EXEC_SIGNAL, EXEC_TIMEOUT, EXEC_FAILED = range(len(EXEC_RESULTS))
PUBLISH_INTERVAL = 0.1  # seconds between publications: the most a SIGKILL can cost the counters
BEAT_INTERVAL = 0.5  # an event loop beats at least this often, busy or idle

# The fields after the sequence number, in shared-memory order; then the lists: one word per error
# kind, per reject reason, per handshake result, per TLS version, per handshake duration bucket,
# per exec result, then the request histogram's buckets (not cumulative; the last is +Inf), whose number is the
# config's (the others' are fixed).
FIELDS = ("connections", "closed", "received", "sent", "duration_ns", "log_dropped", "handshake_ns")
LISTS = ("errors", "rejected", "handshakes", "versions", "handshake_buckets", "exits", "buckets")
FIXED_LISTS = (
    len(ERROR_KINDS),
    len(REJECT_REASONS),
    len(HANDSHAKE_RESULTS),
    len(TLS_VERSIONS),
    len(HANDSHAKE_BOUNDS) + 1,
    len(EXEC_RESULTS),
)
_WORD = 8
# What the counters after the header hold, for a supervisor of another version to tell whether it
# can read a worker's (see sockd.upgrade): the fields, and the lists of fixed size.
LAYOUT = " ".join([*FIELDS, *(f"{name}:{size}" for name, size in zip(LISTS, FIXED_LISTS, strict=False))])
# Final: compiled, a C static rather than a lookup in the module's dict at every request.
_clock: Final = time.monotonic
_bisect: Final = bisect.bisect_left


@dataclass(eq=False, slots=True)
class Totals:
    """A worker's counts at one moment (or the sum over a listener's dead workers)."""

    connections: int
    closed: int
    received: int
    sent: int
    duration_ns: int
    log_dropped: int  # log lines the worker could not write (see sockd.logging.StderrLogger)
    handshake_ns: int  # the TLS handshakes' time, summed
    errors: list[int]
    rejected: list[int]
    handshakes: list[int]
    versions: list[int]
    handshake_buckets: list[int]
    exits: list[int]
    buckets: list[int]

    @property
    def requests(self) -> int:
        """Every request is observed once in the histogram, so its buckets count the requests."""
        return sum(self.buckets)

    @classmethod
    def zero(cls, bucket_count: int) -> Totals:
        return cls.from_words([0] * (len(FIELDS) + sum(FIXED_LISTS) + bucket_count))

    def add(self, other: Totals) -> None:
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in LISTS:
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)])

    def words(self) -> list[int]:
        return [
            *(getattr(self, name) for name in FIELDS),
            *itertools.chain.from_iterable(getattr(self, name) for name in LISTS),
        ]

    @classmethod
    def from_words(cls, words: Sequence[int]) -> Totals:
        at = len(FIELDS)
        lists = []
        for size in (*FIXED_LISTS, len(words) - at - sum(FIXED_LISTS)):
            lists.append(list(words[at : at + size]))
            at += size
        connections, closed, received, sent, duration_ns, log_dropped, handshake_ns = words[: len(FIELDS)]
        errors, rejected, handshakes, versions, handshake_buckets, exits, buckets = lists
        return cls(
            connections,
            closed,
            received,
            sent,
            duration_ns,
            log_dropped,
            handshake_ns,
            errors,
            rejected,
            handshakes,
            versions,
            handshake_buckets,
            exits,
            buckets,
        )


class Recorder:
    """One thread's counts. The connection lifecycle and the models add to its attributes directly
    on their hot paths, and take a request's start time from `clock` (or `busy_since`, read
    already by a blocking model).

    Time is a float of seconds from time.monotonic(), not integer nanoseconds: perf_counter_ns()
    allocates a new int object at every call and a float comes from a free list, which matters at
    two clock reads per request (measured: 0.94 of sockd's speed without metrics with ints, 0.96
    with floats). On Linux monotonic() and perf_counter() read the same clock.

    `clock` is the clock itself, held in a slot of each recorder: compiled, reading it is a field
    of the C struct (a class attribute was a lookup by name at every request), and the call goes
    straight to time.monotonic's C; interpreted, no Python frame between (a method wrapping the
    clock cost the pure build 180 instructions a request under callgrind). The requests that land in the
    first bucket (nearly all on loopback) are counted in a plain int, `quick`, folded into
    `buckets` by `totals`: compiled, adding to it is a machine add, where a list's item is an
    object taken out, added to and put back."""

    __slots__ = (
        "bounds",
        "buckets",
        "busy_since",
        "clock",
        "closed",
        "connections",
        "errors",
        "exits",
        "first_bound",
        "handshake_buckets",
        "handshake_seconds",
        "handshakes",
        "quick",
        "received",
        "rejected",
        "seconds",
        "sent",
        "versions",
    )

    def __init__(self, bounds: list[float]) -> None:
        """`bounds`: the histogram's upper bounds in seconds, shared by every recorder of a worker."""
        self.connections = self.closed = self.received = self.sent = 0
        self.seconds = 0.0
        # When a blocking model's thread took up a request (time.monotonic()); 0 while it waits
        # for a client: for its next request, or to read a reply (see BlockingTransport.write in
        # sockd.transports). See Stats.publish. Stream.data_received takes it as its request's
        # start, with metrics on or off (the clock tells time either way).
        self.busy_since = 0.0
        self.errors = [0] * len(ERROR_KINDS)
        self.rejected = [0] * len(REJECT_REASONS)
        self.buckets = [0] * (len(bounds) + 1)
        self.handshakes = [0] * len(HANDSHAKE_RESULTS)
        self.versions = [0] * len(TLS_VERSIONS)
        self.handshake_buckets = [0] * (len(HANDSHAKE_BOUNDS) + 1)
        self.handshake_seconds = 0.0
        self.exits = [0] * len(EXEC_RESULTS)
        self.bounds = bounds
        self.first_bound = bounds[0]
        self.quick = 0  # the first bucket's requests not yet in `buckets` (see totals)
        self.clock: Callable[[], float] = _clock  # a request's start time, for `request`

    def request(self, received: int, sent: int, started: float) -> None:
        """One request answered: `started` is the clock() taken when it was read."""
        elapsed = _clock() - started
        self.received += received
        self.sent += sent
        self.seconds += elapsed
        # Most replies on loopback land in the first bucket: skip the search for them.
        if elapsed <= self.first_bound:
            self.quick += 1
            return
        # A slow request is most often only a little slow: a scan up from the second bound finds
        # its bucket in a step or two, compiled or not. (bisect's C cost more in its call and its
        # comparisons of float objects: 1,180 instructions a slow request compiled, measured.)
        bounds = self.bounds
        index, last = 1, len(bounds)
        while index < last and elapsed > bounds[index]:
            index += 1
        self.buckets[index] += 1

    def handshake(self, result: int, started: float, version: str | None = None) -> None:
        """A TLS handshake that began at `started` (a clock() reading) ended with `result` (one
        of HANDSHAKE_RESULTS); one that succeeded agreed on `version`. Counted whether or not
        metrics are on: a handshake costs a thousand times the count."""
        self.handshakes[result] += 1
        if version in TLS_VERSIONS:
            self.versions[TLS_VERSIONS.index(version)] += 1
        elapsed = _clock() - started
        self.handshake_seconds += elapsed
        self.handshake_buckets[_bisect(HANDSHAKE_BOUNDS, elapsed)] += 1

    def totals(self) -> Totals:
        return Totals(
            self.connections,
            self.closed,
            self.received,
            self.sent,
            round(self.seconds * 1e9),
            0,  # log lines are the process's, not a thread's: see Stats.publish
            round(self.handshake_seconds * 1e9),
            [*self.errors],
            [*self.rejected],
            [*self.handshakes],
            [*self.versions],
            [*self.handshake_buckets],
            [*self.exits],
            [self.buckets[0] + self.quick, *self.buckets[1:]],
        )


class NullRecorder(Recorder):
    """The recorder when metrics are off: no clock read and no sum per request."""

    __slots__ = ()

    def __init__(self, bounds: list[float]) -> None:
        super().__init__(bounds)
        self.clock = float  # float() is 0.0: a start time nobody will read, at the cost of a call

    def request(self, received: int, sent: int, started: float) -> None:
        pass


# Before the fields: the sequence number (odd while a write is under way) and the heartbeat. This
# header never moves, whatever LAYOUT becomes: a supervisor upgraded in place (see sockd.upgrade)
# watches the heartbeat of its predecessor's workers even when it cannot read their counts.
_SEQUENCE, _HEARTBEAT, _FIRST_FIELD = 0, 1, 2


def words_needed(bucket_count: int) -> int:
    return _FIRST_FIELD + len(FIELDS) + sum(FIXED_LISTS) + bucket_count


def create(bucket_count: int) -> int:
    """A new, zeroed shared-memory file for one worker's counters; the caller owns the descriptor."""
    fd = os.memfd_create("sockd-counters", os.MFD_CLOEXEC)
    os.ftruncate(fd, words_needed(bucket_count) * _WORD)
    return fd


class Shared:
    """A view of one worker's shared counters: the worker writes, the supervisor reads. It owns
    `fd`, which the supervisor hands on to its successor when it is upgraded in place (see
    sockd.upgrade); `blind` if the counts past the header are laid out as another version of
    sockd does them, which then reads as zeros."""

    def __init__(self, fd: int, bucket_count: int, blind: bool = False) -> None:
        self.fd = fd
        self.bucket_count = bucket_count
        self.blind = blind
        try:
            # The whole file: one another version made may be longer or shorter than ours.
            size = os.fstat(fd).st_size if blind else words_needed(bucket_count) * _WORD
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._words = memoryview(self._map).cast("Q")

    @classmethod
    def adopt(cls, fd: int, bucket_count: int, layout: str, ours: int) -> Shared:
        """A worker's counters from a supervisor before an upgrade, laid out as `layout` says with
        `bucket_count` buckets: readable if that is how they are laid out here with `ours`, else blind."""
        return cls(fd, ours, blind=(layout, bucket_count) != (LAYOUT, ours))

    def write(self, totals: Totals, heartbeat: int) -> None:
        words = self._words
        words[_SEQUENCE] += 1  # odd: a write is under way
        words[_HEARTBEAT] = heartbeat
        words[_FIRST_FIELD:] = array.array("Q", totals.words())
        words[_SEQUENCE] += 1

    def heartbeat(self) -> int:
        """Moves while the worker makes progress (see Stats.beat)."""
        return int(self._words[_HEARTBEAT])

    def read(self, attempts: int = 1000) -> Totals:
        """A consistent snapshot if one can be had; else the fields as they are (still lower bounds,
        which is all a writer that died mid-write leaves)."""
        if self.blind:
            return Totals.zero(self.bucket_count)
        words = self._words
        for _ in range(attempts):
            before = words[_SEQUENCE]
            snapshot = words[_FIRST_FIELD:].tolist()
            if before % 2 == 0 and words[_SEQUENCE] == before:
                return Totals.from_words(snapshot)
        return Totals.from_words(words[_FIRST_FIELD:].tolist())

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self.fd)


class Stats:
    """A worker's recorders, summed and published to shared memory by a background thread."""

    def __init__(
        self, shared: Shared, bounds: Sequence[float], enabled: bool = True, stuck_after: float = float("inf")
    ) -> None:
        self.shared = shared
        self.stuck_after = stuck_after
        self.bounds = list(bounds)
        self.kind = Recorder if enabled else NullRecorder
        self._finished = Totals.zero(shared.bucket_count)  # recorders whose thread has ended
        self._live: set[Recorder] = set()
        self._lock = threading.Lock()  # a recorder moves from live to finished in one step
        # The heartbeat the supervisor watches. An event-loop model beats from its loop, so a
        # stuck loop stops it. For the blocking models every publication beats, unless a thread
        # has been busy with one request for `stuck_after` (a thread waiting for a quiet client,
        # or for one that does not read, is not busy: only one stuck in its work stops the beat).
        self.beats = 0
        self.loop_beats = False

    def beat(self) -> None:
        """Called by an event loop at least every BEAT_INTERVAL: it is turning."""
        self.loop_beats = True
        self.beats += 1

    @contextmanager
    def recorder(self) -> Iterator[Recorder]:
        """A recorder for the calling thread, counted until the thread is done with it and after."""
        recorder = self.kind(self.bounds)
        with self._lock:
            self._live.add(recorder)
        try:
            yield recorder
        finally:
            with self._lock:
                self._live.discard(recorder)
                self._finished.add(recorder.totals())

    def publish(self) -> None:
        with self._lock:
            total = Totals.zero(self.shared.bucket_count)
            total.add(self._finished)
            live = list(self._live)
            for recorder in live:
                total.add(recorder.totals())
        total.log_dropped = logging.dropped
        now = time.monotonic()
        if not self.loop_beats and not any(0 < r.busy_since < now - self.stuck_after for r in live):
            self.beats += 1
        self.shared.write(total, self.beats)

    def publish_until(self, stop: threading.Event) -> None:
        while not stop.wait(PUBLISH_INTERVAL):
            self.publish()
        self.publish()
