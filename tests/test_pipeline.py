import pytest
import torch
from PIL import Image
from tiny_models import tiny_generator

from d3sr_core.inference.pipeline import (
    D3SRPipeline,
    InvalidImageError,
    UpscaleCancelled,
    UpscaleOptions,
    output_size,
)
from d3sr_core.models import GeneratorConfig


@pytest.fixture(scope="module")
def pipeline():
    return D3SRPipeline(tiny_generator())


def opts(scale, **kw):
    # colour fix / tiling defaults are exercised elsewhere; keep these tests about geometry
    return UpscaleOptions(scale=scale, **kw)


def test_output_size_rounds_half_up():
    assert output_size(5, 3, 1.5) == (8, 5)  # 7.5 -> 8 and 4.5 -> 5 (Python's round gives 8 and 4)
    assert output_size(1, 1, 2.5) == (3, 3)
    assert output_size(7, 9, 4) == (28, 36)


@pytest.mark.parametrize("scale", [1.5, 2, 3, 4])
@pytest.mark.parametrize("size", [(13, 7), (9, 16)])
def test_output_size_exact_for_odd_sizes(pipeline, scale, size):
    w, h = size
    out = pipeline.upscale_tensor(torch.rand(1, 3, h, w), opts(scale))
    assert tuple(out.shape) == (1, 3, *output_size(w, h, scale)[::-1])
    # values: test_reference_pipeline.py


def test_pil_modes_are_preserved(pipeline):
    rgba = Image.new("RGBA", (10, 6), (200, 30, 40, 77))
    out = pipeline.upscale(rgba, opts(2))
    assert out.mode == "RGBA" and out.size == (20, 12)
    assert abs(out.getpixel((5, 5))[3] - 77) <= 1  # alpha carried over
    gray = Image.new("L", (7, 5), 128)
    out = pipeline.upscale(gray, opts(2))
    assert out.mode == "L" and out.size == (14, 10)
    g16 = Image.new("I;16", (6, 6))
    out = pipeline.upscale(g16, opts(2))
    assert out.mode == "I;16" and out.size == (12, 12)


def test_batch_equals_single_images(pipeline):
    x = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    both = pipeline.upscale_tensor(x, opts(2))
    torch.testing.assert_close(both[1:], pipeline.upscale_tensor(x[1:], opts(2)), atol=1e-5, rtol=0)


def test_deterministic_and_seeded_sampling():
    pipe = D3SRPipeline(tiny_generator(GeneratorConfig(latent_mode="sample")))
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe.upscale_tensor(x, opts(2, seed=3))
    assert torch.equal(a, pipe.upscale_tensor(x, opts(2, seed=3)))
    assert not torch.equal(a, pipe.upscale_tensor(x, opts(2, seed=4)))


def test_progress_and_cancel(pipeline):
    seen = []
    pipeline.upscale_tensor(
        torch.rand(2, 3, 8, 8), opts(2), progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(UpscaleCancelled):
        pipeline.upscale_tensor(torch.rand(1, 3, 8, 8), opts(2), cancel=lambda: True)


@pytest.mark.parametrize(
    "images,scale,match",
    [
        (torch.rand(1, 3, 0, 5), 2, "empty"),
        (torch.full((1, 3, 4, 4), float("nan")), 2, "NaN"),
        (torch.rand(1, 3, 4, 4), 1.0, "scale"),
        (torch.rand(1, 3, 4, 4), 0.5, "scale"),
        (torch.rand(1, 2, 4, 4), 2, "C in"),
        (torch.rand(1, 3, 4000, 4000), 8, "above the limit"),
    ],
)
def test_bad_input_gets_a_clear_error(pipeline, images, scale, match):
    with pytest.raises(InvalidImageError, match=match):
        pipeline.upscale_tensor(images, opts(scale))
