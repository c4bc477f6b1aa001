"""The pipeline's other paths, each against a reference written out here or in
``tests/reference.py`` (tiny models, fp32): a VAE the tiled path does not know (diffusers'
modules), out-of-memory messages per stage, progress inside a tiled VAE stage, the UNet tile
overlap in latent pixels."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from reference import SD21_SCHEDULER, bicubic_resize, reference_upscale
from tiny_models import tiny_generator, tiny_prompt_embeds
from torch import nn

from d3sr_core.inference import tiled_vae
from d3sr_core.inference.options import InvalidImageError, UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleCancelled
from d3sr_core.models import GeneratorConfig

SCALING = 0.18215


class WrappedVAE(nn.Module):
    """diffusers' ``encode`` / ``decode`` of an inner VAE behind a structure the tiled VAE
    does not recognise (no ``encoder`` / ``decoder`` attributes)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.inner = vae

    def encode(self, x, return_dict=True):
        return self.inner.encode(x, return_dict=return_dict)

    def decode(self, z, return_dict=True):
        return self.inner.decode(z, return_dict=return_dict)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _options(**kw) -> UpscaleOptions:
    base = dict(scale=4, color_fix="none", tile_size=None, vae_attention_window=None)
    return UpscaleOptions(**{**base, "memory_budget_bytes": 2**30, **kw})


@pytest.mark.parametrize("vae_tile_size", [None, 0, 32, "auto"])
def test_unknown_vae_structure_runs_diffusers_modules(vae_tile_size, caplog):
    g = tiny_generator()
    vae = g.vae
    g.vae = WrappedVAE(vae)
    assert not tiled_vae.is_supported(g.vae)
    x = _image(6, 5, seed=1)
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = D3SRPipeline(g).upscale_tensor(x, _options(vae_tile_size=vae_tile_size))
    cfg = g.config
    expected = reference_upscale(
        g.unet, vae, g.prompt_embeds, x, 4, cfg.timestep, cfg.prediction_type
    )
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)
    warned = "this VAE's structure is not supported by the tiled VAE; running it whole"
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ([] if vae_tile_size in (None, 0) else [warned] * 2)  # encode, decode


@torch.no_grad()
def test_unknown_vae_structure_samples_the_posterior_with_the_seed():
    """``latent_mode="sample"`` through diffusers' modules: the noise comes from the seed."""
    g = tiny_generator(GeneratorConfig(latent_mode="sample"))
    vae = g.vae
    g.vae = WrappedVAE(vae)
    x = _image(4, 6, seed=2)
    out = D3SRPipeline(g).upscale_tensor(x, _options(seed=11, vae_tile_size=None))
    # the same chain written out: the posterior sample replaces E(x).mode()
    up = bicubic_resize(x, 16, 24).clamp(0, 1) * 2 - 1
    dist = vae.encode(up).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(11))
    z = (dist.mean + dist.std * noise) * SCALING
    t = torch.tensor([g.config.timestep])
    eps = g.unet(z, t, encoder_hidden_states=g.prompt_embeds).sample
    abar = SD21_SCHEDULER.alphas_cumprod[g.config.timestep].double()
    x0 = (z - (1 - abar).sqrt().float() * eps) / abar.sqrt().float()
    expected = ((vae.decode(x0 / SCALING).sample.clamp(-1, 1) + 1) / 2).clamp(0, 1)
    assert (dist.std * noise).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)


@torch.no_grad()
def test_unknown_vae_structure_overflow_is_recomputed_in_fp32(caplog):
    g = tiny_generator()
    with torch.no_grad():
        for conv in (g.vae.encoder.conv_in, g.vae.decoder.conv_in):
            conv.weight.mul_(6e4 / conv.weight.abs().max())
            conv.bias.fill_(6.4e4)  # overflows float16 (max 65504)
    g.vae = WrappedVAE(g.vae).half()
    full = copy.deepcopy(g)
    full.vae.float()
    x = _image(4, 4, seed=3)
    expected = D3SRPipeline(full).upscale_tensor(x, _options(vae_tile_size=None))
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = D3SRPipeline(g).upscale_tensor(x, _options(vae_tile_size=None))
    torch.testing.assert_close(out, expected, atol=5e-4, rtol=0)  # fp16-rounded VAE input
    logged = {r.getMessage() for r in caplog.records}
    assert "the VAE encode overflowed in torch.float16; recomputing in fp32" in logged
    assert "the VAE decode overflowed in torch.float16; recomputing in fp32" in logged
    assert next(g.vae.parameters()).dtype == torch.float16


