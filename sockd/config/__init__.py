"""The configuration file. Each module owns one job:

- schema: what a file may say (frozen pydantic models, types, bounds);
- reader: reading the file and its YAML, hardened against what no config holds;
- recovery: validating, and keeping what validated of a listener that failed in part;
- rules: what a single field's validation cannot see (settings that go together, listeners that
  cannot all be bound);
- problems: ConfigError, and each problem worded and placed as `file:line: field: message`;
- loader: `load` and `parse`, which join them.
"""

from sockd.config.loader import load, parse
from sockd.config.problems import ConfigError
from sockd.config.reader import MAX_FILE_BYTES, MAX_VALUES
from sockd.config.rules import passive_address
from sockd.config.schema import (
    BUFSIZE,
    RELAYING_MODELS,
    Config,
    EventLoop,
    HandlerName,
    InetListener,
    Listener,
    LoggingConfig,
    MetricsConfig,
    ModelName,
    Network,
    ProtocolName,
    SelectorBackend,
    TimestampFormat,
    UnixListener,
)

__all__ = [
    "BUFSIZE",
    "MAX_FILE_BYTES",
    "MAX_VALUES",
    "RELAYING_MODELS",
    "Config",
    "ConfigError",
    "EventLoop",
    "HandlerName",
    "InetListener",
    "Listener",
    "LoggingConfig",
    "MetricsConfig",
    "ModelName",
    "Network",
    "ProtocolName",
    "SelectorBackend",
    "TimestampFormat",
    "UnixListener",
    "load",
    "parse",
    "passive_address",
]
