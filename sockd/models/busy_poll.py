"""The seed's non-blocking busy loop: no call ever waits; every socket is simply tried, again and
again. It answers with the lowest wake-up latency there is and spins a whole core even when idle,
by design. It is the selector model's loop with a selector that reports everything as ready."""

from __future__ import annotations

import os
import selectors
from collections.abc import Mapping
from typing import Any

from sockd.config import Listener
from sockd.counters import Stats
from sockd.handlers import Handler
from sockd.lifecycle import Staging
from sockd.models.selector import EventLoop


class BusySelector(selectors.BaseSelector):
    """Claims every registered file is ready for all it waits for, without asking the kernel:
    the loop learns the truth by trying and getting BlockingIOError."""

    def __init__(self) -> None:
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # Still never waits, but lets another runnable process have the core between passes, so
        # a spinning worker does not starve the rest of the machine.
        os.sched_yield()
        return [(key, key.events) for key in self._keys.values()]

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class Model(EventLoop):
    def __init__(
        self,
        listener: Listener,
        handler: Handler,
        stats: Stats,
        udp_ports: frozenset[int],
        stage: Staging | None = None,
    ) -> None:
        super().__init__(listener, handler, stats, udp_ports, BusySelector, stage=stage)
