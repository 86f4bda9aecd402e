"""What a config file may say: frozen pydantic models, each field's type and bounds, and which
options apply beside which values of another field."""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

ProtocolName = Literal["tcp", "udp", "unix"]
HandlerName = Literal["echo", "timestamp", "discard", "daytime", "time", "relay"]
ModelName = Literal["iterative", "threaded", "thread_pool", "busy_poll", "selector", "asyncio"]
# The models that can serve handler: relay (sockd.models.registry checks it agrees).
RELAYING_MODELS: tuple[ModelName, ...] = ("selector", "busy_poll", "asyncio")
SelectorBackend = Literal["auto", "select", "poll", "epoll"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
TimestampFormat = Literal["seed", "iso8601", "unix"]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
UPSTREAM_PATTERN = r"^((tcp|udp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])|unix:///.{1,106})$"
MODE_PATTERN = r"^0?[0-7]{3}$"
ListenerName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Port = Annotated[int, Field(ge=0, le=65535)]
# Every duration is at most a day: longer is a typo (1.0e+10), and timers would overflow on it.
MAX_SECONDS = 86_400.0
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Timeout = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("should be an address block, as in 10.0.0.0/8 or 2001:db8::/32")
    try:
        return ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"not an address block: {exc}") from None


def no_nul(value: str) -> str:
    # The kernel ends a path (and the resolver a name) at a NUL: what would be bound is not what is written.
    if "\0" in value:
        raise ValueError("may not hold a NUL character")
    return value


def host_name(value: str) -> str:
    """An address, or a name getaddrinfo() can be asked for (it raises UnicodeError on a label
    longer than 63 characters, or an empty one)."""
    no_nul(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        try:
            value.encode("idna")
        except UnicodeError as exc:
            raise ValueError(f"not a valid host name: {exc}") from None
    return value


Host = Annotated[str, Field(min_length=1), AfterValidator(host_name)]


def _file_path(value: str) -> str:
    no_nul(value)
    if value.startswith("@"):
        # socat, ss and systemd write Linux's abstract socket names so: refused rather than
        # made a file the clients, looking in the abstract namespace, would never find.
        raise ValueError(
            "a leading @ names a Linux abstract socket, which sockd does not bind: give a file's path"
            " (./@name for a file named so)"
        )
    return value


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_network),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "description": "an address block, as in 10.0.0.0/8"}),
]
# The most a model reads at once: large enough for any UDP datagram (65,507 bytes over IPv4), and
# a good read size for streams.
BUFSIZE = 65536


class _Frozen(BaseModel):
    # strict: YAML already gives types, so `port: true` or `port: "80"` is a mistake, not a 1 or an 80.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


STREAM, INET, TCP, UNIX = ("tcp", "unix"), ("tcp", "udp"), ("tcp",), ("unix",)


# An option that only makes sense beside some values of another field, e.g. `threads` only
# with `concurrency: thread_pool`. Checked when the option is written, so defaults never trip
# it; the owner is validated first (field order), so its value is known by then.
OPTION_SCOPE: dict[str, tuple[str, tuple[str, ...]]] = {
    "threads": ("concurrency", ("thread_pool",)),
    "selector_backend": ("concurrency", ("selector",)),
    "event_loop": ("concurrency", ("asyncio",)),
    "timestamp_format": ("handler", ("timestamp",)),
    "upstream": ("handler", ("relay",)),
    "connect_timeout": ("handler", ("relay",)),
    "half_close_timeout": ("handler", ("relay",)),
    "max_connections": ("protocol", STREAM),
    "first_byte_timeout": ("protocol", STREAM),
    "max_connections_per_source": ("protocol", TCP),
    "connection_rate": ("protocol", TCP),
    "connection_burst": ("protocol", TCP),
    "nodelay": ("protocol", TCP),
    "keepalive": ("protocol", TCP),
    "backlog": ("protocol", STREAM),
    "reuse_port": ("protocol", INET),
    "allow_uids": ("protocol", UNIX),
    "allow_gids": ("protocol", UNIX),
    "log_connections": ("protocol", STREAM),
}


class TLSFiles(_Frozen):
    cert: str
    key: str


class TLSAllow(_Frozen):
    cn: list[str] = []
    dns: list[str] = []
    uri: list[str] = []


class TLSConfig(_Frozen):
    cert: str
    key: str
    client_ca: str | None = None
    client_auth: Literal["none", "optional", "required"] = "none"
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str | None = None
    alpn: list[str] = []
    handshake_timeout: Timeout = 10.0
    sni: dict[str, TLSFiles] = {}
    crl: str | None = None
    allow: TLSAllow | None = None


