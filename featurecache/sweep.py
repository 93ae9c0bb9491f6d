"""Stage 2 at scale: grid or random search over heads on one cached feature set.

How it works. A sweep first turns ``--grid`` strings and ``--trials N`` into a list of
*trials*: a head name and its fully coerced parameters (defaults filled in). A trial's id is
a digest of exactly that pair, so the same configuration always has the same id whether it
came from a grid, a random draw or an earlier run, and duplicates collapse into one trial.

The features are read once (:func:`featurecache.train.load_training_data`) and the trials
run through joblib, preferring process workers: ``DenseHead`` seeds Keras globally, which
must not leak between trials running at the same time. joblib's loky backend memory-maps
numpy arrays larger than 1 MB that it sends to workers, so every worker reads the same
arrays instead of receiving a pickled copy per trial; the arrays are made plain contiguous
numpy first so that applies, and each trial records how it received them (training features
over the memory budget stay in the store and travel as a reference). With ``n_jobs=1``
trials run in the calling process.

Each worker writes its trial's result to ``<out>/trials/<id>.json`` (write + rename, so a
file is whole or absent) the moment the trial ends, failed or not. Resuming is therefore
"run the trials whose file is missing or failed": a restarted sweep never re-runs a trial
that succeeded. ``<out>/sweep.json`` records the feature-set key and the validation set;
resuming into a directory made for other features (or another validation set) is refused.

At the end the trials of this call are ranked by ``metric`` (losses ascend), written as
``leaderboard.csv`` / ``leaderboard.json`` / ``leaderboard.png``, and the best head is saved
as a full run directory ``<out>/best`` (the fitted estimator comes back from its worker; it
is refitted only when it was trained by an earlier, interrupted call).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache import store, views
from featurecache.cache.fsio import jsonable, write_atomic, write_json  # atomic, unique temp name per writer
from featurecache.cache.keys import digest_of
from featurecache.errors import SweepError, UsageError, choices
from featurecache.rundir import clean_leftovers

__all__ = ["SweepResult", "TrialSpec", "default_sweep_dir", "leaderboard_table", "parse_grid", "plan_trials", "sweep"]

SWEEP_FORMAT = 1
TRIALS_DIR = "trials"
BEST_DIR = "best"
#: Metric columns per split, in display order (top-k columns are added per k).
_METRIC_COLUMNS = ("accuracy", "log_loss", "macro_f1", "kappa")
#: A random draw may repeat a configuration (small discrete spaces); give up after this many
#: draws per requested trial rather than loop forever.
_MAX_DRAWS_PER_TRIAL = 20


@dataclass(frozen=True)
class TrialSpec:
    """One configuration to train: a head and its complete, typed parameters.

    Parameters
    ----------
    head
        Head name (or allowed import path).
    params
        Every parameter of the head, coerced (``coerce_head_params``).
    given
        The parameters the grid or the random draw set; only these label the trial.
    """

    head: str
    params: Mapping[str, Any] = field(hash=False)
    given: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        """12 hex digits identifying (head, params): stable across runs and processes."""
        return digest_of({"head": self.head, "params": jsonable(self.params)})[:12]

    @property
    def label(self) -> str:
        """``dense hidden=512-128 dropout=0.2``: the head and the parameters that were set."""
        from featurecache.heads import head_param_schema

        schema = head_param_schema(self.head)
        parts = [f"{k}={schema[k].format(v) if k in schema else v}" for k, v in self.given.items()]
        return " ".join([self.head, *parts])


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` produced."""

    out_dir: Path
    leaderboard: list[dict[str, Any]]
    best_run: Path
    seconds: float
    skipped: int
    metric: str = "val_accuracy"
    key: str = ""
    failed: int = 0

    @property
    def best(self) -> dict[str, Any]:
        """The leaderboard row of the best trial."""
        return self.leaderboard[0]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "out_dir": str(self.out_dir),
            "best_run": str(self.best_run),
            "metric": self.metric,
            "key": self.key,
            "best": self.best,
            "trials": len(self.leaderboard),
            "skipped": self.skipped,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "leaderboard": self.leaderboard,
        }


# --------------------------------------------------------------------------- planning