@pytest.mark.parametrize("stage", ["encode", "decode"])
@pytest.mark.parametrize("vae_tile_size", [None, "auto", 32])
def test_out_of_memory_in_a_vae_stage_names_it(monkeypatch, caplog, stage, vae_tile_size):
    """The first attempt runs out of memory: the warning names the stage, the retry gives
    the same image; with "auto" it runs tiled (never whole again), with None whole."""
    pipe = D3SRPipeline(tiny_generator())
    x = _image(6, 7, seed=4)
    options = _options(vae_tile_size=vae_tile_size)
    expected = pipe.upscale_tensor(x, options)
    calls = []
    names = [f"whole_{stage}", f"tiled_{stage}"]
    for name in names:
        real = getattr(tiled_vae, name)

        def flaky(*a, _real=real, _name=name, **k):
            calls.append(_name)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("out of memory (planted)")
            return _real(*a, **k)

        monkeypatch.setattr(tiled_vae, name, flaky)
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = pipe.upscale_tensor(x, options)
    what = "VAE encode" if stage == "encode" else "VAE decode"
    assert f"{what} ran out of memory (out of memory (planted))" in caplog.text
    assert calls[0] == f"{'tiled' if vae_tile_size == 32 else 'whole'}_{stage}"
    assert calls[1] == f"{'whole' if vae_tile_size is None else 'tiled'}_{stage}"
    # the retry's tiles are smaller: other convolution shapes, other fp32 rounding (1.2e-5
    # at one pixel with diffusers 0.42.1; an 8-bit level is 3.9e-3)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_tiled_vae_stages_report_progress_per_tile():
    """Tiled encode and decode each report several steps within their share (25 and 55 %)."""
    pipe = D3SRPipeline(tiny_generator())
    seen = []
    options = _options(vae_tile_size=32, scale=4)
    pipe.upscale_tensor(_image(16, 16), options, progress=lambda d, t: seen.append(d))
    assert seen[-1] == 100
    encode = [d for d in seen if d < 25]
    decode = [d for d in seen if 45 < d < 100]
    assert len(encode) >= 3 and len(decode) >= 3, seen


def test_unet_tile_overlap_is_whole_latent_pixels():
    """``tile_overlap`` (output pixels) is rounded down to latent pixels: 20 and 16 px give
    the same tiles (2 latent px), so the same image; 24 px (3) another one."""
    pipe = D3SRPipeline(tiny_generator())
    x = _image(10, 40, seed=5)  # a 5x20 latent, 8-wide tiles

    def run(overlap: int) -> torch.Tensor:
        return pipe.upscale_tensor(
            x, _options(tile_size=64, tile_overlap=overlap, vae_tile_size=None)
        )

    sixteen = run(16)
    assert torch.equal(run(20), sixteen)
    assert not torch.equal(run(24), sixteen)


def _unet_tiles(pipe: D3SRPipeline, monkeypatch, fail_first: bool = False) -> list:
    """Spy on the UNet calls: the latent shape ``(batch, h, w)`` of each (the first one
    raises an out-of-memory error when ``fail_first``)."""
    shapes = []
    real = pipe.generator.predict

    def predict(latent):
        shapes.append((latent.shape[0], *latent.shape[-2:]))
        if fail_first and len(shapes) == 1:
            raise torch.OutOfMemoryError("out of memory (planted)")
        return real(latent)

    monkeypatch.setattr(pipe.generator, "predict", predict)
    return shapes


# The UNet's activation estimate per latent pixel (tiling.unet_bytes_per_latent_pixel):
# (sum_i 3 c_i / 4^i + 24 c_0) * bytes * 1.5 = 471 * 6 = 2826 B for the tiny UNet
# (c = 16, 32, 64, 64) in fp32, 1413 B in bf16; an "auto" tile t costs (t + t // 16)^2 of them.
@pytest.mark.parametrize("dtype,budget", [(torch.float32, 1_800_000), (torch.bfloat16, 900_000)])
def test_auto_unet_tile_follows_the_budget_and_the_unets_size(monkeypatch, dtype, budget):
    """fp32 at 1.8 MB and bf16 at 900 kB: a 24 px tile fits (1.77 MB / 883 kB), so the 8x24
    latent runs whole; a larger estimate (other channels, fp32 bytes for bf16) would cut it
    into 16 px tiles."""
    g = tiny_generator()
    g.unet.to(dtype)
    pipe = D3SRPipeline(g)
    shapes = _unet_tiles(pipe, monkeypatch)
    options = _options(
        tile_size="auto", tile_overlap=32, vae_tile_size=None, memory_budget_bytes=budget,
        unet_attention_window=512,
    )  # fmt: skip
    out = pipe.upscale_tensor(_image(16, 48, seed=6), options)
    assert out.shape == (1, 3, 64, 192) and torch.isfinite(out).all()
    assert shapes == [(1, 8, 24)]


