"""The `sockd` command (and `python -m sockd`): sockd.cli, once SIGHUP is caught.

Importing sockd's modules takes a fifth of a second, and SIGHUP's default action ends a process:
a reload sent the moment sockd starts (a config manager's, say) would kill it. So SIGHUP is
queued from the first instant, and the supervisor, which takes the queue over (see
Supervisor.run), acts on it once it serves. SIGTERM and SIGINT keep their default until then:
stopping before anything serves is what they ask.
"""

from __future__ import annotations

import collections
import signal
import sys


def main() -> int:
    caught: collections.deque[int] = collections.deque()
    signal.signal(signal.SIGHUP, lambda signum, _: caught.append(signum))
    from sockd import cli  # noqa: PLC0415 (imported once SIGHUP is caught: see above)

    return cli.main(signals=caught)


if __name__ == "__main__":
    sys.exit(main())
