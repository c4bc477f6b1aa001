"""Memory budgets and out-of-memory retries: every number and message written out, devices
and the OS simulated (fast, no model)."""

import ctypes
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from d3sr_core.inference import memory

GIB = 2**30


def test_constants_are_the_documented_ones():
    assert memory.GPU_BUDGET_FRACTION == 0.8 and memory.RAM_BUDGET_FRACTION == 0.25
    assert memory.CPU_BUDGET_CAP_BYTES == 1_879_048_192  # 1.75 GiB
    assert memory.CPU_BUDGET_CAP_BYTES_HALF == 2_415_919_104  # 2.25 GiB
    assert memory.MIN_BUDGET_BYTES == 256 * 2**20 and memory.FALLBACK_RAM_BYTES == 4 * GIB


def test_onednn_primitive_cache_bound_unless_the_user_set_one(monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.setenv(name, "")  # so that the value set below is undone after the test
        monkeypatch.delenv(name)
    assert memory.ONEDNN_PRIMITIVE_CACHE_CAPACITY == 64
    assert memory.bound_onednn_primitive_cache() is True
    assert memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert memory.bound_onednn_primitive_cache(8) is False  # already set: kept
    assert memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # the user's choice wins
    assert memory.bound_onednn_primitive_cache() is False
    assert memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "128")  # oneDNN's older name
    assert memory.bound_onednn_primitive_cache(16) is False
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in memory.os.environ
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY")
    assert memory.bound_onednn_primitive_cache(16) is True
    assert memory.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"


def test_system_memory_sources_in_order(monkeypatch, tmp_path):
    fake_psutil = SimpleNamespace(virtual_memory=lambda: SimpleNamespace(available=123456))
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil)
    assert memory.system_available_memory() == 123456
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n")
    opened = []

    def fake_open(path, *args, **kwargs):
        opened.append(path)
        return open(meminfo, *args, **kwargs)

    monkeypatch.setattr(memory, "open", fake_open, raising=False)
    assert memory.system_available_memory() == 2048 * 1024 and opened == ["/proc/meminfo"]

    def no_file(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(memory, "open", no_file, raising=False)
    pages = {"SC_PAGE_SIZE": 4095, "SC_PHYS_PAGES": 1001}  # an odd product: halved, an int
    monkeypatch.setattr(memory.os, "sysconf", lambda name: pages[name], raising=False)
    assert memory.system_available_memory() == 2049547
    assert isinstance(memory.system_available_memory(), int)

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(memory.os, "sysconf", no_sysconf, raising=False)
    assert memory.system_available_memory() == 4 * GIB


def test_available_memory_per_device(monkeypatch):
    monkeypatch.setattr(memory, "system_available_memory", lambda: 777)
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: asked.append(i) or (1000, 5000))
    reserved = {"value": 300}
    monkeypatch.setattr(
        torch.cuda, "memory_reserved", lambda i: {3: 1, 1: 1, 0: 1}[i] * reserved["value"]
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: {3: 100, 1: 100, 0: 100}[i])
    assert memory.available_memory("cuda") == 1000 + 200  # free + cached but unused
    assert memory.available_memory("cuda:1") == 1200 and asked == [3, 1]
    reserved["value"] = 50  # never negative
    assert memory.available_memory(torch.device("cuda", 0)) == 1000
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 5000, raising=False)
    allocated = {"value": 1000}
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: allocated["value"])
    assert memory.available_memory("mps") == 4000
    allocated["value"] = 6000
    assert memory.available_memory("mps") == 0

    def unsupported():
        raise RuntimeError("no MPS")

    monkeypatch.setattr(torch.mps, "recommended_max_memory", unsupported, raising=False)
    assert memory.available_memory("mps") == 777
    assert memory.available_memory("cpu") == 777


def test_default_and_resolved_budgets(monkeypatch):
    free = {"value": 4 * GIB}

    def available(device):
        assert torch.device(device).type in ("cpu", "cuda", "mps")
        return free["value"]

    monkeypatch.setattr(memory, "available_memory", available)
    assert memory.cpu_budget_cap() == memory.cpu_budget_cap(torch.float32) == 1_879_048_192
    for dtype in (torch.bfloat16, torch.float16, torch.uint8):
        assert memory.cpu_budget_cap(dtype) == 2_415_919_104
    assert memory.cpu_budget_cap(torch.float64) == 1_879_048_192
    assert memory.default_budget("cpu") == GIB  # a quarter of the free RAM
    free["value"] = 16 * GIB  # a quarter would be 4 GiB: capped
    assert memory.default_budget("cpu") == 1_879_048_192
    assert memory.resolve_budget(None, "cpu", torch.bfloat16) == 2_415_919_104
    assert memory.default_budget("cuda") == int(16 * GIB * 0.8)
    assert memory.default_budget("mps", torch.float16) == int(16 * GIB * 0.8)
    free["value"] = 100 * 2**20
    assert memory.default_budget("cpu") == memory.default_budget("cuda") == 256 * 2**20
    assert memory.resolve_budget(1, "cpu") == 1
    for bad in (0, -5, True, 1.5, "1000"):
        with pytest.raises(ValueError) as err:
            memory.resolve_budget(bad, "cpu")
        assert str(err.value) == f"memory_budget_bytes must be a positive int or None, got {bad!r}"


