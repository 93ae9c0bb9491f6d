"""Trial result files: one JSON record per trial in ``<out>/trials/``, written whole by its worker, read back to resume.

A worker writes its trial's record (write + rename, so a file is whole or absent) the moment
the trial ends, failed or not. Resuming is therefore "run the trials whose file is missing or
failed": a sweep never re-runs a trial that succeeded. A record also names the sweep call that
wrote it (``call``), so a call that lost a worker can tell this call's failures, which are
final, from an earlier call's, which run again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache.fsio import write_json
from featurecache.training.runconfig import TRIAL_ID, recorded_name
from featurecache.training.sweeps.grid import TrialSpec

__all__ = ["SWEEP_FORMAT", "TRIALS_DIR", "finish_record", "finished_records", "new_record", "read_record"]

SWEEP_FORMAT = 1
TRIALS_DIR = "trials"


def _received(data: Any, parent_pid: int) -> str:
    """How this process got the features: in-process, memmap (shared), copied or streamed."""
    if os.getpid() == parent_pid:
        return "in-process"
    if not isinstance(data.X_train, np.ndarray):
        return "streamed"
    return "memmap" if isinstance(data.X_train, np.memmap) else "copied"


def new_record(trial: TrialSpec, data: Any, parent_pid: int, call: str = "") -> dict[str, Any]:
    """The record of ``trial`` before it runs: what it is, on which features, in which process.

    Parameters
    ----------
    trial
        The trial.
    data
        The ``TrainingData`` it trains on (its key is recorded).
    parent_pid
        The sweep's process id (to tell how this worker received the features).
    call
        Token of the sweep call that runs it.

    Returns
    -------
    dict
        ``status``, ``metrics`` and times are added by the caller.
    """
    return {
        "format": SWEEP_FORMAT,
        "trial": trial.id,
        "label": trial.label,
        "head": trial.head,
        "params": dict(trial.params),
        "given": dict(trial.given),
        "key": data.key,
        "call": call,
        "worker": {"pid": os.getpid(), "features": _received(data, parent_pid)},
    }


def finish_record(record: dict[str, Any], trials_dir: str | os.PathLike[str], seconds: float) -> None:
    """Stamp ``record`` with its time and write it as ``<trials_dir>/<trial>.json`` (whole or absent)."""
    record["seconds"] = round(seconds, 4)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(Path(trials_dir) / f"{record['trial']}.json", record)


def read_record(path: Path, key: str, *, call: str | None = None) -> dict[str, Any] | None:
    """The trial record at ``path`` if it counts as finished for features ``key``, else None (to be run).

    Parameters
    ----------
    path
        ``<trials_dir>/<id>.json``.
    key
        Feature-set key the record must carry.
    call
        Also accept a failed record written by this sweep call (its failure is final for the call).

    Returns
    -------
    dict or None
        A successful record (or this call's failed one), else None. A record of another
        trial than its file names is not this trial's: None, so the trial runs again.

    Raises
    ------
    RunError
        The record names its trial with something other than a trial id.
    """
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if record.get("status") == "ok" or (call and record.get("call") == call and record.get("status") == "failed"):
        # Its id names the leaderboard row, the TensorBoard run and an ensemble's member directory.
        trial = recorded_name(record.get("trial"), TRIAL_ID, source=path, fix=f"remove {path} to run that trial again")
        return record if trial == path.stem else None
    return None


def finished_records(
    trials: Sequence[TrialSpec], trials_dir: Path, key: str, *, call: str | None = None
) -> dict[str, dict[str, Any]]:
    """The records of the trials already finished in ``trials_dir`` (for these features), by trial id (see :func:`read_record`)."""
    records: dict[str, dict[str, Any]] = {}
    for t in trials:
        done = read_record(trials_dir / f"{t.id}.json", key, call=call)
        if done is not None:
            records[t.id] = done
    return records
