"""``python -m d3sr_core ...`` is the ``d3sr`` command."""

import sys

from .cli import main

sys.exit(main())
