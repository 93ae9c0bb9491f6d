"""The trials a sweep runs: ``TrialSpec``, grid strings (``ParameterGrid``) and random draws (``ParameterSampler``).

A trial is a head name and its fully coerced parameters (defaults filled in). Its id is a
digest of exactly that pair, so the same configuration always has the same id whether it came
from a grid, a random draw or an earlier run, and duplicates collapse into one trial.

Grids expand through :class:`sklearn.model_selection.ParameterGrid`; random search draws from
each head's search spaces (``ParamSpec.search``, as lists or ``scipy.stats`` distributions:
``loguniform`` for scales such as ``C``, ``alpha`` and ``lr``, ``randint`` for integers) through
:class:`sklearn.model_selection.ParameterSampler`, seeded per head, so the draws are the same
for a seed whatever other heads are swept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurecache.cache.fsio import jsonable
from featurecache.cache.keys import digest_of
from featurecache.errors import UsageError

__all__ = ["TrialSpec", "parse_grid", "plan_trials", "sample_head"]

#: A random draw may repeat a configuration (small discrete spaces); give up after this many
#: draws per requested trial rather than loop forever.
MAX_DRAWS_PER_TRIAL = 20


@dataclass(frozen=True)
class TrialSpec:
    """One configuration to train: a head and its complete, typed parameters.

    Parameters
    ----------
    head
        Head name (or allowed import path).
    params
        Every parameter of the head, coerced (``coerce_head_params``).
    given
        The parameters the grid or the random draw set; only these label the trial.
    """

    head: str
    params: Mapping[str, Any] = field(hash=False)
    given: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        """12 hex digits identifying (head, params): stable across runs and processes."""
        return digest_of({"head": self.head, "params": jsonable(self.params)})[:12]

    @property
    def label(self) -> str:
        """``dense hidden=512-128 dropout=0.2``: the head and the parameters that were set."""
        from featurecache.training.heads import head_param_schema

        schema = head_param_schema(self.head)
        parts = [f"{k}={schema[k].format(v) if k in schema else v}" for k, v in self.given.items()]
        return " ".join([self.head, *parts])


def _split_head(text: str) -> tuple[str, str]:
    """``(head, body)`` of a grid string; an import path ``package.module:Class[:params]`` has one more colon."""
    from featurecache.training.heads import HEAD_NAMES

    head, sep, body = str(text).strip().partition(":")
    if sep and head.strip() not in HEAD_NAMES and "=" not in head:
        cls, _, rest = body.partition(":")
        if "=" not in cls:
            head, body = f"{head}:{cls}", rest
    return head.strip(), body


# A comma followed by ``name=``: a parameter separated with ',' instead of ';'.
_NEXT_PARAM = r",\s*(?=[A-Za-z_]\w*\s*=)"


def _grid_axes(text: str, head: str, body: str) -> dict[str, list[Any]]:
    """Each parameter of a grid string's body and its typed values, in the order written."""
    from featurecache.training.heads import coerce_head_params, parse_param

    axes: dict[str, list[Any]] = {}
    for part in body.split(";"):
        if not part.strip():
            continue
        name, values = parse_param(part)
        if name in axes:
            raise UsageError(f"grid {text!r} gives parameter {name!r} twice; list all its values once: {name}=V1,V2")
        typed: list[Any] = []
        if re.search(_NEXT_PARAM, values):
            fixed = re.sub(_NEXT_PARAM, ";", str(text))
            raise UsageError(f"grid {text!r}: parameters are separated by ';' and values by ','; write it as {fixed!r}")
        for value in values.split(","):
            # Coercing through the head's schema rejects unknown names and bad values here,
            # before any feature is read, with the schema's own one-line message.
            v = coerce_head_params(head, {name: value.strip()})[name]
            if v not in typed:
                typed.append(v)
        axes[name] = typed
    return axes


def _unique(head: str, drawn: Any, order: Sequence[str], limit: int | None = None) -> list[TrialSpec]:
    """Trials of ``head`` for each parameter dict of ``drawn``, duplicates (same id) dropped, at most ``limit``."""
    from featurecache.training.heads import coerce_head_params
    from featurecache.training.heads.params import plain_value

    out: list[TrialSpec] = []
    seen: set[str] = set()
    for params in drawn:
        if limit is not None and len(out) == limit:
            break
        # Labels list the parameters in the order the grid (or the schema) gives them, not sorted.
        given = {k: plain_value(params[k]) for k in order}
        trial = TrialSpec(head, coerce_head_params(head, given), given)
        if trial.id not in seen:
            seen.add(trial.id)
            out.append(trial)
    return out


