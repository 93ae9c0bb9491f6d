"""Heads on real scikit-learn and Keras, with load_digits pixels standing in for features.

Every fitted head is trained once per module (``fitted`` fixture) and reused, which keeps
this file fast on a shared 2-core machine.
"""

from __future__ import annotations

import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from featurecache.errors import HeadParamError, UnknownHeadError, UsageError
from featurecache.training.heads import (
    HEAD_NAMES,
    DenseHead,
    coerce_head_params,
    head_param_schema,
    load_head,
    make_head,
    parse_param,
    save_head,
)
from featurecache.training.heads.registry import SearchSpace

# Small, quick settings per head; accuracy floors are well above chance (0.1).
FAST = {
    "logreg": {},
    "linear-svm": {"C": "0.1"},
    "ridge": {},
    "sgd": {},
    "knn": {"n_neighbors": "3"},
    "dense": {"epochs": "6", "hidden": "64", "dropout": "0.1", "lr": "3e-3", "patience": "0"},
}
MIN_ACCURACY = {
    "logreg": 0.9,
    "linear-svm": 0.85,
    "ridge": 0.85,
    "sgd": 0.85,
    "knn": 0.9,
    "dense": 0.85,
}


@pytest.fixture(scope="module")
def scaled_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    X = (X[order] / 16.0).astype(np.float32)
    y = y[order]
    return X[:1200], y[:1200], X[1200:], y[1200:]


@pytest.fixture(scope="module")
def fitted(scaled_digits):
    X, y, _, _ = scaled_digits
    return {name: make_head(name, FAST[name]).fit(X, y) for name in HEAD_NAMES}


def test_head_names_are_the_documented_ones():
    assert set(HEAD_NAMES) == {"logreg", "linear-svm", "ridge", "sgd", "knn", "dense"}


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_predicts_well_above_chance(name, fitted, scaled_digits):
    _, _, Xt, yt = scaled_digits
    head = fitted[name]
    proba = head.predict_proba(Xt)
    assert proba.shape == (len(yt), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba >= 0).all()
    pred = head.predict(Xt)
    assert pred.shape == (len(yt),)
    # SGDClassifier predicts by decision_function but normalises one-vs-rest probabilities,
    # so the two may disagree on a few near-ties; every other head agrees exactly.
    agreement = (pred == head.classes_[proba.argmax(axis=1)]).mean()
    assert agreement > (0.98 if name == "sgd" else 0.999)
    assert head.score(Xt, yt) > MIN_ACCURACY[name]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_clone_of_fitted_head_is_unfitted_and_params_round_trip(name, fitted):
    head = fitted[name]
    fresh = clone(head)
    with pytest.raises(NotFittedError):
        check_is_fitted(fresh)
    params = head.get_params()
    assert fresh.get_params().keys() == params.keys()
    # set_params with its own values is a no-op and returns the estimator.
    shallow = head.get_params(deep=False)
    assert fresh.set_params(**shallow) is fresh


def test_sklearn_heads_are_pipelines_with_flatten_first():
    head = make_head("logreg", {"C": "0.5"})
    assert [n for n, _ in head.steps] == ["flatten", "scale", "clf"]
    assert head.named_steps["clf"].C == 0.5
    assert [n for n, _ in make_head("knn").steps] == ["flatten", "clf"]
    svm = make_head("linear-svm", {"C": "2", "cv": "4"}).named_steps["clf"]
    assert type(svm).__name__ == "CalibratedClassifierCV" and svm.cv == 4
    assert svm.estimator.C == 2.0


@pytest.mark.parametrize(
    ("name", "params"),
    [("logreg", {}), ("knn", {}), ("dense", {**FAST["dense"], "pool": "flatten"})],
)
def test_spatial_features_are_accepted_as_trained(name, params, scaled_digits):
    X, y, Xt, yt = scaled_digits
    Xs, Xts = X.reshape(-1, 4, 4, 4), Xt.reshape(-1, 4, 4, 4)
    head = make_head(name, params).fit(Xs, y)
    proba = head.predict_proba(Xts)
    assert proba.shape == (len(yt), 10)
    assert head.score(Xts, yt) > 0.85


