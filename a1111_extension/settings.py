"""D3SR's options in Settings > Upscaling, and reading them with safe defaults.

The options exist only once the settings UI has been built (``on_ui_settings``); API-only
or in-process use may never build it, so :func:`current` falls back to the defaults below and
replaces invalid stored values by them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from d3sr_core.inference.color import COLOR_FIXES

from . import host

SECTION = ("upscaling", "Upscaling")
AUTOMATIC = "Automatic"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

BASE_MODEL = "d3sr_base_model"
TILE_SIZE = "d3sr_tile_size"
TILE_OVERLAP = "d3sr_tile_overlap"
COLOR_FIX = "d3sr_color_fix"
PRECISION = "d3sr_precision"
STRENGTH = "d3sr_strength"
KEEP_LOADED = "d3sr_keep_loaded"


@dataclass(frozen=True)
class RunParams:
    """What one D3SR run uses (settings, possibly overridden by the Extras script).

    Attributes:
        base_model: ``Automatic`` or a checkpoint name/path (SD2.1-base).
        tile_size: UNet tile in output pixels; 0 = chosen from the memory budget.
        tile_overlap: minimum tile overlap, output pixels.
        color_fix: ``none`` | ``adain`` | ``wavelet``.
        precision: ``auto`` | ``fp32`` | ``fp16`` | ``bf16`` (``auto`` honours ``--no-half``).
        strength: LoRA strength (0 = plain base model, 1 = as trained).
        seed: seeds the VAE posterior sample (used by checkpoints trained with sampling).
        keep_loaded: keep the model in memory between runs.
    """

    base_model: str = AUTOMATIC
    tile_size: int = 0
    tile_overlap: int = 256
    color_fix: str = "wavelet"
    precision: str = "auto"
    strength: float = 1.0
    seed: int = 0
    keep_loaded: bool = True

    def info(self) -> dict[str, object]:
        """The parameters as infotext entries (what A1111 writes into the image's PNG info)."""
        return {
            "D3SR tile": self.tile_size or "auto",
            "D3SR tile overlap": self.tile_overlap,
            "D3SR color fix": self.color_fix,
            "D3SR strength": self.strength,
            "D3SR seed": self.seed,
            "D3SR precision": self.precision,
        }


DEFAULTS = RunParams()


def _int(value, default: int, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number >= minimum else default


def _float(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def sanitize(params: RunParams) -> RunParams:
    """Invalid values (a stale config, an API client) replaced by the defaults, field by field."""
    tile = _int(params.tile_size, DEFAULTS.tile_size)
    if tile:
        tile = max(64, tile // 8 * 8)  # the engine's tile: a multiple of 8, at least 64
    return RunParams(
        base_model=str(params.base_model or AUTOMATIC),
        tile_size=tile,
        tile_overlap=_int(params.tile_overlap, DEFAULTS.tile_overlap),
        color_fix=params.color_fix if params.color_fix in COLOR_FIXES else DEFAULTS.color_fix,
        precision=params.precision if params.precision in PRECISIONS else DEFAULTS.precision,
        strength=_float(params.strength, DEFAULTS.strength),
        seed=_int(params.seed, DEFAULTS.seed),
        keep_loaded=bool(params.keep_loaded),
    )


def current(**overrides) -> RunParams:
    """The settings as :class:`RunParams`; ``overrides`` whose value is None are ignored."""
    params = RunParams(
        base_model=host.option(BASE_MODEL, DEFAULTS.base_model),
        tile_size=host.option(TILE_SIZE, DEFAULTS.tile_size),
        tile_overlap=host.option(TILE_OVERLAP, DEFAULTS.tile_overlap),
        color_fix=host.option(COLOR_FIX, DEFAULTS.color_fix),
        precision=host.option(PRECISION, DEFAULTS.precision),
        strength=host.option(STRENGTH, DEFAULTS.strength),
        keep_loaded=host.option(KEEP_LOADED, DEFAULTS.keep_loaded),
    )
    params = replace(params, **{k: v for k, v in overrides.items() if v is not None})
    return sanitize(params)


def _clear_upscale_cache() -> None:
    """Extras' Upscale step caches results by image and upscaler name only; after a D3SR
    setting changes, the next run must really upscale again."""
    try:
        from modules import scripts
    except ImportError:
        return
    runner = getattr(scripts, "scripts_postproc", None)
    for script in getattr(runner, "scripts", None) or []:
        if getattr(script, "name", None) == "Upscale":
            script.image_changed()


def _add_options() -> None:
    import gradio as gr
    from modules import shared

    from .models import base_model_choices

    def add(key, default, label, component, args=None, **kw):
        info = shared.OptionInfo(
            default, label, component, args, onchange=_clear_upscale_cache, section=SECTION, **kw
        )
        shared.opts.add_option(key, info)

    add(
        BASE_MODEL,
        DEFAULTS.base_model,
        "D3SR base model (Stable Diffusion 2.1-base; Automatic = first one found in models/Stable-diffusion)",
        gr.Dropdown,
        lambda: {"choices": base_model_choices()},
        refresh=lambda: None,
    )
    add(
        TILE_SIZE,
        DEFAULTS.tile_size,
        "D3SR tile size (output pixels; 0 = automatic from free memory)",
        gr.Slider,
        {"minimum": 0, "maximum": 2048, "step": 64},
    )
    add(
        TILE_OVERLAP,
        DEFAULTS.tile_overlap,
        "D3SR tile overlap (output pixels)",
        gr.Slider,
        {"minimum": 0, "maximum": 512, "step": 8},
    )
    add(COLOR_FIX, DEFAULTS.color_fix, "D3SR colour fix", gr.Radio, {"choices": list(COLOR_FIXES)})
    add(
        PRECISION,
        DEFAULTS.precision,
        "D3SR precision (auto: fp32 with --no-half, else the device's fastest safe one)",
        gr.Radio,
        {"choices": list(PRECISIONS)},
    )
    add(
        STRENGTH,
        DEFAULTS.strength,
        "D3SR strength (0 = plain SD2.1, 1 = as trained)",
        gr.Slider,
        {"minimum": 0.0, "maximum": 1.5, "step": 0.05},
    )
    add(
        KEEP_LOADED,
        DEFAULTS.keep_loaded,
        "Keep the D3SR model loaded between upscales (faster; frees memory when off)",
        gr.Checkbox,
    )


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(_add_options)
