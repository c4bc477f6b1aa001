"""Device/precision resolution, generator preparation, and no NaN from half-precision overflow."""

import logging

import pytest
import torch
from tiny_models import tiny_generator

from d3sr_core.inference import precision
from d3sr_core.inference.pipeline import D3SRPipeline, UpscaleOptions
from d3sr_core.inference.precision import (
    plan_precision,
    prepare_generator,
    resolve_device,
    resolve_dtype,
)


def test_resolve_device():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-please")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_on_cpu_is_bf16_or_fp32_never_fp16(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native_bf16)
    dtype = resolve_dtype("auto", "cpu")
    assert dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    plan = plan_precision("auto", "cpu")
    assert plan.channels_last == native_bf16 and plan.unet_dtype != torch.float16


def test_auto_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert not plan_precision("fp16", torch.device("mps")).channels_last


def test_explicit_precisions_and_errors():
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("int8", "cpu")


def test_fp16_keeps_the_vae_in_fp32_and_bf16_does_not():
    plan = plan_precision("fp16", torch.device("cuda"))
    assert plan.unet_dtype == torch.float16 and plan.vae_dtype == torch.float32
    assert (
        plan_precision("fp16", torch.device("cuda"), vae_force_upcast=False).vae_dtype
        == torch.float16
    )
    assert plan_precision("bf16", torch.device("cuda")).vae_dtype == torch.bfloat16


def test_prepare_generator_casts_and_upcasts_an_fp16_vae():
    g = tiny_generator().to(torch.float16)  # as load_generator(dtype=fp16) leaves it
    prepare_generator(g, "cpu", torch.float16)
    assert g.dtype == torch.float16
    assert next(g.vae.parameters()).dtype == torch.float32
    g = prepare_generator(tiny_generator(), "cpu", "bf16", channels_last=True)
    conv = g.unet.conv_in.weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    assert g.precision_plan.channels_last


def _overflowing_generator():
    """A tiny generator whose VAE decoder and UNet overflow fp16 (activations > 65504) while
    their weights stay finite in fp16."""
    g = tiny_generator()
    with torch.no_grad():
        g.vae.decoder.conv_in.weight.mul_(2e3)
        g.unet.conv_out.weight.mul_(3e5)
        assert float(g.unet.conv_out.weight.abs().max()) < 6e4
    return g


def test_simulated_fp16_overflow_gives_no_nan(caplog):
    g = _overflowing_generator()
    g.unet.half()
    g.vae.half()  # a VAE someone forced to fp16: the pipeline's guard must still save it
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        raw = g.vae.decode(50 * torch.randn(1, 4, 3, 3).half()).sample
    assert not torch.isfinite(raw).all(), "the simulation overflows fp16"
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        out = D3SRPipeline(g).upscale_tensor(x, UpscaleOptions(scale=2, color_fix="none"))
    assert torch.isfinite(out).all()
    assert "UNet overflowed" in caplog.text and "VAE decode overflowed" in caplog.text
    assert next(g.vae.parameters()).dtype == torch.float16, "weights restored after the upcast"


def test_prepared_fp16_generator_never_returns_nan():
    g = prepare_generator(_overflowing_generator(), "cpu", "fp16")
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    for vae_tile in (None, 32):
        out = D3SRPipeline(g).upscale_tensor(
            x, UpscaleOptions(scale=2, color_fix="none", vae_tile_size=vae_tile)
        )
        assert torch.isfinite(out).all()
