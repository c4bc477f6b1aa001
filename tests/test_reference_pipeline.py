"""``upscale_tensor`` against the independent reference of ``tests/reference.py``.

The reference is the spec's formula chain on diffusers' classes (bicubic upsample written out,
``E(x).mode() * 0.18215``, UNet at the checkpoint's timestep with the stored prompt embedding,
x0 from ``DDPMScheduler.alphas_cumprod``, ``D(z / 0.18215)``), with the LoRA merged by hand
as ``W + strength * scale * B @ A``. Tiny random models, fp32.

Tolerance: ``ATOL = 5e-5`` on [0, 1] outputs. Measured differences are 5e-6 .. 1e-5 (the
engine's own VAE code and float32 summation order); a one-step change of the timestep, a
bilinear instead of bicubic upsample or a 10 % wrong scaling factor move outputs by 0.1 - 0.9
(:func:`test_reference_detects_planted_changes`), so the tolerance is far below any real error.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from reference import (
    adain_fix,
    atrous_wavelet_fix,
    bicubic_resize,
    merge_by_hand,
    output_hw,
    reference_upscale,
)
from tiny_models import tiny_prompt_embeds, tiny_unet, tiny_vae
from torch import nn

from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline
from d3sr_core.loading.base import BaseModel
from d3sr_core.loading.checkpoint import D3SRCheckpoint
from d3sr_core.loading.generator import build_generator
from d3sr_core.models import GeneratorConfig, LoraAdapter
from d3sr_core.models.configs import bundled_config

ATOL = 5e-5

# One module of each kind LoRA touches: 3x3 convs, a 1x1 shortcut, attention projections
# (self and cross), transformer in/out projections, a feed-forward layer, the time embedding.
LORA_PATHS = (
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
    "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
    "down_blocks.2.resnets.1.time_emb_proj",
    "conv_out",
)


@functools.cache
def _base_unet() -> nn.Module:
    return tiny_unet()


@functools.cache
def _vae() -> nn.Module:
    return tiny_vae()  # never modified: shared by the engine and the reference


def fresh_unet() -> nn.Module:
    return copy.deepcopy(_base_unet())


def lora_factors(model: nn.Module, paths, rank: int = 4, seed: int = 0, std: float = 0.15):
    """Random ``(A, B)`` pairs shaped for ``model``'s modules (peft layout)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        m = model.get_submodule(path)
        if isinstance(m, nn.Linear):
            a = torch.randn(rank, m.in_features, generator=g)
            b = torch.randn(m.out_features, rank, generator=g)
        else:
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        factors[path] = (a * std, b * std)
    return factors


def make_checkpoint(timestep=399, prediction_type="epsilon", scale=2.0, seed=0):
    unet = _base_unet()
    g = torch.Generator().manual_seed(seed + 100)
    replaced = {"conv_in.weight": unet.conv_in.weight + 0.1 * torch.randn(
        unet.conv_in.weight.shape, generator=g)}  # fmt: skip
    adapter = LoraAdapter(lora_factors(unet, LORA_PATHS, seed=seed), scale, replaced)
    config = GeneratorConfig(
        timestep=timestep, prediction_type=prediction_type, lora_rank=4, lora_alpha=4 * scale
    )
    return D3SRCheckpoint(config, tiny_prompt_embeds(), {"unet": adapter})


def engine(ckpt: D3SRCheckpoint, strength: float) -> D3SRPipeline:
    scheduler = {
        **bundled_config("sd21-base", "scheduler"),
        "prediction_type": ckpt.config.prediction_type,
    }
    base = BaseModel(fresh_unet(), _vae(), scheduler, "tiny")
    return D3SRPipeline(build_generator(base, ckpt, strength).eval())


def reference(ckpt: D3SRCheckpoint, strength: float, x: torch.Tensor, scale: float, **kw):
    adapter = ckpt.adapters["unet"]
    unet = merge_by_hand(_base_unet(), adapter.factors, adapter.scale, strength, adapter.replaced)
    cfg = ckpt.config
    return reference_upscale(
        unet, _vae(), ckpt.prompt_embeds, x, scale, cfg.timestep, cfg.prediction_type, **kw
    )


def image(h, w, c=3, seed=0):
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed))


