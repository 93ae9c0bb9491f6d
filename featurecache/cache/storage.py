"""Where the cache's bytes live: a local folder (``pathlib.Path``) or an object store (an fsspec URL).

This module is the cache's one storage interface: every function takes a :data:`Location` of
either kind, and only this module (with :mod:`~featurecache.cache.fsio` for local files and
:mod:`~featurecache.cache.objlease` for conditional writes) tells the two apart. Where the
callers' algorithm itself differs (build aside and rename into place, or write in place and
publish last), they ask :func:`supports_rename` instead of testing a type.

A cache root is a path (``/data/cache``, ``file:///data/cache``) or an fsspec URL
(``s3://bucket/prefix``, ``gs://...``). Local roots stay ``pathlib.Path`` objects and every
function here does, for them, exactly what the cache did before object storage existed (temp
file + rename, fsync, ``os.listdir``), so local bytes and guarantees are unchanged. Remote roots
are :class:`RemotePath` objects: the small part of ``pathlib`` the cache uses (``/``, ``name``,
``parent``, ``str``) over an fsspec file system, so ``cache_dir / "features" / name`` reads the
same for both, and the operations that differ live here:

* **publish**: locally a synced temp file renamed into place; on object storage one PUT, which
  is whole or absent. A document that makes something visible (a store's or view's
  ``zarr.json`` attributes, a unit's marker) is written after everything it vouches for.
* **listing**: one recursive listing (``find``) instead of a walk, after dropping fsspec's
  cached listings (s3fs caches them per instance, and other processes write to the bucket).
* **renaming**: local writers build aside and rename into place (and leave ``*.partial`` temp
  files when killed); object stores cannot rename, so there a writer removes what it replaces
  and publishes its ``zarr.json`` last (:func:`supports_rename`, :func:`discard`).
* **zarr stores**: a path string for local roots (Zarr's ``LocalStore``, which writes each chunk
  through a temp file and a rename), a Zarr ``FsspecStore`` (one PUT per chunk) for remote ones.

Storage options come from ``$FEATURECACHE_STORAGE_OPTIONS`` (a JSON object passed to fsspec);
without it, s3fs reads the usual AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ...). Conditional writes for the lease are in :mod:`featurecache.cache.objlease`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, TypeGuard

from featurecache.errors import BucketNotFoundError, UsageError

STORAGE_OPTIONS_ENV = "FEATURECACHE_STORAGE_OPTIONS"
#: A URL scheme of two or more characters (so a Windows drive letter is never one).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")
#: File systems whose first path component is a bucket (or container) that must exist beforehand.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def is_url(text: str) -> bool:
    """Whether ``text`` is an fsspec URL of a non-local file system (``file://`` is local)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and _SCHEME.fullmatch(scheme) is not None and scheme.lower() not in ("file", "local")


def storage_options() -> dict[str, Any]:
    """The fsspec options of remote roots: ``$FEATURECACHE_STORAGE_OPTIONS`` (JSON), plus the
    S3 endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when set and not given.

    Raises
    ------
    UsageError
        The variable is not a JSON object.
    """
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    try:
        opts = json.loads(text) if text else {}
    except ValueError as exc:
        raise UsageError(
            f"{STORAGE_OPTIONS_ENV} is not valid JSON ({exc}); set it to an object, e.g. '{{\"anon\": false}}'"
        ) from None
    if not isinstance(opts, dict):
        raise UsageError(f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec options, got {text[:60]!r}")
    return opts


class Remote:
    """One object-store file system: a protocol and its fsspec options (picklable, so Dask
    workers reopen the same store from the environment they share)."""

    def __init__(self, protocol: str, options: dict[str, Any]) -> None:
        self.protocol = protocol
        self.options = dict(options)
        self.buckets_seen: set[str] = set()  # buckets known to exist (they are not deleted under a cache)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Remote, (self.protocol, self.options))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and (self.protocol, self.options) == (other.protocol, other.options)

    def __hash__(self) -> int:
        return hash((self.protocol, json.dumps(self.options, sort_keys=True, default=str)))

    def _kwargs(self) -> dict[str, Any]:
        opts = dict(self.options)
        if self.protocol in ("s3", "s3a"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            client_kwargs = dict(opts.get("client_kwargs") or {})
            if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
                opts["endpoint_url"] = endpoint
        return opts

    @cached_property
    def fs(self) -> Any:
        """The synchronous fsspec file system (markers, documents, listings, the lease)."""
        import fsspec

        try:
            return fsspec.filesystem(self.protocol, **self._kwargs())
        except (ImportError, ValueError) as exc:
            hint = " (pip install 'featurecache[s3]')" if self.protocol in ("s3", "s3a") else ""
            raise UsageError(
                f"cannot open a {self.protocol}:// cache root: {' '.join(str(exc).split())[:160]}{hint}"
            ) from None

    def endpoint(self) -> str | None:
        """The endpoint URL requests go to, when one is configured (else the provider's default)."""
        opts = self._kwargs()
        return opts.get("endpoint_url") or dict(opts.get("client_kwargs") or {}).get("endpoint_url")

    @cached_property
    def async_fs(self) -> Any:
        """An asynchronous instance of the same file system, for Zarr's ``FsspecStore``."""
        import fsspec

        fs = (
            fsspec.filesystem(self.protocol, **{**self._kwargs(), "asynchronous": True})
            if self.fs.async_impl
            else self.fs
        )
        if not fs.async_impl:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            fs = AsyncFileSystemWrapper(fs, asynchronous=True)
        return fs


class RemotePath:
    """A location under an object-store root: ``protocol://bucket/key/prefix``.

    Supports the part of ``pathlib`` the cache uses to name things (``/``, ``name``, ``parent``,
    ``str``, ordering); reading and writing go through this module's functions.
    """

    __slots__ = ("remote", "path")

    def __init__(self, remote: Remote, path: str) -> None:
        self.remote = remote
        self.path = path.rstrip("/")

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        part = str(part).strip("/")
        return RemotePath(self.remote, f"{self.path}/{part}" if part else self.path)

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        """The location one level up."""
        return RemotePath(self.remote, self.path.rsplit("/", 1)[0]) if "/" in self.path else self

    @property
    def url(self) -> str:
        """``protocol://path``."""
        return f"{self.remote.protocol}://{self.path}"

    def with_name(self, name: str) -> RemotePath:
        """A sibling called ``name``."""
        return self.parent / name

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.remote, self.path) == (other.remote, other.path)

    def __hash__(self) -> int:
        return hash((self.remote, self.path))

    def __lt__(self, other: RemotePath) -> bool:
        return self.path < other.path

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemotePath, (self.remote, self.path))

    def expanduser(self) -> RemotePath:
        """Itself (for code written against ``pathlib``)."""
        return self

    def absolute(self) -> RemotePath:
        """Itself (for code written against ``pathlib``)."""
        return self


#: A location in a cache: a local path or an object-store location.
Location = Path | RemotePath


def as_location(value: str | os.PathLike[str] | RemotePath, *, resolve: bool = True) -> Location:
    """A path or URL as a :data:`Location` (``file://`` URLs become local paths).

    ``resolve=False`` keeps a local path as given (not made absolute, ``~`` not expanded).

    Raises
    ------
    UsageError
        Bad storage options, or the URL's file system is not installed.
    """
    if isinstance(value, RemotePath):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    if text.startswith("file://") or not is_url(text):
        local = Path(text[len("file://") :] if text.startswith("file://") else text)
        return local.expanduser().absolute() if resolve else local
    protocol, _, rest = text.partition("://")
    if not rest.strip("/"):
        raise UsageError(f"cache URL {text!r} names no bucket; pass e.g. {protocol}://bucket/featurecache")
    return RemotePath(_remote(protocol.lower(), json.dumps(storage_options(), sort_keys=True)), rest)


@lru_cache(maxsize=16)
def _remote(protocol: str, options_json: str) -> Remote:
    # One Remote (hence one pair of file system instances) per root and options in a process.
    return Remote(protocol, json.loads(options_json))


def is_remote(loc: Any) -> bool:
    """Whether ``loc`` is on object storage."""
    return isinstance(loc, RemotePath)


def supports_rename(loc: Location) -> TypeGuard[Path]:
    """Whether ``loc`` is on a file system with an atomic rename (a local folder).

    There, what is built aside is renamed into place, a stale lease is broken by renaming it
    away, and a killed writer leaves ``*.partial`` temp files. On object storage nothing can be
    renamed; each PUT is whole or absent instead, so writers write in place and publish last.
    """
    return not isinstance(loc, RemotePath)


def refuse_remote(loc: Location, what: str) -> Path:
    """``loc``, a local root; a one-line error when ``what`` (a command) is asked of an object-store cache.

    Returns
    -------
    Path
        ``loc`` itself.

    Raises
    ------
    UsageError
        ``loc`` is a :class:`RemotePath`.
    """
    if isinstance(loc, RemotePath):
        raise UsageError(
            f"{what} does not work on an object-store cache ({loc}) yet; run it on a local or shared-file-system cache"
        )
    return loc


def check_bucket(loc: RemotePath) -> None:
    """Raise a one-line error when the bucket of ``loc`` does not exist.

    Called where an object store answered "not found" (an empty listing, a refused write):
    without it a missing bucket reads as an empty cache, a store that "ignores conditional
    writes", or a bare ``FileNotFoundError``. A bucket seen once is not asked about again.

    Raises
    ------
    BucketNotFoundError
        The bucket does not exist at the endpoint used.
    """
    remote = loc.remote
    bucket = loc.path.split("/", 1)[0]
    if remote.protocol not in _BUCKET_PROTOCOLS or bucket in remote.buckets_seen:
        return
    fs = remote.fs
    fs.invalidate_cache(bucket)
    found = _bucket_exists(fs, remote.protocol, bucket)
    if found is not False:
        if found:
            remote.buckets_seen.add(bucket)
        return  # None: the store would not say (forbidden, unreachable); the operation's own error says it
    endpoint = remote.endpoint()
    where = f"at {endpoint}" if endpoint else "at the provider's default endpoint"
    create = f"create it (`aws s3 mb s3://{bucket}`)" if remote.protocol in ("s3", "s3a") else "create it"
    raise BucketNotFoundError(
        f"bucket {bucket!r} does not exist {where} (asked for {loc.url}); {create}, "
        "or check the URL and the endpoint (AWS_ENDPOINT_URL or endpoint_url in $FEATURECACHE_STORAGE_OPTIONS)"
    )


def _bucket_exists(fs: Any, protocol: str, bucket: str) -> bool | None:
    """Whether ``bucket`` exists; None when the store does not say (a refusal, a network error)."""
    if protocol not in ("s3", "s3a"):
        return bool(fs.exists(bucket))
    from fsspec.asyn import sync

    try:
        sync(fs.loop, fs._call_s3, "head_bucket", Bucket=bucket)  # s3fs turns a 404 into FileNotFoundError
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - forbidden, no credentials, unreachable: not an answer
        return None
    return True


# -- reading --------------------------------------------------------------------------------
def read_bytes(loc: Location) -> bytes:
    """The file's bytes.

    Raises
    ------
    FileNotFoundError
        There is no such file (or object).
    """
    if isinstance(loc, RemotePath):
        return loc.remote.fs.cat_file(loc.path)
    return loc.read_bytes()


def read_many(locs: Iterable[Location]) -> dict[Location, bytes | BaseException]:
    """Several files' bytes (objects fetched concurrently); a missing or unreadable one maps to its exception."""
    locs = list(locs)
    if not locs:
        return {}
    remote = [loc for loc in locs if isinstance(loc, RemotePath)]
    if len(remote) < len(locs):  # local files: read one by one
        out: dict[Location, bytes | BaseException] = {}
        for loc in locs:
            try:
                out[loc] = read_bytes(loc)
            except OSError as exc:
                out[loc] = exc
        return out
    fs = remote[0].remote.fs
    got = fs.cat([loc.path for loc in remote], on_error="return")
    if not isinstance(got, dict):  # one path: fsspec returns the bytes themselves
        got = {remote[0].path: got}
    return {loc: got.get(loc.path, FileNotFoundError(loc.url)) for loc in remote}


def is_dir(loc: Location) -> bool:
    """Whether ``loc`` is a directory (locally following links) or a prefix with objects under it."""
    if isinstance(loc, RemotePath):
        fs = loc.remote.fs
        fs.invalidate_cache(loc.path)
        try:
            found = bool(fs.isdir(loc.path))
        except OSError:
            found = False
        if not found:
            check_bucket(loc)
        return found
    return loc.is_dir()


def is_link(loc: Location) -> bool:
    """Whether ``loc`` is a local symbolic link (object stores have none)."""
    return not isinstance(loc, RemotePath) and loc.is_symlink()


def exists(loc: Location) -> bool:
    """Whether a file or directory is at ``loc``."""
    if isinstance(loc, RemotePath):
        loc.remote.fs.invalidate_cache(loc.path)
        return bool(loc.remote.fs.exists(loc.path))
    return loc.exists() or loc.is_symlink()


def children(loc: Location) -> list[Location]:
    """The entries directly under ``loc``, sorted by name (none when it does not exist)."""
    if isinstance(loc, RemotePath):
        fs = loc.remote.fs
        fs.invalidate_cache(loc.path)
        try:
            names = fs.ls(loc.path, detail=False)
        except FileNotFoundError:
            check_bucket(loc)
            return []
        return sorted(RemotePath(loc.remote, str(n)) for n in names if str(n).rstrip("/") != loc.path)
    try:
        return sorted(loc.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def glob(loc: Location, pattern: str) -> list[Location]:
    """The entries directly under ``loc`` whose names match ``pattern`` (``fnmatch``), sorted."""
    if isinstance(loc, RemotePath):
        import fnmatch

        return [c for c in children(loc) if fnmatch.fnmatchcase(c.name, pattern)]
    return sorted(loc.glob(pattern)) if loc.is_dir() else []


def find(loc: Location) -> list[str]:
    """Every file (object) under ``loc``, as ``/``-separated paths relative to it, from one fresh
    recursive listing (locally a walk that follows no link)."""
    if not isinstance(loc, RemotePath):
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(loc, followlinks=False):
            rel = Path(dirpath).relative_to(loc).as_posix()
            out.extend(name if rel == "." else f"{rel}/{name}" for name in files)
        return sorted(out)
    fs = loc.remote.fs
    fs.invalidate_cache(loc.path)
    try:
        found = fs.find(loc.path, detail=False)
    except FileNotFoundError:
        check_bucket(loc)
        return []
    prefix = loc.path + "/"
    return [str(p)[len(prefix) :] for p in found if str(p).startswith(prefix)]


def newest_mtime(loc: Location) -> float:
    """The newest modification time (seconds since the epoch) of ``loc`` and everything under it
    (locally never following links); 0.0 when there is nothing."""
    if not isinstance(loc, RemotePath):
        try:
            newest = loc.lstat().st_mtime
        except OSError:
            return 0.0
        if loc.is_dir() and not loc.is_symlink():
            for dirpath, dirs, files in os.walk(loc, followlinks=False):
                for name in (*dirs, *files):
                    try:
                        newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                    except OSError:
                        pass
        return newest
    fs = loc.remote.fs
    fs.invalidate_cache(loc.path)
    try:
        found = fs.find(loc.path, detail=True)
    except (FileNotFoundError, OSError):
        return 0.0
    newest = 0.0
    for info in found.values():
        stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        try:
            newest = max(newest, float(stamp))
        except (TypeError, ValueError):
            continue
    return newest


def tree_size(loc: Location) -> int:
    """Bytes under ``loc`` (locally never following links)."""
    if isinstance(loc, RemotePath):
        fs = loc.remote.fs
        fs.invalidate_cache(loc.path)
        try:
            return int(fs.du(loc.path, total=True))
        except (FileNotFoundError, OSError):
            return 0
    from featurecache.cache.fsio import tree_size as local_tree_size

    return local_tree_size(loc)


def temp_files(loc: Location) -> list[Path]:
    """The ``*.partial`` temp files that killed writers left under ``loc`` (never following a link).

    None on object storage: every write there is one whole PUT (and no chunk is listed to learn it).
    """
    if isinstance(loc, RemotePath) or loc.is_symlink():
        return []
    out: list[Path] = []
    for dirpath, _dirs, files in os.walk(loc, followlinks=False):
        out.extend(Path(dirpath) / name for name in files if name.endswith(".partial"))
    return out


# -- writing --------------------------------------------------------------------------------
def publish_json(loc: Location, payload: Any, *, before_rename: Callable[[], None] | None = None) -> None:
    """Make the JSON document ``payload`` visible at ``loc``, whole or not at all.

    Locally: :func:`~featurecache.cache.fsio.write_json_atomic` (synced temp file, rename).
    On object storage: one PUT, which is atomic; ``before_rename`` is called just before it, so
    the crash points of both paths line up.
    """
    if isinstance(loc, RemotePath):
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        if before_rename is not None:
            before_rename()
        loc.remote.fs.pipe_file(loc.path, data)
        return
    from featurecache.cache.fsio import write_json_atomic

    write_json_atomic(loc, payload, before_rename=before_rename)


def remove_file(loc: Location) -> None:
    """Delete one file or object if it is there."""
    if isinstance(loc, RemotePath):
        try:
            loc.remote.fs.rm_file(loc.path)
        except FileNotFoundError:
            pass
        return
    loc.unlink(missing_ok=True)


def remove_tree(loc: Location) -> None:
    """Delete everything under ``loc`` (locally a link is removed, never followed).

    On object storage, where nothing can be renamed aside first, the ``zarr.json`` directly
    under ``loc`` (what makes a store or view visible) goes first: from then on no reader takes
    the half-deleted rest for an entry.
    """
    if isinstance(loc, RemotePath):
        fs = loc.remote.fs
        remove_file(loc / "zarr.json")
        fs.invalidate_cache(loc.path)
        try:
            fs.rm(loc.path, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(loc.path)
        return
    if loc.is_symlink() or loc.is_file():
        loc.unlink(missing_ok=True)
    elif loc.is_dir():
        shutil.rmtree(loc, ignore_errors=True)


def make_durable(locs: Iterable[Location]) -> None:
    """Flush local files (and their directory entries) to disk, so that what vouches for them
    can be written next; an object store acknowledges a PUT only once it is durable."""
    from featurecache.cache.fsio import fsync_file

    for loc in locs:
        if not isinstance(loc, RemotePath):
            fsync_file(loc)


def remove_group(loc: Location, *, listed: bool = False) -> bool:
    """Delete the Zarr group at ``loc`` whose only document is its ``zarr.json`` (a unit's marker);
    whether there was one.

    Locally its directory goes (with a temp file a killed writer left in it; a link is not
    followed). On object storage the group is that one object, deleted without listing the
    prefix; it is asked about (one HEAD) only when the caller has not ``listed`` it already.
    """
    if isinstance(loc, RemotePath):
        if not (listed or exists(loc / "zarr.json")):
            return False
        remove_file(loc / "zarr.json")
        return True
    if not loc.is_dir() or loc.is_symlink():
        return False
    shutil.rmtree(loc)
    return True


def discard(loc: Location, *, trash_dir: Location) -> None:
    """Delete the directory ``loc`` so that no reader sees it half deleted.

    Locally it is first renamed to ``trash_dir/rm-<name>-<hex>`` (across file systems it is
    deleted in place), and a link is removed, never followed. On object storage, which cannot
    rename, :func:`remove_tree` deletes its ``zarr.json`` first.
    """
    if isinstance(loc, RemotePath) or isinstance(trash_dir, RemotePath):
        remove_tree(loc)
        return
    if loc.is_symlink():
        loc.unlink()
        return
    trash = trash_dir / f"rm-{loc.name}-{uuid.uuid4().hex[:6]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(loc, trash)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        trash = loc  # another file system: delete in place (readers may see it go, never see it change)
    shutil.rmtree(trash, ignore_errors=True)


def make_dirs(loc: Location) -> None:
    """Create a local directory and its parents (object stores have no directories)."""
    if not isinstance(loc, RemotePath):
        loc.mkdir(parents=True, exist_ok=True)


def zarr_store(loc: Location, *, read_only: bool = False) -> Any:
    """What ``zarr.open_group`` / ``zarr.open_array`` should get for ``loc``.

    A path string for local roots (Zarr's local store, as the cache always used), and an
    ``FsspecStore`` over the asynchronous file system for remote ones.
    """
    if isinstance(loc, RemotePath):
        from zarr.storage import FsspecStore

        fs = loc.remote.async_fs
        fs.invalidate_cache(loc.path)
        return FsspecStore(fs, path=loc.path, read_only=read_only)
    return str(loc)


def local_dir_for(loc: Location, name: str) -> Path:
    """A local directory for what must stay on this machine (memoised digests of local files).

    For a local root: ``<root>/<name>``. For an object-store root: under
    ``$XDG_CACHE_HOME/featurecache/`` (default ``~/.cache``), since those digests describe files
    of this machine, keyed by their path, size and mtime.
    """
    if not isinstance(loc, RemotePath):
        return loc / name
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "featurecache" / name.lstrip(".")
