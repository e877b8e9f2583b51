"""What the benchmark suites share (run as scripts, so they import this as a sibling module)."""

from __future__ import annotations

import subprocess


def commit() -> str:
    """The short commit of the attnswap being measured ('?' outside a git checkout). ``ATTNSWAP_COMMIT``
    overrides it, for a copied tree whose git metadata is not its own."""
    import os

    import attnswap

    if os.environ.get("ATTNSWAP_COMMIT"):
        return os.environ["ATTNSWAP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=attnswap.__path__[0]).stdout.strip() or "?"
    except OSError:
        return "?"
