"""``UpscaleOptions.size``: an exact output size (what hosts like A1111 ask for)."""

import pytest
import torch
from tiny_models import tiny_generator

from d3sr_core.inference.options import InvalidImageError, UpscaleOptions, output_size, target_size
from d3sr_core.inference.pipeline import D3SRPipeline


@pytest.fixture(scope="module")
def pipeline():
    return D3SRPipeline(tiny_generator())


def test_target_size_prefers_size_over_scale():
    assert target_size(13, 7, UpscaleOptions(scale=3.1)) == output_size(13, 7, 3.1) == (40, 22)
    assert target_size(13, 7, UpscaleOptions(scale=3.1, size=(40, 16))) == (40, 16)


@pytest.mark.parametrize("size", [(40, 16), (17, 9), (64, 8)])
def test_output_has_exactly_the_size(pipeline, size):
    # A1111 asks for floor(side * scale / 8) * 8 per side: (13, 7) x 3.1 -> (40, 16)
    images = torch.rand(1, 3, 7, 13)
    scale = max(size[0] / 13, size[1] / 7)
    out = pipeline.upscale_tensor(images, UpscaleOptions(scale=scale, size=size))
    assert tuple(out.shape) == (1, 3, size[1], size[0])
    assert out.min() >= 0 and out.max() <= 1


def test_size_equal_to_scale_rounding_gives_the_same_result(pipeline):
    images = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    by_scale = pipeline.upscale_tensor(images, UpscaleOptions(scale=2.5))
    by_size = pipeline.upscale_tensor(images, UpscaleOptions(scale=2.5, size=(25, 15)))
    assert torch.equal(by_scale, by_size)


@pytest.mark.parametrize("size", [(0, 10), (10,), (10.0, 5), "40x16", (True, 4)])
def test_invalid_size_rejected(pipeline, size):
    with pytest.raises(InvalidImageError, match="size must be"):
        pipeline.upscale_tensor(torch.rand(1, 3, 4, 4), UpscaleOptions(scale=2, size=size))


def test_size_counts_against_the_output_limit(pipeline):
    options = UpscaleOptions(scale=2, size=(2000, 2000), max_output_pixels=1_000_000)
    with pytest.raises(InvalidImageError, match="above the limit"):
        pipeline.upscale_tensor(torch.rand(1, 3, 4, 4), options)
