"""Latent tiling: placement, Gaussian weights, blending, and tiled vs untiled agreement."""

import math

import pytest
import torch
from tiny_models import tiny_generator
from torch import nn

from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleOptions
from d3sr_core.inference.tiling import (
    Tile,
    blend_weights,
    gaussian_weights,
    plan_latent_tiles,
    tile_grid,
    tile_spans,
    tiled_model_output,
)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float | None = None) -> float:
    peak = float(b.max() - b.min()) if peak is None else peak
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


class LocalDenoiser(nn.Module):
    """A translation-equivariant stand-in for the UNet (receptive field radius 3).

    The real UNet normalises and attends within each tile, so tiling changes its output by
    design; a local operator isolates what the tiling itself must get right: placement,
    weights, blending and the x0 step.
    """

    def __init__(self, channels: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, channels, 3, padding=1),
        )

    def forward(self, sample, timestep=None, encoder_hidden_states=None, return_dict=True):
        out = self.net(sample)
        return (out,) if not return_dict else {"sample": out}


# ---- placement ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 64, 96, 97, 100, 101, 128, 192, 200, 257, 1000])
@pytest.mark.parametrize("tile,overlap", [(96, 32), (64, 16), (32, 8), (16, 64), (128, 0)])
def test_spans_cover_without_duplicates(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    starts = [s for s, _ in spans]
    sizes = {n for _, n in spans}
    assert len(sizes) == 1, "all tiles share one size (batchable)"
    size = sizes.pop()
    assert starts == sorted(set(starts)), "origins strictly increasing: no duplicate tiles"
    assert starts[0] == 0 and starts[-1] + size == length
    if len(spans) == 1:
        assert size == length <= tile + tile // 16
        return
    assert size <= tile
    clamped = min(overlap, tile // 2)
    for (a, n), (b, _) in zip(spans, spans[1:], strict=False):
        assert b <= a + n, "no gap"
        assert a + n - b >= clamped - 1, "overlap kept (up to rounding)"
    # symmetric layout: mirrored origins (up to rounding)
    for a, b in zip(starts, reversed(starts), strict=True):
        assert abs((a + size) - (length - b)) <= 1


def test_explicit_size_test_not_area():
    # OSEDiff tiles 97x96 twice (area test); here it is one slightly larger tile.
    assert tile_grid(97, 96, 96, 32) == [Tile(0, 0, 97, 96)]
    assert tile_grid(96, 96, 96, 32) == [Tile(0, 0, 96, 96)]
    # A long thin latent is tiled along its long axis only.
    tiles = tile_grid(64, 300, 96, 32)
    assert {t.h for t in tiles} == {64} and len(tiles) >= 3
    # An area below tile^2 but a side above the tile is still tiled (OSEDiff would not).
    assert len(tile_grid(40, 200, 96, 32)) > 1


def test_overlap_is_clamped_when_the_tile_is_small():
    spans = tile_spans(100, 16, 200)
    assert all(n <= 16 for _, n in spans) and spans[-1][0] + spans[-1][1] == 100


@pytest.mark.parametrize("shape", [(97, 96), (128, 192), (64, 200), (33, 150), (256, 256)])
def test_every_latent_pixel_has_positive_weight(shape):
    h, w = shape
    tiles = tile_grid(h, w, 48, 16)
    weight = blend_weights(tiles, h, w)
    total = torch.zeros(h, w)
    for t in tiles:
        total[t.slices] += weight
    assert total.min() > 0
    assert len(set(tiles)) == len(tiles)


def test_gaussian_weights_are_symmetric_and_centred():
    for h, w in [(96, 96), (65, 80), (7, 10)]:
        wt = gaussian_weights(h, w)
        torch.testing.assert_close(wt, wt.flip(0))
        torch.testing.assert_close(wt, wt.flip(1))
        assert wt.min() > 0
    odd = gaussian_weights(9, 15)
    assert float(odd[4, 7]) == 1.0 and float(odd.max()) == 1.0  # peak exactly at the centre
    flat = gaussian_weights(8, 12, flat_y=True)
    torch.testing.assert_close(flat[0], flat[5])


# ---- blending --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,tile,overlap",
    [
        ((40, 56), 24, 8),
        ((41, 57), 24, 12),
        ((37, 90), 32, 16),
        ((64, 64), 20, 8),
        ((33, 29), 16, 8),
    ],
)
def test_tiled_blend_matches_untiled_for_a_local_model(shape, tile, overlap):
    model = LocalDenoiser().eval()
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, *shape, generator=g)

    def predict(x):
        return model(x, return_dict=False)[0]

    with torch.inference_mode():
        whole = predict(latent)
        tiles = tile_grid(*shape, tile, overlap)
        assert len(tiles) > 1
        tiled = tiled_model_output(predict, latent, tiles, batch_size=3)
    assert psnr(tiled, whole) >= 40.0


