"""The native GroupNorm+SiLU kernels (``d3sr_core.inference.native``) against torch's own
GroupNorm and SiLU in fp32, their fallbacks, and the fused conv + residual add."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d3sr_core.inference import native
from d3sr_core.inference.tiled_vae.norm import group_moments, group_norm_act
from d3sr_core.inference.tiled_vae.ops import conv_add_

needs_native = pytest.mark.skipif(
    native.library() is None, reason="no C compiler with OpenMP: the kernels cannot be built"
)


def _bf16_nhwc(*shape, offset=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale + offset
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _norm(channels, groups, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = nn.GroupNorm(groups, channels, eps=1e-6)
    m.weight.data = 1 + 0.3 * torch.randn(channels, generator=g)
    m.bias.data = 0.3 * torch.randn(channels, generator=g)
    return m


@needs_native
@pytest.mark.parametrize("channels,groups", [(128, 32), (64, 8), (24, 4), (48, 6)])
@pytest.mark.parametrize("act", [True, False])
def test_group_norm_act_matches_torch_fp32(channels, groups, act):
    """bf16 in, bf16 out: within bf16 rounding of torch's fp32 GroupNorm (+ SiLU) on the same
    values; 24 and 48 channels take the portable loop, the others the AVX-512 one if built."""
    x = _bf16_nhwc(2, channels, 19, 23, offset=5.0, scale=3.0)
    m = _norm(channels, groups)
    y = F.group_norm(x.float(), groups, m.weight, m.bias, m.eps)
    ref = F.silu(y) if act else y
    got = group_norm_act(x, m.to(torch.bfloat16), act)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    # the weights in bf16 (as the model holds them) move values by up to 2^-9 relative too
    torch.testing.assert_close(got.float(), ref, atol=0.03, rtol=0.016)
    # and no worse than torch's own bf16 GroupNorm + SiLU
    theirs = F.group_norm(x, groups, m.weight.bfloat16(), m.bias.bfloat16(), m.eps)
    theirs = F.silu(theirs) if act else theirs
    assert (got.float() - ref).abs().mean() <= 1.05 * (theirs.float() - ref).abs().mean()


@needs_native
def test_group_norm_act_writes_into_out_and_in_place():
    x = _bf16_nhwc(1, 64, 16, 16, offset=-2.0, scale=0.5)
    m = _norm(64, 32).to(torch.bfloat16)
    expected = group_norm_act(x, m, True)
    out = torch.empty_like(x)
    assert group_norm_act(x, m, True, out=out) is out
    assert torch.equal(out, expected)
    x2 = x.clone()
    assert group_norm_act(x2, m, True, out=x2) is x2
    assert torch.equal(x2, expected)
    # an out that does not fit (another shape, NCHW) is left alone: a new tensor gets it
    for unfit in (torch.zeros_like(x)[:, :, :8], torch.zeros(x.shape, dtype=x.dtype)):
        got = group_norm_act(x, m, True, out=unfit)
        assert got is not unfit and not unfit.any()
        assert torch.equal(got, expected)


@needs_native
@pytest.mark.parametrize("channels", [32, 24])  # the AVX-512 loop (if built), the portable one
def test_silu_over_every_bf16_value(channels):
    """SiLU of every finite bf16 value (scale 1, shift 0) against torch's fp32 SiLU: at most one
    bf16 step off, nearly always correctly rounded; saturates like torch far from zero (no
    clamping), NaN stays NaN, +inf stays +inf."""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    normal = every[every.isfinite() & (every.float().abs() >= 2**-120)]
    values = torch.cat([normal, torch.tensor([float("nan"), float("inf")], dtype=torch.bfloat16)])
    n = values.numel() // channels * channels
    x = values[-n:].view(1, channels, -1, 1).contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(1, channels), torch.zeros(1, channels)
    got = native.affine_act(x, ones, zeros, True).float()
    exact = F.silu(x.float())
    rounded = exact.to(torch.bfloat16).float()
    finite = exact.isfinite() & (exact.abs() >= 2**-120)  # bf16 steps of normal numbers
    step = exact.abs().frexp().exponent.float().sub(8).exp2()
    assert ((got - rounded).abs() <= step)[finite].all()
    assert ((got != rounded) & finite).sum() <= 0.002 * finite.sum()
    assert (got[exact.isnan()]).isnan().all() and (got[exact == float("inf")] == float("inf")).all()
    tiny = x.float().le(-100) & ~exact.isnan()  # silu underflows to (minus) zero
    assert (got[tiny].abs() < 2**-120).all()


@needs_native
def test_channel_moments_far_from_zero():
    """Channels at 100 +- 0.5: raw sums of squares in fp32 would cancel; the shifted sums give
    the float64 moments of the same bf16 values."""
    x = _bf16_nhwc(2, 32, 40, 50, offset=100.0, scale=0.5, seed=3)
    mean, m2 = native.channel_moments(x)
    xd = x.double()
    ref_mean = xd.mean(dim=(2, 3))
    ref_m2 = ((xd - ref_mean[..., None, None]) ** 2).sum(dim=(2, 3))
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(m2, ref_m2, atol=0, rtol=1e-5)
    # and through the tiled VAE's statistics helper, per group
    g_mean, g_var = group_moments(x, 8)
    grouped = xd.contiguous().view(2, 8, -1)
    torch.testing.assert_close(g_mean, grouped.mean(dim=2), atol=1e-6, rtol=0)
    torch.testing.assert_close(g_var, grouped.var(dim=2, correction=0), atol=0, rtol=1e-5)


def test_kernels_decline_what_they_do_not_take():
    """fp32, NCHW and crops go to torch's ops (the callers' fallback)."""
    m = _norm(32, 8)
    for x in (
        torch.randn(1, 32, 8, 8),
        torch.randn(1, 32, 8, 8).bfloat16(),
        _bf16_nhwc(1, 32, 8, 8)[:, :, 1:5, 1:5],  # a crop: callers pack it first
        _bf16_nhwc(1, 32, 0, 8),
    ):
        assert native.channel_moments(x) is None
        assert native.affine_act(x, torch.ones(1, 32), torch.zeros(1, 32), True) is None
        ref = F.silu(F.group_norm(x, 8, m.weight.to(x.dtype), m.bias.to(x.dtype), m.eps))
        torch.testing.assert_close(group_norm_act(x, m.to(x.dtype), True), ref)
        m = m.float()


def test_switched_off_and_failed_builds_fall_back(monkeypatch, tmp_path):
    x = _bf16_nhwc(1, 32, 8, 8)
    try:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native.library.cache_clear()
        assert native.library() is None and native.channel_moments(x) is None
        # a compiler that fails: one warning naming the cause, then torch's ops
        monkeypatch.setenv(native.ENV_SWITCH, "1")
        monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "kernels"))
        monkeypatch.setenv("CC", "false")
        native.library.cache_clear()
        with pytest.warns(
            RuntimeWarning, match="native GroupNorm kernels unavailable.*false failed"
        ):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None  # cached: no second warning
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_native
def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    compiler = native.find_compiler()
    first = native._build(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setattr(native, "_cpu_id", lambda: "another cpu")
    assert native._build(compiler) != first


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0)])
def test_conv_add_is_conv_plus_skip(layout, pad):
    """skip + conv(x) against the formula (fp32: to rounding; the fused oneDNN op for
    symmetric pads, conv then add otherwise)."""
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(16, 24, 3, padding=0).to(memory_format=layout)
    x = torch.randn(2, 16, 12, 14, generator=g).contiguous(memory_format=layout)
    skip = torch.randn(2, 24, 10 + pad[2] + pad[3], 12 + pad[0] + pad[1], generator=g)
    skip = skip.contiguous(memory_format=layout)
    ref = skip + F.conv2d(F.pad(x, pad), conv.weight, conv.bias)
    with torch.no_grad():
        got = conv_add_(skip, x, conv, pad)
    assert got.data_ptr() == skip.data_ptr()  # in place
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_conv_add_bf16_rounds_once():
    """In bf16 the fused op rounds the sum once: no further from the fp32 result than
    torch's conv-then-add."""
    torch.manual_seed(6)
    conv = nn.Conv2d(32, 32, 3).to(torch.bfloat16, memory_format=torch.channels_last)
    x = _bf16_nhwc(1, 32, 20, 20, seed=7)
    skip = _bf16_nhwc(1, 32, 20, 20, seed=8) * 4
    exact = skip.float() + F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
    theirs = skip + F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.no_grad():
        got = conv_add_(skip.clone(), x, conv, (1, 1, 1, 1))
    assert (got.float() - exact).abs().mean() <= (theirs.float() - exact).abs().mean()
    torch.testing.assert_close(got, theirs, atol=0.07, rtol=0.02)
