"""The ``d3sr`` command line: ``upscale``, ``info``, ``convert`` and ``eval``.

Run ``d3sr --help`` or ``d3sr COMMAND --help``. Also available as ``python -m d3sr_core``.
"""

from __future__ import annotations

import sys

from ..batch import collect_inputs, plan_outputs
from ..inference.memory import bound_onednn_primitive_cache
from .common import EXIT_INTERRUPTED, CliError, log_error
from .options import build_options
from .parser import ENGINE_DEFAULTS, build_parser

__all__ = [
    "ENGINE_DEFAULTS",
    "CliError",
    "build_options",
    "build_parser",
    "collect_inputs",
    "main",
    "plan_outputs",
]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some files failed, 2 usage/set-up, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bound_onednn_primitive_cache()  # before the first convolution of this process
    try:
        return args.func(args)
    except CliError as err:
        log_error(str(err))
        return err.code
    except KeyboardInterrupt:
        log_error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
