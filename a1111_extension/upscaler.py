"""``UpscalerD3SR``: D3SR wherever the webui lists upscalers.

A1111 and Forge find upscalers through ``Upscaler.__subclasses__()`` (direct subclasses
only); reForge / Forge Neo use a fixed list, so :func:`install_hooks` also appends D3SR's
entries after ``modelloader.load_upscalers`` -- only when they are not there already.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from modules import upscaler as webui_upscaler
from PIL import Image

from d3sr_core import UpscaleCancelled, UpscaleOptions
from d3sr_core.inference.precision import resolve_dtype

from . import host, models, settings

NAME = "D3SR"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HOOK_MARK = "_d3sr_hook"
LANCZOS = Image.Resampling.LANCZOS if hasattr(Image, "Resampling") else Image.LANCZOS

# What the last upscale in this process used, for the Extras script's infotext.
last_run: dict[str, object] | None = None


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The size ``Upscaler.upscale`` will return: ``floor(side * scale / 8) * 8``."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


def upscale_image(
    image: Image.Image, weights: str | os.PathLike | None, size: tuple[int, int], params
) -> Image.Image:
    """One D3SR pass from ``image`` to exactly ``size`` (width, height).

    Interrupt / Skip between tiles returns ``image`` unchanged (the caller resizes it), never
    a partly processed one. A size not larger than the image on both sides needs no model.

    Raises:
        models.D3SRError: missing weights or base model, wrong model family.
    """
    global last_run
    width, height = size
    if width <= image.width and height <= image.height:
        return image.resize((width, height), resample=LANCZOS)
    if not weights:
        raise models.D3SRError(
            models.missing_weights_message(models.weights_folders(_default_folder()))
        )
    key, precision = model_key(weights, params)
    options = UpscaleOptions(
        scale=max(width / image.width, height / image.height),
        size=(width, height),
        seed=params.seed,
        tile_size=params.tile_size or "auto",
        tile_overlap=params.tile_overlap,
        color_fix=params.color_fix,
    )
    host.forge_free_memory(key.device)
    label = f"D3SR {image.width}x{image.height} -> {width}x{height}"
    try:
        try:
            result = _run(key, precision, image, options, label)
        except torch.cuda.OutOfMemoryError:
            models.CACHE.release()
            if not host.unload_generation_model("D3SR ran out of GPU memory"):
                raise
            result = _run(key, precision, image, options, label)
    except UpscaleCancelled:
        host.log(f"{label}: interrupted between tiles; returning the input image")
        return image
    finally:
        if not params.keep_loaded:
            models.CACHE.release()
        host.torch_gc()
    last_run = {
        "D3SR model": Path(weights).stem,
        **params.info(),
        "D3SR precision": DTYPE_NAMES.get(key.dtype, str(key.dtype)),  # what ran, not "auto"
    }
    return result


def model_key(weights: str | os.PathLike, params) -> tuple[models.ModelKey, str]:
    """The cache key (weights, base, VAE, dtype, device, strength) and engine precision name
    for ``params`` on the device the webui gives D3SR."""
    device = host.device()
    precision = host.precision(params.precision)
    base = models.resolve_base(params.base_model)
    key = models.ModelKey(
        weights=Path(weights),
        base=base,
        vae=models.resolve_vae(base),
        dtype=resolve_dtype(precision, device),
        device=device,
        strength=float(params.strength),
    )
    return key, precision


def _run(key, precision, image, options, label):
    pipeline = models.CACHE.get(key, lambda: models.load_pipeline(key, precision))
    with host.progress(label) as report:
        return pipeline.upscale(image, options, report, host.cancel_requested)


def _default_folder() -> Path:
    return host.models_path() / NAME


class UpscalerD3SR(webui_upscaler.Upscaler):
    """One entry per weights file in ``--d3sr-models-path`` / ``models/D3SR``, named
    ``D3SR <file stem>``; a single "D3SR" entry that explains what to do when there is none."""

    def __init__(self, dirname: str | None = None):
        self.name = NAME  # before super(): it derives model_path = models/D3SR from it
        self.model_name = NAME
        self.model_url = None  # never download
        self.user_path = dirname
        super().__init__()
        folders = models.weights_folders(dirname, self.model_path)
        found = models.list_weights(folders)
        self.scalers = [
            webui_upscaler.UpscalerData(models.display_name(p), str(p), self, 4) for p in found
        ] or [webui_upscaler.UpscalerData(NAME, None, self, 4)]
        self._folders = folders

    def do_upscale(self, img: Image.Image, selected_model: str | None) -> Image.Image:
        # Upscaler.upscale stored the requested factor in self.scale: reach its final size
        # in this one pass, so it neither loops nor resizes afterwards.
        size = target_size(img.width, img.height, self.scale)
        if not selected_model:
            raise models.D3SRError(models.missing_weights_message(self._folders))
        return upscale_image(img, selected_model, size, settings.current())

    def load_model(self, path: str):
        """The loaded pipeline for ``path`` with the current settings (cached)."""
        key, precision = model_key(path, settings.current())
        return models.CACHE.get(key, lambda: models.load_pipeline(key, precision))


# ---------------------------------------------------------------------------------- hooks


def _add_missing_scalers(shared) -> None:
    """Append D3SR's entries to ``shared.sd_upscalers`` if the webui's loader missed them."""
    names = {s.name for s in getattr(shared, "sd_upscalers", None) or []}
    if any(n == NAME or n.startswith(NAME + " ") for n in names):
        return
    scaler = UpscalerD3SR(host.cmd_opt("d3sr_models_path"))
    shared.sd_upscalers = [*shared.sd_upscalers, *scaler.scalers]


def _wrap(module, attribute: str, after) -> None:
    """Replace ``module.attribute`` by a wrapper calling ``after(result)`` once it returned;
    idempotent (a marked wrapper is not wrapped again)."""
    original = getattr(module, attribute, None)
    if original is None or getattr(original, HOOK_MARK, False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        after()
        return result

    setattr(wrapper, HOOK_MARK, True)
    setattr(module, attribute, wrapper)


def _unwrap(module, attribute: str) -> None:
    current = getattr(module, attribute, None)
    if current is not None and getattr(current, HOOK_MARK, False):
        setattr(module, attribute, current.__wrapped__)


def _release_with_checkpoint() -> None:
    if models.CACHE.release():
        host.log("released the D3SR model with the checkpoint")


def install_hooks() -> None:
    """reForge/Neo registration, release when the webui unloads its checkpoint, and undoing
    both (and releasing the model) when scripts are unloaded for a reload."""
    from modules import modelloader, script_callbacks, shared

    _wrap(modelloader, "load_upscalers", lambda: _add_missing_scalers(shared))
    try:
        from modules import sd_models
    except ImportError:
        sd_models = None
    if sd_models is not None:
        _wrap(sd_models, "unload_model_weights", _release_with_checkpoint)

    def on_unloaded() -> None:
        _unwrap(modelloader, "load_upscalers")
        if sd_models is not None:
            _unwrap(sd_models, "unload_model_weights")
        models.CACHE.release()

    script_callbacks.on_script_unloaded(on_unloaded)
