"""Progress bars on stderr: the one rich progress helper every long loop uses (or nothing, when off)."""

from __future__ import annotations

import time
from typing import Any


def fit_label(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters in the middle (``head…tail``), or as it is if it fits."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 3
    return text[: width - 1 - tail] + "…" + (text[-tail:] if tail else "")


class ProgressBar:
    """A rich progress bar over ``total`` steps on stderr, or nothing.

    Parameters
    ----------
    enabled
        ``False`` (or ``total == 0``): every call is a no-op and rich is not imported.
    total
        Steps to completion.
    label
        Description shown left of the bar: at most 60 characters, fewer on a narrow terminal
        (cut in the middle, so its start and its end, often a key, both stay readable).
    rate_unit
        If given (``"img"``), the status column shows the rate, e.g. ``1,234 img/s``, instead
        of the status text passed to :meth:`advance`.

    Use it as a context manager; calling the bar is :meth:`advance`, so it can be handed to
    code that only expects ``advance(n)``.
    """

    def __init__(self, enabled: bool, total: int, label: str, *, rate_unit: str | None = None) -> None:
        self.enabled = bool(enabled) and total > 0
        self.total = total
        self.label = label
        self.rate_unit = rate_unit
        self._done = 0

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(stderr=True)
            # Columns right of the label: done/total, a status (e.g. "12,345 img/s"), elapsed,
            # remaining, and the gaps between the 6 columns. On 80 columns the default 40-wide
            # bar left rich to squeeze every column to an ellipsis.
            fixed = 2 * len(str(self.total)) + 1 + 14 + 7 + 7 + 5
            bar = max(10, min(40, console.width - fixed - 30))
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=bar),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._bar.__enter__()
            label = fit_label(self.label, max(12, min(60, console.width - fixed - bar)))
            self._task = self._bar.add_task(escape(label), total=self.total, status="")
            self._t0 = time.perf_counter()
        return self

    def advance(self, n: int = 1, status: str = "") -> None:
        """Count ``n`` more steps done; ``status`` replaces the status text (unless a rate is shown)."""
        if not self.enabled:
            return
        self._done += n
        if self.rate_unit is not None:
            rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
            status = f"{rate:,.0f} {self.rate_unit}/s"
        self._bar.update(self._task, advance=n, status=status)

    __call__ = advance

    def line(self, text: str, file: Any) -> None:
        """Print ``text`` as one line above the bar (on ``file`` when the bar is off)."""
        if self.enabled:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=file, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
