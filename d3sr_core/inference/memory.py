"""Memory budgets and out-of-memory handling shared by the tiled stages.

A *budget* is the number of bytes a stage's activations may use on its device, on top of the
weights and of the input/output images. Tile sizes are chosen from it, so peak memory is
bounded by the tile, not by the image; when the device still runs out of memory, the stage
is retried with smaller tiles (:func:`run_with_oom_retry`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

logger = logging.getLogger("d3sr")

T = TypeVar("T")

# Share of the free memory a stage may use by default. A GPU is dedicated to the job; system
# RAM is shared with the OS and the host application (ComfyUI / A1111 keep other models there).
GPU_BUDGET_FRACTION = 0.8
RAM_BUDGET_FRACTION = 0.25
# ...and at most this much on CPU, whatever the RAM: the whole process then peaks below the
# weights + 3 GB for a 2048x2048 output (bench/bench_tiling.py; the budget covers the
# activations, ~0.5 GB go to the torch runtime and ~0.25 GB to buffers outside the budget).
# More only saves recomputation in the tiled VAE: memory_budget_bytes (--memory-budget)
# trades memory for speed.
CPU_BUDGET_CAP_BYTES = int(1.75 * 2**30)
# The same cap for half-precision (bf16) runs. Their states take half the bytes, so a larger
# budget fits the same memory: a 1024x1024 bf16 VAE decode (estimated 2.20 GiB) then runs
# untiled. Measured at 2048x2048 in bf16 on the CI-class AMD machine (bench/bench_large.py):
# a 2.5 GiB cap peaked at weights + 3.28 GB, over the 3 GB goal; the 1.75 GiB run
# peaked at + 2.39 GB. 2.25 GiB is the largest cap that keeps 1024x1024 untiled.
CPU_BUDGET_CAP_BYTES_HALF = int(2.25 * 2**30)
MIN_BUDGET_BYTES = 256 * 2**20
FALLBACK_RAM_BYTES = 4 * 2**30


def system_available_memory() -> int:
    """Available system RAM in bytes (psutil, else ``/proc/meminfo``, else a 4 GiB guess)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # macOS / BSD without psutil: total physical memory, halved as a guess at "free"
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return FALLBACK_RAM_BYTES


