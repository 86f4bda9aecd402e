"""`handler: exec`: a program per connection, as inetd's `nowait`, systemd's `Accept=yes` and
socat's `EXEC:` run one, driven on the asyncio model's loop.

Each connection is a stage of its lifecycle Connection's life, as a relay's is: `ExecProtocol`
is the loop's protocol for the client's socket and the transport of its Connection. Once the
connection is admitted, the program is started with the socket itself as its stdin and stdout,
and the worker closes its own copy at once: the child's bytes never pass through sockd (it
streams at socket speed), and the child's exit, or its shutdown(), is the client's EOF, so a
half-close works as the program does it. The Connection (its ticket, the active gauge, its log
line) lives on until the child is reaped: the running child is the session.

Spawning: os.posix_spawn, which glibc makes with CLONE_VFORK, so the worker's memory is never
copied, however large. The child's descriptors are 0 and 1 (the connection), 2 (a pipe sockd
reads: one log line per line written, bounded and rate-limited) and nothing else: posix_spawn
closes the descriptors marked close-on-exec, as every one Python opens is, and `settle` marks
those the worker inherited. The child leads a session of its own (setsid), so a timeout's or a
stop's signal reaches what it started too; its signal mask is emptied and every disposition reset
(the worker ignores SIGPIPE, SIGINT, SIGHUP and SIGUSR2, which an exec would pass on).

Resource limits (`limits`): posix_spawn cannot set them, so they are set with prlimit() on the
child's pid as soon as posix_spawn returns. With CLONE_VFORK that is after the child's execve(),
so the program's first instructions (the dynamic loader's, up to its main) run under the worker's
limits: a program cannot have taken more than it needs to start by then. The alternatives cost
more for little: a fork that sets them before exec copies the worker (what this avoids); a
wrapper program (prlimit(1)) costs a second exec per connection.

Reaping: each child's pidfd is one of the loop's readers, readable once it exits: waitpid() on
that pid alone, so no SIGCHLD handler and no other waiter's children. A child still running at
exec_timeout gets SIGTERM, then SIGKILL KILL_AFTER later; at a stop, those still running when the
drain nears shutdown_timeout are ended the same way before the supervisor kills the worker (see
Children.stop). The worker waits for every child to be reaped before it exits (its connections
are open until then).

Counted: sockd_exec_exits_total{result} (sockd.counters.EXEC_RESULTS), each child's run time in
sockd_request_duration_seconds (one request per child, as a relayed connection is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
from typing import Any, cast

import structlog

from sockd.counters import EXEC_ERROR, EXEC_FAILED, EXEC_OK, EXEC_SIGNAL, EXEC_TIMEOUT, Recorder
from sockd.handlers import Exec
from sockd.lifecycle import Connection, ConnectionLog, Service
from sockd.limits import Ticket, TokenBuckets
from sockd.logging import Throttled
from sockd.transports import admitted

log = structlog.get_logger()

KILL_AFTER = 5.0  # seconds between a timed-out child's SIGTERM and its SIGKILL
# A stop's drain ends with the supervisor's SIGKILL of the worker at shutdown_timeout: the
# children get SIGTERM this long before it (half of shutdown_timeout, if that is less), and
# SIGKILL half as long before it, so that none outlives its worker.
STOP_GRACE = 1.0
# The most of one stderr line said in the log: the rest of a longer line is dropped (`truncated`).
LINE_BYTES = 1024
# stderr lines logged per second, by all of a worker's children together, and the burst: a child
# writing more must not flood the log. Those past it are dropped and counted (a throttled warning).
LINES_PER_SECOND = 100.0
LINES_BURST = 200
READ_BYTES = 65536
# Every signal a child starts with at its default disposition (SIGKILL and SIGSTOP have no other).
SIGNALS = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
LIMITS = (("cpu", resource.RLIMIT_CPU), ("memory", resource.RLIMIT_AS), ("files", resource.RLIMIT_NOFILE))

_failed = Throttled("exec failed: the program could not start")
_dropped = Throttled("child stderr lines dropped: more than the log takes")


def settle(handler: Exec) -> None:
    """Make the worker ready to start the listener's children: run in `cwd` (posix_spawn cannot
    change a child's directory; a worker serves one listener, so its own can be the children's),
    and no inherited descriptor but stdin, stdout and stderr left open across an exec."""
    if handler.cwd is not None:
        os.chdir(handler.cwd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                continue


def environment(handler: Exec, sock: Any) -> dict[str, str]:
    """The child's environment: `env`, then who the connection joins (as systemd's Accept=yes
    sets REMOTE_ADDR and REMOTE_PORT) and which listener it came to. A Unix listener's client
    has no address: LOCAL_ADDR is the socket's path, and there are no ports."""
    env = {**handler.env, "SOCKD_LISTENER": handler.listener}
    local, remote = sock.getsockname(), sock.getpeername()
    if sock.family == socket.AF_UNIX:
        env["LOCAL_ADDR"] = local if isinstance(local, str) else local.decode(errors="replace")
        return env
    env["LOCAL_ADDR"], env["LOCAL_PORT"] = local[0], str(local[1])
    env["REMOTE_ADDR"], env["REMOTE_PORT"] = remote[0], str(remote[1])
    return env


