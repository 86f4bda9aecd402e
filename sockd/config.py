"""The configuration file: frozen pydantic models and a loader whose errors name file, line and field."""

from __future__ import annotations

import collections
import difflib
import errno
import importlib.util
import ipaddress
import itertools
import os
import socket
import stat
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import ErrorDetails

from sockd.models import MODELS

Protocol = Literal["tcp", "udp", "unix"]
HandlerName = Literal["echo", "timestamp", "discard", "daytime", "time", "relay"]
ModelName = Literal["iterative", "threaded", "thread_pool", "busy_poll", "selector", "asyncio"]
SelectorBackend = Literal["auto", "select", "poll", "epoll"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
TimestampFormat = Literal["seed", "iso8601", "unix"]

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
UPSTREAM_PATTERN = r"^((tcp|udp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])|unix:///.{1,106})$"
MODE_PATTERN = r"^0?[0-7]{3}$"
ListenerName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Port = Annotated[int, Field(ge=0, le=65535)]
# A config file is a few kB. Parsing a 20 MB one would block the supervisor's loop (its
# watchdog pings included) for seconds.
MAX_FILE_BYTES = 4 << 20
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


def _no_nul(value: str) -> str:
    # The kernel ends a path (and the resolver a name) at a NUL: what would be bound is not what is written.
    if "\0" in value:
        raise ValueError("may not hold a NUL character")
    return value


def _host(value: str) -> str:
    """An address, or a name getaddrinfo() can be asked for (it raises UnicodeError on a label
    longer than 63 characters, or an empty one)."""
    _no_nul(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        try:
            value.encode("idna")
        except UnicodeError as exc:
            raise ValueError(f"not a valid host name: {exc}") from None
    return value


Host = Annotated[str, Field(min_length=1), AfterValidator(_host)]


def _file_path(value: str) -> str:
    _no_nul(value)
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


class _ListenerBase(_Frozen):
    # An option that only makes sense beside some values of another field, e.g. `threads` only
    # with `concurrency: thread_pool`. Checked when the option is written, so defaults never trip
    # it; the owner is validated first (field order), so its value is known by then.
    _option_scope: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
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

    protocol: Protocol
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
    upstream: Annotated[str, Field(pattern=UPSTREAM_PATTERN), AfterValidator(_no_nul)] | None = None
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

    @field_validator(*_option_scope)
    @classmethod
    def _only_where_it_applies(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        owner, wanted = cls._option_scope[info.field_name]
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
        scheme, _, rest = self.upstream.partition("://")
        if scheme == "unix":
            return scheme, rest
        host, _, port = rest.rpartition(":")
        return scheme, (host.strip("[]"), int(port))


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
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


class ConfigError(Exception):
    """One or more problems in a config file, each already rendered as `file:line: field: message`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; every problem becomes a one-line `ConfigError`."""
    shown = os.fspath(path)
    try:
        raw = _read_regular(path)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError([f"{shown}: larger than {MAX_FILE_BYTES >> 20} MiB: not a config file sockd reads"])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{shown}: cannot read: {_reason(exc)}"]) from None
    return parse(text, shown)


def _read_regular(path: str | os.PathLike[str]) -> bytes:
    """The file's first MAX_FILE_BYTES + 1 bytes (one past the most: a bigger file is refused
    without being read whole). Opened without blocking, and refused unless a regular file: a
    FIFO or a device would hold the supervisor in open() or read() until someone wrote to it.
    A symlink is followed: config managers link /etc files into place."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file.read(MAX_FILE_BYTES + 1)


def parse(text: str, shown: str) -> Config:
    """Validate YAML `text`; `shown` is the file name the errors start with."""
    try:
        root, data = _read_yaml(text)
    except yaml.YAMLError as exc:
        line, message = _yaml_problem(exc, text)
        raise ConfigError([f"{shown}:{line}: invalid YAML: {_one_line(message)}"]) from None
    except _Unreadable as exc:
        raise ConfigError([f"{shown}:{exc.line}: {exc.what}: {_one_line(exc.message)}"]) from None

    found: list[tuple[int, str, str]] = [(line, field, "duplicate key") for line, field in _duplicate_keys(root)]
    config = None
    if not isinstance(data, dict):
        found.append((_line(root, ()), "(top level)", "the file must be a mapping with a `listeners` list"))
    else:
        config, problems = _validate(data)
        found += _locate(root, problems)
    if found or config is None:
        raise ConfigError(
            [f"{shown}:{line}: {_one_line(field)}: {_one_line(msg)}" for line, field, msg in sorted(found)]
        )
    return config


Problem = tuple[tuple[str | int, ...], str]

# A config is tens of values, thousands with a long `allow` list or a thousand listeners: at
# most this many, whether written out or repeated by aliases. Bounded so that no file under
# MAX_FILE_BYTES holds the supervisor's loop for long: PyYAML composes some 35,000 nodes a second,
# and a 4 MiB `[1,1,…]` is two million of them (a "billion laughs" of a few hundred bytes, far more).
MAX_VALUES = 100_000


# PyYAML's constructors for the standard tags (!!int, !!float, !!bool, !!timestamp, …) raise
# these plain Python errors, not YAMLError, on a value they cannot read.
CONSTRUCTOR_ERRORS = (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError)


class _Unreadable(Exception):
    """YAML that parses but cannot be read as a config's data."""

    def __init__(self, line: int, message: str, what: str = "invalid YAML") -> None:
        super().__init__(message)
        self.line, self.message, self.what = line, message, what


def _read_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for lines) and its data, read from the tree once composed."""
    loader = _CountingLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:  # PyYAML composes and constructs recursively: some 500 levels deep
            raise _Unreadable(1, "nested too deeply") from None
        _bounded(root)
        try:
            return root, loader.construct_document(root) if root is not None else None
        except RecursionError:
            raise _Unreadable(1, "nested too deeply") from None
        except CONSTRUCTOR_ERRORS:
            line, tag, value = _unreadable_scalar(root)
            raise _Unreadable(line, f"{value[:40]!r} cannot be read as {tag}") from None
    finally:
        loader.dispose()


class _CountingLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document of more than MAX_VALUES nodes as it composes
    them, before the rest of the file is parsed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.AliasEvent):  # an alias is counted by _bounded
            self.nodes += 1
            if self.nodes > MAX_VALUES:
                line = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
                raise _Unreadable(
                    line,
                    f"more than {MAX_VALUES} values (scalars, lists and mappings) by this line:"
                    " a sockd config has far fewer",
                    "too large",
                )
        return super().compose_node(parent, index)


def _bounded(root: yaml.Node | None) -> None:
    """Refuse a document whose aliases expand it past MAX_VALUES, before anything expands it."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # an alias of a node inside itself loops: counted once
    stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not children_done:
            if id(node) in visiting:
                continue
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes and id(child) not in visiting)
            continue
        sizes[id(node)] = size = 1 + sum(sizes.get(id(child), 0) for child in children)
        if size > MAX_VALUES:
            line = node.start_mark.line + 1
            raise _Unreadable(line, f"aliases expand this to more than {MAX_VALUES} values")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _unreadable_scalar(root: yaml.Node | None) -> tuple[int, str, str]:
    """The first scalar with a tag whose constructor fails on it: (line, tag, value)."""
    constructor = yaml.SafeLoader("")
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                constructor.construct_object(node)
            except CONSTRUCTOR_ERRORS:
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                return node.start_mark.line + 1, tag, str(node.value)
        stack.extend(reversed(_children(node)))
    return 1, "data", ""


def _locate(root: yaml.Node | None, problems: Iterable[Problem]) -> list[tuple[int, str, str]]:
    return [(_line(root, loc), _field(root, loc), message) for loc, message in problems]


def _shown(value: object, limit: int = 40) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str) -> str:
    # A key or value may hold a line break or a control character; the message must stay one line.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# PyYAML's words name the parser's state; these say what in the file most likely causes it.
