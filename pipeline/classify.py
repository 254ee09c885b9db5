"""Command alias: ``python -m pipeline.classify`` runs the tool :mod:`pipeline.tools.classify`.

Classifying new samples with a model bundle is a command, not a DVC stage: it lives with the
tools, and this alias gives it the short name the README uses.
"""
if __name__ == "__main__":
    from pipeline.tools.classify import main

    main()
