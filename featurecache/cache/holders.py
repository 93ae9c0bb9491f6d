"""Who holds a lease: a process's checkable identity, and whether a recorded holder is provably dead.

Shared by the file lease (:mod:`featurecache.cache.lease`) and the object-store lease
(:mod:`featurecache.cache.objlease`); a holder is judged dead only on our host, boot and pid
namespace, never by comparing clocks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """Who a pid is, in terms another process can check: host, boot, pid namespace, start time.

    Parameters
    ----------
    pid
        A process id; default this process.

    Returns
    -------
    dict
        ``host``, ``pid``, ``boot`` (kernel boot id or None), ``pidns`` (namespace inode or
        None) and ``start`` (start time in clock ticks since boot, or None) -- None where
        ``/proc`` does not say (not Linux).
    """
    pid = os.getpid() if pid is None else int(pid)
    ns = None
    if pid == os.getpid():
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = None
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": ns,
        "start": _start_time(pid),
    }


def _start_time(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22, after the parenthesised name
    except (IndexError, ValueError):
        return None


def holder_is_dead(info: Mapping[str, Any]) -> bool:
    """True only when ``info``'s process is provably gone: same host, boot and pid namespace,
    and its pid is free or now another process (a different start time)."""
    me = process_identity()
    if info.get("host") != me["host"] or not info.get("boot") or info.get("boot") != me["boot"]:
        return False
    if info.get("pidns") is None or info.get("pidns") != me["pidns"]:
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = _start_time(pid)
    return info.get("start") is not None and start is not None and start != info.get("start")