_YAML_HINTS = (
    (
        "mapping values are not allowed here",
        "a `key: value` line is probably indented wrongly, or a colon needs quoting",
    ),
    ("expected <block end>", "a line is probably indented differently from the others of its block"),
    ("found character '\\t'", "indent with spaces: YAML does not allow tabs"),
    ("found character", "a value that starts with this character needs quoting"),
    ("could not find expected ':'", "a line of a mapping is not `key: value`, or a quote is not closed"),
    ("expected ',' or", "a [ or { is not closed, or a comma is missing between its items"),
    ("expected the node content, but found '<stream end>'", "a [ or { is not closed"),
    ("found unexpected end of stream (while scanning a quoted", "a quote is not closed"),
    ("found undefined alias", "a value that starts with * needs quoting"),
    ("could not determine a constructor", "sockd reads plain YAML: remove the tag"),
)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int, str]:
    """The line and a one-sentence account of a YAML syntax error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or ""
        if exc.context:
            where = exc.context_mark
            started = f" started at line {where.line + 1}" if where and where.line != (mark and mark.line) else ""
            message = f"{message} ({exc.context}{started})" if message else exc.context
        hint = next((words for start, words in _YAML_HINTS if message.startswith(start)), None)
        return (mark.line + 1 if mark else 1), f"{message}; {hint}" if hint else message
    if isinstance(exc, yaml.reader.ReaderError):
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return text.count("\n", 0, exc.position) + 1, f"unacceptable character #x{character:04x}: {exc.reason}"
    return 1, str(exc)


def _validate(data: dict[str, Any]) -> tuple[Config | None, list[Problem]]:
    """The config, or every problem in it at once: each field's, and each rule's across fields
    and listeners on what did validate (see _listener)."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return config, list(_conflicts(config.listeners))
    problems: list[Problem] = []
    by_listener: dict[int, list[ErrorDetails]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if loc[0] == "listeners" and len(loc) > 1 and isinstance(loc[1], int):
            by_listener.setdefault(loc[1], []).append(error)
        else:
            problems.append(_explain(loc, error, _MODEL_AT.get(loc[:-1], Config)))
    items = data.get("listeners")
    listeners: list[Listener | None] = []
    partial = set()
    for index, item in enumerate(items if isinstance(items, list) else []):
        listener, found = _listener(item, by_listener.get(index, []))
        listeners.append(listener)
        if found:
            partial.add(index)
            problems += [(("listeners", index, *loc), message) for loc, message in found]
    problems += _conflicts(listeners, partial)
    return None, problems


_MODEL_AT: dict[tuple[str | int, ...], type[BaseModel]] = {
    (): Config,
    ("metrics",): MetricsConfig,
    ("logging",): LoggingConfig,
}
_VARIANTS: dict[str, type[InetListener | UnixListener]] = {
    "tcp": InetListener,
    "udp": InetListener,
    "unix": UnixListener,
}
_LISTENER: TypeAdapter[InetListener | UnixListener] = TypeAdapter(Listener)


def _listener(item: object, errors: list[ErrorDetails]) -> tuple[Listener | None, list[Problem]]:
    """One listener of a config that failed: what of it validated, for the rules across fields,
    and its problems (located within it).

    What validated is the whole listener, or one that lacks every field with an error of its own
    (a rule that reads one gets AttributeError: it waits until that error is fixed), or None. A
    `protocol` that picks no kind of listener would hide every other problem of it: the listener
    is then validated as the kind it was most likely meant to be (`TCP` as tcp; a `path` as
    unix, a `host` or `port` as tcp or udp, leaving out what would depend on which)."""
    if not errors:
        return _LISTENER.validate_python(item), []
    if not isinstance(item, dict):
        return None, [_explain((), error, InetListener) for error in errors]
    found: list[Problem] = []
    tag = errors[0]["loc"][2] if len(errors[0]["loc"]) > 2 else None
    if tag in _VARIANTS:
        variant = _VARIANTS[str(tag)]
        located = [(tuple(error["loc"][3:]), error) for error in errors]
        failed: set[str] = set()
    else:
        found += [_explain((), error, InetListener) for error in errors]
        guess = _meant_protocol(item)
        if guess is None:
            return None, found
        protocol, sure = guess
        variant = _VARIANTS[protocol]
        try:
            variant.model_validate({**item, "protocol": protocol})
            located = []
        except ValidationError as exc:
            located = [(tuple(error["loc"]), error) for error in exc.errors(include_url=False)]
        if not sure:
            located = [(loc, error) for loc, error in located if not _depends_on_protocol(loc, error)]
        failed = {"protocol"}
    found += [_explain(loc, error, variant) for loc, error in located]
    failed |= {str(loc[0]) for loc, _ in located if loc}
    listener = variant.model_construct(**{k: v for k, v in item.items() if k in variant.model_fields})
    for name in failed:  # model_construct gave it its default, or the raw value that failed
        listener.__dict__.pop(name, None)
    return listener, found


def _meant_protocol(item: dict[Any, Any]) -> tuple[str, bool] | None:
    """The protocol a listener whose `protocol` is not one most likely meant, and whether that
    is sure (a case or spacing slip) or a guess from its keys."""
    value = item.get("protocol")
    normal = value.strip().lower() if isinstance(value, str) else None
    if normal in _VARIANTS:
        return str(normal), True
    if "path" in item:
        return "unix", False
    if "host" in item or "port" in item:
        return "tcp", False
    return None


def _depends_on_protocol(loc: tuple[Any, ...], error: ErrorDetails) -> bool:
    field = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        return any(field in variant.model_fields for variant in _VARIANTS.values())
    # _only_where_it_applies's error; a value of the wrong type is wrong whatever the protocol.
    return error["type"] == "value_error" and _ListenerBase._option_scope.get(str(field), ("",))[0] == "protocol"


def _conflicts(listeners: Sequence[Listener | None], partial: Collection[int] = ()) -> Iterator[Problem]:
    """Rules across fields and across listeners, which a single field's validation cannot see;
    on listeners that failed in part (`partial`), those on the fields that did validate."""
    names: dict[str, int] = {}
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        combined = _combinations(listener, complete=index not in partial)
        yield from ((("listeners", index, *loc), message) for loc, message in combined)
        if hasattr(listener, "name"):
            first = names.setdefault(listener.name, index)
            if first != index:
                yield ("listeners", index, "name"), f"{listener.name!r} is already the name of listeners[{first}]"
    yield from _overlaps(listeners)


def _overlaps(listeners: Sequence[Listener | None]) -> Iterator[Problem]:
    """Two listeners that cannot both be bound, as Linux decides it: the same address, or a
    wildcard address and another of its family (or any IPv4 one, for a dual-stack `::`) on the
    same protocol and port, unless both set reuse_port. A host name is compared by the address
    bind() will take, resolved only if another listener shares its protocol and port.

    Each listener is compared only with the first earlier one of each kind it may clash with,
    so that a config of thousands of listeners is checked in a moment."""
    sharing = collections.Counter(
        (item.protocol, item.port) for item in listeners if isinstance(item, InetListener) and _has(item, *_BINDS)
    )
    addresses: dict[int, _Address] = {}
    # By (protocol, port) for inet listeners, ("unix", path) for Unix ones: the first listener of
    # each kind (see _kinds), and its first one without reuse_port.
    firsts: dict[tuple[str, int | str], dict[object, tuple[int, int | None]]] = {}
    for index, listener in enumerate(listeners):
        if isinstance(listener, InetListener) and _has(listener, *_BINDS):
            if listener.port == 0:
                continue  # port 0 asks the kernel for a fresh port: it cannot clash
            shared = sharing[(listener.protocol, listener.port)] > 1
            address = addresses[index] = _address(listener, resolve=shared)
            key: tuple[str, int | str] = (listener.protocol, listener.port)
            kinds, clashes = _kinds(listener, address), _clashes(listener, address)
        elif isinstance(listener, UnixListener) and _has(listener, "protocol", "path"):
            key, kinds, clashes = ("unix", listener.path), ["path"], ["path"]
        else:
            continue
        seen = firsts.setdefault(key, {})
        reuse_port = getattr(listener, "reuse_port", False)
        # The same address clashes whatever reuse_port says; a wildcard's, only if one lacks it.
        earlier = [
            pair[0] if n == 0 or not reuse_port else pair[1]
            for n, kind in enumerate(clashes)
            if (pair := seen.get(kind))
        ]
        for first in sorted({first for first in earlier if first is not None}):
            other = listeners[first]
            assert other is not None
            who = f"listener {other.name!r} ({_index(first)})" if _has(other, "name") else _index(first)
            if problem := _overlap(other, addresses.get(first), listener, addresses.get(index), who):
                yield ("listeners", index, *problem[0]), problem[1]
                break
        for kind in kinds:
            first, alone = seen.get(kind, (index, None))
            seen[kind] = (first, index if alone is None and not reuse_port else alone)


_BINDS = ("protocol", "host", "port", "reuse_port", "ipv6_only")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | str  # str: a host name that does not resolve


def _address(listener: InetListener, resolve: bool) -> _Address:
    try:
        return ipaddress.ip_address(listener.host)
    except ValueError:
        pass
    if not resolve:
        return listener.host
    try:
        _, _, address = passive_address(listener.host, listener.port, listener.protocol)
    except OSError:  # bind() will say so: a host may resolve there and not here
        return listener.host
    return ipaddress.ip_address(str(address[0]).partition("%")[0])


def _kinds(listener: InetListener, address: _Address) -> list[object]:
    """What a listener is, for the listeners after it: its address, its family, and a wildcard."""
    if isinstance(address, str):
        return [address]
    kinds: list[object] = [address, f"any{address.version}"]
    if address.is_unspecified:
        kinds.append(f"wildcard{address.version}")
        if address.version == 6 and listener.ipv6_only is not True:
            kinds.append("dual-stack")
    return kinds


def _clashes(listener: InetListener, address: _Address) -> list[object]:
    """The kinds of earlier listener this one may clash with."""
    if isinstance(address, str):
        return [address]
    clashes: list[object] = [address]
    if address.is_unspecified:
        clashes.append(f"any{address.version}")
        if address.version == 6 and listener.ipv6_only is not True:
            clashes.append("any4")
    else:
        clashes.append(f"wildcard{address.version}")
    if address.version == 4:
        clashes.append("dual-stack")
    return clashes


def _overlap(
    first: Listener, theirs: _Address | None, listener: Listener, mine: _Address | None, who: str
) -> Problem | None:
    if first.protocol != listener.protocol:
        return None
    resolved = f" ({mine})" if isinstance(listener, InetListener) and str(mine) != listener.host else ""
    used = f"{listener.protocol} {listener.address}{resolved} is already used by {who}"
    if isinstance(listener, UnixListener) or isinstance(first, UnixListener):
        return (("path",), used) if first.address == listener.address else None
    if first.port != listener.port:
        return None
    if isinstance(mine, str) or isinstance(theirs, str) or mine is None or theirs is None:
        return (("port",), used) if mine == theirs else None
    if mine == theirs:
        return ("port",), used
    if first.reuse_port and listener.reuse_port:
        return None
    overlaps = f"{listener.protocol} {listener.address}{resolved} overlaps {first.address} of {who}"
    for wildcard, other, on in ((mine, theirs, listener), (theirs, mine, first)):
        if not wildcard.is_unspecified:
            continue
        if wildcard.version == other.version:
            every = f"{wildcard} takes the port on every IPv{wildcard.version} address"
            return ("host",), f"{overlaps}: {every}, so only one can be bound, unless both set reuse_port: true"
        if wildcard.version == 6 and on.ipv6_only is not True:
            return ("host",), f"{overlaps}: :: takes the port over IPv4 too, unless it sets ipv6_only: true"
    return None


def passive_address(host: str, port: int, protocol: str) -> tuple[int, int, tuple[Any, ...]]:
    """(family, proto, socket address) a listener's socket is bound to: the first of what
    getaddrinfo() gives for its host, as the config check and bind() both take it."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    try:
        family, _, proto, _, address = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host!r}: {exc.strerror}") from None
    return family, proto, address


def _has(listener: Listener, *fields: str) -> bool:
    # A listener that failed in part lacks the fields that failed (see _listener).
    return all(hasattr(listener, field) for field in fields)


def _index(index: int) -> str:
    return f"listeners[{index}]"


def alternatives(words: Sequence[str]) -> str:
    """ "a", "a or b", "a, b or c"."""
    return " or ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else words[0]


def _combinations(listener: Listener, complete: bool = True) -> Iterator[Problem]:
    """Rules on how one listener's settings go together. On a listener that failed in part (not
    `complete`), a rule that reads a field that failed raises AttributeError: it depends on that
    field's own error, and waits until it is fixed."""
    for rule in _RULES:
        try:
            problems = list(rule(listener))
        except AttributeError:
            if complete:
                raise
            continue
        yield from problems


