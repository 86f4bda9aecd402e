"""handler: exec, against the real daemon running real programs: the connection is the child's
stdin and stdout, its environment and descriptors are only those promised, its stderr is logged,
its end is counted, and the worker reaps every child it started."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sockd.config.schema import ExecLimits

from support import (
    CA,
    SERVER_NAME,
    STDLIB_LOOP,
    TIMEOUT,
    Daemon,
    Launcher,
    alive,
    children,
    connect,
    eventually,
    model_options,
    read_to_eof,
    run_sockd,
    samples,
    value,
    write_config,
)
from support import listener as entry
from support.tls import client_context

LOOPS = ["asyncio", STDLIB_LOOP]  # uvloop (the default, if installed) and the standard library's


def exec_listener(command: list[str], model: str = "asyncio", **options: Any) -> dict[str, Any]:
    concurrency, extra = model_options(model)
    return entry("x", "tcp", "exec", concurrency, command=command, **extra, **options)


def exits(daemon: Daemon, result: str) -> float:
    return value(samples(daemon), "sockd_exec_exits_total", listener="x", result=result)


def reaped(daemon: Daemon) -> None:
    """No child of the worker is left, zombie or not."""
    worker = daemon.worker_pid("x")
    eventually(lambda: not children(worker), "every child reaped")


def script(directory: Path, body: str) -> str:
    path = directory / "child.py"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("model", LOOPS)
def test_cat_echoes_8_mib_byte_exact_with_half_close(start_sockd: Launcher, model: str) -> None:
    daemon = start_sockd([exec_listener(["/bin/cat"], model)])
    payload = os.urandom(8 << 20)
    with connect(daemon.address("x")) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # cat sees EOF, writes what it holds and exits: our EOF

        sender = threading.Thread(target=send)
        sender.start()
        echoed = read_to_eof(sock)
        sender.join(TIMEOUT)
    assert echoed == payload
    eventually(lambda: exits(daemon, "ok") == 1, "the exit counted ok")
    assert value(samples(daemon), "sockd_request_duration_seconds_count", listener="x") == 1
    reaped(daemon)


def test_environment_descriptors_limits_stderr_and_exit_code(start_sockd: Launcher, tmp_path: Path) -> None:
    program = script(
        tmp_path,
        """import json, os, sys
