"""The NDSB plankton pipeline: one module per DVC stage, the library they share, and tools.

Stages (``python -m pipeline.<stage>``, named as in ``dvc.yaml``): ``sample``, ``ingest``,
``train``, ``predict``, ``ensemble``, ``submit``, ``score``, ``report``. Each holds the stage's
core function and a thin ``main()`` that reads only its own ``params.yaml`` section; a stage
never imports another stage, they talk through the files ``dvc.yaml`` declares.

:mod:`pipeline.lib` is what several stages share (records, data, augmentation, TTA,
checkpoints, prediction files, metrics, submissions, run names, params, errors, runtime).
:mod:`pipeline.tools` holds what no stage needs (benchmarks, the cluster launcher, synthetic
data). The networks are the separate package :mod:`nets`. Importing a module runs nothing.
"""
