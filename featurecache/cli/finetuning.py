"""``featurecache finetune``, ``featurecache evaluate`` and ``featurecache predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, QuietOpt, TensorBoardOpt, handle_errors, print_json

ModelArg = Annotated[
    Path,
    typer.Argument(help="A model.keras file, a fine-tune output directory, or a train-head run directory (rebuilt).", show_default=False),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", "-w", help="Backbone weights when rebuilding a run (default: what the run records).", show_default=False),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per step.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="At most N images per split (default: the run's --limit).", show_default=False)]
NoPlotsOpt = Annotated[bool, typer.Option("--no-plots", help="Do not write PNG plots.")]


def _metric_line(metrics: dict) -> str:
    parts = []
    for split, m in metrics.items():
        parts.append(f"{split} accuracy {m['accuracy']:.4f}, log loss {m['log_loss']:.4f}, macro F1 {m['macro_f1']:.4f} (n={m['n']})")
    return "; ".join(parts)


@handle_errors
def finetune_cmd(
    run: Annotated[Path, typer.Option("--run", "-r", help="The train-head run directory to fine-tune (an ensemble is only exported: --epochs 0).", show_default=False)],
    unfreeze: Annotated[
        str,
        typer.Option("--unfreeze", "-u", help="Backbone blocks to train: names (see `featurecache backbones --blocks NAME`), top:N, all or none; comma-separated."),
    ] = "top:1",
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs (0: only rebuild, check and export).")] = 10,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default: <run>-ft).", show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Initial learning rate (reduced on plateau).")] = 1e-5,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam, rmsprop or sgd (momentum 0.9).")] = "adam",
    batch_size: BatchOpt = 32,
    augment: Annotated[
        str | None,
        typer.Option("--augment", help="On-the-fly augmentation of training images, e.g. flip,rotation=10,zoom=0.1 (new draw each epoch).", show_default=False),
    ] = None,
    patience: Annotated[int, typer.Option("--patience", help="Early-stopping patience on val_loss (0: off).")] = 3,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Equivalence check: largest allowed probability difference.")] = 1e-4,
    check_samples: Annotated[int, typer.Option("--check-samples", help="Validation images used by the equivalence check (0: all).")] = 512,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="The run's dataset at another location (default: the recorded source).", show_default=False),
    ] = None,
    limit: LimitOpt = None,
    weights: WeightsOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of batch order, augmentation and dropout.")] = 0,
    savedmodel: Annotated[bool, typer.Option("--savedmodel", help="Also export a TensorFlow SavedModel to <out>/savedmodel.")] = False,
    no_plots: NoPlotsOpt = False,
    tensorboard: TensorBoardOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild backbone + head from a run, check it reproduces the head, fine-tune it, export model.keras."""
    from featurecache.finetuning.finetune import finetune

    result = finetune(
        run,
        unfreeze=unfreeze,
        epochs=epochs,
        out=out,
        lr=lr,
        optimizer=optimizer,
        batch_size=batch_size,
        augment=augment,
        patience=patience,
        tolerance=tolerance,
        check_samples=check_samples or None,
        data=data,
        limit=limit,
        weights=weights,
        seed=seed,
        savedmodel=savedmodel,
        plots=not no_plots,
        cache_dir=cache,
        progress=not (quiet or json_out),
        tensorboard=tensorboard,
    )
    if json_out:
        print_json(result.to_json())
        return
    eq = result.equivalence
    typer.echo(f"rebuilt model matches the head on {eq.n} validation images (max |dp| {eq.max_abs_diff:.2g})")
    n_epochs = len(result.history.get("loss", []))
    typer.echo(f"fine-tuned {n_epochs} epochs in {result.seconds:.1f} s: {_metric_line(result.metrics)}")
    if result.change_line():
        typer.echo(f"{result.change_line()} (head -> fine-tuned)")
    typer.echo(f"model {result.model_path}" + (f", SavedModel {result.savedmodel}" if result.savedmodel else ""))


@handle_errors
def evaluate_cmd(
    model: ModelArg,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Dataset source (default: the one the model's run was extracted from).", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: train, val (without a val split: the run's hold-out of train) or test.")] = "test",
    limit: LimitOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default: <model dir>/eval-<dataset>-<split>).", show_default=False)] = None,
    batch_size: BatchOpt = 32,
    weights: WeightsOpt = None,
    no_plots: NoPlotsOpt = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Metrics (accuracy, log loss, kappa, macro F1, confusion matrix) of a model on a dataset split."""
    from featurecache.finetuning.predict import evaluate

    result = evaluate(model, data=data, split=split, limit=limit, out=out, plots=not no_plots, batch_size=batch_size, weights=weights, cache_dir=cache)
    if json_out:
        print_json(result.to_json())
        return
    typer.echo(f"{result.model} on {result.data}: {_metric_line({result.split: result.metrics})}")
    if result.invalid:
        typer.echo(f"warning: {result.invalid} images could not be decoded and were left out", err=True)
    typer.echo(f"wrote {result.out}")


@handle_errors
def predict_cmd(
    model: ModelArg,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes shown per image.")] = 3,
    csv_out: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write image,class_1,probability_1,... rows to this CSV file.", show_default=False),
    ] = None,
    batch_size: BatchOpt = 32,
    weights: WeightsOpt = None,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Classify images: the top-k class names and probabilities of each."""
    from featurecache.finetuning.predict import predict, write_predictions_csv

    preds = predict(model, images, top_k=top_k, batch_size=batch_size, weights=weights, cache_dir=cache)
    if csv_out is not None:
        write_predictions_csv(preds, csv_out)
    if json_out:
        print_json([p.to_json() for p in preds])
        return
    for p in preds:
        typer.echo(f"{p.image}: " + ", ".join(f"{c} {prob:.3f}" for c, prob in p.top))
    if csv_out is not None:
        typer.echo(f"wrote {csv_out} ({len(preds)} images)")
