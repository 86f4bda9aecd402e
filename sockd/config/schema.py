"""What a config file may say: frozen pydantic models, each field's type and bounds, and which
options apply beside which values of another field."""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from sockd import privileges

ProtocolName = Literal["tcp", "udp", "unix"]
HandlerName = Literal["echo", "timestamp", "discard", "daytime", "time", "chargen", "relay", "agent", "exec"]
ModelName = Literal["iterative", "threaded", "thread_pool", "busy_poll", "selector", "asyncio"]
# The models that can serve handler: relay (sockd.models.registry checks it agrees).
RELAYING_MODELS: tuple[ModelName, ...] = ("selector", "busy_poll", "asyncio")
# The models that can serve handler: exec (sockd.exec): an event loop that watches each child's
# pidfd and stderr beside its connections.
EXEC_MODELS: tuple[ModelName, ...] = ("asyncio",)
SelectorBackend = Literal["auto", "select", "poll", "epoll"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
TimestampFormat = Literal["seed", "iso8601", "unix"]
ProxyVersion = Literal["v1", "v2", "any"]
UpstreamProxyVersion = Literal["v1", "v2"]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
UPSTREAM_PATTERN = r"^((tcp|tls|udp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])|unix:///.{1,106})$"
MODE_PATTERN = r"^0?[0-7]{3}$"
ListenerName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Port = Annotated[int, Field(ge=0, le=65535)]
# Every duration is at most a day: longer is a typo (1.0e+10), and timers would overflow on it.
MAX_SECONDS = 86_400.0
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Timeout = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
# A user or group, by name or number, as looked up at load (see sockd.privileges): the id.
AccountId = Annotated[
    int,
    Field(ge=0, le=privileges.MAX_ID),
    WithJsonSchema({"type": ["string", "integer"], "description": "a name, or a number"}),
]


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


# A file the config names (a TLS certificate, key, CA bundle or CRL); a relative path is taken from
# sockd's working directory (/ under systemd). PATH_MAX is 4,096 bytes with the terminating NUL.
FilePath = Annotated[str, Field(min_length=1, max_length=4095), AfterValidator(no_nul)]


def _quoted(example: str) -> Callable[[object], object]:
    """A check, before a string's, of a field that YAML reads as a number unless it is quoted."""

    def check(value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f"must be quoted, as in {example} (YAML read the bare number as {value})")
        return value

    return check


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


STREAM, INET, TCP, UDP, UNIX = ("tcp", "unix"), ("tcp", "udp"), ("tcp",), ("udp",), ("unix",)


# -- TLS (the files named here are read and checked by sockd.tls.material)

ClientAuth = Literal["none", "optional", "required"]
TLSVersion = Literal["1.2", "1.3"]
VERIFYING: tuple[ClientAuth, ...] = ("optional", "required")


def _alpn_name(value: str) -> str:
    # Python's ssl sends each name as ASCII bytes; the protocol gives a name 1 to 255 bytes.
    if not value.isascii() or not 1 <= len(value) <= 255:
        raise ValueError("an ALPN protocol name is 1 to 255 ASCII characters")
    return no_nul(value)


def _sni_name(value: str) -> str:
    """A name a client asks for by SNI: a host name, not an address (SNI carries no address)."""
    host_name(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value
    raise ValueError("an address: SNI carries only host names, a client connecting to an address sends none")


ServerName = Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_sni_name)]
Identity = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(no_nul)]


class TLSFiles(_Frozen):
    """A certificate chain (leaf first) and its key."""

    cert: FilePath
    key: FilePath


class TLSAllow(_Frozen):
    """Which verified clients may in: any that matches one of the names (ghostunnel's --allow-*)."""

    cn: list[Identity] = []  # the subject's common name
    dns: list[Identity] = []  # a DNS name among its SANs
    uri: list[Identity] = []  # a URI among its SANs (SPIFFE IDs)

    @model_validator(mode="after")
    def _some(self) -> TLSAllow:
        if not (self.cn or self.dns or self.uri):
            raise ValueError("names no client: give cn, dns or uri (without allow, any verified client may in)")
        return self


