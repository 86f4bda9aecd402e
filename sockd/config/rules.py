"""The rules a single field's validation cannot see: how one listener's settings go together,
and which listeners cannot all be bound.

The rules read a listener as `Fields`, each field's value by name, so that they also run on a
listener that failed in part (see sockd.config.recovery), which lacks the fields that failed. A
rule names the fields it reads as its parameters, and runs only on a listener that has all of
them: one that depends on a field with an error of its own waits until that error is fixed."""

from __future__ import annotations

import collections
import inspect
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sockd.config.problems import Problem
from sockd.config.schema import (
    EXEC_MODELS,
    RELAYING_MODELS,
    STREAM,
    VERIFYING,
    InetListener,
    TLSConfig,
    UnixListener,
    alternatives,
    host_name,
    host_port,
    upstream_endpoint,
)

Fields = Mapping[str, Any]


def conflicts(listeners: Sequence[Fields | None]) -> Iterator[Problem]:
    """Every rule's problems, on the fields each listener has (None: nothing of it validated)."""
    names: dict[str, int] = {}
    for index, fields in enumerate(listeners):
        if fields is None:
            continue
        yield from ((("listeners", index, *loc), message) for loc, message in _combinations(fields))
        if "name" in fields:
            name = fields["name"]
            first = names.setdefault(name, index)
            if first != index:
                yield ("listeners", index, "name"), f"{name!r} is already the name of listeners[{first}]"
    yield from _overlaps([None if fields is None else _binding(fields) for fields in listeners])


# -- how one listener's settings go together


def _combinations(fields: Fields) -> Iterator[Problem]:
    for rule, reads in _RULES:
        if all(name in fields for name in reads):
            yield from rule(**{name: fields[name] for name in reads})


def _connection_burst(connection_burst: int | None, connection_rate: float | None) -> Iterator[Problem]:
    return _burst("connection", connection_burst, connection_rate)


def _datagram_burst(datagram_burst: int | None, datagram_rate: float | None) -> Iterator[Problem]:
    return _burst("datagram", datagram_burst, datagram_rate)


def _burst(kind: str, burst: int | None, rate: float | None) -> Iterator[Problem]:
    if burst is not None and rate is None:
        yield (f"{kind}_burst",), f"only valid with {kind}_rate"


def _idle(idle_timeout: float | None, protocol: str, handler: str) -> Iterator[Problem]:
    if idle_timeout is not None and not (protocol in STREAM or handler == "relay"):
        yield ("idle_timeout",), "only valid with protocol: tcp or unix, or handler: relay"


def _agent_over_streams(handler: str, protocol: str) -> Iterator[Problem]:
    if handler == "agent" and protocol not in STREAM:
        yield ("handler",), "agent answers HAProxy's agent-check, over TCP: only valid with protocol: tcp or unix"


def _relay_message_size(handler: str, max_message_size: int | None) -> Iterator[Problem]:
    if handler == "relay" and max_message_size is not None:
        yield ("max_message_size",), "not valid with handler: relay (it passes bytes through)"


def _relay_model(handler: str, concurrency: str) -> Iterator[Problem]:
    if handler == "relay" and concurrency not in RELAYING_MODELS:
        models = alternatives(RELAYING_MODELS)
        yield ("concurrency",), f"handler: relay needs concurrency: {models} (not {concurrency})"


def _exec_command(handler: str, command: list[str] | None) -> Iterator[Problem]:
    """The program must be there and executable at load and --check, not only found missing at
    the first client's connection (where it is still counted, as `failed`: it may go meanwhile)."""
    if handler != "exec":
        return
    if command is None:
        yield ("command",), "required with handler: exec (the program each connection runs, and its arguments)"
        return
    program = command[0]
    if not os.path.isabs(program):
        yield ("command",), f"{program!r} is not an absolute path: sockd searches no PATH (as inetd's `server`)"
    elif not os.path.isfile(program):
        yield ("command",), f"{program} does not exist" if not os.path.exists(program) else f"{program} is not a file"
    elif not os.access(program, os.X_OK):
        yield ("command",), f"{program} is not executable"


