"""The tuner on plain values (no Hydra): a :class:`~cachelab.jobs.tuning.targets.Target`, the
predictor families as factories, :class:`~cachelab.jobs.tuning.tuner.TuneOptions`, a
:class:`~cachelab.jobs.tuning.tuner.Bench` to measure on and a verifier. ``job=tune``
(:mod:`cachelab.jobs.tune`) translates its config into these values."""
