"""Colour fix: match the SR output's colours to the (bicubic-upsampled) input.

Pure functions on ``[B, C, H, W]`` tensors in ``[0, 1]`` (reference/peers.md 1.8):

* :func:`adain_color_fix` - per-channel mean/std of the output replaced by the reference's;
* :func:`wavelet_color_fix` - the output's high frequencies plus the reference's lowest band
  (5 levels of a-trous 3x3 blur), which removes colour drift but keeps the generated detail.

Both return float tensors clamped to ``[0, 1]`` with the output's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOR_FIXES = ("none", "adain", "wavelet")
WAVELET_LEVELS = 5

_BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _check(output: Tensor, reference: Tensor) -> None:
    if output.ndim != 4 or output.shape != reference.shape:
        raise ValueError(
            f"colour fix needs two [B, C, H, W] tensors of one shape, got {tuple(output.shape)} "
            f"and {tuple(reference.shape)}"
        )


def adain_color_fix(output: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Give ``output`` the per-image, per-channel mean and std of ``reference``.

    Args:
        output, reference: ``[B, C, H, W]`` in [0, 1].
        eps: added to the (unbiased) variances, as in StableSR/OSEDiff.

    Returns:
        ``[B, C, H, W]`` in [0, 1].
    """
    _check(output, reference)
    out = output.float()
    ref = reference.float()
    o_mean, o_std = _mean_std(out, eps)
    r_mean, r_std = _mean_std(ref, eps)
    fixed = (out - o_mean) / o_std * r_std + r_mean
    return fixed.clamp(0.0, 1.0).to(output.dtype)


def _mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = x.flatten(2)
    var = flat.var(dim=-1, correction=1) if flat.shape[-1] > 1 else torch.zeros_like(flat[..., 0])
    return flat.mean(dim=-1)[..., None, None], (var + eps).sqrt()[..., None, None]


def wavelet_blur(image: Tensor, radius: int) -> Tensor:
    """One a-trous level: the 3x3 binomial kernel dilated by ``radius``, replicate padding."""
    c = image.shape[1]
    kernel = _BLUR.to(device=image.device, dtype=image.dtype).expand(c, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=c, dilation=radius)


def wavelet_decomposition(image: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """Split ``image`` into (high frequencies, lowest band); ``high + low == image``."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, image


# Rows on either side a band needs so that the a-trous levels see real neighbours:
# sum of the dilations 1 + 2 + 4 + 8 + 16.
def _halo(levels: int) -> int:
    return 2**levels - 1


def wavelet_color_fix(
    output: Tensor, reference: Tensor, levels: int = WAVELET_LEVELS, band_rows: int | None = None
) -> Tensor:
    """Output's high frequencies + reference's lowest band (levels of a-trous blur).

    Args:
        output, reference: ``[B, C, H, W]`` in [0, 1].
        levels: number of a-trous levels (5: the low band holds structures wider than ~64 px).
        band_rows: process the image in horizontal bands of this many rows (plus a halo of
            ``2**levels - 1`` rows that makes the result identical to the whole-image one), so
            the temporaries stay small for very large images. ``None`` picks ~4 MP bands.

    Returns:
        ``[B, C, H, W]`` in [0, 1].
    """
    _check(output, reference)
    b, c, h, w = output.shape
    if band_rows is None:
        band_rows = max(64, (4 * 2**20) // max(w, 1))
    halo = _halo(levels)
    result = torch.empty_like(output, dtype=torch.float32)
    for y0 in range(0, h, band_rows):
        y1 = min(y0 + band_rows, h)
        # The halo is clipped at the image border, where replicate padding is then correct;
        # inside the image the halo rows are real data and absorb the band's padding error.
        a0, a1 = max(0, y0 - halo), min(h, y1 + halo)
        out = output[:, :, a0:a1].float()
        ref = reference[:, :, a0:a1].float()
        high, _ = wavelet_decomposition(out, levels)
        _, low = wavelet_decomposition(ref, levels)
        result[:, :, y0:y1] = (high + low)[:, :, y0 - a0 : y1 - a0]
    return result.clamp_(0.0, 1.0).to(output.dtype)


def apply_color_fix(output: Tensor, reference: Tensor, method: str) -> Tensor:
    """Dispatch on ``method`` (``none`` | ``adain`` | ``wavelet``)."""
    if method == "none":
        return output
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {method!r}")
