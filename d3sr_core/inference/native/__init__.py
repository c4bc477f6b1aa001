"""Native CPU kernels for the VAE's memory-bound passes on bfloat16 channels_last maps.

Why
---
With bf16 convolutions on AMX/AVX-512 CPUs, torch's GroupNorm and SiLU took a third of a
default 512x512 upscale's CPU time (issue #12): its bf16 channels_last GroupNorm converts
element by element (22 ms for a ``[1, 128, 512, 512]`` map on 2 cores, 8 ms more for the
SiLU, and the page faults of a fresh output). ``group_norm_act.c`` has the two loops a
GroupNorm+SiLU needs, vectorised across the channels of a pixel: per-channel moments (2 ms)
and normalise+SiLU in one pass that may write in place (10 ms; on the AMX VM 4.2 ms, 5.7 ms
before its sigmoid lost the clamping and the rounding instruction, 2026-12-04).

How
---
The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``;
``-O3 -march=native -fopenmp``) into ``$D3SR_KERNEL_CACHE`` (default
``~/.cache/d3sr/kernels``), under a name hashed from the source, the flags, the compiler and
the CPU, and loaded with :mod:`ctypes` (calls release the GIL; OpenMP threads follow
``torch.get_num_threads()``). Where that fails (no compiler, Windows, a sandbox without a
writable cache) a warning says why once and every caller uses torch's own ops: these
functions return ``None`` and the callers fall back. ``D3SR_NATIVE_KERNELS=0`` turns them off.
Each call is a ``torch.profiler`` range (``d3sr::...``), so profiles count its time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("group_norm_act.c")
ENV_SWITCH = "D3SR_NATIVE_KERNELS"
ENV_CACHE = "D3SR_KERNEL_CACHE"
MAX_CHANNELS = 4096  # the C code's per-thread accumulators


def cache_dir() -> Path:
    """Where built kernels are kept: ``$D3SR_KERNEL_CACHE``, else ``~/.cache/d3sr/kernels``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "d3sr" / "kernels"


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # compilers default to 256-bit vectors on AVX-512 parts; these loops are not
        # frequency-bound, and 512 bits halve the conversion work
        flags.append("-mprefer-vector-width=512")
    return [*flags, "-shared", "-fPIC"]


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _build(compiler: str) -> Path:
    flags = _flags()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(flags), version, _cpu_id()])
    target = cache_dir() / f"group_norm_act-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def find_compiler() -> str | None:
    """``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or ``None`` (with one warning saying why) where they cannot be built."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if sys.platform == "win32":
        return None  # no system compiler to rely on; torch's ops are used
    compiler = find_compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler (set $CC or install gcc/clang)")
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as exc:  # noqa: BLE001 - any failure means "use torch's ops"
        warnings.warn(
            f"D3SR native GroupNorm kernels unavailable ({exc}); using torch's GroupNorm "
            f"(slower on CPU). Set {ENV_SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.d3sr_channel_moments_bf16.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.d3sr_affine_act_bf16.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
    return lib


def applies_to(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a dense channels_last bf16 CPU ``[B, C, H, W]`` tensor."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.numel() > 0
        and x.shape[1] <= MAX_CHANNELS
        and x.is_contiguous(memory_format=torch.channels_last)
        and library() is not None
    )


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-(sample, channel) mean and sum of squared deviations of ``x`` ``[B, C, H, W]``
    (float64 ``[B, C]`` each), or ``None`` where :func:`applies_to` is false."""
    if not applies_to(x):
        return None
    b, c, h, w = x.shape
    lib = library()
    means, m2s = [], []
    with torch.profiler.record_function("d3sr::channel_moments"):
        for i in range(b):
            xi = x[i : i + 1]
            # deviations from the first pixel, not from zero: no cancellation far from zero
            shift = xi[0, :, 0, 0].float().contiguous()
            s = torch.empty(c, dtype=torch.float64)
            q = torch.empty(c, dtype=torch.float64)
            lib.d3sr_channel_moments_bf16(
                _ptr(xi), h * w, c, _ptr(shift), _ptr(s), _ptr(q), torch.get_num_threads()
            )
            means.append(shift.double() + s / (h * w))
            m2s.append((q - s * s / (h * w)).clamp_min(0.0))
    return torch.stack(means), torch.stack(m2s)


def affine_act(
    x: Tensor, scale: Tensor, shift: Tensor, act: bool, out: Tensor | None = None
) -> Tensor | None:
    """``act(x * scale + shift)`` per channel (``act``: SiLU or identity), with
    ``scale``/``shift`` ``[B, C]`` in float32, into ``out`` (may be ``x``) when the kernels
    take it and it has ``x``'s shape, else into a new tensor. ``None`` where
    :func:`applies_to` is false for ``x``."""
    if not applies_to(x):
        return None
    if out is None or not (out.shape == x.shape and applies_to(out)):
        out = torch.empty_like(x, memory_format=torch.channels_last)
    b, c, h, w = x.shape
    lib = library()
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    with torch.profiler.record_function("d3sr::norm_act"):
        for i in range(b):
            lib.d3sr_affine_act_bf16(
                _ptr(x[i : i + 1]),
                _ptr(out[i : i + 1]),
                h * w,
                c,
                _ptr(scale[i]),
                _ptr(shift[i]),
                int(act),
                torch.get_num_threads(),
            )
    return out
