"""How much faster a dense head trains on cached features than behind the frozen backbone.

Both runs train the *same* head (``featurecache.training.heads.dense.build_dense_model``, the model
``DenseHead`` trains, same seed so the same initial weights) for the same epochs on the same
preprocessed images with the same batch size and optimizer:

* **cached**: the frozen backbone runs once over the images (that pass is what ``featurecache
  extract`` stores, timed separately as the one-off cost); the head then trains on the
  resulting feature array;
* **in the loop**: backbone + head as one Keras model with the backbone frozen and called with
  ``training=False`` (BatchNorm in inference mode), so every epoch runs the backbone forward
  again, as classic "frozen base model" transfer-learning code does.

Reported: seconds per epoch of each (the first epoch, which includes tracing, separately from
the steady state: the median of the later epochs), their ratio, and the epoch count after
which the one-off feature pass has paid for itself. Weights default to random (no download);
speed does not depend on the weight values.

Run from the repository root::

    python -m benchmarks.head_speed                       # vgg19, 64 px, 500 digits, 3 epochs
    python -m benchmarks.head_speed --backbone mobilenetv2 --size 96 --n 1000 --epochs 5

A table goes to the terminal and a JSON document to ``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default="builtin:digits",
        help="dataset source, as for `featurecache extract` (default: builtin:digits)",
    )
    parser.add_argument("--backbone", default="vgg19", help="backbone name (default: vgg19)")
    parser.add_argument("--weights", default="random", help="random (default), imagenet, or a weights file")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels (default: 64)")
    parser.add_argument("--n", type=int, default=500, help="training images (default: 500)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs of each run, >= 2 so a steady epoch exists (default: 3)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both runs (default: 32)")
    parser.add_argument("--hidden", default="256", help="hidden widths of the head, e.g. 256 or 512-128 (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and head initialisation (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder of the JSON result (default: benchmarks/results)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch includes tracing), got {args.epochs}")
    if args.n < 2 or args.batch_size < 1:
        parser.error("--n must be >= 2 and --batch-size >= 1")
    return args


def _images(source: str, *, n: int, size: int, backbone: Any, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``n`` training images, resized and preprocessed exactly as extract does."""
    from featurecache import backbones
    from featurecache.data import load_dataset, resize_image

    dataset = load_dataset(source, seed=seed)
    split = dataset.splits["train"]
    n = min(n, len(split))
    x = np.stack([resize_image(split.load(i), size, method="bilinear") for i in range(n)])
    return backbones.preprocess_input(backbone, x), np.asarray(split.labels[:n]), len(dataset.classes)


class _EpochTimer:
    """Keras callback recording wall seconds per epoch (built lazily: keras is imported late)."""

    @staticmethod
    def make() -> Any:
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.seconds: list[float] = []
                self._t0 = 0.0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.seconds.append(time.perf_counter() - self._t0)

        return Timer()


def _head(input_shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...], seed: int) -> Any:
    import keras

    from featurecache.training.heads.dense import build_dense_model

    # Same seed before each build: both runs start from identical head weights.
    keras.utils.set_random_seed(seed)
    return build_dense_model(
        input_shape=input_shape,
        n_classes=n_classes,
        pool="none",
        hidden=hidden,
        batchnorm=False,
        dropout=0.5,
        activation="relu",
        l2=0.0,
    )


def _train(model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int) -> dict[str, Any]:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _EpochTimer.make()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=[timer])
    steady = statistics.median(timer.seconds[1:])
    return {
        "epoch_seconds": [round(s, 4) for s in timer.seconds],
        "first_epoch_seconds": round(timer.seconds[0], 4),
        "steady_epoch_seconds": round(steady, 4),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both trainings and return the result document."""
    import keras

    from featurecache import backbones
    from featurecache.extraction.extract import library_versions

    spec = backbones.get_backbone(args.backbone)
    backbones.check_input_size(spec, args.size)
    weights = backbones.parse_weights(args.weights, seed=args.seed)
    hidden = tuple(int(h) for h in str(args.hidden).split("-") if h)
    x, y, n_classes = _images(args.data, n=args.n, size=args.size, backbone=spec, seed=args.seed)

    feature_model = backbones.build_feature_model(spec, weights, input_size=args.size, pooling="avg")
    feature_model.trainable = False
    feature_model.predict(x[: args.batch_size], batch_size=args.batch_size, verbose=0)  # trace outside the timing
    t0 = time.perf_counter()
    features = feature_model.predict(x, batch_size=args.batch_size, verbose=0)
    extraction = time.perf_counter() - t0

    cached = _train(
        _head(features.shape[1:], n_classes, hidden, args.seed),
        features,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )

    inputs = keras.Input(shape=x.shape[1:], name="image")
    head = _head(features.shape[1:], n_classes, hidden, args.seed)
    full = keras.Model(inputs, head(feature_model(inputs, training=False)), name=f"{spec.name}_frozen_plus_head")
    in_loop = _train(full, x, y, epochs=args.epochs, batch_size=args.batch_size)

    ratio = in_loop["steady_epoch_seconds"] / max(cached["steady_epoch_seconds"], 1e-9)
    saved_per_epoch = in_loop["steady_epoch_seconds"] - cached["steady_epoch_seconds"]
    return {
        "benchmark": "head_speed",
        "data": args.data,
        "backbone": spec.name,
        "weights": args.weights,
        "size": args.size,
        "n": len(x),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "hidden": list(hidden),
        "feature_shape": list(features.shape[1:]),
        "extraction_seconds": round(extraction, 4),
        "cached": cached,
        "in_loop": in_loop,
        "ratio": round(ratio, 2),
        "break_even_epochs": round(extraction / saved_per_epoch, 2) if saved_per_epoch > 0 else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c, f = result["cached"], result["in_loop"]
    table = Table(
        title=f"dense head ({'-'.join(map(str, result['hidden']))}), {result['backbone']} {result['weights']} @ {result['size']} px, "
        f"{result['n']} images, batch {result['batch_size']}, {result['epochs']} epochs",
    )
    table.add_column("training")
    table.add_column("s / epoch (steady)", justify="right")
    table.add_column("first epoch s", justify="right")
    table.add_column("train acc", justify="right")
    table.add_row(
        "head on cached features",
        f"{c['steady_epoch_seconds']:.3f}",
        f"{c['first_epoch_seconds']:.3f}",
        f"{c['final_train_accuracy']:.3f}",
    )
    table.add_row(
        "frozen backbone in the loop",
        f"{f['steady_epoch_seconds']:.3f}",
        f"{f['first_epoch_seconds']:.3f}",
        f"{f['final_train_accuracy']:.3f}",
    )
    console = Console()
    console.print(table)
    even = result["break_even_epochs"]
    console.print(
        f"ratio {result['ratio']:.1f}x per epoch; the one-off feature pass took {result['extraction_seconds']:.2f} s"
        + (f" and pays for itself after {even:.1f} epochs" if even is not None else "")
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the result document."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parse_args(argv)
    result = run(args)
    _print(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"head_speed-{result['backbone']}-{result['size']}px-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
