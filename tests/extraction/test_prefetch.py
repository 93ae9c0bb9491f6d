"""The first images of an extraction are decoded while the model is built (``units.Prefetch``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import make_image_folder


def test_prefetched_rows_are_the_rows_a_unit_decodes_with_their_failures(tmp_path: Path, cache_dir: Path) -> None:
    from featurecache.extraction.extract import needed_digests, plan
    from featurecache.extraction.pipeline import Prefetch, load_places, source_places

    folder = make_image_folder(tmp_path / "ds", per_class=5, size=40)
    (folder / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")  # sorts first in its class
    p = plan(str(folder), backbone="mobilenetv2", weights="random", size=32, decode="fast", cache_dir=cache_dir)
    digests = needed_digests(p)[0]
    places = source_places(p)
    x, valid, fails = load_places(p, [places[d] for d in digests], None)
    assert not valid.all() and len(fails) == 1
    pre = Prefetch(p, digests[:7], workers=2, batch_size=3)
    try:
        got = pre.take_all(digests)
        assert sorted(got) == list(range(7))  # only the first 7 were prefetched
        for j, (row, ok, failure) in got.items():
            np.testing.assert_array_equal(row, x[j])
            assert ok == bool(valid[j])
            assert failure == (None if ok else fails[0][1:])
        assert pre.take_all(digests) == {}  # each row is handed out once
    finally:
        pre.close()
        pre.close()  # idempotent


def test_extraction_with_prefetch_equals_one_without(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    import featurecache as fc
    import featurecache.extraction.extract as extract_module
    from featurecache.extraction import pipeline as units

    folder = make_image_folder(tmp_path / "ds", per_class=6, size=24)
    kw = dict(backbone="mobilenetv2", weights="random", size=32, chunk_rows=4, batch_size=4, progress=False)
    with monkeypatch.context() as m:
        m.setattr(extract_module, "_start_prefetch", lambda *a, **k: None)
        a = fc.extract(str(folder), cache_dir=tmp_path / "a", **kw)
    monkeypatch.setattr(units, "PREFETCH_ROWS", 5)  # ends inside the second unit: its rows come from both sources
    b = fc.extract(str(folder), cache_dir=tmp_path / "b", **kw)
    fa, fb = fc.open_features(a.key, cache_dir=tmp_path / "a"), fc.open_features(b.key, cache_dir=tmp_path / "b")
    assert a.key == b.key and b.computed == 12
    np.testing.assert_array_equal(fa.features("train"), fb.features("train"))  # type: ignore[union-attr]
