"""What every command shares: exit codes, ``CliError`` and the status lines on stderr."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OUTPUT_FORMATS = ("png", "jpg", "webp", "same")


class CliError(Exception):
    """A problem with the command line or the set-up: printed, then exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # sent between processes (distributed runs) with its exit code
        return (type(self), (str(self), self.code))


def log_status(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def log_error(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)