@pytest.mark.parametrize("tile_size,retry", [("auto", [(1, 8, 14)] * 2), (0, [(1, 8, 24)])])
def test_unet_out_of_memory_retries_with_half_the_budget(monkeypatch, caplog, tile_size, retry):
    """At 1.8 MB "auto" runs the 8x24 latent whole (see above); after an out-of-memory error
    it plans with half the budget (900 kB: 16 px tiles, 816 kB, cut into two 8x14 with a 4 px
    overlap); no tiling (0) stays untiled."""
    pipe = D3SRPipeline(tiny_generator())
    shapes = _unet_tiles(pipe, monkeypatch, fail_first=True)
    options = _options(
        tile_size=tile_size, tile_overlap=32, vae_tile_size=None,
        memory_budget_bytes=1_800_000, unet_attention_window=512,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        pipe.upscale_tensor(_image(16, 48, seed=6), options)
    assert shapes == [(1, 8, 24), *retry]
    assert "UNet ran out of memory (out of memory (planted))" in caplog.text


@pytest.mark.parametrize(
    "width,tile_size,logged",
    [
        (48, 64, "UNet: 5 tiles of 8x8 latent px, batch 1"),
        (24, 64, "UNet: 2 tiles of 8x8 latent px, batch 1"),
        (24, None, None),
    ],
    ids=["5-tiles", "2-tiles", "untiled"],
)
def test_unet_tiles_run_one_at_a_time_on_cpu_and_are_logged(
    monkeypatch, caplog, width, tile_size, logged
):
    """On the CPU every tile is its own UNet call (batch 1); several tiles are logged at
    debug level, a single one is not."""
    pipe = D3SRPipeline(tiny_generator())
    shapes = _unet_tiles(pipe, monkeypatch)
    options = _options(tile_size=tile_size, tile_overlap=32, vae_tile_size=None)
    with caplog.at_level(logging.DEBUG, logger="d3sr"):
        pipe.upscale_tensor(_image(16, width, seed=7), options)
    unet_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("UNet")]
    if logged is None:
        assert shapes == [(1, 8, width // 2)] and unet_lines == []
    else:
        tiles = int(logged.split()[1])
        assert shapes == [(1, 8, 8)] * tiles and unet_lines == [logged]


def test_unet_tiles_report_progress_within_the_denoise_share():
    """Five UNet tiles (one per call on the CPU): the denoise stage's 20 % of the progress
    (after the encoder's 25 %) advances by a fifth per tile."""
    pipe = D3SRPipeline(tiny_generator())
    seen = []
    options = _options(tile_size=64, tile_overlap=32, vae_tile_size=None)
    pipe.upscale_tensor(_image(16, 48, seed=7), options, progress=lambda d, t: seen.append(d))
    assert seen == [25, 29, 33, 37, 41, 45, 100]


def test_prompt_embeds_option_conditions_one_call_only():
    """``options.prompt_embeds`` replaces the stored condition for that call (the reference
    with that embedding), also when the call is cancelled; a wrong width is refused with the
    generator's message and changes nothing."""
    g = tiny_generator()
    pipe = D3SRPipeline(g)
    stored = g.prompt_embeds.clone()
    other = tiny_prompt_embeds(7)
    x = _image(4, 6, seed=8)
    out = pipe.upscale_tensor(x, _options(prompt_embeds=other, vae_tile_size=None))
    cfg = g.config
    expected = reference_upscale(g.unet, g.vae, other, x, 4, cfg.timestep, cfg.prediction_type)
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)
    assert torch.equal(g.prompt_embeds, stored)
    checks = []
    with pytest.raises(UpscaleCancelled):
        pipe.upscale_tensor(
            x, _options(prompt_embeds=other), cancel=lambda: checks.append(1) or len(checks) > 2
        )
    assert torch.equal(g.prompt_embeds, stored)
    message = (
        "prompt_embeds width 8 does not match the UNet's context 32 (SD2.x text encoders give 1024)"
    )
    with pytest.raises(InvalidImageError, match=f"^{re.escape(message)}$"):
        pipe.upscale_tensor(x, _options(prompt_embeds=torch.zeros(1, 77, 8)))
    assert torch.equal(g.prompt_embeds, stored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_auto_vae_runs_whole_exactly_when_its_estimate_fits(monkeypatch, stage, dtype):
    """``vae_tile_size="auto"``: whole when the untiled estimate for the VAE's dtype is at
    most the budget, in tiles one byte below it."""
    g = tiny_generator()
    g.vae.to(dtype)
    pipe = D3SRPipeline(g)
    x = _image(4, 5, seed=9)  # x4: 16x20, padded to 16x24; latent 2x3
    shape = (1, 3, 16, 24) if stage == "encode" else (1, 4, 2, 3)
    estimate = tiled_vae.estimate_untiled_bytes(g.vae, stage, shape, dtype)
    full = tiled_vae.estimate_untiled_bytes(g.vae, stage, shape, torch.float32)
    assert dtype == torch.float32 or estimate < full  # bf16: the dtype changes the decision
    calls = []
    for name in (f"whole_{stage}", f"tiled_{stage}"):
        real = getattr(tiled_vae, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name.split("_")[0])
            return _real(*a, **k)

        monkeypatch.setattr(tiled_vae, name, spy)
    for budget in (estimate, estimate - 1):
        pipe.upscale_tensor(x, _options(vae_tile_size="auto", memory_budget_bytes=budget))
    assert calls == ["whole", "tiled"]


@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_small_whole_vae_runs_keep_freed_memory(monkeypatch, stage):
    """An untiled VAE run keeps freed blocks for reuse (no fresh pages per layer) exactly when
    twice its estimated peak fits the budget; the same output either way."""
    from contextlib import contextmanager

    from d3sr_core.inference import pipeline as pipeline_module

    pipe = D3SRPipeline(tiny_generator())
    x = _image(4, 5, seed=9)
    shapes = {"encode": (1, 3, 16, 24), "decode": (1, 4, 2, 3)}  # x4 of 4x5 (padded to 8)
    estimates = {
        kind: tiled_vae.estimate_untiled_bytes(pipe.generator.vae, kind, shape, torch.float32)
        for kind, shape in shapes.items()
    }
    estimate = estimates[stage]
    other = "decode" if stage == "encode" else "encode"
    entered = []

    @contextmanager
    def recording(device):
        entered.append(str(device))
        yield

    monkeypatch.setattr(pipeline_module, "reuse_freed_heap", recording)
    outs = []
    for budget in (2 * estimate, 2 * estimate - 1):
        entered.clear()
        options = _options(vae_tile_size="auto", memory_budget_bytes=budget)
        outs.append(pipe.upscale_tensor(x, options))
        other_keeps = 2 * estimates[other] <= budget
        assert len(entered) == (budget == 2 * estimate) + other_keeps
    assert torch.equal(outs[0], outs[1])


def test_attention_windows_count_whole_latent_positions():
    """Windows are given in output pixels and used in latent positions (8 px each, at least
    one): 4 and 8 px are both one position, 16 px two (another image)."""
    pipe = D3SRPipeline(tiny_generator())
    x = _image(4, 6, seed=10)  # a 2x3 latent
    for name in ("vae_attention_window", "unet_attention_window"):
        out = {
            px: pipe.upscale_tensor(x, _options(vae_tile_size=None, **{name: px}))
            for px in (4, 8, 16)
        }
        assert torch.equal(out[4], out[8]), name
        assert not torch.equal(out[8], out[16]), name


def test_vae_tile_size_zero_runs_the_vae_whole(monkeypatch):
    """0 means no tiling, like None, whatever the budget."""
    pipe = D3SRPipeline(tiny_generator())
    calls = []
    for name in ("whole_encode", "whole_decode", "tiled_encode", "tiled_decode"):
        real = getattr(tiled_vae, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(tiled_vae, name, spy)
    pipe.upscale_tensor(_image(4, 5), _options(vae_tile_size=0, memory_budget_bytes=1))
    assert calls == ["whole_encode", "whole_decode"]
