"""The three pipelines (linearize, gqa, sparsify): each a config dataclass and a ``run(cfg) -> report``.
``cli.py`` only parses flags into a config, calls ``run`` and prints the report."""
