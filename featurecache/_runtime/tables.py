"""Terminal tables that never cut a name or a configuration inside a token, at any width.

rich folds a cell that is narrower than one of its words in the middle of that word
(``batchnorm=fals`` / ``e``) and shortens no-wrap cells to an ellipsis (``inceptionresn…``), so
what a user copies from a table would be wrong. Here the free-text column goes last and is
wrapped between tokens to the room the other columns leave; when even its longest token does
not fit, optional columns are dropped, and as a last resort the table is wider than the
terminal (the terminal wraps the line, the token stays whole).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["console", "fit_last_column", "token_width", "wrap_tokens"]


def console() -> Any:
    """The rich console commands print tables to (its width follows the terminal or ``$COLUMNS``)."""
    from rich.console import Console

    return Console()


def token_width(texts: Iterable[str]) -> int:
    """The length of the longest whitespace-separated token in ``texts`` (0 for none)."""
    return max((len(token) for text in texts for token in str(text).split()), default=0)


def wrap_tokens(text: str, width: int) -> str:
    """``text`` wrapped to ``width`` between tokens only (a longer token stays whole on its line)."""
    return "\n".join(
        textwrap.fill(line, max(1, width), break_long_words=False, break_on_hyphens=False) or line
        for line in str(text).splitlines()
    )


def fit_last_column(
    build: Callable[[Sequence[str], frozenset[str]], Any],
    texts: Sequence[str],
    *,
    optional: Sequence[str] = (),
    width: int | None = None,
) -> Any:
    """The table ``build`` makes, its last column wrapped between tokens to fit ``width``.

    Parameters
    ----------
    build
        ``build(texts, dropped)`` returns the rich table with ``texts`` in its last column (one
        per row, added with ``no_wrap=True``) and without the optional columns in ``dropped``.
    texts
        The last column's cells, unwrapped.
    optional
        Names of columns ``build`` may leave out, in the order they are given up when the
        longest token of ``texts`` does not fit beside the others.
    width
        The terminal width (default: the console's).

    Returns
    -------
    rich.table.Table
    """
    from rich.console import Console

    width = width or console().width
    longest = token_width(texts)
    measure = Console(width=100_000)
    dropped: frozenset[str] = frozenset()
    room = longest
    for k in range(len(optional) + 1):
        dropped = frozenset(optional[:k])
        table = build(texts, dropped)
        header = len(str(table.columns[-1].header))
        last = max([header, *(len(line) for text in texts for line in str(text).splitlines())])
        room = width - (measure.measure(table).maximum - last)
        if room >= longest:
            break
    return build([wrap_tokens(t, max(room, longest)) for t in texts], dropped)
