"""Shard plans: several processes without a scheduler share one extraction by unit index.

``extract(..., shard=(i, N))`` (CLI ``--shard i/N``, or ``--shard auto`` inside a Slurm job
array) runs the units with ``index % N == i`` of one plan that every shard agrees on. The
first shard to hold the feature store's lease allocates the units and writes that plan, the
units with their slots in order, to ``<cache>/.shards/<view key>.json``; later shards read it
instead of allocating again, so no slot is allocated twice and no shard needs to know the
others. Units are written without the lease (they are idempotent and independent); each
shard, once its own units have markers, lists the markers, and the shard that sees all of
them takes the lease and writes the view. Because each shard lists only after writing its
own markers, the last one to finish always sees everything, whatever the interleaving.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from featurecache.cache import storage
from featurecache.cache.store import Unit
from featurecache.errors import UsageError

SHARDS_DIR = ".shards"
PLAN_FORMAT = 1


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/N"`` as ``(i, N)``; ``"auto"`` from ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``.

    Parameters
    ----------
    text
        ``None`` or empty for no sharding, ``i/N`` with ``0 <= i < N``, or ``auto``.
    environ
        The environment to read Slurm's variables from (default ``os.environ``).

    Returns
    -------
    (int, int) or None
        The shard index and count.

    Raises
    ------
    UsageError
        Malformed text, an index out of range, or ``auto`` outside a Slurm job array.
    """
    if not text:
        return None
    env = os.environ if environ is None else environ
    if text == "auto":
        task, count, low = (
            env.get("SLURM_ARRAY_TASK_ID"),
            env.get("SLURM_ARRAY_TASK_COUNT"),
            env.get("SLURM_ARRAY_TASK_MIN", "0"),
        )
        if not (task and count and task.isdigit() and count.isdigit() and low.isdigit()):
            raise UsageError(
                "--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (run it inside `sbatch --array`); else pass --shard i/N"
            )
        return check_shard((int(task) - int(low), int(count)))
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise UsageError(
            f"--shard {text!r} is not i/N; pass e.g. --shard 0/2 and --shard 1/2 to two processes, or --shard auto in a Slurm array"
        )
    return check_shard((int(i), int(n)))


def check_shard(shard: Any) -> tuple[int, int]:
    """``shard`` as ``(i, N)`` after checking ``0 <= i < N``.

    Raises
    ------
    UsageError
        Not a pair of integers with ``0 <= i < N``.
    """
    try:
        i, n = (int(x) for x in shard)
    except (TypeError, ValueError):
        raise UsageError(f"shard must be a pair (i, N), got {shard!r}; pass e.g. shard=(0, 2)") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(
            f"shard {i}/{n} is out of range: the index must be from 0 to N-1; pass e.g. --shard 0/{max(n, 2)}"
        )
    return i, n


def plan_path(cache_dir: storage.Location, view_key: str) -> storage.Location:
    """Where the shard plan of the dataset view ``view_key`` lives."""
    return cache_dir / SHARDS_DIR / f"{view_key}.json"


def read_plan(cache_dir: storage.Location, view_key: str, spec_key: str) -> list[Unit] | None:
    """The units of an existing shard plan for this view and store, or None when there is none.

    A plan for another store (the spec was rebuilt) or an unreadable one counts as none: the
    lease holder then allocates afresh, which never harms data (unrun slots stay empty).
    """
    try:
        doc = json.loads(storage.read_bytes(plan_path(cache_dir, view_key)).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or doc.get("spec_key") != spec_key:
        return None
    return [Unit(int(u["view"]), int(u["slot"]), tuple(u["digests"])) for u in doc.get("units", [])]


def write_plan(cache_dir: storage.Location, view_key: str, spec_key: str, units: list[Unit]) -> None:
    """Write the shard plan atomically (call it holding the store's lease)."""
    doc = {
        "format": PLAN_FORMAT,
        "spec_key": spec_key,
        "view_key": view_key,
        "units": [{"view": u.view, "slot": u.slot, "digests": list(u.digests)} for u in units],
    }
    path = plan_path(cache_dir, view_key)
    storage.make_dirs(path.parent)
    storage.publish_json(path, doc)


def remove_plan(cache_dir: storage.Location, view_key: str) -> None:
    """Delete the shard plan once the view is written."""
    storage.remove_file(plan_path(cache_dir, view_key))


def my_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    """The units of shard ``(i, N)``: those whose index in the plan is ``i`` modulo ``N``."""
    i, n = shard
    return [u for k, u in enumerate(units) if k % n == i]
