"""The registry of concurrency models: each name the config file accepts, the module that serves
it and what it can do. Modules are imported only when used (so uvloop loads only where asked
for, and the supervisor loads none).

The config's rules own the names as literals (`ModelName`, `RELAYING_MODELS`), so that
sockd.config needs no model to check a file; this module refuses to load if it disagrees with
them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from sockd.config import RELAYING_MODELS, ModelName

if TYPE_CHECKING:
    from sockd.models import Model


@dataclass(frozen=True)
class Kind:
    """A model's entry in the registry: where it lives and what it can do."""

    module: str
    relays: bool = False  # can serve handler: relay (holds two sockets per client)


MODELS: dict[ModelName, Kind] = {
    "iterative": Kind("sockd.models.iterative"),
    "threaded": Kind("sockd.models.threaded"),
    "thread_pool": Kind("sockd.models.thread_pool"),
    "selector": Kind("sockd.models.selector", relays=True),
    "busy_poll": Kind("sockd.models.busy_poll", relays=True),  # the selector's loop, never waiting
    "asyncio": Kind("sockd.models.aio", relays=True),
}

if set(MODELS) != set(get_args(ModelName)) or {name for name, kind in MODELS.items() if kind.relays} != set(
    RELAYING_MODELS
):
    raise ImportError("sockd.models.registry disagrees with sockd.config's ModelName or RELAYING_MODELS")


def load(name: ModelName) -> type[Model]:
    """The model called `name`, its module imported now."""
    model: type[Model] = importlib.import_module(MODELS[name].module).Model
    return model