def test_dense_pool_auto_is_avg_for_4d_and_none_for_2d(fitted, scaled_digits):
    X, y, _, _ = scaled_digits
    names_2d = [layer.name for layer in fitted["dense"].model_.layers]
    assert names_2d == ["head_input", "head_input_norm", "head_dense_0", "head_act_0", "head_dropout_0", "predictions"]
    head = DenseHead(hidden="", epochs=1, patience=0).fit(X[:200].reshape(-1, 4, 4, 4), y[:200])
    pool = head.model_.get_layer("head_pool")
    assert type(pool).__name__ == "GlobalAveragePooling2D"
    # Standardisation sits after pooling: per-channel moments of the pooled features, frozen.
    norm = head.model_.get_layer("head_input_norm")
    pooled = X[:200].reshape(-1, 4, 4, 4).astype("float64").mean(axis=(1, 2))
    mean, var = (np.asarray(w) for w in norm.get_weights())
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(var, pooled.var(axis=0), rtol=1e-4)
    assert not norm.trainable
    assert head.model_.get_layer("predictions").units == 10
    with pytest.raises(UsageError, match="pool='avg' needs spatial"):
        DenseHead(pool="avg", epochs=1).fit(X[:50], y[:50])


def test_dense_layer_names_with_batchnorm(scaled_digits):
    X, y, _, _ = scaled_digits
    head = DenseHead(hidden="16-8", batchnorm=True, dropout=0.2, l2=1e-4, epochs=1, patience=0)
    head.fit(X[:128], y[:128])
    assert [layer.name for layer in head.model_.layers] == [
        "head_input", "head_input_norm",
        "head_dense_0", "head_bn_0", "head_act_0", "head_dropout_0",
        "head_dense_1", "head_bn_1", "head_act_1", "head_dropout_1",
        "predictions",
    ]  # fmt: skip
    assert head.model_.get_layer("head_dense_0").use_bias is False
    assert head.model_.dtype == "float32"


def test_dense_init_only_stores_params_and_fit_returns_self(scaled_digits):
    X, y, _, _ = scaled_digits
    head = DenseHead(hidden="32-16", batchnorm="true", epochs=2, patience=0)
    assert head.hidden == "32-16" and head.batchnorm == "true"  # stored unchanged
    with pytest.raises(NotFittedError):
        head.predict_proba(X[:5])
    with pytest.raises(NotFittedError):
        head.predict(X[:5])
    assert head.fit(X[:200], y[:200]) is head
    assert head.hidden == "32-16"  # fit does not rewrite params
    assert head.input_shape_ == (64,) and head.n_features_in_ == 64
    assert set(head.history_) == {"loss", "accuracy"}
    assert len(head.history_["loss"]) == 2


def test_dense_invalid_param_is_reported_at_fit(scaled_digits):
    X, y, _, _ = scaled_digits
    head = DenseHead(dropout=1.5)  # constructing never validates (sklearn contract)
    with pytest.raises(HeadParamError, match="dropout=1.5"):
        head.fit(X[:50], y[:50])


def test_dense_string_labels_validation_and_early_stopping(scaled_digits):
    X, y, Xt, yt = scaled_digits
    names = np.array([f"digit-{d}" for d in range(10)])
    head = DenseHead(hidden=(32,), epochs=40, patience=2, lr=1e-2, class_weight="balanced")
    head.fit(X, names[y], X_val=Xt, y_val=names[yt])
    assert list(head.classes_) == sorted(names)
    assert {"val_loss", "val_accuracy"} <= set(head.history_)
    n_epochs = len(head.history_["loss"])
    assert n_epochs < 40  # stopped early
    assert head.best_epoch_ == int(np.argmin(head.history_["val_loss"]))
    assert head.predict(Xt[:3]).dtype.kind == "U"
    with pytest.raises(UsageError, match="unseen labels"):
        DenseHead(epochs=1).fit(X[:50], y[:50], X_val=Xt[:5], y_val=np.full(5, 99))


