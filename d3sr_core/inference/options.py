"""Options of an upscale and their checks, shared by the pipeline, the CLI and the hosts.

* :class:`UpscaleOptions` - every knob of :meth:`.pipeline.D3SRPipeline.upscale`, with defaults.
* :func:`output_size` / :func:`target_size` - the output size an input and the options give.
* :func:`validate_options` / :func:`validate_images` - type and range checks before any work;
  both raise :class:`InvalidImageError`, whose message names the option and what it expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .color import COLOR_FIXES

LATENT_FACTOR = 8
MIN_TILE_SIZE = 64  # output pixels (8 latent pixels)
MIN_VAE_TILE_SIZE = 32


class InvalidImageError(ValueError):
    """The input image or an option cannot be upscaled (empty, NaN, bad scale...)."""


@dataclass
class UpscaleOptions:
    """Options of :meth:`D3SRPipeline.upscale`.

    Attributes:
        scale: output / input size, any value > 1 (4 is what the model is trained for).
        seed: seeds the VAE posterior sample when the checkpoint's latent mode is ``sample``.
        max_output_pixels: refuse (before any work) outputs larger than this.
        tile_size: UNet latent tile in *output* pixels (multiple of 8, >= 64); ``"auto"``
            picks it from the memory budget (at most 1024 while the UNet attention is global,
            see ``unet_attention_window``); None or 0 never tiles.
        tile_overlap: overlap between UNet tiles, output pixels, in whole latent pixels (rounded
            down to a multiple of 8) and at least this (after the rounding); clamped to half a tile.
        vae_tile_size: VAE tile side in pixels of the full-resolution image (>= 32);
            ``"auto"`` runs the VAE whole when it fits the budget, else in tiles that fit;
            None or 0 never tiles. Tiling does not change the result (whole-image GroupNorm).
        vae_attention_window: the VAE's self-attention is global for images up to this many
            output pixels per side and windowed (each query block attends to this many pixels
            around it) beyond, so cost stays linear in pixels; None or 0 = always global
            (quadratic: about 45 s per VAE pass at 2048x2048 on 2 CPU cores). 512 (64x64
            latents, :data:`.tiled_vae.ATTENTION_WINDOW`) is the UNet's bound too (SD2.1's
            training crop) and twice per side the 256x256 images the SD VAE was trained on;
            it keeps the attention's cost per pixel at every size what it is at 512x512.
            Images up to 512 px per side are unchanged; 1024 was the default before.
        unet_attention_window: the UNet's self-attention is global over UNet tiles up to this
            many output pixels per side (512 = SD2.1's 64x64-latent training crop) and
            windowed beyond (:mod:`.unet_attention`: each position attends to the window
            around it), so its cost stays linear in the tile's pixels; None or 0 = always
            global. Changes the output only for tiles larger than the window.
        color_fix: ``"none"`` | ``"adain"`` | ``"wavelet"`` - match colours to the input.
        memory_budget_bytes: activation memory the stages may use; None = a share of the free
            device memory (80 % of a GPU's, 25 % of the RAM's).
        prompt_embeds: a condition ``[1, N, C]`` that replaces the checkpoint's stored prompt
            embedding for this call (e.g. a host's text-encoder output); None = the stored one.
        size: exact output ``(width, height)`` in pixels, replacing the rounding of ``scale``
            (hosts such as A1111 ask for sizes like ``floor(w * scale / 8) * 8``); ``scale``
            must still be given (> 1) and should be the ratio the size implies. None = from
            ``scale`` (:func:`output_size`).
    """

    scale: float = 4.0
    seed: int | None = None
    max_output_pixels: int = 256 * 1024 * 1024
    tile_size: int | str | None = "auto"
    tile_overlap: int = 256
    vae_tile_size: int | str | None = "auto"
    vae_attention_window: int | None = 512
    unet_attention_window: int | None = 512
    color_fix: str = "wavelet"
    memory_budget_bytes: int | None = None
    prompt_embeds: Tensor | None = None
    size: tuple[int, int] | None = None


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(floor(w*scale + 0.5), floor(h*scale + 0.5))``: round half up, never Python's half-to-even."""
    return math.floor(width * scale + 0.5), math.floor(height * scale + 0.5)


def target_size(width: int, height: int, options: UpscaleOptions) -> tuple[int, int]:
    """The output ``(width, height)`` for an input of ``width x height``: ``options.size`` if
    set, else :func:`output_size` of ``options.scale``."""
    if options.size is not None:
        return int(options.size[0]), int(options.size[1])
    return output_size(width, height, options.scale)


def validate_options(options: UpscaleOptions) -> None:
    """Check the options' types and ranges (before any work); raises :class:`InvalidImageError`."""
    scale = options.scale
    if isinstance(scale, bool) or not (
        isinstance(scale, int | float) and math.isfinite(scale) and scale > 1
    ):
        raise InvalidImageError(f"scale must be a number > 1, got {scale!r}")
    for name, minimum in (("tile_size", MIN_TILE_SIZE), ("vae_tile_size", MIN_VAE_TILE_SIZE)):
        value = getattr(options, name)
        if value is None or value == "auto" or (value == 0 and not isinstance(value, bool)):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidImageError(
                f"{name} must be 'auto', None/0 (no tiling) or an int >= {minimum}, got {value!r}"
            )
        if name == "tile_size" and value % LATENT_FACTOR:
            raise InvalidImageError(
                f"tile_size must be a multiple of {LATENT_FACTOR} output pixels, got {value}"
            )
    overlap = options.tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InvalidImageError(
            f"tile_overlap must be an int >= 0 (output pixels), got {overlap!r}"
        )
    for name in ("vae_attention_window", "unet_attention_window"):
        window = getattr(options, name)
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 0
        ):
            raise InvalidImageError(
                f"{name} must be an int >= 0 (output pixels; 0 = global) or None, got {window!r}"
            )
    if options.color_fix not in COLOR_FIXES:
        raise InvalidImageError(
            f"color_fix must be one of {COLOR_FIXES}, got {options.color_fix!r}"
        )
    embeds = options.prompt_embeds
    if embeds is not None and (
        not isinstance(embeds, Tensor)
        or embeds.ndim not in (2, 3)
        or not embeds.is_floating_point()
    ):
        raise InvalidImageError(
            f"prompt_embeds must be a float tensor [1, N, C] or None, got "
            f"{tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__}"
        )
    size = options.size
    if size is not None and not (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise InvalidImageError(f"size must be None or (width, height) ints >= 1, got {size!r}")
    budget = options.memory_budget_bytes
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
    ):
        raise InvalidImageError(
            f"memory_budget_bytes must be a positive int or None, got {budget!r}"
        )
    if (
        isinstance(options.max_output_pixels, bool)
        or not isinstance(options.max_output_pixels, int)
        or options.max_output_pixels < 1
    ):
        raise InvalidImageError(
            f"max_output_pixels must be a positive int, got {options.max_output_pixels!r}"
        )


def validate_images(images: Tensor, options: UpscaleOptions) -> Tensor:
    """Check shape, values and options before any work; returns ``[B, C, H, W]`` float.

    Errors (:class:`InvalidImageError`, before any model call): not a tensor, wrong shape or
    channel count, an empty image, a scale <= 1, an output above ``max_output_pixels``, NaN or
    infinite pixels, or an invalid option. A 1x1 image is valid (it is padded to one latent
    pixel and comes out ``scale`` x ``scale``).
    """
    if not isinstance(images, Tensor):
        raise InvalidImageError(
            f"expected a torch.Tensor [B, C, H, W], got {type(images).__name__}"
        )
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise InvalidImageError(
            f"expected an image tensor [B, C, H, W] with C in (1, 3, 4), got shape {tuple(images.shape)}"
        )
    b, _, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise InvalidImageError(f"empty image (shape {tuple(images.shape)})")
    validate_options(options)
    out_w, out_h = target_size(w, h, options)
    if out_w * out_h > options.max_output_pixels:
        raise InvalidImageError(
            f"output would be {out_w}x{out_h} = {out_w * out_h / 1e6:.1f} MP, above the limit of "
            f"{options.max_output_pixels / 1e6:.1f} MP (raise max_output_pixels to allow it)"
        )
    if images.is_complex() or images.dtype == torch.bool:
        raise InvalidImageError(f"expected real-valued pixels, got dtype {images.dtype}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise InvalidImageError("image contains NaN or infinite pixel values")
    return images
