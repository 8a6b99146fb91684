"""Feature extraction without Ray: the pipeline stages and the run's progress counts
(``pipelines/extract.py`` wires them into a Ray Data pipeline)."""
