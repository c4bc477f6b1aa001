"""Latent-level upscaling: raw VAE latents in, raw super-resolved latents out.

Hosts such as ComfyUI pass latents *raw*: the VAE posterior mode, not multiplied by the
scaling factor (diffusers' ``latent_dist.mode()``; SD1.x and SD2.x share this space). D3SR's
stages work on *scaled* latents of an upsampled image, so one call here does::

    raw LR latent --decode--> LR image --bicubic x scale--> encode --> one UNet step --> x0
    x0 / scaling_factor                         (same latent family: the SR latent, raw)
    decode(x0) -> colour fix -> encode_output   (another family: re-encoded by the caller's VAE)

with the pipeline's own tiling, out-of-memory retries, progress and cancel checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .color import apply_color_fix
from .options import (
    LATENT_FACTOR,
    InvalidImageError,
    UpscaleOptions,
    output_size,
    validate_options,
)
from .pipeline import (
    _STAGE_WEIGHTS,
    CancelCheck,
    D3SRPipeline,
    ProgressCallback,
    _Progress,
    _Run,
    pad_to_multiple,
)


def latent_output_shape(
    latents_shape: tuple[int, ...], scale: float, compression: int = LATENT_FACTOR
) -> tuple[int, int]:
    """``(h, w)`` of the raw SR latent for an input latent ``[B, C, h0, w0]``.

    The LR image is ``compression * h0`` x ``compression * w0`` pixels; the SR image is
    ``floor(w*scale + 0.5)`` x ``floor(h*scale + 0.5)`` (see :func:`.output_size`), padded up to
    a multiple of 8, so the latent is ``ceil(H / 8)`` x ``ceil(W / 8)``.
    """
    h0, w0 = latents_shape[-2:]
    out_w, out_h = output_size(w0 * compression, h0 * compression, scale)
    return math.ceil(out_h / LATENT_FACTOR), math.ceil(out_w / LATENT_FACTOR)


def validate_latents(
    pipeline: D3SRPipeline, latents: Tensor, options: UpscaleOptions, external_decoder: bool
) -> Tensor:
    """Check a raw latent batch before any work; returns it as float32 ``[B, C, h, w]``.

    Raises :class:`InvalidImageError` for: not a tensor, 5-D (video) or other non-4-D shapes, an
    empty batch, a channel count the D3SR VAE cannot decode (without ``external_decoder``),
    NaN/inf values, invalid options, or an output above ``options.max_output_pixels``.
    """
    if not isinstance(latents, Tensor):
        raise InvalidImageError(
            f"expected a latent tensor [B, C, h, w], got {type(latents).__name__}"
        )
    if latents.ndim == 5:
        raise InvalidImageError(
            f"video / 3-D latents (shape {tuple(latents.shape)}) are not supported: D3SR upscales "
            "images; decode the video and upscale its frames as an IMAGE batch"
        )
    if latents.ndim != 4 or 0 in latents.shape:
        raise InvalidImageError(
            f"expected a latent tensor [B, C, h, w], got {tuple(latents.shape)}"
        )
    channels = int(getattr(getattr(pipeline.generator.vae, "config", None), "latent_channels", 4))
    if not external_decoder and latents.shape[1] != channels:
        raise InvalidImageError(
            f"this latent has {latents.shape[1]} channels; D3SR's SD2.1 VAE decodes {channels}-channel "
            "latents (SD1.x/SD2.x). Connect the VAE that made this latent."
        )
    validate_options(options)
    if not external_decoder:
        out_h, out_w = latent_output_shape(latents.shape, options.scale)
        pixels = out_h * out_w * LATENT_FACTOR**2
        if pixels > options.max_output_pixels:
            raise InvalidImageError(
                f"output would be about {out_w * 8}x{out_h * 8} = {pixels / 1e6:.1f} MP, above the "
                f"limit of {options.max_output_pixels / 1e6:.1f} MP"
            )
    latents = latents.float()
    if not torch.isfinite(latents).all():
        raise InvalidImageError("latent contains NaN or infinite values")
    return latents


@torch.inference_mode()
def upscale_latent(
    pipeline: D3SRPipeline,
    latents: Tensor,
    options: UpscaleOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    decode_input: Callable[[Tensor], Tensor] | None = None,
    encode_output: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Upscale a batch of raw latents ``[B, C, h, w]`` (float, any device).

    Args:
        pipeline: the pipeline whose generator (and VAE) does the work.
        latents: raw (unscaled) latents. Without ``decode_input`` they must be in D3SR's VAE
            space (SD1.x / SD2.x, 4 channels).
        options: scale, tiling, seed, ``prompt_embeds`` ...; ``color_fix`` applies only when
            ``encode_output`` is given (the SR image is decoded then; otherwise the result is the
            generator's x0 itself, which no colour fix can touch without decoding).
        decode_input: ``raw latent [1, C, h, w] -> image [1, 3, H, W] in [0, 1]`` with the
            caller's VAE (the VAE that made the latent); None = D3SR's own VAE.
        encode_output: ``image [1, 3, H, W] in [0, 1] -> latent [1, C', H', W']`` with the
            caller's VAE, for a latent family other than D3SR's (SDXL, SD3, Flux ...); None =
            return D3SR's raw SR latent.

    Returns:
        Without ``encode_output``: ``[B, 4, ceil(H/8), ceil(W/8)]`` raw SR latents (``x0 /
        scaling_factor``; :func:`latent_output_shape`), float32 on the input's device. With it:
        the concatenation of its outputs. ``progress(done, total)`` advances per tile and
        ``cancel()`` is checked between tiles (:class:`~.pipeline.UpscaleCancelled`).
    """
    options = options or UpscaleOptions()
    latents = validate_latents(pipeline, latents, options, decode_input is not None)
    g = pipeline.generator
    device = pipeline.device
    scaling = g.config.scaling_factor
    stages = ["encode", "denoise"] + (["decode"] if decode_input is None else [])
    stages += ["decode"] if encode_output is not None else []
    tracker = _Progress(latents.shape[0], progress, cancel, sum(_STAGE_WEIGHTS[s] for s in stages))
    tracker.check()
    rng = (
        torch.Generator(device=device).manual_seed(options.seed)
        if options.seed is not None
        else None
    )
    budget = pipeline._budget(options.memory_budget_bytes)
    outputs = []
    stored_embeds = pipeline._use_prompt_embeds(options)
    previous, pipeline._run = pipeline._run, _Run(options, budget, tracker)
    try:
        for i in range(latents.shape[0]):
            raw = latents[i : i + 1]
            if decode_input is None:
                low = (pipeline.decode(raw.to(device) * scaling) + 1.0) / 2.0
            else:
                low = decode_input(raw)
                tracker.check()
            low = _checked_image(low, "decode_input").to(device)
            _, _, h, w = low.shape
            out_w, out_h = output_size(w, h, options.scale)
            if out_w * out_h > options.max_output_pixels:
                raise InvalidImageError(
                    f"output would be {out_w}x{out_h} = {out_w * out_h / 1e6:.1f} MP, above the "
                    f"limit of {options.max_output_pixels / 1e6:.1f} MP"
                )
            reference = F.interpolate(
                low.clamp(0, 1), size=(out_h, out_w), mode="bicubic", align_corners=False
            ).clamp_(0, 1)
            padded, (ph, pw) = pad_to_multiple(reference, LATENT_FACTOR)
            x0 = pipeline.denoise(pipeline.encode(padded * 2.0 - 1.0, rng))
            del padded, low
            if encode_output is None:
                outputs.append((x0 / scaling).to(latents.device))
                continue
            sr = ((pipeline.decode(x0)[:, :, :ph, :pw].float() + 1.0) / 2.0).clamp_(0, 1)
            sr = apply_color_fix(sr, reference, options.color_fix)
            outputs.append(encode_output(sr).float().to(latents.device))
            tracker.check()
    finally:
        pipeline._run = previous
        if stored_embeds is not None:
            g.set_prompt_embeds(stored_embeds)
    if any(o.shape[1:] != outputs[0].shape[1:] for o in outputs):
        raise InvalidImageError("encode_output returned latents of different shapes")
    return torch.cat(outputs)


