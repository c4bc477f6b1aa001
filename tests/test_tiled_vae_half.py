"""The tiled VAE in bf16 + channels_last (the CPU "auto" precision) equals the whole bf16 VAE:
tiles are crops of NHWC checkpoints, statistics come from the mixed-precision GroupNorm kernel
and the upsampling conv keeps NHWC on crops."""

import math

import pytest
import torch
from tiny_models import tiny_vae

from d3sr_core.inference import tiled_vae


def psnr(a, b):
    peak = float(b.float().max() - b.float().min())
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def test_tiled_bf16_channels_last_equals_whole_bf16():
    half = tiny_vae().to(torch.bfloat16).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(21)
    z = torch.randn(1, 4, 13, 11, generator=g).to(torch.bfloat16)
    x = (torch.rand(1, 3, 72, 88, generator=g) * 2 - 1).to(torch.bfloat16)
    z, x = (t.contiguous(memory_format=torch.channels_last) for t in (z, x))
    with torch.inference_mode():
        whole_dec = tiled_vae.whole_decode(half, z)
        whole_enc = tiled_vae.whole_encode(half, x)
        for budget in (10**12, 1):  # keep every checkpoint / recompute from the input
            dec = tiled_vae.tiled_decode(half, z, budget, tile=24)
            enc = tiled_vae.tiled_encode(half, x, budget, tile=24)
            assert dec.dtype == enc.dtype == torch.bfloat16
            assert psnr(dec, whole_dec) >= 45.0, budget
            assert psnr(enc, whole_enc) >= 45.0, budget


def test_half_precision_group_moments_match_fp32():
    g = torch.Generator().manual_seed(22)
    x = (torch.randn(2, 16, 20, 24, generator=g) * 3 + 5).to(torch.bfloat16)
    crop = x.contiguous(memory_format=torch.channels_last)[:, :, 3:17, 2:21]
    mean, var = tiled_vae.group_moments(crop, 4)
    ref = crop.double().reshape(2, 4, -1)  # the formula on the exact bf16 values
    torch.testing.assert_close(mean, ref.mean(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(var, ref.var(-1, unbiased=False), atol=1e-5, rtol=1e-5)


def test_group_moments_pack_nchw_off_the_cpu(monkeypatch):
    """CUDA's (and MPS's) group_norm kernel takes NCHW-contiguous input only - the CPU kernel
    also takes channels_last - so a channels_last tile off the CPU is packed to NCHW first
    (without it every tiled bf16/fp16 GPU run failed: "Expected X.is_contiguous(...)")."""

    class Seen(Exception):
        pass

    def cuda_rule(x, *args):
        if not x.is_contiguous():
            raise RuntimeError("Expected X.is_contiguous(memory_format) to be true")
        raise Seen  # the layout is right; meta tensors have no values to reduce

    monkeypatch.setattr(torch, "native_group_norm", cuda_rule)
    x = torch.empty(1, 8, 6, 7, device="meta", dtype=torch.bfloat16)
    for t in (x.contiguous(memory_format=torch.channels_last), x[:, :, 1:5, 2:6]):
        with pytest.raises(Seen):
            tiled_vae.group_moments(t, 4)


def test_checkpoints_follow_the_weights_layout():
    """Checkpoints are NHWC for a channels_last VAE, also for the decoder, whose first conv
    (``post_quant_conv``, 1x1) is laid out the same in both formats (storing NHWC tiles into
    NCHW checkpoints was a transposing copy: 1/3 of a tiled bf16 decode)."""
    base = tiny_vae().to(torch.bfloat16)
    half = tiny_vae().to(torch.bfloat16).to(memory_format=torch.channels_last)
    config = tiled_vae.TiledVAEConfig(budget=10**12)
    for program in (tiled_vae.encoder_program, tiled_vae.decoder_program):
        cl = tiled_vae.TiledVAERunner(program(half), config)._memory_format()
        plain = tiled_vae.TiledVAERunner(program(base), config)._memory_format()
        assert cl == torch.channels_last, program.__name__
        assert plain == torch.contiguous_format, program.__name__


def test_whole_bf16_channels_last_is_as_close_to_fp32_as_diffusers_bf16():
    """The untiled path in bf16 + channels_last (native GroupNorm+SiLU where it is built, the
    residual add fused into the conv) against diffusers' fp32 encode/decode: no further from
    it than diffusers' own bf16 + channels_last call is."""
    import copy

    vae = tiny_vae()
    half = copy.deepcopy(vae).to(torch.bfloat16).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(23)
    z = torch.randn(1, 4, 13, 11, generator=g)
    x = torch.rand(1, 3, 72, 88, generator=g) * 2 - 1
    zh, xh = (t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for t in (z, x))
    with torch.inference_mode():
        exact_dec = vae.decode(z).sample
        exact_enc = vae.encoder(x)
        exact_enc = vae.quant_conv(exact_enc) if vae.quant_conv is not None else exact_enc
        theirs_dec = half.decode(zh).sample
        theirs_enc = half.encoder(xh)
        theirs_enc = half.quant_conv(theirs_enc) if half.quant_conv is not None else theirs_enc
        ours_dec = tiled_vae.whole_decode(half, zh, attention_window=None)
        ours_enc = tiled_vae.whole_encode(half, xh, attention_window=None)
    for ours, theirs, exact in (
        (ours_dec, theirs_dec, exact_dec),
        (ours_enc, theirs_enc, exact_enc),
    ):
        assert ours.dtype == torch.bfloat16
        assert psnr(ours, exact) >= psnr(theirs, exact) - 0.5
        assert psnr(ours, exact) >= 35.0
