"""Stage 2: heads trained, swept and combined on cached features.

* :mod:`.train`: ``train_head`` -- features in, a run directory out;
* :mod:`.options`: ``TrainOptions`` and ``SweepOptions``, each command's options declared once;
* :mod:`.heads`: the heads (scikit-learn estimators and the Keras ``DenseHead``), their
  parameter schemas, saving and loading;
* :mod:`.sweeps`: ``sweep`` (:mod:`.sweeps.sweep`) and its parts: grids, trial records,
  execution on joblib or Dask workers, the leaderboard;
* :mod:`.ensemble` and :mod:`.combine`: several runs combined into one;
* :mod:`.metrics`: classification metrics;
* :mod:`.rundir` and :mod:`.runconfig`: run directories, written aside and swapped in, and
  the config they record.

The public functions are exported from :mod:`featurecache`; this package's modules are imported
by their own names.
"""
