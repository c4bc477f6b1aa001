"""Colour fix: AdaIN statistics, wavelet band split, banded processing, dispatch."""

import pytest
import torch
from reference import adain_fix, atrous_wavelet_fix

from d3sr_core.inference.color import (
    adain_color_fix,
    apply_color_fix,
    wavelet_color_fix,
    wavelet_decomposition,
)


def _images(seed=0, shape=(2, 3, 48, 40)):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(
        torch.rand(shape[0], shape[1], 6, 5, generator=g), size=shape[2:], mode="bilinear"
    )
    detail = 0.05 * torch.randn(*shape, generator=g)
    return (0.2 + 0.6 * smooth + detail).clamp(0, 1)


def test_adain_gives_the_reference_mean_and_std():
    # Values well inside [0, 1] (no clamping) and stds >> sqrt(eps) (eps = 1e-5 on the variance).
    out = 0.3 + 0.4 * _images(0)
    ref = 0.2 + 0.5 * _images(1)
    fixed = adain_color_fix(out, ref)
    for stat in (lambda t: t.mean(dim=(2, 3)), lambda t: t.flatten(2).std(dim=-1)):
        torch.testing.assert_close(stat(fixed), stat(ref), atol=5e-4, rtol=2e-3)
    assert fixed.shape == out.shape and fixed.dtype == out.dtype


def test_adain_matches_the_textbook_formula():
    out, ref = _images(11), _images(12)
    torch.testing.assert_close(adain_color_fix(out, ref), adain_fix(out, ref), atol=1e-6, rtol=0)


def test_adain_of_a_flat_image_takes_the_reference_mean():
    # std of a flat image is sqrt(eps): the fix leaves only the reference's mean
    flat = torch.full((1, 3, 4, 4), 0.5)
    ref = _images(2, (1, 3, 4, 4))
    fixed = adain_color_fix(flat, ref)
    torch.testing.assert_close(fixed, adain_fix(flat, ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed, ref.mean(dim=(2, 3), keepdim=True).expand_as(ref))


@pytest.mark.parametrize("shape", [(2, 3, 48, 40), (1, 3, 70, 9), (1, 3, 3, 5)])
def test_wavelet_matches_the_textbook_a_trous_fix(shape):
    """Five levels of the 3x3 binomial kernel dilated by 1, 2, 4, 8, 16, edges repeated:
    output - low(output) + low(reference) (reference written out with shifted sums)."""
    out, ref = _images(3, shape), _images(4, shape)
    fixed = wavelet_color_fix(out, ref)
    expected = atrous_wavelet_fix(out, ref)
    assert (expected - out).abs().max() > 0.05  # the fix does something here
    torch.testing.assert_close(fixed, expected, atol=1e-6, rtol=0)


def test_wavelet_keeps_input_low_band_and_output_high_band():
    ref = _images(5)
    # The output = the reference with a colour cast (a low-frequency change) and new fine
    # detail (a high-frequency change): the fix must undo the first and keep the second.
    g = torch.Generator().manual_seed(6)
    texture = 0.03 * torch.randn(ref.shape, generator=g)
    cast = torch.tensor([0.08, -0.05, 0.04]).view(1, 3, 1, 1)
    out = (ref + texture + cast).clamp(0, 1)
    fixed = wavelet_color_fix(out, ref)
    high_fixed, low_fixed = wavelet_decomposition(fixed)
    high_out, _ = wavelet_decomposition(out)
    _, low_ref = wavelet_decomposition(ref)
    # Colour cast removed: the per-channel means are the reference's again.
    assert (fixed.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().max() < 5e-3
    assert (out.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().max() > 0.04
    # Bands: low band ~ the input's, high band ~ the output's (blurring twice is not exact).
    assert (low_fixed - low_ref).abs().mean() < 0.1 * (low_fixed - low_ref.mean()).abs().mean()
    assert (
        torch.nn.functional.cosine_similarity(high_fixed.flatten(), high_out.flatten(), dim=0)
        > 0.95
    )


def test_wavelet_in_bands_equals_whole_image():
    out, ref = _images(7, (1, 3, 150, 37)), _images(8, (1, 3, 150, 37))
    whole = wavelet_color_fix(out, ref, band_rows=10_000)
    for rows in (1, 16, 33, 64):
        torch.testing.assert_close(
            wavelet_color_fix(out, ref, band_rows=rows), whole, atol=1e-6, rtol=0
        )


def test_tiny_images_work():
    for size in ((1, 1), (1, 7), (5, 2)):
        out, ref = torch.rand(1, 3, *size), torch.rand(1, 3, *size)
        for method in ("adain", "wavelet"):
            fixed = apply_color_fix(out, ref, method)
            assert fixed.shape == out.shape and torch.isfinite(fixed).all()


def test_dispatch_and_errors():
    out, ref = _images(9), _images(10)
    assert apply_color_fix(out, ref, "none") is out
    torch.testing.assert_close(apply_color_fix(out, ref, "adain"), adain_color_fix(out, ref))
    with pytest.raises(ValueError, match="color_fix"):
        apply_color_fix(out, ref, "histogram")
    with pytest.raises(ValueError, match="shape"):
        wavelet_color_fix(out, ref[:, :, :10])


def test_fixes_clamp_to_the_unit_range_and_keep_the_dtype():
    """Outputs whose fixed values leave [0, 1] (a wide reference, a high-contrast output)
    equal the textbook fixes clamped; bf16 in gives bf16 out."""
    g = torch.Generator().manual_seed(13)
    out = torch.rand(1, 3, 24, 20, generator=g)
    ref = (0.5 + 3.0 * (torch.rand(1, 3, 24, 20, generator=g) - 0.5)).clamp(-0.2, 1.2)
    for fix, textbook in ((adain_color_fix, adain_fix), (wavelet_color_fix, atrous_wavelet_fix)):
        expected = textbook(out, ref)
        assert expected.min() == 0 and expected.max() == 1, "the case reaches both bounds"
        torch.testing.assert_close(fix(out, ref), expected, atol=1e-6, rtol=0)
        half = fix(out.bfloat16(), ref.bfloat16())
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(
            half.float(), textbook(out.bfloat16(), ref.bfloat16()).bfloat16().float()
        )


def test_adain_of_two_pixel_images_uses_the_unbiased_variance():
    # With 2 pixels per channel the unbiased variance is (a - b)^2 / 2 and eps matters.
    out = torch.tensor([0.2, 0.3, 0.6, 0.61, 0.4, 0.4]).reshape(1, 3, 1, 2)
    ref = torch.tensor([0.5, 0.9, 0.1, 0.12, 0.3, 0.7]).reshape(1, 3, 1, 2)
    torch.testing.assert_close(adain_color_fix(out, ref), adain_fix(out, ref), atol=1e-6, rtol=0)


def test_wavelet_levels_argument_and_float64_input():
    out, ref = _images(14, (1, 3, 40, 33)), _images(15, (1, 3, 40, 33))
    for levels in (2, 3):
        torch.testing.assert_close(
            wavelet_color_fix(out, ref, levels=levels, band_rows=16),
            atrous_wavelet_fix(out, ref, levels),
            atol=1e-6,
            rtol=0,
        )
    image = out.double()
    high, low = wavelet_decomposition(image, 3)
    assert high.dtype == low.dtype == torch.float64
    torch.testing.assert_close(high + low, image, atol=1e-12, rtol=0)
