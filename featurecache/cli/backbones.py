"""``featurecache backbones``."""

from __future__ import annotations

from typing import Annotated

import typer

from featurecache.cli._common import JsonOpt, handle_errors, print_json


@handle_errors
def backbones_cmd(
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="List the layer names of this backbone (builds it with random weights).",
            show_default=False,
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            "--blocks", help="List the block names of this backbone, for `finetune --unfreeze`.", show_default=False
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the supported backbones (name, parameters, feature size, default input size)."""
    from featurecache import backbones

    if layers or blocks:
        spec = backbones.get_backbone(layers or blocks or "")
        size = max(spec.min_size, min(spec.default_size, 96))
        model = backbones.build_base(spec, backbones.parse_weights("random"), input_size=size)
        if blocks:
            groups = backbones.block_layers(model, spec)
            rows = [{"block": b, "layers": len(v)} for b, v in groups.items()]
            if json_out:
                print_json(rows)
            else:
                for r in rows:
                    typer.echo(f"{r['block']:<24} {r['layers']:>4} layers")
            return
        names = [layer.name for layer in model.layers]
        if json_out:
            print_json(names)
        else:
            typer.echo("\n".join(names))
        return
    summary = [backbones.model_summary_row(s) for s in backbones.list_backbones()]
    if json_out:
        print_json(summary)
        return
    from rich.table import Table

    from featurecache._runtime.tables import console

    table = Table(title="keras.applications backbones")
    table.add_column("name", no_wrap=True)  # the names users type: never cut to an ellipsis
    for header in ("params", "feature dim", "default size", "min size", "preprocess"):
        table.add_column(header)
    for row in summary:
        table.add_row(
            str(row["name"]),
            f"{row['params'] / 1e6:.1f}M",
            str(row["feature_dim"]),
            str(row["default_size"]),
            str(row.get("min_size", "")),
            str(row.get("preprocess", "")),
        )
    console().print(table)
