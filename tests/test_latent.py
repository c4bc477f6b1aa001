"""D3SRPipeline.upscale_latent: raw latents in, raw SR latents out, against the formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_CONTEXT_DIM, tiny_generator

from d3sr_core.inference.color import apply_color_fix
from d3sr_core.inference.latent import latent_output_shape
from d3sr_core.inference.options import InvalidImageError, UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleCancelled

UNTILED = {"tile_size": None, "vae_tile_size": None}


@pytest.fixture(scope="module")
def pipeline():
    return D3SRPipeline(tiny_generator())


def reference_sr_latent(g, raw, scale, embeds=None):
    """The stages written out with the plain diffusers modules (no tiling, no pipeline)."""
    with torch.no_grad():
        low = (g.vae.decode(raw).sample.clamp(-1, 1) + 1) / 2
        h, w = low.shape[-2:]
        size = (math.floor(h * scale + 0.5), math.floor(w * scale + 0.5))
        ref = F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        ph, pw = (-size[0]) % 8, (-size[1]) % 8
        padded = F.pad(ref, (0, pw, 0, ph), mode="reflect")
        sf = g.config.scaling_factor
        z = g.vae.encode(padded * 2 - 1).latent_dist.mode() * sf
        cond = g.prompt_embeds if embeds is None else embeds
        t = torch.tensor([g.config.timestep])
        eps = g.unet(z, t, encoder_hidden_states=cond).sample
        ab = g.alpha_bar
        x0 = (z - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        return x0 / sf, ref


def test_output_shape_rule():
    assert latent_output_shape((1, 4, 4, 5), 2) == (8, 10)
    assert latent_output_shape((1, 4, 4, 5), 1.5) == (6, 8)  # 60 px -> ceil(7.5) latent px
    assert latent_output_shape((1, 4, 3, 3), 4, compression=16) == (24, 24)


@pytest.mark.parametrize("scale", [2, 1.5])
def test_same_family_matches_formula(pipeline, scale):
    raw = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    out = pipeline.upscale_latent(raw, UpscaleOptions(scale=scale, **UNTILED))
    expected, _ = reference_sr_latent(pipeline.generator, raw, scale)
    assert out.shape == (1, 4, *latent_output_shape(raw.shape, scale))
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_tiled_matches_untiled_and_batch(pipeline):
    raw = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    whole = pipeline.upscale_latent(raw, UpscaleOptions(scale=2, **UNTILED))
    # VAE tiles keep whole-image GroupNorm statistics: same result (UNet tiles blend, not exact)
    tiled = pipeline.upscale_latent(raw, UpscaleOptions(scale=2, tile_size=None, vae_tile_size=32))
    torch.testing.assert_close(tiled, whole, atol=2e-3, rtol=0)
    single = pipeline.upscale_latent(raw[1:], UpscaleOptions(scale=2, **UNTILED))
    torch.testing.assert_close(whole[1:], single, atol=1e-5, rtol=0)


def test_external_decoder_and_encoder(pipeline):
    g = pipeline.generator
    raw = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    calls = []

    def decode_input(latent):
        calls.append(("decode", tuple(latent.shape)))
        return (g.vae.decode(latent).sample.clamp(-1, 1) + 1) / 2

    def encode_output(image):  # stands in for another family's VAE: 4x4 pooled, 16 channels
        calls.append(("encode", tuple(image.shape)))
        return F.avg_pool2d(image, 4).repeat(1, 6, 1, 1)[:, :16]

    opts = UpscaleOptions(scale=2, color_fix="adain", **UNTILED)
    out = pipeline.upscale_latent(raw, opts, decode_input=decode_input, encode_output=encode_output)
    assert calls == [("decode", (1, 4, 4, 4)), ("encode", (1, 3, 64, 64))]
    x0, ref = reference_sr_latent(g, raw, 2)
    with torch.no_grad():
        sr = (g.vae.decode(x0).sample.clamp(-1, 1) + 1) / 2
    expected = encode_output(apply_color_fix(sr, ref, "adain"))
    assert out.shape == (1, 16, 16, 16)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    # a 16-channel latent is fine when the caller decodes it
    wide = torch.zeros(1, 16, 2, 2)
    out = pipeline.upscale_latent(
        wide, opts, decode_input=lambda z: torch.full((1, 3, 16, 16), 0.5), encode_output=None
    )
    assert out.shape == (1, 4, 4, 4)


def test_prompt_embeds_override_is_per_call(pipeline):
    g = pipeline.generator
    stored = g.prompt_embeds.clone()
    other = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(5))
    raw = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    out = pipeline.upscale_latent(raw, UpscaleOptions(scale=2, prompt_embeds=other, **UNTILED))
    expected, _ = reference_sr_latent(g, raw, 2, embeds=other)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(g.prompt_embeds, stored)  # restored after the call
    image = torch.rand(1, 3, 8, 8)
    with_other = pipeline.upscale_tensor(image, UpscaleOptions(scale=2, prompt_embeds=other))
    assert torch.equal(g.prompt_embeds, stored)
    plain = pipeline.upscale_tensor(image, UpscaleOptions(scale=2))
    assert (with_other - plain).abs().max() > 1e-4
    with pytest.raises(InvalidImageError, match="width 8 does not match the UNet's context 32"):
        pipeline.upscale_tensor(image, UpscaleOptions(scale=2, prompt_embeds=torch.zeros(1, 77, 8)))
    with pytest.raises(InvalidImageError, match="prompt_embeds must be a float tensor"):
        pipeline.upscale_tensor(image, UpscaleOptions(scale=2, prompt_embeds=[1, 2]))
    assert torch.equal(g.prompt_embeds, stored)


def test_progress_per_tile_and_cancel_leaves_pipeline_usable(pipeline):
    raw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    opts = UpscaleOptions(scale=2, tile_size=64, tile_overlap=16, vae_tile_size=32)
    ticks = []
    pipeline.upscale_latent(raw, opts, progress=lambda d, t: ticks.append((d, t)))
    done = [d for d, _ in ticks]
    assert done == sorted(set(done)) and ticks[-1][0] == ticks[-1][1] == 100  # 55 + 25 + 20
    assert len(ticks) > 6  # several UNet and VAE tiles report
    calls = []
    with pytest.raises(UpscaleCancelled):
        pipeline.upscale_latent(raw, opts, cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3  # stopped at the first check that said yes
    again = pipeline.upscale_latent(raw, UpscaleOptions(scale=2, **UNTILED))
    assert again.shape == (1, 4, 16, 16) and pipeline._run is None


@pytest.mark.parametrize(
    "latent, match",
    [
        (torch.zeros(1, 4, 2, 4, 4), "video / 3-D latents"),
        (torch.zeros(1, 16, 4, 4), "16 channels; D3SR's SD2.1 VAE decodes 4-channel"),
        (torch.zeros(0, 4, 4, 4), "expected a latent tensor"),
        (torch.full((1, 4, 2, 2), float("nan")), "NaN"),
    ],
)
def test_bad_latents_are_refused(pipeline, latent, match):
    with pytest.raises(InvalidImageError, match=match):
        pipeline.upscale_latent(latent, UpscaleOptions(scale=2))


def test_output_limit(pipeline):
    with pytest.raises(InvalidImageError, match="above the limit"):
        pipeline.upscale_latent(
            torch.zeros(1, 4, 64, 64), UpscaleOptions(scale=4, max_output_pixels=1_000_000)
        )


def test_latent_space_matches(pipeline):
    from tiny_models import tiny_vae

    from d3sr_core.inference.latent import latent_space_matches, probe_image

    assert probe_image().shape == (1, 3, 64, 64)
    g = pipeline.generator

    def encoder(vae):
        return lambda img: vae.encode(img * 2 - 1).latent_dist.mode()

    assert latent_space_matches(pipeline, encoder(g.vae))
    assert not latent_space_matches(pipeline, encoder(tiny_vae(seed=7)))  # other weights
    assert not latent_space_matches(pipeline, lambda img: torch.zeros(1, 16, 8, 8))
    # the scaled latent (x 0.18215) is not the raw space ComfyUI passes around
    assert not latent_space_matches(pipeline, lambda img: encoder(g.vae)(img) * 0.18215)


def test_generator_built_under_inference_mode():
    """Hosts (ComfyUI runs every node under torch.inference_mode) load and move weights as
    inference tensors, which have no version counter; the pipeline must still run."""
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    opts = UpscaleOptions(scale=2, color_fix="none", **UNTILED)
    expected = D3SRPipeline(tiny_generator()).upscale_tensor(image, opts)
    with torch.inference_mode():
        g = tiny_generator()
        assert next(g.vae.parameters()).is_inference()
        out = D3SRPipeline(g).upscale_tensor(image, opts)
        again = D3SRPipeline(g).upscale_latent(torch.zeros(1, 4, 2, 2), opts)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert again.shape == (1, 4, 4, 4)


def _fake_pipeline(vae_config) -> object:
    """What validate_latents reads of a pipeline: the generator's VAE config (or none)."""
    from types import SimpleNamespace

    vae = SimpleNamespace() if vae_config is None else SimpleNamespace(config=vae_config)
    return SimpleNamespace(generator=SimpleNamespace(vae=vae))