def _burst(listener: Listener) -> Iterator[Problem]:
    if listener.connection_burst is not None and listener.connection_rate is None:
        yield ("connection_burst",), "only valid with connection_rate"


def _idle(listener: Listener) -> Iterator[Problem]:
    if listener.idle_timeout is not None and not (listener.streams or listener.handler == "relay"):
        yield ("idle_timeout",), "only valid with protocol: tcp or unix, or handler: relay"


def _relay_message_size(listener: Listener) -> Iterator[Problem]:
    if listener.handler == "relay" and listener.max_message_size is not None:
        yield ("max_message_size",), "not valid with handler: relay (it passes bytes through)"


def _relay_model(listener: Listener) -> Iterator[Problem]:
    relaying = [name for name, kind in MODELS.items() if kind.relays]
    if listener.handler == "relay" and listener.concurrency not in relaying:
        models = alternatives(relaying)
        yield ("concurrency",), f"handler: relay needs concurrency: {models} (not {listener.concurrency})"


def _relay_upstream(listener: Listener) -> Iterator[Problem]:
    if listener.handler != "relay":
        return
    if listener.upstream is None:
        yield ("upstream",), "required with handler: relay"
    elif (listener.upstream_endpoint[0] == "udp") != (listener.protocol == "udp"):
        yield ("upstream",), "a udp listener relays to a udp upstream, a stream listener to tcp or unix"
    elif isinstance(where := listener.upstream_endpoint[1], tuple):
        try:
            _host(where[0])
        except ValueError as exc:
            yield ("upstream",), str(exc)
    if listener.upstream is not None and _relays_to_itself(listener):
        yield ("upstream",), "is this listener's own address: each client would be relayed to itself, without end"


