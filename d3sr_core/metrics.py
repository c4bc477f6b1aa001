"""Full-reference image metrics on the Y channel, with the usual SR protocol.

The protocol is basicsr's (``calculate_psnr`` / ``calculate_ssim`` with
``test_y_channel=True``), which reproduces the MATLAB numbers SR papers report:

* Y of ITU-R BT.601 "studio swing": ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for
  ``R, G, B`` in ``[0, 1]`` (so Y is in ``[16, 235]``), computed in float64;
* ``crop_border`` pixels (usually the scale factor) removed on every side;
* PSNR over the whole (cropped) image with peak 255;
* SSIM with an 11x11 Gaussian window (sigma 1.5), ``C1 = (0.01 * 255)^2``,
  ``C2 = (0.03 * 255)^2``, "valid" filtering, mean of the SSIM map.

The D3SR paper (reference/paper.md section 6) evaluates whole images (no crop to 512).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(image: Tensor) -> Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, 1, H, W]`` BT.601 studio-swing Y in [16, 235] (float64)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] RGB, got {tuple(image.shape)}")
    x = image.double()
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 16.0 + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b


def _prepare(sr: Tensor, hr: Tensor, crop_border: int) -> tuple[Tensor, Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"images differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    y1, y2 = rgb_to_y(sr), rgb_to_y(hr)
    if crop_border > 0:
        c = int(crop_border)
        if y1.shape[-1] <= 2 * c or y1.shape[-2] <= 2 * c:
            raise ValueError(f"images of {tuple(sr.shape[-2:])} are too small to crop {c} px")
        y1 = y1[..., c:-c, c:-c]
        y2 = y2[..., c:-c, c:-c]
    return y1, y2


def psnr_y(sr: Tensor, hr: Tensor, crop_border: int = 0) -> Tensor:
    """PSNR (dB) on Y per image: ``[B, 3, H, W]`` pairs in [0, 1] -> ``[B]`` (inf if identical)."""
    y1, y2 = _prepare(sr, hr, crop_border)
    mse = (y1 - y2).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """OpenCV's ``getGaussianKernel(size, sigma)`` outer product, float64 ``[size, size]``."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_y(sr: Tensor, hr: Tensor, crop_border: int = 0) -> Tensor:
    """SSIM on Y per image (see module docstring): ``[B, 3, H, W]`` in [0, 1] -> ``[B]``."""
    y1, y2 = _prepare(sr, hr, crop_border)
    if min(y1.shape[-2:]) < 11:
        raise ValueError(
            f"SSIM needs at least 11x11 pixels after cropping, got {tuple(y1.shape[-2:])}"
        )
    w = gaussian_window().to(y1.device)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, w)  # "valid": cv2.filter2D then [5:-5, 5:-5]

    mu1, mu2 = filt(y1), filt(y2)
    s11 = filt(y1 * y1) - mu1**2
    s22 = filt(y2 * y2) - mu2**2
    s12 = filt(y1 * y2) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def mean_finite(values: list[float]) -> float:
    """Mean of the finite values (identical images give an infinite PSNR); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
