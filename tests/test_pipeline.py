import pytest
import torch
from PIL import Image
from tiny_models import tiny_generator

from d3sr_core.inference.options import InvalidImageError, UpscaleOptions, output_size
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleCancelled
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


def test_pil_conversions_written_out():
    import numpy as np

    from d3sr_core.inference.pipeline import pil_to_tensor, tensor_to_pil

    gray = np.array([[0, 255], [128, 1]], dtype=np.uint8)
    got = pil_to_tensor(Image.fromarray(gray))
    assert got.shape == (1, 1, 2, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got[0, 0], torch.tensor(gray / 255.0, dtype=torch.float32))
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    got = pil_to_tensor(Image.fromarray(rgba, "RGBA"))
    expected = torch.tensor(rgba / 255.0, dtype=torch.float32).permute(2, 0, 1)
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(
        pil_to_tensor(Image.fromarray(rgba[..., :3], "RGB"))[0], expected[:3]
    )
    sixteen = np.array([[0, 65535], [1000, 30000]], dtype=np.uint16)
    for mode in ("I;16", "I"):
        image = (
            Image.fromarray(sixteen)
            if mode == "I;16"
            else Image.fromarray(sixteen.astype(np.int32), "I")
        )
        assert image.mode == mode
        torch.testing.assert_close(
            pil_to_tensor(image)[0, 0], torch.tensor(sixteen / 65535.0).float()
        )
    floats = np.array([[0.25, 0.5]], dtype=np.float32)
    torch.testing.assert_close(
        pil_to_tensor(Image.fromarray(floats, "F"))[0, 0], torch.tensor(floats)
    )
    # other modes: RGBA when there is an alpha band or a transparency entry, else RGB
    la = Image.fromarray(np.stack([gray, 255 - gray], -1), "LA")
    assert pil_to_tensor(la).shape == (1, 4, 2, 2)
    pal = Image.fromarray(gray).convert("P")
    assert pil_to_tensor(pal).shape == (1, 3, 2, 2)
    pal.info["transparency"] = 0
    assert pil_to_tensor(pal).shape == (1, 4, 2, 2)
    # back: round half up, clamped; 1 channel -> L (or I;16), 3 -> RGB, 4 -> RGBA
    values = torch.tensor([[[-0.5, 0.3], [0.5, 1.7]]])
    out = tensor_to_pil(values)
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 77], [128, 255]]
    out16 = tensor_to_pil(values[None], sixteen_bit=True)
    assert out16.mode == "I;16" and np.asarray(out16).tolist() == [[0, 19661], [32768, 65535]]
    assert tensor_to_pil(values.expand(3, -1, -1)).mode == "RGB"
    four = tensor_to_pil(values.expand(4, -1, -1)[None])
    assert four.mode == "RGBA" and np.asarray(four)[..., 3].tolist() == [[0, 77], [128, 255]]


def test_tensor_and_latent_entry_points_pass_every_argument_on(pipeline):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    opts = UpscaleOptions(scale=2, color_fix="none")
    seen = []
    out = pipeline.upscale(x, opts, progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (1, 3, 16, 16) and seen and seen[-1][0] == seen[-1][1]
    torch.testing.assert_close(out, pipeline.upscale_tensor(x, opts), atol=0, rtol=0)
    with pytest.raises(UpscaleCancelled):
        pipeline.upscale(x, opts, cancel=lambda: True)
    calls = []

    def decode(raw):
        calls.append("decode")
        return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def encode(image):
        calls.append("encode")
        return torch.zeros(1, 16, image.shape[2] // 8, image.shape[3] // 8)

    seen.clear()
    latent = pipeline.upscale_latent(
        torch.zeros(1, 4, 2, 2), opts, lambda d, t: seen.append(d), None,
        decode_input=decode, encode_output=encode,
    )  # fmt: skip
    assert latent.shape == (1, 16, 4, 4) and calls == ["decode", "encode"] and seen
    with pytest.raises(UpscaleCancelled):
        pipeline.upscale_latent(torch.zeros(1, 4, 2, 2), opts, None, lambda: True)


def test_padding_and_retry_tiles_written_out():
    from d3sr_core.inference.pipeline import _shrink_tile, pad_to_multiple

    def by_index(image, size, reflect):
        """Rows/columns past the border: mirrored (without repeating the edge) or repeated."""
        h, w = image.shape[-2:]

        def src(i, n):
            return i if i < n else (2 * (n - 1) - i if reflect else n - 1)

        rows = [src(i, h) for i in range(size[0])]
        cols = [src(j, w) for j in range(size[1])]
        return image[..., rows, :][..., cols]

    x = torch.rand(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    padded, hw = pad_to_multiple(x, 4)  # pads 2 and 3 < the sides: reflect
    assert hw == (6, 5) and torch.equal(padded, by_index(x, (8, 8), reflect=True))
    small = x[..., :4, :]
    padded, hw = pad_to_multiple(small, 8)  # a pad of 4 rows = the height: replicate
    assert hw == (4, 5) and torch.equal(padded, by_index(small, (8, 8), reflect=False))
    assert pad_to_multiple(x[..., :4, :4], 4)[0].data_ptr() == x.data_ptr()  # nothing to pad
    assert [_shrink_tile(64, s) for s in (1.0, 1.5, 0.5, 0.01)] == [64, 64, 40, 16]