class TLSConfig(_Frozen):
    """A stream listener's TLS: it serves TLS on every connection, the handshake before the handler."""

    cert: FilePath  # the certificate chain, leaf first
    key: FilePath
    client_auth: ClientAuth = "none"  # with optional or required, client_ca too (see sockd.config.rules)
    client_ca: FilePath | None = None  # the CA bundle client certificates are verified against
    min_version: Annotated[TLSVersion, BeforeValidator(_quoted('min_version: "1.2"'))] = "1.2"
    ciphers: Annotated[str, Field(min_length=1), AfterValidator(no_nul)] | None = None  # OpenSSL's, for TLS 1.2
    alpn: Annotated[list[Annotated[str, AfterValidator(_alpn_name)]], Field(max_length=64)] = []
    handshake_timeout: Timeout = 10.0
    sni: dict[ServerName, TLSFiles] = {}  # other certificates, by the server name a client asks for
    crl: FilePath | None = None  # revoked client certificates
    allow: TLSAllow | None = None

    @field_validator("ciphers")
    @classmethod
    def _ciphers(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("min_version") == "1.3":
            raise ValueError(
                'only valid with min_version: "1.2" (TLS 1.3\'s cipher suites are not chosen by this string)'
            )
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise ValueError(
                f"no cipher matches {value!r}: give an OpenSSL cipher list, as `openssl ciphers` reads"
            ) from None
        return value

    @field_validator("sni")
    @classmethod
    def _distinct(cls, value: dict[str, TLSFiles]) -> dict[str, TLSFiles]:
        seen: dict[str, str] = {}
        for name in value:
            first = seen.setdefault(name.lower(), name)
            if first != name:
                raise ValueError(f"{name!r} and {first!r} are one name: names are matched without regard to case")
        return value

    @field_validator("client_ca", "crl", "allow")
    @classmethod
    def _verifying(cls, value: object, info: ValidationInfo) -> object:
        # Checked when written (a default never trips it), after client_auth (field order).
        client_auth = info.data.get("client_auth")
        if value is not None and client_auth is not None and client_auth not in VERIFYING:
            raise ValueError(
                "only valid with client_auth: optional or required"
                f" (this listener has client_auth: {client_auth}: no client certificate is asked for)"
            )
        return value


# -- handler: exec (sockd.exec)

SIZE_UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20}
SIZE_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def _size(value: object) -> object:
    """A byte count: a number, or a string with a unit (256MiB, 1.5GB, 64k)."""
    if not isinstance(value, str):
        return value
    number, unit = value.strip(), ""
    while number and not (number[-1].isdigit() or number[-1] == "."):
        number, unit = number[:-1], number[-1] + unit
    try:
        return round(float(number) * SIZE_UNITS[unit.strip().lower()])
    except (ValueError, KeyError):
        raise ValueError(
            f"not a size: {value!r} (a number of bytes, or with a unit: k, M, G (powers of 1000) or KiB, MiB, GiB)"
        ) from None


Size = Annotated[int, BeforeValidator(_size), Field(ge=1)]


class ExecLimits(_Frozen):
    """A child's resource limits (xinetd's rlimit_cpu, rlimit_as, rlimit_files): soft and hard."""

    cpu: Count | None = None  # seconds of CPU (RLIMIT_CPU): SIGXCPU, then SIGKILL
    memory: Size | None = None  # address space in bytes (RLIMIT_AS)
    files: Count | None = None  # open descriptors (RLIMIT_NOFILE)


# execve() takes C strings: a NUL would end an argument where the config does not.
Argument = Annotated[str, AfterValidator(no_nul)]
EnvName = Annotated[str, Field(min_length=1, pattern=r"^[^=\x00]+$")]


# Why an option that applies to streams alone has no meaning over UDP.
OVER_STREAMS = {
    "tls": "DTLS, TLS over UDP, is out of scope",
    "proxy_protocol": "the PROXY protocol over UDP is out of scope",
    "upstream_proxy_protocol": "its header begins a stream, and UDP has none",
}


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
    "upstream_ca": ("handler", ("relay",)),
    "upstream_server_name": ("handler", ("relay",)),
    "upstream_cert": ("handler", ("relay",)),
    "upstream_key": ("handler", ("relay",)),
    "upstream_proxy_protocol": ("handler", ("relay",)),
    "command": ("handler", ("exec",)),
    "env": ("handler", ("exec",)),
    "cwd": ("handler", ("exec",)),
    "exec_timeout": ("handler", ("exec",)),
    "limits": ("handler", ("exec",)),
    "max_connections": ("protocol", STREAM),
    "first_byte_timeout": ("protocol", STREAM),
    "max_connections_per_source": ("protocol", TCP),
    "connection_rate": ("protocol", TCP),
    "connection_burst": ("protocol", TCP),
    "datagram_rate": ("protocol", UDP),
    "datagram_burst": ("protocol", UDP),
    "nodelay": ("protocol", TCP),
    "keepalive": ("protocol", TCP),
    "backlog": ("protocol", STREAM),
    "reuse_port": ("protocol", INET),
    "allow_uids": ("protocol", UNIX),
    "allow_gids": ("protocol", UNIX),
    "log_connections": ("protocol", STREAM),
}


