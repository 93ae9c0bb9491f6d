"""The lease on object storage: one writer per feature store through conditional writes.

An object store has no ``O_EXCL``, no rename and no mtime we may touch, but S3 (and stores
that copy its API) has conditional PUTs, and they give the same guarantees:

* **take**: ``PUT <cache>/.locks/<key>.lease`` with ``If-None-Match: *``: exactly one of several
  concurrent creators gets 200, the others 412;
* **heartbeat**: the holder rewrites the lease with ``If-Match: <its etag>`` every
  ``heartbeat`` seconds, which changes the etag; a 412 means someone broke the lease, and the
  holder stops beating;
* **stale**: a waiter judges a lease by *its own* clock: stale when the etag it sees has not
  changed for ``stale_after`` seconds (no clock of another machine is compared), or at once
  when the holder provably died on this machine (as for local leases);
* **break**: the waiter overwrites the stale lease with its own record under ``If-Match: <the
  etag it judged>``: of several breakers exactly one wins, and the old holder's next heartbeat
  fails (as with a local lease, a frozen holder that wakes up is not stopped; units are
  idempotent and vouched for by their markers, so that costs work, never wrong bytes).

A store that accepts these headers but ignores them would let two writers in, so before its
first lease on a cache root a process runs a probe: it creates a scratch object with
``If-None-Match: *``, then tries again with ``If-None-Match: *`` and with a wrong ``If-Match``;
if either of those succeeds the lease refuses, with one line naming ``--no-lease`` (for caches
only one process writes at a time). Only ``s3://`` roots (s3fs) are supported; others refuse
the same way.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from featurecache.cache.faults import checkpoint
from featurecache.cache.holders import holder_is_dead, process_identity
from featurecache.cache.storage import RemotePath, check_bucket
from featurecache.errors import LeaseError

#: The flag that turns the lease off, named in every refusal.
NO_LEASE_FLAG = "--no-lease"


class S3Conditional:
    """Conditional PUT, GET with etag, and DELETE of one object through s3fs's botocore client.

    Parameters
    ----------
    loc
        The object, on an ``s3://`` root.
    """

    def __init__(self, loc: RemotePath) -> None:
        self.loc = loc
        self.fs = loc.remote.fs
        self.bucket, self.key, _ = self.fs.split_path(loc.path)

    def _run(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, func, *args, **kwargs)

    def put(self, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """PUT ``body``; the new etag, or None when the condition failed (412, or 404 for ``If-Match``)."""
        kw: dict[str, Any] = {}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = if_match
        try:
            out = self._run(self.fs._call_s3, "put_object", Bucket=self.bucket, Key=self.key, Body=body, **kw)
        except (FileExistsError, FileNotFoundError):
            return None
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.loc.path)
        return str(out.get("ETag", ""))

    def get(self) -> tuple[bytes, str] | None:
        """The object's bytes and etag (from one GET), or None when it does not exist."""

        async def fetch() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, str(resp.get("ETag", ""))

        try:
            return self._run(fetch)
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        """Remove the object (absent is fine)."""
        try:
            self._run(self.fs._call_s3, "delete_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.loc.path)


def _precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


def conditional(loc: RemotePath) -> S3Conditional:
    """Conditional operations on ``loc``, after checking (once per root and process) that the store honours them.

    Raises
    ------
    LeaseError
        The root is not ``s3://``, or its store ignores ``If-None-Match`` / ``If-Match``.
    """
    if loc.remote.protocol not in ("s3", "s3a"):
        raise LeaseError(
            f"the lease on a {loc.remote.protocol}:// cache needs conditional writes, which featurecache only does on s3:// so far; "
            f"if only one process writes to this cache at a time, pass {NO_LEASE_FLAG}"
        )
    bucket = loc.path.split("/", 1)[0]
    problem = _probe(loc.remote, bucket, loc.parent)
    if problem:
        raise LeaseError(
            f"the object store of {loc.remote.protocol}://{bucket} ignores conditional writes ({problem}), so the lease cannot keep "
            f"two writers of one feature store apart; if only one process writes to this cache at a time, pass {NO_LEASE_FLAG}"
        )
    return S3Conditional(loc)


@lru_cache(maxsize=32)
def _probe(remote: Any, bucket: str, where: RemotePath) -> str:
    """``""`` when the store refuses a second ``If-None-Match: *`` PUT and a wrong ``If-Match``; else what it accepted."""
    obj = S3Conditional(where / f".probe-{uuid.uuid4().hex}")
    try:
        first = obj.put(b"probe", if_none_match=True)
        if first is None:
            check_bucket(where)  # a missing bucket answers 404 too: say so, not that the store ignores conditions
            return "a new object was refused as existing"
        if obj.put(b"probe again", if_none_match=True) is not None:
            return "a second PUT with If-None-Match: * replaced the object"
        if obj.put(b"probe again", if_match='"0123456789abcdef0123456789abcdef"') is not None:
            return "a PUT with a wrong If-Match replaced the object"
        return ""
    finally:
        obj.delete()


class ObjectLeaseMixin:
    """The object-storage half of :class:`featurecache.cache.lease.Lease` (see the module doc)."""

    path: RemotePath
    stale_after: float
    heartbeat: float
    _token: str
    _stop: threading.Event
    _thread: threading.Thread | None

    def _setup_object(self) -> None:
        self._obj: S3Conditional | None = None
        self._etag: str | None = None  # ours, while we hold the lease
        self._seen: tuple[str, float] | None = None  # (etag, our monotonic time when first seen)
        self._lock = threading.Lock()

    def _object(self) -> S3Conditional:
        if self._obj is None:
            self._obj = conditional(self.path)
        return self._obj

    def _record(self) -> bytes:
        return json.dumps(
            {"token": self._token, **process_identity(), "since": time.time(), "beat": uuid.uuid4().hex[:8]}
        ).encode()

    def _start_beating(self, etag: str) -> None:
        with self._lock:
            self._etag = etag
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_object, name="featurecache-lease", daemon=True)
        self._thread.start()

    def try_acquire(self) -> bool:
        """Take the lease if no object exists (``If-None-Match: *``); never blocks."""
        if self._etag is not None:
            return True  # taken over from a stale holder by break_stale
        etag = self._object().put(self._record(), if_none_match=True)
        if etag is None:
            return False
        checkpoint("lease_acquired")
        self._start_beating(etag)
        return True

    def _beat_object(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                if self._etag is None:
                    return
                try:
                    etag = self._object().put(self._record(), if_match=self._etag)
                except OSError:
                    continue  # a network blip: try again at the next beat, the lease is not lost yet
                self._etag = etag  # None: someone broke our lease; stop claiming it
                if etag is None:
                    return

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record (with its ``etag``), or None when free."""
        got = self._object().get()
        if got is None:
            return None
        data, etag = got
        try:
            info = json.loads(data)
        except ValueError:
            info = {}
        return {**(info if isinstance(info, dict) else {}), "etag": etag}

    def is_stale(self, judged: Mapping[str, Any] | None = None) -> bool:
        """Whether the holder is dead on this machine, or its etag has not changed for ``stale_after`` s of our clock."""
        info = self.holder() if judged is None else judged
        if info is None:
            return False
        now = time.monotonic()
        etag = str(info.get("etag", ""))
        if self._seen is None or self._seen[0] != etag:
            self._seen = (etag, now)
        return holder_is_dead(info) or now - self._seen[1] > self.stale_after

    def break_stale(self, judged: Mapping[str, Any] | None = None) -> bool:
        """Replace the stale lease with ours (``If-Match`` the judged etag); True if this call took it."""
        judged = self.holder() if judged is None else judged
        if not judged or not judged.get("etag"):
            return False
        etag = self._object().put(self._record(), if_match=str(judged["etag"]))
        if etag is None:
            return False  # another breaker won, or the holder beat meanwhile
        self._start_beating(etag)
        return True

    def release(self) -> None:
        """Give the lease back (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            etag, self._etag = self._etag, None
        if etag is None:
            return
        info = self.holder()
        if info and info.get("token") == self._token:
            self._object().delete()
            checkpoint("lease_released")
