"""`handler: exec`: a program per connection, as inetd's `nowait`, systemd's `Accept=yes` and
socat's `EXEC:` run one, driven on the asyncio model's loop.

Each connection is a stage of its lifecycle Connection's life, as a relay's is: `ExecProtocol`
is the loop's protocol for the client's socket and the transport of its Connection. Once the
connection is admitted, the program is started with the socket itself as its stdin and stdout,
and the worker closes its own copy at once: the child's bytes never pass through sockd (it
streams at socket speed), and the child's exit, or its shutdown(), is the client's EOF, so a
half-close works as the program does it. The Connection (its ticket, the active gauge, its log
line) lives on until the child is reaped: the running child is the session.

Behind a listener's stage (a PROXY header, TLS: lifecycle.Staging), the child cannot have the
socket: `ExecRelay` is the relay's driver (sockd.relay.aio) with the child's socketpair for its
upstream, started once the stage is done.

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
are open until then); the children of a worker that died first are the supervisor's to end,
reap and count (sockd.orphans).

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
from collections.abc import Callable
from typing import Any, cast

import structlog

from sockd.counters import EXEC_ERROR, EXEC_FAILED, EXEC_OK, EXEC_SIGNAL, EXEC_TIMEOUT, Recorder
from sockd.handlers import Exec, ToChild
from sockd.lifecycle import Connection, ConnectionLog, Service
from sockd.limits import Ticket, TokenBuckets
from sockd.logging import Throttled
from sockd.relay import Resolver
from sockd.relay.aio import RelayProtocol, UpstreamProtocol, carrier
from sockd.tls.layer import TLSLayer

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


def settle(handler: Exec) -> OSError | None:
    """Make the worker ready to start the listener's children: run in `cwd` (posix_spawn cannot
    change a child's directory; a worker serves one listener, so its own can be the children's),
    and no inherited descriptor but stdin, stdout and stderr left open across an exec. The error
    if `cwd` cannot be entered (by the listener's user: --check judges it, but an ACL or a change
    since may differ): then every child fails to start, counted, rather than the worker dying."""
    unable = None
    if handler.cwd is not None:
        try:
            os.chdir(handler.cwd)
        except OSError as exc:
            unable = exc
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                continue
    return unable


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
    rate (see LINES_PER_SECOND). `names` are the settings of the relay that copies for a staged
    client (see ExecRelay), None on a listener without a stage."""

    def __init__(
        self, handler: Exec, loop: asyncio.AbstractEventLoop, nagle: bool, staged: bool, unable: OSError | None
    ) -> None:
        self.handler = handler
        self.unable = unable  # why no child can start (see settle)
        self.loop = loop
        self.nagle = nagle  # the listener has nodelay: false (the loop set TCP_NODELAY)
        self.running: set[Child] = set()
        self.lines = TokenBuckets(LINES_PER_SECOND, LINES_BURST, loop.time)
        self.names = Resolver(ToChild(handler), loop.call_soon_threadsafe) if staged else None

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

    def start(self, connection: Connection, fd: int, env: dict[str, str], exited: Callable[[], None]) -> Child | None:
        """The child of `connection`, started on `fd` (its stdin and stdout), `exited` called
        once it is reaped and counted; None if it could not start (counted, logged, and said in
        the connection's log line)."""
        handler = self.handler
        if self.unable is not None:
            self._failed(connection, self.unable, cwd=handler.cwd)
            return None
        try:
            pid, stderr = spawn(handler, fd, env)
        except OSError as exc:  # ENOENT, EACCES, ENOEXEC
            self._failed(connection, exc)
            return None
        return Child(self, connection, pid, stderr, exited)

    def _failed(self, connection: Connection, exc: OSError, **where: object) -> None:
        connection.recorder.exits[EXEC_FAILED] += 1
        _failed(command=self.handler.command[0], error=exc.strerror or str(exc), **where)
        if connection.observer is not None:
            connection.observer.ending = "failed"  # as a child's exit is said (see Child._exited)