def _exec_cwd(handler: str, cwd: str | None) -> Iterator[Problem]:
    if handler == "exec" and cwd is not None and not os.path.isdir(cwd):
        yield ("cwd",), f"{cwd} is not a directory"


def _exec_stream(handler: str, protocol: str) -> Iterator[Problem]:
    if handler == "exec" and protocol not in STREAM:
        yield (
            ("handler",),
            "exec serves streams only: protocol: tcp or unix (inetd's UDP `wait` mode, a program given the"
            " socket itself, is out of scope)",
        )


def _exec_model(handler: str, concurrency: str) -> Iterator[Problem]:
    if handler == "exec" and concurrency not in EXEC_MODELS:
        models = alternatives(EXEC_MODELS)
        yield (
            ("concurrency",),
            f"handler: exec needs concurrency: {models}, which supervises its children (not {concurrency})",
        )


def _exec_connection_options(
    handler: str,
    delay: float,
    max_message_size: int | None,
    idle_timeout: float | None,
    first_byte_timeout: float | None,
) -> Iterator[Problem]:
    # sockd sees none of a child's bytes: exec_timeout bounds it.
    if handler != "exec":
        return
    written = {"delay": delay or None, "max_message_size": max_message_size, "idle_timeout": idle_timeout}
    written["first_byte_timeout"] = first_byte_timeout
    for name, value in written.items():
        if value is not None:
            yield (name,), "not valid with handler: exec (the child, not sockd, reads the connection: see exec_timeout)"


def _relay_needs_upstream(handler: str, upstream: str | None) -> Iterator[Problem]:
    if handler == "relay" and upstream is None:
        yield ("upstream",), "required with handler: relay"


def _relay_upstream(handler: str, protocol: str, upstream: str | None) -> Iterator[Problem]:
    if handler != "relay" or upstream is None:
        return
    scheme, where = upstream_endpoint(upstream)
    if (scheme == "udp") != (protocol == "udp"):
        yield ("upstream",), "a udp listener relays to a udp upstream, a stream listener to tcp, tls or unix"
    elif isinstance(where, tuple):
        try:
            host_name(where[0])
        except ValueError as exc:
            yield ("upstream",), str(exc)


def _proxy_trusted(protocol: str, proxy_protocol: str | None, proxy_trusted: list[object]) -> Iterator[Problem]:
    if protocol == "tcp" and proxy_protocol is not None and not proxy_trusted:
        yield (
            ("proxy_protocol",),
            "needs proxy_trusted: the balancers' address blocks (as in [10.0.0.0/8]); a connection from any"
            " other source is refused, as a header from it could name any client",
        )


def _client_ca(tls: TLSConfig | None) -> Iterator[Problem]:
    if tls is not None and tls.client_auth in VERIFYING and tls.client_ca is None:
        yield ("tls", "client_auth"), "needs client_ca: the CA bundle that verifies client certificates"


def _upstream_tls(
    *,
    handler: str,
    upstream: str | None,
    upstream_ca: str | None,
    upstream_server_name: str | None,
    upstream_cert: str | None,
    upstream_key: str | None,
) -> Iterator[Problem]:
    if handler != "relay" or upstream is None:
        return
    written = {
        "upstream_ca": upstream_ca,
        "upstream_server_name": upstream_server_name,
        "upstream_cert": upstream_cert,
        "upstream_key": upstream_key,
    }
    scheme, _ = upstream_endpoint(upstream)
    if scheme != "tls":
        for name, value in written.items():
            if value is not None:
                yield (name,), f"only valid with a tls:// upstream (this listener's is {scheme}://)"
        return
    for present, missing in (("upstream_cert", "upstream_key"), ("upstream_key", "upstream_cert")):
        if written[present] is not None and written[missing] is None:
            yield (present,), f"needs {missing}: a client certificate goes with its key"


RELAYS_TO_ITSELF = "is this listener's own address: each client would be relayed to itself, without end"