def test_dense_is_deterministic_given_seed(scaled_digits):
    X, y, Xt, _ = scaled_digits
    params = {"hidden": (16,), "epochs": 2, "patience": 0}
    a = DenseHead(**params, seed=3).fit(X[:300], y[:300]).predict_proba(Xt)
    b = DenseHead(**params, seed=3).fit(X[:300], y[:300]).predict_proba(Xt)
    c = DenseHead(**params, seed=4).fit(X[:300], y[:300]).predict_proba(Xt)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - c).max() > 1e-3


def test_dense_x_views_draws_a_different_view_each_epoch(scaled_digits):
    # View 0 shows only the first 32 pixels, view 1 only the last 32.  A head that really
    # samples both views per epoch classifies either half; one trained on view 0 alone
    # has never updated the weights of the last 32 inputs and is near chance on view 1.
    X, y, Xt, yt = scaled_digits
    first = np.r_[np.ones(32), np.zeros(32)].astype(np.float32)
    second = 1.0 - first
    views = np.stack([X * first, X * second])
    params = {"hidden": (64,), "dropout": 0.0, "epochs": 8, "lr": 3e-3, "patience": 0}

    both = DenseHead(**params).fit(views[0], y, X_views=views)
    assert both.score(Xt * first, yt) > 0.7
    assert both.score(Xt * second, yt) > 0.7

    only_first = DenseHead(**params).fit(views[0], y)
    assert only_first.score(Xt * second, yt) < 0.5

    with pytest.raises(UsageError, match="X_views must have shape"):
        DenseHead(epochs=1).fit(X, y, X_views=views[:, :10])


def test_dense_x_views_streams_from_zarr_like_numpy(scaled_digits):
    # Phase 2 passes the cache's (views, n, *feat) zarr array straight through.
    import zarr

    X, y, Xt, _ = scaled_digits
    views = np.stack([X[:300], X[:300] * 0.5, X[:300] + 0.1]).reshape(3, 300, 4, 4, 4)
    stored = zarr.create_array(store={}, shape=views.shape, chunks=(1, 64, 4, 4, 4), dtype="f4")
    stored[:] = views
    params = {"hidden": (16,), "epochs": 2, "patience": 0, "pool": "flatten"}
    from_numpy = DenseHead(**params).fit(views[0], y[:300], X_views=views)
    from_zarr = DenseHead(**params).fit(views[0], y[:300], X_views=stored)
    Xts = Xt.reshape(-1, 4, 4, 4)
    np.testing.assert_allclose(from_numpy.predict_proba(Xts), from_zarr.predict_proba(Xts), atol=1e-6)


def test_dense_single_view_equals_plain_training(scaled_digits):
    X, y, Xt, _ = scaled_digits
    params = {"hidden": (16,), "epochs": 2, "patience": 0}
    plain = DenseHead(**params).fit(X[:300], y[:300]).predict_proba(Xt)
    viewed = DenseHead(**params).fit(X[:300], y[:300], X_views=X[None, :300]).predict_proba(Xt)
    np.testing.assert_allclose(plain, viewed, atol=1e-6)


@pytest.mark.parametrize("name", ["logreg", "knn", "dense"])
def test_save_load_round_trip(name, fitted, scaled_digits, tmp_path):
    _, _, Xt, _ = scaled_digits
    head = fitted[name]
    out = save_head(head, tmp_path / "head")
    assert (out / "head.json").is_file() and not (out / "head.joblib").exists()
    assert (out / "head.keras").is_file() == (name == "dense")
    assert (out / "head.skops").is_file() == (name != "dense")
    loaded = load_head(out)
    np.testing.assert_array_equal(loaded.predict_proba(Xt), head.predict_proba(Xt))
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    if name == "dense":
        assert loaded.history_ == head.history_ and loaded.best_epoch_ == head.best_epoch_
        assert loaded.get_params() == head.get_params()


