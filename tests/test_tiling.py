"""Latent tiling: placement, Gaussian weights, blending, and tiled vs untiled agreement."""

import math

import pytest
import torch
from tiny_models import tiny_generator
from torch import nn

from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline
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


# ---- numbers written out ---------------------------------------------------------------------


def test_spans_written_out():
    assert tile_spans(68, 64, 16) == [(0, 68)]  # up to tile + tile // 16: one span
    assert tile_spans(69, 64, 16) == [(0, 43), (26, 43)]  # 2 spans of ceil((69 + 16) / 2)
    assert tile_spans(100, 64, 16) == [(0, 58), (42, 58)]
    assert tile_spans(100, 50, 0) == [(0, 50), (50, 50)]  # no overlap asked: none added
    # overlap 40 clamped to 33 // 2 = 16: 5 spans of 33, origins round(i * 67 / 4)
    assert tile_spans(100, 33, 40) == [(0, 33), (17, 33), (34, 33), (50, 33), (67, 33)]
    assert tile_spans(3, 1, 0) == [(0, 1), (1, 1), (2, 1)]
    for length, tile in ((0, 5), (5, 0)):
        with pytest.raises(ValueError) as err:
            tile_spans(length, tile, 0)
        assert str(err.value) == f"length and tile must be >= 1, got {length} and {tile}"


def gaussian_by_hand(n: int) -> list[float]:
    """exp(-(i - (n-1)/2)^2 / (2 sigma^2)), sigma = n / 10; a 1-long axis weighs 1."""
    if n == 1:
        return [1.0]
    return [math.exp(-0.5 * ((i - (n - 1) / 2) / (0.1 * n)) ** 2) for i in range(n)]


def test_weights_written_out():
    for h, w in ((2, 5), (1, 7), (6, 13)):
        by_hand = [torch.tensor(gaussian_by_hand(n), dtype=torch.float64) for n in (h, w)]
        got = gaussian_weights(h, w)
        assert got.dtype == torch.float32 and got.shape == (h, w)
        # computed in float64, rounded once: bit-exact
        torch.testing.assert_close(got, by_hand[0].outer(by_hand[1]).float(), atol=0, rtol=0)
    flat_x = gaussian_weights(4, 6, flat_x=True)
    torch.testing.assert_close(flat_x, torch.tensor(gaussian_by_hand(4))[:, None].expand(4, 6))
    # one tile spanning the height: flat along y, Gaussian along x
    got = blend_weights([Tile(0, 0, 4, 6), Tile(0, 4, 4, 6)], 4, 10)
    expected = torch.ones(4)[:, None] * torch.tensor(gaussian_by_hand(6))[None]
    torch.testing.assert_close(got, expected)
    got = blend_weights([Tile(0, 0, 5, 3)], 8, 3)
    torch.testing.assert_close(got, torch.tensor(gaussian_by_hand(5))[:, None].expand(5, 3))


def test_blend_written_out_batches_and_ticks():
    latent = torch.randn(1, 2, 6, 10, generator=torch.Generator().manual_seed(1))
    tiles = [Tile(0, 0, 6, 6), Tile(0, 2, 6, 6), Tile(0, 4, 6, 6)]
    calls, ticks = [], []

    def predict(x):
        calls.append(x.shape[0])
        return (x * 3).double()  # a float64 model output: the blend is float32

    out = tiled_model_output(predict, latent, tiles, batch_size=2, tick=lambda *a: ticks.append(a))
    wx = gaussian_by_hand(6)
    acc, norm = torch.zeros(1, 2, 6, 10), torch.zeros(10)
    for t in tiles:  # flat along y (the tiles span the height)
        for i in range(6):
            acc[..., t.x + i] += wx[i] * 3 * latent[..., t.x + i]
            norm[t.x + i] += wx[i]
    assert out.dtype == torch.float32 and out.shape == (1, 2, 6, 10)
    torch.testing.assert_close(out, acc / norm, atol=1e-6, rtol=1e-6)
    assert calls == [2, 1] and ticks == [(2, 3), (3, 3)]
    calls.clear()
    tiled_model_output(predict, latent, tiles, batch_size=0)
    tiled_model_output(predict, latent, tiles)  # one tile per call by default
    assert calls == [1, 1, 1, 1, 1, 1]
    # one tile covering the latent: the model's output itself, one tick
    ticks.clear()
    whole = tiled_model_output(
        predict, latent, [Tile(0, 0, 6, 10)], tick=lambda *a: ticks.append(a)
    )
    assert torch.equal(whole, (latent * 3).float()) and ticks == [(1, 1)]
    assert torch.equal(tiled_model_output(predict, latent, [Tile(0, 0, 6, 10)]), whole)
    with pytest.raises(ValueError):  # a model that drops a tile is not blended silently
        tiled_model_output(lambda x: x[:1], latent, tiles, batch_size=3)
    with pytest.raises(ValueError) as err:
        tiled_model_output(predict, latent.expand(2, -1, -1, -1), tiles)
    assert str(err.value) == "tiled_model_output works on one latent at a time"