def _relay_to_own_port(handler: str, upstream: str | None, host: str, port: int) -> Iterator[Problem]:
    if handler != "relay" or upstream is None:
        return
    _, where = upstream_endpoint(upstream)
    if not isinstance(where, tuple) or port == 0 or where[1] != port:
        return
    if where[0] == host or (host in ("0.0.0.0", "::") and _loopback(where[0])):
        yield ("upstream",), RELAYS_TO_ITSELF


def _relay_to_own_path(handler: str, upstream: str | None, path: str) -> Iterator[Problem]:
    if handler != "relay" or upstream is None:
        return
    scheme, where = upstream_endpoint(upstream)
    if scheme == "unix" and os.path.normpath(str(where)) == os.path.normpath(path):
        yield ("upstream",), RELAYS_TO_ITSELF


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# select() watches descriptors below FD_SETSIZE (1,024) only; a worker keeps about twenty of its
# own (its socket, pipes, counters, log), and a relay two per connection.
SELECT_CONNECTIONS = 1000


# A select() loop must never be handed a descriptor it cannot watch: it would crash.
def _select_sessions(selector_backend: str, protocol: str, handler: str) -> Iterator[Problem]:
    if selector_backend == "select" and protocol == "udp" and handler == "relay":
        yield ("selector_backend",), "select cannot watch a UDP relay's sessions (a socket per client): use poll"


def _select_connections(
    selector_backend: str, protocol: str, handler: str, max_connections: int | None
) -> Iterator[Problem]:
    if selector_backend != "select" or protocol == "udp":
        return
    most = SELECT_CONNECTIONS // (2 if handler == "relay" else 1)
    if max_connections is None or max_connections > most:
        yield (
            ("selector_backend",),
            f"select watches 1,024 descriptors at most: needs max_connections of at most {most}",
        )


def _reads(rule: Callable[..., Iterator[Problem]]) -> tuple[str, ...]:
    """The fields a rule reads: its parameters' names, each a field of some kind of listener."""
    names = tuple(inspect.signature(rule).parameters)
    unknown = set(names) - InetListener.model_fields.keys() - UnixListener.model_fields.keys()
    if unknown:
        raise TypeError(f"{rule.__name__} reads {sorted(unknown)}, which no listener has")
    return names


_RULES = [
    (rule, _reads(rule))
    for rule in (
        _connection_burst,
        _datagram_burst,
        _idle,
        _agent_over_streams,
        _client_ca,
        _proxy_trusted,
        _select_sessions,
        _select_connections,
        _relay_message_size,
        _relay_model,
        _relay_needs_upstream,
        _exec_command,
        _exec_cwd,
        _exec_stream,
        _exec_model,
        _exec_connection_options,
        _relay_upstream,
        _upstream_tls,
        _relay_to_own_port,
        _relay_to_own_path,
    )
]


# -- what is valid but worth a warning (`sockd --check` prints it, a start or reload logs it)

# The handlers that answer a datagram with more bytes than it held (README, Handlers:
# Amplification, measures each): over UDP, whose source address anyone can forge, each is a
# reflection amplifier (US-CERT TA14-017A). Echo answers as much as it got: a reflector, not an
# amplifier. chargen answers any datagram with 0 to 512 bytes (RFC 864).
AMPLIFIERS = frozenset({"daytime", "time", "timestamp", "chargen"})


def config_warnings(listeners: Sequence[InetListener | UnixListener]) -> Iterator[Problem]:
    """An amplifier over UDP, open beyond loopback, with no datagram_rate to bound what it sends."""
    for index, listener in enumerate(listeners):
        if (
            isinstance(listener, InetListener)
            and listener.protocol == "udp"
            and listener.handler in AMPLIFIERS
            and listener.datagram_rate is None
            and not _loopback(listener.host)
        ):
            yield (
                ("listeners", index, "handler"),
                f"warning: {listener.handler} over UDP on {listener.host} answers with more bytes than it"
                " receives, to whatever source a datagram forges (a reflection amplifier): set datagram_rate",
            )


# -- which listeners cannot all be bound


@dataclass(frozen=True)
class _Binding:
    """What a listener binds, as the overlap rule compares two."""

    protocol: str
    host: str  # a Unix listener's path
    port: int  # 0 for a Unix listener
    reuse_port: bool
    ipv6_only: bool | None
    name: str | None  # None: the name failed

    @property
    def unix(self) -> bool:
        return self.protocol == "unix"

    @property
    def address(self) -> str:
        return self.host if self.unix else host_port(self.host, self.port)


