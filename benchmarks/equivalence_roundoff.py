"""How large the equivalence check's differences are, and where they come from (issue 20, item 4).

For each head type on random-weight MobileNetV2 features of 8 photos (the suite's
``test_finetune_rebuild_reproduces_fast_antialiased_features``), three numbers:

- ``conversion``: the head's Keras layers on the *cached* features vs scikit-learn's float64
  ``predict_proba`` (the conversion alone);
- ``rel_dx``: the rebuilt backbone's features vs the cached ones, relative to the largest feature
  (the backbone's float32 round-off);
- ``dp``: the rebuilt model on images vs the cached-feature predictions (what the check sees), and
  ``roundoff``: the bound :func:`featurecache.finetune.equivalence.roundoff_bound` gives.

Run ``python -m benchmarks.equivalence_roundoff``; ``ONEDNN_MAX_CPU_ISA=AVX2`` (or ``SSE41``)
before it makes oneDNN pick other kernels, as another CPU would.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HEADS = ("logreg", "linear-svm", "ridge", "sgd", "dense")


def main() -> None:
    import keras
    from test_decode_scale import _jpeg, _photo

    from featurecache import extract
    from featurecache.cache.views import open_features
    from featurecache.finetuning.convert import keras_head
    from featurecache.finetuning.equivalence import ImagePredictor, load_images, model_draft, roundoff_bound
    from featurecache.finetuning.finetune import load_run_data, rebuild_model
    from featurecache.training.rundir import load_run
    from featurecache.training.train import train_head

    tmp = Path(tempfile.mkdtemp(prefix="fc-roundoff-"))
    cache, folder = tmp / "cache", tmp / "photos"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            (folder / c / f"{i}.jpg").write_bytes(_jpeg(_photo(200, 150, seed=10 * ord(c) + i)))
    res = extract(
        str(folder),
        backbone="mobilenetv2",
        weights="random",
        size=32,
        decode="fast",
        antialias=True,
        cache_dir=cache,
        progress=False,
    )
    fs = open_features(res.key, cache_dir=cache)
    out: dict[str, object] = {"isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default")}
    for head in HEADS:
        run = train_head(
            res.key, head=head, out=tmp / f"run-{head}", cache_dir=cache, plots=False, val_fraction=0.25
        ).run_dir
        with np.load(run / "predictions.npz") as npz:
            preds = {k: npz[k] for k in npz.files}
        rebuilt = rebuild_model(run, cache_dir=cache)
        data = load_run_data(rebuilt.config, preds, cache_dir=cache)
        ids = [str(i) for i in fs.ids(data.val_split)]
        cached = fs.features(data.val_split)[[ids.index(str(i)) for i in preds["val_ids"]]]
        inp = keras.Input(cached.shape[1:])
        conv = keras.Model(
            inp,
            keras_head(load_run(run)[1], feature_shape=cached.shape[1:], n_classes=preds["val_proba"].shape[1])(inp),
        )
        conversion = float(np.abs(conv.predict(cached, verbose=0) - preds["val_proba"]).max())
        images = load_images(data.dataset.splits[data.val_split], data.val_rows, pool=None, draft=model_draft(rebuilt))
        feats = ImagePredictor(rebuilt.features)(images)
        row = {
            "conversion": conversion,
            "rel_dx": float(np.abs(feats - cached).max() / np.abs(cached).max()),
            "dp": float(np.abs(ImagePredictor(rebuilt.model)(images) - preds["val_proba"]).max()),
            "roundoff": roundoff_bound(rebuilt, images),
        }
        out[head] = row
        print(head, row, file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