def available_memory(device: torch.device | str) -> int:
    """Bytes free for new activations on ``device``.

    CUDA: free device memory plus what PyTorch's caching allocator holds but does not use.
    MPS: the recommended working-set size minus what is allocated (falls back to RAM).
    CPU: available system RAM.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "mps":
        try:
            limit = torch.mps.recommended_max_memory()
            return int(max(limit - torch.mps.current_allocated_memory(), 0))
        except (AttributeError, RuntimeError):
            return system_available_memory()
    return system_available_memory()


def cpu_budget_cap(dtype: torch.dtype | None = None) -> int:
    """The CPU budget cap for activations of ``dtype`` (None: fp32): half-precision states
    are half the size, so they get :data:`CPU_BUDGET_CAP_BYTES_HALF`."""
    if dtype is not None and torch.empty((), dtype=dtype).element_size() <= 2:
        return CPU_BUDGET_CAP_BYTES_HALF
    return CPU_BUDGET_CAP_BYTES


def default_budget(device: torch.device | str, dtype: torch.dtype | None = None) -> int:
    """The default activation budget: a fraction of :func:`available_memory` (on CPU capped
    at :func:`cpu_budget_cap` for the run's widest activation ``dtype``, None = fp32)."""
    device = torch.device(device)
    if device.type == "cpu":
        budget = min(int(available_memory(device) * RAM_BUDGET_FRACTION), cpu_budget_cap(dtype))
    else:
        budget = int(available_memory(device) * GPU_BUDGET_FRACTION)
    return max(budget, MIN_BUDGET_BYTES)


def resolve_budget(
    budget: int | None, device: torch.device | str, dtype: torch.dtype | None = None
) -> int:
    """``budget`` if given (validated), else :func:`default_budget` for ``dtype``."""
    if budget is None:
        return default_budget(device, dtype)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive int or None, got {budget!r}")
    return budget


def is_oom_error(err: BaseException) -> bool:
    """True for the out-of-memory errors of every backend (CUDA, MPS, CPU allocator)."""
    if isinstance(err, MemoryError):
        return True
    for name in ("OutOfMemoryError",):
        for owner in (torch, getattr(torch, "cuda", None)):
            cls = getattr(owner, name, None)
            if isinstance(cls, type) and isinstance(err, cls):
                return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return (
            "out of memory" in text
            or "can't allocate memory" in text
            or ("mps backend out of memory" in text)
        )
    return False


def free_cached_memory(device: torch.device | str) -> None:
    """Return cached blocks to the device after an out-of-memory error."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        try:
            torch.mps.empty_cache()
        except (AttributeError, RuntimeError):
            pass


_LIBC = None
# glibc mallopt() parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's thresholds once its dynamic mmap threshold has adapted to large blocks (the most it
# reaches on 64-bit, DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming): what
# :func:`reuse_freed_heap` leaves behind.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# Inside reuse_freed_heap: blocks up to this size come from the heap and stay there when freed.
HEAP_REUSE_BYTES = 2**30
_heap_reuse_depth = 0


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (every field a size_t)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _glibc(device: torch.device | str):
    """glibc (loaded once), or None off Linux/glibc and for accelerator devices."""
    global _LIBC
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return None
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            if hasattr(_LIBC, "mallinfo2"):  # glibc >= 2.33
                _LIBC.mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_host_memory(device: torch.device | str = "cpu") -> None:
    """Give freed CPU heap memory back to the OS (glibc ``malloc_trim``).

    Tiles of varying shapes make glibc keep freed blocks that the next, slightly larger tile
    cannot reuse, so the resident size creeps far above what is live. Trimming after tiles
    keeps the process's RSS close to the memory budget. A no-op off Linux/glibc or for
    accelerator devices (their caching allocators reuse blocks).
    """
    libc = _glibc(device)
    if libc:
        libc.malloc_trim(0)


def freed_heap_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes of freed blocks glibc's heap holds (``mallinfo2().fordblks``: resident unless
    trimmed); None off Linux/glibc (< 2.33: no ``mallinfo2``) and for accelerator devices."""
    libc = _glibc(device)
    if not libc or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


@contextmanager
def reuse_freed_heap(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within the block, CPU blocks up to :data:`HEAP_REUSE_BYTES` come from glibc's heap and
    freed ones stay there for the next allocation, instead of each block over 32 MB being a
    fresh ``mmap`` whose pages the kernel zero-fills one page fault at a time.

    For the tiled VAE, whose tiles within a pass have the same shapes: the next tile reuses
    the last one's memory. The caller returns the heap to the OS between passes
    (:func:`release_host_memory`); on exit the heap is trimmed and glibc's thresholds are
    set to the values its dynamic threshold reaches for large blocks
    (:data:`GLIBC_MMAP_THRESHOLD_MAX`; glibc has no way to read the previous ones back, and
    fixing them ends its adaptation). Nested blocks keep the setting until the outermost
    exits. A no-op off Linux/glibc and for accelerator devices.

    Measured (``bench/bench_large.py --vae 2048``, one thread): 21.5 M page faults and 42.7 s
    of system time per encode + decode without it, 6.4 M and 13.9 s with it; the peak RSS
    rose from 2.34 to 2.81 GB above the weights (freed blocks held until the pass ends):
    the caller bounds them (:func:`freed_heap_bytes`, :func:`release_host_memory`).
    """
    global _heap_reuse_depth
    libc = _glibc(device)
    if not libc:
        yield
        return
    if _heap_reuse_depth == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_REUSE_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_REUSE_BYTES)
    _heap_reuse_depth += 1
    try:
        yield
    finally:
        _heap_reuse_depth -= 1
        if _heap_reuse_depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)
            libc.malloc_trim(0)


# oneDNN's primitive cache: entries kept by a process that runs the tiled stages (see
# bound_onednn_primitive_cache). oneDNN's default is 1024.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64
_ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def bound_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE_CAPACITY) -> bool:
    """Keep at most ``capacity`` oneDNN primitives cached in this process (the environment
    variable ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), unless the user set it; returns whether it
    was set here.

    oneDNN caches every convolution / matmul primitive it makes for a new shape, up to 1024,
    with the memory each one holds. Tiled stages make one per tile shape, so a process that
    upscales large images accumulates hundreds. Measured at 2048x2048 output (bf16, two
    threads, ``bench/bench_large.py``): the UNet stage after the tiled VAE encode peaked at
    3.09 GB above the weights with the default cache, 2.5-2.9 GB with 64 entries, and the
    whole upscale took 99 s instead of 115 s; a 512x512 upscale was as fast (4.5 s; with no
    cache at all it took 5.2 s, every primitive being remade).

    oneDNN reads the variable once, when the process makes its first primitive (its first CPU
    convolution or matmul): call this at the start of a program that owns its process, as
    the ``d3sr`` command does. A host application (ComfyUI, A1111) has run its own models by
    the time it loads this package: set the variable in its environment before starting it.
    """
    if any(name in os.environ for name in _ONEDNN_CACHE_VARIABLES):
        return False
    os.environ[_ONEDNN_CACHE_VARIABLES[0]] = str(int(capacity))
    return True


class OutOfMemoryAfterRetries(RuntimeError):
    """A stage ran out of memory even with its smallest tiles."""


def run_with_oom_retry(
    attempt: Callable[[float], T],
    *,
    what: str,
    device: torch.device | str,
    max_retries: int = 5,
) -> T:
    """Call ``attempt(shrink)`` with ``shrink = 1``; on out-of-memory, free the device's cache
    and retry with ``shrink`` halved.

    ``attempt`` scales its memory budget (and any explicit tile area) by ``shrink``, so each
    retry runs with smaller tiles. Every retry is logged as a warning (logger ``"d3sr"``).
    After ``max_retries`` the error is re-raised as :class:`OutOfMemoryAfterRetries`.
    """
    shrink = 1.0
    for tries in range(max_retries + 1):
        try:
            return attempt(shrink)
        except Exception as err:  # noqa: BLE001 - filtered by is_oom_error
            if not is_oom_error(err):
                raise
            free_cached_memory(device)
            if tries == max_retries:
                raise OutOfMemoryAfterRetries(
                    f"{what}: out of memory even with tiles {1 / shrink:.0f}x smaller than planned; "
                    "free memory on the device, lower memory_budget_bytes or use a lower precision"
                ) from err
            logger.warning(
                "%s ran out of memory (%s); retrying with smaller tiles (budget x%.3g)",
                what,
                str(err).splitlines()[0][:120] if str(err) else type(err).__name__,
                shrink / 2,
            )
            shrink /= 2
    raise AssertionError("unreachable")