_BINDS = ("protocol", "host", "port", "reuse_port", "ipv6_only")


def _binding(fields: Fields) -> _Binding | None:
    """What the listener binds, or None if a field that decides it failed."""
    name = fields.get("name")
    if fields.get("protocol") == "unix" and "path" in fields:
        return _Binding("unix", fields["path"], 0, False, None, name)
    if all(field in fields for field in _BINDS) and fields["protocol"] != "unix":
        return _Binding(
            fields["protocol"], fields["host"], fields["port"], fields["reuse_port"], fields["ipv6_only"], name
        )
    return None


def _overlaps(listeners: Sequence[_Binding | None]) -> Iterator[Problem]:
    """Two listeners that cannot both be bound, as Linux decides it: the same address, or a
    wildcard address and another of its family (or any IPv4 one, for a dual-stack `::`) on the
    same protocol and port, unless both set reuse_port. A host name is compared by the address
    bind() will take, resolved only if another listener shares its protocol and port.

    Each listener is compared only with the first earlier one of each kind it may clash with,
    so that a config of thousands of listeners is checked in a moment."""
    sharing = collections.Counter((item.protocol, item.port) for item in listeners if item and not item.unix)
    addresses: dict[int, _Address] = {}
    # By (protocol, port) for inet listeners, ("unix", path) for Unix ones: the first listener of
    # each kind (see _kinds), and its first one without reuse_port.
    firsts: dict[tuple[str, int | str], dict[object, tuple[int, int | None]]] = {}
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        if not listener.unix:
            if listener.port == 0:
                continue  # port 0 asks the kernel for a fresh port: it cannot clash
            shared = sharing[(listener.protocol, listener.port)] > 1
            address = addresses[index] = _address(listener, resolve=shared)
            key: tuple[str, int | str] = (listener.protocol, listener.port)
            kinds, clashes = _kinds(listener, address), _clashes(listener, address)
        else:
            key, kinds, clashes = ("unix", listener.host), ["path"], ["path"]
        seen = firsts.setdefault(key, {})
        reuse_port = listener.reuse_port
        # The same address clashes whatever reuse_port says; a wildcard's, only if one lacks it.
        earlier = [
            pair[0] if n == 0 or not reuse_port else pair[1]
            for n, kind in enumerate(clashes)
            if (pair := seen.get(kind))
        ]
        for first in sorted({first for first in earlier if first is not None}):
            other = listeners[first]
            assert other is not None
            who = f"listener {other.name!r} ({_index(first)})" if other.name is not None else _index(first)
            if problem := _overlap(other, addresses.get(first), listener, addresses.get(index), who):
                yield ("listeners", index, *problem[0]), problem[1]
                break
        for kind in kinds:
            first, alone = seen.get(kind, (index, None))
            seen[kind] = (first, index if alone is None and not reuse_port else alone)


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | str  # str: a host name that does not resolve


def _address(listener: _Binding, resolve: bool) -> _Address:
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


def _kinds(listener: _Binding, address: _Address) -> list[object]:
    """What a listener is, for the listeners after it: its address, its family, and a wildcard."""
    if isinstance(address, str):
        return [address]
    kinds: list[object] = [address, f"any{address.version}"]
    if address.is_unspecified:
        kinds.append(f"wildcard{address.version}")
        if address.version == 6 and listener.ipv6_only is not True:
            kinds.append("dual-stack")
    return kinds


def _clashes(listener: _Binding, address: _Address) -> list[object]:
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
    first: _Binding, theirs: _Address | None, listener: _Binding, mine: _Address | None, who: str
) -> Problem | None:
    if first.protocol != listener.protocol:
        return None
    resolved = f" ({mine})" if not listener.unix and str(mine) != listener.host else ""
    used = f"{listener.protocol} {listener.address}{resolved} is already used by {who}"
    if listener.unix or first.unix:
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


def _index(index: int) -> str:
    return f"listeners[{index}]"
