"""The project's one user-facing error type: the CLI prints its message on one line and exits 2."""


class AttnSwapError(Exception):
    """Bad input or an unmet precondition, explained in one line."""

    exit_code = 2
