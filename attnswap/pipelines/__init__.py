"""The three pipelines (linearize, gqa, sparsify): each a config dataclass and a ``run(cfg) -> report``.
``cli.py`` only parses flags into a config, calls ``run`` and prints the report.

A new flag is a field of the command's config (``RunConfig`` in common.py for one every command takes)
and a parameter of the same name in the command in ``cli.py``; ``cli._config`` refuses a mismatch."""
