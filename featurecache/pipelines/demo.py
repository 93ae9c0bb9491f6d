"""``featurecache demo``: all three stages on scikit-learn's bundled digits.

The pipeline is the one in ``pipelines/digits_demo.toml`` (a test keeps the two equal); it
is embedded here so that the demo also works from an installed package. It is the only
place where missing ImageNet weights fall back to random ones, and it says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurecache.pipelines.run import PipelineResult, run_pipeline

DEMO_PIPELINE: dict[str, Any] = {
    "pipeline": {"name": "digits_demo"},
    "extract": {
        "data": "builtin:digits",
        "backbone": "mobilenetv2",
        "weights": "imagenet",
        "size": 32,
        "views": 2,
        "augment": "rotation=10,zoom=0.1,shift=0.05",
    },
    "sweep": {
        "grid": ["logreg:C=0.01,0.1,1,10", "dense:hidden=128,256-128;dropout=0.2,0.5;lr=1e-3"],
        "n_jobs": 2,
    },
    "finetune": {"unfreeze": "top:1", "epochs": 3, "lr": 1e-4},
}


@dataclass(frozen=True)
class DemoResult:
    """The pipeline's result plus the rows of the summary table."""

    pipeline: PipelineResult
    rows: list[dict[str, Any]]
    plots: list[Path]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"summary": self.rows, "plots": [str(p) for p in self.plots], **self.pipeline.to_json()}


def run_demo(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    overrides: tuple[str, ...] = (),
    limit: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run extract → sweep → finetune on ``builtin:digits`` and summarise it.

    Parameters
    ----------
    cache_dir, runs_dir
        Where features and runs go.
    overrides
        ``stage.key=value`` strings, as for ``featurecache run``.
    limit
        At most N images per split (for a quicker look).
    progress
        Show progress bars.
    """
    res = run_pipeline(
        DEMO_PIPELINE,
        overrides=overrides,
        limit=limit,
        cache_dir=cache_dir,
        runs_dir=runs_dir,
        weights_fallback=True,
        progress=progress,
    )
    st = res.stages
    best = st["sweep"]["best"]
    ft = st["finetune"]["metrics"]
    rows = [
        {
            "stage": "extract",
            "what": f"{st['extract']['name']} ({'cache hit' if st['extract']['cached'] else 'extracted'})",
            "features": st["extract"]["name"],
            "val_accuracy": None,
            "test_accuracy": None,
            "seconds": st["extract"]["seconds"],
        },
        {
            "stage": "sweep",
            "what": f"best of {st['sweep']['trials']}: {best.get('name', best['head'])}",
            "val_accuracy": best.get("val_accuracy"),
            "test_accuracy": best.get("test_accuracy"),
            "seconds": st["sweep"]["seconds"],
        },
        {
            "stage": "finetune",
            "what": f"unfreeze {st['finetune']['unfreeze']}",
            "val_accuracy": ft.get("val", {}).get("accuracy"),
            "test_accuracy": ft.get("test", {}).get("accuracy"),
            "seconds": st["finetune"]["seconds"],
        },
    ]
    dirs = [Path(st["sweep"]["out_dir"]), Path(st["sweep"]["best_run"]), Path(st["finetune"]["out"])]
    plots = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.png"))
    return DemoResult(pipeline=res, rows=rows, plots=plots)
