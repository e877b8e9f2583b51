"""The project's one user-facing error type: the CLI prints its message on one line and exits 2."""


class AttnSwapError(Exception):
    """Bad input or an unmet precondition, explained in one line."""

    exit_code = 2


def env_switch(name: str, default: bool, off: str, on: str) -> bool:
    """An on/off environment variable: ``1`` on, ``0`` off, unset or empty ``default``; any other value is
    refused in one line, saying what 0 (``off``) and 1 (``on``) mean."""
    import os

    value = os.environ.get(name, "").strip()
    if value not in ("0", "1", ""):
        raise AttnSwapError(f"{name} must be 0 ({off}) or 1 ({on}), not {value!r}")
    return default if value == "" else value == "1"