print(json.dumps({
    "env": dict(os.environ),
    "fds": sorted(os.listdir("/proc/self/fd"), key=int),
    "cwd": os.getcwd(),
    "limits": [line for line in open("/proc/self/limits") if line.startswith(("Max cpu", "Max open", "Max address"))],
}), flush=True)
sys.stderr.write("first line\\nsecond line\\n")
sys.exit(3)
""",
    )
    # LC_ALL, or the interpreter would add LC_CTYPE to its own environment (PEP 538).
    options: dict[str, Any] = {"env": {"LC_ALL": "C.UTF-8"}, "limits": {"cpu": 60, "memory": "256MiB", "files": 64}}
    daemon = start_sockd([exec_listener([program], log_connections=True, cwd=str(tmp_path), **options)])
    with connect(daemon.address("x")) as sock:
        said = json.loads(read_to_eof(sock))
        local, remote = sock.getsockname(), sock.getpeername()
    assert said["env"] == {
        "LC_ALL": "C.UTF-8",
        "SOCKD_LISTENER": "x",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(local[1]),
        "LOCAL_ADDR": "127.0.0.1",
        "LOCAL_PORT": str(remote[1]),
    }
    assert said["fds"] == ["0", "1", "2", "3"]  # 3: the listing's own
    assert said["cwd"] == str(tmp_path)
    limits = {" ".join(line.split()[:3]): line.split()[3:5] for line in said["limits"]}
    assert limits == {
        "Max cpu time": ["60", "60"],
        "Max open files": ["64", "64"],
        "Max address space": [str(256 << 20)] * 2,
    }
    eventually(lambda: exits(daemon, "error") == 1, "exit 3 counted as error")
    closed = daemon.wait_for("connection closed", listener="x")
    assert closed["ended"] == "exit 3"
    for line in ("first line", "second line"):
        logged = daemon.wait_for("child stderr", line=line)
        assert logged["child"] == closed["child"]
        assert logged["listener"] == "x"
    reaped(daemon)


def test_a_unix_listeners_child_gets_the_sockets_path_and_no_ports(start_sockd: Launcher, sockdir: Path) -> None:
    path = sockdir / "x.sock"
    command = ["/usr/bin/env"]  # prints its environment: what sockd gave it
    daemon = start_sockd([entry("x", "unix", "exec", "asyncio", path, command=command)])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        said = read_to_eof(sock).decode()
    assert sorted(said.splitlines()) == [f"LOCAL_ADDR={path}", "SOCKD_LISTENER=x"]
    reaped(daemon)


def test_stderr_lines_are_bounded_in_length_and_rate(start_sockd: Launcher, tmp_path: Path) -> None:
    program = script(tmp_path, "import sys\nsys.stderr.write('x' * 5000 + '\\n' + 'line\\n' * 1000)\n")
    daemon = start_sockd([exec_listener([program])])
    with connect(daemon.address("x")) as sock:
        assert read_to_eof(sock) == b""
    eventually(lambda: exits(daemon, "ok") == 1, "the exit counted")
    long = daemon.wait_for("child stderr", truncated=True)
    assert long["line"] == "x" * 1024
    daemon.wait_for("child stderr lines dropped: more than the log takes")
    logged = [event for event in daemon.events if event.get("event") == "child stderr"]
    assert len(logged) < 1001  # the burst (200), and what the rate (100 a second) let through since
    reaped(daemon)


def test_a_child_past_exec_timeout_is_killed_and_counted(start_sockd: Launcher, tmp_path: Path) -> None:
    # It ignores SIGTERM, so it takes the SIGKILL; its grandchild (the sleep) goes with its group.
    program = script(
        tmp_path, "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.system('sleep 60')\n"
    )
    daemon = start_sockd([exec_listener([program], exec_timeout=0.5)])
    with connect(daemon.address("x")) as sock:
        assert read_to_eof(sock) == b""
    eventually(lambda: exits(daemon, "timeout") == 1, "the timeout counted", timeout=TIMEOUT)
    reaped(daemon)


def test_a_signalled_child_is_counted_signal(start_sockd: Launcher) -> None:
    daemon = start_sockd([exec_listener(["/bin/sh", "-c", "kill -TERM $$"])])
    with connect(daemon.address("x")) as sock:
        assert read_to_eof(sock) == b""
    eventually(lambda: exits(daemon, "signal") == 1, "the signal counted")
    reaped(daemon)


def test_a_program_gone_since_the_check_is_counted_failed(start_sockd: Launcher, tmp_path: Path) -> None:
    program = script(tmp_path, "")
    daemon = start_sockd([exec_listener([program])])
    os.unlink(program)
    with connect(daemon.address("x")) as sock:
        assert read_to_eof(sock) == b""
    eventually(lambda: exits(daemon, "failed") == 1, "the failure counted")
    daemon.wait_for("exec failed: the program could not start", command=program)
    assert value(samples(daemon), "sockd_connections_active", listener="x") == 0


def test_200_clients_against_max_connections_50(start_sockd: Launcher, tmp_path: Path) -> None:
    """Every client is served, the ones past the limit waiting in the backlog; each child records
    itself while it runs, so the most at once is counted, not sampled."""
    running = tmp_path / "running"
    running.mkdir()
    # Each child registers (a file named by its pid), echoes its line, and leaves its registration
    # only after it has seen how many are registered: the most any saw is the most at once.
    body = f"""import os, sys
