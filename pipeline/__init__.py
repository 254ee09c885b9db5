"""NDSB plankton pipeline stages (ingest, train, predict, ensemble, submit, score).

Each stage is a module with a pure core function and a thin ``main()`` that reads only its
own section of ``params.yaml``. Importing a module never runs anything.
"""
