"""Stage 3: rebuild backbone + head from a run directory, check it, fine-tune it, export it.

How it works
------------
:func:`finetune` runs the stage in this order; each step lives in the module named for it, and
each module's docstring explains its mechanism:

1. :mod:`~featurecache.finetune.rebuild` -- one Keras model computing exactly
   ``head(pool(backbone(preprocess(resize(x)))))`` on raw images of any size, from what the run
   recorded; preprocessing modes become built-in layers.
2. :mod:`~featurecache.finetune.convert` -- the run's head as Keras layers (a ``DenseHead`` is
   spliced in; linear scikit-learn heads and their probability rules are converted exactly).
3. :mod:`~featurecache.finetune.unfreeze` -- backbone blocks made trainable by registry name;
   BatchNormalization never trains.
4. :mod:`~featurecache.finetune.run_data` -- the run's images: same dataset, subset and
   validation rows.
5. :mod:`~featurecache.finetune.equivalence` -- before any training, the rebuilt model must
   reproduce the head's cached-feature predictions, else an error names the likely cause.
6. :mod:`~featurecache.finetune.training` -- the loop: a wrapper that keeps the backbone in
   inference mode, a ``PyDataset`` that decodes, resizes and augments, callbacks.
7. :mod:`~featurecache.finetune.inference` -- the model on raw images, to score val/test.
8. :mod:`~featurecache.finetune.export` -- ``model.keras`` (plain Keras, safe mode) and the
   records beside it.

An ensemble, or a head on several feature sets, is built by
:mod:`~featurecache.finetune.assemble` (each backbone once, each head on its backbones, the
combination as layers), checked the same way and exported; it is not fine-tuned end to end.

Importing this package imports no TensorFlow: every module imports Keras inside its functions.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurecache._runtime.options import expands
from featurecache._runtime.versions import library_versions
from featurecache.errors import FeatureCacheWarning, UsageError
from featurecache.finetuning.assemble import Assembled, assemble_run, is_assembled, read_run_config
from featurecache.finetuning.convert import KERAS_EXPRESSIBLE_HEADS, keras_head
from featurecache.finetuning.equivalence import EquivalenceReport, check_equivalence
from featurecache.finetuning.export import MODEL_FILE, export_model, write_outputs
from featurecache.finetuning.inference import ImagePredictor, image_pool, model_draft, predict_rows
from featurecache.finetuning.options import FinetuneOptions
from featurecache.finetuning.rebuild import Rebuilt, preprocess_layers, rebuild_model
from featurecache.finetuning.run_data import RunData, load_run_data, read_predictions
from featurecache.finetuning.training import OPTIMIZERS, fit_model, history_summary, make_trainer
from featurecache.finetuning.unfreeze import resolve_unfreeze, trainable_text, unfreeze_blocks

# A name tests imported from the single-module ``featurecache.finetune`` before it became a
# package; kept so those imports keep working.
_make_trainer = make_trainer

__all__ = [
    "KERAS_EXPRESSIBLE_HEADS",
    "OPTIMIZERS",
    "Assembled",
    "EquivalenceReport",
    "FinetuneResult",
    "ImagePredictor",
    "Rebuilt",
    "assemble_run",
    "check_equivalence",
    "finetune",
    "keras_head",
    "load_run_data",
    "predict_rows",
    "preprocess_layers",
    "rebuild_model",
    "resolve_unfreeze",
    "unfreeze_blocks",
]

#: Version of the fine-tune ``config.json`` layout; bump when it changes.
FINETUNE_FORMAT = 1


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` produced."""

    out: Path
    model_path: Path
    equivalence: EquivalenceReport = field(repr=False)
    trainable: dict[str, dict[str, Any]] = field(repr=False)
    history: dict[str, list[float]] = field(repr=False)
    metrics: dict[str, Any] = field(repr=False)
    seconds: float
    savedmodel: Path | None = None
    unfreeze: str = ""  # the --unfreeze request as given
    before: dict[str, Any] = field(default_factory=dict, repr=False)  # the head's metrics per split (its metrics.json)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (metrics without per-class tables)."""
        return {
            "out": str(self.out),
            "model": str(self.model_path),
            "savedmodel": str(self.savedmodel) if self.savedmodel else None,
            "equivalence": self.equivalence.to_json(),
            "unfreeze": self.unfreeze,
            "trainable": _trainable_summary(self.trainable),
            "epochs": len(self.history.get("loss", [])),
            "metrics": {s: _short_metrics(m) for s, m in self.metrics.items()},
            "before": self.before,
            "seconds": round(self.seconds, 3),
        }

    def change_line(self) -> str:
        """``val accuracy 0.948 -> 0.922, log loss 0.173 -> 0.245``: the head, then the fine-tuned model."""
        old, new = self.before.get("val", {}), self.metrics.get("val", {})
        parts = [
            f"{name.replace('_', ' ')} {old[name]:.3f} -> {new[name]:.3f}"
            for name in ("accuracy", "log_loss")
            if name in old and name in new
        ]
        return "val " + ", ".join(parts) if parts else ""


