"""The worker process: serves one listener's socket with its model and handler.

Forked by the fork server (sockd.forkserver), which calls `main` with the spec the supervisor
sent (JSON: the listener and the settings) and the descriptors that came with it: the listening
socket, the worker's end of a socketpair to the supervisor, and the shared memory it publishes
its counts to. Its listener's `user`, if any, it becomes once those are open and before it
serves (see sockd.privileges). The worker says `ready` on that channel once it serves. The supervisor says, a
line each:

    retire            a reload replaced this worker: accept no more, serve the open connections on
    logging {JSON}    log with these settings (a reload changed them)
    state WORD        the instance is now up, drain or maint (an agent listener's workers are told
                      as it changes; the spec says what it was at their start)

and closes its end to stop the worker (a stop, or a retired worker's reload_drain_timeout passed;
or the supervisor died): it ends its connections as a drain does and exits 0, within
shutdown_timeout.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading

import structlog
from setproctitle import setproctitle

from sockd import counters, handlers, privileges
from sockd.config import LoggingConfig
from sockd.lifecycle import chain
from sockd.logging import configure, flush_throttled
from sockd.models import registry
from sockd.privileges import PrivilegeError
from sockd.proxy import stage as proxy
from sockd.spec import WorkerSpec
from sockd.stopping import Stop
from sockd.tls import stage as tls
from sockd.tls.contexts import origination

log = structlog.get_logger()


def main(spec_json: bytes, fds: list[int]) -> int:
    """Serve as `spec_json` says on `fds` (the listening socket, the channel, the counters) until
    stopped: the process's exit code."""
    spec = WorkerSpec.model_validate_json(spec_json)
    listener = spec.listener
    listen_fd, channel_fd, counters_fd = fds
    setproctitle(f"sockd: worker {listener.name}")
    configure(spec.logging, listener=listener.name, pid=os.getpid())
    # A worker the supervisor finds hung gets SIGABRT (see sockd.group): every thread's Python
    # stack then goes to stderr, the log's stream, before it dies. faulthandler writes to the
    # descriptor from its C signal handler, past Python's buffers and a thread that never lets
    # the interpreter run a Python handler; a crash (SIGSEGV) is told the same way.
    faulthandler.enable(file=sys.stderr.fileno(), all_threads=True)

    stop = Stop()
    # Ctrl-C in a terminal reaches the whole process group: the supervisor alone decides what a
    # SIGINT means. A direct SIGTERM (systemd's KillMode=control-group sends one to every
    # process) drains like a stop from the supervisor.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the supervisor's upgrade: `systemctl kill` sends it to all
    signal.signal(signal.SIGTERM, lambda *_: stop.end())

    channel = socket.socket(fileno=channel_fd)
    sock = socket.socket(fileno=listen_fd)
    sock.setblocking(False)  # see sockd.models: every model takes the listener as non-blocking
    shared = counters.Shared(counters_fd, len(spec.buckets) + 1)
    stats = counters.Stats(shared, spec.buckets, enabled=spec.metrics, stuck_after=spec.worker_timeout / 2)
    told = handlers.Told(spec.state)
    model = registry.load(listener.concurrency)(
        listener,
        handlers.build(listener, origination(spec), told, spec.shutdown_timeout),
        stats,
        frozenset(spec.udp_ports),
        # A balancer's PROXY header comes before anything of its client's, TLS's ClientHello too.
        stage=chain(proxy.stage_for(listener), tls.stage_for(spec)),
    )
    # Root's part is done: the descriptors are open, the TLS contexts built. Before a thread
    # starts or a client is accepted, the listener's user, if it names one; one that could become
    # root again serves nothing (the supervisor restarts it as any worker that failed).
    if listener.user is not None and listener.group is not None:
        try:
            privileges.drop(listener.user, listener.group)
        except PrivilegeError as exc:
            log.error("cannot drop privileges; not serving", error=str(exc), user=listener.user, group=listener.group)
            return 1
    threading.Thread(target=_listen, args=(channel, stop, listener.name, told), daemon=True).start()
    stop.ending.on_set(lambda: _exit_after(spec.shutdown_timeout))
    served = threading.Event()
    publisher = threading.Thread(target=stats.publish_until, args=(served,), daemon=True)
    publisher.start()

    try:
        channel.sendall(b"ready\n")
    except OSError:  # stopped (e.g. by a quick second reload) before it began: serve nothing
        stop.end()
    log.debug("serving", concurrency=listener.concurrency, handler=listener.handler)
    model.serve(sock, stop)
    served.set()
    publisher.join()  # the last publication counts everything served
    flush_throttled()
    log.debug("drained")
    return 0


def _exit_after(timeout: float) -> None:
    """End a drain that outlasts shutdown_timeout; the supervisor would kill us by then, but an
    orphaned worker (its supervisor killed) has only this. A grace second lets the supervisor,
    if there is one, do it first."""

    def give_up() -> None:
        log.warning("drain outlasted shutdown_timeout; exiting", shutdown_timeout=timeout)
        os._exit(0)

    timer = threading.Timer(timeout + 1.0, give_up)
    timer.daemon = True  # a drain that ends in time must not wait for it
    timer.start()


def _listen(channel: socket.socket, stop: Stop, listener: str, told: handlers.Told) -> None:
    """Carry out what the supervisor says on the channel until it closes it; whatever happens
    here, the worker then stops, so it is never left deaf to its supervisor."""
    pending = b""
    try:
        # A reset is a close too: the supervisor closed its end before reading our "ready".
        with contextlib.suppress(OSError):
            while data := channel.recv(4096):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    _obey(line, stop, listener, told)
    finally:
        stop.end()


def _obey(line: bytes, stop: Stop, listener: str, told: handlers.Told) -> None:
    command, _, argument = line.partition(b" ")
    if command == b"retire":
        stop.set()
        log.debug("retired: serving the open connections on")  # a blocking model's listener closed
    elif command == b"logging":
        try:
            settings = LoggingConfig.model_validate_json(argument)
        except ValueError as exc:  # a supervisor of another version: keep the settings we have
            log.warning("cannot apply the logging settings", error=str(exc))
            return
        configure(settings, listener=listener, pid=os.getpid())
    elif command == b"state":
        state = argument.decode("ascii", "replace")
        if state in handlers.AGENT_ANSWERS:  # else a supervisor of another version: keep the one we have
            told.state = state