me = os.path.join({str(running)!r}, str(os.getpid()))
open(me, "w").close()
seen = len(os.listdir({str(running)!r}))
line = sys.stdin.buffer.readline()
os.unlink(me)
sys.stdout.buffer.write(line.strip() + b" %d\\n" % seen)
"""
    daemon = start_sockd([exec_listener([script(tmp_path, body)], max_connections=50, backlog=256)])
    address = daemon.address("x")
    clients = [connect(address) for _ in range(200)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(b"%d\n" % number)
        answers = [read_to_eof(sock).split() for sock in clients]
    finally:
        for sock in clients:
            sock.close()
    assert [int(answer[0]) for answer in answers] == list(range(200))
    most = max(int(answer[1]) for answer in answers)
    assert 1 <= most <= 50
    eventually(lambda: exits(daemon, "ok") == 200, "every exit counted")
    assert value(samples(daemon), "sockd_connections_rejected_total", listener="x", reason="max_connections") == 0
    reaped(daemon)


def test_a_stop_ends_the_children_still_running(start_sockd: Launcher) -> None:
    daemon = start_sockd([exec_listener(["/bin/sleep", "60"])], shutdown_timeout=1.0)
    worker = daemon.worker_pid("x")
    with connect(daemon.address("x")) as sock:
        eventually(lambda: len(children(worker)) == 1, "the child running")
        (child,) = children(worker)
        assert daemon.stop() == 0
        assert read_to_eof(sock) == b""
    assert not os.path.exists(f"/proc/{child}")  # ended and reaped before its worker exited


def test_a_reload_leaves_a_running_child_its_session(start_sockd: Launcher) -> None:
    listeners = [exec_listener(["/bin/cat"])]
    daemon = start_sockd(listeners)
    old = daemon.worker_pid("x")
    with connect(daemon.address("x")) as sock:
        assert echo_line(sock, b"before\n") == b"before\n"
        plan = daemon.reload([exec_listener(["/bin/cat"], exec_timeout=60)])
        assert plan["restarted"] == ["x"]
        assert echo_line(sock, b"after\n") == b"after\n"  # the same child, through its old worker
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    eventually(lambda: not alive(old), "the old worker gone once its child was reaped")
    eventually(lambda: exits(daemon, "ok") == 1, "the exit counted")


def test_300_clients_keep_their_children_for_many_lines_through_a_reload_under_1024_descriptors(
    start_sockd: Launcher,
) -> None:
    """The default descriptor limit: each child costs its worker two descriptors (its pidfd and
    its stderr pipe), so 300 at once fit in 1,024, and each client keeps its child for 20 lines,
    a reload coming halfway."""
    listeners = [exec_listener(["/bin/cat"], max_connections=400, backlog=512)]
    daemon = start_sockd(listeners, prefix=("prlimit", "--nofile=1024"))
    old = daemon.worker_pid("x")
    clients = [connect(daemon.address("x")) for _ in range(300)]
    try:
        for line in range(20):
            if line == 10:
                plan = daemon.reload([exec_listener(["/bin/cat"], max_connections=400, backlog=512, exec_timeout=60)])
                assert plan["restarted"] == ["x"]
            for number, sock in enumerate(clients):
                said = b"%d %d\n" % (number, line)
                assert echo_line(sock, said) == said
        assert len(children(old)) == 300  # every session still its first child, in the old worker
    finally:
        for sock in clients:
            sock.close()
    eventually(lambda: not alive(old), "the old worker gone once its children were reaped")
    eventually(lambda: exits(daemon, "ok") == 300, "every exit counted")
    assert value(samples(daemon), "sockd_worker_restarts_total", listener="x") == 0


def echo_line(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    got = b""
    while not got.endswith(b"\n"):
        got += sock.recv(4096)
    return got


def test_a_missing_or_not_executable_program_is_a_config_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    path = write_config(
        tmp_path,
        f"""listeners:
  - name: x
    protocol: tcp
    host: 127.0.0.1
    port: 0
    handler: exec
    concurrency: asyncio
    command: [/nonexistent/fingerd]
  - name: y
    protocol: unix
    path: {tmp_path}/y.sock
    handler: exec
    concurrency: asyncio
    command: [{plain}]
