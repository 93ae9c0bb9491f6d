"""Fault injection: make this process die (or fail) at a named point, to test crash safety.

Crash safety is a claim about *every* point a writer can be interrupted at, and a test that
kills a process after a random delay only ever hits the few points where it spends its time.
So the writers call :func:`checkpoint` at each step whose interruption leaves a distinct state
on disk (lease taken, entry built aside, features chunk written but not ``valid``, marker temp
file written but not renamed, ...), and the tests set ::

    FEATURECACHE_FAULT="<point>[@<n>][:<action>]"

to act the ``n``-th time (default 1) ``<point>`` is reached in this process:

* ``kill`` (default): ``SIGKILL`` to ourselves, so no ``finally`` and no ``atexit`` runs, as
  with the OOM killer, a Slurm pre-emption or a power cut of the process;
* ``enospc``: raise ``OSError(ENOSPC)`` as a full disk would, through the normal error path;
* ``stop``: ``SIGSTOP`` to ourselves, a frozen holder (the test resumes or kills it);
* ``exit``: ``os._exit(1)``, a process that ends itself abruptly (a native library aborting).

With ``FEATURECACHE_FAULT_ONCE=<path>`` as well, the fault fires only in the one process that
creates ``<path>`` first (``O_EXCL``): a Dask worker that a nanny restarts with the same
environment, or the second shard, then runs clean, so "fails on its first try" can be tested.

When the variable is unset a checkpoint costs one cached lookup. The variable is read once per
process (the first checkpoint), so setting it later in a running process has no effect; tests
run the extraction in a subprocess with the variable in its environment.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass, field
from functools import lru_cache

from featurecache.errors import UsageError

FAULT_ENV = "FEATURECACHE_FAULT"
FAULT_ONCE_ENV = "FEATURECACHE_FAULT_ONCE"
ACTIONS: tuple[str, ...] = ("kill", "enospc", "stop", "exit")

#: Every checkpoint name the library calls, so a typo in FEATURECACHE_FAULT fails loudly
#: instead of silently injecting nothing (a crash test that never crashes passes vacuously).
POINTS: tuple[str, ...] = (
    "lease_acquired",
    "entry_tmp_created",
    "entry_created",
    "model_built",
    "unit_prepared",
    "unit_forward_done",
    "unit_data_written",
    "unit_valid_written",
    "marker_tmp_written",
    "unit_marker_written",
    "before_seal",
    "sealed",
    "lease_released",
    "trial_fitted",  # a sweep trial (or group of dense trials) is trained, its record not yet written
)


@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``FEATURECACHE_FAULT``: act at the ``nth`` arrival at ``point``."""

    point: str
    nth: int = 1
    action: str = "kill"

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``<point>[@<n>][:<action>]``.

        Raises
        ------
        UsageError
            Unknown point or action, or ``n`` is not a positive integer.
        """
        head, _, action = text.strip().partition(":")
        point, _, nth = head.partition("@")
        action = action or "kill"
        if point not in POINTS:
            raise UsageError(f"{FAULT_ENV} point {point!r} is unknown; use one of {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise UsageError(f"{FAULT_ENV} action {action!r} is unknown; use one of {', '.join(ACTIONS)}")
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise UsageError(f"{FAULT_ENV} count {nth!r} must be a positive integer, as in {point}@3:{action}")
        return cls(point, int(nth or 1), action)


@dataclass
class _Injector:
    """The one piece of process state here: how often the armed point was reached.

    It has to be state (the n-th arrival is a property of this process's history), so it lives
    in one instance owned by :func:`_injector`'s cache rather than in a mutable module global,
    and is guarded by a lock because decode, backbone and writer threads all pass checkpoints.
    """

    spec: FaultSpec
    once: str = ""
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arrive(self, name: str) -> None:
        if name != self.spec.point:
            return
        with self.lock:
            self.count += 1
            fire = self.count == self.spec.nth
        if not fire or (self.once and not _claim(self.once)):
            return
        if self.spec.action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV} at {name})")
        if self.spec.action == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGSTOP if self.spec.action == "stop" else signal.SIGKILL)


@lru_cache(maxsize=1)
def _injector() -> _Injector | None:
    text = os.environ.get(FAULT_ENV, "")
    return _Injector(FaultSpec.parse(text), once=os.environ.get(FAULT_ONCE_ENV, "")) if text.strip() else None


def _claim(path: str) -> bool:
    """Create ``path`` exclusively: True in the one process across the machine that does."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def checkpoint(name: str) -> None:
    """Mark a point where a crash leaves a distinct on-disk state; a no-op unless armed.

    Parameters
    ----------
    name
        One of :data:`POINTS`.

    Raises
    ------
    OSError
        ``ENOSPC``, when ``FEATURECACHE_FAULT`` names this point with the ``enospc`` action.
    UsageError
        ``FEATURECACHE_FAULT`` is malformed (raised at the first checkpoint of the process).
    """
    injector = _injector()
    if injector is not None:
        injector.arrive(name)
