"""The configuration file. Each module owns one job:

- schema: what a file may say (frozen pydantic models, types, bounds);
- reader: reading the file and its YAML, hardened against what no config holds;
- recovery: validating, and keeping what validated of a listener that failed in part;
- rules: what a single field's validation cannot see (settings that go together, listeners that
  cannot all be bound), and what is valid but worth a warning;
- problems: ConfigError, and each problem worded and placed as `file:line: field: message`;
- loader: `load_document` and `parse`, which join them; a Document places the problems found
  beyond the file (in the TLS files it names: sockd.tls.material) as its own.
"""

from sockd.config.loader import Document, load_document, parse
from sockd.config.problems import ConfigError, Problem, reason
from sockd.config.reader import MAX_FILE_BYTES, MAX_VALUES, read_regular
from sockd.config.rules import config_warnings, passive_address
from sockd.config.schema import (
    BUFSIZE,
    EXEC_MODELS,
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
    ProxyVersion,
    SelectorBackend,
    TimestampFormat,
    TLSConfig,
    TLSFiles,
    UnixListener,
)

__all__ = [
    "BUFSIZE",
    "EXEC_MODELS",
    "MAX_FILE_BYTES",
    "MAX_VALUES",
    "RELAYING_MODELS",
    "Config",
    "ConfigError",
    "Document",
    "EventLoop",
    "HandlerName",
    "InetListener",
    "Listener",
    "LoggingConfig",
    "MetricsConfig",
    "ModelName",
    "Network",
    "Problem",
    "ProtocolName",
    "ProxyVersion",
    "SelectorBackend",
    "TLSConfig",
    "TLSFiles",
    "TimestampFormat",
    "UnixListener",
    "config_warnings",
    "load_document",
    "parse",
    "passive_address",
    "read_regular",
    "reason",
]
