"""D3SR inside AUTOMATIC1111 / Forge: an upscaler, an Extras script and settings.

The webui reads the repository root (``install.py``, ``preload.py``, ``scripts/d3sr.py``);
those files are thin and call into this package, which only converts between A1111's
objects (PIL images, ``shared.opts``, ``shared.state``, devices) and :mod:`d3sr_core`.

Modules:
    host        -- the few webui facilities used (options, progress, devices, memory), with
                   fallbacks so the package also imports under Forge / reForge.
    settings    -- the options in Settings > Upscaling and their safe defaults.
    models      -- weights discovery (through :mod:`d3sr_core.loading.locate`), the SD2.1
                   base model, and the one cached loaded model.
    upscaler    -- ``UpscalerD3SR`` (Extras upscaler 1/2, hires. fix, SD upscale, API).
    postprocess -- the Extras script "D3SR" with per-run options.
"""

from __future__ import annotations


def register() -> None:
    """Hook into the webui; called each time ``scripts/d3sr.py`` is (re)loaded.

    The webui clears its callbacks before reloading scripts, so everything is registered
    again here (idempotently) rather than once at import.
    """
    from . import settings, upscaler

    settings.register()
    upscaler.install_hooks()