def _checked_image(image: Tensor, what: str) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3):
        raise InvalidImageError(
            f"{what} must return an image [1, 3, H, W] in [0, 1], got "
            f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}"
        )
    return image.float()


def probe_image(size: int = 64) -> Tensor:
    """A fixed, smooth test image ``[1, 3, size, size]`` in [0, 1] (gradients and soft blobs)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    blob = torch.exp(-((x - 0.35) ** 2 + (y - 0.6) ** 2) / 0.04)
    rgb = torch.stack([x, y * (1 - x), 0.5 * blob + 0.25 * (1 + torch.sin(6.0 * x * y))])
    return rgb.clamp(0, 1).unsqueeze(0)


@torch.inference_mode()
def latent_space_matches(
    pipeline: D3SRPipeline, encode: Callable[[Tensor], Tensor], tolerance: float = 0.1
) -> bool:
    """Whether ``encode`` (a host VAE: image ``[1, 3, H, W]`` in [0, 1] -> raw latent) puts
    images in the same latent space as D3SR's VAE.

    Both encode :func:`probe_image`; the spaces match when the raw latents have the same shape
    and ``||a - b|| <= tolerance * ||b||``. SD1.x and SD2.x VAEs share their encoder (they
    match); SDXL, SD3 and Flux VAEs do not (other weights, channels or compression).
    """
    g = pipeline.generator
    image = probe_image().to(pipeline.device)
    vae_dtype = next(g.vae.parameters()).dtype
    ours = g.vae.encode((image * 2 - 1).to(vae_dtype)).latent_dist.mode().float().cpu()
    theirs = encode(image)
    if not isinstance(theirs, Tensor) or tuple(theirs.shape) != tuple(ours.shape):
        return False
    theirs = theirs.float().cpu()
    return bool((theirs - ours).norm() <= tolerance * ours.norm())