def parse_grid(text: str) -> list[TrialSpec]:
    """Expand one grid string into its trials (the cartesian product of the values).

    Parameters
    ----------
    text
        ``"HEAD:NAME=V1,V2;NAME=V1,V2"``, e.g. ``"logreg:C=0.01,0.1,1"`` or
        ``"dense:hidden=256,512-128;dropout=0.2,0.5"``; a bare ``"HEAD"`` is one trial with
        the defaults. Import-path heads work too:
        ``"sklearn.ensemble:RandomForestClassifier:n_estimators=100,300"``.

    Returns
    -------
    list[TrialSpec]
        In product order, duplicates removed.

    Raises
    ------
    UsageError
        Malformed string (no head, a parameter given twice, an empty value list).
    UnknownHeadError, HeadParamError
        Unknown head, unknown parameter or a value of the wrong type.
    """
    from featurecache.heads import (
        HEAD_NAMES,
        coerce_head_params,
        get_head_spec,
        parse_param,
    )

    raw = str(text).strip()
    example = "write it like 'logreg:C=0.01,0.1,1' or 'dense:hidden=256,512-128;dropout=0.2,0.5'"
    head, sep, body = raw.partition(":")
    if sep and head.strip() not in HEAD_NAMES and "=" not in head:
        # An import path 'package.module:Class[:params]' has one more colon.
        cls, _, rest = body.partition(":")
        if "=" not in cls:
            head, body = f"{head}:{cls}", rest
    head = head.strip()
    if not head or "=" in head:
        raise UsageError(f"grid {text!r} names no head before its parameters; {example}")
    get_head_spec(head)  # unknown head -> one line listing the valid names
    axes: dict[str, list[Any]] = {}
    for part in body.split(";"):
        if not part.strip():
            continue
        name, values = parse_param(part)
        if name in axes:
            raise UsageError(f"grid {text!r} gives parameter {name!r} twice; list all its values once: {name}=V1,V2")
        typed: list[Any] = []
        for value in values.split(","):
            # Coercing through the head's schema rejects unknown names and bad values here,
            # before any feature is read, with the schema's own one-line message.
            v = coerce_head_params(head, {name: value.strip()})[name]
            if v not in typed:
                typed.append(v)
        axes[name] = typed
    out: list[TrialSpec] = []
    seen: set[str] = set()
    for combo in itertools.product(*axes.values()):
        given = dict(zip(axes, combo, strict=True))
        trial = TrialSpec(head, coerce_head_params(head, given), given)
        if trial.id not in seen:
            seen.add(trial.id)
            out.append(trial)
    return out


def _sample_head(head: str, n: int, seed: int) -> list[TrialSpec]:
    from featurecache.heads import coerce_head_params, get_head_spec

    spaces = {p.name: p.search for p in get_head_spec(head).params if p.search is not None}
    if not spaces:
        return [TrialSpec(head, coerce_head_params(head, {}))]
    # One generator per head, seeded by (seed, head): adding a head to --heads does not
    # change the configurations drawn for the others.
    rng = np.random.default_rng([int(seed), int(digest_of({"head": head})[:8], 16)])
    out: list[TrialSpec] = []
    seen: set[str] = set()
    for _ in range(n * _MAX_DRAWS_PER_TRIAL):
        if len(out) == n:
            break
        given = {name: space.sample(rng) for name, space in spaces.items()}
        trial = TrialSpec(head, coerce_head_params(head, given), given)
        if trial.id not in seen:
            seen.add(trial.id)
            out.append(trial)
    return out


def plan_trials(
    *,
    grid: Sequence[str] = (),
    trials: int = 0,
    heads: Sequence[str] = ("logreg", "dense"),
    seed: int = 0,
) -> list[TrialSpec]:
    """The trials a sweep runs, in order, without reading any features.

    Parameters
    ----------
    grid
        Grid strings (see :func:`parse_grid`).
    trials
        Random configurations drawn per head of ``heads`` from its search space
        (``head_param_schema``); deterministic for a given ``seed``. A head whose space
        holds fewer distinct configurations gives fewer.
    heads
        Heads for ``trials`` (and, when neither ``grid`` nor ``trials`` is given, one trial
        per head with its defaults).
    seed
        Seed of the random draws.

    Returns
    -------
    list[TrialSpec]
        Grid trials first, then random ones; duplicates (same id) removed.

    Raises
    ------
    UsageError, UnknownHeadError, HeadParamError
        As :func:`parse_grid`; ``trials < 0``; no heads.
    """
    from featurecache.heads import coerce_head_params, get_head_spec

    grid = (grid,) if isinstance(grid, str) else tuple(grid)
    heads = tuple(h.strip() for h in heads.split(",")) if isinstance(heads, str) else tuple(heads)
    heads = tuple(h for h in heads if h)
    if trials < 0:
        raise UsageError(f"--trials must be >= 0, got {trials}; pass the number of random configurations per head")
    if (trials or not grid) and not heads:
        raise UsageError("--heads is empty; pass e.g. --heads logreg,dense")
    for head in heads:
        get_head_spec(head)
    planned: list[TrialSpec] = [t for g in grid for t in parse_grid(g)]
    if trials:
        planned += [t for h in heads for t in _sample_head(h, trials, seed)]
    elif not grid:
        planned += [TrialSpec(h, coerce_head_params(h, {})) for h in heads]
    unique: dict[str, TrialSpec] = {}
    for t in planned:
        unique.setdefault(t.id, t)
    return list(unique.values())


def _metric_names(top_k: Sequence[int]) -> tuple[str, ...]:
    return (*(f"val_{m}" for m in _METRIC_COLUMNS), *(f"val_top{k}_accuracy" for k in sorted(set(top_k)) if k > 1))


# --------------------------------------------------------------------------- trials


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


#: TensorFlow threads per sweep process for dense trials; 0 = TensorFlow's default (all cores).
TF_THREADS_ENV = "FEATURECACHE_TF_THREADS"


