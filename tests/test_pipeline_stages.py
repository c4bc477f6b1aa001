"""The pipeline's stages and helpers against references written out here (tiny models, fp32):
``encode`` / ``denoise`` / ``decode`` called on their own (outside ``upscale_tensor``) against
diffusers' classes and the closed-form x0, the posterior sample, the default memory budget's
dtype, the progress arithmetic, PIL modes, and the fp16-overflow recomputation."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from reference import SD21_SCHEDULER
from tiny_models import tiny_generator
from torch import nn

from d3sr_core.inference import memory
from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import (
    D3SRPipeline,
    UpscaleCancelled,
    _Progress,
    _shrink_tile,
    _upcast,
    pil_to_tensor,
)
from d3sr_core.models import GeneratorConfig

SCALING = 0.18215  # SD2.x's VAE latent scale (the spec's constant)


def _rand(*shape: int, seed: int = 0, low: float = 0.0) -> torch.Tensor:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    return x * (1 - low) + low  # [low, 1]


@torch.no_grad()
def test_stages_called_on_their_own_match_diffusers():
    """Outside ``upscale_tensor`` (default options): E(x).mode() * 0.18215, the UNet at the
    checkpoint's timestep with x0 from the scheduler's alphas_cumprod, D(z / 0.18215)."""
    for prediction, timestep in (("epsilon", 399), ("v_prediction", 700)):
        g = tiny_generator(GeneratorConfig(prediction_type=prediction, timestep=timestep))
        pipe = D3SRPipeline(g)
        x = _rand(1, 3, 24, 32, seed=1, low=-1.0)
        latent = pipe.encode(x)
        expected = g.vae.encode(x).latent_dist.mode() * SCALING
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=0)
        x0 = pipe.denoise(latent)
        t = torch.tensor([timestep])
        out = g.unet(latent, t, encoder_hidden_states=g.prompt_embeds).sample
        abar = SD21_SCHEDULER.alphas_cumprod[timestep].double()
        a, s = abar.sqrt().float(), (1 - abar).sqrt().float()
        expected = (latent - s * out) / a if prediction == "epsilon" else a * latent - s * out
        torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)
        image = pipe.decode(x0)
        expected = g.vae.decode(x0 / SCALING).sample.clamp(-1, 1)
        assert (g.vae.decode(x0 / SCALING).sample.abs() > 1).any()  # the clamp matters
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_posterior_sample_written_out():
    """``latent_mode="sample"``: (mean + exp(logvar / 2) * noise) * 0.18215 with the noise
    drawn from the caller's generator."""
    g = tiny_generator(GeneratorConfig(latent_mode="sample"))
    x = _rand(1, 3, 40, 48, seed=2, low=-1.0)
    latent = D3SRPipeline(g).encode(x, torch.Generator().manual_seed(5))
    dist = g.vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    std = torch.exp(0.5 * dist.logvar)
    expected = (dist.mean + std * noise) * SCALING
    assert (std * noise).abs().max() > 1e-2  # the noise term matters
    torch.testing.assert_close(latent, expected, atol=1e-5, rtol=0)


def test_default_budget_follows_the_widest_floating_point_weights(monkeypatch):
    """The default budget is the CPU cap of the widest floating-point dtype among the UNet's
    and the VAE's weights (half precision: the larger cap); modules without parameters or
    with integer ones do not count."""
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**40)
    full, half = memory.CPU_BUDGET_CAP_BYTES, memory.CPU_BUDGET_CAP_BYTES_HALF
    assert full != half

    def module(dtype: torch.dtype | None) -> nn.Module:
        m = nn.Module()
        if dtype is not None:
            m.weight = nn.Parameter(torch.zeros(2, dtype=dtype), requires_grad=False)
        return m

    def budget(unet: torch.dtype | None, vae: torch.dtype | None, given=None) -> int:
        g = SimpleNamespace(unet=module(unet), vae=module(vae), device=torch.device("cpu"))
        return D3SRPipeline(g)._budget(given)

    assert budget(torch.float32, torch.float32) == full
    assert budget(torch.bfloat16, torch.float16) == half
    assert budget(torch.bfloat16, torch.float32) == full  # an fp32 VAE next to a bf16 UNet
    assert budget(None, torch.float16) == half
    assert budget(torch.int64, torch.bfloat16) == half
    assert budget(None, None) == full  # nothing known: fp32
    assert budget(torch.bfloat16, torch.bfloat16, 12345) == 12345


