"""How every report figure is made and saved: matplotlib's object API on an Agg canvas.

Never through ``pyplot``: plotting then sets no global backend, keeps no figure registry (no
leaks in a long sweep) and is safe from worker threads. matplotlib is imported inside.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal

__all__ = ["DPI", "new_figure", "png_bytes", "save_figure"]

DPI = 110


def new_figure(
    width: float, height: float, *, layout: Literal["constrained", "compressed", "tight"] | None = "constrained"
) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches on its own Agg canvas.

    ``layout=None`` skips the constrained layout (it dominates the time of many-axes grids,
    which place their axes themselves).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def png_bytes(fig: Any) -> bytes:
    """``fig`` as PNG bytes (for pages that inline their images)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
