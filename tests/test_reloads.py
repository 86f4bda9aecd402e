"""`sockd reload PID` (sockd.reloads), the unit's ExecReload=: it sends SIGHUP and waits for the
outcome, exiting 0 once the reload is applied and 1 with the reason when it was refused. The real
daemon, the real command."""

from __future__ import annotations

import subprocess

from test_forkserver import fork_server, limit_leaving

from support import Launcher, request, run_sockd
from support import listener as entry


def test_a_good_file_is_reloaded_and_says_what_changed(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    daemon.write_config([entry("echo", "tcp", "echo", "selector")])
    done = run_sockd("reload", str(daemon.process.pid))
    assert (done.returncode, done.stdout, done.stderr) == (0, "reloaded: restarted 1\n", "")
    assert daemon.wait_for("reloaded")["restarted"] == ["echo"]  # done by the time it exited
    assert request(daemon.address("echo"), b"new") == b"new"


def test_a_bad_file_fails_with_the_reason_and_the_old_config_serves_on(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    daemon.config_path.write_text("listeners: [\n")
    done = run_sockd("reload", str(daemon.process.pid))
    assert done.returncode == 1, done
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"sockd reload: reload failed, still serving the previous config: {daemon.config_path}:2: invalid YAML: "
    ), line
    assert request(daemon.address("echo"), b"old") == b"old"


def test_new_workers_that_cannot_start_fail_it_and_the_old_ones_serve_on(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    server = fork_server(daemon)
    subprocess.run(["prlimit", f"--pid={server}", f"--nofile={limit_leaving(server, 0)}:"], check=True)
    daemon.write_config([entry("echo", "tcp", "echo", "selector")])
    done = run_sockd("reload", str(daemon.process.pid))
    subprocess.run(["prlimit", f"--pid={server}", "--nofile=1024:"], check=True)
    assert (done.returncode, done.stdout) == (1, ""), done
    assert done.stderr == "sockd reload: reload failed in part: no new workers for echo; the old ones serve on\n"
    assert request(daemon.address("echo"), b"old") == b"old"


def test_reloads_one_after_another_each_wait_for_their_own(start_sockd: Launcher) -> None:
    daemon = start_sockd([entry("echo", "tcp", "echo", "asyncio")])
    for model in ("selector", "threaded", "selector"):
        daemon.write_config([entry("echo", "tcp", "echo", model)])
        mark = len(daemon.events)
        assert run_sockd("reload", str(daemon.process.pid)).stdout == "reloaded: restarted 1\n"
        assert daemon.wait_for("listening", concurrency=model, after=mark)
    daemon.write_config([entry("echo", "tcp", "echo", "selector")])
    assert run_sockd("reload", str(daemon.process.pid)).stdout == "reloaded: kept 1\n"


def test_a_process_that_is_not_sockd_is_not_signalled() -> None:
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            done = run_sockd("reload", str(other.pid))
            assert done.returncode == 69, done
            assert done.stderr.startswith(f"sockd reload: no sockd supervisor with pid {other.pid}: "), done.stderr
            assert other.poll() is None  # no SIGHUP, which would have ended it
        finally:
            other.kill()