""",
    )
    done = run_sockd("--check", "-c", str(path))
    assert done.returncode == 78
    assert done.stderr.splitlines() == [
        f"{path}:8: listeners[0].command: /nonexistent/fingerd does not exist",
        f"{path}:14: listeners[1].command: {plain} is not executable",
    ]


@pytest.mark.parametrize(
    ("option", "line", "message"),
    [
        ("protocol: udp", 6, "listeners[0].handler: exec serves streams only"),
        ("concurrency: selector", 7, "listeners[0].concurrency: handler: exec needs concurrency: asyncio"),
        ("idle_timeout: 5", 9, "listeners[0].idle_timeout: not valid with handler: exec"),
        ("limits: {memory: 12 parsecs}", 9, "listeners[0].limits.memory: not a size: '12 parsecs'"),
    ],
)
def test_what_exec_cannot_serve_is_a_config_error(tmp_path: Path, option: str, line: int, message: str) -> None:
    fields = {"protocol": "tcp", "concurrency": "asyncio"}
    extra = ""
    key, _, setting = option.partition(": ")
    if key in fields:
        fields[key] = setting
    else:
        extra = f"    {option}\n"
    path = write_config(
        tmp_path,
        f"""listeners:
  - name: x
    protocol: {fields["protocol"]}
    host: 127.0.0.1
    port: 0
    handler: exec
    concurrency: {fields["concurrency"]}
    command: [/bin/cat]
{extra}""",
    )
    done = run_sockd("--check", "-c", str(path))
    assert done.returncode == 78
    assert done.stderr.startswith(f"{path}:{line}: {message}"), done.stderr


def test_sizes_take_units() -> None:
    assert ExecLimits.model_validate({"memory": "256MiB"}).memory == 256 << 20
    assert ExecLimits.model_validate({"memory": "1.5G"}).memory == 1_500_000_000
    assert ExecLimits.model_validate({"memory": 4096}).memory == 4096


def test_children_start_with_default_signal_dispositions(start_sockd: Launcher) -> None:
    # The worker ignores SIGPIPE, SIGINT, SIGHUP and SIGUSR2; an exec would pass that on.
    daemon = start_sockd([exec_listener(["/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"])])
    with connect(daemon.address("x")) as sock:
        said = read_to_eof(sock).decode()
    masks = {line.split()[0]: int(line.split()[1], 16) for line in said.splitlines()}
    # The standard signals (glibc keeps its own real-time ones, 32 and 33, for itself).
    assert {name: mask & (1 << 31) - 1 for name, mask in masks.items()} == {"SigBlk:": 0, "SigIgn:": 0}
    reaped(daemon)


# -- behind a stage: the child's bytes copied through a socketpair


ENV_PROGRAM = """import json, os, sys
line = sys.stdin.buffer.readline()
print(json.dumps({"line": line.decode(), "env": dict(os.environ)}), flush=True)
sys.stdout.buffer.write(sys.stdin.buffer.read())
"""


@pytest.mark.parametrize("model", LOOPS)
def test_behind_a_proxy_header_the_child_sees_the_client_it_names(
    start_sockd: Launcher, tmp_path: Path, model: str
) -> None:
    program = script(tmp_path, ENV_PROGRAM)
    daemon = start_sockd(
        [exec_listener([program], model, proxy_protocol="v1", proxy_trusted=["127.0.0.0/8"], env={"LC_ALL": "C"})]
    )
    payload = os.urandom(1 << 20)
    with connect(daemon.address("x")) as sock:
        # What follows the header in the same segment is the stage's to pass on, not lost.
        sock.sendall(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8080\r\nhello\n" + payload)
        sock.shutdown(socket.SHUT_WR)
        said = read_to_eof(sock)
    first, rest = said.split(b"\n", 1)
    answer = json.loads(first)
    assert answer["line"] == "hello\n"
    assert answer["env"] == {
        "LC_ALL": "C",
        "SOCKD_LISTENER": "x",
        "REMOTE_ADDR": "192.0.2.7",
        "REMOTE_PORT": "51000",
        "LOCAL_ADDR": "10.0.0.1",
        "LOCAL_PORT": "8080",
    }
    assert rest == payload  # half-closed through the copy, byte-exact
    eventually(lambda: exits(daemon, "ok") == 1, "the exit counted ok")
    reaped(daemon)


def test_over_tls_the_child_gets_the_plaintext_and_the_clients_name(
    start_sockd: Launcher, tmp_path: Path, tls_ca: CA
) -> None:
    program = script(tmp_path, ENV_PROGRAM)
    ca = tls_ca.write(tmp_path)
    server = tls_ca.server().write(tmp_path, "server")
    client = tls_ca.client("exec-client").write(tmp_path, "client")
    tls = {"cert": str(server.cert), "key": str(server.key), "client_auth": "required", "client_ca": str(ca)}
    daemon = start_sockd([exec_listener([program], tls=tls, env={"LC_ALL": "C"})])
    context = client_context(ca, "1.3", cert=client)
    with context.wrap_socket(connect(daemon.address("x")), server_hostname=SERVER_NAME) as sock:
        sock.sendall(b"over tls\n")
        first = b""
        while not first.endswith(b"\n"):
            first += sock.recv(65536)
    answer = json.loads(first)
    assert answer["line"] == "over tls\n"
    env = answer["env"]
    assert env["SSL_CLIENT_S_DN_CN"] == "exec-client"
    assert env["SSL_PROTOCOL"] == "TLSv1.3"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    eventually(lambda: exits(daemon, "ok") + exits(daemon, "error") == 1, "the exit counted")
    reaped(daemon)


def test_behind_a_stage_the_log_line_ends_with_the_childs_exit(start_sockd: Launcher, tmp_path: Path) -> None:
    # The copy sees the child end its output (`upstream closed`) well before the child exits:
    # the line says how the child ended.
    body = """import socket, sys
