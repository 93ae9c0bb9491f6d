"""Typer command-line interface; ``featurecache.cli.main:app`` is the app."""
