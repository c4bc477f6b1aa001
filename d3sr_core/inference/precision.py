"""Device and precision choice, and preparing a loaded generator for them.

* :func:`resolve_device` - ``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps`` -> ``torch.device``.
* :func:`resolve_dtype` - ``auto`` | ``fp32`` | ``fp16`` | ``bf16`` -> ``torch.dtype``:
  CUDA: bf16 where supported, else fp16; MPS: fp16; CPU: bf16 where the CPU has native bf16
  (AVX512-BF16 / AMX / ARM BF16), else fp32. Never fp16 on a CPU for ``auto`` (it is emulated
  and many times slower than fp32).
* :func:`plan_precision` / :func:`prepare_generator` - casts the UNet, keeps the VAE in fp32
  under fp16 where it overflows (diffusers' ``force_upcast``), and uses channels_last where it
  is faster (CPU bf16, CUDA half precision).
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
from dataclasses import dataclass

import torch

logger = logging.getLogger("d3sr")

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; explicit devices are checked to exist."""
    if isinstance(name, torch.device):
        device = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(
                f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps"
            ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not _mps_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"unsupported device {device}")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (so bf16 is faster than fp32, not emulated)."""
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if machine in ("arm64", "aarch64"):
        if "bf16" in flags:
            return True
        if platform.system() == "Darwin":
            return _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _sysctl(name: str) -> str:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def resolve_dtype(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device`` (see the module docstring)."""
    if isinstance(precision, torch.dtype):
        if precision not in _NAMES:
            raise ValueError(f"unsupported dtype {precision}: use float32, float16 or bfloat16")
        return precision
    text = str(precision).strip().lower()
    text = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(
        text, text
    )
    if text not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if text != "auto":
        if text == "fp16" and device.type == "cpu":
            logger.warning("fp16 on a CPU is emulated and very slow; bf16 or fp32 is faster")
        return _DTYPES[text]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


@dataclass(frozen=True)
class PrecisionPlan:
    """What :func:`prepare_generator` does.

    Attributes:
        device: where the generator runs.
        unet_dtype: the UNet's compute dtype.
        vae_dtype: the VAE's dtype (fp32 when fp16 would overflow in it).
        channels_last: convert conv weights/activations to NHWC.
    """

    device: torch.device
    unet_dtype: torch.dtype
    vae_dtype: torch.dtype
    channels_last: bool

    def describe(self) -> str:
        return (
            f"{self.device.type}: UNet {_NAMES[self.unet_dtype]}, VAE {_NAMES[self.vae_dtype]}"
            + (", channels_last" if self.channels_last else "")
        )


def plan_precision(
    precision: str | torch.dtype,
    device: torch.device | str,
    vae_force_upcast: bool = True,
    channels_last: bool | None = None,
) -> PrecisionPlan:
    """Pure decision: dtypes and memory format for ``precision`` on ``device``.

    Args:
        precision: ``auto`` | ``fp32`` | ``fp16`` | ``bf16`` or a ``torch.dtype``.
        vae_force_upcast: the VAE config's ``force_upcast`` (True for SD2.1's VAE): under fp16
            the VAE stays fp32, because SD VAEs overflow fp16's 65504 range (NaN/black images).
            bf16 has fp32's range, so a bf16 VAE is kept.
        channels_last: None = where it is faster (CPU bf16; CUDA fp16/bf16); never on MPS.
    """
    device = torch.device(device)
    dtype = resolve_dtype(precision, device)
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_force_upcast else dtype
    if channels_last is None:
        channels_last = (device.type == "cpu" and dtype == torch.bfloat16) or (
            device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        )
    return PrecisionPlan(device, dtype, vae_dtype, bool(channels_last and device.type != "mps"))


def prepare_generator(
    generator,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = "auto",
    *,
    channels_last: bool | None = None,
):
    """Move/cast a loaded :class:`~d3sr_core.models.D3SRGenerator` in place for inference.

    Args:
        generator: the generator (LoRA already merged; any current device/dtype).
        device: target device or name (None: keep the generator's device).
        dtype: a precision name (``auto`` | ``fp32`` | ``fp16`` | ``bf16``) or a ``torch.dtype``.
        channels_last: None = automatic (see :func:`plan_precision`).

    Returns:
        The same generator, in eval mode. Its UNet runs in the chosen dtype; its VAE in the
        dtype :func:`plan_precision` decided (an fp16 VAE that was already cast is upcast back
        to fp32 - merged LoRA weights lose nothing, fp16 -> fp32 is exact).
    """
    device = generator.device if device is None else resolve_device(device)
    force_upcast = bool(getattr(getattr(generator.vae, "config", None), "force_upcast", True))
    plan = plan_precision(dtype or "auto", device, force_upcast, channels_last)
    _cast(generator.unet, device, plan.unet_dtype)
    _cast(generator.vae, device, plan.vae_dtype)
    generator.to(device=device)  # buffers (the prompt embedding) follow
    fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
    generator.unet.to(memory_format=fmt)
    generator.vae.to(memory_format=fmt)
    generator.precision_plan = plan
    logger.info("precision: %s", plan.describe())
    return generator.eval()


def _cast(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model.to(device, dtype)`` without diffusers' "modules that should be kept in float32:
    []" warning, which its ``to()`` logs on every dtype cast even when that list is empty."""
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(device=device, dtype=dtype)  # real fp32 modules: diffusers' own handling
    else:
        torch.nn.Module.to(model, device=device, dtype=dtype)
