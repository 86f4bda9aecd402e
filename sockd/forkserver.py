"""The fork server: one process that has imported everything a worker runs, and forks workers.

Started by the supervisor (exec, so it owes nothing to the supervisor's threads) as `python -P -m
sockd.forkserver FD`, FD its end of a SOCK_SEQPACKET socketpair. It imports the worker, every
model, handler and relay module, structlog, asyncio, uvloop and the idna codec, then calls
gc.freeze(), so that what it imported sits in pages every worker shares and no worker's garbage
collector ever touches (and so copies) them. Then it answers requests: the worker's spec (JSON),
its length first, in as many messages as it takes (a message of a SOCK_SEQPACKET socket must fit
in the socket's send buffer, some 200 kB, and a listener's `allow` list may make a spec longer),
the first carrying the worker's descriptors (SCM_RIGHTS: the listening socket, the channel to
the supervisor, the shared counters); answered with the worker's pid, or -errno.

Workers are the supervisor's children, not the fork server's: the supervisor is a child
subreaper (PR_SET_CHILD_SUBREAPER), and the fork server forks twice, the intermediate process
exiting at once and being reaped before the pid is sent, so the worker has been reparented to the
supervisor by the time the supervisor hears of it. The supervisor reaps each worker by its pid
(`Process`), gets its real exit status and CPU time, and may kill it: an unreaped child's pid
cannot be reused.

Why not the standard library's multiprocessing forkserver with set_forkserver_preload: its
children are the fork server's, which reports their exit codes on a pipe (255 for all once it
died), so the supervisor could neither wait for nor safely kill its workers; each start pickles a
Process object and the parent's preparation data, whose sys.path (with '' replaced by the working
directory, undoing -P) and __main__ the child re-imports; it starts a resource tracker process;
and it has no gc.freeze(). What sockd needs is a fork and two descriptors, which this is.

When the supervisor closes its end (it stops, or died), the fork server exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import hashlib
import importlib
import json
import os
import pkgutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import structlog
from setproctitle import setproctitle

import sockd
from sockd.config import LoggingConfig
from sockd.errors import SockdError
from sockd.logging import configure, exit_status
from sockd.sockets import reason

if TYPE_CHECKING:
    import resource

log = structlog.get_logger()

PACKAGE = str(Path(sockd.__file__).parent)
# Seconds the fork server may take to import everything on a loaded machine. The supervisor's
# loop waits meanwhile: well under half of the unit's WatchdogSec (30 s), so a ping is not missed.
READY_TIMEOUT = 10.0
FORK_TIMEOUT = 10.0  # seconds a fork may take before the fork server is taken for hung
CHUNK = 64 << 10  # bytes of a spec per message: well within any socket's send buffer
MAX_FDS = 3  # the listening socket, the channel, the counters
_LENGTH = struct.Struct("Q")  # a spec's length in bytes, at the head of its first message
_PID = struct.Struct("q")  # the answer: a pid, or -errno
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

Entry = Callable[[bytes, list[int]], int]


class ForkServerError(SockdError):
    """The fork server did not start, died or hung: no worker could be had from it."""


# -- the fork server process


def main(argv: list[str]) -> int:
    gc.disable()  # until frozen: no collection leaves holes in pages the workers will share
    control = socket.socket(fileno=int(argv[1]))
    setproctitle("sockd: fork server")
    # Ctrl-C and SIGHUP reach every process of the terminal's group, and `systemctl kill -s USR2`
    # every process of the unit: the supervisor decides what they mean, and closes our socket
    # when we are to go. (A worker ignores them too.)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    configure(LoggingConfig())  # until a worker configures its own: a failing one logs to stderr
    code = fingerprint(PACKAGE)  # before importing: a change during the imports shows next time
    try:
        entry = _preload()
    except Exception:  # sockd's files are broken: the supervisor keeps the fork server it has, if any
        log.exception("the fork server cannot import what a worker runs")
        return 1
    gc.freeze()
    try:
        control.send(json.dumps({"package": PACKAGE, "fingerprint": code}).encode())
        while True:
            head, fds, flags, _ = socket.recv_fds(control, CHUNK, MAX_FDS)
            if not head:  # the supervisor closed its end
                return 0
            try:
                spec = _rest_of_spec(control, head)
                if flags & socket.MSG_CTRUNC or len(fds) != MAX_FDS:
                    # The kernel passes the descriptors it can install, and truncates the rest:
                    # this process is at its descriptor limit.
                    answer = -errno.EMFILE
                else:
                    answer = _fork(functools.partial(_serve, entry, spec, fds, control))
            finally:
                for fd in fds:
                    os.close(fd)  # the worker has its own
            control.send(_PID.pack(answer))
    except ConnectionError:  # the supervisor is gone
        return 0


def _rest_of_spec(control: socket.socket, head: bytes) -> bytes:
    """The whole spec whose first message is `head` (see send_spec)."""
    (length,) = _LENGTH.unpack_from(head)
    chunks, received = [head[_LENGTH.size :]], len(head) - _LENGTH.size
    while received < length:
        chunk = control.recv(CHUNK)
        if not chunk:
            raise ConnectionResetError("the supervisor closed its end in the middle of a spec")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def send_spec(control: socket.socket, spec: bytes, fds: Sequence[int]) -> None:
    """Send a spec with its descriptors, in messages of CHUNK bytes at most: its length and
    first bytes with the descriptors, then the rest."""
    message = _LENGTH.pack(len(spec)) + spec
    socket.send_fds(control, [message[:CHUNK]], fds)
    for start in range(CHUNK, len(message), CHUNK):
        control.sendall(message[start : start + CHUNK])


def _preload() -> Entry:
    """Import what every worker runs, and return the worker's entry."""
    registry = importlib.import_module("sockd.models.registry")
    relay = importlib.import_module("sockd.relay")
    # encodings.idna: the codec every host name is encoded with (the relay's resolver, TLS's
    # server_hostname), imported at its first use: by then a worker may have dropped to a user
    # that cannot read the interpreter's files (see sockd.privileges).
    names = ["asyncio", "structlog", "encodings.idna", "sockd.handlers"]
    names += [kind.module for kind in registry.MODELS.values()]
    names += [f"sockd.relay.{module.name}" for module in pkgutil.iter_modules(relay.__path__)]
    for name in names:
        importlib.import_module(name)
    with contextlib.suppress(ImportError):  # optional, as in sockd.models.aio
        importlib.import_module("uvloop")
    entry: Entry = importlib.import_module("sockd.worker").main
    return entry