def sweep_tf_threads() -> int:
    """TensorFlow intra- and inter-op threads of every process that trains dense trials.

    The same number whatever ``--jobs`` is, so a trial computes the same bits in the calling
    process (``--jobs 1``) and in any worker: CPU kernels may split a reduction differently for
    another thread count. (BLAS did: lbfgs fits with a thread per core in the caller and one per
    worker differed by up to 4e-4 in validation log loss; ``train.blas_threads`` now fixes
    those.) One thread by default (heads on cached features are small matrices; parallelism
    comes from ``--jobs``); ``$FEATURECACHE_TF_THREADS`` sets another, 0 leaves TensorFlow's default.

    Raises
    ------
    UsageError
        The variable is not a non-negative integer.
    """
    raw = os.environ.get(TF_THREADS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit():
        raise UsageError(f"${TF_THREADS_ENV}={raw!r} is not a number of threads; set it to e.g. 1, or 0 for TensorFlow's default")
    return int(raw)


def _limit_tf_threads(threads: int) -> int:
    """Set this process's TensorFlow threads (before TensorFlow starts); return the threads in effect.

    It only works before TensorFlow runs its first op in the process; a process that already
    did keeps its setting, and the trial record shows it (``worker.tf_threads``).
    """
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass
    return int(tf.config.threading.get_intra_op_parallelism_threads())


def _received(data: Any, parent_pid: int) -> str:
    """How this process got the features: in-process, memmap (shared), copied or streamed."""
    if os.getpid() == parent_pid:
        return "in-process"
    if not isinstance(data.X_train, np.ndarray):
        return "streamed"
    return "memmap" if isinstance(data.X_train, np.memmap) else "copied"


def _new_record(trial: TrialSpec, data: Any, parent_pid: int) -> dict[str, Any]:
    return {
        "format": SWEEP_FORMAT,
        "trial": trial.id,
        "label": trial.label,
        "head": trial.head,
        "params": dict(trial.params),
        "given": dict(trial.given),
        "key": data.key,
        "worker": {"pid": os.getpid(), "features": _received(data, parent_pid)},
    }


def _finish_record(record: dict[str, Any], trials_dir: str, seconds: float) -> None:
    record["seconds"] = round(seconds, 4)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(Path(trials_dir) / f"{record['trial']}.json", record)


def _run_trial(
    trial: TrialSpec, data: Any, trials_dir: str, parent_pid: int, top_k: tuple[int, ...], tf_threads: int = 1
) -> tuple[dict[str, Any], Any, Any]:
    """Fit and score one trial, write its result file, return (record, estimator, predictions).

    Runs in a worker process (or in the caller when ``n_jobs=1``). Any exception becomes a
    failed record: one bad configuration must not stop the sweep. A dense trial runs with
    ``tf_threads`` TensorFlow threads (:func:`sweep_tf_threads`), in a worker or in the caller.
    """
    from featurecache.heads import make_head
    from featurecache.train import evaluate_arrays, fit_head

    record = _new_record(trial, data, parent_pid)
    if trial.head == "dense":
        record["worker"]["tf_threads"] = _limit_tf_threads(tf_threads)
    started = time.perf_counter()
    estimator = preds = None
    try:
        estimator = make_head(trial.head, trial.params)
        fit_head(estimator, data)
        record["fit_seconds"] = round(time.perf_counter() - started, 4)
        metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
        record.update(status="ok", metrics=metrics, error=None)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed trial, the sweep goes on
        record.update(status="failed", metrics={}, error=_one_line(exc))
        estimator = preds = None
    _finish_record(record, trials_dir, time.perf_counter() - started)
    return record, estimator, preds


def _run_group(
    trials: Sequence[TrialSpec], data: Any, trials_dir: str, parent_pid: int, top_k: tuple[int, ...], tf_threads: int = 1
) -> list[tuple[dict[str, Any], Any, Any]]:
    """Fit several dense trials in one shared pass (``heads.dense_group``), then score each.

    A trial's record notes the group it trained in; its ``fit_seconds`` is its share of the
    group's training time. If the group fails as a whole, each trial runs alone, so one bad
    configuration still fails only itself.
    """
    from featurecache.heads import make_head
    from featurecache.train import evaluate_arrays, fit_dense_together

    if len(trials) == 1:
        return [_run_trial(trials[0], data, trials_dir, parent_pid, top_k, tf_threads)]
    threads = _limit_tf_threads(tf_threads)
    started = time.perf_counter()
    try:
        estimators = fit_dense_together([make_head(t.head, t.params) for t in trials], data)
    except Exception:  # noqa: BLE001 - retried one by one, where each failure is recorded
        return [_run_trial(t, data, trials_dir, parent_pid, top_k, tf_threads) for t in trials]
    fit_seconds = time.perf_counter() - started
    out = []
    for trial, estimator in zip(trials, estimators):
        t0 = time.perf_counter()
        record = _new_record(trial, data, parent_pid)
        record["worker"]["tf_threads"] = threads
        record["trained_together"] = {"heads": len(trials), "fit_seconds": round(fit_seconds, 4)}
        record["fit_seconds"] = round(fit_seconds / len(trials), 4)
        preds = None
        try:
            metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
            record.update(status="ok", metrics=metrics, error=None)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed trial, the sweep goes on
            record.update(status="failed", metrics={}, error=_one_line(exc))
            estimator = None
        _finish_record(record, trials_dir, fit_seconds / len(trials) + time.perf_counter() - t0)
        out.append((record, estimator, preds))
    return out


#: Most dense trials trained together in one pass (bounds one worker's memory and the work lost to a crash).
MAX_GROUP = 16


def plan_work(pending: Sequence[TrialSpec], workers: int, *, together: bool = True) -> list[list[TrialSpec]]:
    """Split trials into work items: dense trials that can share a pass grouped, the rest alone.

    Parameters
    ----------
    pending
        Trials to run.
    workers
        Parallel workers; a group of compatible dense trials is split into about this many
        parts so every worker gets a share.
    together
        ``False``: every trial is its own item (the one-at-a-time behaviour).

    Returns
    -------
    list of list of TrialSpec
        Work items in a stable order (groups first, largest first, then single trials).
    """
    from featurecache.heads.dense_group import group_key_of

    groups: dict[tuple[Any, ...], list[TrialSpec]] = {}
    singles: list[list[TrialSpec]] = []
    for t in pending:
        if together and t.head == "dense":
            groups.setdefault(group_key_of(t.params), []).append(t)  # trial params are coerced
        else:
            singles.append([t])
    items: list[list[TrialSpec]] = []
    for members in groups.values():
        size = min(MAX_GROUP, max(1, math.ceil(len(members) / max(1, workers))))
        items.extend(members[i : i + size] for i in range(0, len(members), size))
    items.sort(key=len, reverse=True)  # the longest work starts first
    return items + singles


def _read_record(path: Path, key: str) -> dict[str, Any] | None:
    """A finished, successful trial result for ``key``, else None (to be run again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("status") != "ok" or record.get("key") != key:
        return None
    return record


# --------------------------------------------------------------------------- leaderboard


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "rank": None,
        "trial": record["trial"],
        "name": record.get("label") or record["head"],
        "head": record["head"],
        # JSON types (lists, not tuples) whether the record is fresh or read back from disk.
        "params": jsonable(record["params"]),
        "status": record["status"],
    }
    for split in ("val", "test"):
        m = (record.get("metrics") or {}).get(split)
        if not m:
            continue
        row[f"{split}_accuracy"] = m["accuracy"]
        row[f"{split}_log_loss"] = m["log_loss"]
        row[f"{split}_macro_f1"] = m["macro_f1"]
        row[f"{split}_kappa"] = m["cohen_kappa"]
        for k, v in sorted(m.get("top_k_accuracy", {}).items(), key=lambda kv: int(kv[0])):
            if int(k) > 1:  # top-1 is the accuracy column
                row[f"{split}_top{k}_accuracy"] = v
    row["fit_seconds"] = record.get("fit_seconds")
    row["seconds"] = record.get("seconds")
    row["error"] = record.get("error")
    return row


def _sort_key(row: Mapping[str, Any], metric: str) -> tuple[Any, ...]:
    def value(name: str, lower_is_better: bool) -> float:
        v = row.get(name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return math.inf  # missing or undefined ranks last
        return float(v) if lower_is_better else -float(v)

    # Ties on the metric go to the better-calibrated head, then the faster one; the id
    # makes the order total, so the same results always give the same leaderboard.
    return (value(metric, "loss" in metric), value("val_log_loss", True), value("fit_seconds", True), row["trial"])


def _rank(records: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    rows = [_row(r) for r in records]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: _sort_key(r, metric))
    for i, r in enumerate(ok, start=1):
        r["rank"] = i
    return ok + [r for r in rows if r["status"] != "ok"]


def _write_leaderboard(out: Path, rows: Sequence[Mapping[str, Any]], *, metric: str, key: str, name: str) -> None:
    columns: list[str] = ["rank", "trial", "head", "name", "status"]
    for r in rows:
        columns += [c for c in r if c not in columns and c not in ("params", "error", "fit_seconds", "seconds")]
    columns += ["fit_seconds", "seconds", "error", "params"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "params": json.dumps(jsonable(r["params"]), sort_keys=True)})

    write_atomic(out / "leaderboard.csv", write_csv)
    write_json(out / "leaderboard.json", {"metric": metric, "key": key, "features": name, "rows": list(rows)})
    if any(r["status"] == "ok" for r in rows):
        from featurecache.report import plot_leaderboard

        try:
            plot_leaderboard(rows, out / "leaderboard.png", metric=metric, top=30)
        except UsageError:
            # Every successful trial has an undefined metric (e.g. kappa on one class):
            # nothing to draw, the CSV and JSON still hold the results.
            (out / "leaderboard.png").unlink(missing_ok=True)


def leaderboard_table(rows: Sequence[Mapping[str, Any]], *, metric: str = "val_accuracy", top: int = 20, title: str | None = None) -> Any:
    """A rich table of the best ``top`` trials (failed trials are summarised in the caption).

    Parameters
    ----------
    rows
        ``SweepResult.leaderboard``.
    metric
        The ranking metric (its column is highlighted).
    top
        Number of ranked rows shown.
    title
        Table title.

    Returns
    -------
    rich.table.Table
    """
    from rich import box
    from rich.table import Table

    def fmt(v: Any, digits: int = 4) -> str:
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    # Short headers keep the table readable in 80 columns; the caption says they are validation metrics.
    short = {"val_accuracy": "acc", "val_log_loss": "loss", "val_macro_f1": "F1", "val_kappa": "kappa", "test_accuracy": "test"}
    ranked = [r for r in rows if r.get("rank") is not None]
    failed = [r for r in rows if r.get("rank") is None]
    columns = ["val_accuracy", "val_log_loss", "val_macro_f1", "val_kappa"]
    if metric not in columns:
        columns.append(metric)
    if any("test_accuracy" in r for r in ranked):
        columns.append("test_accuracy")
    caption = f"validation metrics; {min(top, len(ranked))} of {len(ranked)} trials ranked by {metric}"
    if failed:
        caption += f"; {len(failed)} failed (see leaderboard.csv)"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), caption_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("trial", no_wrap=True)
    table.add_column("configuration", overflow="fold", ratio=1, min_width=14)
    for c in columns:
        table.add_column(short.get(c, c.replace("_", " ")), justify="right", no_wrap=True, style="bold" if c == metric else None)
    table.add_column("fit s", justify="right", no_wrap=True)
    for r in ranked[:top]:
        table.add_row(str(r["rank"]), r["trial"][:8], r["name"], *(fmt(r.get(c), 3) for c in columns), fmt(r.get("fit_seconds"), 1))
    return table


# --------------------------------------------------------------------------- the sweep


def _check_sweep_dir(out: Path, *, fs: views.FeatureSet, validation: str) -> dict[str, Any] | None:
    """The existing ``sweep.json`` if ``out`` may be resumed for ``fs``; raises otherwise."""
    meta_path = out / "sweep.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise UsageError(f"{meta_path} is unreadable; remove {out} or pass another --out") from None
        old = meta.get("features", {})
        if old.get("key") != fs.key:
            raise UsageError(
                f"sweep directory {out} was made for features {old.get('name')} (key {str(old.get('key'))[:12]}), not "
                f"{fs.name} (key {fs.key[:12]}); pass another --out, or remove {out} to start over"
            )
        if meta.get("validation") != validation:
            raise UsageError(
                f"sweep directory {out} validated on the {meta.get('validation')}, this sweep would use the "
                f"{validation}; pass the same --val-fraction and seed, or another --out"
            )
        return meta
    # A sweep killed before its first sweep.json left trials/ (and maybe temp files) only:
    # that is an interrupted start, resumed like any sweep (trial files carry their key).
    if out.exists() and (not out.is_dir() or any(not p.name.startswith(".") and p.name != TRIALS_DIR for p in out.iterdir())):
        raise UsageError(f"{out} exists and is not a sweep directory (no sweep.json); pass a new or empty --out")
    return None


def default_sweep_dir(runs_dir: str | os.PathLike[str], key: str, planned: Sequence[TrialSpec]) -> Path:
    """``<runs_dir>/sweep-<key8>-<trials6>``: one directory per feature set and set of trials.

    The suffix digests the sorted trial ids, so re-running a command resumes its own directory
    while a sweep with another grid (or ``--trials``) gets a new one instead of replacing the
    first one's leaderboard and ``best/``.
    """
    return Path(runs_dir) / f"sweep-{key[:8]}-{digest_of({'trials': sorted(t.id for t in planned)})[:6]}"


def _requests(meta: Mapping[str, Any] | None, request: dict[str, Any]) -> list[Any]:
    """Every distinct request made of this sweep directory, oldest first (a resumed command is not repeated)."""
    earlier = list((meta or {}).get("requests") or ([meta["request"]] if meta and meta.get("request") else []))
    return earlier if jsonable(request) in earlier else [*earlier, request]


def _earlier_trials(meta: Mapping[str, Any] | None, trials_dir: Path, key: str, planned: Sequence[TrialSpec]) -> list[TrialSpec]:
    """Trials an earlier call recorded in this sweep directory that this call did not plan."""
    ids = {t.id for t in planned}
    out: list[TrialSpec] = []
    for tid in (meta or {}).get("trials", []):
        if tid in ids:
            continue
        record = _read_record(trials_dir / f"{tid}.json", key)
        if record is not None:
            out.append(TrialSpec(record["head"], record["params"], record.get("given") or {}))
            ids.add(tid)
    return out


class _Progress:
    """A rich progress bar over trials on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled and total > 0
        self.total = total
        self.label = label

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label[:60], total=self.total, status="")
        return self

    def advance(self, status: str) -> None:
        if self.enabled:
            self._bar.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