def test_saved_head_keras_is_a_plain_keras_model(fitted, scaled_digits, tmp_path):
    import keras

    _, _, Xt, _ = scaled_digits
    head = fitted["dense"]
    out = save_head(head, tmp_path / "head")
    model = keras.saving.load_model(out / "head.keras")  # no custom_objects
    assert model.get_layer("predictions").units == 10
    assert not model.compiled  # saved without optimizer/compile state
    np.testing.assert_allclose(model.predict(Xt, verbose=0), head.predict_proba(Xt), rtol=1e-5, atol=1e-6)


def test_load_head_without_save_is_a_clear_error(tmp_path):
    from featurecache.errors import RunError

    with pytest.raises(RunError, match="head.json missing"):
        load_head(tmp_path)


def test_save_unfitted_head_raises(tmp_path):
    with pytest.raises(NotFittedError):
        save_head(make_head("logreg"), tmp_path)


def test_fitted_dense_survives_joblib_pickle_and_clone(fitted, scaled_digits, tmp_path):
    _, _, Xt, _ = scaled_digits
    head = fitted["dense"]
    expected = head.predict_proba(Xt)
    joblib.dump(head, tmp_path / "dense.joblib")
    restored = joblib.load(tmp_path / "dense.joblib")
    np.testing.assert_array_equal(restored.predict_proba(Xt), expected)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(head)).predict_proba(Xt), expected)
    assert restored.history_ == head.history_
    fresh = clone(head)
    assert not hasattr(fresh, "model_") and fresh.get_params() == head.get_params()


# ------------------------------------------------------------------ params and errors


def test_parse_param():
    assert parse_param("hidden=256-128") == ("hidden", "256-128")
    assert parse_param(" C = 1e-2 ") == ("C", "1e-2")
    assert parse_param("hidden=") == ("hidden", "")
    for bad in ("hidden", "=3", "1x=2"):
        with pytest.raises(HeadParamError, match="NAME=VALUE|invalid name"):
            parse_param(bad)


def test_param_coercion_from_cli_strings():
    dense = make_head(
        "dense",
        dict(parse_param(t) for t in ("hidden=256-128", "batchnorm=false", "dropout=0.25", "class_weight=balanced")),
    )
    assert dense.hidden == (256, 128) and dense.batchnorm is False
    assert dense.dropout == 0.25 and dense.class_weight == "balanced"
    assert make_head("dense", {"hidden": ""}).hidden == ()
    assert make_head("dense", {"batchnorm": "true"}).batchnorm is True
    assert make_head("logreg", {"C": "1e-2"}).named_steps["clf"].C == pytest.approx(0.01)
    assert make_head("logreg", {"class_weight": "none"}).named_steps["clf"].class_weight is None
    assert make_head("knn", {"n_neighbors": "7", "weights": "distance"}).named_steps["clf"].n_neighbors == 7
    typed = coerce_head_params("sgd", {"alpha": "1e-5"})
    assert typed["alpha"] == pytest.approx(1e-5) and typed["penalty"] == "l2"


def test_unknown_param_lists_valid_params_with_types():
    with pytest.raises(HeadParamError) as info:
        make_head("logreg", {"gamma": "1"})
    msg = str(info.value)
    assert "'gamma'" in msg and "'C'" in msg and "'max_iter'" in msg
    assert "C: float > 0" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("name", "param", "value", "expected"),
    [
        ("logreg", "C", "abc", "float"),
        ("logreg", "C", "-1", "float > 0"),
        ("dense", "hidden", "256-x", "layer widths"),
        ("dense", "batchnorm", "maybe", "bool"),
        ("dense", "epochs", "2.5", "int"),
        ("knn", "weights", "heavy", "one of uniform, distance"),
        ("logreg", "class_weight", "even", "none, balanced or a {label: weight} dict"),
    ],
)
def test_ill_typed_value_names_param_value_and_type(name, param, value, expected):
    with pytest.raises(HeadParamError) as info:
        make_head(name, {param: value})
    msg = str(info.value)
    assert f"{param}={value!r}" in msg and expected in msg and "\n" not in msg