class Child:
    """One running child: its exit watched through its pidfd, its stderr read into the log, its
    exec_timeout kept; once reaped it is counted and `exited` is told."""

    __slots__ = (
        "children",
        "connection",
        "exited",
        "partial",
        "pid",
        "pidfd",
        "reaped",
        "skipping",
        "started",
        "stderr",
        "timed_out",
        "timer",
    )

    def __init__(
        self, children: Children, connection: Connection, pid: int, stderr: int, exited: Callable[[], None]
    ) -> None:
        self.children = children
        self.connection = connection
        self.pid = pid
        self.stderr = stderr
        self.exited = exited
        self.started = connection.recorder.clock()
        self.timed_out = self.reaped = False
        self.partial = b""  # a stderr line's beginning, its end not read yet
        self.skipping = False  # past LINE_BYTES of the current stderr line: dropped until its end
        children.running.add(self)
        # pidfd_open() cannot fail on our own child before it is reaped, but for want of a descriptor.
        self.pidfd = os.pidfd_open(pid)
        loop = children.loop
        loop.add_reader(self.pidfd, self._exited)
        loop.add_reader(stderr, self._stderr)
        self.timer = loop.call_later(children.handler.timeout, self._expired)

    def _expired(self) -> None:
        self.timed_out = True
        self.signal(signal.SIGTERM)
        self.timer = self.children.loop.call_later(KILL_AFTER, self.signal, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Signal the child's process group (the pid is ours until it is reaped, so is its group)."""
        if self.reaped:
            return
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
        if not self.skipping:
            self.children.say(self.pid, line[:LINE_BYTES], len(line) > LINE_BYTES)

    def _stderr_closed(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = b""
        self.children.loop.remove_reader(self.stderr)
        os.close(self.stderr)
        self.stderr = -1

    def _exited(self) -> None:
        """The child exited: reaped and counted, its run time too; then `exited`."""
        loop, connection = self.children.loop, self.connection
        loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        self.children.running.discard(self)
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
        connection.recorder.exits[result] += 1
        if connection.observer is not None:
            connection.observer.note(child=self.pid)
            # The child's exit is how the session ended, whatever a copy behind a stage saw
            # first (the client's or the child's end of output: see ExecRelay).
            connection.observer.ending = ending
        self.exited()


class ExecProtocol(asyncio.Protocol):
    """A client of an exec listener without a stage: the loop's protocol for its socket until
    its child starts on that socket, and the transport of its lifecycle Connection until the
    child is reaped."""

    __slots__ = ("carrier", "child", "children", "connection", "started")

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, children: Children) -> None:
        self.connection = connection = Connection(service, ticket, recorder)
        connection.transport = self
        if service.logged:
            connection.observer = ConnectionLog("exited")
        self.children = children
        self.carrier: asyncio.Transport | None = None  # the loop's transport, until the child has the socket
        self.child: Child | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        carrier = self.carrier = cast(asyncio.Transport, transport)
        connection = self.connection
        if not connection.screened(carrier):
            return
        carrier.pause_reading()  # the child reads it, not the loop
        connection.opened()
        connection.answered = True  # a stop's drain ends the child (Children.stop), not its input
        self.started = connection.recorder.clock()
        sock = carrier.get_extra_info("socket")
        try:
            if self.children.nagle:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            # O_NONBLOCK belongs to the socket's open file, shared with the child's copies: the
            # loop set it, and a program expects a blocking stdin and stdout.
            os.set_blocking(sock.fileno(), True)
            env = environment(self.children.handler, sock)
        except OSError as exc:  # the client left already (getpeername)
            log.debug("connection lost", error=str(exc))
            carrier.close()
            return
        self.child = self.children.start(connection, sock.fileno(), env, self._exited)
        # The worker's copy is closed (a close(), not a shutdown(): the child's copies keep the
        # connection open), and a drain must not shut the child's input: it has no socket more.
        carrier.close()
        if self.child is not None:
            self.carrier = None

    def connection_lost(self, exc: BaseException | None) -> None:
        """The loop closed its transport: the session goes on while the child runs."""
        self.carrier = None
        if self.child is None:
            self.connection.connection_lost(exc)

    def _exited(self) -> None:
        self.connection.recorder.request(0, 0, self.started)
        self.connection.connection_lost(None)

    # -- as the lifecycle connection's transport

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """End the session now: the child is killed (or, not started, the socket closed)."""
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
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


class ExecRelay(RelayProtocol):
    """A client of an exec listener with a stage (a PROXY header, TLS): the stage has read what
    the child cannot be given (the header, what came after it; TLS's records), so the child gets
    one end of a socketpair, and the relay (sockd.relay.aio) copies between the client and the
    other end as it copies to an upstream: half-close, back-pressure and the counts are the
    relay's. Over TLS the child is also told the client's certificate's CN and the protocol
    (SSL_CLIENT_S_DN_CN, SSL_PROTOCOL, as stunnel's exec). The connection ends once the relay
    has ended and the child is reaped, in either order."""

    __slots__ = ("child", "children", "lost")

    def __init__(self, service: Service, ticket: Ticket, recorder: Recorder, children: Children) -> None:
        assert children.names is not None
        super().__init__(service, ticket, recorder, children.names)
        self.children = children
        self.child: Child | None = None
        self.lost: tuple[BaseException | None] | None = None  # the relay's end, while the child runs

    async def _open_upstream(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connection = self.state.connection
        with theirs:
            try:
                env = self._environment()
            except OSError as exc:  # the client left already
                ours.close()
                log.debug("connection lost", error=str(exc))
                self.transport.close()
                return
            self.child = self.children.start(connection, theirs.fileno(), env, self._exited)
        if self.child is None:  # counted `failed` (Children.start), and no request: none ran
            connection.answered = False  # Relayed.connection_lost counts an answered one as a request
            ours.close()
            self.transport.close()  # the client sees EOF at once
            return
        try:
            upstream = await carrier(asyncio.get_running_loop(), ours, lambda: UpstreamProtocol(self))
        except OSError as exc:  # no descriptor left for the loop's transport
            ours.close()
            self.events.upstream_failed(exc)
            self.transport.close()
            return
        if self.transport.is_closing():  # the client gave up meanwhile
            upstream.close()

    def _environment(self) -> dict[str, str]:
        client = self.transport
        env = environment(self.children.handler, client.get_extra_info("socket"))
        proxied = self.state.connection.proxied
        if proxied is not None and isinstance(proxied.source, tuple):
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = proxied.source[0], str(proxied.source[1])
        if proxied is not None and isinstance(proxied.destination, tuple):
            env["LOCAL_ADDR"], env["LOCAL_PORT"] = proxied.destination[0], str(proxied.destination[1])
        if isinstance(client, TLSLayer):
            env["SSL_PROTOCOL"] = client.tls.version() or ""
            if client.peer is not None and client.peer.cn is not None:
                env["SSL_CLIENT_S_DN_CN"] = client.peer.cn
        return env

    def _ended(self, exc: BaseException | None) -> None:
        if self.child is not None and not self.child.reaped:
            self.lost = (exc,)  # the child's exit ends the connection
        else:
            super()._ended(exc)

    def _exited(self) -> None:
        if self.lost is not None:
            super()._ended(self.lost[0])

    def abort(self) -> None:
        super().abort()
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