def _shared_arrays(data: Any) -> Any:
    # joblib memory-maps only plain contiguous numpy arrays; ascontiguousarray is a no-op
    # for what load_training_data returns, a guard otherwise. Training features streamed
    # from the store (over the memory budget) are not numpy and travel as a reference.
    fields = ("X_train", "y_train", "X_val", "y_val", "X_train_views", "X_test", "y_test")
    return replace(data, **{f: np.ascontiguousarray(getattr(data, f)) for f in fields if isinstance(getattr(data, f), np.ndarray)})


def _results(pending: Sequence[TrialSpec], data: Any, *, trials_dir: Path, n_jobs: int, top_k: tuple[int, ...], together: bool = True) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    from joblib import Parallel, delayed

    workers = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    workers = max(1, min(workers, len(pending)))
    # prefer="processes" (loky by default) rather than backend="loky": a caller's
    # joblib.parallel_config(backend="dask") still takes the sweep to a cluster.
    items = plan_work(pending, workers, together=together)
    workers = max(1, min(workers, len(items)))
    # The same TensorFlow and BLAS threads in every process, whatever the number of workers, so
    # results do not depend on --jobs (train.fit_head and evaluate_arrays set the BLAS threads).
    tf_threads = sweep_tf_threads()
    with _broadcast_on_dask(data):
        parallel = Parallel(n_jobs=workers, prefer="processes", return_as="generator_unordered")
        for results in parallel(delayed(_run_group)(item, data, str(trials_dir), os.getpid(), top_k, tf_threads) for item in items):
            yield from results


