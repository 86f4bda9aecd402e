"""What the supervisor tells a worker process when it starts it: `WorkerSpec`, sent as JSON on the
worker's command line.

Apart from sockd.worker so that the supervisor can write a spec without importing a model or a
handler: this module needs only the config's models.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from sockd.config import Listener, LoggingConfig


class WorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    listener: Listener
    logging: LoggingConfig
    listen_fd: int
    channel_fd: int
    counters_fd: int  # the shared memory the worker publishes its counts to
    buckets: list[float]  # the request duration histogram's bucket bounds, in seconds
    metrics: bool  # whether anybody will read the counts (else requests are not timed)
    shutdown_timeout: float  # how long a drain may take, even with no supervisor left to end it
    worker_timeout: float  # a request busy for half of this stops the heartbeat (blocking models)
