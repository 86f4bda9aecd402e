"""What the supervisor tells a worker process when it starts it: `WorkerSpec`, sent as JSON to the
fork server with the worker's descriptors (see sockd.forkserver), and `WorkerSettings`, the part
of it that is the same for every worker of a config.

Apart from sockd.worker so that the supervisor can write a spec without importing a model or a
handler: this module needs only the config's models, and the TLS material's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sockd.config import Config, Listener, LoggingConfig
from sockd.tls.material import TLSMaterial

# What the supervisor says of the instance as a whole (see sockd.ledger's `state`): serving (up),
# a stop signal come (drain), or a listener without a generation accepting whole (maint).
InstanceState = Literal["up", "drain", "maint"]


class WorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    listener: Listener
    logging: LoggingConfig
    buckets: list[float]  # the request duration histogram's bucket bounds, in seconds
    metrics: bool  # whether anybody will read the counts (else requests are not timed)
    shutdown_timeout: float  # how long a drain may take, even with no supervisor left to end it
    worker_timeout: float  # a request busy for half of this stops the heartbeat (blocking models)
    udp_ports: list[int]  # of every UDP listener's socket: datagrams from them go unanswered
    # The instance's state as of the worker's start, for an agent listener; then said on the
    # channel as it changes (see sockd.worker).
    state: InstanceState
    # The listener's TLS files as read at load (see sockd.tls.contexts.stage_context): a worker reads none.
    tls: TLSMaterial | None = None


@dataclass(frozen=True)
class WorkerSettings:
    """The config's settings that every worker gets, whatever its listener; the supervisor also
    times its workers' drains and heartbeats by them. With them, the ports the config's UDP
    listeners are bound to (the kernel's choice for port 0, systemd's for a socket it passed),
    and the TLS material read with the config, by listener (each worker gets its listener's)."""

    logging: LoggingConfig
    buckets: tuple[float, ...]
    metrics: bool
    shutdown_timeout: float
    reload_drain_timeout: float | None
    worker_timeout: float
    udp_ports: frozenset[int]
    tls: Mapping[str, TLSMaterial]

    @classmethod
    def of(cls, config: Config, tls: Mapping[str, TLSMaterial], udp_ports: frozenset[int]) -> WorkerSettings:
        return cls(
            logging=config.logging,
            buckets=tuple(config.metrics.buckets),
            metrics=config.metrics.enabled,
            shutdown_timeout=config.shutdown_timeout,
            reload_drain_timeout=config.reload_drain_timeout,
            worker_timeout=config.worker_timeout,
            udp_ports=udp_ports,
            tls=tls,
        )

    @property
    def bucket_count(self) -> int:
        """The histogram's buckets in the shared counters: one per bound, and +Inf."""
        return len(self.buckets) + 1

    def spec(self, listener: Listener, state: InstanceState) -> WorkerSpec:
        return WorkerSpec(
            listener=listener,
            logging=self.logging,
            buckets=list(self.buckets),
            metrics=self.metrics,
            shutdown_timeout=self.shutdown_timeout,
            worker_timeout=self.worker_timeout,
            udp_ports=sorted(self.udp_ports),
            state=state,
            tls=self.tls.get(listener.name),
        )
