"""``featurecache finetune``, ``featurecache evaluate`` and ``featurecache predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featurecache.cli._common import CacheOpt, JsonOpt, QuietOpt, handle_errors, print_json
from featurecache.cli.options import stage_options
from featurecache.finetuning.options import BATCH_HELP, LIMIT_HELP, NO_PLOTS_HELP, WEIGHTS_HELP, FinetuneOptions

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="A model.keras file, a fine-tune output directory, or a train-head run directory (rebuilt).",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", "-w", help=WEIGHTS_HELP, show_default=False),
]
# The help of the options evaluate and predict share with finetune is FinetuneOptions's.
BatchOpt = Annotated[int, typer.Option("--batch-size", help=BATCH_HELP)]
LimitOpt = Annotated[int | None, typer.Option("--limit", help=LIMIT_HELP, show_default=False)]
NoPlotsOpt = Annotated[bool, typer.Option("--no-plots", help=NO_PLOTS_HELP)]


def _metric_line(metrics: dict) -> str:
    parts = []
    for split, m in metrics.items():
        parts.append(
            f"{split} accuracy {m['accuracy']:.4f}, log loss {m['log_loss']:.4f}, macro F1 {m['macro_f1']:.4f} (n={m['n']})"
        )
    return "; ".join(parts)


@handle_errors
@stage_options(FinetuneOptions, param="finetune_options")
def finetune_cmd(
    run: Annotated[
        Path,
        typer.Option(
            "--run",
            "-r",
            help="The train-head run directory to fine-tune (an ensemble is only exported: --epochs 0).",
            show_default=False,
        ),
    ],
    finetune_options: FinetuneOptions,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild backbone + head from a run, check it reproduces the head, fine-tune it, export model.keras."""
    from featurecache.finetuning.finetune import finetune

    result = finetune(run, finetune_options, cache_dir=cache, progress=not (quiet or json_out))
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
        typer.Option(
            "--data",
            "-d",
            help="Dataset source (default: the one the model's run was extracted from).",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Split to evaluate: train, val (without a val split: the run's hold-out of train) or test."
        ),
    ] = "test",
    limit: LimitOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output directory (default: <model dir>/eval-<dataset>-<split>).", show_default=False
        ),
    ] = None,
    batch_size: BatchOpt = 32,
    weights: WeightsOpt = None,
    no_plots: NoPlotsOpt = False,
    cache: CacheOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Metrics (accuracy, log loss, kappa, macro F1, confusion matrix) of a model on a dataset split."""
    from featurecache.finetuning.predict import evaluate

    result = evaluate(
        model,
        data=data,
        split=split,
        limit=limit,
        out=out,
        plots=not no_plots,
        batch_size=batch_size,
        weights=weights,
        cache_dir=cache,
    )
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
    images: Annotated[
        list[Path], typer.Argument(help="Image files or folders (searched recursively).", show_default=False)
    ],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes shown per image.")] = 3,
    csv_out: Annotated[
        Path | None,
        typer.Option(
            "--csv", help="Also write image,class_1,probability_1,... rows to this CSV file.", show_default=False
        ),
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