def test_out_of_memory_errors_of_every_backend():
    assert memory.is_oom_error(torch.cuda.OutOfMemoryError("CUDA"))
    assert memory.is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert memory.is_oom_error(RuntimeError("CUDA error: OUT OF MEMORY"))
    assert memory.is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 GB"))
    assert not memory.is_oom_error(ValueError("out of memory"))  # not a runtime error
    assert not memory.is_oom_error(RuntimeError("memory layout mismatch"))


def test_freeing_caches_per_device(monkeypatch):
    calls = []
    monkeypatch.setattr(memory.gc, "collect", lambda: calls.append("gc"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))
    for device in ("cpu", "cuda", "mps"):
        memory.free_cached_memory(device)
    assert calls == ["gc", "gc", "cuda", "gc", "mps"]

    def broken():
        raise RuntimeError("no MPS")

    monkeypatch.setattr(torch.mps, "empty_cache", broken)
    memory.free_cached_memory("mps")  # swallowed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    memory.free_cached_memory("cuda")
    assert calls == ["gc", "gc", "cuda", "gc", "mps", "gc", "gc"]


def test_host_memory_is_trimmed_on_linux_cpus_only(monkeypatch):
    trims = []
    libc = SimpleNamespace(malloc_trim=SimpleNamespace(argtypes=None))
    libc.malloc_trim = type(
        "Trim", (), {"argtypes": None, "__call__": lambda s, n: trims.append(n)}
    )()
    libc.mallopt = SimpleNamespace(argtypes=None)
    loaded = []
    monkeypatch.setattr(memory, "_LIBC", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: loaded.append(name) or libc)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    memory.release_host_memory("cuda")
    assert trims == [] and loaded == []
    memory.release_host_memory()
    memory.release_host_memory("cpu")
    assert trims == [0, 0] and loaded == ["libc.so.6"]
    assert libc.malloc_trim.argtypes == [ctypes.c_size_t]
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    memory.release_host_memory("cpu")
    assert trims == [0, 0]

    def no_libc(name):
        raise OSError(name)

    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory, "_LIBC", None)
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    memory.release_host_memory("cpu")
    assert memory._LIBC is False and trims == [0, 0]


class _Recorder:
    """A libc function that records its calls."""

    def __init__(self, name, calls):
        self.name, self.calls, self.argtypes = name, calls, None

    def __call__(self, *args):
        self.calls.append((self.name, *args))
        return 1


def test_freed_heap_reuse_sets_and_restores_glibc_thresholds(monkeypatch):
    """Inside reuse_freed_heap (CPU, Linux): mallopt(M_MMAP_THRESHOLD = -3, 1 GiB) and
    mallopt(M_TRIM_THRESHOLD = -1, 1 GiB) once, however deeply nested; when the outermost
    block exits (also by an exception): 32 MiB and 64 MiB, then malloc_trim(0). Nothing for
    accelerator devices or off Linux."""
    calls = []
    libc = SimpleNamespace(malloc_trim=_Recorder("trim", calls), mallopt=_Recorder("opt", calls))
    monkeypatch.setattr(memory, "_LIBC", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    with memory.reuse_freed_heap("cuda"):
        pass
    assert calls == []
    assert libc.mallopt.argtypes is None  # not even loaded
    with pytest.raises(KeyError):
        with memory.reuse_freed_heap("cpu"):
            assert calls == [("opt", -3, 2**30), ("opt", -1, 2**30)]
            with memory.reuse_freed_heap(torch.device("cpu")):
                pass
            assert len(calls) == 2, "the inner block changes nothing"
            raise KeyError("fails inside")
    assert calls[2:] == [("opt", -3, 32 * 2**20), ("opt", -1, 64 * 2**20), ("trim", 0)]
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int]
    monkeypatch.setattr(memory.sys, "platform", "win32")
    with memory.reuse_freed_heap("cpu"):
        pass
    assert len(calls) == 5