def test_latent_refusals_state_the_whole_problem():
    from types import SimpleNamespace

    from d3sr_core.inference.latent import validate_latents

    sd = _fake_pipeline(SimpleNamespace(latent_channels=4))
    opts = UpscaleOptions(scale=2)
    cases = [
        ([[0.0]], sd, "expected a latent tensor [B, C, h, w], got list"),
        (
            torch.zeros(1, 4, 2, 4, 4),
            sd,
            "video / 3-D latents (shape (1, 4, 2, 4, 4)) are not supported: D3SR upscales "
            "images; decode the video and upscale its frames as an IMAGE batch",
        ),
        (torch.zeros(1, 4, 0, 4), sd, "expected a latent tensor [B, C, h, w], got (1, 4, 0, 4)"),
        (
            torch.zeros(1, 4, 4, 4),
            _fake_pipeline(SimpleNamespace(latent_channels=16)),  # the VAE's own channel count
            "this latent has 4 channels; D3SR's SD2.1 VAE decodes 16-channel latents "
            "(SD1.x/SD2.x). Connect the VAE that made this latent.",
        ),
        (
            torch.zeros(1, 4, 4, 4),
            _fake_pipeline(None),  # a VAE without a config: 4 channels
            "latent contains NaN or infinite values",
        ),
    ]
    cases[-1][0][0, 0, 0, 0] = float("inf")
    for latent, pipe, message in cases:
        with pytest.raises(InvalidImageError) as err:
            validate_latents(pipe, latent, opts, external_decoder=False)
        assert str(err.value) == message
    # an external decoder takes any channel count and skips the pixel estimate
    big = torch.zeros(1, 16, 107, 162)
    limit = UpscaleOptions(scale=4, max_output_pixels=6_250_001)
    assert validate_latents(sd, big.double(), limit, external_decoder=True).dtype == torch.float32
    # the SR latent is 428 x 648 -> 3424 x 5184 pixels = 17 750 016
    with pytest.raises(InvalidImageError) as err:
        validate_latents(sd, big[:, :4], limit, external_decoder=False)
    assert str(err.value) == (
        "output would be about 5184x3424 = 17.8 MP, above the limit of 6.3 MP"
    )
    exact = UpscaleOptions(scale=4, max_output_pixels=17_750_016)
    assert validate_latents(sd, big[:, :4], exact, external_decoder=False).shape == big[:, :4].shape


@pytest.mark.parametrize(
    "returned, got",
    [
        (torch.zeros(1, 4, 8, 8), "(1, 4, 8, 8)"),
        (torch.zeros(1, 3, 8), "(1, 3, 8)"),
        ("an image", "str"),
    ],
)
def test_decode_input_must_return_one_rgb_image(pipeline, returned, got):
    with pytest.raises(InvalidImageError) as err:
        pipeline.upscale_latent(torch.zeros(1, 4, 2, 2), decode_input=lambda raw: returned)
    assert str(err.value) == f"decode_input must return an image [1, 3, H, W] in [0, 1], got {got}"


def test_probe_image_is_the_documented_pattern():
    from d3sr_core.inference.latent import probe_image

    n = 9
    expected = torch.zeros(1, 3, n, n)
    for i in range(n):
        for j in range(n):
            y, x = i / (n - 1), j / (n - 1)
            blob = math.exp(-((x - 0.35) ** 2 + (y - 0.6) ** 2) / 0.04)
            expected[0, :, i, j] = torch.tensor(
                [x, y * (1 - x), 0.5 * blob + 0.25 * (1 + math.sin(6 * x * y))]
            )
    torch.testing.assert_close(probe_image(n), expected, atol=1e-6, rtol=0)
