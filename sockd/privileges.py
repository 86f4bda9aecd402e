"""Who a listener's worker runs as, and whom its Unix socket file belongs to: a listener's `user`
and `group` (and a Unix listener's `owner` and `owner_group`), looked up as the config is loaded
(`account_id`, `primary_group`, `may_become`), and `drop`, the one place a worker gives up root.

The supervisor stays root: it binds every socket (ports below 1024 too) and passes each worker
its descriptors (see sockd.forkserver). A worker whose listener names a user calls `drop` once it
holds everything it needs from root (its sockets, channel and counters are open descriptors, its
TLS contexts built from the material in its spec) and before it starts a thread or accepts a
client; an `exec` child inherits what it became. `drop` then checks that root cannot be had back,
and the worker refuses to serve if it could.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
from collections.abc import Callable
from pathlib import Path

from sockd.errors import SockdError

MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the kernel: never an id
# The capability sets a process that gave up root must hold none of (/proc/self/status).
_CAPABILITY_SETS = ("CapPrm", "CapEff", "CapAmb")


class PrivilegeError(SockdError):
    """A worker could not become its listener's user, or could become root again."""


def account_id(value: str | int, kind: str) -> int:
    """The id of a user (`kind` "user") or group ("group") named by name or number; a string of
    digits is a number, as systemd's User= reads it. ValueError names what is wrong."""
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        number = int(value)
        if number > MAX_ID:
            raise ValueError(f"{number} is not a {kind} id: at most {MAX_ID}")
        return number
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        database = "password" if kind == "user" else "group"
        raise ValueError(f"no {kind} named {value!r} in the {database} database") from None


def primary_group(uid: int) -> int:
    """A user's own group, which a listener without `group` runs with."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise ValueError(f"uid {uid} is not in the password database, so has no group of its own: give group") from None


def may_become(uid: int | None = None, gid: int | None = None) -> str | None:
    """Why this process cannot make a worker (or a file) belong to `uid` and `gid`, or None if it
    can: root can; any other user only to itself (and to a group it is in, for a file's group)."""
    euid = os.geteuid()
    if euid == 0:
        return None
    if uid is not None and uid != euid:
        return f"sockd runs as uid {euid}, not root, so cannot use uid {uid}: name uid {euid} or start sockd as root"
    if gid is not None and gid != os.getegid() and gid not in os.getgroups():
        return f"sockd runs as uid {euid}, not root, and is not in group {gid}: start sockd as root"
    return None


def drop(uid: int, gid: int) -> None:
    """Become `uid` with `gid` as the only group, for good (PrivilegeError if not).

    The supplementary groups become [gid] rather than none: the same access, and an `exec` child
    that is a setgid program, whose effective group changes, keeps the listener's group. In this
    order: setgroups and setgid need root, which setuid gives up. Not root (sockd's own user
    named, see may_become), nothing is changed, and the same checks hold."""
    if os.geteuid() == 0:
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as exc:
            raise PrivilegeError(f"cannot become uid {uid} gid {gid}: {exc.strerror}") from None
        _no_capabilities()
    check(uid, gid)


def check(uid: int, gid: int) -> None:
    """PrivilegeError unless the real, effective and saved ids are `uid` and `gid` and neither
    root's uid nor its gid can be had back."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(f"runs as uids {os.getresuid()} gids {os.getresgid()}, not uid {uid} gid {gid}")
    _refused(os.setuid, "uid")
    if gid != 0:  # a listener may name group root: then setgid(0) is a change to its own gid
        _refused(os.setgid, "gid")


def _refused(regain: Callable[[int], None], what: str) -> None:
    try:
        regain(0)
    except PermissionError:
        return
    except OSError as exc:
        raise PrivilegeError(f"set{what}(0) failed with {errno.errorcode.get(exc.errno or 0)}, not EPERM") from None
    raise PrivilegeError(f"set{what}(0) succeeded: root's {what} can be had back")


def _no_capabilities() -> None:
    """PrivilegeError if a capability outlived the setuid (as it does with SECBIT_KEEP_CAPS or
    SECBIT_NO_SETUID_FIXUP set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in _CAPABILITY_SETS and int(value, 16):
            raise PrivilegeError(f"still holds capabilities after setuid: {name} {value.strip()}")
