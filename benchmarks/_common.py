"""What the benchmark suites share (run as scripts, so they import this as a sibling module)."""

from __future__ import annotations

import subprocess


def commit() -> str:
    """The short commit of the attnswap being measured ('?' outside a git checkout)."""
    import attnswap

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=attnswap.__path__[0]).stdout.strip() or "?"
    except OSError:
        return "?"
