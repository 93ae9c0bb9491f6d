"""Store v2: a changed dataset costs only its new images, and the result equals a cold extraction.

Datasets here are CSV manifests over one folder of real PNG files, so relabelling, re-splitting,
renaming, reordering, removing and adding are plain edits of the CSV (or of file names), as a
user makes them. "Computed" is counted (``ExtractResult.computed``, the image views sent through
the backbone), never timed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurecache as fc
from featurecache.cache import store, views

OPTIONS = dict(
    backbone="mobilenetv2",
    weights="random",
    size=32,
    views=1,
    augment="flip,rotation=10",
    batch_size=4,
    chunk_rows=6,
    progress=False,
)
REPO = Path(__file__).resolve().parents[2]


def _images(folder: Path, n: int, *, start: int = 0) -> list[str]:
    rng = np.random.default_rng(start)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    names = _images(tmp_path / "img", 24)
    splits = ["train"] * 14 + ["val"] * 5 + ["test"] * 5
    rows = [(f"img/{n}", "ab"[i % 2], s) for i, (n, s) in enumerate(zip(names, splits, strict=True))]
    return tmp_path, rows


def _extract(csv_path: Path, cache: Path) -> fc.ExtractResult:
    return fc.extract(str(csv_path), cache_dir=cache, **OPTIONS)


def _equal(a: views.FeatureSet, b: views.FeatureSet) -> None:
    assert a.key == b.key and a.splits == b.splits and a.classes == b.classes
    for split in a.splits:
        np.testing.assert_array_equal(a.features(split, view=None), b.features(split, view=None), strict=True)
        np.testing.assert_array_equal(a.labels(split), b.labels(split), strict=True)
        np.testing.assert_array_equal(a.valid(split), b.valid(split), strict=True)
        assert list(a.ids(split)) == list(b.ids(split))


def _cold(csv_path: Path, tmp_path: Path) -> views.FeatureSet:
    cold = tmp_path / f"cold-{csv_path.stem}"
    return fc.open_features(_extract(csv_path, cold).key, cache_dir=cold)


@pytest.mark.slow
def test_every_dataset_change_costs_only_new_images_and_equals_cold(data: tuple[Path, list], tmp_path: Path) -> None:
    root, rows = data
    cache = root / "cache"
    first = _extract(_manifest(root / "a.csv", rows), cache)
    assert first.computed == 24 + 14 and first.reused == 0  # clean views, plus the train split's augmented view

    relabelled = [(p, "b" if (p, lab, s) == rows[0] else lab, s) for p, lab, s in rows]
    resplit = [(p, lab, "train" if s == "val" else s) for p, lab, s in rows]  # val images gain augmented views
    reordered = list(reversed(rows))
    removed = rows[:-4]
    grown_names = _images(root / "img", 6, start=24)
    grown = rows + [(f"img/{n}", "a", "train") for n in grown_names]
    cases = {
        "relabel": (relabelled, 0),
        "resplit": (resplit, 5),  # the five val images' view 1, nothing else
        "reorder": (reordered, 0),
        "remove": (removed, 0),
        "grow": (grown, 6 * 2),  # six new training images, clean and augmented
    }
    for name, (changed, expected) in cases.items():
        csv_path = _manifest(root / f"{name}.csv", changed)
        res = _extract(csv_path, cache)
        assert not res.cached and res.computed == expected, (name, res.computed)
        _equal(fc.open_features(res.key, cache_dir=cache), _cold(csv_path, tmp_path))

    # Renaming a file changes the id, not the content: nothing to compute either.
    os.rename(root / "img" / "img000.png", root / "img" / "renamed.png")
    renamed = [(("img/renamed.png" if p == "img/img000.png" else p), lab, s) for p, lab, s in rows]
    res = _extract(_manifest(root / "renamed.csv", renamed), cache)
    assert res.computed == 0 and "img/renamed.png" in set(fc.open_features(res.key, cache_dir=cache).ids("train"))
    # One store holds every distinct image once: 30 clean rows, 14 + 5 + 6 augmented ones.
    st = next(store.iter_stores(cache))
    assert (st.rows(0), st.rows(1)) == (30, 25)


def test_relabel_builds_no_model_and_imports_no_tensorflow(data: tuple[Path, list]) -> None:
    root, rows = data
    cache = root / "cache"
    _extract(_manifest(root / "a.csv", rows), cache)
    _manifest(root / "b.csv", [(p, "b" if lab == "a" else "a", s) for p, lab, s in rows])
    code = (
        "import json, sys, featurecache as fc\n"
        f"r = fc.extract({str(root / 'b.csv')!r}, cache_dir={str(cache)!r}, **json.loads(sys.argv[1]))\n"
        "print(json.dumps({'computed': r.computed, 'cached': r.cached, 'tf': 'tensorflow' in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(OPTIONS)], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert json.loads(out.stdout) == {"computed": 0, "cached": False, "tf": False}


def test_duplicates_and_shared_images_are_computed_once(data: tuple[Path, list], tmp_path: Path) -> None:
    root, rows = data
    cache = root / "cache"
    shutil.copy(root / "img" / "img001.png", root / "img" / "copy.png")  # same bytes, another name
    with_copy = rows + [("img/copy.png", "a", "test")]
    res = _extract(_manifest(root / "dup.csv", with_copy), cache)
    assert res.computed == 24 + 14, "the copy's bytes are already being computed once"
    fs = fc.open_features(res.key, cache_dir=cache)
    ids = list(fs.ids("test"))
    np.testing.assert_array_equal(
        fs.features("test")[ids.index("img/copy.png")],
        fs.features("train")[list(fs.ids("train")).index("img/img001.png")],
    )
    # A second project sharing the test images: only its own images are new.
    other_names = _images(root / "other", 4, start=100)
    shared = [r for r in rows if r[2] == "test"] + [(f"other/{n}", "a", "train") for n in other_names]
    res2 = _extract(_manifest(root / "other.csv", shared), cache)
    assert res2.computed == 4 * 2 and res2.reused == 5


RUNNER = (
    "import json, sys, featurecache as fc\n"
    "r = fc.extract(sys.argv[1], cache_dir=sys.argv[2], **json.loads(sys.argv[3]))\n"
    "print(json.dumps({'computed': r.computed}))\n"
)


@pytest.mark.slow
def test_two_processes_on_overlapping_datasets_compute_shared_images_once(
    data: tuple[Path, list], tmp_path: Path
) -> None:
    root, rows = data
    cache = root / "cache"
    extra = _images(root / "img", 6, start=50)
    a = _manifest(root / "a.csv", rows)
    b = _manifest(root / "b.csv", rows[:12] + [(f"img/{n}", "b", "train") for n in extra])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(p), str(cache), json.dumps(OPTIONS)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for p in (a, b)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    distinct_clean = 24 + 6
    distinct_aug = 14 + 6  # every image of a's train split, and b's six new training images
    assert sum(o["computed"] for o in outs) == distinct_clean + distinct_aug, outs
    _equal(
        fc.open_features(
            fc.plan(
                str(a),
                cache_dir=cache,
                **{k: v for k, v in OPTIONS.items() if k in ("backbone", "weights", "size", "views", "augment")},
            ).key,
            cache_dir=cache,
        ),
        _cold(a, tmp_path),
    )
    _equal(
        fc.open_features(
            fc.plan(
                str(b),
                cache_dir=cache,
                **{k: v for k, v in OPTIONS.items() if k in ("backbone", "weights", "size", "views", "augment")},
            ).key,
            cache_dir=cache,
        ),
        _cold(b, tmp_path),
    )


def test_layout_reads_with_plain_zarr_and_xarray(data: tuple[Path, list]) -> None:
    """The cache guide's snippet (docs/guide/cache.md), run as written: no featurecache import."""
    root, rows = data
    cache = root / "cache"
    res = _extract(_manifest(root / "a.csv", rows), cache)
    readme = (REPO / "docs" / "guide" / "cache.md").read_text()
    snippet = readme.split("<!-- plain-zarr -->", 2)[1].split("```python", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        f"CACHE, KEY = {str(cache)!r}, {res.key!r}\n"
        + snippet
        + "\nimport json; print(json.dumps({'shape': list(X.shape), 'labels': y.tolist()}))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    fs = fc.open_features(res.key, cache_dir=cache)
    assert doc["shape"] == list(fs.features("train").shape) and doc["labels"] == fs.labels("train").tolist()
    import xarray as xr

    ds = xr.open_zarr(str(fs.store.path), group="v0", consolidated=False)
    assert ds["features"].dims == ("row", "feature") and ds.sizes["row"] >= 24
    view = xr.open_zarr(str(fs.path), group="train", consolidated=False)
    assert view["rows"].dims == ("view", "sample") and list(view["ids"].values) == list(fs.ids("train"))
