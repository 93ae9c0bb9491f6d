"""Declarative runs: extract → sweep → finetune from one TOML file.

A pipeline file has up to three stage tables; each key is a keyword argument of the
stage's API function (``featurecache.extract``, ``featurecache.sweep``,
``featurecache.finetune``), so the file and the Python API never drift apart::

    [pipeline]
    name = "digits_demo"
    runs_dir = "runs"

    [extract]
    data = "builtin:digits"
    backbone = "mobilenetv2"
    weights = "imagenet"
    size = 32

    [sweep]
    grid = ["logreg:C=0.1,1,10", "dense:hidden=128,256-128;dropout=0.2,0.5"]

    [finetune]
    unfreeze = "top:1"
    epochs = 3

Overrides (``--set extract.weights=random``, ``--limit 50``) are applied on top; values are
parsed as TOML literals (``--set finetune.epochs=2``) and fall back to plain strings.
"""

from __future__ import annotations

import collections.abc
import copy
import inspect
import os
import sys
import time
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurecache.errors import PipelineError, WeightsUnavailableError

STAGES = ("extract", "sweep", "finetune")


@dataclass(frozen=True)
class PipelineResult:
    """What each stage of a pipeline produced, and how long it took."""

    name: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"name": self.name, "stages": self.stages}


def load_pipeline(
    path: str | os.PathLike[str] | Mapping[str, Any], *, overrides: Sequence[str] = (), limit: int | None = None
) -> dict[str, Any]:
    """Read a pipeline file (or an already parsed one) and apply overrides.

    Parameters
    ----------
    path
        The TOML file, or its parsed contents.
    overrides
        ``stage.key=value`` strings.
    limit
        Shortcut for ``--set extract.limit=N``.

    Raises
    ------
    PipelineError
        The file is missing or malformed, or an override names an unknown stage or key.
    """
    if isinstance(path, Mapping):
        p = Path("<pipeline>")
        doc = copy.deepcopy(dict(path))
    else:
        p = Path(path)
        if not p.is_file():
            raise PipelineError(
                f"pipeline file {p} does not exist; shipped pipelines are in pipelines/ (e.g. pipelines/digits_demo.toml)"
            )
        doc = _read_toml(p)
    unknown = set(doc) - {"pipeline", *STAGES}
    if unknown:
        raise PipelineError(
            f"{p}: unknown table(s) {sorted(unknown)}; allowed: [pipeline], {', '.join(f'[{s}]' for s in STAGES)}"
        )
    doc.setdefault("pipeline", {}).setdefault("name", p.stem)
    for item in overrides:
        stage_key, sep, raw = item.partition("=")
        stage, dot, key = stage_key.strip().partition(".")
        if not sep or not dot or stage not in ("pipeline", *STAGES):
            raise PipelineError(
                f"override {item!r} must look like STAGE.KEY=VALUE with STAGE one of {', '.join(STAGES)}"
            )
        doc.setdefault(stage, {})[key] = _literal(raw.strip())
    if limit is not None:
        doc.setdefault("extract", {})["limit"] = int(limit)
    _check_keys(doc, p)
    return doc


def _read_toml(p: Path) -> dict[str, Any]:
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PipelineError(
            f"cannot read pipeline file {p}: {exc.strerror or exc}; check the path and its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PipelineError(
            f"{p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); TOML files must be UTF-8, so save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{p} is not valid TOML: {exc}") from None


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _stage_functions() -> dict[str, Any]:
    """The function behind each stage, taken from its own module.

    Not ``getattr(featurecache, stage)``: the package's ``extract``, ``sweep`` and
    ``finetune`` attributes share their names with submodules, so which one they hold depends
    on import order.
    """
    from featurecache.extraction.extract import extract
    from featurecache.finetuning.finetune import finetune
    from featurecache.training.sweeps.sweep import sweep

    return {"extract": extract, "sweep": sweep, "finetune": finetune}


#: Keys the pipeline sets itself: the previous stage's output, and the command's --quiet.
_SET_BY_PIPELINE = {
    "extract": {"progress": "the command's --quiet"},
    "sweep": {"features": "the extract stage (its key)", "progress": "the command's --quiet"},
    "finetune": {"run": "the sweep stage (its best run)", "progress": "the command's --quiet"},
}


