"""The parts of a sweep, one module per concern; :mod:`featurecache.sweep` puts them together.

* :mod:`.grid`: the trials (``TrialSpec``), grid strings and random search spaces;
* :mod:`.records`: the trial result files a sweep resumes from;
* :mod:`.execute`: running trials (grouped dense trials, joblib workers, Dask clusters);
* :mod:`.leaderboard`: ranking the trials and writing the leaderboard;
* :mod:`.directory`: the sweep directory (``sweep.json``, resuming checks, ``best/``).
"""