# select() watches descriptors below FD_SETSIZE (1,024) only; a worker keeps about twenty of its
# own (its socket, pipes, counters, log), and a relay two per connection.
SELECT_CONNECTIONS = 1000


def _select_bounds(listener: Listener) -> Iterator[Problem]:
    """A select() loop must never be handed a descriptor it cannot watch: it would crash."""
    if listener.selector_backend != "select":
        return
    if listener.protocol == "udp":
        if listener.handler == "relay":
            yield ("selector_backend",), "select cannot watch a UDP relay's sessions (a socket per client): use poll"
        return
    most = SELECT_CONNECTIONS // (2 if listener.handler == "relay" else 1)
    if listener.max_connections is None or listener.max_connections > most:
        yield (
            ("selector_backend",),
            f"select watches 1,024 descriptors at most: needs max_connections of at most {most}",
        )


_RULES = (_burst, _idle, _select_bounds, _relay_message_size, _relay_model, _relay_upstream)


def _relays_to_itself(listener: Listener) -> bool:
    scheme, where = listener.upstream_endpoint
    if isinstance(listener, UnixListener):
        return scheme == "unix" and os.path.normpath(str(where)) == os.path.normpath(listener.path)
    if not isinstance(where, tuple) or listener.port == 0 or where[1] != listener.port:
        return False
    host = where[0]
    return host == listener.host or (listener.host in ("0.0.0.0", "::") and _loopback(host))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _explain(loc: tuple[Any, ...], error: ErrorDetails, model: type[BaseModel]) -> Problem:
    """Turn one pydantic error at `loc`, in a mapping validated as `model`, into (location,
    message) in the words of this file's format."""
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc += ("protocol",)
        if kind == "union_tag_not_found":
            return loc, "required"
        return loc, f"input should be 'tcp', 'udp' or 'unix', not {_shown(error['input']['protocol'])}"
    if kind == "missing":
        return loc, "required"
    if kind == "extra_forbidden":
        key = loc[-1]
        if model in _VARIANTS.values():
            for variant, protocols in ((InetListener, "tcp or udp"), (UnixListener, "unix")):
                if key in variant.model_fields:
                    return loc, f"only valid with protocol: {protocols}"
        near = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
        return loc, f"unknown key; did you mean {near[0]!r}?" if near else "unknown key"
    if kind == "string_pattern_mismatch":
        return loc, _PATTERN_MEANINGS[error["ctx"]["pattern"]]
    if kind == "too_short" and loc == ("listeners",):
        return loc, "needs at least one listener"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return loc, "should be a mapping of keys to values"
    message = error["msg"].removeprefix("Value error, ")
    return loc, message[:1].lower() + message[1:]