def test_unknown_head_lists_heads():
    with pytest.raises(UnknownHeadError) as info:
        make_head("xgb")
    msg = str(info.value)
    assert all(repr(n) in msg for n in HEAD_NAMES)
    assert isinstance(info.value, ValueError)


def test_import_path_heads(scaled_digits):
    X, y, Xt, yt = scaled_digits
    rf = make_head(
        "sklearn.ensemble:RandomForestClassifier",
        {"n_estimators": "30", "max_depth": "none", "random_state": "0"},
    )
    assert rf.named_steps["clf"].n_estimators == 30 and rf.named_steps["clf"].max_depth is None
    assert rf.fit(X, y).score(Xt, yt) > 0.85
    with pytest.raises(UnknownHeadError, match="not allowed"):
        make_head("os:system")
    with pytest.raises(UnknownHeadError, match="has no class"):
        make_head("sklearn.ensemble:NoSuchForest")
    with pytest.raises(UnknownHeadError, match="not a classifier"):
        make_head("sklearn.linear_model:Ridge")
    with pytest.raises(HeadParamError, match="predict_proba"):
        make_head("sklearn.svm:SVC")
    with pytest.raises(HeadParamError, match="no parameter 'bogus'"):
        make_head("sklearn.ensemble:RandomForestClassifier", {"bogus": "1"})
    assert make_head("sklearn.svm:SVC", {"probability": "true"}).named_steps["clf"].probability


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_schema_types_defaults_and_search_ranges(name):
    schema = head_param_schema(name)
    rng = np.random.default_rng(0)
    assert schema, name
    for pname, spec in schema.items():
        assert spec.name == pname
        # Every default passes its own coercion, and so does its CLI text form.
        assert spec.coerce(spec.default, head=name) == spec.default
        assert spec.coerce(spec.format(spec.default), head=name) == spec.default
        if spec.search is not None:
            for _ in range(5):
                value = spec.search.sample(rng)
                assert spec.coerce(value, head=name) == value
                if spec.search.kind in ("loguniform", "uniform"):
                    assert spec.search.low <= value <= spec.search.high
    # A fresh dict each time: callers cannot mutate the registry.
    schema.clear()
    assert head_param_schema(name)


def test_search_ranges_are_log_uniform_for_scale_params():
    assert head_param_schema("logreg")["C"].search.kind == "loguniform"
    assert head_param_schema("ridge")["alpha"].search.kind == "loguniform"
    assert head_param_schema("dense")["lr"].search.kind == "loguniform"
    assert head_param_schema("dense")["l2"].search.kind == "loguniform"
    assert head_param_schema("dense")["hidden"].search.kind == "choice"
    space = SearchSpace("loguniform", 1e-4, 1e2)
    draws = np.array([space.sample(np.random.default_rng(i)) for i in range(200)])
    assert (draws < 1e-2).mean() > 0.2  # log-uniform puts a third of the mass below 1e-2


# ----------------------------------------------------------------- loading runs no code


class _Payload:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_joblib_head_is_refused_without_running_it(tmp_path):
    from featurecache.errors import UntrustedHeadError

    marker = tmp_path / "pwned"
    run = tmp_path / "old-run"
    run.mkdir()
    joblib.dump(_Payload(marker), run / "head.joblib")
    (run / "head.json").write_text('{"format": 1, "kind": "sklearn", "files": ["head.joblib"]}')
    with pytest.raises(UntrustedHeadError, match=r"convert-run .*--trust"):
        load_head(run)
    (run / "head.json").unlink()  # a pickle alone (no head.json) is refused the same way
    with pytest.raises(UntrustedHeadError, match="pickle"):
        load_head(run)
    assert not marker.exists()


def test_skops_head_naming_an_untrusted_type_is_refused(tmp_path):
    import builtins

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    from featurecache.errors import UntrustedHeadError

    run = tmp_path / "run"
    run.mkdir()
    sio.dump(FunctionTransformer(builtins.exec), run / "head.skops")
    (run / "head.json").write_text('{"format": 2, "kind": "sklearn", "files": ["head.skops"]}')
    with pytest.raises(UntrustedHeadError, match="builtins.exec"):
        load_head(run)


