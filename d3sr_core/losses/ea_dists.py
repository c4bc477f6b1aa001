"""EA-DISTS (D3SR section 3.3): DISTS on the images plus DISTS on their Sobel edge maps.

``EA-DISTS(x, y) = DISTS(x, y) + DISTS(S(x), S(y))`` with ``S`` the Sobel gradient magnitude
(kornia's normalised 3x3 Sobel, replicate padding, ``sqrt(gx^2 + gy^2 + 1e-6)``).
"""

from __future__ import annotations

import kornia
import torch
from torch import Tensor, nn

from .dists import DISTS, _check_value_range, to_unit_range

EDGE_MODES = ("rgb", "gray")
# ITU-R 601-2 luma, the weights torchvision's Grayscale uses (DOVE's edge model's choice).
_LUMA = (0.299, 0.587, 0.114)


def rgb_to_gray(x: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma (same range as the input)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def sobel_magnitude(x: Tensor, mode: str = "rgb") -> Tensor:
    """Sobel gradient magnitude, the edge map ``S`` of EA-DISTS.

    Args:
        x: ``[B, 3, H, W]`` images in ``[0, 1]``.
        mode: ``"rgb"`` (per channel, as the paper's formula reads) or ``"gray"`` (on luma,
            repeated to 3 channels, as the authors' later DOVE code does).

    Returns:
        ``[B, 3, H, W]``, >= 1e-3; a unit step gives 0.5 on the two pixels beside it.
    """
    if mode not in EDGE_MODES:
        raise ValueError(f"edge mode must be one of {EDGE_MODES}, got {mode!r}")
    if mode == "gray":
        return kornia.filters.sobel(rgb_to_gray(x), normalized=True, eps=1e-6).expand(-1, 3, -1, -1)
    return kornia.filters.sobel(x, normalized=True, eps=1e-6)


class EADISTS(nn.Module):
    """Edge-aware DISTS loss/metric: ``DISTS(x, y) + edge_weight * DISTS(S(x), S(y))``.

    Args:
        dists: the :class:`DISTS` to use (usually ``DISTS.from_pretrained()``).
        value_range: range of the images given to :meth:`forward`: ``(0, 1)`` or ``(-1, 1)``
            (the generator's output range). Default: the ``value_range`` of ``dists`` (so
            ``EADISTS(DISTS(value_range=(-1, 1)))`` takes ``[-1, 1]`` images), else ``(0, 1)``.
            This module maps inputs to ``[0, 1]`` itself before the Sobel filter.
        edge_mode: ``"rgb"`` or ``"gray"`` (see :func:`sobel_magnitude`).
        edge_weight: weight of the edge term (the paper: 1).

    The Sobel maps are fed to DISTS as they are (values ~0..0.7, no rescaling), as in the
    paper; their gradient is small but non-zero (tested).
    """

    def __init__(
        self,
        dists: DISTS | None = None,
        value_range: tuple[float, float] | None = None,
        edge_mode: str = "rgb",
        edge_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if edge_mode not in EDGE_MODES:
            raise ValueError(f"edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}")
        self.dists = dists if dists is not None else DISTS()
        if value_range is None:
            value_range = self.dists.value_range
        self.value_range = _check_value_range(value_range)
        self.edge_mode = edge_mode
        self.edge_weight = float(edge_weight)

    def terms(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(DISTS(x, y), DISTS(S(x), S(y)))``, each ``[B]``, for logging."""
        x = to_unit_range(x, self.value_range)
        y = to_unit_range(y, self.value_range)
        image = self.dists.distance(x, y)
        edge = self.dists.distance(
            sobel_magnitude(x, self.edge_mode), sobel_magnitude(y, self.edge_mode)
        )
        return image, edge

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """EA-DISTS of ``[B, 3, H, W]`` images in ``value_range``; returns ``[B]``
        (lower is more similar; ``.mean()`` for a loss)."""
        image, edge = self.terms(x, y)
        return image + self.edge_weight * edge

    @torch.no_grad()
    def score(self, x: Tensor, y: Tensor) -> Tensor:
        """Metric use: :meth:`forward` without autograd, ``[B]``."""
        return self.forward(x, y)
