"""The options that take a command to a Dask cluster (``--cluster``, ``--scheduler``, ``--scheduler-file``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from featurecache.errors import UsageError

ClusterOpt = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="A local Dask cluster of N worker processes: local:N (needs featurecache[dask]).",
        show_default=False,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help="An existing Dask scheduler, e.g. tcp://host:8786.", show_default=False),
]
SchedulerFileOpt = Annotated[
    str | None, typer.Option("--scheduler-file", help="The Dask scheduler described by this file.", show_default=False)
]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="With a Dask cluster: show Dask's log lines and print its dashboard link."),
]


@contextlib.contextmanager
def dask_client(
    cluster: str | None, scheduler: str | None, scheduler_file: str | None, *, verbose: bool = False
) -> Iterator[Any]:
    """A connected ``distributed.Client`` for the options given (None for none), closed on exit.

    With ``verbose`` (``-v``), Dask's log lines are shown and the dashboard link is printed on stderr.

    Raises
    ------
    UsageError
        Dask is not installed, more than one option is given, or ``--cluster`` is malformed.
    """
    if not (cluster or scheduler or scheduler_file):
        yield None
        return
    try:
        from featurecache.extraction import cluster as cluster_mod
    except ImportError:
        raise UsageError(
            "--cluster, --scheduler and --scheduler-file need Dask; install it with `pip install 'featurecache[dask]'`"
        ) from None
    client = cluster_mod.connect(cluster, scheduler, scheduler_file, verbose=verbose)
    try:
        if verbose:
            typer.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
        yield client
    finally:
        cluster_mod.close(client)
