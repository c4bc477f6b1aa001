"""Entry point the webui loads from ``scripts/``; the code lives in ``a1111_extension/``.

The repository root is put on ``sys.path`` for good (A1111 adds an extension's folder only
while this file executes; the extension imports ``d3sr_core`` lazily later on).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from a1111_extension import register  # noqa: E402
from a1111_extension.postprocess import ScriptPostprocessingD3SR  # noqa: E402,F401 - found by the script loader
from a1111_extension.upscaler import UpscalerD3SR  # noqa: E402,F401 - found via Upscaler.__subclasses__()

register()
