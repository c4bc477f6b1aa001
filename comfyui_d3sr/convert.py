"""Pure conversions between ComfyUI's data formats and d3sr_core's (torch only, no host imports).

* IMAGE: ``[B, H, W, C]`` float32 in [0, 1] on the CPU; d3sr_core: ``[B, C, H, W]``.
* MASK: ``[B, H, W]`` (or ``[H, W]``) in [0, 1], 1 = masked; LoadImage gives ``1 - alpha``.
* LATENT: ``{"samples": [B, C, h, w], "noise_mask"?: ..., "batch_index"?: ...}``, samples *raw*
  (the VAE posterior mode, not multiplied by the scaling factor; the factor is applied only
  inside ComfyUI's samplers).
* CONDITIONING: ``[[cond [B, N, C], {"pooled_output": ..., ...}], ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ConversionError(ValueError):
    """An input cannot be converted; the message says what was received and what is expected."""


def image_to_bchw(image: Tensor) -> Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (C = 1, 3 or 4) -> ``[B, C, H, W]`` float32 (a copy-free view where possible)."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ConversionError(f"expected an IMAGE [B, H, W, C] with C in 1, 3, 4; got {shape}")
    return image.float().movedim(-1, 1)


def bchw_to_image(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ComfyUI IMAGE ``[B, H, W, C]``, float32, clamped to [0, 1], contiguous, CPU."""
    return images.detach().float().clamp(0, 1).movedim(1, -1).contiguous().cpu()


def mask_as_alpha(mask: Tensor | None, images: Tensor) -> Tensor | None:
    """A MASK matching ``images`` (``[B, C, H, W]``) as an alpha channel ``[B, 1, H, W]`` (= 1 - mask).

    Returns None when there is no mask or its size differs from the image (LoadImage gives a
    64x64 placeholder for images without alpha). A single mask is used for the whole batch.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or tuple(mask.shape[-2:]) != tuple(images.shape[-2:]):
        return None
    if mask.shape[0] not in (1, images.shape[0]):
        raise ConversionError(
            f"mask batch {mask.shape[0]} does not match the image batch {images.shape[0]}"
        )
    alpha = 1.0 - mask.float().clamp(0, 1)
    return alpha.unsqueeze(1).expand(images.shape[0], 1, -1, -1).to(images.device)


def alpha_to_mask(alpha: Tensor) -> Tensor:
    """Alpha ``[B, 1, H, W]`` -> ComfyUI MASK ``[B, H, W]`` (1 = masked), CPU float32."""
    return (1.0 - alpha[:, 0].float().clamp(0, 1)).contiguous().cpu()


def raw_to_scaled(samples: Tensor, scaling_factor: float) -> Tensor:
    """ComfyUI's raw latent -> the scaled latent diffusers UNets see (``* scaling_factor``)."""
    return samples * scaling_factor


def scaled_to_raw(latent: Tensor, scaling_factor: float) -> Tensor:
    """Scaled latent -> ComfyUI's raw convention (``/ scaling_factor``)."""
    return latent / scaling_factor


def latent_samples(latent: dict) -> Tensor:
    """The ``samples`` of a LATENT dict, checked to be an image latent ``[B, C, h, w]``."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), Tensor):
        raise ConversionError("expected a LATENT (a dict with a 'samples' tensor)")
    samples = latent["samples"]
    if samples.ndim == 5:
        raise ConversionError(
            f"video / 3-D latents (shape {tuple(samples.shape)}) are not supported: D3SR upscales "
            "images. Decode the video and use D3SR Upscale Image on its frames."
        )
    if samples.ndim != 4:
        raise ConversionError(f"expected LATENT samples [B, C, h, w], got {tuple(samples.shape)}")
    return samples


def resize_noise_mask(mask: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """Scale a LATENT's ``noise_mask`` (any of ``[h, w]``, ``[B, h, w]``, ``[B, 1, h, w]``, at pixel
    or latent resolution) by the same factor as the latent went ``old_hw`` -> ``new_hw``.

    Returns ``[B, 1, H, W]`` (bilinear; values stay in [0, 1]), the layout SetLatentNoiseMask uses.
    """
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise ConversionError(
            f"noise_mask must be [h, w], [B, h, w] or [B, 1, h, w], got {tuple(mask.shape)}"
        )
    mh, mw = m.shape[-2:]
    size = (
        max(1, round(mh * new_hw[0] / old_hw[0])),
        max(1, round(mw * new_hw[1] / old_hw[1])),
    )
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def conditioning_to_embeds(conditioning: list | None) -> Tensor | None:
    """The text embedding of a CONDITIONING (first entry, first batch item) as ``[1, N, C]``.

    SD2.x CLIP Text Encode gives ``[1, 77*k, 1024]`` (penultimate layer + final layer norm, the
    same recipe as D3SR's stored embedding). Several entries (Conditioning Combine) or a batch
    of different prompts cannot be one fixed condition and are refused.
    """
    if conditioning is None:
        return None
    if not isinstance(conditioning, list) or not conditioning:
        raise ConversionError("expected a CONDITIONING (a non-empty list of [tensor, dict])")
    if len(conditioning) > 1:
        raise ConversionError(
            f"this CONDITIONING holds {len(conditioning)} entries (combined prompts); D3SR takes one "
            "fixed prompt: connect a single CLIP Text Encode"
        )
    entry = conditioning[0]
    cond = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(cond, Tensor) or cond.ndim != 3:
        raise ConversionError("expected CONDITIONING entries of the form [tensor [B, N, C], dict]")
    if cond.shape[0] > 1 and not torch.equal(cond[:1].expand_as(cond), cond):
        raise ConversionError(
            f"this CONDITIONING holds {cond.shape[0]} different prompts; D3SR takes one"
        )
    return cond[:1].float()
