"""Blur kernels of the Real-ESRGAN degradation (basicsr ``degradations.py``), in torch.

All kernels are float64 ``[k, k]`` tensors summing to 1, centred, ``k`` odd. Random draws
take an explicit ``torch.Generator`` so a seed reproduces them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def _grid(size: int) -> Tensor:
    """``[k, k, 2]`` (x, y) offsets from the centre, as basicsr's ``mesh_grid``."""
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """``g^T Sigma^-1 g`` over the grid, ``Sigma = R diag(sx^2, sy^2) R^T`` (R rotates by theta)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    inv = torch.linalg.inv(sigma)
    g = _grid(size)
    return ((g @ inv) * g).sum(-1)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> Tensor:
    """Bivariate Gaussian ``exp(-q / 2)`` (isotropic when ``sigma_x == sigma_y``)."""
    k = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> Tensor:
    """Generalised Gaussian ``exp(-0.5 q^beta)`` (basicsr's form; beta = 1 is the Gaussian)."""
    k = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta).pow(beta))
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> Tensor:
    """Plateau-shaped ``1 / (q^beta + 1)``."""
    k = 1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta).pow(beta) + 1.0)
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> Tensor:
    """Circular low-pass (2-D sinc / Airy) kernel with cutoff ``omega`` in radians.

    ``k(r) = omega J1(omega r) / (2 pi r)``, centre ``omega^2 / (4 pi)``, normalised; zero
    padded to ``pad_to`` when larger (basicsr's ``circular_lowpass_kernel``).
    """
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    c = (size - 1) / 2
    ax = torch.arange(size, dtype=torch.float64) - c
    r = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    k = k / k.sum()
    return pad_kernel(k, pad_to)


def pulse_kernel(size: int) -> Tensor:
    """The identity ("pulse") kernel: 1 at the centre."""
    k = torch.zeros(size, size, dtype=torch.float64)
    k[size // 2, size // 2] = 1.0
    return k


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a centred odd kernel to ``size`` (no-op when already that large)."""
    pad = (size - kernel.shape[-1]) // 2
    if pad <= 0:
        return kernel
    return torch.nn.functional.pad(kernel, (pad, pad, pad, pad))


def _beta(g: torch.Generator, beta_range: Sequence[float]) -> float:
    # basicsr: half the time below 1, half above (so both shapes are equally likely)
    if torch.rand((), generator=g) < 0.5:
        return _uniform(g, beta_range[0], 1.0)
    return _uniform(g, 1.0, beta_range[1])


def random_mixed_kernel(
    g: torch.Generator,
    size: int,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    rotation_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> Tensor:
    """One kernel of a type drawn from ``kernel_list`` with probabilities ``kernel_prob``.

    ``aniso`` types draw ``sigma_x``, ``sigma_y`` and a rotation; ``iso`` types one sigma.
    """
    probs = torch.tensor(list(kernel_prob), dtype=torch.float64)
    kind = kernel_list[int(torch.multinomial(probs, 1, generator=g))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    sx = _uniform(g, *sigma_range)
    if kind.endswith("aniso"):
        sy = _uniform(g, *sigma_range)
        theta = _uniform(g, *rotation_range)
    else:
        sy, theta = sx, 0.0
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sx, sy, theta, _beta(g, betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sx, sy, theta, _beta(g, betap_range))
    return gaussian_kernel(size, sx, sy, theta)
