"""Tiled VAE: equal to the untiled VAE (encode and decode), whole-image GroupNorm statistics,
exact attention, bounded checkpoints, unsupported structures detected."""

import math

import pytest
import torch
from tiny_models import tiny_vae
from torch import nn

from d3sr_core.inference import tiled_vae
from d3sr_core.inference.tiled_vae import (
    Attend,
    TiledVAEConfig,
    TiledVAERunner,
    _run_attention,
    decoder_program,
    encoder_program,
    estimate_untiled_bytes,
    is_supported,
    tiled_decode,
    tiled_encode,
)

BIG = 10**12  # a budget that keeps every checkpoint
TINY = 1  # a budget that keeps none: every pass recomputes from the last forced checkpoint


def psnr(a, b):
    peak = float(b.max() - b.min())
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def _untiled_moments(vae, x):
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


@pytest.mark.parametrize("size", [(72, 104), (40, 24), (8, 8), (56, 136)])
@pytest.mark.parametrize("tile,budget", [(16, BIG), (32, BIG), (24, TINY), (None, 200_000)])
def test_tiled_encode_matches_untiled(vae, size, tile, budget):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ref = _untiled_moments(vae, x)
        out = tiled_encode(vae, x, budget, tile)
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 40.0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(9, 13), (5, 3), (1, 1), (7, 17)])
@pytest.mark.parametrize("tile,budget", [(16, BIG), (40, BIG), (24, TINY), (None, 300_000)])
def test_tiled_decode_matches_untiled(vae, size, tile, budget):
    z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = vae.decode(z).sample
        out = tiled_decode(vae, z, budget, tile)
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 40.0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _captured_group_stats(module, fn):
    """Whole-image mean/var of every GroupNorm input during an untiled call."""
    stats = {}

    def hook(mod, args):
        x = args[0]
        if x.ndim == 3:  # attention applies its GroupNorm on [B, C, HW]
            x = x.unsqueeze(-1)
        g = x.double().reshape(x.shape[0], mod.num_groups, -1)
        stats[mod] = (g.mean(-1), g.var(-1, unbiased=False))

    handles = [
        m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, nn.GroupNorm)
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_group_norm_statistics_equal_untiled(vae, kind):
    g = torch.Generator().manual_seed(2)
    if kind == "encode":
        x = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
        untiled = _captured_group_stats(vae, lambda: _untiled_moments(vae, x))
        runner = TiledVAERunner(encoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
    else:
        x = torch.randn(1, 4, 6, 8, generator=g)
        untiled = _captured_group_stats(vae, lambda: vae.decode(x))
        runner = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
    with torch.inference_mode():
        runner.run(x)
    assert runner.report.tiles > runner.report.passes, "more than one tile per pass"
    assert set(runner.group_stats) == set(untiled), "every GroupNorm gathered its statistics"
    for module, (mean, var) in untiled.items():
        st = runner.group_stats[module]
        torch.testing.assert_close(st.mean, mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st.var, var, atol=1e-6, rtol=1e-5)


def test_recompute_and_keep_policies_agree(vae):
    z = torch.randn(1, 4, 8, 11, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        keep = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=BIG, tile=16))
        lean = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=TINY, tile=16))
        a, b = keep.run(z), lean.run(z)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not keep.report.recomputed
    # With no budget only the forced checkpoints remain: the attention input (latent
    # resolution) and the output; nothing at the resolutions where memory grows.
    ops = decoder_program(vae)
    forced = {i for i, op in enumerate(ops) if isinstance(op, Attend)} | {len(ops)}
    assert set(lean.report.kept) == forced


def test_checkpoints_stay_within_budget(vae):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    budget = 400_000
    with torch.inference_mode():
        runner = TiledVAERunner(decoder_program(vae), TiledVAEConfig(budget=budget))
        runner.run(z)
    assert runner.report.recomputed, "the budget forces recomputation at high resolution"
    assert runner.report.peak_estimate <= budget


def test_attention_is_exact_with_chunked_queries(vae):
    attn = vae.decoder.mid_block.attentions[0]
    op = Attend(attn)
    x = torch.randn(1, attn.to_q.in_features, 5, 7, generator=torch.Generator().manual_seed(5))
    stats = tiled_vae.GroupStats(attn.group_norm.num_groups)
    stats.add(x)
    with torch.inference_mode():
        ref = attn(x)
        for budget in (1, 10**9):  # one query row at a time / all at once
            torch.testing.assert_close(
                _run_attention(op, stats, x, budget), ref, atol=1e-5, rtol=1e-5
            )


def test_channels_last_bfloat16_runs_and_stays_close(vae):
    import copy

    half = copy.deepcopy(vae).to(torch.bfloat16).to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = vae.decode(z).sample
        out = tiled_decode(half, z, BIG, 16)
    assert out.dtype == torch.bfloat16
    assert psnr(out, ref) >= 30.0  # bf16 rounding, not tiling


def test_untiled_estimate_grows_with_the_image(vae):
    small = estimate_untiled_bytes(vae, "decode", (1, 4, 8, 8), torch.float32)
    large = estimate_untiled_bytes(vae, "decode", (1, 4, 16, 16), torch.float32)
    assert small > 0 and abs(large / small - 4) < 0.01


def test_unsupported_structure_is_detected(vae):
    import copy

    odd = copy.deepcopy(vae)
    odd.decoder.conv_act = nn.ReLU()
    assert is_supported(vae) and not is_supported(odd)


def test_whole_image_path_equals_diffusers(vae):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
    z = torch.randn(1, 4, 5, 7, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(tiled_vae.whole_encode(vae, x), _untiled_moments(vae, x))
        torch.testing.assert_close(
            tiled_vae.whole_decode(vae, z), vae.decode(z).sample, atol=1e-5, rtol=1e-5
        )


def test_upsampling_folded_into_the_conv():
    torch.manual_seed(8)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 7, 9)
    with torch.inference_mode():
        ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = tiled_vae.upsample_conv(
            torch.nn.functional.pad(x, (1, 1, 1, 1)),
            tiled_vae.subpixel_weights(conv.weight),
            conv.bias,
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