sys.stdout.write(sys.stdin.readline())
sys.stdout.flush()
socket.socket(fileno=1).shutdown(socket.SHUT_WR)
sys.stdin.read()
sys.exit(3)
"""
    program = script(tmp_path, body)
    options: dict[str, Any] = {"proxy_protocol": "v1", "proxy_trusted": ["127.0.0.0/8"], "log_connections": True}
    daemon = start_sockd([exec_listener([program], **options)])
    with connect(daemon.address("x")) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8080\r\nhello\n")
        assert read_to_eof(sock) == b"hello\n"
        sock.shutdown(socket.SHUT_WR)  # the child reads to its end, then exits
    closed = daemon.wait_for("connection closed", listener="x")
    assert closed["ended"] == "exit 3"
    assert closed["requests"] == 1
    eventually(lambda: exits(daemon, "error") == 1, "exit 3 counted as error")
    assert value(samples(daemon), "sockd_requests_total", listener="x") == 1
    reaped(daemon)


def test_behind_a_stage_a_child_that_cannot_start_is_counted_failed_only(start_sockd: Launcher, tmp_path: Path) -> None:
    program = script(tmp_path, "")
    options: dict[str, Any] = {"proxy_protocol": "v1", "proxy_trusted": ["127.0.0.0/8"], "log_connections": True}
    daemon = start_sockd([exec_listener([program], **options)])
    os.unlink(program)
    with connect(daemon.address("x")) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 8080\r\nhello\n")
        assert read_to_eof(sock) == b""
    closed = daemon.wait_for("connection closed", listener="x")
    assert (closed["ended"], closed["requests"]) == ("failed", 0)
    eventually(lambda: exits(daemon, "failed") == 1, "the failure counted")
    assert value(samples(daemon), "sockd_requests_total", listener="x") == 0
    assert value(samples(daemon), "sockd_connections_active", listener="x") == 0
