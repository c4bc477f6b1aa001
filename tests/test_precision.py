"""Device/precision resolution, generator preparation, and no NaN from half-precision overflow."""

import logging

import pytest
import torch
from tiny_models import tiny_generator

from d3sr_core.inference import precision
from d3sr_core.inference.options import UpscaleOptions
from d3sr_core.inference.pipeline import D3SRPipeline
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


def test_device_choice_with_simulated_accelerators(monkeypatch):
    def check(name, message):
        with pytest.raises(ValueError) as err:
            resolve_device(name)
        assert str(err.value) == message

    monkeypatch.setattr(precision, "_mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    check("cuda:2", "device cuda:2 requested but only 2 CUDA device(s) exist")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check("cuda", "device 'cuda' requested but no CUDA device is available")
    check("mps", "device 'mps' requested but MPS is not available")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(precision, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("xpu") == torch.device("xpu")
    assert resolve_device() == torch.device("mps")  # the default is auto
    check("meta", "unsupported device meta")
    check("tpu-please", "unknown device 'tpu-please': use auto, cpu, cuda, cuda:N or mps")


def test_mps_availability_follows_torch_backends(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert precision._mps_available() is True
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert precision._mps_available() is False
    monkeypatch.delattr(torch.backends, "mps")
    assert precision._mps_available() is False


def test_cpu_bf16_detection(monkeypatch, tmp_path):
    import builtins
    import subprocess
    from types import SimpleNamespace

    info = tmp_path / "cpuinfo"
    info.write_bytes(
        b"processor\t: 0\nmodel name\t: Caf\xc3\xa9 CPU @ 2.0GHz\n"
        b"flags\t\t: fpu sse avx512_bf16\nbugs\t\t: spectre\n"
    )
    opened = []

    def fake_open(path, *args, **kwargs):
        opened.append(path)
        return builtins.open(info, *args, **kwargs)

    monkeypatch.setattr(precision, "open", fake_open, raising=False)
    assert precision._cpu_flags() == {"fpu", "sse", "avx512_bf16"}
    assert opened == ["/proc/cpuinfo"]
    info.write_bytes(b"Processor\t: AArch64\nFeatures\t: fp asimd bf16\n")
    assert precision._cpu_flags() == {"fp", "asimd", "bf16"}
    info.write_bytes(b"Features: fp bf16\n")  # no blank before the colon
    assert precision._cpu_flags() == {"fp", "bf16"}

    def no_file(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(precision, "open", no_file, raising=False)
    assert precision._cpu_flags() == set()

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        return SimpleNamespace(stdout=" 1\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert precision._sysctl("hw.optional.arm.FEAT_BF16") == "1"
    assert calls == [
        (
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
            {"capture_output": True, "text": True, "timeout": 5},
        )
    ]
    for error in (OSError("no sysctl"), subprocess.TimeoutExpired("sysctl", 5)):

        def failing(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(subprocess, "run", failing)
        assert precision._sysctl("x") == ""

    cases = [  # machine, system, flags, sysctl answer -> native bf16
        ("x86_64", "Linux", {"avx512_bf16"}, "", True),
        ("AMD64", "Windows", {"amx_bf16"}, "", True),
        ("i686", "Linux", {"avx2", "bf16"}, "", False),
        ("aarch64", "Linux", {"bf16"}, "", True),
        ("arm64", "Darwin", set(), "1", True),
        ("arm64", "Darwin", set(), "0", False),
        ("arm64", "Linux", set(), "1", False),
        ("riscv64", "Linux", {"bf16", "avx512_bf16"}, "1", False),
    ]
    for machine, system, flags, answer, expected in cases:
        monkeypatch.setattr(precision.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(precision.platform, "system", lambda s=system: s)
        monkeypatch.setattr(precision, "_cpu_flags", lambda f=flags: set(f))
        monkeypatch.setattr(precision, "_sysctl", lambda name, a=answer: a)
        precision.cpu_supports_bf16.cache_clear()
        assert precision.cpu_supports_bf16() is expected, (machine, system, flags, answer)
    precision.cpu_supports_bf16.cache_clear()


def test_dtype_names_warnings_and_plans(caplog):
    with caplog.at_level(logging.WARNING, logger="d3sr"):
        assert resolve_dtype("FP16", torch.device("cuda")) == torch.float16
        assert resolve_dtype("bfloat16", "mps") == torch.bfloat16
        assert resolve_dtype("float32", "mps") == torch.float32
        assert not caplog.records  # fp16 warns on a CPU only
        assert resolve_dtype(" Half ", "cpu") == torch.float16
    assert [r.getMessage() for r in caplog.records] == [
        "fp16 on a CPU is emulated and very slow; bf16 or fp32 is faster"
    ]
    with pytest.raises(ValueError) as err:
        resolve_dtype(torch.float64, "cpu")
    assert str(err.value) == "unsupported dtype torch.float64: use float32, float16 or bfloat16"
    plans = {  # (precision, device) -> describe(): channels_last on CPU bf16 and CUDA halves
        ("fp16", "cuda"): "cuda: UNet fp16, VAE fp32, channels_last",
        ("bf16", "cuda"): "cuda: UNet bf16, VAE bf16, channels_last",
        ("fp32", "cuda"): "cuda: UNet fp32, VAE fp32",
        ("bf16", "cpu"): "cpu: UNet bf16, VAE bf16, channels_last",
        ("fp16", "cpu"): "cpu: UNet fp16, VAE fp32",
        ("fp32", "cpu"): "cpu: UNet fp32, VAE fp32",
        ("fp16", "mps"): "mps: UNet fp16, VAE fp32",
    }
    for (name, device), text in plans.items():
        assert plan_precision(name, device).describe() == text
    assert not plan_precision("bf16", "mps", channels_last=True).channels_last
    assert plan_precision("fp32", "cpu", channels_last=True).channels_last


def test_prepare_generator_defaults_and_the_vae_config(caplog, monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)  # auto -> fp32
    g = tiny_generator()
    with caplog.at_level(logging.INFO, logger="d3sr"):
        assert prepare_generator(g, dtype=None) is g  # device None: stays where it is
        assert prepare_generator(g) is g  # dtype auto
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        prepare_generator(g, "tpu")
    assert "precision: cpu: UNet fp32, VAE fp32" in [r.getMessage() for r in caplog.records]
    conv = g.unet.conv_in.weight
    assert g.dtype == torch.float32 and conv.is_contiguous() and not g.training
    assert g.vae.encoder.conv_in.weight.is_contiguous()
    # a VAE whose config allows fp16 stays fp16; a VAE without a config is upcast
    g = tiny_generator()
    g.vae.register_to_config(force_upcast=False)
    prepare_generator(g, "cpu", "fp16")
    assert next(g.vae.parameters()).dtype == torch.float16
    g = tiny_generator()
    g.vae = torch.nn.Conv2d(3, 4, 1)  # a VAE module without a diffusers config
    prepare_generator(g, "cpu", "fp16")
    assert next(g.vae.parameters()).dtype == torch.float32
    # channels_last asked for: the VAE too
    g = prepare_generator(tiny_generator(), "cpu", "fp32", channels_last=True)
    fmt = torch.channels_last
    assert g.vae.encoder.conv_in.weight.is_contiguous(memory_format=fmt)


def test_cast_uses_the_model_s_own_to_only_for_fp32_modules():
    class Model(torch.nn.Module):
        """Records calls of its own ``to`` (diffusers' ModelMixin.to keeps fp32 modules)."""

        def __init__(self, keep):
            super().__init__()
            self._keep_in_fp32_modules = keep
            self.proj = torch.nn.Linear(2, 2)
            self.own_to = []

        def to(self, *args, **kwargs):
            self.own_to.append(kwargs)
            return super().to(*args, **kwargs)

    keeps = Model(["norm"])
    precision._cast(keeps, torch.device("cpu"), torch.bfloat16)
    assert keeps.proj.weight.dtype == torch.bfloat16
    assert keeps.own_to == [{"device": torch.device("cpu"), "dtype": torch.bfloat16}]
    for keep in ([], None):  # nothing kept in fp32: plain nn.Module.to, no diffusers warning
        plain = Model(keep)
        precision._cast(plain, torch.device("cpu"), torch.float16)
        assert plain.proj.weight.dtype == torch.float16 and plain.own_to == []