def test_convert_legacy_head_needs_trust_then_loads_safely(fitted, scaled_digits, tmp_path):
    from featurecache.errors import UsageError
    from featurecache.training.heads import convert_legacy_head

    _, _, Xt, _ = scaled_digits
    head = fitted["logreg"]
    run = tmp_path / "old-run"
    run.mkdir()
    joblib.dump(head, run / "head.joblib")  # what format 1 wrote
    (run / "head.json").write_text('{"format": 1, "kind": "sklearn", "files": ["head.joblib"]}')
    with pytest.raises(UsageError, match="--trust"):
        convert_legacy_head(run)
    assert (run / "head.joblib").is_file()
    convert_legacy_head(run, trust=True)
    assert not (run / "head.joblib").exists() and (run / "head.skops").is_file()
    np.testing.assert_array_equal(load_head(run).predict_proba(Xt), head.predict_proba(Xt))


def test_convert_legacy_dense_head(fitted, scaled_digits, tmp_path):
    import keras

    from featurecache.training.heads import convert_legacy_head
    from featurecache.training.heads.dense import inference_copy

    _, _, Xt, _ = scaled_digits
    head = fitted["dense"]
    run = tmp_path / "old-dense"
    run.mkdir()
    keras.saving.save_model(inference_copy(head.model_), run / "head.keras")
    shell = DenseHead.__new__(DenseHead)
    shell.__dict__.update({k: v for k, v in head.__dict__.items() if k != "model_"})
    joblib.dump(shell, run / "head.joblib")
    (run / "head.json").write_text('{"format": 1, "kind": "keras-dense", "files": ["head.joblib", "head.keras"]}')
    convert_legacy_head(run, trust=True)
    np.testing.assert_allclose(load_head(run).predict_proba(Xt), head.predict_proba(Xt), atol=1e-6)


def test_import_path_heads_are_scaled_and_seeded(scaled_digits):
    # Features of scale ~1e-11 (random-weight backbones): trees saw constants and sat at chance.
    X, y, Xt, yt = scaled_digits
    tiny, tiny_t = X * 1e-11, Xt * 1e-11
    a = make_head("sklearn.ensemble:RandomForestClassifier", {"n_estimators": "20"}).fit(tiny, y)
    assert a.score(tiny_t, yt) > 0.85
    assert a.named_steps["clf"].random_state == 0  # seeded unless told otherwise
    b = make_head("sklearn.ensemble:RandomForestClassifier", {"n_estimators": "20"}).fit(tiny, y)
    np.testing.assert_array_equal(a.predict_proba(tiny_t), b.predict_proba(tiny_t))
    assert (
        make_head("sklearn.ensemble:RandomForestClassifier", {"random_state": "none"}).named_steps["clf"].random_state
        is None
    )


def test_dense_head_takes_a_class_weight_dict_like_sklearn(scaled_digits):
    from sklearn.utils.class_weight import compute_class_weight

    X, y, Xt, _ = scaled_digits
    X, y = X[:300], y[:300]
    balanced = compute_class_weight("balanced", classes=np.unique(y), y=y)
    as_dict = {int(c): float(w) for c, w in zip(np.unique(y), balanced, strict=True)}
    params = {"hidden": (16,), "epochs": 2, "patience": 0}
    a = DenseHead(**params, class_weight="balanced").fit(X, y).predict_proba(Xt)
    b = DenseHead(**params, class_weight=as_dict).fit(X, y).predict_proba(Xt)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert clone(DenseHead(class_weight=as_dict)).get_params()["class_weight"] == as_dict
    assert make_head("logreg", {"class_weight": {0: 2.0}}).named_steps["clf"].class_weight == {0: 2.0}
    with pytest.raises(UsageError, match="label 42"):
        DenseHead(**params, class_weight={42: 1.0}).fit(X, y)
    with pytest.raises(HeadParamError, match="class_weight"):
        DenseHead(**params, class_weight={0: -1.0}).fit(X, y)
