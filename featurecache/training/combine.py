"""How an ensemble turns its members' class probabilities into one distribution.

Each rule exists twice, side by side so they cannot drift: :func:`combine` on NumPy arrays
(the ensemble's cached-feature predictions, its metrics) and :func:`keras_combine` as built-in
Keras layers (the exported model). The equivalence check holds the second to the first.

``mean``
    The average of the members' probabilities (soft voting).
``weighted``
    ``sum_m w_m p_m`` with weights on the simplex fitted by :func:`fit_weights` to minimise the
    validation log loss. Validation metrics of a weighted ensemble are therefore optimistic;
    its test metrics are not.
``vote``
    Majority vote of the members' top-1 classes, ties between classes going to the higher mean
    probability. The reported distribution is ``(votes + mean probability) / (members + 1)``:
    it sums to 1, its argmax is the vote winner (the mean adds less than one vote), and its
    log loss stays finite. A member's top class is the argmax of ``p - i * 1e-6`` (class
    index ``i``, float32), so a member whose classes tie votes for the lowest index -- the
    same rule in NumPy and in Keras, where ties would otherwise be broken differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featurecache.errors import UsageError, choices

__all__ = ["METHODS", "VOTE_TIE_STEP", "combine", "fit_weights", "keras_combine"]

METHODS: tuple[str, ...] = ("mean", "vote", "weighted")
#: Subtracted per class index before a member's argmax in ``vote`` (see the module docstring).
VOTE_TIE_STEP = 1e-6
# Floor of the probability of the true class in the log loss the weights minimise.
_EPS = 1e-15


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a one-line :class:`UsageError`."""
    if method not in METHODS:
        raise UsageError(f"--method {method!r} is not one of {choices(METHODS)}")
    return method


def _tie_offsets(n_classes: int) -> np.ndarray:
    return (np.arange(n_classes) * VOTE_TIE_STEP).astype(np.float32)


def combine(probas: Sequence[np.ndarray], method: str, weights: Sequence[float] | None = None) -> np.ndarray:
    """The ensemble's probabilities from its members'.

    Parameters
    ----------
    probas
        One ``(n, n_classes)`` array per member, rows summing to 1.
    method
        ``mean``, ``vote`` or ``weighted``.
    weights
        One weight per member for ``weighted`` (from :func:`fit_weights`).

    Returns
    -------
    numpy.ndarray
        ``float64 (n, n_classes)``, rows summing to 1.

    Raises
    ------
    UsageError
        Unknown method, no members, shapes that differ, or ``weighted`` without one weight per member.
    """
    check_method(method)
    if not probas:
        raise UsageError("an ensemble needs at least one member")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])
    mean = stack.mean(axis=0)
    if method == "mean":
        return mean
    if method == "weighted":
        w = _checked_weights(weights, len(probas))
        return np.tensordot(w, stack, axes=1)
    offsets = _tie_offsets(stack.shape[2])
    top = np.argmax(stack.astype(np.float32) - offsets, axis=2)  # (members, n)
    votes = np.zeros_like(mean)
    for member_top in top:
        votes[np.arange(len(member_top)), member_top] += 1.0
    return (votes + mean) / (len(probas) + 1)


def _checked_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    w = np.asarray(weights if weights is not None else [], dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UsageError(f"method 'weighted' needs {n} non-negative weights, one per member, got {list(w)}")
    return w


def fit_weights(probas: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Member weights on the simplex that minimise the log loss of ``sum_m w_m p_m`` on ``y``.

    Parameters
    ----------
    probas
        One ``(n, n_classes)`` validation probability array per member.
    y
        ``(n,)`` true class indices.

    Returns
    -------
    numpy.ndarray
        ``(members,)`` non-negative weights summing to 1 (deterministic: L-BFGS from equal weights
        over a softmax parametrisation).
    """
    from scipy.optimize import minimize
    from scipy.special import softmax

    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (m, n, c)
    y = np.asarray(y, dtype=np.int64)
    p_true = stack[:, np.arange(len(y)), y].T  # (n, m): each member's probability of the truth

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(theta)
        q = np.maximum(p_true @ w, _EPS)
        value = -np.mean(np.log(q))
        grad_w = -np.mean(p_true / q[:, None], axis=0)
        # d softmax: J = diag(w) - w w^T
        return float(value), w * (grad_w - grad_w @ w)

    res = minimize(loss, np.zeros(stack.shape[0]), jac=True, method="L-BFGS-B")
    return softmax(res.x)


def keras_combine(
    probas: Sequence[Any], method: str, weights: Sequence[float] | None = None, *, name: str = "predictions"
) -> Any:
    """The same rule as :func:`combine`, as built-in Keras layers on symbolic tensors.

    Parameters
    ----------
    probas
        One symbolic ``(None, n_classes)`` probability tensor per member.
    method, weights
        As :func:`combine`.
    name
        Name of the output layer.

    Returns
    -------
    A symbolic ``(None, n_classes)`` tensor. Only built-in layers are used, so a model ending in
    it loads with ``keras.saving.load_model`` in safe mode, without featurecache.

    Raises
    ------
    UsageError
        As :func:`combine`.
    """
    import keras

    check_method(method)
    m = len(probas)
    if m == 0:
        raise UsageError("an ensemble needs at least one member")
    if method == "weighted":
        w = _checked_weights(weights, m)
        scaled = [keras.layers.Rescaling(float(w[i]), name=f"fc_weight_{i}")(p) for i, p in enumerate(probas)]
        return keras.layers.Add(name=name)(scaled) if m > 1 else keras.layers.Identity(name=name)(scaled[0])
    mean = keras.layers.Average(name="fc_mean" if method == "vote" else name)(list(probas)) if m > 1 else probas[0]
    if method == "mean":
        return mean if m > 1 else keras.layers.Identity(name=name)(mean)
    n_classes = int(probas[0].shape[-1])
    onehots = []
    for i, p in enumerate(probas):
        # p - i * step: (x - mean) / sqrt(1) is an exact float32 subtraction.
        shifted = keras.layers.Normalization(
            mean=_tie_offsets(n_classes).tolist(), variance=[1.0] * n_classes, name=f"fc_vote_tiebreak_{i}"
        )(p)
        top = keras.layers.GlobalMaxPooling1D(name=f"fc_vote_max_{i}")(
            keras.layers.Reshape((n_classes, 1), name=f"fc_vote_column_{i}")(shifted)
        )
        gap = keras.layers.Subtract(name=f"fc_vote_gap_{i}")([shifted, top])  # 0 at the top class, < 0 elsewhere
        # 1 + 1e30 * gap is exactly 1 at the top class and hugely negative elsewhere (float32
        # gaps near a maximum >= 1/n_classes are >= ~1e-9); ReLU(max 1) makes that a 0/1 vote.
        big = keras.layers.Rescaling(1e30, offset=1.0, name=f"fc_vote_scale_{i}")(gap)
        onehots.append(keras.layers.ReLU(max_value=1.0, name=f"fc_vote_{i}")(big))
    votes = keras.layers.Add(name="fc_votes")(onehots) if m > 1 else onehots[0]
    total = keras.layers.Add(name="fc_votes_and_mean")([votes, mean])
    return keras.layers.Rescaling(1.0 / (m + 1), name=name)(total)
