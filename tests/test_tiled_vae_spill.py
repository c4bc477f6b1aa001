"""Checkpoints on disk (tiled_vae.spill): exact round trips of tiles, runs that spill equal
runs that keep or recompute, the temporary files disappear on success and on failure, and a
full disk gives an error that says where and how much."""

import dataclasses
import errno
import os
import threading
import time

import pytest
import torch
from tiny_models import tiny_vae

from d3sr_core.inference import tiled_vae
from d3sr_core.inference.tiled_vae import Region, TiledVAEConfig, TiledVAERunner
from d3sr_core.inference.tiled_vae import runner as runner_module
from d3sr_core.inference.tiled_vae.spill import SpilledTensor, SpillError, SpillFiles, SpillIO


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture
def cheap_io(monkeypatch):
    """Disk I/O priced as it is against the full-size VAE's convs: the tiny VAE's convs have
    4-32 channels instead of 128-512, so at the real prices it would rather recompute."""
    monkeypatch.setattr(tiled_vae.planner, "SPILL_WRITE_COST", 1.0)
    monkeypatch.setattr(tiled_vae.planner, "SPILL_READ_COST", 1.0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("channels", [5, 1])  # one channel: any stride on its axis
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_spilled_tensor_round_trips_any_region(tmp_path, dtype, fmt, channels):
    x = torch.randn(2, channels, 13, 17, generator=torch.Generator().manual_seed(30)).to(dtype)
    fds = _open_fds()
    t = SpilledTensor(tuple(x.shape), dtype, tmp_path, fmt)
    # written as a grid of tiles (full-width bands and partial rows), in either layout
    for y0, y1 in ((0, 6), (6, 13)):
        for x0, x1 in ((0, 17),) if y0 == 0 else ((0, 9), (9, 17)):
            tile = x[:, :, y0:y1, x0:x1]
            t.write(Region(y0, y1, x0, x1), tile.contiguous(memory_format=torch.channels_last))
    assert os.listdir(tmp_path) == [], "the file has no name"
    for r in (Region(0, 13, 0, 17), Region(3, 11, 2, 15), Region(12, 13, 16, 17)):
        out = t.read(r)
        assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
        assert torch.equal(out, x[:, :, r.y0 : r.y1, r.x0 : r.x1])
    t.write(Region(0, 13, 0, 17), -x)  # a whole tensor in NCHW memory, not a crop
    assert torch.equal(t.read(Region(0, 13, 0, 17)), -x)
    t.close()
    assert _open_fds() == fds and t.closed


@pytest.mark.parametrize("failing", [None, "pwrite", "short pwrite", "preadv"])
def test_direct_io_round_trips_unaligned_runs(tmp_path, monkeypatch, failing):
    """Runs that straddle disk blocks: the aligned middles are written around the page
    cache, the ends (less than a block each) through it, the blocks around a run read back
    around it, and the file reads back exactly; if a direct write or read fails or a direct
    write comes back short, the file falls back to the page cache for good (from the first
    byte not written) and still reads back exactly."""
    from d3sr_core.inference.tiled_vae import spill

    monkeypatch.setattr(spill, "DIRECT_CHUNK", 2 * spill.DIRECT_ALIGN)  # several chunks a run
    x = torch.randn(2, 64, 40, 70, generator=torch.Generator().manual_seed(36))
    fds = _open_fds()
    t = SpilledTensor(tuple(x.shape), torch.float32, tmp_path, torch.contiguous_format)
    if not t.direct:
        pytest.skip(f"no O_DIRECT on {tmp_path}")
    buffered: list[int] = []
    write_buffered = t._write_buffered
    t._write_buffered = lambda offset, view: (
        buffered.append(len(view)) or write_buffered(offset, view)
    )
    if failing == "short pwrite":
        pwrite = os.pwrite

        def short(fd, data, offset):  # in the second image (a run not at 0): one block
            return pwrite(fd, data[: spill.DIRECT_ALIGN] if offset >= half else data, offset)

        half = t.nbytes // 2

        monkeypatch.setattr(spill.os, "pwrite", short)
    elif failing:

        def refuse(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(spill.os, failing, refuse)
    for y0, y1 in ((0, 9), (9, 40)):  # a full-width band (one run), then 3 x 31 rows of runs
        for x0, x1 in ((0, 70),) if y0 == 0 else ((0, 23), (23, 51), (51, 70)):
            t.write(Region(y0, y1, x0, x1), x[:, :, y0:y1, x0:x1])
    assert t.direct is (failing not in ("pwrite", "short pwrite"))
    if failing is None:  # only the unaligned ends went through the page cache
        assert buffered and max(buffered) < 2 * spill.DIRECT_ALIGN
    assert torch.equal(t.read(Region(7, 33, 5, 66)), x[:, :, 7:33, 5:66])
    assert torch.equal(t.read(Region(0, 40, 0, 70)), x)
    assert t.direct is (failing is None)
    t.close()
    assert _open_fds() == fds


def test_full_width_band_is_read_straight_into_its_buffer(tmp_path):
    """A full-width band (what the banded passes read) is read into the buffer that
    ``empty`` places for it: its block-aligned middle in place, only its unaligned ends (less
    than a block each) through the bounce buffer; a buffer at any other address is read
    through the bounce buffer; both exactly."""
    from d3sr_core.inference.tiled_vae import spill

    x = torch.randn(1, 64, 40, 70, generator=torch.Generator().manual_seed(37))
    t = SpilledTensor(tuple(x.shape), torch.float32, tmp_path, torch.contiguous_format)
    if not t.direct:
        pytest.skip(f"no O_DIRECT on {tmp_path}")
    t.write(Region(0, 40, 0, 70), x)
    bounced: list[int] = []
    read_bounced = t._read_bounced
    t._read_bounced = lambda offset, view: bounced.append(len(view)) or read_bounced(offset, view)
    band = Region(9, 31, 0, 70)  # rows of 17 920 bytes: starts and ends inside a block
    band_bytes = band.h * band.w * 64 * 4
    assert torch.equal(t.read(band), x[:, :, 9:31])
    assert t.direct and len(bounced) == 2 and sum(bounced) < 2 * spill.DIRECT_ALIGN
    bounced.clear()
    buffer = t.empty(band)
    raw = buffer.permute(0, 2, 3, 1).reshape(-1)
    shifted = torch.empty(raw.numel() + 1)[1:].view(1, band.h, band.w, 64).permute(0, 3, 1, 2)
    assert torch.equal(t.load(band, shifted), x[:, :, 9:31])
    assert sum(bounced) == band_bytes
    t.close()


def test_full_width_band_is_written_straight_from_its_buffer(tmp_path, monkeypatch):
    """A band computed into the buffer that ``empty`` places for it (as the runner has the
    op that makes a spilled state do) is written with its block-aligned middle straight from
    that buffer: one direct write, no bounce buffer. A buffer at any other address is copied
    through the bounce buffer. Both exactly."""
    from d3sr_core.inference.tiled_vae import spill

    x = torch.randn(1, 64, 40, 70, generator=torch.Generator().manual_seed(41))
    t = SpilledTensor(tuple(x.shape), torch.float32, tmp_path, torch.contiguous_format)
    if not t.direct:
        pytest.skip(f"no O_DIRECT on {tmp_path}")
    direct_writes: list[int] = []
    pwrite = os.pwrite
    monkeypatch.setattr(
        spill.os,
        "pwrite",
        lambda fd, data, pos: direct_writes.append(len(data)) or pwrite(fd, data, pos),
    )
    band = Region(9, 31, 0, 70)  # rows of 17 920 bytes: starts and ends inside a block
    band_bytes = band.h * band.w * 64 * 4
    buffer = t.empty(band)
    buffer.copy_(x[:, :, 9:31])
    t.write(band, buffer)
    assert t.direct and t._bounce is None
    assert len(direct_writes) == 1 and band_bytes - 2 * spill.DIRECT_ALIGN < direct_writes[0]
    rest = Region(31, 40, 0, 70)
    shifted = torch.empty(rest.h * rest.w * 64 + 1)[1:].view(1, rest.h, rest.w, 64)
    shifted = shifted.permute(0, 3, 1, 2)
    shifted.copy_(x[:, :, 31:])
    t.write(rest, shifted)
    t.write(Region(0, 9, 0, 70), x[:, :, :9])
    assert t.direct and t._bounce is not None
    assert torch.equal(t.read(Region(0, 40, 0, 70)), x)
    t.close()


class _InMemory(SpilledTensor):
    """The same interface, kept in a tensor: what a spilled run would compute if the disk
    round trip were perfect."""

    def __init__(
        self,
        shape,
        dtype,
        directory=None,
        memory_format=torch.channels_last,
        device="cpu",
        files=None,
    ):
        self.shape, self.dtype, self.memory_format = tuple(shape), dtype, memory_format
        self.device = torch.device(device)
        self.t = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        self.itemsize = self.t.element_size()
        self.nbytes = self.t.numel() * self.itemsize
        self._file = None

    closed = False

    def close(self):
        self.closed = True

    def store(self, region, tensor):
        self.t[:, :, region.y0 : region.y1, region.x0 : region.x1] = tensor

    def load(self, region, out=None):
        out = self.empty(region) if out is None else out
        return out.copy_(self.t[:, :, region.y0 : region.y1, region.x0 : region.x1])


def test_spill_files_reuse_only_exact_sizes_and_never_hold_more(tmp_path):
    """A dropped checkpoint's file is written over by the next one of exactly its size (the
    new values read back, not the old); a checkpoint of another size deletes every idle file
    first; close deletes what is left, and files given back after it at once."""
    files = SpillFiles()
    fds = _open_fds()
    region = Region(0, 8, 0, 8)
    a = SpilledTensor((1, 16, 8, 8), torch.bfloat16, tmp_path, files=files)
    a.store(region, torch.full((1, 16, 8, 8), 1.0, dtype=torch.bfloat16))
    handle = a._file
    a.close()
    assert a.closed and files.idle_bytes == a.nbytes and _open_fds() > fds  # kept open
    b = SpilledTensor((1, 16, 8, 8), torch.bfloat16, tmp_path, files=files)
    assert b._file is handle and files.reused == 1 and files.idle_bytes == 0
    b.store(region, torch.full((1, 16, 8, 8), 2.0, dtype=torch.bfloat16))
    assert torch.equal(b.read(region), torch.full((1, 16, 8, 8), 2.0, dtype=torch.bfloat16))
    b.close()
    # another size (the same bytes in another shape would fit: only the size counts)
    c = SpilledTensor((1, 8, 8, 8), torch.bfloat16, tmp_path, files=files)
    assert c._file is not handle and files.reused == 1 and files.idle_bytes == 0
    assert handle.closed, "the idle file was deleted before a new one was made"
    c.close()
    files.close()
    assert files.idle_bytes == 0 and _open_fds() == fds and os.listdir(tmp_path) == []
    d = SpilledTensor((1, 8, 8, 8), torch.bfloat16, tmp_path, files=files)
    d.close()  # after close(): deleted at once
    assert files.idle_bytes == 0 and _open_fds() == fds


def test_spill_equals_keep_and_recompute(vae, tmp_path, cheap_io, monkeypatch):
    """States kept in memory, recomputed, or on disk: the same output (up to the summation
    order of different tile grids), and exactly the output of the same schedule with the
    files replaced by memory (the disk round trip loses nothing)."""
    z = torch.randn(1, 4, 8, 11, generator=torch.Generator().manual_seed(31))
    x = torch.rand(1, 3, 56, 72, generator=torch.Generator().manual_seed(32)) * 2 - 1
    runs = {
        "keep": (10**12, False, SpilledTensor),
        "recompute": (1, False, SpilledTensor),
        "spill": (1, True, SpilledTensor),
        "spill in memory": (1, True, _InMemory),
    }
    with torch.inference_mode():
        for program, inp in ((tiled_vae.decoder_program, z), (tiled_vae.encoder_program, x)):
            outs, reports = {}, {}
            for name, (budget, spill, store) in runs.items():
                monkeypatch.setattr(runner_module, "SpilledTensor", store)
                config = TiledVAEConfig(budget=budget, tile=16, spill=spill, spill_dir=tmp_path)
                runner = TiledVAERunner(program(vae), config)
                outs[name], reports[name] = runner.run(inp), runner.report
            assert reports["spill"].spilled and not reports["spill"].recomputed
            assert 0 < reports["spill"].spill_peak <= reports["spill"].spill_bytes
            # the I/O threads' CPU time is counted, and only when there is file I/O
            assert reports["spill"].spill_io_cpu_s > 0 == reports["keep"].spill_io_cpu_s
            assert reports["recompute"].recomputed and not reports["recompute"].spilled
            assert not reports["keep"].spilled and not reports["keep"].recomputed
            # a later state of the same size was written over a dropped one's file
            assert reports["spill"].spill_files_reused > 0
            untimed = {
                k: dataclasses.replace(
                    r, spill_wait_s=0.0, spill_io_cpu_s=0.0, spill_files_reused=0
                )
                for k, r in reports.items()
            }
            assert untimed["spill"] == untimed["spill in memory"]
            assert torch.equal(outs["spill"], outs["spill in memory"]), program.__name__
            for name in ("spill", "recompute"):
                torch.testing.assert_close(outs[name], outs["keep"], atol=1e-5, rtol=1e-5)
    assert os.listdir(tmp_path) == []


def test_each_spilled_state_is_written_once(vae, tmp_path, monkeypatch, cheap_io):
    """Every tile of a spilled state is written once: the bytes written to each file are its
    size, also for the passes that end with a Push (both stack entries are one state).
    Where the state's last op can write into a given tensor (Residual, UpConv), every tile is
    computed into the buffer that ``empty`` places for the file (then written with no copy);
    a conv's tiles are not."""
    written: dict[int, int] = {}
    made: list[SpilledTensor] = []
    placed: set[int] = set()  # addresses of the buffers empty() handed out
    stores: dict[int, set[bool]] = {}  # file -> whether its tiles came from those buffers

    class Counted(SpilledTensor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def empty(self, region):
            buffer = super().empty(region)
            placed.add(buffer.data_ptr())
            return buffer

        def load(self, region, out=None):
            if out is not None:  # a buffer for a read, not for a tile
                placed.discard(out.data_ptr())
            return super().load(region, out)

        def store(self, region, tensor):
            written[id(self)] = written.get(id(self), 0) + tensor.numel() * tensor.element_size()
            stores.setdefault(id(self), set()).add(tensor.data_ptr() in placed)
            placed.discard(tensor.data_ptr())  # (freed after this: the address may be reused)
            super().store(region, tensor)

    monkeypatch.setattr(runner_module, "SpilledTensor", Counted)
    z = torch.randn(1, 4, 8, 11, generator=torch.Generator().manual_seed(38))
    config = TiledVAEConfig(budget=1, tile=16, spill_dir=tmp_path)
    with torch.inference_mode():
        runner = TiledVAERunner(tiled_vae.decoder_program(vae), config)
        runner.run(z)
    ops = runner.ops
    assert any(isinstance(ops[s - 1], tiled_vae.ops.Push) for s in runner.report.spilled)
    assert made and {id(f): f.nbytes for f in made} == written
    makers = [
        next(op for op in reversed(ops[:s]) if not isinstance(op, tiled_vae.ops.Push))
        for s in runner.report.spilled
    ]
    assert len(made) == len(makers)  # one new state per spilled pass here
    assert [stores[id(f)] for f in made] == [{op.writes_out} for op in makers]
    assert {type(op).__name__ for op in makers} >= {"Residual", "UpConv", "Conv"}


def test_spill_files_are_removed_on_success_and_on_error(vae, tmp_path, monkeypatch, cheap_io):
    made: list[SpilledTensor] = []

    class Recorded(SpilledTensor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(runner_module, "SpilledTensor", Recorded)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(33))
    config = TiledVAEConfig(budget=1, tile=16, spill_dir=tmp_path)
    fds = _open_fds()
    with torch.inference_mode():
        TiledVAERunner(tiled_vae.decoder_program(vae), config).run(z)
    assert made and all(t.closed for t in made)
    assert _open_fds() == fds and os.listdir(tmp_path) == []

    made.clear()

    def cancel(fraction: float) -> None:
        if fraction > 0.5:
            raise KeyboardInterrupt("cancelled")

    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        TiledVAERunner(tiled_vae.decoder_program(vae), config, tick=cancel).run(z)
    assert made and all(t.closed for t in made), "files of the failed run are deleted"
    assert _open_fds() == fds and os.listdir(tmp_path) == []


def test_full_disk_or_missing_directory_is_a_clear_error(vae, tmp_path, monkeypatch, cheap_io):
    missing = tmp_path / "nope"
    with pytest.raises(SpillError, match="nope"):
        SpilledTensor((1, 8, 64, 64), torch.float32, missing)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    fds = _open_fds()
    with pytest.raises(SpillError, match=r"0\.13 GB .*No space left") as err:
        SpilledTensor((1, 8, 2048, 2048), torch.float32, tmp_path)
    assert err.value.errno == errno.ENOSPC and str(tmp_path) in str(err.value)
    assert _open_fds() == fds, "the half-made file is closed"
    files = SpillFiles()
    with pytest.raises(SpillError, match="No space left"):
        SpilledTensor((1, 8, 2048, 2048), torch.float32, tmp_path, files=files)
    assert files.idle_bytes == 0 and _open_fds() == fds, "not kept for reuse either"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(34))
    with torch.inference_mode(), pytest.raises(SpillError, match="memory budget"):
        config = TiledVAEConfig(budget=1, tile=16, spill_dir=tmp_path)
        TiledVAERunner(tiled_vae.decoder_program(vae), config).run(z)
    assert _open_fds() == fds


def test_a_failed_background_write_stops_the_run(vae, tmp_path, monkeypatch, cheap_io):
    """Writes run on an I/O thread: an error there (e.g. EIO) reaches the caller as the
    SpillError, the I/O threads stop and every file is deleted."""
    made: list[SpilledTensor] = []

    class Failing(SpilledTensor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def store(self, region, tensor):
            raise SpillError(errno.EIO, f"tiled VAE: writing a checkpoint to {tmp_path} failed")

    monkeypatch.setattr(runner_module, "SpilledTensor", Failing)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(37))
    config = TiledVAEConfig(budget=1, tile=16, spill_dir=tmp_path)
    fds = _open_fds()
    with torch.inference_mode(), pytest.raises(SpillError, match="writing a checkpoint"):
        TiledVAERunner(tiled_vae.decoder_program(vae), config).run(z)
    assert made and all(t.closed for t in made)
    assert _open_fds() == fds and os.listdir(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("d3sr-spill")]


def test_planner_spills_instead_of_recomputing(cheap_io):
    """Under a budget that holds no full-resolution state, the plan with spilling keeps every
    sync point (in memory or on disk) and costs less than the recomputing plan; states that
    fit stay in memory."""
    from d3sr_core.inference.tiled_vae import MIN_WORK_BYTES, _shapes, plan_checkpoints

    ops = tiled_vae.decoder_program(tiny_vae())
    sizes, chans = _shapes(ops, 48, 48, 4)
    full = sizes[-1][0] * sizes[-1][1] * 4
    budget = 6 * full + MIN_WORK_BYTES  # the low resolutions fit, the two highest do not
    syncs = {i for i, op in enumerate(ops) if op.sync} | {len(ops)}
    lean = plan_checkpoints(ops, sizes, chans, 4, budget, MIN_WORK_BYTES)
    spill = plan_checkpoints(ops, sizes, chans, 4, budget, MIN_WORK_BYTES, spill=True)
    roomy = plan_checkpoints(ops, sizes, chans, 4, 10**12, MIN_WORK_BYTES, spill=True)
    assert lean.kept != syncs and not lean.spilled
    assert spill.kept == syncs and spill.spilled and spill.spilled < spill.kept
    on_disk = {sizes[s] for s in spill.spilled}
    assert sizes[-1] in on_disk and all(h >= sizes[-1][0] // 2 for h, _ in on_disk)
    assert roomy.cost < spill.cost < lean.cost and not roomy.spilled


def test_a_small_disk_means_recomputing(vae, tmp_path, monkeypatch, cheap_io):
    """The planner spills at most a share of the free space at once; with too little it
    recomputes (and the output is the same)."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(35))
    config = TiledVAEConfig(budget=1, tile=16, spill_dir=tmp_path)
    reports, outs = {}, {}
    with torch.inference_mode():
        for free in (10**12, 10_000):
            monkeypatch.setattr(
                runner_module.shutil, "disk_usage", lambda d, free=free: usage(0, 0, free)
            )
            runner = TiledVAERunner(tiled_vae.decoder_program(vae), config)
            outs[free], reports[free] = runner.run(z), runner.report
    roomy, small = reports[10**12], reports[10_000]
    assert roomy.spilled and roomy.spill_peak > 10_000
    assert small.spill_peak <= runner_module.SPILL_DISK_FRACTION * 10_000
    assert small.recomputed
    torch.testing.assert_close(outs[10_000], outs[10**12], atol=1e-5, rtol=1e-5)


class _Trickle:
    """A file that moves at most 7 bytes per call (what the OS may do) and can fail writes."""

    def __init__(self, f, fail=None):
        self.f, self.fail = f, fail

    def seek(self, offset):
        return self.f.seek(offset)

    def write(self, view):
        if self.fail:
            raise self.fail
        return self.f.write(view[:7])

    def readinto(self, view):
        return self.f.readinto(view[:7])

    def close(self):
        self.f.close()


def test_spill_file_details_written_out(tmp_path, monkeypatch):
    """Defaults, file size, casting on write, regions starting at column 1, partial reads and
    writes, and the whole message of each failure."""
    import tempfile
    import warnings

    from d3sr_core.inference.tiled_vae.spill import spill_directory

    assert spill_directory(None) == tempfile.gettempdir()
    assert spill_directory(tmp_path) == str(tmp_path)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. line buffering on a binary file
        t = SpilledTensor(tuple(x.shape), torch.bfloat16, tmp_path)
    assert t.device == torch.device("cpu") and t.nbytes == 2 * 3 * 4 * 5 * 2
    assert os.fstat(t._file.fileno()).st_size == t.nbytes  # reserved up front, no more
    t.write(Region(0, 4, 0, 5), x)  # float32 in, stored as bf16
    assert torch.equal(t.read(Region(0, 4, 0, 5)), x.bfloat16())
    t.write(Region(1, 3, 1, 5), x[:, :, 1:3, 1:5] * 2)  # from column 1 to the right edge
    expected = x.bfloat16().clone()
    expected[:, :, 1:3, 1:5] = (x[:, :, 1:3, 1:5] * 2).bfloat16()
    assert torch.equal(t.read(Region(0, 4, 0, 5)), expected)
    t._file = _Trickle(t._file)
    t.write(Region(0, 4, 0, 5), x)
    assert torch.equal(t.read(Region(0, 4, 0, 5)), x.bfloat16())
    t._file = _Trickle(t._file.f, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(SpillError) as err:
        t.write(Region(0, 4, 0, 5), x)
    assert err.value.errno == errno.EIO
    assert str(err.value) == (
        f"[Errno {errno.EIO}] tiled VAE: writing a checkpoint to {str(tmp_path)!r} failed: "
        f"{os.strerror(errno.EIO)}"
    )
    os.ftruncate(t._file.f.fileno(), 10)
    with pytest.raises(SpillError) as err:
        t.read(Region(0, 4, 0, 5))
    assert err.value.errno == 0
    assert str(err.value) == f"[Errno 0] tiled VAE: short read of a checkpoint in {str(tmp_path)!r}"
    t.close()
    with pytest.raises(ValueError) as err:
        t.read(Region(0, 1, 0, 1))
    assert str(err.value) == "spilled checkpoint used after close()"
    empty = SpilledTensor((1, 3, 0, 5), torch.float32, tmp_path)  # nothing to reserve
    empty.close()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SpillError) as err:
        SpilledTensor((1, 1, 1000, 1250), torch.float32, tmp_path)  # 5 000 000 bytes
    assert str(err.value) == (
        f"[Errno {errno.ENOSPC}] tiled VAE: cannot store a 0.01 GB checkpoint in "
        f"{str(tmp_path)!r}: {os.strerror(errno.ENOSPC)}. Free disk space there, point TMPDIR "
        "(or the spill directory) at a larger disk, or raise the memory budget"
    )


class _Watched(SpilledTensor):
    """A spilled tensor whose file I/O records where and how it ran, and may wait or spin."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str, bool]] = []  # (kind, thread name, inference mode)
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None  # stores wait for it
        self.spin = 0.0  # thread CPU seconds each store burns
        self.sleep = 0.0  # wall seconds each call sleeps
        self.loads_into_given_buffer: list[bool] = []
        self.load_started = threading.Event()
        self.load_gate: threading.Event | None = None  # loads wait for it

    def _io(self, kind: str) -> None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.calls.append(
            (kind, threading.current_thread().name, torch.is_inference_mode_enabled())
        )
        if kind == "store" and self.gate is not None:
            assert self.gate.wait(10)
        if kind == "load":
            self.load_started.set()
            if self.load_gate is not None:
                assert self.load_gate.wait(10)
        if self.sleep:
            time.sleep(self.sleep)
        if kind == "store" and self.spin:
            start = time.thread_time()
            while time.thread_time() - start < self.spin:
                pass
        with self.lock:
            self.active -= 1

    def store(self, region, tensor):
        self._io("store")
        super().store(region, tensor)

    def load(self, region, out=None):
        self._io("load")
        self.loads_into_given_buffer.append(out is not None)
        return super().load(region, out)


@pytest.mark.parametrize("inference", [True, False])
def test_spill_io_threads_order_and_mode(tmp_path, inference):
    """SpillIO: every write runs on one thread ("d3sr-spill-write"), every read on another
    ("d3sr-spill-read"), one at a time in the order asked (reads share one bounce buffer per
    file), in the caller's inference mode, into buffers the caller's thread allocated; the
    values round-trip; close() stops both."""
    x = torch.randn(1, 3, 6, 5, generator=torch.Generator().manual_seed(41))
    bands = [Region(0, 2, 0, 5), Region(2, 4, 0, 5), Region(4, 6, 0, 5)]
    f = _Watched(tuple(x.shape), torch.float32, tmp_path, torch.contiguous_format)
    f.sleep = 0.02  # long enough for a second thread to start the next call meanwhile
    io = SpillIO(write_behind=10**9)
    with torch.inference_mode(inference):
        for r in bands:
            io.write(f, r, x[:, :, r.y0 : r.y1, r.x0 : r.x1])
        io.flush()
        pending = [io.read(f, r) for r in (Region(0, 6, 0, 5), Region(1, 5, 1, 4), bands[2])]
        got = [io.result(f, p) for p in pending]
    assert torch.equal(got[0], x) and got[0].is_contiguous()
    assert torch.equal(got[1], x[:, :, 1:5, 1:4]) and torch.equal(got[2], x[:, :, 4:6])
    assert f.most_active == 1
    assert f.loads_into_given_buffer == [True] * 3  # allocated on the caller's thread
    assert (
        f.calls
        == [("store", "d3sr-spill-write_0", inference)] * 3
        + [("load", "d3sr-spill-read_0", inference)] * 3
    )
    buffer = f.empty(bands[1])
    assert f.load(bands[1], buffer) is buffer and torch.equal(buffer, x[:, :, 2:4])
    io.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("d3sr-spill")]
    f.close()


def test_spill_io_write_behind_waits_and_cpu(tmp_path):
    """write() returns while at most ``write_behind`` bytes are queued and otherwise waits
    for the oldest writes (counted in ``waited``); ``cpu`` sums the I/O threads' CPU time
    (not their sleeps); flush() re-raises a failed write; close() drops queued writes."""
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(42))
    tile = 2 * 2 * 4 * 4  # bytes of one 2-row band in float32
    top, bottom = Region(0, 2, 0, 4), Region(2, 4, 0, 4)
    f = _Watched(tuple(x.shape), torch.float32, tmp_path)
    f.gate = threading.Event()
    io = SpillIO(write_behind=tile)
    io.write(f, top, x[:, :, :2])  # one tile queued: within write_behind, no wait
    assert io.waited < 0.5 and io._queued == tile
    threading.Timer(0.3, f.gate.set).start()
    io.write(f, bottom, x[:, :, 2:])  # two tiles > write_behind: waits for the first
    assert 0.25 < io.waited < 5 and io._queued == tile
    io.flush()
    assert io._queued == 0 and torch.equal(f.read(Region(0, 4, 0, 4)), x)
    assert 0.25 < io.waited < 5  # waits add up
    assert io.cpu < 0.1  # the 0.3 s wait was not CPU time

    f.gate = None
    f.spin = 0.1
    io.write(f, top, x[:, :, :2])
    io.flush()
    assert 0.1 <= io.cpu < 1.0

    io.write_behind = 0  # synchronous: the data is in the file when write() returns
    f.spin = 0.0
    spun = io.cpu
    io.write(f, top, 2 * x[:, :, :2])
    assert torch.equal(f.read(top), 2 * x[:, :, :2]) and not io._writes
    assert io.cpu - spun < 0.05  # per call: the thread's CPU time before it does not count

    f.gate = threading.Event()
    io.write_behind = 10**9
    io.write(f, top, 3 * x[:, :, :2])  # blocked on the gate
    io.write(f, bottom, 3 * x[:, :, 2:])  # queued behind it
    threading.Timer(0.2, f.gate.set).start()
    io.close()  # cancels the queued write, then waits for the running one
    assert io._queued == 0 and not io._writes
    assert torch.equal(f.read(bottom), x[:, :, 2:]), "the queued write was dropped"

    f.load_gate = threading.Event()  # close() also cancels the reads not yet started
    io = SpillIO()
    pending = [io.read(f, top) for _ in range(3)]
    assert f.load_started.wait(5)
    threading.Timer(0.2, f.load_gate.set).start()
    io.close()
    assert [p.cancelled() for p in pending] == [False, True, True]
    f.load_gate = None

    one = SpilledTensor((1, 1, 1, 1), torch.uint8, tmp_path)
    io = SpillIO()  # synchronous by default, even for a one-byte tile
    io.write(one, Region(0, 1, 0, 1), torch.full((1, 1, 1, 1), 7, dtype=torch.uint8))
    assert not io._writes and one.read(Region(0, 1, 0, 1)).item() == 7
    io.close()
    one.close()

    def failing(region, tensor):
        raise SpillError(errno.EIO, "disk gone")

    f.store = failing
    io = SpillIO(write_behind=10**9)
    io.write(f, top, x[:, :, :2])
    with pytest.raises(SpillError, match="disk gone"):
        io.flush()
    io.close()
    f.close()


def test_spill_file_without_direct_io(tmp_path, monkeypatch):
    """direct=False, a file system that refuses O_DIRECT, or a platform without it: every
    transfer goes through the page cache, partial ones resumed, and a short read is a
    SpillError; close() unmaps the bounce buffers and is safe on a half-built object
    (``__del__`` calls it)."""
    from d3sr_core.inference.tiled_vae import spill

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(43))
    whole = Region(0, 4, 0, 5)
    t = SpilledTensor(tuple(x.shape), torch.float32, tmp_path, direct=False)
    assert not t.direct
    t._file = _Trickle(t._file)  # 7 bytes per call
    t.write(whole, x)
    assert torch.equal(t.read(whole), x)
    os.ftruncate(t._file.f.fileno(), 10)
    with pytest.raises(SpillError) as err:
        t.read(whole)
    assert err.value.errno == 0
    assert str(err.value) == f"[Errno 0] tiled VAE: short read of a checkpoint in {str(tmp_path)!r}"
    t.close()

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(spill.os, "open", no_direct)
    refused = SpilledTensor(tuple(x.shape), torch.float32, tmp_path)
    monkeypatch.undo()
    monkeypatch.delattr(spill.os, "O_DIRECT")
    absent = SpilledTensor(tuple(x.shape), torch.float32, tmp_path)
    monkeypatch.undo()
    for u in (refused, absent):
        assert not u.direct
        u.write(whole, x)
        assert torch.equal(u.read(whole), x)
        u.close()

    v = SpilledTensor((1, 4, 32, 32), torch.float32, tmp_path)  # one 16 kB run
    if v.direct:
        # (4 bytes past an allocation: never at the block-aligned address that a write
        # straight from the tensor needs, so the writer's bounce buffer is made)
        ones = torch.ones(4 * 32 * 32 + 1)[1:].view(1, 32, 32, 4).permute(0, 3, 1, 2)
        v.write(Region(0, 32, 0, 32), ones)
        assert torch.equal(v.read(Region(0, 32, 0, 32)), torch.ones(1, 4, 32, 32))
        assert v._read_bounce is None  # all of it read in place; a band from mid-block is not:
        assert torch.equal(v.read(Region(1, 32, 0, 32)), torch.ones(1, 4, 31, 32))
        bounces = (v._bounce, v._read_bounce)
        assert None not in bounces
        v.close()
        assert all(b.closed for b in bounces)
    SpilledTensor.__new__(SpilledTensor).close()  # no attribute set yet