def _fork(serve: Callable[[], NoReturn]) -> int:
    """Fork a worker that runs `serve` as the supervisor's child: its pid, or -errno."""
    try:
        pid_read, pid_write = os.pipe()
    except OSError as exc:  # out of descriptors: the supervisor says so, and the fork server goes on
        return -(exc.errno or errno.EMFILE)
    try:
        intermediate = os.fork()
    except OSError as exc:
        os.close(pid_read)
        os.close(pid_write)
        return -(exc.errno or errno.EAGAIN)
    if intermediate == 0:
        try:
            worker = os.fork()
            if worker == 0:
                os.close(pid_read)
                os.close(pid_write)
                serve()
            os.write(pid_write, _PID.pack(worker))
        finally:
            # Orphaned, the worker goes to the nearest subreaper: the supervisor. On an error,
            # the fork server reads no pid and answers EAGAIN (what a fork fails with).
            os._exit(0)
    os.close(pid_write)
    try:
        os.waitpid(intermediate, 0)  # once it is reaped, the worker is the supervisor's
        written = os.read(pid_read, _PID.size)
    finally:
        os.close(pid_read)
    answer: int = _PID.unpack(written)[0] if len(written) == _PID.size else -errno.EAGAIN
    return answer


def _serve(
    entry: Entry,
    spec: bytes,
    fds: list[int],
    control: socket.socket,
) -> NoReturn:
    """The worker, in the forked process: it never returns into the fork server's loop."""
    code = 1
    try:
        control.close()
        gc.enable()
        code = entry(spec, fds)
    except BaseException:
        log.exception("worker failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- the supervisor's side


def fingerprint(package: str) -> str:
    """A digest of every file under `package`: path, size and mtime_ns, symlinks not followed.
    __pycache__ is left out: Python writes it itself as it imports, and it follows the sources."""
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(package):
        subdirectories[:] = sorted(name for name in subdirectories if name != "__pycache__")
        for name in sorted([*subdirectories, *files]):
            path = os.path.join(directory, name)
            try:
                status = os.lstat(path)
            except FileNotFoundError:  # removed while we looked: the next look sees it gone
                continue
            if not stat.S_ISDIR(status.st_mode):  # a directory's own mtime moves with its __pycache__
                digest.update(f"{os.path.relpath(path, package)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class Process:
    """A worker as its parent sees it: waited for by pid, killed safely while unreaped (its pid
    cannot be reused), and with the CPU time it used."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.exit_cpu_seconds: float | None = None  # from wait4's rusage, once it exited

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reaped(*os.wait4(self.pid, os.WNOHANG))
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            self._reaped(*os.wait4(self.pid, 0))
        return self.returncode

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def cpu_seconds(self) -> float | None:
        """User and system time so far, from /proc while it runs; None if it cannot be read."""
        if self.exit_cpu_seconds is not None:
            return self.exit_cpu_seconds
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()  # the name, in (), may hold spaces
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    def resident_bytes(self) -> int:
        if self.returncode is not None:
            return 0
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as file:
                return int(file.read().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError):
            return 0

    def _reaped(self, pid: int, status: int, usage: resource.struct_rusage) -> None:
        if pid:
            self.exit_cpu_seconds = usage.ru_utime + usage.ru_stime
            self.returncode = os.waitstatus_to_exitcode(status)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ForkServer:
    """One running fork server, from the supervisor's side."""

    def __init__(self) -> None:
        """Start one and wait until it has imported everything (ForkServerError if it fails)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                self.process = subprocess.Popen(
                    # -P: nothing imported from the working directory (see sockd.worker).
                    [sys.executable, "-P", "-m", "sockd.forkserver", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"the fork server cannot be started: {sys.executable}: {reason(exc)}") from None
        self.control = ours
        self.pid = self.process.pid
        try:
            ours.settimeout(READY_TIMEOUT)
            hello = json.loads(ours.recv(4096) or b"null")
            ours.settimeout(FORK_TIMEOUT)
        except (OSError, ValueError):
            hello = None
        if not (isinstance(hello, dict) and isinstance(hello.get("package"), str) and "fingerprint" in hello):
            self.close(kill=True)  # dead, hung, or another version's: none to fork from
            raise ForkServerError(f"the fork server did not start (exit code {self.process.returncode})")
        self.package: str = hello["package"]
        self.fingerprint: str = hello["fingerprint"]

    def fork(self, spec: bytes, fds: Sequence[int]) -> int:
        """A worker on `fds` from `spec`: its pid. OSError if the fork failed; ForkServerError if
        the fork server is gone or hung, which it then is for good."""
        try:
            send_spec(self.control, spec, fds)
            reply = self.control.recv(_PID.size)
        except OSError as exc:  # a timeout too: a late answer would be taken for the next one's
            self.close(kill=True)
            raise ForkServerError(f"the fork server failed: {exc}") from None
        if len(reply) != _PID.size:
            self.close(kill=True)
            raise ForkServerError(f"the fork server died (exit code {self.process.returncode})")
        answer: int = _PID.unpack(reply)[0]
        if answer in (-errno.EMFILE, -errno.ENFILE):
            what = "the fork server is" if answer == -errno.EMFILE else "the system is"
            raise OSError(-answer, f"cannot fork a worker: {what} out of descriptors ({os.strerror(-answer)})")
        if answer < 0:
            raise OSError(-answer, f"cannot fork a worker: {os.strerror(-answer)}")
        return answer

    def exited(self) -> int | None:
        return self.process.poll()

    def close(self, kill: bool = False) -> None:
        """End it: it exits when its socket closes; killed if asked, or if it does not go."""
        self.control.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Spawner:
    """The supervisor's way to start workers: through a fork server, started again when it died
    and replaced when sockd's files changed."""

    def __init__(self) -> None:
        self.server: ForkServer | None = None
        self.retry_at = 0.0  # after a failed start, the next try waits: no tight loop of imports
        # The fork server of the supervisor this process was before an upgrade (see sockd.upgrade):
        # it exits as its socket closed with the exec, and is reaped here.
        self.exiting: list[Process] = []

    def start(self) -> None:
        """The first fork server (ForkServerError if it cannot be had), before the supervisor
        starts a thread or a worker."""
        _become_subreaper()
        self.server = self._new()

    def spawn(self, spec: bytes, fds: Sequence[int]) -> Process:
        """A worker from `spec` on `fds` (the listening socket, its channel, its counters)."""
        return Process(self._running().fork(spec, fds))

    def tend(self, known: Callable[[], Collection[int]]) -> None:
        """Replace a fork server that died; reap strays (see _reap_strays)."""
        if self.server is not None and self.server.exited() is not None:
            with contextlib.suppress(ForkServerError):  # logged; the next spawn tries again
                self._running()
        for process in [process for process in self.exiting if process.poll() is not None]:
            self.exiting.remove(process)
            log.info("the old fork server exited", pid=process.pid, **exit_status(process.returncode))
        leftovers = [process.pid for process in self.exiting]
        _reap_strays(lambda: {*known(), *leftovers, *([self.server.pid] if self.server else [])})

    def code_changed(self) -> bool:
        """Whether sockd's files differ from those the fork server imported."""
        return self.server is not None and fingerprint(self.server.package) != self.server.fingerprint

    def renew(self) -> None:
        """A fork server on sockd's files as they are now; the old one ends once it is ready, or
        stays (ForkServerError) if the new one does not start."""
        new = self._new()
        if self.server is not None:
            self.server.close()
        self.server = new

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _running(self) -> ForkServer:
        server = self.server
        if server is not None and server.exited() is None:
            return server
        if server is not None:
            log.warning(
                "fork server died; starting a new one", pid=server.pid, **exit_status(server.process.returncode)
            )
            server.close()
            self.server = None
        if time.monotonic() < self.retry_at:
            raise ForkServerError("no fork server: the last one did not start")
        try:
            self.server = self._new()
        except ForkServerError as exc:
            log.error("fork server failed", error=str(exc))
            raise
        return self.server

    def _new(self) -> ForkServer:
        """A fork server; ForkServerError, for the caller to tell (start and renew say it once,
        through the command's error and the reload's), if it does not start."""
        try:
            server = ForkServer()
        except ForkServerError:
            self.retry_at = time.monotonic() + 1.0
            raise
        log.info("fork server started", pid=server.pid, package=server.package)
        return server


def _become_subreaper() -> None:
    """Orphans among our descendants (the fork server's workers) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0) != 0:
        number = ctypes.get_errno()
        raise ForkServerError(f"cannot become a child subreaper: {os.strerror(number)}")


def _reap_strays(known: Callable[[], Collection[int]]) -> None:
    """Reap children nobody waits for: a worker whose fork server died before telling its pid
    (then the worker stops by itself: its channel was closed) became ours all the same."""
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no child at all
            return
        if found is None or found.si_pid in known():
            return  # none, or its owner reaps it (a stray behind it waits for the next turn)
        os.waitpid(found.si_pid, 0)
        log.warning("reaped a process no worker was", pid=found.si_pid, code=found.si_status)


if __name__ == "__main__":
    exit_code = main(sys.argv)
    sys.stderr.flush()
    # Without the interpreter's finalization: there is nothing to clean up, and with everything
    # imported it takes a tenth of a second, by which the supervisor's stop or reload waits.
    os._exit(exit_code)
