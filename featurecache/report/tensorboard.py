"""TensorBoard event files for runs, fine-tunes and sweeps (``tensorboard --logdir DIR``).

One TensorBoard *run* per featurecache run, named after it, under the log directory given with
``--tensorboard DIR``:

* curves -- Keras's own ``keras.callbacks.TensorBoard`` while a dense head or a fine-tune
  trains (``<run>/train``, ``<run>/validation``: ``epoch_loss``, ``epoch_accuracy``, ...); a
  sweep trains its dense trials together in one custom loop, so their recorded histories are
  written afterwards under the same tags;
* hyperparameters -- the HParams plugin (``tensorboard.plugins.hparams.api``): each run is a
  session with its head and parameters and its final metrics (``val_accuracy``,
  ``val_log_loss``, ...) as scalars, so the HParams dashboard compares trials. A sweep also
  writes the experiment (every parameter's domain, the metrics) at the top of the log
  directory, replacing the one an earlier call wrote.

TensorFlow and TensorBoard are imported inside the functions.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featurecache.errors import UsageError

__all__ = ["fresh_run_log_dir", "keras_callback", "run_log_dir", "write_hparams_run", "write_sweep_logs"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def run_log_dir(log_dir: str | os.PathLike[str], name: str) -> Path:
    """``<log_dir>/<name>`` with characters TensorBoard run names trip over replaced by ``_``."""
    clean = _UNSAFE.sub("_", name).strip("._") or "run"
    return Path(log_dir) / clean[:120]


def fresh_run_log_dir(log_dir: str | os.PathLike[str], name: str) -> Path:
    """:func:`run_log_dir`, emptied of the event files an earlier run of the same name wrote.

    A run written again (same ``--out``) replaces its curves instead of drawing two on top of
    each other. Only event files are removed (the directory may be shared with other files).
    """
    path = run_log_dir(log_dir, name)
    for sub in (path, path / "train", path / "validation"):
        for old in sub.glob("events.out.tfevents.*"):
            old.unlink()
    return path


def keras_callback(log_dir: str | os.PathLike[str]) -> Any:
    """Keras's ``TensorBoard`` callback writing per-epoch scalars into ``log_dir``.

    The graph is not written: a backbone's graph is large and the fine-tune trainer is a
    wrapper that is never exported, so its graph would mislead.

    Raises
    ------
    UsageError
        ``log_dir`` exists and is not a directory.
    """
    import keras

    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensorboard {path} exists and is not a directory; pass a directory for the event files")
    return keras.callbacks.TensorBoard(log_dir=str(path), write_graph=False, update_freq="epoch")


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else str(list(value))
    return str(value)


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Final metrics as ``{split}_{name}`` floats (finite only) from ``metrics.json``-style per-split dicts."""
    out: dict[str, float] = {}
    for split, m in metrics.items():
        if not isinstance(m, Mapping):
            continue
        for name in ("accuracy", "log_loss", "macro_f1", "cohen_kappa"):
            v = m.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{split}_{name}"] = float(v)
        for k, v in (m.get("top_k_accuracy") or {}).items():
            if int(k) > 1:
                out[f"{split}_top{k}_accuracy"] = float(v)
    return out


def _write_history(run_dir: Path, history: Mapping[str, Sequence[float]]) -> None:
    """Per-epoch curves under Keras's tags: ``train/epoch_loss``, ``validation/epoch_loss``, ..."""
    import tensorflow as tf

    for sub, prefix in (("train", ""), ("validation", "val_")):
        series = {
            k[len(prefix) :]: v
            for k, v in history.items()
            if (k.startswith("val_") if prefix else not k.startswith("val_")) and v
        }
        if not series:
            continue
        writer = tf.summary.create_file_writer(str(run_dir / sub))
        with writer.as_default():
            for name, values in series.items():
                for epoch, value in enumerate(values):
                    tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
        writer.close()