def test_freed_heap_bytes_read_glibc_mallinfo2(monkeypatch):
    """freed_heap_bytes: glibc's free heap bytes (mallinfo2().fordblks); None without
    mallinfo2 (glibc < 2.33), off Linux or for accelerator devices."""
    free = [0]

    class MallInfo2:
        restype = None

        def __call__(self):
            info = memory._MallInfo2()
            info.fordblks = free[0]
            info.arena = 7  # another field: not the one read
            return info

    calls = []
    libc = SimpleNamespace(
        malloc_trim=_Recorder("trim", calls), mallopt=_Recorder("opt", calls), mallinfo2=MallInfo2()
    )
    monkeypatch.setattr(memory, "_LIBC", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    for nbytes in (0, 1001, 10**12):
        free[0] = nbytes
        assert memory.freed_heap_bytes("cpu") == nbytes
    assert calls == []  # reading never trims
    assert libc.mallinfo2.restype is memory._MallInfo2
    assert memory.freed_heap_bytes("cuda") is None
    del libc.mallinfo2
    assert memory.freed_heap_bytes("cpu") is None
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    monkeypatch.setattr(memory, "_LIBC", None)
    assert memory.freed_heap_bytes("cpu") is None
    # the struct is glibc's: ten size_t fields, fordblks the ninth
    names = [n for n, _ in memory._MallInfo2._fields_]
    assert names.index("fordblks") == 8 and len(names) == 10
    assert ctypes.sizeof(memory._MallInfo2) == 10 * ctypes.sizeof(ctypes.c_size_t)


# Run in a fresh interpreter: in a long test process another thread may hold the main glibc
# arena's lock, and the allocations then go to an arena of their own, in another state.
_FAULTS_SCRIPT = """
import json, resource, torch
from d3sr_core.inference import memory

torch.set_num_threads(1)  # every fault in this thread

def faults_of_a_second_block():
    torch.ones(10 * 2**20)  # 40 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    torch.ones(10 * 2**20)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

out = [faults_of_a_second_block()]
with memory.reuse_freed_heap("cpu"):
    out.append(min(faults_of_a_second_block() for _ in range(3)))
out.append(faults_of_a_second_block())
with memory.reuse_freed_heap("cpu"):
    block = torch.ones(10 * 2**20)
    held = memory.freed_heap_bytes()
    del block  # 40 MiB freed into the heap
    out.append(memory.freed_heap_bytes() - held)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_freed_heap_reuse_avoids_page_faults_for_a_repeated_block():
    """The real effect: a 40 MiB tensor (over glibc's largest dynamic mmap threshold,
    32 MiB) freed and made again is zero-filled page by page by the kernel (about 1 fault
    per 4 KiB page) before and after the block, and reuses the freed memory inside it, as a
    pass's next tile does (a few faults at most); and freed_heap_bytes reads the real
    mallinfo2 (the 40 MiB freed into the heap)."""
    import json
    import subprocess

    run = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True
    )
    before, inside, after, freed = json.loads(run.stdout.splitlines()[-1])
    pages = 40 * 2**20 // 4096
    assert before >= 0.9 * pages and after >= 0.9 * pages
    assert inside < pages // 10
    assert 40 * 2**20 <= freed < 41 * 2**20


def test_retries_halve_the_budget_and_log_each_time(monkeypatch, caplog):
    freed = []
    monkeypatch.setattr(memory, "free_cached_memory", lambda device: freed.append(device))
    errors = [MemoryError(), RuntimeError("out of memory\nsecond line"), None]
    shrinks = []

    def attempt(shrink):
        shrinks.append(shrink)
        err = errors[len(shrinks) - 1]
        if err is not None:
            raise err
        return "done"

    with caplog.at_level(logging.WARNING, logger="d3sr"):
        assert memory.run_with_oom_retry(attempt, what="UNet", device="cuda:1") == "done"
    assert shrinks == [1.0, 0.5, 0.25] and freed == ["cuda:1", "cuda:1"]
    assert [r.getMessage() for r in caplog.records] == [
        "UNet ran out of memory (MemoryError); retrying with smaller tiles (budget x0.5)",
        "UNet ran out of memory (out of memory); retrying with smaller tiles (budget x0.25)",
    ]
    long = RuntimeError("out of memory " + "x" * 200)
    caplog.clear()
    shrinks.clear()

    def always(shrink):
        shrinks.append(shrink)
        raise long

    with caplog.at_level(logging.WARNING, logger="d3sr"):
        with pytest.raises(memory.OutOfMemoryAfterRetries) as err:
            memory.run_with_oom_retry(always, what="VAE decode", device="cpu", max_retries=2)
    assert shrinks == [1.0, 0.5, 0.25] and err.value.__cause__ is long
    assert str(err.value) == (
        "VAE decode: out of memory even with tiles 4x smaller than planned; free memory on the "
        "device, lower memory_budget_bytes or use a lower precision"
    )
    assert caplog.records[0].getMessage() == (
        f"VAE decode ran out of memory ({str(long)[:120]}); retrying with smaller tiles "
        "(budget x0.5)"
    )
    shrinks.clear()
    with pytest.raises(memory.OutOfMemoryAfterRetries):
        memory.run_with_oom_retry(always, what="x", device="cpu", max_retries=0)
    assert shrinks == [1.0]
    shrinks.clear()
    with pytest.raises(memory.OutOfMemoryAfterRetries):
        memory.run_with_oom_retry(always, what="x", device="cpu")
    assert len(shrinks) == 6  # five retries by default
