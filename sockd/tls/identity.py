"""Who a verified TLS peer is (its certificate's subject CN and SANs), and whether a listener's
`allow` lets it in, with ghostunnel's --allow-* rules: any one match admits it; in a DNS name a
`*` stands for exactly one label, in a URI for exactly one path segment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    """A verified peer certificate's names."""

    cn: str | None = None
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()

    @classmethod
    def of(cls, peercert: dict[str, Any] | None) -> Identity | None:
        """From ssl's getpeercert(): None if the peer sent no certificate (or it was not verified)."""
        if not peercert:
            return None
        names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
        sans = peercert.get("subjectAltName", ())
        return cls(
            cn=names[0] if names else None,
            dns=tuple(value for kind, value in sans if kind == "DNS"),
            uri=tuple(value for kind, value in sans if kind == "URI"),
        )

    def fields(self) -> dict[str, object]:
        """For a connection's log line: only what the certificate has."""
        said: dict[str, object] = {}
        if self.cn is not None:
            said["client_cn"] = self.cn
        if self.dns:
            said["client_dns"] = list(self.dns)
        if self.uri:
            said["client_uri"] = list(self.uri)
        return said


@dataclass(frozen=True)
class Allowed:
    """A listener's `allow`: the names a verified client may have."""

    cn: frozenset[str] = frozenset()
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()

    def admits(self, peer: Identity | None) -> bool:
        if peer is None:
            return False
        if peer.cn is not None and peer.cn in self.cn:
            return True
        if any(_matches(pattern, name, ".", fold=True) for pattern in self.dns for name in peer.dns):
            return True
        return any(_uri_matches(pattern, name) for pattern in self.uri for name in peer.uri)


def _matches(pattern: str, name: str, separator: str, *, fold: bool = False) -> bool:
    """`*` matches one whole non-empty part between separators; every other part is equal."""
    if fold:
        pattern, name = pattern.lower(), name.lower()
    wanted, parts = pattern.split(separator), name.split(separator)
    return len(wanted) == len(parts) and all(w == p or (w == "*" and p) for w, p in zip(wanted, parts, strict=True))


def _uri_matches(pattern: str, uri: str) -> bool:
    """A URI's scheme and authority are compared whole (a host is case-insensitive), its path
    segment by segment."""
    scheme, _, rest = pattern.partition("://")
    their_scheme, _, their_rest = uri.partition("://")
    authority, _, path = rest.partition("/")
    their_authority, _, their_path = their_rest.partition("/")
    if scheme.lower() != their_scheme.lower() or authority.lower() != their_authority.lower():
        return False
    return _matches(path, their_path, "/")