def spawn(handler: Exec, fd: int, env: dict[str, str]) -> tuple[int, int]:
    """Start the program on the connection `fd`: its pid, and the non-blocking end of its stderr's
    pipe. Raises OSError if it cannot start (glibc's posix_spawn reports a failed execve())."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawn(
            handler.command[0],
            handler.command,
            env,
            # dup2() clears close-on-exec on the copies: these three are all the child keeps.
            file_actions=[
                (os.POSIX_SPAWN_DUP2, fd, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=SIGNALS,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    os.set_blocking(read_end, False)
    limits = handler.limits
    if limits is not None:
        for name, which in LIMITS:
            value = getattr(limits, name)
            if value is not None:
                try:
                    resource.prlimit(pid, which, (value, value))
                except ProcessLookupError:  # it has exited already
                    break
    return pid, read_end


class Children:
    """A worker's running children: the stop ends them, and the stderr lines they write share one
    rate (see LINES_PER_SECOND)."""

    def __init__(self, handler: Exec, loop: asyncio.AbstractEventLoop, nagle: bool) -> None:
        self.handler = handler
        self.loop = loop
        self.nagle = nagle  # the listener has nodelay: false (the loop set TCP_NODELAY)
        self.running: set[ExecProtocol] = set()
        self.lines = TokenBuckets(LINES_PER_SECOND, LINES_BURST, loop.time)

    def stop(self) -> None:
        """The worker's drain has begun: the children still running near its end are ended."""
        timeout = self.handler.shutdown_timeout
        grace = min(STOP_GRACE, timeout / 2)
        self.loop.call_later(timeout - grace, self.signal_all, signal.SIGTERM)
        self.loop.call_later(timeout - grace / 2, self.signal_all, signal.SIGKILL)

    def signal_all(self, signum: int) -> None:
        for child in list(self.running):
            child.signal(signum)

    def say(self, pid: int, line: bytes, truncated: bool) -> None:
        if self.lines.take(""):
            text = line.decode(errors="replace")
            if truncated:
                log.info("child stderr", child=pid, line=text, truncated=True)
            else:
                log.info("child stderr", child=pid, line=text)
        else:
            _dropped(child=pid)