_PATTERN_MEANINGS = {
    NAME_PATTERN: "may hold only letters, digits, '_', '.' and '-'",
    MODE_PATTERN: 'should be octal permission bits, as in "0660"',
    UPSTREAM_PATTERN: "should be tcp://host:port, udp://host:port or unix:///path",
}


def _walk(root: yaml.Node | None, loc: tuple[Any, ...]) -> Iterator[tuple[yaml.Node, Any]]:
    """Follow a problem's location through the YAML node tree, yielding (node, loc part).

    Parts with no node behind them (a missing key) are yielded with the deepest node reached, so
    that the line is still found."""
    node = root
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is not None:
            node = child
            yield node, part
        elif node is not None:
            yield node, part


def _line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    reached = [node for node, _ in _walk(root, loc)]
    node = reached[-1] if reached else root
    return node.start_mark.line + 1 if node is not None else 1


def _field(root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    return _dotted(part for _, part in _walk(root, loc))


def _dotted(parts: Iterable[Any]) -> str:
    shown = ""
    for part in parts:
        if isinstance(part, int):
            shown += f"[{part}]"
        elif part is not None:
            shown += f".{part}" if shown else str(part)
    return shown or "(top level)"


def _duplicate_keys(
    node: yaml.Node | None, at: tuple[str | int, ...] = (), visited: set[int] | None = None
) -> Iterator[tuple[int, str]]:
    # PyYAML silently keeps the last of two equal keys; a config that says a thing twice is a mistake.
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias: already checked where its anchor stands (and it may loop)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key, value in node.value:
            name = getattr(key, "value", None)
            if name in seen:
                yield key.start_mark.line + 1, _dotted((*at, name))
            seen.add(name)
            yield from _duplicate_keys(value, (*at, str(name)), visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*at, index), visited)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc)