def test_batching_does_not_change_the_result():
    model = LocalDenoiser().eval()
    latent = torch.randn(1, 4, 30, 45, generator=torch.Generator().manual_seed(2))
    tiles = tile_grid(30, 45, 16, 8)
    with torch.inference_mode():
        one = tiled_model_output(lambda x: model(x, return_dict=False)[0], latent, tiles, 1)
        many = tiled_model_output(lambda x: model(x, return_dict=False)[0], latent, tiles, 5)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_plan_respects_budget_and_explicit_sizes():
    tiles, batch = plan_latent_tiles(300, 300, "auto", 32, budget=10**12, bytes_per_pixel=1000)
    assert tiles[0].h <= 128 + 8 and batch >= 1
    small, _ = plan_latent_tiles(300, 300, "auto", 32, budget=64 * 64 * 1000, bytes_per_pixel=1000)
    assert small[0].h * small[0].w * 1000 <= 64 * 64 * 1000 * 1.15
    never, _ = plan_latent_tiles(300, 200, None, 32, 1, 1)
    assert never == [Tile(0, 0, 300, 200)]
    fixed, _ = plan_latent_tiles(300, 200, 64, 16, 10**12, 1)
    assert max(t.h for t in fixed) <= 64 and max(t.w for t in fixed) <= 64
    # windowed attention lifts the 128 cap: the budget alone decides
    whole, _ = plan_latent_tiles(300, 200, "auto", 32, 10**12, 1000, max_tile=None)
    assert whole == [Tile(0, 0, 300, 200)]
    fits, _ = plan_latent_tiles(300, 300, "auto", 32, 200 * 200 * 1000, 1000, max_tile=None)
    assert 128 < fits[0].h and fits[0].h * fits[0].w * 1000 <= 200 * 200 * 1000


# ---- through the pipeline --------------------------------------------------------------------


def _pipeline_with_local_unet():
    g = tiny_generator()
    g.unet = LocalDenoiser(seed=3).eval()
    return D3SRPipeline(g)


@pytest.mark.parametrize(
    "size,tile,overlap", [((44, 60), 128, 64), ((45, 31), 96, 32), ((30, 70), 192, 64)]
)
def test_pipeline_latent_tiling_matches_untiled(size, tile, overlap):
    pipe = _pipeline_with_local_unet()
    h, w = size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4))
    common = dict(scale=4, vae_tile_size=None, color_fix="none")
    whole = pipe.upscale_tensor(x, UpscaleOptions(tile_size=None, **common))
    tiled = pipe.upscale_tensor(x, UpscaleOptions(tile_size=tile, tile_overlap=overlap, **common))
    assert tiled.shape == whole.shape
    assert psnr(tiled, whole, peak=1.0) >= 40.0


def test_real_unet_tile_covering_the_latent_is_exactly_untiled():
    pipe = D3SRPipeline(tiny_generator())
    x = torch.rand(1, 3, 20, 26, generator=torch.Generator().manual_seed(5))
    common = dict(scale=4, vae_tile_size=None, color_fix="none")
    whole = pipe.upscale_tensor(x, UpscaleOptions(tile_size=None, **common))
    one_tile = pipe.upscale_tensor(x, UpscaleOptions(tile_size=1024, **common))
    assert torch.equal(whole, one_tile)