class ExecProtocol(asyncio.Protocol):
    """A client of an exec listener: the loop's protocol for its socket until its child starts,
    and the transport of its lifecycle Connection until the child is reaped."""

    __slots__ = (
        "carrier",
        "children",
        "connection",
        "partial",
        "pid",
        "pidfd",
        "skipping",
        "started",
        "stderr",
        "timed_out",
        "timer",
    )

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, children: Children) -> None:
        self.connection = connection = Connection(service, ticket, recorder)
        connection.transport = self
        if service.logged:
            connection.observer = ConnectionLog("exited")
        self.children = children
        self.carrier: asyncio.Transport | None = None  # the loop's transport, until the child has the socket
        self.pid = 0  # 0: no child (yet, or it could not start)
        self.pidfd = self.stderr = -1
        self.started = 0.0
        self.timed_out = False
        self.timer: asyncio.TimerHandle | None = None
        self.partial = b""  # a stderr line's beginning, its end not read yet
        self.skipping = False  # past LINE_BYTES of the current stderr line: dropped until its end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        carrier = self.carrier = cast(asyncio.Transport, transport)
        connection = self.connection
        service = connection.service
        if service.screening:
            ticket = admitted(carrier, service.admission, connection.recorder)
            if ticket is None:
                service.forget(connection)
                return
            connection.ticket = ticket
        carrier.pause_reading()  # the child reads it, not the loop
        connection.opened()
        connection.answered = True  # a stop's drain ends the child (Children.stop), not its input
        self.started = connection.recorder.clock()
        self._start(carrier.get_extra_info("socket"))

    def _start(self, sock: Any) -> None:
        children, connection = self.children, self.connection
        handler = children.handler
        try:
            fd = sock.fileno()
            if children.nagle:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            # O_NONBLOCK belongs to the socket's open file, shared with the child's copies: the
            # loop set it, and a program expects a blocking stdin and stdout.
            os.set_blocking(fd, True)
            pid, self.stderr = spawn(handler, fd, environment(handler, sock))
        except OSError as exc:  # ENOENT, EACCES, ENOEXEC; or the client left (getpeername)
            connection.recorder.exits[EXEC_FAILED] += 1
            _failed(command=handler.command[0], error=exc.strerror or str(exc))
            if connection.observer is not None:
                connection.observer.ended_by("failed")
            self._close_carrier()
            return
        self.pid = pid
        self.children.running.add(self)
        # pidfd_open() cannot fail on our own child before it is reaped, but for want of a descriptor.
        self.pidfd = os.pidfd_open(pid)
        loop = children.loop
        loop.add_reader(self.pidfd, self._exited)
        loop.add_reader(self.stderr, self._stderr)
        self.timer = loop.call_later(handler.timeout, self._expired)
        self._close_carrier()
        self.carrier = None  # its socket is the child's: a drain must not shut its input

    def _close_carrier(self) -> None:
        """The worker's copy of the socket is closed (a close(), not a shutdown(): the child's
        copies keep the connection open)."""
        if self.carrier is not None:
            self.carrier.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The loop closed its transport: the session goes on while the child runs."""
        self.carrier = None
        if not self.pid:
            self.connection.connection_lost(exc)

    def _expired(self) -> None:
        self.timed_out = True
        self.signal(signal.SIGTERM)
        self.timer = self.children.loop.call_later(KILL_AFTER, self.signal, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Signal the child's process group (the pid is ours until it is reaped, so is its group)."""
        # ESRCH: the group is gone, the child a zombie about to be reaped.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def _stderr(self) -> None:
        try:
            data = os.read(self.stderr, READ_BYTES)
        except BlockingIOError:
            return
        if not data:
            self._stderr_closed()
            return
        lines = data.split(b"\n")
        self.partial += lines[0]
        for line in lines[1:]:
            self._line(self.partial)
            self.partial = line
            self.skipping = False
        if len(self.partial) > LINE_BYTES:
            self._line(self.partial)
            self.partial, self.skipping = b"", True

    def _line(self, line: bytes) -> None:
        if self.skipping:
            return
        self.children.say(self.pid, line[:LINE_BYTES], len(line) > LINE_BYTES)

    def _stderr_closed(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = b""
        self.children.loop.remove_reader(self.stderr)
        os.close(self.stderr)
        self.stderr = -1

    def _exited(self) -> None:
        """The child exited: reaped, counted, and its connection ends."""
        loop, connection = self.children.loop, self.connection
        loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.children.running.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.stderr >= 0:  # what it wrote last; a grandchild holding the pipe is not waited for
            self._stderr()
            if self.stderr >= 0:
                self._stderr_closed()
        code = os.waitstatus_to_exitcode(status)
        if self.timed_out:
            result, ending = EXEC_TIMEOUT, "timeout"
        elif code < 0:
            result, ending = EXEC_SIGNAL, f"signal {signal.Signals(-code).name}"
        else:
            result, ending = (EXEC_OK if code == 0 else EXEC_ERROR), f"exit {code}"
        recorder = connection.recorder
        recorder.exits[result] += 1
        recorder.request(0, 0, self.started)
        if connection.observer is not None:
            connection.observer.note(child=self.pid)
            connection.observer.ended_by(ending)
        connection.connection_lost(None)

    # -- as the lifecycle connection's transport

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """End the session now: the child is killed (or, not started, the socket closed)."""
        if self.pid and self in self.children.running:
            self.signal(signal.SIGKILL)
        elif self.carrier is not None:
            self.carrier.abort()

    def pause_reading(self) -> None:
        """The child reads the connection, not sockd."""

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.carrier is None or self.carrier.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The loop's transport's, while it has the socket (the connection's log line reads it as
        the connection opens); then nothing: the child has the socket."""
        return default if self.carrier is None else self.carrier.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return 0
