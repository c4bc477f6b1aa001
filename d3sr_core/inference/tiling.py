"""Latent tiling of the UNet step with Gaussian blending.

The UNet runs on overlapping latent tiles; their outputs (epsilon or v) are blended with a
separable Gaussian weight per tile, ``sum(w * out) / sum(w)``, and x0 is then computed once in
closed form for the whole latent (equivalent to blending x0: the map is affine per pixel).

Compared with OSEDiff's tiling (reference/peers.md 1.6) this:

* tiles an axis only when it is longer than the tile (an explicit ``h <= tile and w <= tile``
  test; a latent up to 1/16 longer than the tile is run as one slightly larger tile instead
  of two near-duplicates, so 97x96 with tile 96 is one tile);
* places tiles symmetrically with equal sizes (balanced: the fewest tiles of at most the
  requested size, spread evenly; never a duplicate origin);
* centres the weights at ``(size - 1) / 2`` on both axes and uses flat weights on an axis that
  has a single tile (the result then equals the untiled one exactly along that axis);
* clamps the overlap to half the tile when the tile is small;
* runs tiles in batches (all tiles have one size) as far as the memory budget allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Gaussian standard deviation as a fraction of the tile length (OSEDiff: variance 0.01 in
# tile-normalised units). Edge pixels, where zero padding distorts the UNet, weigh ~4e-6 of a
# centre pixel, so each pixel is taken from the tiles that see it with most context, with a
# smooth ~8-pixel transition half-way through the overlap.
SIGMA_FRACTION = 0.1


@dataclass(frozen=True)
class Tile:
    """A latent tile: rows ``y:y+h``, columns ``x:x+w``."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Balanced ``(start, size)`` spans covering ``0..length`` along one axis.

    Args:
        length: axis length (latent pixels), >= 1.
        tile: maximum tile size; an axis at most ``tile + tile // 16`` long is one span.
        overlap: minimum overlap between neighbouring spans; clamped to ``tile // 2``.

    Returns:
        Spans of one common size <= ``tile``, first at 0, last ending at ``length``, origins
        strictly increasing and spaced evenly (so the layout is symmetric).
    """
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be >= 1, got {length} and {tile}")
    if length <= tile + tile // 16:
        return [(0, length)]
    overlap = max(0, min(overlap, tile // 2))
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)  # <= tile, see the docstring
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, size) for s in starts]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles covering a ``height x width`` latent (see :func:`tile_spans`)."""
    return [
        Tile(y, x, h, w)
        for y, h in tile_spans(height, tile, overlap)
        for x, w in tile_spans(width, tile, overlap)
    ]


