"""Model configs shipped with the package, so base models load offline from a single file."""

from __future__ import annotations

import json
from importlib import resources

BUNDLED = {
    "sd21-base": {
        "unet": "sd21_base_unet.json",
        "vae": "sd21_vae.json",
        "scheduler": "sd21_scheduler.json",
    },
    "sdxl-base": {"unet": "sdxl_base_unet.json", "scheduler": "sdxl_scheduler.json"},
}


def bundled_config(base: str, part: str) -> dict:
    """The diffusers config dict of ``part`` (``unet``/``vae``/``scheduler``) of ``base``."""
    try:
        filename = BUNDLED[base][part]
    except KeyError:
        raise KeyError(
            f"no bundled {part!r} config for base {base!r}; known: {sorted(BUNDLED)}"
        ) from None
    with resources.files(__name__).joinpath(filename).open("r", encoding="utf-8") as f:
        config = json.load(f)
    config.pop("_class_name", None)
    return config
