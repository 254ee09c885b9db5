"""Command alias: ``python -m pipeline.synth`` runs the tool :mod:`pipeline.tools.synth`.

Kept so that scripts and job files written for the earlier layout keep working; the tool
itself lives with the other tools, apart from the stages.
"""
if __name__ == "__main__":
    from pipeline.tools.synth import main

    main()
