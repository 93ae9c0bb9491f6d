"""What a run directory's ``config.json`` records, read without loading its head.

The constants a run is written with (its format, the label of a cached validation split, the
kind of an ensemble) and the readers that report, predict, ensembles and fine-tuning share: the
config itself, whether the run needs several backbones, and the dataset it was made from. This
module sits below all of them (it imports no other featurecache module at import time), so
none of them imports another upward to read a config.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "CACHED_VAL_LABEL",
    "ENSEMBLE_KIND",
    "MEMBER_DIR",
    "NameForm",
    "RUN_FORMAT",
    "TRIAL_ID",
    "final_name",
    "is_assembled",
    "read_run_config",
    "recorded_dataset",
    "recorded_name",
]

#: ``config["format"]`` of the run directories this version writes. 2: the head is stored as
#: head.skops / head.keras (format 1 pickled it as head.joblib).
RUN_FORMAT = 2
#: ``config["validation"]`` of a run validated on the cached ``val`` split (otherwise a hold-out of train).
CACHED_VAL_LABEL = "cached val split"
#: ``config["kind"]`` of an ensemble run directory.
ENSEMBLE_KIND = "ensemble"


class NameForm(NamedTuple):
    """The form of an id or name that a directory records and a reader joins into a path."""

    what: str
    pattern: re.Pattern[str]
    shape: str


#: A sweep's trial id (``TrialSpec.id``), in ``trials/<id>.json``, ``sweep.json`` and ``leaderboard.json``.
TRIAL_ID = NameForm("trial id", re.compile(r"[0-9a-f]{12}"), "12 hex digits")
#: An ensemble member's directory in its ``config.json``, relative to the ensemble.
MEMBER_DIR = NameForm("member directory", re.compile(r"members/[0-9]+-[^/\\\x00]+"), "members/<i>-<name>")


def recorded_name(value: Any, form: NameForm, *, source: str | os.PathLike[str], fix: str) -> str:
    """``value``, read from the file ``source``, if it has the ``form`` featurecache writes.

    Every id or name read back from a sweep, ensemble or run directory passes here before it
    is joined into a path: a file edited by hand, damaged, or received from someone else must
    not lead a path out of its directory (``../../x``, ``/x``) or to some other file.

    Parameters
    ----------
    value
        The id or name as read (any JSON value).
    form
        What it must be (:data:`TRIAL_ID`, :data:`MEMBER_DIR`).
    source
        The file it was read from, named in the error.
    fix
        What to do about it, the end of the error.

    Returns
    -------
    str
        ``value``, safe to join into a path under its directory.

    Raises
    ------
    RunError
        One line naming ``source`` and the bad ``value``, then ``fix``.
    """
    from featurecache.errors import RunError

    if isinstance(value, str) and form.pattern.fullmatch(value):
        return value
    raise RunError(f"{source} names {form.what} {value!r}, but a {form.what} is {form.shape}; {fix}")


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's ``config.json``, or ``{}`` when there is none or it is unreadable (``load_run`` then says why)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_assembled(config: Mapping[str, Any]) -> bool:
    """Whether a run config needs :func:`featurecache.finetune.assemble_run`: an ensemble, or a head on several feature sets."""
    from featurecache.cache.concat import feature_parts

    if config.get("kind") == ENSEMBLE_KIND:
        return True
    features = config.get("features")
    return isinstance(features, Mapping) and len(feature_parts(features)) > 1


def recorded_dataset(config: Mapping[str, Any]) -> dict[str, Any]:
    """``source``, ``limit``, ``seed`` and ``validation`` (the dataset split of the run's val rows)."""
    if isinstance(config.get("dataset"), Mapping):  # a fine-tune output records what it loaded
        d = config["dataset"]
        return {
            "source": d.get("source"),
            "limit": d.get("limit"),
            "seed": int(d.get("seed") or 0),
            "validation": d.get("validation"),
        }
    features = config.get("features") or {}
    return {
        "source": features.get("dataset_source"),
        "limit": features.get("dataset_limit"),
        "seed": int((features.get("spec") or {}).get("seed", 0)),
        "validation": "val" if config.get("validation") == CACHED_VAL_LABEL else "train",
    }


def final_name(path: Path) -> str:
    """The name ``path`` has once swapped in: ``runs/.vgg16-top.tmp-12580-2e2898`` -> ``vgg16-top``.

    A page or plot written while the directory is built aside (see :func:`replace_dir`) is
    titled with this, never with the temporary name.
    """
    name = Path(path).resolve().name
    match = re.fullmatch(r"\.(.+)\.tmp-\d+-[0-9a-f]+", name)
    return match.group(1) if match else name