class _ListenerBase(_Frozen):
    protocol: ProtocolName
    name: ListenerName
    handler: HandlerName
    concurrency: ModelName
    delay: Seconds = 0.0
    workers: Annotated[int, Field(ge=1, le=256)] = 1  # processes serving the one socket
    threads: Annotated[int, Field(ge=1, le=1024)] = 4
    selector_backend: SelectorBackend = "auto"
    event_loop: EventLoop = "auto"
    timestamp_format: TimestampFormat = "seed"
    # handler: relay. Where each client is joined to: tcp://host:port, unix:///path or udp://host:port.
    upstream: Annotated[str, Field(pattern=UPSTREAM_PATTERN), AfterValidator(no_nul)] | None = None
    connect_timeout: Timeout = 5.0
    # Once one side has ended, how long the other may still send (socat's -t).
    half_close_timeout: Seconds = 0.5

    # Limits, each per worker process (as gunicorn's worker_connections); None: no limit.
    max_connections: Count | None = None
    max_connections_per_source: Count | None = None
    connection_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # per source, per second
    connection_burst: Count | None = None  # the rate's bucket size; default: the rate, at least 1
    allow_uids: list[Annotated[int, Field(ge=0)]] = []
    allow_gids: list[Annotated[int, Field(ge=0)]] = []
    idle_timeout: Timeout | None = None  # no byte either way for this long: close (a relay's UDP session: forget)
    first_byte_timeout: Timeout | None = None  # connected, and not a byte sent yet
    max_message_size: Annotated[int, Field(ge=1, le=BUFSIZE)] | None = None
    log_connections: bool = False  # a line as each connection ends (xinetd's log_on_success)
    tls: TLSConfig | None = None

    # Socket options; None: the kernel's default.
    backlog: Annotated[int, Field(ge=1, le=65535)] = 4096
    reuse_port: bool = False
    nodelay: bool = True
    keepalive: bool = False
    recv_buffer: Annotated[int, Field(ge=1024, le=1 << 30)] | None = None
    send_buffer: Annotated[int, Field(ge=1024, le=1 << 30)] | None = None

    @field_validator("event_loop")
    @classmethod
    def _installed(cls, value: EventLoop) -> EventLoop:
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed: pip install uvloop, or use event_loop: asyncio")
        return value

    @field_validator(*OPTION_SCOPE)
    @classmethod
    def _only_where_it_applies(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        owner, wanted = OPTION_SCOPE[info.field_name]
        actual = info.data.get(owner)
        if actual is not None and actual not in wanted:
            raise ValueError(f"only valid with {owner}: {alternatives(wanted)} (this listener has {owner}: {actual})")
        return value

    @property
    def streams(self) -> bool:
        return self.protocol in STREAM

    @property
    def upstream_endpoint(self) -> tuple[str, str | tuple[str, int]]:
        """The relay's upstream as (scheme, path) or (scheme, (host, port))."""
        assert self.upstream is not None
        return upstream_endpoint(self.upstream)


class InetListener(_ListenerBase):
    protocol: Literal["tcp", "udp"]
    host: Host
    port: Port
    # Access by source address: the longest matching prefix of the two lists decides (deny on a
    # tie), as xinetd's only_from/no_access; with `allow` given, a source it does not match is denied.
    allow: list[Network] = []
    deny: list[Network] = []
    ipv6_only: bool | None = None  # IPV6_V6ONLY for an IPv6 host; None: the system default
    freebind: bool = False  # IP_FREEBIND: bind an address that is not (yet) on this host

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)


class UnixListener(_ListenerBase):
    protocol: Literal["unix"]
    # sun_path holds 108 bytes including the terminating NUL.
    path: Annotated[str, Field(min_length=1, max_length=107), AfterValidator(_file_path)]
    mode: Annotated[str, Field(pattern=MODE_PATTERN)] = "0660"

    @field_validator("mode", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        if isinstance(value, int):  # YAML 1.1 reads a bare 0660 as the octal number 432
            raise ValueError(f'must be quoted, as in mode: "0660" (YAML read the bare number as {value})')
        return value

    @property
    def address(self) -> str:
        return self.path

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


Listener = Annotated[InetListener | UnixListener, Field(discriminator="protocol")]
# Each kind of listener, by the protocols it serves.
LISTENER_KINDS: dict[str, type[InetListener | UnixListener]] = {
    "tcp": InetListener,
    "udp": InetListener,
    "unix": UnixListener,
}


# From loopback round trips (tens of microseconds) up to the slowest `delay` worth simulating.
DEFAULT_BUCKETS = [25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3]
DEFAULT_BUCKETS += [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class MetricsConfig(_Frozen):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 9464
    # Upper bounds, in seconds, of sockd_request_duration_seconds's buckets (+Inf is added).
    buckets: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)] = (
        Field(default_factory=lambda: list(DEFAULT_BUCKETS))
    )

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, buckets: list[float]) -> list[float]:
        if any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError("must be in increasing order, each bound once")
        return buckets


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Frozen):
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    shutdown_timeout: Seconds = 10.0
    # A worker whose heartbeat stops (hung, stopped) for this long is killed and replaced.
    worker_timeout: Timeout = 30.0
    listeners: Annotated[list[Listener], Field(min_length=1)]


def alternatives(words: Sequence[str]) -> str:
    """ "a", "a or b", "a, b or c"."""
    return " or ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else words[0]


def upstream_endpoint(upstream: str) -> tuple[str, str | tuple[str, int]]:
    """A relay's `upstream` as (scheme, path) or (scheme, (host, port))."""
    scheme, _, rest = upstream.partition("://")
    if scheme == "unix":
        return scheme, rest
    host, _, port = rest.rpartition(":")
    return scheme, (host.strip("[]"), int(port))


def host_port(host: str, port: int) -> str:
    """An address as people write it: 127.0.0.1:80, [::1]:80."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