class _ListenerBase(_Frozen):
    protocol: ProtocolName
    name: ListenerName
    handler: HandlerName
    concurrency: ModelName
    delay: Seconds = 0.0
    workers: Annotated[int, Field(ge=1, le=256)] = 1  # processes serving the one socket
    # Whom the workers run as (sockd.privileges): the supervisor binds as root, each worker then
    # drops to this user with this group alone (by default, the user's own). None: as sockd runs.
    user: AccountId | None = None
    group: AccountId | None = Field(default=None, validate_default=True)
    threads: Annotated[int, Field(ge=1, le=1024)] = 4
    selector_backend: SelectorBackend = "auto"
    event_loop: EventLoop = "auto"
    timestamp_format: TimestampFormat = "seed"
    # handler: relay. Where each client is joined to: tcp://host:port, tls://host:port (TCP, TLS
    # originated by sockd), unix:///path or udp://host:port.
    upstream: Annotated[str, Field(pattern=UPSTREAM_PATTERN), AfterValidator(no_nul)] | None = None
    connect_timeout: Timeout = 5.0
    # Once one side has ended, how long the other may still send (socat's -t).
    half_close_timeout: Seconds = 0.5
    # A tls:// upstream: verified against these CAs (None: the system's), by this name (None: the
    # upstream's host), and shown this client certificate (stunnel's client mode), if given.
    upstream_ca: FilePath | None = None
    upstream_server_name: Host | None = None
    upstream_cert: FilePath | None = None
    upstream_key: FilePath | None = None
    # The PROXY protocol's header sent to the upstream before the client's bytes (HAProxy's
    # send-proxy, send-proxy-v2), naming the client; a stream relay's only (see _over_streams).
    upstream_proxy_protocol: UpstreamProxyVersion | None = None
    # handler: exec. The program each connection runs (an absolute path, then its arguments: no
    # shell), what its environment holds beside what sockd sets, where it runs, how long it may
    # run (SIGTERM, then SIGKILL KILL_AFTER later: sockd.exec) and its resource limits.
    command: Annotated[list[Argument], Field(min_length=1)] | None = None
    env: dict[EnvName, Argument] = {}
    cwd: FilePath | None = None
    exec_timeout: Timeout = 300.0
    limits: ExecLimits | None = None

    # Limits, each per worker process (as gunicorn's worker_connections); None: no limit.
    max_connections: Count | None = None
    max_connections_per_source: Count | None = None
    connection_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # per source, per second
    connection_burst: Count | None = None  # the rate's bucket size; default: the rate, at least 1
    # Datagrams answered per source, per second (udp): bounds what a reflection through this
    # listener sends its victim, whatever source the datagrams forge (see README, Handlers: Amplification).
    datagram_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    datagram_burst: Count | None = None  # as connection_burst, for datagram_rate
    allow_uids: list[Annotated[int, Field(ge=0)]] = []
    allow_gids: list[Annotated[int, Field(ge=0)]] = []
    idle_timeout: Timeout | None = None  # no byte either way for this long: close (a relay's UDP session: forget)
    first_byte_timeout: Timeout | None = None  # connected, and not a byte sent yet
    max_message_size: Annotated[int, Field(ge=1, le=BUFSIZE)] | None = None
    log_connections: bool = False  # a line as each connection ends (xinetd's log_on_success)
    tls: TLSConfig | None = None
    # The PROXY protocol (sockd.proxy): a header before each client's bytes names the client, and
    # is its source for everything (access rules, per-source limits, logs). Taken only from the
    # balancers `proxy_trusted` names (a tcp listener's; a Unix listener's peers are trusted by
    # allow_uids/allow_gids or its file's mode), within proxy_timeout.
    proxy_protocol: ProxyVersion | None = None
    proxy_trusted: list[Network] = []
    proxy_timeout: Timeout = 3.0

    # Socket options; None: the kernel's default.
    backlog: Annotated[int, Field(ge=1, le=65535)] = 4096
    reuse_port: bool = False
    nodelay: bool = True
    keepalive: bool = False
    recv_buffer: Annotated[int, Field(ge=1024, le=1 << 30)] | None = None
    send_buffer: Annotated[int, Field(ge=1024, le=1 << 30)] | None = None

    @field_validator("user", mode="before")
    @classmethod
    def _user(cls, value: object) -> object:
        uid = _account(value, "user")
        if uid == 0:
            raise ValueError("root: a worker runs as root when its listener names no user")
        if isinstance(uid, int) and (why := privileges.may_become(uid=uid)):
            raise ValueError(why)
        return uid

    @field_validator("group", mode="before")
    @classmethod
    def _group(cls, value: object, info: ValidationInfo) -> object:
        user = info.data.get("user")  # missing if it has an error of its own, which says what is wrong
        if value is None:
            return None if user is None else privileges.primary_group(user)
        if "user" in info.data and user is None:
            raise ValueError("only valid with user (a worker that stays root could take any group back)")
        gid = _account(value, "group")
        if user is not None and gid != os.getegid() and os.geteuid() != 0:
            raise ValueError(f"sockd runs as gid {os.getegid()}, not root, so its workers cannot run as gid {gid}")
        return gid

    @field_validator("event_loop")
    @classmethod
    def _installed(cls, value: EventLoop) -> EventLoop:
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed: pip install uvloop, or use event_loop: asyncio")
        return value

    @field_validator(*OVER_STREAMS)
    @classmethod
    def _over_streams(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("protocol") == "udp":
            raise ValueError(f"only valid with protocol: tcp or unix ({OVER_STREAMS[str(info.field_name)]})")
        return value

    @field_validator("proxy_trusted", "proxy_timeout")
    @classmethod
    def _proxied(cls, value: object, info: ValidationInfo) -> object:
        # Checked when written, after proxy_protocol (field order); not if proxy_protocol failed.
        if "proxy_protocol" in info.data and info.data["proxy_protocol"] is None:
            raise ValueError("only valid with proxy_protocol")
        if info.field_name == "proxy_trusted" and info.data.get("protocol") == "unix":
            raise ValueError(
                "not valid with protocol: unix: a Unix listener trusts its peers by allow_uids/allow_gids"
                " or its socket file's mode"
            )
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
    # YAML 1.1 reads a bare 0660 as the octal number 432.
    mode: Annotated[str, BeforeValidator(_quoted('mode: "0660"')), Field(pattern=MODE_PATTERN)] = "0660"

    # Whom the socket file belongs to (systemd's SocketUser=, SocketGroup=), set as it is bound
    # (and at a reload); None: as bind() made it. `group` is the worker's, not the file's.
    owner: AccountId | None = None
    owner_group: AccountId | None = None

    @field_validator("owner", "owner_group", mode="before")
    @classmethod
    def _owner(cls, value: object, info: ValidationInfo) -> object:
        kind = "user" if info.field_name == "owner" else "group"
        number = _account(value, kind)
        if isinstance(number, int) and (why := privileges.may_become(**{kind[0] + "id": number})):
            raise ValueError(why)
        return number

    @property
    def address(self) -> str:
        return self.path

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


def _account(value: object, kind: str) -> object:
    """A user's or group's name or number as its id; anything else as is, for the type's check."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return privileges.account_id(no_nul(value) if isinstance(value, str) else value, kind)
    return value


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
    shutdown_timeout: Seconds = 10.0  # how long a stop's drain may take
    # After a stop signal, how long the listeners serve on while /healthz says `draining`, so that a
    # balancer takes the instance out before it stops accepting (see sockd.supervisor).
    drain_delay: Seconds = 0.0
    # How long a generation a reload replaced may serve its sessions on (HAProxy's hard-stop-after,
    # nginx's worker_shutdown_timeout); None: until their clients end them.
    reload_drain_timeout: Seconds | None = None
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
