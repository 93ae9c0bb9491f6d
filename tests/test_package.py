"""The package's shape: verbs exported lazily, no import-time side effects, old paths kept one release."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

import featurecache as fc

PACKAGE = Path(fc.__file__).resolve().parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEATURECACHE_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=300
    )


def test_import_featurecache_imports_no_tensorflow_and_installs_nothing() -> None:
    # Even with the variable a featurecache command hands its workers: installing is theirs to do.
    proc = _python(
        "import sys, featurecache\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules,\n"
        "      any(type(f).__name__ == '_QuietTensorFlowFinder' for f in sys.meta_path))\n",
        FEATURECACHE_QUIET_TF="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"]


def test_every_exported_name_resolves_to_its_stage_module() -> None:
    for name in fc.__all__:
        assert getattr(fc, name) is not None, name
    assert fc.extract.__module__ == "featurecache.extraction.extract"
    assert fc.train_head.__module__ == "featurecache.training.train"
    assert fc.sweep.__module__ == "featurecache.training.sweeps.sweep"
    assert fc.finetune.__module__ == "featurecache.finetuning.finetune"
    assert fc.predict.__module__ == "featurecache.finetuning.predict"
    assert set(fc.__all__) <= set(dir(fc))


def test_a_verb_never_shadows_a_module() -> None:
    # The workaround tests needed before: importlib.import_module("featurecache.extract").
    import featurecache.extraction.extract as extract_module
    import featurecache.finetuning.finetune as finetune_module
    import featurecache.training.sweeps.sweep as sweep_module

    assert extract_module.extract is fc.extract
    assert finetune_module.finetune is fc.finetune
    assert sweep_module.sweep is fc.sweep


def test_at_most_eight_top_level_modules_and_a_py_typed_marker() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    assert (PACKAGE / "py.typed").is_file()


def test_version_is_declared_once() -> None:
    assert fc.__version__ == importlib.metadata.version("featurecache")


def test_old_heads_import_paths_warn_and_give_the_same_objects() -> None:
    proc = _python(
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "from featurecache.heads import DenseHead\n"
        "from featurecache.heads.dense_group import fit_dense_heads\n"
        "from featurecache.training.heads.dense import DenseHead as New\n"
        "from featurecache.training.heads.dense_group import fit_dense_heads as new_fit\n"
        "print(DenseHead is New, fit_dense_heads is new_fit)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
    assert "DeprecationWarning: featurecache.heads moved to featurecache.training.heads" in proc.stderr


def test_a_head_saved_under_the_old_module_path_still_loads(tmp_path: Path) -> None:
    from featurecache.training.heads import load_head, make_head, save_head

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)).astype("float32"), np.array([0, 1] * 10)
    saved = save_head(make_head("logreg", {}).fit(x, y), tmp_path / "new")
    # head.skops as the version before the move wrote it: its flatten step named by the old path.
    old = tmp_path / "old"
    old.mkdir()
    (old / "head.json").write_bytes((saved / "head.json").read_bytes())
    with zipfile.ZipFile(saved / "head.skops") as src, zipfile.ZipFile(old / "head.skops", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "schema.json":
                assert b"featurecache.training.heads.sklearn_heads" in data
                data = data.replace(b"featurecache.training.heads.sklearn_heads", b"featurecache.heads.sklearn_heads")
            dst.writestr(item, data)
    loaded = load_head(old)
    np.testing.assert_array_equal(loaded.predict_proba(x), load_head(saved).predict_proba(x))