def _short_metrics(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "log_loss", "macro_f1", "cohen_kappa", "top_k_accuracy") if k in m}


@expands(FinetuneOptions)
def finetune(
    run: str | os.PathLike[str],
    options: FinetuneOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> FinetuneResult:
    """Rebuild a run as one model, check it reproduces the head, fine-tune it and export it.

    Parameters
    ----------
    run
        A ``train-head`` run directory. An ensemble (``featurecache ensemble``) or a head on
        several feature sets is only checked and exported (``epochs`` must be 0): fine-tuning
        several backbones end to end is not supported.
    options
        A :class:`~featurecache.finetuning.options.FinetuneOptions` holding the options below
        from ``unfreeze`` to ``tensorboard`` but ``cache_dir`` and ``progress`` (default: all
        defaults). Each of them may also be passed as a keyword, which wins over ``options``.
    unfreeze
        Backbone blocks to train: names from the registry (``featurecache backbones --blocks
        NAME``), ``top:N`` (the last N), ``all`` or ``none``; comma-separated. The head always
        trains; BatchNormalization layers never do.
    epochs
        Maximum epochs (early stopping on ``val_loss`` restores the best weights); ``0`` only
        rebuilds, checks and exports.
    out
        Output directory; default ``<run>-ft``.
    lr
        Initial learning rate (reduced on plateau).
    optimizer
        ``adam``, ``rmsprop`` or ``sgd`` (momentum 0.9).
    batch_size
        Images per step.
    augment
        On-the-fly augmentation of training images, extract's syntax (``flip,rotation=10``),
        drawn anew each epoch.
    patience
        Epochs without ``val_loss`` improvement before stopping (0 disables early stopping).
    tolerance
        Equivalence tolerance on probabilities.
    check_samples
        Validation images used by the equivalence check (``None`` or 0 = all).
    data
        The run's dataset at another location (default the recorded source).
    limit
        Images per split (default the extraction's ``--limit``).
    weights
        Backbone weights if the run's cannot be found (must have the recorded identity).
    seed
        Seeds the batch order, augmentation and dropout.
    savedmodel
        Also write a TensorFlow SavedModel to ``<out>/savedmodel`` (``model.export``).
    plots
        Write training-curve and confusion-matrix PNGs.
    cache_dir
        Cache root (weights and file-digest memos; diagnosis of a mismatch).
    progress
        Print the check, the trainable layers and one line per epoch on stderr.
    tensorboard
        TensorBoard log directory: Keras's curves and the fine-tune's settings and final
        metrics (HParams) go to ``<tensorboard>/<out name>``.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    RunError
        The run directory or its head is missing, or the images are not found.
    EquivalenceError
        The rebuilt model does not reproduce the head's predictions (before any training).
    UsageError
        Bad options (unknown block, optimizer, ...) or a head Keras cannot express.
    """
    from featurecache.data import AugmentSpec

    o = FinetuneOptions.merge(options, overrides)  # every value checked before any work
    unfreeze, epochs, out, lr, optimizer, batch_size = o.unfreeze, o.epochs, o.out, o.lr, o.optimizer, o.batch_size
    patience, tolerance, check_samples, data, limit, weights = (
        o.patience,
        o.tolerance,
        o.check_samples,
        o.data,
        o.limit,
        o.weights,
    )
    seed, savedmodel, plots, tensorboard = o.seed, o.savedmodel, o.plots, o.tensorboard
    started = time.perf_counter()
    aug = AugmentSpec.parse(o.augment)
    log = sys.stderr if progress else None
    if is_assembled(read_run_config(run)):
        _refuse_training_assembled(run, epochs)
        return _export_assembled(
            run,
            out=out,
            tolerance=tolerance,
            check_samples=check_samples,
            data=data,
            limit=limit,
            weights=weights,
            batch_size=batch_size,
            savedmodel=savedmodel,
            plots=plots,
            cache_dir=cache_dir,
            log=log,
            started=started,
        )

    import keras

    # Seeded before the rebuild: loading the head creates its Dropout layers' seed generators,
    # which otherwise draw from an unseeded global state (two identical runs then differed).
    keras.utils.set_random_seed(int(seed))
    rebuilt = rebuild_model(run, weights=weights, cache_dir=cache_dir)
    # Fail on a bad --unfreeze before the (slower) image loading and check.
    trainable = unfreeze_blocks(rebuilt, unfreeze)
    predictions = read_predictions(rebuilt.run_dir)
    run_data = load_run_data(rebuilt.config, predictions, data=data, limit=limit, cache_dir=cache_dir)
    history: dict[str, list[float]] = {}
    best_epoch = None
    before = _head_metrics(rebuilt.run_dir)
    curve_before = {
        f"val_{k}": before["val"][m]
        for k, m in (("loss", "log_loss"), ("accuracy", "accuracy"))
        if m in before.get("val", {})
    }
    out_dir = Path(out) if out is not None else rebuilt.run_dir.with_name(rebuilt.run_dir.name + "-ft")
    # One pool of decode threads and one traced predictor for the check and the final
    # evaluation (the trace reads the model's variables, so it sees the fine-tuned weights).
    predictor = ImagePredictor(rebuilt.model, batch_size=batch_size)
    with image_pool("fc-ft") as pool:
        report = check_equivalence(
            rebuilt,
            run_data,
            predictions,
            tolerance=tolerance,
            max_samples=check_samples,
            batch_size=batch_size,
            cache_dir=cache_dir,
            predictor=predictor,
            pool=pool,
        )
        _print_check(log, report, tolerance=tolerance, trainable=trainable, rebuilt=rebuilt)
        out_dir.mkdir(parents=True, exist_ok=True)
        tb_dir, tb_callbacks = _tensorboard_log(tensorboard, out_dir)
        if epochs > 0:
            history, best_epoch = fit_model(
                rebuilt,
                run_data,
                out_dir=out_dir,
                epochs=epochs,
                lr=lr,
                optimizer=optimizer,
                batch_size=batch_size,
                augment=None if aug.is_identity() else aug,
                patience=patience,
                seed=int(seed),
                pool=pool,
                log=log,
                callbacks=tb_callbacks,
                before=curve_before,
            )
        metrics, preds = _evaluate_run_splits(rebuilt, run_data, predictor=predictor, pool=pool)
    model_path = export_model(rebuilt.model, out_dir, savedmodel=savedmodel, classes=rebuilt.classes)
    seconds = time.perf_counter() - started
    training = {
        "epochs": epochs,
        "lr": lr,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "augment": str(aug),
        "patience": patience,
        "seed": seed,
    }
    config = _finetune_config(
        rebuilt,
        run_data,
        report=report,
        unfreeze=unfreeze,
        trainable=trainable,
        training=training,
        history=history,
        best_epoch=best_epoch,
        metrics=metrics,
        seconds=seconds,
    )
    config["before"] = before
    write_outputs(
        out_dir,
        config=config,
        metrics=metrics,
        predictions=preds,
        history=history,
        classes=rebuilt.classes,
        title=f"fine-tune {rebuilt.backbone_spec.name} ({unfreeze})",
        plots=plots,
        before=curve_before,
    )
    if tb_dir is not None:
        _write_hparams(tb_dir, head=rebuilt.config.get("head"), unfreeze=unfreeze, training=training, metrics=metrics)
    result = FinetuneResult(
        out=out_dir,
        model_path=model_path,
        equivalence=report,
        trainable=trainable,
        history=history,
        metrics=metrics,
        seconds=seconds,
        savedmodel=out_dir / "savedmodel" if savedmodel else None,
        unfreeze=unfreeze,
        before=before,
    )
    _warn_if_worse(result, epochs)
    return result


def _head_metrics(run_dir: Path) -> dict[str, Any]:
    """The head's short metrics per split from the run's ``metrics.json`` (empty if it has none)."""
    import json

    try:
        recorded = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return (
        {s: _short_metrics(m) for s, m in recorded.items() if isinstance(m, Mapping)}
        if isinstance(recorded, Mapping)
        else {}
    )


def _warn_if_worse(result: FinetuneResult, epochs: int) -> None:
    """Warn when the fine-tuned model's validation accuracy ends below the head's."""
    old, new = result.before.get("val", {}).get("accuracy"), result.metrics.get("val", {}).get("accuracy")
    if epochs > 0 and old is not None and new is not None and new < old:
        warnings.warn(
            FeatureCacheWarning(
                f"fine-tuning ended worse than the head ({result.change_line()}); the head's run is unchanged: "
                "keep it, or try a lower --lr, fewer --unfreeze blocks or --augment"
            ),
            stacklevel=3,
        )


def _print_check(
    log: Any, report: EquivalenceReport, *, tolerance: float, trainable: Mapping[str, Any], rebuilt: Rebuilt
) -> None:
    """Print the equivalence check's result and the trainable layers on ``log`` (nothing without it)."""
    if log:
        print(f"equivalence: {report.summary()}", file=log)
        print(trainable_text(trainable, rebuilt), file=log)


def _refuse_training_assembled(run: str | os.PathLike[str], epochs: int) -> None:
    """Refuse ``epochs > 0`` for an ensemble or a head on several feature sets (only checked and exported)."""
    if epochs > 0:
        raise UsageError(
            f"{run} is an ensemble or a head on several feature sets, and fine-tuning several backbones end to end is not "
            "supported; pass --epochs 0 to check it and export it as one model.keras, or fine-tune one member run on its own"
        )


def _tensorboard_log(tensorboard: str | os.PathLike[str] | None, out_dir: Path) -> tuple[Path | None, list[Any]]:
    """The fine-tune's TensorBoard run directory and Keras callback (``None`` and none without ``tensorboard``)."""
    if tensorboard is None:
        return None, []
    from featurecache.report.tensorboard import fresh_run_log_dir, keras_callback

    tb_dir = fresh_run_log_dir(tensorboard, out_dir.name)
    return tb_dir, [keras_callback(tb_dir)]


def _write_hparams(
    tb_dir: Path, *, head: Any, unfreeze: str, training: Mapping[str, Any], metrics: Mapping[str, Any]
) -> None:
    """Record the fine-tune's settings and final metrics as a TensorBoard HParams run."""
    from featurecache.report.tensorboard import write_hparams_run

    settings = {
        "head": head,
        "unfreeze": unfreeze,
        **{k: training[k] for k in ("lr", "optimizer", "batch_size", "augment", "epochs")},
    }
    write_hparams_run(tb_dir, hparams=settings, metrics=metrics)


def _finetune_config(
    rebuilt: Rebuilt,
    run_data: RunData,
    *,
    report: Any,
    unfreeze: str,
    trainable: Mapping[str, Any],
    training: Mapping[str, Any],
    history: Mapping[str, list[float]],
    best_epoch: int | None,
    metrics: Mapping[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The fine-tune output's ``config.json``: the base run, dataset, model input, check, training and results."""
    spec = rebuilt.spec
    return {
        "format": FINETUNE_FORMAT,
        "kind": "finetune",
        "base_run": str(rebuilt.run_dir.absolute()),
        "head": rebuilt.config.get("head"),
        "params": rebuilt.config.get("params"),
        "features": rebuilt.config["features"],
        "classes": list(rebuilt.classes),
        "dataset": _dataset_record(run_data),
        "model": {
            "file": MODEL_FILE,
            "input": "RGB uint8/float in [0, 255], any size (resized inside)",
            "input_size": int(spec["input_size"]),
            "resize": str(spec["resize"]),
            "preprocess": spec["preprocess"],
        },
        "equivalence": report.to_json(),
        "unfreeze": unfreeze,
        "trainable": _trainable_summary(trainable),
        "trainable_layers": {k: v["layers"] for k, v in trainable.items()},
        "training": dict(training),
        "history": history_summary(history, best_epoch),
        "metrics": {s: _short_metrics(m) for s, m in metrics.items()},
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }


def _dataset_record(run_data: RunData) -> dict[str, Any]:
    """What ``config.json`` records of the images: enough for ``evaluate`` to find them again."""
    return {
        "source": run_data.source,
        "limit": run_data.limit,
        "seed": run_data.seed,
        "validation": run_data.val_split,
        "n_train": len(run_data.train_rows),
        "n_val": len(run_data.val_rows),
    }


def _export_assembled(
    run: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None,
    tolerance: float,
    check_samples: int | None,
    data: str | None,
    limit: int | None,
    weights: str | None,
    batch_size: int,
    savedmodel: bool,
    plots: bool,
    cache_dir: str | os.PathLike[str] | None,
    log: Any,
    started: float,
) -> FinetuneResult:
    """``finetune --epochs 0`` of an ensemble or a multi-feature-set head: build, check, export."""
    assembled = assemble_run(run, weights=weights, cache_dir=cache_dir)
    predictions = read_predictions(assembled.run_dir)
    run_data = load_run_data(assembled.config, predictions, data=data, limit=limit, cache_dir=cache_dir)
    out_dir = Path(out) if out is not None else assembled.run_dir.with_name(assembled.run_dir.name + "-ft")
    predictor = ImagePredictor(assembled.model, batch_size=batch_size)
    with image_pool("fc-ft") as pool:
        report = check_equivalence(
            assembled,
            run_data,
            predictions,
            tolerance=tolerance,
            max_samples=check_samples,
            batch_size=batch_size,
            cache_dir=cache_dir,
            predictor=predictor,
            pool=pool,
        )
        if log:
            print(f"equivalence: {report.summary()}", file=log)
        metrics, preds = _evaluate_run_splits(assembled, run_data, predictor=predictor, pool=pool)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = export_model(assembled.model, out_dir, savedmodel=savedmodel)
    seconds = time.perf_counter() - started
    cfg = assembled.config
    config = {
        "format": FINETUNE_FORMAT,
        "kind": "finetune",
        "base_run": str(assembled.run_dir.absolute()),
        "head": cfg.get("head"),
        "params": cfg.get("params"),
        "features": cfg["features"],
        "classes": list(assembled.classes),
        "dataset": _dataset_record(run_data),
        "model": {
            "file": MODEL_FILE,
            "input": "RGB uint8/float in [0, 255], any size (resized inside)",
            "branches": [
                {
                    "backbone": b.backbone.name,
                    "key": b.key,
                    "input_size": int(b.spec["input_size"]),
                    "resize": str(b.spec["resize"]),
                    "preprocess": b.spec["preprocess"],
                }
                for b in assembled.branches
            ],
            "heads": len(assembled.members),
            "combination": cfg.get("ensemble"),
        },
        "equivalence": report.to_json(),
        "unfreeze": "none",
        "trainable": {},
        "training": {"epochs": 0, "note": "ensembles and heads on several feature sets are exported, not fine-tuned"},
        "history": history_summary({}, None),
        "metrics": {s: _short_metrics(m) for s, m in metrics.items()},
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }
    write_outputs(
        out_dir,
        config=config,
        metrics=metrics,
        predictions=preds,
        history={},
        classes=assembled.classes,
        title="export",
        plots=plots,
    )
    return FinetuneResult(
        out=out_dir,
        model_path=model_path,
        equivalence=report,
        trainable={},
        history={},
        metrics=metrics,
        seconds=seconds,
        savedmodel=out_dir / "savedmodel" if savedmodel else None,
        unfreeze="none",
    )


def _evaluate_run_splits(
    rebuilt: Rebuilt | Assembled, run_data: RunData, *, predictor: ImagePredictor, pool: ThreadPoolExecutor
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics and predictions of the model on the run's validation rows and the test split."""
    from featurecache.training.metrics import classification_metrics

    ds = run_data.dataset
    todo = [("val", ds.splits[run_data.val_split], run_data.val_rows)]
    if "test" in ds.splits:
        todo.append(("test", ds.splits["test"], np.arange(len(ds.splits["test"]))))
    metrics: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    for name, split, rows in todo:
        proba, ok = predict_rows(predictor, split, rows, pool=pool, draft=model_draft(rebuilt))
        y = run_data.labels[split.labels[rows]][ok]
        if len(y):
            metrics[name] = classification_metrics(y, proba[ok], classes=rebuilt.classes)
        preds[f"{name}_ids"] = np.asarray([split.ids[int(r)] for r in rows], dtype=str)[ok]
        preds[f"{name}_y"], preds[f"{name}_proba"] = y, proba[ok]
    return metrics, preds


def _trainable_summary(trainable: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per part (backbone, head): trainable layer count, parameters, BatchNorm frozen or not."""
    return {
        k: {"layers": len(v["layers"]), "params": v["params"], "batchnorm_frozen": v["batchnorm_frozen"]}
        for k, v in trainable.items()
    }