# (input h, w), scale, timestep, prediction type, strength. Sizes include outputs that are
# not multiples of 8 (padding) and non-integer scales.
CASES = [
    ((8, 8), 4, 399, "epsilon", 1.0),
    ((6, 10), 2.5, 250, "epsilon", 0.5),
    ((12, 7), 2, 600, "v_prediction", 1.5),
    ((5, 9), 3, 999, "v_prediction", 0.0),
]


@pytest.mark.parametrize("size,scale,timestep,prediction,strength", CASES)
def test_upscale_matches_reference(size, scale, timestep, prediction, strength):
    ckpt = make_checkpoint(timestep, prediction)
    x = image(*size)
    out = engine(ckpt, strength).upscale_tensor(x, UpscaleOptions(scale=scale, color_fix="none"))
    expected = reference(ckpt, strength, x, scale)
    assert out.shape == expected.shape == (1, 3, *output_hw(*size, scale))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_reference_detects_planted_changes():
    """The tolerance is far below what a wrong timestep, interpolation, scaling factor, prompt
    or strength does to the output (so the comparisons above can fail)."""
    ckpt = make_checkpoint(399)
    x = image(8, 8)
    out = engine(ckpt, 1.0).upscale_tensor(x, UpscaleOptions(scale=4, color_fix="none"))
    cfg = ckpt.config
    adapter = ckpt.adapters["unet"]
    unet = merge_by_hand(_base_unet(), adapter.factors, adapter.scale, 1.0, adapter.replaced)

    def bilinear(t, h, w):
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)

    planted = {
        "timestep + 1": dict(timestep=cfg.timestep + 1),
        "bilinear": dict(upsample=bilinear),
        "scaling 0.2": dict(scaling_factor=0.2),
        "other prompt": dict(prompt_embeds=tiny_prompt_embeds(7)),
        "v instead of eps": dict(prediction_type="v_prediction"),
    }
    for name, change in planted.items():
        args = dict(
            prompt_embeds=ckpt.prompt_embeds, timestep=cfg.timestep, prediction_type="epsilon"
        )
        args.update(change)
        wrong = reference_upscale(unet, _vae(), images=x, scale=4, **args)
        assert (wrong - out).abs().max() > 100 * ATOL, name
    for strength in (0.0, 1.1):
        assert (reference(ckpt, strength, x, 4) - out).abs().max() > 20 * ATOL, strength


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_colour_fix_in_the_pipeline_uses_the_upsampled_input(method):
    ckpt = make_checkpoint()
    x = image(16, 12, seed=3)
    out = engine(ckpt, 1.0).upscale_tensor(x, UpscaleOptions(scale=4, color_fix=method))
    raw = reference(ckpt, 1.0, x, 4)
    upsampled = bicubic_resize(x, 64, 48).clamp(0, 1)
    fix = atrous_wavelet_fix if method == "wavelet" else adain_fix
    expected = fix(raw, upsampled)
    assert (expected - raw).abs().max() > 0.05  # the fix changes the image
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)


def test_gray_is_the_channel_mean_of_the_rgb_result():
    ckpt = make_checkpoint()
    gray = image(7, 9, c=1, seed=4)
    out = engine(ckpt, 1.0).upscale_tensor(gray, UpscaleOptions(scale=3, color_fix="none"))
    rgb = reference(ckpt, 1.0, gray.expand(-1, 3, -1, -1), 3)
    assert out.shape == (1, 1, 21, 27)
    assert (rgb[:, 0] - rgb[:, 1]).abs().max() > 0.05  # the channels differ: the reduction matters
    torch.testing.assert_close(out, rgb.mean(dim=1, keepdim=True), atol=ATOL, rtol=0)


def test_alpha_is_upsampled_bicubically_and_colour_untouched_by_it():
    ckpt = make_checkpoint()
    rgba = image(6, 5, c=4, seed=5)
    out = engine(ckpt, 1.0).upscale_tensor(rgba, UpscaleOptions(scale=4, color_fix="none"))
    torch.testing.assert_close(out[:, :3], reference(ckpt, 1.0, rgba[:, :3], 4), atol=ATOL, rtol=0)
    alpha = bicubic_resize(rgba[:, 3:], 24, 20).clamp(0, 1)
    torch.testing.assert_close(out[:, 3:], alpha, atol=1e-6, rtol=0)