def test_progress_reports_each_new_step_of_the_weighted_stages():
    """25 / 20 / 55 % of each image for encode / denoise / decode; a report only when the
    integer count grows; fractions are clamped to the stage."""
    seen = []
    p = _Progress(2, lambda d, t: seen.append((d, t)), None)
    tick = p.stage("encode")
    tick(0.05)  # int(25 * 0.05) = 1
    tick(0.05)
    tick(0.5)
    tick(-1.0)
    tick(3.0)
    tick = p.stage("denoise")
    tick(0.5)
    tick = p.stage("decode")
    tick(0.999)
    tick(1.0)
    tick = p.stage("encode")  # the second image
    tick(0.2)
    assert seen == [(1, 200), (12, 200), (25, 200), (35, 200), (99, 200), (100, 200), (105, 200)]
    with pytest.raises(UpscaleCancelled, match="^upscale cancelled$"):
        _Progress(1, None, lambda: True).check()
    _Progress(1, None, lambda: False).check()


def test_pil_modes_written_out():
    """16-bit gray in either byte order -> one channel / 65535; other modes -> PIL's RGB."""
    values = np.array([[0, 65535, 1000], [30000, 7, 40000]], dtype=np.uint16)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):
        image = Image.frombytes(mode, (3, 2), values.astype(dtype).tobytes())
        assert image.mode == mode
        got = pil_to_tensor(image)
        assert got.shape == (1, 1, 2, 3) and got.dtype == torch.float32
        torch.testing.assert_close(got[0, 0], torch.tensor(values / 65535.0).float())
    rgb = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 9).astype(np.uint8)
    for mode in ("CMYK", "YCbCr", "1"):
        image = Image.fromarray(rgb, "RGB").convert(mode)
        expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        got = pil_to_tensor(image)
        assert got.shape == (1, 3, 2, 3)
        torch.testing.assert_close(got[0], torch.tensor(expected).permute(2, 0, 1))


def test_pil_upscale_passes_progress_and_cancel_on():
    pipe = D3SRPipeline(tiny_generator())
    image = Image.fromarray((np.arange(48).reshape(4, 4, 3) * 5).astype(np.uint8), "RGB")
    options = UpscaleOptions(scale=2, color_fix="none", tile_size=None, vae_tile_size=None)
    seen = []
    out = pipe.upscale(image, options, progress=lambda d, t: seen.append((d, t)))
    assert out.size == (8, 8) and seen and seen[-1] == (100, 100)
    with pytest.raises(UpscaleCancelled):
        pipe.upscale(image, options, cancel=lambda: True)


def test_retry_tile_keeps_the_given_size_at_full_budget():
    # VAE tiles need not be multiples of 8: at shrink 1 the user's size is used as given
    assert [_shrink_tile(t, 1.0) for t in (36, 70, 64)] == [36, 70, 64]


def test_upcast_restores_the_dtype_and_lets_errors_through():
    m = nn.Linear(2, 2).half()
    with _upcast(m) as inner:
        assert inner is m and m.weight.dtype == torch.float32
    assert m.weight.dtype == torch.float16
    with pytest.raises(KeyError), _upcast(m):
        raise KeyError("inside")
    assert m.weight.dtype == torch.float16


def _overflowing(g: nn.Module) -> nn.Module:
    """``g`` with first convolutions whose largest weight is 6e4 and bias 6.4e4: their
    outputs overflow float16 (max 65504), float32 is fine (GroupNorm brings it back)."""
    with torch.no_grad():
        for conv in (g.unet.conv_in, g.vae.encoder.conv_in, g.vae.decoder.conv_in):
            conv.weight.mul_(6e4 / conv.weight.abs().max())
            conv.bias.fill_(6.4e4)
    return g


@torch.no_grad()
@pytest.mark.parametrize("vae_tile_size", [None, 32])
def test_half_precision_overflow_is_recomputed_in_fp32(vae_tile_size, caplog):
    """A float16 UNet / VAE whose activations overflow: each stage is redone in fp32 (and
    says so), so the result is the fp32 result of the same weights; the weights stay fp16."""
    half = _overflowing(tiny_generator()).half()
    full = copy.deepcopy(half).float()  # the same (fp16-rounded) weights, in fp32
    x = _rand(1, 3, 10, 12, seed=3)
    options = UpscaleOptions(
        scale=4, color_fix="none", tile_size=None, vae_tile_size=vae_tile_size,
        vae_attention_window=None, memory_budget_bytes=2**30,
    )  # fmt: skip
    expected = D3SRPipeline(full).upscale_tensor(x, options)
    assert torch.isfinite(expected).all()
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = D3SRPipeline(half).upscale_tensor(x, options)
    # the encoder's input and the prompt embedding are rounded to fp16 first: 1e-4 apart
    torch.testing.assert_close(out, expected, atol=5e-4, rtol=0)
    logged = {r.getMessage() for r in caplog.records}
    assert "the VAE encode overflowed in torch.float16; recomputing in fp32" in logged
    assert "the UNet overflowed in torch.float16; recomputing this tile in fp32" in logged
    assert "the VAE decode overflowed in torch.float16; recomputing in fp32" in logged
    assert half.dtype == torch.float16 and next(half.vae.parameters()).dtype == torch.float16