def gaussian_weights(
    h: int,
    w: int,
    flat_y: bool = False,
    flat_x: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Separable Gaussian blending weights ``[h, w]`` (float32, peak 1 at the tile centre).

    The centre is ``(n - 1) / 2`` on both axes (symmetric); ``flat_*`` gives weight 1 along an
    axis that is not tiled.
    """

    def axis(n: int, flat: bool) -> Tensor:
        if flat or n == 1:
            return torch.ones(n, dtype=torch.float64)
        pos = torch.arange(n, dtype=torch.float64)
        sigma = SIGMA_FRACTION * n
        return torch.exp(-0.5 * ((pos - (n - 1) / 2) / sigma) ** 2)

    return torch.outer(axis(h, flat_y), axis(w, flat_x)).float().to(device)


def blend_weights(tiles: list[Tile], height: int, width: int, device=None) -> Tensor:
    """The weight map of one tile of ``tiles`` (they all share a size)."""
    t = tiles[0]
    return gaussian_weights(t.h, t.w, flat_y=t.h == height, flat_x=t.w == width, device=device)


def tiled_model_output(
    predict: Callable[[Tensor], Tensor],
    latent: Tensor,
    tiles: list[Tile],
    batch_size: int = 1,
    tick: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Blend ``predict`` over ``tiles`` of ``latent`` with Gaussian weights.

    Args:
        predict: ``[N, C, h, w] -> [N, C, h, w]`` model output (e.g. the UNet's epsilon).
        latent: ``[1, C, H, W]`` scaled latent.
        tiles: from :func:`tile_grid`; one common size.
        batch_size: tiles per ``predict`` call.
        tick: ``tick(done, total)`` after each batch (progress and cancellation).

    Returns:
        ``[1, C, H, W]`` float32 blended model output.
    """
    if latent.shape[0] != 1:
        raise ValueError("tiled_model_output works on one latent at a time")
    _, c, height, width = latent.shape
    if len(tiles) == 1 and tiles[0] == Tile(0, 0, height, width):
        out = predict(latent).float()
        if tick is not None:
            tick(1, 1)
        return out
    weight = blend_weights(tiles, height, width, latent.device)
    acc = torch.zeros(1, c, height, width, dtype=torch.float32, device=latent.device)
    norm = torch.zeros(1, 1, height, width, dtype=torch.float32, device=latent.device)
    batch_size = max(1, batch_size)
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        inputs = torch.cat([latent[(..., *t.slices)] for t in batch])
        outputs = predict(inputs).float()
        for t, out in zip(batch, outputs, strict=True):
            acc[(..., *t.slices)] += out * weight
            norm[(..., *t.slices)] += weight
        if tick is not None:
            tick(min(start + batch_size, len(tiles)), len(tiles))
    return acc / norm


# ---- choosing tile size and batch from a memory budget -------------------------------------

# The largest latent tile "auto" picks while the UNet's self-attention is global: D3SR is
# trained on 512 px crops (64 latent px); tiles of up to 2x that keep the self-attention close
# to what the model saw while keeping the overlap overhead small. With windowed attention
# (:mod:`.unet_attention`) the context is bounded by the window whatever the tile, so only
# the memory budget limits the tile (``max_tile=None``): fewer tiles, less overlap work.
AUTO_MAX_TILE = 128
MIN_TILE = 16


def unet_bytes_per_latent_pixel(unet, dtype: torch.dtype) -> int:
    """Peak activation bytes of one UNet forward per latent pixel (per batch element).

    A deliberately generous estimate: the skip connections of every level plus the widest
    transformer feed-forward activations at the first level, ~24 full-width feature maps.
    """
    config = getattr(unet, "config", None)
    channels = list(getattr(config, "block_out_channels", None) or [320])
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_level = sum(c * 3 / 4**i for i, c in enumerate(channels))
    return int((per_level + 24 * channels[0]) * max(itemsize, 2) * 1.5)


def attention_bytes(tokens: int, heads: int, itemsize: int, math_backend: bool) -> int:
    """Score-matrix bytes of one self-attention when the backend materialises it."""
    return tokens * tokens * heads * itemsize if math_backend else 0


def plan_latent_tiles(
    height: int,
    width: int,
    tile_size: int | str | None,
    overlap: int,
    budget: int,
    bytes_per_pixel: int,
    attention_per_tokens: Callable[[int], int] | None = None,
    max_batch: int = 8,
    max_tile: int | None = AUTO_MAX_TILE,
) -> tuple[list[Tile], int]:
    """Tiles and batch size for a ``height x width`` latent.

    Args:
        tile_size: latent tile (already divided by 8), ``"auto"`` or None/0 (never tile).
        overlap: latent overlap.
        budget: activation bytes available.
        bytes_per_pixel: :func:`unet_bytes_per_latent_pixel`.
        attention_per_tokens: extra bytes for ``n`` tokens (math attention backends).
        max_tile: the largest tile ``"auto"`` picks (latent px); None = the whole latent
            when the budget allows it.

    Returns:
        ``(tiles, batch_size)``.
    """

    def cost(h: int, w: int) -> int:
        extra = attention_per_tokens(h * w) if attention_per_tokens else 0
        return h * w * bytes_per_pixel + extra

    if tile_size is None or tile_size == 0:
        return [Tile(0, 0, height, width)], 1
    if tile_size == "auto":
        tile = max_tile if max_tile is not None else -(-max(height, width) // 8) * 8
        while tile > MIN_TILE and cost(tile + tile // 16, tile + tile // 16) > budget:
            tile -= 8
    else:
        tile = int(tile_size)
    tiles = tile_grid(height, width, tile, overlap)
    per_tile = cost(tiles[0].h, tiles[0].w)
    batch = int(max(1, min(max_batch, len(tiles), budget // max(per_tile, 1))))
    return tiles, batch
