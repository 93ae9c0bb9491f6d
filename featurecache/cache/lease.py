"""The lease: one writer at a time per feature store, without trusting pids across machines.

A lease is a file created with ``O_EXCL`` under ``<cache>/.locks/``; its holder touches it
every ``heartbeat`` seconds. It is *stale* when its holder is provably dead, or when it was not
touched for ``stale_after`` seconds (other machines, other containers, frozen holders). "Provably
dead" needs the pid to mean the same process to us: the record carries the host name, the
kernel's boot id and the holder's *pid namespace* (the inode of ``/proc/self/ns/pid``) and
process start time, and only a holder in our own boot and pid namespace whose pid is gone, or
now belongs to a process started at another time, is judged dead at once. Two containers with
one host name have different pid namespaces, so each waits for the other's heartbeat to stop
instead of killing a live lease. A waiter breaks a stale lease by renaming it away, which only
one breaker can win.

The lease coordinates who *allocates and seals*; it never guards correctness of the data:
units are idempotent, and a unit's marker vouches for exactly its bytes. On an object-store
root ``Lease(...)`` is an :class:`ObjectLease`, the same protocol on conditional writes
(:mod:`featurecache.cache.objlease`); :class:`NoLease` is the ``--no-lease`` override.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from featurecache.cache import storage
from featurecache.cache.faults import checkpoint
from featurecache.cache.fsio import raise_if_disk_full
from featurecache.cache.holders import holder_is_dead, process_identity
from featurecache.cache.objlease import ObjectLeaseMixin
from featurecache.cache.storage import Location

LOCKS_DIR = ".locks"


class Lease:
    """An exclusive, heart-beaten lease on one key.

    Parameters
    ----------
    cache_dir
        Cache root; the lease file is ``<cache_dir>/.locks/<key>.lease``.
    key
        What the lease is for (a feature store's key).
    stale_after
        Seconds without a heartbeat after which anyone may break the lease.
    heartbeat
        Seconds between heartbeats of the holder.
    """

    def __new__(cls, cache_dir: Location, key: str, **kwargs: Any) -> Lease:
        # Like pathlib.Path: the caller names a lease, the root decides how it is held. Without a
        # rename (to break a stale lease with) the root is an object store: conditional writes.
        if cls is Lease and not storage.supports_rename(cache_dir):
            cls = ObjectLease
        return super().__new__(cls)

    def __init__(self, cache_dir: Location, key: str, *, stale_after: float = 60.0, heartbeat: float = 5.0) -> None:
        self.path: Any = storage.as_location(cache_dir, resolve=False) / LOCKS_DIR / f"{key}.lease"
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lease if it is free; never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise_if_disk_full(exc, self.path.parent)
            raise
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"token": self._token, **process_identity(), "since": time.time()}, f)
            checkpoint("lease_acquired")
        except OSError as exc:
            # A lease file without a record would look "being written" to waiters for a while.
            self.path.unlink(missing_ok=True)
            raise_if_disk_full(exc, self.path.parent)
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="featurecache-lease", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when free."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def is_stale(self, judged: Mapping[str, Any] | None = None) -> bool:
        """Whether the current lease belongs to a dead or silent holder."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        info = self.holder() if judged is None else judged
        if info is None:
            return age > max(2.0, self.stale_after)  # being written right now, or torn long ago
        return holder_is_dead(info) or age > self.stale_after

    def break_stale(self, judged: Mapping[str, Any] | None = None) -> bool:
        """Remove a stale lease; True if this call removed it.

        ``judged`` is the holder record that :meth:`is_stale` was decided on (default: read it
        now). Between that decision and the rename, another waiter may have broken the stale
        lease and taken a fresh one; renaming that away would let two processes write at
        once, so a moved lease with another token is put back (``link`` never overwrites).
        """
        judged = self.holder() if judged is None else judged
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if judged and moved and moved.get("token") != judged.get("token"):
            try:
                os.link(aside, self.path)
            except OSError:
                pass  # a third process took the lease meanwhile; the moved holder keeps running
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def wait(self, *, timeout: float | None = None, on_wait: Any = None) -> None:
        """Acquire, breaking stale leases, waiting while a live holder works.

        Parameters
        ----------
        timeout
            Seconds to wait at most (default: as long as the holder is alive).
        on_wait
            Called once with the holder's record when this call starts waiting.

        Raises
        ------
        LeaseError
            ``timeout`` passed with the lease still held.
        """
        from featurecache.errors import LeaseError

        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while not self.try_acquire():
            judged = self.holder()
            if self.is_stale(judged):
                self.break_stale(judged)
                continue
            if not told and on_wait is not None:
                on_wait(judged or {})
                told = True
            if deadline is not None and time.monotonic() > deadline:
                raise LeaseError(
                    f"another process still holds {self.path} after {timeout:.0f} s; wait for it, "
                    "or remove that file if the process is gone"
                )
            time.sleep(0.2)

    def release(self) -> None:
        """Give the lease back (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        info = self.holder()
        if info and info.get("token") == self._token:
            self.path.unlink(missing_ok=True)
            checkpoint("lease_released")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ObjectLease(ObjectLeaseMixin, Lease):
    """:class:`Lease` on an object-store root, held through conditional writes (see :mod:`featurecache.cache.objlease`)."""

    def __init__(self, cache_dir: Location, key: str, *, stale_after: float = 60.0, heartbeat: float = 5.0) -> None:
        super().__init__(cache_dir, key, stale_after=stale_after, heartbeat=heartbeat)
        self._setup_object()


class NoLease:
    """No lease at all (``--no-lease``): for a cache only one process writes at a time, on a store
    without conditional writes. Same interface as :class:`Lease`; every call succeeds at once."""

    def __init__(self, cache_dir: Location, key: str, **kwargs: Any) -> None:
        self.path = None

    def try_acquire(self) -> bool:
        """Always True."""
        return True

    def wait(self, *, timeout: float | None = None, on_wait: Any = None) -> None:
        """Return at once."""

    def release(self) -> None:
        """Nothing to give back."""

    def __enter__(self) -> NoLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