def test_rgb_stays_rgb_whatever_its_transparency_entry():
    """RGB and RGBA images are read as they are (an RGB colour key does not become alpha)."""
    rgb = Image.fromarray((np.arange(18).reshape(2, 3, 3) * 13).astype(np.uint8), "RGB")
    rgb.info["transparency"] = (0, 13, 26)
    got = pil_to_tensor(rgb)
    assert got.shape == (1, 3, 2, 3)
    torch.testing.assert_close(
        got[0].permute(1, 2, 0), torch.tensor(np.asarray(rgb) / 255.0).float()
    )


class _OnMPS(D3SRPipeline):
    """A pipeline that reports an MPS device (only the attention-cost estimate reads it)."""

    @property
    def device(self) -> torch.device:
        return torch.device("mps")


def test_attention_score_matrix_is_counted_only_on_mps():
    """MPS materialises the score matrix: n^2 * heads * bytes (heads = the UNet config's
    largest ``attention_head_dim``, 8 when it has none); other devices need none."""
    g = tiny_generator()  # attention_head_dim [2, 2, 4, 4], fp32
    assert D3SRPipeline(g)._attention_cost() is None
    cost = _OnMPS(g)._attention_cost()
    assert [cost(n) for n in (1, 64, 100)] == [n * n * 4 * 4 for n in (1, 64, 100)]
    g.unet.to(torch.bfloat16)
    assert _OnMPS(g)._attention_cost()(64) == 64 * 64 * 4 * 2
    other = SimpleNamespace(unet=nn.Linear(1, 1), dtype=torch.float16)  # no UNet config
    assert _OnMPS(other)._attention_cost()(64) == 64 * 64 * 8 * 2


@torch.no_grad()
def test_posterior_log_variance_is_clamped_like_diffusers():
    """log-variances outside [-30, 20] are clamped before exp(logvar / 2), as diffusers'
    DiagonalGaussianDistribution does (mean 0 here, so the latent is std * noise * 0.18215)."""
    g = tiny_generator(GeneratorConfig(latent_mode="sample"))
    conv = g.vae.quant_conv
    conv.weight.zero_()
    conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -35.0, -29.0, 19.0, 25.0]))
    x = _rand(1, 3, 16, 16, seed=4, low=-1.0)
    latent = D3SRPipeline(g).encode(x, torch.Generator().manual_seed(6))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(6))
    std = torch.exp(0.5 * torch.tensor([-30.0, -29.0, 19.0, 20.0])).view(1, 4, 1, 1)
    torch.testing.assert_close(latent, std * noise * SCALING, rtol=1e-5, atol=0)
    dist = g.vae.encode(x).latent_dist
    torch.testing.assert_close(latent, dist.std * noise * SCALING, rtol=1e-5, atol=0)


def test_padding_replicates_when_either_side_is_too_small_to_reflect():
    """A pad as wide as the image cannot be reflected: both sides repeat their last row /
    column (a 6x4 image to 8x8: 2 rows, 4 columns)."""
    from d3sr_core.inference.pipeline import pad_to_multiple

    x = torch.rand(1, 2, 6, 4, generator=torch.Generator().manual_seed(3))
    padded, hw = pad_to_multiple(x, 8)
    rows = [0, 1, 2, 3, 4, 5, 5, 5]
    cols = [0, 1, 2, 3, 3, 3, 3, 3]
    assert hw == (6, 4) and torch.equal(padded, x[..., rows, :][..., cols])


@torch.no_grad()
def test_half_precision_without_overflow_is_not_recomputed(caplog):
    """Finite fp16 results are kept (no fp32 recomputation, no warning)."""
    g = tiny_generator().half()
    x = _rand(1, 3, 4, 5, seed=5)
    options = UpscaleOptions(
        scale=4, color_fix="none", tile_size=None, vae_tile_size=None,
        vae_attention_window=None, memory_budget_bytes=2**30,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = D3SRPipeline(g).upscale_tensor(x, options)
    assert torch.isfinite(out).all()
    assert [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()] == []


@torch.no_grad()
def test_denoise_runs_the_feed_forward_in_chunks_of_the_documented_size(monkeypatch):
    """The UNet stage wraps every transformer block's feed-forward in chunks of
    FEED_FORWARD_CHUNK positions (here 7, so the tiny UNet's 12x16 latent is chunked), with
    the same result as the whole feed-forward, and puts the modules back afterwards."""
    from d3sr_core.inference import pipeline

    g = tiny_generator(GeneratorConfig())
    pipe = D3SRPipeline(g)
    latent = _rand(1, 4, 12, 16, seed=2, low=-1.0)
    whole = pipe.denoise(latent)
    blocks = [m for m in g.unet.modules() if hasattr(m, "ff")]
    originals = [b.ff for b in blocks]
    seen = []
    for b in blocks:
        b.ff.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    monkeypatch.setattr(pipeline, "FEED_FORWARD_CHUNK", 7)
    chunked = pipe.denoise(latent)
    assert blocks and max(seen) == 7
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert [b.ff for b in blocks] == originals
