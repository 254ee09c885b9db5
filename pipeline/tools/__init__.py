"""Tools beside the pipeline, never imported by a stage: ``bench`` and ``bench_act``
(throughput and memory), ``launch`` (parameter-server roles for dist_sync training) and
``synth`` (synthetic NDSB-shaped data). Each runs as ``python -m pipeline.tools.<name>``."""
