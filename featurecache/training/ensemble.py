"""Ensembles: several trained heads combined into one run directory.

How it works
------------
An ensemble combines heads whose cached-feature predictions already exist: runs given by path
(on any backbones, or on concatenated feature sets), or the top ``N`` trials of a sweep, which
are refitted on the sweep's features (a sweep keeps only its best head) -- the same head,
parameters, data and seeds, so the same predictions. Every member must have been validated on
the same images: same classes, same validation ids in the same order, same test ids; otherwise
one line names the first difference.

The members' validation and test probabilities are combined by :mod:`featurecache.combine`
(``mean``, ``vote``, or ``weighted`` with weights fitted on the validation split), and the
ensemble is written as a run directory like any other, built aside and swapped in::

    <out>/config.json         kind "ensemble", method, weights, members, classes, validation,
                              features (every feature set the members read, in ``spec.parts``)
    <out>/metrics.json        validation and test metrics of the combination
    <out>/predictions.npz     ids, labels and the combined probabilities
    <out>/leaderboard.csv     the ensemble's row next to its members' (and .json)
    <out>/confusion_*.png
    <out>/members/<i>-<name>/ each member's full run directory (written by ``write_run`` or
                              copied), so the ensemble needs nothing outside its directory

``evaluate`` and ``predict`` accept it (they rebuild it with
:func:`featurecache.finetune.assemble.assemble_run`), and ``finetune --epochs 0`` exports it as
one ``model.keras``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.cache.keys import digest_of
from featurecache.errors import RunError, UsageError
from featurecache.training.combine import check_method, combine, fit_weights

__all__ = ["EnsembleResult", "ensemble"]

ENSEMBLE_FORMAT = 1
MEMBERS_DIR = "members"
_TOP_K = (1, 3, 5)
# Rows of the leaderboard next to the members: these metrics, for val and test.
_BOARD_METRICS = ("accuracy", "log_loss", "macro_f1", "cohen_kappa")


@dataclass(frozen=True)
class EnsembleResult:
    """What :func:`ensemble` produced."""

    run_dir: Path
    method: str
    weights: tuple[float, ...] | None
    leaderboard: list[dict[str, Any]]
    metrics: dict[str, Any] = field(repr=False)
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "run_dir": str(self.run_dir),
            "method": self.method,
            "weights": list(self.weights) if self.weights is not None else None,
            "leaderboard": self.leaderboard,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Member:
    dir: Path  # inside the staging directory
    config: Mapping[str, Any]
    predictions: Mapping[str, np.ndarray]
    source: str
    label: str


def ensemble(
    runs: Sequence[str | os.PathLike[str]] = (),
    *,
    from_sweep: str | os.PathLike[str] | None = None,
    top: int = 3,
    method: str = "mean",
    out: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    cache_dir: str | os.PathLike[str] | None = None,
    plots: bool = True,
) -> EnsembleResult:
    """Combine trained heads into one ensemble run directory.

    Parameters
    ----------
    runs
        ``train-head`` run directories (any backbones or concatenated features, same dataset
        and validation split).
    from_sweep
        A sweep directory: its ``top`` best trials (by the sweep's metric) are refitted and added.
    top
        Trials taken from ``from_sweep``.
    method
        ``mean`` (average probabilities), ``vote`` (majority of top-1 classes) or ``weighted``
        (weights fitted on the validation split by log loss); see :mod:`featurecache.combine`.
    out
        Output directory; default ``<sweep>/ensemble-<method>-top<N>`` with ``from_sweep``, else
        ``<runs_dir>/ensemble-<method>-<digest>``. An earlier ensemble there is replaced.
    runs_dir
        Parent of the default output directory without ``from_sweep``.
    cache_dir
        Cache root (to reopen a sweep's features).
    plots
        Write confusion-matrix PNGs (and the refitted members' plots).

    Returns
    -------
    EnsembleResult

    Raises
    ------
    UsageError
        Fewer than two members, a bad method or ``top``, a run given twice, members validated on
        other images or predicting other classes, or ``out`` holding something else.
    RunError
        A run or sweep directory is missing or incomplete.
    EntryNotFoundError, IncompleteEntryError
        A sweep's features are no longer in the cache.
    """
    started = time.perf_counter()
    check_method(method)
    if from_sweep is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise UsageError(f"--top must be an integer >= 1, got {top!r}")
    paths = [Path(r) for r in runs]
    resolved = [p.resolve() for p in paths]
    dup = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if dup is not None:
        raise UsageError(f"run {dup} is given twice; list each run once")
    n_members = len(paths) + (top if from_sweep is not None else 0)
    if n_members < 2:
        raise UsageError(
            "an ensemble needs at least two members; pass two or more runs, or --from-sweep DIR with --top 2 or more"
        )
    out_dir = Path(out) if out is not None else _default_out(paths, from_sweep, top, method, Path(runs_dir))
    _check_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named as rundir's temporary directories, so pages written inside are titled with out_dir's name.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        (staging / MEMBERS_DIR).mkdir(parents=True)
        members = [_copy_run(p, staging / MEMBERS_DIR, i) for i, p in enumerate(paths)]
        notes: list[str] = []
        if from_sweep is not None:
            members += _sweep_members(
                Path(from_sweep),
                top,
                staging / MEMBERS_DIR,
                start=len(members),
                cache_dir=cache_dir,
                plots=plots,
                notes=notes,
            )
        _check_compatible(members)
        result = _write_ensemble(staging, members, method=method, plots=plots)
        if plots:
            from featurecache.report.html import write_report

            write_report(staging, cache_dir=cache_dir)  # top losses of the combination and report.html, as train-head
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weights, metrics, board = result
    return EnsembleResult(
        run_dir=out_dir,
        method=method,
        weights=weights,
        leaderboard=board,
        metrics=metrics,
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


def _default_out(paths: Sequence[Path], from_sweep: Any, top: int, method: str, runs_dir: Path) -> Path:
    if from_sweep is not None and not paths:
        return Path(from_sweep) / f"ensemble-{method}-top{top}"
    sources = [str(p.resolve()) for p in paths] + (
        [f"{Path(from_sweep).resolve()}#top{top}"] if from_sweep is not None else []
    )
    return runs_dir / f"ensemble-{method}-{digest_of({'members': sources})[:8]}"


def _check_out(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier ensemble (or an empty directory)."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    from featurecache.training.runconfig import ENSEMBLE_KIND, read_run_config

    if read_run_config(out_dir).get("kind") != ENSEMBLE_KIND:
        raise UsageError(f"{out_dir} exists and is not an ensemble directory; pass a new --out, or remove it")


def _swap_in(staging: Path, out_dir: Path) -> None:
    aside = out_dir.parent / f".{out_dir.name}-old-{uuid.uuid4().hex[:6]}"
    if out_dir.exists():
        os.rename(out_dir, aside)
    os.rename(staging, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _member_name(index: int, name: str) -> str:
    return f"{index}-{name}"[:80]


def _copy_run(run: Path, members_dir: Path, index: int) -> _Member:
    """Check ``run`` is a train-head run whose head loads, and copy it into the ensemble."""
    from featurecache.finetuning.run_data import read_predictions
    from featurecache.training.runconfig import ENSEMBLE_KIND, read_run_config
    from featurecache.training.rundir import load_run

    if read_run_config(run).get("kind") == ENSEMBLE_KIND:
        raise UsageError(f"{run} is itself an ensemble; pass its member runs (in {run / MEMBERS_DIR}) instead")
    config, _ = load_run(run)  # the one gateway to a run's head: missing or unsafe heads fail here
    if config.get("kind") == "finetune" or "features" not in config or "classes" not in config:
        raise UsageError(
            f"{run} is not a train-head run; an ensemble combines runs of `featurecache train-head` or a sweep's trials"
        )
    dest = members_dir / _member_name(index, run.resolve().name)
    # Evaluations and temp files are not part of the run.
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval-*", ".*"))
    label = f"{config.get('head')} on {config['features'].get('name', '?')}"
    return _Member(dest, read_run_config(dest), read_predictions(dest), source=str(run.resolve()), label=label)


def _sweep_members(
    sweep_dir: Path, top: int, members_dir: Path, *, start: int, cache_dir: Any, plots: bool, notes: list[str]
) -> list[_Member]:
    """Refit the ``top`` best trials of a sweep and write each as a run in ``members_dir``."""
    from featurecache.cache.concat import open_recorded_features
    from featurecache.finetuning.run_data import read_predictions
    from featurecache.training.heads import get_head_spec
    from featurecache.training.runconfig import TRIAL_ID, read_run_config, recorded_name
    from featurecache.training.train import load_training_data, parse_validation_label, train_head

    try:
        board = json.loads((sweep_dir / "leaderboard.json").read_text())
    except (OSError, ValueError):
        raise RunError(
            f"{sweep_dir} has no readable leaderboard.json, so it is not a finished sweep; point --from-sweep to a directory written by `featurecache sweep`"
        ) from None
    best = read_run_config(sweep_dir / "best")
    if "features" not in best:
        raise RunError(
            f"sweep {sweep_dir} has no best/config.json to take its features from; run the sweep again to finish it"
        )
    ranked = [r for r in board.get("rows", []) if r.get("status") == "ok"]
    if len(ranked) < top:
        raise UsageError(
            f"--top {top} but sweep {sweep_dir} has {len(ranked)} successful trials; pass --top {len(ranked)} or fewer"
        )
    for row in ranked[:top]:  # each names a member directory: checked before anything is refitted
        recorded_name(
            row.get("trial"),
            TRIAL_ID,
            source=sweep_dir / "leaderboard.json",
            fix="run the same `featurecache sweep` command again to rewrite it",
        )
        get_head_spec(str(row.get("head")))  # an unknown head fails before naming a directory (a valid name has no "/")
    fs = open_recorded_features(best["features"], cache_dir=cache_dir)
    fraction, seed = parse_validation_label(best.get("validation", "")) or (0.15, 0)
    data = load_training_data(fs, val_fraction=fraction, seed=seed)
    expected = read_predictions(sweep_dir / "best")["val_ids"].astype(str)
    if not np.array_equal(np.asarray(data.ids_val, dtype=str), expected):
        raise RunError(
            f"the validation images of sweep {sweep_dir} cannot be reproduced from its features ({best.get('validation')}); run the sweep again"
        )
    members = []
    for i, row in enumerate(ranked[:top]):
        dest = members_dir / _member_name(start + i, f"{row['head'].replace(':', '-')}-{row['trial'][:8]}")
        res = train_head(fs, head=row["head"], params=row["params"], out=dest, data=data, plots=plots)
        again = res.metrics["val"]["accuracy"]
        if row.get("val_accuracy") is not None and abs(again - float(row["val_accuracy"])) > 1e-9:
            notes.append(
                f"trial {row['trial']} ({row['name']}) refits to val accuracy {again:.4f}, the sweep recorded {row['val_accuracy']:.4f}"
            )
        label = f"{row['name']} (sweep #{row['rank']})"
        members.append(
            _Member(
                dest,
                read_run_config(dest),
                read_predictions(dest),
                source=f"{sweep_dir.resolve()}#{row['trial']}",
                label=label,
            )
        )
    return members


def _check_compatible(members: Sequence[_Member]) -> None:
    """One line naming the first way a member was validated on other images than the first."""
    first = members[0]
    fix = (
        "ensemble runs trained on the same dataset with the same validation split (same --val-fraction and --val-seed)"
    )
    for m in members[1:]:
        pair = f"{m.source} and {first.source}"
        if list(m.config["classes"]) != list(first.config["classes"]):
            raise UsageError(f"runs {pair} predict different classes; {fix}")
        for split in ("val", "test"):
            a, b = first.predictions.get(f"{split}_ids"), m.predictions.get(f"{split}_ids")
            if a is None or b is None:
                if split == "val" or (a is None) != (b is None):
                    raise UsageError(f"runs {pair}: one has {split} predictions and the other not; {fix}")
                continue
            a, b = np.asarray(a, dtype=str), np.asarray(b, dtype=str)
            if len(a) != len(b) or not np.array_equal(a, b):
                n_diff = abs(len(a) - len(b)) + int(np.sum(a[: min(len(a), len(b))] != b[: min(len(a), len(b))]))
                raise UsageError(
                    f"runs {pair} were scored on different {split} images ({n_diff} of {len(a)} ids differ or are in another order); {fix}"
                )
            if not np.array_equal(first.predictions[f"{split}_y"], m.predictions[f"{split}_y"]):
                raise UsageError(f"runs {pair} label their {split} images differently; {fix}")


def _write_ensemble(
    staging: Path, members: Sequence[_Member], *, method: str, plots: bool
) -> tuple[tuple[float, ...] | None, dict[str, Any], list[dict[str, Any]]]:
    """Combine the members' predictions and write the ensemble's own files into ``staging``."""
    from featurecache._runtime.versions import library_versions
    from featurecache.cache.fsio import write_json
    from featurecache.training.metrics import classification_metrics
    from featurecache.training.runconfig import ENSEMBLE_KIND, RUN_FORMAT

    first = members[0]
    classes = [str(c) for c in first.config["classes"]]
    val_probas = [np.asarray(m.predictions["val_proba"], dtype=np.float64) for m in members]
    weights = (
        tuple(float(w) for w in fit_weights(val_probas, first.predictions["val_y"])) if method == "weighted" else None
    )
    metrics: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    splits = ["val"] + (["test"] if "test_ids" in first.predictions else [])
    for split in splits:
        proba = combine([m.predictions[f"{split}_proba"] for m in members], method, weights)
        y = first.predictions[f"{split}_y"]
        metrics[split] = classification_metrics(y, proba, classes=classes, top_k=_TOP_K)
        preds.update({f"{split}_proba": proba, f"{split}_y": y, f"{split}_ids": first.predictions[f"{split}_ids"]})
    records = [_member_record(m, staging, None if weights is None else weights[i]) for i, m in enumerate(members)]
    config = {
        "format": RUN_FORMAT,
        "kind": ENSEMBLE_KIND,
        "head": "ensemble",
        "params": {"method": method, "members": len(members)},
        "ensemble": {
            "format": ENSEMBLE_FORMAT,
            "method": method,
            "weights": list(weights) if weights else None,
            "weights_fitted_on": "val" if weights else None,
        },
        "members": records,
        "features": _features_record(members),
        "classes": classes,
        "validation": first.config.get("validation"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }
    write_json(staging / "config.json", config)
    write_json(staging / "metrics.json", metrics)
    np.savez(staging / "predictions.npz", **preds)  # type: ignore[arg-type]  # numpy 2.1+ stubs let **arrays fill allow_pickle: these are array names
    board = _leaderboard(metrics, members, method)
    _write_board(staging, board)
    if plots:
        from featurecache.report import plot_confusion_matrix

        for split, m in metrics.items():
            plot_confusion_matrix(
                m["confusion_matrix"],
                classes,
                staging / f"confusion_{split}.png",
                title=f"{method} ensemble of {len(members)} on {split}",
            )
    return weights, metrics, board


def _member_record(m: _Member, staging: Path, weight: float | None) -> dict[str, Any]:
    cfg = m.config
    return {
        "dir": str(m.dir.relative_to(staging)),
        "source": m.source,
        "label": m.label,
        "head": cfg.get("head"),
        "params": cfg.get("params"),
        "features": {"key": cfg["features"].get("key"), "name": cfg["features"].get("name")},
        "weight": weight,
    }


def _features_record(members: Sequence[_Member]) -> dict[str, Any]:
    """Every feature set the members read (``spec.parts``), and the dataset they share."""
    from featurecache.cache.concat import feature_parts

    parts: dict[str, dict[str, Any]] = {}
    for m in members:
        for part in feature_parts(m.config["features"]):
            parts.setdefault(str(part["key"]), part)
    first = members[0].config["features"]
    spec0 = first.get("spec") or {}
    return {
        "key": digest_of({"ensemble": [str(m.config["features"].get("key")) for m in members]}),
        "name": f"ensemble of {len(members)} runs on {len(parts)} feature set(s)",
        "spec": {"parts": list(parts.values()), "seed": spec0.get("seed", 0)},
        "dataset_source": first.get("dataset_source"),
        "dataset_limit": first.get("dataset_limit"),
    }


def _leaderboard(metrics: Mapping[str, Any], members: Sequence[_Member], method: str) -> list[dict[str, Any]]:
    def row(name: str, kind: str, m: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "kind": kind}
        for split in ("val", "test"):
            if split in m:
                out[f"{split}_n"] = m[split].get("n")  # for the accuracy's confidence interval
            for k in _BOARD_METRICS:
                if split in m:
                    out[f"{split}_{k}"] = m[split].get(k)
        return out

    rows = [row(f"{method} ensemble of {len(members)}", "ensemble", metrics)]
    for m in members:
        try:
            member_metrics = json.loads((m.dir / "metrics.json").read_text())
        except (OSError, ValueError):
            member_metrics = {}
        rows.append(row(m.label, "member", member_metrics))
    return rows


def _write_board(staging: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    from featurecache.cache.fsio import write_json

    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with open(staging / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_json(staging / "leaderboard.json", {"rows": list(rows)})