def write_hparams_run(
    run_dir: str | os.PathLike[str],
    *,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
    history: Mapping[str, Sequence[float]] | None = None,
    trial_id: str | None = None,
) -> Path:
    """Write one HParams session: hyperparameters, final metrics and (optionally) curves.

    Parameters
    ----------
    run_dir
        The TensorBoard run directory (created).
    hparams
        Names to values; lists and other values become text (``hidden=(256, 128)`` -> ``"256-128"``).
    metrics
        Per split (``val``, ``test``) a ``classification_metrics`` dict; written as scalars
        ``val_accuracy``, ``val_log_loss``, ``val_macro_f1``, ``val_cohen_kappa`` ... at step 0.
    history
        Per-epoch ``loss``, ``val_loss`` ... to write as Keras's callback would (skip when the
        callback already ran).
    trial_id
        The session's name in the HParams dashboard (default the directory name).

    Returns
    -------
    pathlib.Path
        ``run_dir``.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(str(path))
    with writer.as_default():
        hp.hparams({k: _hparam_value(v) for k, v in hparams.items()}, trial_id=trial_id or path.name)
        for name, value in _scalar_metrics(metrics).items():
            tf.summary.scalar(name, value, step=0)
    writer.close()
    if history:
        _write_history(path, history)
    return path


def _domains(sessions: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One ``hp.HParam`` per parameter name, with the domain of the values the trials took."""
    from tensorboard.plugins.hparams import api as hp

    values: dict[str, list[Any]] = {}
    for s in sessions:
        for k, v in s.items():
            values.setdefault(k, []).append(v)
    params = []
    for name, vals in sorted(values.items()):
        if all(isinstance(v, bool) for v in vals):
            params.append(hp.HParam(name, hp.Discrete(sorted(set(vals)))))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            params.append(hp.HParam(name, hp.RealInterval(float(min(vals)), float(max(vals)))))
        else:
            params.append(hp.HParam(name, hp.Discrete(sorted({str(v) for v in vals}))))
    return params


def _unify(sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make each parameter one type across trials (text wherever the trials disagree), as HParams needs."""
    names = {k for s in sessions for k in s}
    for name in names:
        vals = [s[name] for s in sessions if name in s]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        boolean = all(isinstance(v, bool) for v in vals)
        for s in sessions:
            if name in s:
                s[name] = float(s[name]) if numeric else s[name] if boolean else str(s[name])
    return sessions


def write_sweep_logs(
    log_dir: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    metric: str = "val_accuracy",
) -> list[Path]:
    """One HParams session per successful sweep trial, and the experiment at the top.

    Parameters
    ----------
    log_dir
        The ``--tensorboard`` directory.
    rows
        Leaderboard rows (``trial``, ``name``, ``head``, ``params``, ``status``).
    metrics
        Per trial id, its ``metrics`` (``{"val": {...}, "test": {...}}``).
    histories
        Per trial id, the curves of trials trained in this call (dense heads).
    metric
        The ranking metric, listed first in the dashboard.

    Returns
    -------
    list of pathlib.Path
        The run directories written. A trial whose directory exists already (an earlier call
        of a resumed sweep) is kept as it is.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    root = Path(log_dir)
    ok = [r for r in rows if r.get("status") == "ok"]
    sessions = _unify(
        [{"head": r["head"], **{k: _hparam_value(v) for k, v in (r.get("params") or {}).items()}} for r in ok]
    )
    written = []
    for row, session in zip(ok, sessions, strict=True):
        run_dir = run_log_dir(root, f"{row['trial'][:8]}-{row.get('name') or row['head']}")
        if run_dir.exists():
            continue
        tmp = run_dir.with_name(f".{run_dir.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        write_hparams_run(
            tmp,
            hparams=session,
            metrics=metrics.get(row["trial"], {}),
            history=(histories or {}).get(row["trial"]),
            trial_id=row["trial"][:8],
        )
        os.replace(tmp, run_dir)
        written.append(run_dir)
    names = sorted(
        {n for r in ok for n in _scalar_metrics(metrics.get(r["trial"], {}))},
        key=lambda n: (n != metric, not n.startswith("val_"), n),
    )
    for old in root.glob("events.out.tfevents.*"):
        old.unlink()  # the experiment of an earlier call: one experiment per log directory
    writer = tf.summary.create_file_writer(str(root))
    with writer.as_default():
        hp.hparams_config(hparams=_domains(sessions), metrics=[hp.Metric(n, display_name=n) for n in names])
    writer.close()
    return written
