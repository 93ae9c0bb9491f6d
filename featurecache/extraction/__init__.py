"""Stage 1: frozen-backbone features for a dataset, written into the cache.

* :mod:`.extract`: ``extract``, ``plan`` and ``features_for`` -- what happens on ``featurecache extract``;
* :mod:`.options`: ``ExtractOptions``, every extraction option declared once;
* :mod:`.pipeline`: the unit pipeline (decode -> resize -> augment -> preprocess -> backbone -> write);
* :mod:`.shards`: ``--shard i/N``, units split across independent processes (a Slurm array);
* :mod:`.cluster`: the same units on a Dask distributed cluster, and the client it connects;
* :mod:`.audit`: ``verify`` (recomputes sampled rows through the pipeline) and ``explain``.

The public functions are exported from :mod:`featurecache`; this package's modules are imported
by their own names.
"""