def parse_grid(text: str) -> list[TrialSpec]:
    """Expand one grid string into its trials (the cartesian product of the values).

    Parameters
    ----------
    text
        ``"HEAD:NAME=V1,V2;NAME=V1,V2"``, e.g. ``"logreg:C=0.01,0.1,1"`` or
        ``"dense:hidden=256,512-128;dropout=0.2,0.5"``; a bare ``"HEAD"`` is one trial with
        the defaults. Import-path heads work too:
        ``"sklearn.ensemble:RandomForestClassifier:n_estimators=100,300"``.

    Returns
    -------
    list[TrialSpec]
        In :class:`~sklearn.model_selection.ParameterGrid` order (parameters sorted by name,
        the last one varying fastest), duplicates removed.

    Raises
    ------
    UsageError
        Malformed string (no head, a parameter given twice, an empty value list).
    UnknownHeadError, HeadParamError
        Unknown head, unknown parameter or a value of the wrong type.
    """
    from sklearn.model_selection import ParameterGrid

    from featurecache.training.heads import get_head_spec

    example = "write it like 'logreg:C=0.01,0.1,1' or 'dense:hidden=256,512-128;dropout=0.2,0.5'"
    head, body = _split_head(text)
    if not head or "=" in head:
        raise UsageError(f"grid {text!r} names no head before its parameters; {example}")
    get_head_spec(head)  # unknown head -> one line listing the valid names
    axes = _grid_axes(text, head, body)
    return _unique(head, ParameterGrid(axes), list(axes))


def _head_seed(seed: int, head: str) -> int:
    """The random state of one head's draws: from (seed, head), so adding a head changes no other head's draws."""
    state = np.random.SeedSequence([int(seed), int(digest_of({"head": head})[:8], 16)]).generate_state(1)
    return int(state[0])


def sample_head(head: str, n: int, seed: int) -> list[TrialSpec]:
    """Draw ``n`` distinct random trials of ``head`` from its search spaces (fewer if the space is smaller).

    Parameters
    ----------
    head
        Head name.
    n
        Trials wanted.
    seed
        Seed of the draws (combined with the head's name).

    Returns
    -------
    list[TrialSpec]
        Deterministic for ``(head, n, seed)``; one default trial when the head has no search space.
    """
    from sklearn.model_selection import ParameterGrid, ParameterSampler

    from featurecache.training.heads import coerce_head_params, get_head_spec

    spaces = {p.name: p.search.distribution() for p in get_head_spec(head).params if p.search is not None}
    if not spaces:
        return [TrialSpec(head, coerce_head_params(head, {}))]
    if all(isinstance(d, list) for d in spaces.values()):
        # Only lists: ParameterSampler draws without replacement, so no more than the grid holds.
        n_iter = min(n, len(ParameterGrid(spaces)))
    else:
        n_iter = n * MAX_DRAWS_PER_TRIAL  # with replacement: drawn lazily until n distinct ones
    drawn = ParameterSampler(spaces, n_iter, random_state=_head_seed(seed, head))
    return _unique(head, drawn, list(spaces), limit=n)


def plan_trials(
    *,
    grid: Sequence[str] | str = (),
    trials: int = 0,
    heads: Sequence[str] | str = ("logreg", "dense"),
    seed: int = 0,
) -> list[TrialSpec]:
    """The trials a sweep runs, in order, without reading any features.

    Parameters
    ----------
    grid
        Grid strings (see :func:`parse_grid`).
    trials
        Random configurations drawn per head of ``heads`` from its search space
        (``head_param_schema``); deterministic for a given ``seed``. A head whose space
        holds fewer distinct configurations gives fewer.
    heads
        Heads for ``trials`` (and, when neither ``grid`` nor ``trials`` is given, one trial
        per head with its defaults).
    seed
        Seed of the random draws.

    Returns
    -------
    list[TrialSpec]
        Grid trials first, then random ones; duplicates (same id) removed.

    Raises
    ------
    UsageError, UnknownHeadError, HeadParamError
        As :func:`parse_grid`; ``trials < 0``; no heads.
    """
    from featurecache.training.heads import coerce_head_params, get_head_spec

    grid = (grid,) if isinstance(grid, str) else tuple(grid)
    heads = tuple(h.strip() for h in heads.split(",")) if isinstance(heads, str) else tuple(heads)
    heads = tuple(h for h in heads if h)
    if trials < 0:
        raise UsageError(f"--trials must be >= 0, got {trials}; pass the number of random configurations per head")
    if (trials or not grid) and not heads:
        raise UsageError("--heads is empty; pass e.g. --heads logreg,dense")
    for head in heads:
        get_head_spec(head)
    planned: list[TrialSpec] = [t for g in grid for t in parse_grid(g)]
    if trials:
        planned += [t for h in heads for t in sample_head(h, trials, seed)]
    elif not grid:
        planned += [TrialSpec(h, coerce_head_params(h, {})) for h in heads]
    unique: dict[str, TrialSpec] = {}
    for t in planned:
        unique.setdefault(t.id, t)
    return list(unique.values())