def _broadcast_on_dask(data: Any) -> Any:
    """Under joblib's dask backend, send the training data to every worker once, up front.

    joblib's automatic scatter puts a large argument on one worker, whose death then fails
    every trial at once; broadcast, each worker holds its own copy.
    """
    import contextlib

    from joblib import parallel_config
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend).__name__ != "DaskDistributedBackend":
        return contextlib.nullcontext()
    return parallel_config(backend="dask", scatter=[data])


def _save_best(out: Path, *, row: Mapping[str, Any], trial: TrialSpec, estimator: Any, preds: Any, record: Mapping[str, Any], data: Any, metric: str) -> Path:
    """Write the best head as ``<out>/best`` (``write_run`` builds it aside, then swaps it in)."""
    from featurecache.rundir import write_run

    return write_run(
        out / BEST_DIR,
        estimator=estimator,
        head=trial.head,
        params=trial.params,
        data=data,
        metrics=record["metrics"],
        predictions=preds,
        seconds=float(record.get("fit_seconds") or 0.0),
        extra={"sweep": {"dir": str(out), "trial": trial.id, "label": trial.label, "metric": metric, "value": row.get(metric)}},
    )


def _best_is_saved(out: Path, trial_id: str, key: str) -> bool:
    try:
        config = json.loads((out / BEST_DIR / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        config.get("sweep", {}).get("trial") == trial_id
        and config.get("features", {}).get("key") == key
        and (out / BEST_DIR / "head.json").is_file()
    )


def sweep(
    features: str | views.FeatureSet,
    *,
    grid: Sequence[str] = (),
    trials: int = 0,
    heads: Sequence[str] = ("logreg", "dense"),
    n_jobs: int = 1,
    out: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    val_fraction: float = 0.15,
    seed: int = 0,
    metric: str = "val_accuracy",
    cache_dir: str | os.PathLike[str] | None = None,
    together: bool = True,
    progress: bool = True,
    tensorboard: str | os.PathLike[str] | None = None,
) -> SweepResult:
    """Train many heads on one cached feature set, rank them, save the best as a run.

    Parameters
    ----------
    features
        Key, key prefix, entry name, or an open :class:`FeatureSet`; several (``"KEY1,KEY2"``)
        are concatenated (:mod:`featurecache.concat`).
    grid
        Grid strings, e.g. ``"logreg:C=0.01,0.1,1,10"`` or
        ``"dense:hidden=256,512-128;dropout=0.2,0.5;lr=1e-3,1e-4"`` (see :func:`parse_grid`).
    trials
        Random configurations per head of ``heads``, drawn from each head's search space.
    heads
        Heads for ``trials`` (or one default trial each when ``grid`` and ``trials`` are empty).
    n_jobs
        Parallel trials (joblib, process workers; ``-1`` = all cores; 1 = in this process).
    out
        Sweep directory; default ``<runs_dir>/sweep-<key8>-<trials6>`` (:func:`default_sweep_dir`:
        another grid gets another directory). An existing sweep directory for the same features
        is resumed; trials an earlier call ran there with another grid are kept, ranked with
        this call's and compete for ``best/``.
    runs_dir
        Parent of the default ``out``.
    val_fraction, seed
        Validation hold-out when the features have no ``val`` split; ``seed`` also seeds the
        random draws.
    metric
        Ranking metric: ``val_accuracy`` (default), ``val_log_loss``, ``val_macro_f1``,
        ``val_kappa`` or ``val_top<k>_accuracy``; metrics named ``*loss`` rank lowest first.
    cache_dir
        Cache root.
    together
        Train dense trials that see the same batches (same ``batch_size``, ``seed``,
        ``class_weight``, ``pool``) together, in one pass over the features per group
        (:mod:`featurecache.heads.dense_group`; each head's result is what it would be alone).
        ``False``: one trial at a time.
    progress
        Progress bar over trials on stderr.
    tensorboard
        Also write TensorBoard logs there: one HParams session per trial (head, parameters,
        final metrics) and the curves of the dense trials trained in this call
        (:mod:`featurecache.report.tensorboard`).

    Returns
    -------
    SweepResult
        Ranked rows (successful trials by rank, then failed ones), the best run directory,
        the number of trials reused from an earlier run (``skipped``) and of failed ones.

    Raises
    ------
    UsageError, UnknownHeadError, HeadParamError
        Bad grid, head, parameter, metric, ``n_jobs``, or an ``out`` made for other features.
    EntryNotFoundError, IncompleteEntryError
        The features are not (completely) in the cache.
    SweepError
        Every trial failed, or a worker process died (finished trials are kept: run again).
    """
    from featurecache.train import load_training_data, resolve_features, validation_label

    started = time.perf_counter()
    top_k = (1, 3, 5)
    _check_options(metric=metric, n_jobs=n_jobs, top_k=top_k)
    heads = [h.strip() for h in heads.split(",")] if isinstance(heads, str) else list(heads)
    planned = plan_trials(grid=grid, trials=trials, heads=heads, seed=seed)
    fs = resolve_features(features, cache_dir=cache_dir)
    out_dir = Path(out) if out is not None else default_sweep_dir(runs_dir, fs.key, planned)
    validation = validation_label(fs, val_fraction=val_fraction, seed=seed)
    meta = _check_sweep_dir(out_dir, fs=fs, validation=validation)
    trials_dir = out_dir / TRIALS_DIR
    # Trials of earlier calls with other grids stay in the directory's leaderboard and compete for best/.
    earlier = _earlier_trials(meta, trials_dir, fs.key, planned)
    request = {"grid": [grid] if isinstance(grid, str) else list(grid), "trials": trials, "heads": heads, "seed": seed, "metric": metric}
    meta = _sweep_meta(meta, fs=fs, validation=validation, request=request, trials=[*earlier, *planned])
    # sweep.json first, then trials/: a directory with trials/ is always recognisable as a sweep.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sweep.json", meta)
    trials_dir.mkdir(exist_ok=True)
    # A best/ being written when an earlier call was killed (".best-<pid>-*": before rundir).
    clean_leftovers(out_dir / BEST_DIR, also=(f".{BEST_DIR}-",))

    records = _finished_records([*earlier, *planned], trials_dir, fs.key)
    pending = [t for t in planned if t.id not in records]
    skipped = len(records) - len(earlier)
    planned = [*earlier, *planned]
    by_id = {t.id: t for t in planned}

    data = None
    histories: dict[str, Any] = {}  # curves of the dense trials of this call, for TensorBoard
    session_best: tuple[tuple[Any, ...], str, Any, Any] | None = None  # (sort key, id, estimator, preds)
    if pending:
        data = _shared_arrays(load_training_data(fs, val_fraction=val_fraction, seed=seed))
        session_best = _run_pending(
            pending, data, records=records, histories=histories, trials_dir=trials_dir, metric=metric, n_jobs=n_jobs,
            top_k=top_k, together=together, bar=_Progress(progress, len(pending), f"sweep {fs.key[:12]}"),
        )

    rows = _rank([records[t.id] for t in planned], metric)
    _write_leaderboard(out_dir, rows, metric=metric, key=fs.key, name=fs.name)
    failed = sum(1 for r in rows if r["status"] != "ok")
    if not rows or rows[0]["status"] != "ok":
        first = rows[0]["error"] if rows else "no trials"
        raise SweepError(f"all {len(rows)} trials failed (first: {first}); see {out_dir / 'leaderboard.csv'} and fix the grid")

    best_row = rows[0]
    best_trial = by_id[best_row["trial"]]
    best_dir = out_dir / BEST_DIR
    _keep_best(out_dir, row=best_row, trial=best_trial, record=records[best_trial.id], session_best=session_best, data=data, fs=fs,
               metric=metric, top_k=top_k, val_fraction=val_fraction, seed=seed)

    meta["best"] = {"trial": best_trial.id, "label": best_trial.label, metric: best_row.get(metric), "run": str(best_dir)}
    write_json(out_dir / "sweep.json", meta)
    _write_reports(out_dir, tensorboard, rows=rows, records=records, histories=histories, metric=metric)
    return SweepResult(
        out_dir=out_dir, leaderboard=rows, best_run=best_dir, seconds=time.perf_counter() - started, skipped=skipped,
        metric=metric, key=fs.key, failed=failed,
    )


def _write_reports(
    out_dir: Path,
    tensorboard: str | os.PathLike[str] | None,
    *,
    rows: Sequence[Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, Any],
    metric: str,
) -> None:
    """``report.html`` of the sweep and, with ``tensorboard``, its trials as TensorBoard runs."""
    from featurecache.report.html import write_report

    write_report(out_dir, analyse=False)  # report.html: leaderboard and the best run (analysed as it was written)
    if tensorboard is not None:
        from featurecache.report.tensorboard import write_sweep_logs

        write_sweep_logs(tensorboard, rows, metrics={t: r.get("metrics") or {} for t, r in records.items()}, histories=histories, metric=metric)


def _check_options(*, metric: str, n_jobs: Any, top_k: Sequence[int]) -> None:
    """Refuse a metric that is not a validation metric and a bad ``n_jobs`` (``UsageError`` naming the option)."""
    allowed = _metric_names(top_k)
    if metric not in allowed:
        raise UsageError(f"--metric {metric!r} is not a validation metric; use one of {choices(allowed)} (test metrics are reported, never used to choose)")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        raise UsageError(f"--jobs must be a positive number of workers or -1 for all cores, got {n_jobs!r}")


def _sweep_meta(meta: Mapping[str, Any] | None, *, fs: Any, validation: str, request: Mapping[str, Any], trials: Sequence[TrialSpec]) -> dict[str, Any]:
    """``sweep.json`` for this call: the earlier calls' requests kept, this one's added, every trial listed."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": SWEEP_FORMAT,
        "features": {"key": fs.key, "name": fs.name},
        "validation": validation,
        "created": (meta or {}).get("created", now),
        "updated": now,
        "request": request,
        "requests": _requests(meta, dict(request)),
        "trials": [t.id for t in trials],
    }


def _finished_records(trials: Sequence[TrialSpec], trials_dir: Path, key: str) -> dict[str, dict[str, Any]]:
    """The records of the trials already finished in ``trials_dir`` (for these features), by trial id."""
    records: dict[str, dict[str, Any]] = {}
    for t in trials:
        done = _read_record(trials_dir / f"{t.id}.json", key)
        if done is not None:
            records[t.id] = done
    return records


def _run_pending(
    pending: Sequence[TrialSpec],
    data: Any,
    *,
    records: dict[str, dict[str, Any]],
    histories: dict[str, Any],
    trials_dir: Path,
    metric: str,
    n_jobs: int,
    top_k: Sequence[int],
    together: bool,
    bar: Any,
) -> tuple[tuple[Any, ...], str, Any, Any] | None:
    """Run the pending trials, adding their records (and dense curves) as they finish.

    Returns the best trial of this call as ``(sort key, id, estimator, predictions)``, or ``None``.

    Raises
    ------
    SweepError
        A worker process died (the finished trials are saved).
    """
    session_best: tuple[tuple[Any, ...], str, Any, Any] | None = None
    with bar:
        try:
            for record, estimator, preds in _results(pending, data, trials_dir=trials_dir, n_jobs=n_jobs, top_k=top_k, together=together):
                records[record["trial"]] = record
                if getattr(estimator, "history_", None):
                    histories[record["trial"]] = estimator.history_
                status = "failed" if record["status"] != "ok" else ""
                if record["status"] == "ok":
                    key = _sort_key(_row(record), metric)
                    if session_best is None or key < session_best[0]:
                        session_best = (key, record["trial"], estimator, preds)
                if session_best is not None:
                    best_value = _row(records[session_best[1]]).get(metric)
                    status = f"best {metric} {best_value:.4f}" if isinstance(best_value, float) else status
                bar.advance(status)
        except Exception as exc:
            from joblib.externals.loky.process_executor import TerminatedWorkerError

            if isinstance(exc, TerminatedWorkerError) or type(exc).__name__ == "KilledWorker":
                raise SweepError(
                    f"a sweep worker process died ({str(exc).splitlines()[0][:160]}); {len(records)} finished trials are "
                    f"saved in {trials_dir}: run the same command again to resume, with fewer --jobs if memory ran out"
                ) from None
            raise
    return session_best


def _keep_best(
    out_dir: Path,
    *,
    row: Mapping[str, Any],
    trial: TrialSpec,
    record: Mapping[str, Any],
    session_best: tuple[tuple[Any, ...], str, Any, Any] | None,
    data: Any,
    fs: Any,
    metric: str,
    top_k: Sequence[int],
    val_fraction: float,
    seed: int,
) -> None:
    """Write ``<out>/best`` for the best trial unless it is there already (refitting it if an earlier call ran it)."""
    if session_best is not None and session_best[1] == trial.id:
        _, _, estimator, preds = session_best
        _save_best(out_dir, row=row, trial=trial, estimator=estimator, preds=preds, record=record, data=data, metric=metric)
    elif not _best_is_saved(out_dir, trial.id, fs.key):
        # The best trial ran in an earlier, interrupted call: its head was not kept, refit it.
        from featurecache.heads import make_head
        from featurecache.train import evaluate_arrays, fit_head, load_training_data

        if data is None:
            data = load_training_data(fs, val_fraction=val_fraction, seed=seed)
        t0 = time.perf_counter()
        estimator = fit_head(make_head(trial.head, trial.params), data)
        fit_seconds = time.perf_counter() - t0
        metrics, preds = evaluate_arrays(estimator, data, top_k=top_k)
        refit = {**record, "metrics": metrics, "fit_seconds": fit_seconds}
        _save_best(out_dir, row=row, trial=trial, estimator=estimator, preds=preds, record=refit, data=data, metric=metric)
