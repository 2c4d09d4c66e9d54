"""The training application: the Hydra trainer and what only it needs (datasets and loaders,
optimizers, checkpoints, loggers, distributed set-up, metrics, interrupts, config checks, run
reports, memory measurement of a config, and the command-line error handling).

It imports the library (``qat``, ``layers``, ``estimators``, ``kernels``); the library never imports
it. ``train.py`` is its entry point: ``python train.py +experiment=mnist_bnn``.
"""