def test_unet_memory_estimates_written_out():
    from types import SimpleNamespace

    from d3sr_core.inference.tiling import attention_bytes, unet_bytes_per_latent_pixel

    sd = SimpleNamespace(config=SimpleNamespace(block_out_channels=[320, 640, 1280, 1280]))
    # skips 320*3 + 640*3/4 + 1280*3/16 + 1280*3/64 = 1740, plus 24 * 320, x itemsize x 1.5
    assert unet_bytes_per_latent_pixel(sd, torch.float16) == int((1740 + 7680) * 2 * 1.5)
    assert unet_bytes_per_latent_pixel(sd, torch.float32) == int((1740 + 7680) * 4 * 1.5)
    assert unet_bytes_per_latent_pixel(sd, torch.uint8) == int((1740 + 7680) * 2 * 1.5)
    assert unet_bytes_per_latent_pixel(object(), torch.float32) == int((960 + 7680) * 4 * 1.5)
    assert attention_bytes(10, 2, 4, math_backend=True) == 800
    assert attention_bytes(10, 2, 4, math_backend=False) == 0


def test_plan_written_out():
    # "auto" shrinks the tile by 8 from 128 until (tile + tile // 16)^2 pixels fit the budget;
    # the sizes are chosen so that the neighbouring tile sizes would tile differently
    for size, budget, tile, near in (  # near: a tile size that would tile differently
        (240, 16200, 120, 112),  # 127^2 = 16129 fits
        (240, 16129, 120, 112),  # exactly at the budget: fits
        (240, 15000, 112, 120),  # 119^2 = 14161
        (224, 15000, 112, 104),
        (224, 14000, 104, 112),  # 110^2 = 12100
        (40, 1, 16, 8),  # never below 16
    ):
        tiles, _ = plan_latent_tiles(size, size, "auto", 0, budget, 1)
        assert tiles == tile_grid(size, size, tile, 0), (size, budget, tile)
        assert tile_grid(size, size, near, 0) != tiles  # so the check can fail
    # attention bytes for the tile's token count come on top: 11 bytes per pixel here
    tokens = []

    def attention(n):
        tokens.append(n)
        return 10 * n

    tiles, _ = plan_latent_tiles(240, 240, "auto", 0, 11 * 127 * 127, 1, attention)
    assert tiles == tile_grid(240, 240, 120, 0) and tokens[:2] == [136 * 136, 127 * 127]
    # without the 128 cap: from the latent side rounded up to 8 (208 here), by 8: 192
    tiles, _ = plan_latent_tiles(205, 205, "auto", 0, 44434, 1, max_tile=None)
    assert tiles == tile_grid(205, 205, 192, 0) and len(tiles) == 4
    # batch: as many tiles as fit the budget, at most max_batch (8) and the tile count
    assert plan_latent_tiles(300, 200, 0, 32, 1, 1) == ([Tile(0, 0, 300, 200)], 1)
    assert plan_latent_tiles(300, 300, 16, 0, 10**9, 1)[1] == 8
    assert plan_latent_tiles(30, 17, 16, 0, 10**9, 1)[1] == 2
    assert plan_latent_tiles(300, 300, 16, 0, 3 * 256, 1)[1] == 3
    assert plan_latent_tiles(300, 300, 16, 0, 1, 1)[1] == 1
    assert plan_latent_tiles(300, 300, 16, 0, 3, 0)[1] == 3  # a zero cost counts as 1 byte
    assert plan_latent_tiles(300, 300, 16, 0, 10**9, 1, max_batch=20)[1] == 20