def _check_keys(doc: Mapping[str, Any], path: Path) -> None:
    functions = _stage_functions()
    for stage in STAGES:
        if stage not in doc:
            continue
        if not isinstance(doc[stage], Mapping):
            raise PipelineError(
                f"{path}: {stage} must be a table ([{stage}] followed by key = value lines), got {_toml_kind(doc[stage])}"
            )
        fn = functions[stage]
        params = inspect.signature(fn).parameters
        allowed = {n for n, prm in params.items() if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD)}
        bad = set(doc[stage]) - allowed
        if bad:
            raise PipelineError(
                f"{path}: [{stage}] has unknown key(s) {sorted(bad)}; allowed: {', '.join(sorted(allowed))}"
            )
        for key in doc[stage]:
            if key in _SET_BY_PIPELINE[stage]:
                raise PipelineError(
                    f"{path}: [{stage}] {key} is set by {_SET_BY_PIPELINE[stage][key]}; remove it from the file"
                )
        hints = typing.get_type_hints(fn)
        for key, value in doc[stage].items():
            if key in hints and not _accepts(hints[key], value):
                want = _describe(hints[key])
                got = "" if want.startswith("one of") or isinstance(value, list) else f", not {_toml_kind(value)}"
                raise PipelineError(
                    f"{path}: [{stage}] {key} = {value!r} must be {want}{got}; fix its value in the file or --set"
                )
    caches = {str(doc[s]["cache_dir"]) for s in STAGES if "cache_dir" in doc.get(s, {})}
    if len(caches) > 1:
        raise PipelineError(
            f"{path}: the stages name different cache_dir values ({', '.join(sorted(caches))}); set it once, in [extract]"
        )


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a parameter annotation (types TOML cannot express never fit)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (collections.abc.Sequence, list, tuple):
        # A string is a sequence of strings; the stage functions split comma lists themselves.
        return (isinstance(value, str) and args[:1] == (str,)) or (
            isinstance(value, list) and all(_accepts(args[0], v) for v in value) if args else isinstance(value, list)
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(h) for h in args if h is not type(None)]
        return " or ".join(p for p in dict.fromkeys(parts) if p)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (collections.abc.Sequence, list, tuple):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "")  # types TOML cannot write (a FeatureSet, a PathLike) are not offered


def _toml_kind(value: Any) -> str:
    kinds = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
    ]
    return next((name for t, name in kinds if isinstance(value, t)), f"a {type(value).__name__}")


def run_pipeline(
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] | None = None,
    weights_fallback: bool = False,
    progress: bool = True,
) -> PipelineResult:
    """Run a pipeline file: extract, then sweep on the features, then fine-tune the best head.

    Parameters
    ----------
    path
        The TOML file.
    overrides
        ``stage.key=value`` strings.
    limit
        At most N images per split.
    cache_dir, runs_dir
        Where features and runs go (override the file).
    weights_fallback
        If ImageNet weights cannot be loaded (offline), say so in one line and use random
        weights. Only the demo turns this on; everywhere else a missing download is an error.
    progress
        Show progress bars.
    """
    stage = _stage_functions()
    doc = load_pipeline(path, overrides=overrides, limit=limit)
    meta = doc["pipeline"]
    runs = Path(runs_dir or meta.get("runs_dir", "runs"))
    result = PipelineResult(name=str(meta["name"]))
    # One cache for all stages: --cache wins over the file's cache_dir, as --runs over runs_dir.
    file_cache = next((doc[s].pop("cache_dir") for s in STAGES if "cache_dir" in doc.get(s, {})), None)
    for s in STAGES:
        doc.get(s, {}).pop("cache_dir", None)
    cache_dir = cache_dir if cache_dir is not None else file_cache

    ex_args = dict(doc.get("extract", {}))
    data = ex_args.pop("data", "builtin:digits")
    t0 = time.perf_counter()
    try:
        extracted = stage["extract"](data, cache_dir=cache_dir, progress=progress, **ex_args)
    except WeightsUnavailableError as exc:
        if not weights_fallback:
            raise
        print(
            f"note: ImageNet weights are not available offline ({str(exc).split(';')[0]}); using random weights instead",
            file=sys.stderr,
        )
        ex_args["weights"] = "random"
        extracted = stage["extract"](data, cache_dir=cache_dir, progress=progress, **ex_args)
    result.stages["extract"] = {**extracted.to_json(), "seconds": round(time.perf_counter() - t0, 2)}

    if "sweep" in doc or "finetune" in doc:
        t0 = time.perf_counter()
        sw_args = dict(doc.get("sweep", {}))
        sw_args.setdefault("out", runs / f"{result.name}-sweep")
        swept = stage["sweep"](extracted.key, cache_dir=cache_dir, progress=progress, **sw_args)
        result.stages["sweep"] = {**swept.to_json(), "seconds": round(time.perf_counter() - t0, 2)}

        if "finetune" in doc:
            t0 = time.perf_counter()
            ft_args = dict(doc["finetune"])
            ft_args.setdefault("out", runs / f"{result.name}-finetune")
            tuned = stage["finetune"](swept.best_run, cache_dir=cache_dir, progress=progress, **ft_args)
            result.stages["finetune"] = {**tuned.to_json(), "seconds": round(time.perf_counter() - t0, 2)}
    return result
