"""The descriptors the supervisor needs for a config, and the soft limit raised to them."""

from __future__ import annotations

import resource

import structlog

from sockd import metrics
from sockd.config import Config
from sockd.errors import SockdError

log = structlog.get_logger()

# The supervisor's descriptors besides its listeners' and the metrics endpoint's: the standard
# streams, its selector and wake-up pipe, systemd's socket, the fork server's, the reloads'
# outcome (see sockd.reloads), a starting worker's socketpair, an upgrade's handoff (see
# sockd.upgrade), and room to spare.
# Nothing a client does can spend them (the endpoint's connections are capped), so a dead worker
# can always be replaced.
SUPERVISOR_RESERVED_DESCRIPTORS = 32
WORKER_DESCRIPTORS = 3  # its channel, its counters' file, and the mapping's (mmap keeps a duplicate)


class DescriptorLimit(SockdError):
    """The descriptor limit is below what a config needs (see make_room), and cannot be raised."""


def descriptors_needed(config: Config) -> int:
    """The descriptors the supervisor holds for `config`: a socket for each listener and, for
    each of its workers, a channel and the shared counters' memory file (ours, kept for an
    upgrade to hand on, and the mapping's own), twice over (a reload starts the new generation before it
    retires the old one), the metrics endpoint's at their cap, and SUPERVISOR_RESERVED_DESCRIPTORS. (Old
    generations that serve sessions on through a storm of reloads hold more: a worker that
    cannot be started then is retried after a backoff.)"""
    listeners = sum(1 + 2 * WORKER_DESCRIPTORS * listener.workers for listener in config.listeners)
    endpoint = 1 + metrics.MAX_CONNECTIONS + 2 if config.metrics.enabled else 0  # its socket, its socketpair
    return SUPERVISOR_RESERVED_DESCRIPTORS + listeners + endpoint


def make_room(config: Config) -> None:
    """Raise the soft descriptor limit to what `config` needs, as HAProxy does from its maxconn
    (systemd's default soft limit is 1024, under a hard one of 524288, for programs to raise
    themselves); DescriptorLimit if the hard limit is lower."""
    needed = descriptors_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # never unlimited, on Linux
    if soft >= needed:
        return
    if hard < needed:
        count = len(config.listeners)
        raise DescriptorLimit(
            f"the descriptor limit ({hard}) is too low for {count} listener{'s' if count != 1 else ''}: "
            f"the supervisor needs {needed} descriptors; raise LimitNOFILE= (or ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    log.info("raised the descriptor limit", soft=needed, was=soft)
