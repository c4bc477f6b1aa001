"""Transparent pixels: what colour the model sees under them.

The colour stored under fully transparent pixels is invisible but arbitrary (often a
saturated leftover, or black). The model and the bicubic resampling mix neighbouring
pixels, so that hidden colour would bleed into visible edges as a fringe. Image editors
avoid this by filling ("bleeding") transparent pixels from their visible neighbours before
resampling; :func:`fill_transparent` does the same with a push-pull pyramid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fill_transparent(rgb: Tensor, alpha: Tensor) -> Tensor:
    """Replace the colour of fully transparent pixels by an alpha-weighted average of the
    nearest visible ones (push-pull: average down a pyramid, fill back up).

    Args:
        rgb: ``[B, C, H, W]`` colours in [0, 1].
        alpha: ``[B, 1, H, W]`` opacity in [0, 1].

    Returns:
        ``[B, C, H, W]``: equal to ``rgb`` wherever ``alpha > 0``; transparent pixels carry
        the colour of the visible pixels around them (an image with no visible pixel is
        returned unchanged).
    """
    rgb, alpha = rgb.float(), alpha.float().clamp(0, 1)
    hidden = alpha <= 0
    if not bool(hidden.any()) or not bool((~hidden).any()):
        return rgb
    # push: alpha-weighted means over 2x2 blocks, down to 1x1
    levels = [(rgb * alpha, alpha)]
    while max(levels[-1][1].shape[-2:]) > 1:
        colour, weight = levels[-1]
        if min(colour.shape[-2:]) == 1:  # a 1-pixel side: pool the other side only
            kernel = (1, 2) if colour.shape[-2] == 1 else (2, 1)
        else:
            kernel = (2, 2)
        levels.append(
            (
                F.avg_pool2d(colour, kernel, ceil_mode=True),
                F.avg_pool2d(weight, kernel, ceil_mode=True),
            )
        )
    # pull: from the coarsest level, give weightless pixels the coarser level's colour
    colour, weight = levels[-1]
    filled = colour / weight.clamp_min(1e-12)
    for colour, weight in reversed(levels[:-1]):
        up = F.interpolate(filled, size=colour.shape[-2:], mode="nearest")
        mean = colour / weight.clamp_min(1e-12)
        filled = torch.where(weight > 0, mean, up)
    return torch.where(hidden, filled, rgb)
