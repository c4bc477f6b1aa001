"""Checkpoints on disk: whole-image states that do not fit the memory budget, written tile by
tile to a temporary file and read back region by region.

Why
---
Beyond ~4 MP a single full-resolution state of the decoder (128 channels) no longer fits a
few-GB budget (4.3 GB in bf16 at 4096x4096), so an in-memory plan must recompute it from an
older checkpoint for every later GroupNorm: 6x the decoder's work at 4096x4096. Writing the
state to disk once and reading each tile back costs a few memory copies per element instead.

How
---
The file holds the state in NHWC order (``[B, H, W, C]``, rows of ``W * C`` elements), so a
tile's region is one contiguous byte run per image row (one run in all for full-width
bands). Reads and writes are explicit unbuffered file I/O at an offset (``seek`` +
``write`` / ``readinto`` straight into the tile's own memory; portable, unlike
``os.pwrite``), not ``mmap``: mapped pages would count in the process's resident memory,
which the budget bounds. Writes bypass the kernel's page cache where the file system allows it (``O_DIRECT``,
Linux): the states are spilled because they do not fit the memory budget, and a 4096x4096
decode writes 52.6 GB, more than most machines' RAM, so caching them only costs: every page
is allocated, copied and written back under memory pressure (on the CI-class VM buffered
writes ran at 160 MB/s with 3.2 s of kernel CPU per GB, direct ones at 2.1 GB/s with 0.15 s).
Direct I/O needs block-aligned offsets, lengths and buffers: the aligned middle of each
byte run goes straight between the file and the tile's memory when that memory is placed for
it (:meth:`SpilledTensor.empty`: a full-width band is then one request and no copy; the
runner has the ops that can write into a given tensor compute such tiles in place), else
through a small aligned bounce buffer; its unaligned ends (at most a block each) go through
the page cache. Reads of the rest fetch the aligned blocks around it into a
bounce buffer (the kernel first writes back any cached block they cover). A tile's reads
from data not in the cache took a third of the kernel CPU time of cached reads.

The file is an anonymous temporary file (``tempfile.TemporaryFile``: ``O_TMPFILE`` on Linux,
unlinked at once on other POSIX systems, delete-on-close on Windows), so it disappears when
closed, when the run fails, or (POSIX) when the process dies. Within a run, a file whose
checkpoint is dropped is written over by the next checkpoint of its size (:class:`SpillFiles`).
Its blocks are reserved up front (``posix_fallocate``) so that a full disk fails before the
pass is computed, with a :class:`SpillError` naming the directory and the size.

Off the compute thread
----------------------
A 4096x4096 decode writes 52.6 GB, more than the page cache of a typical machine holds, so the
kernel throttles the writer to the disk's speed (170 MB/s on the CI-class machine: minutes).
:class:`SpillIO` moves the file I/O to two threads: one writes finished tiles behind the
computation (at most ``write_behind`` bytes queued; the compute thread waits only when the
disk falls further behind), one reads the next tile's regions while the current tile is
computed. The bytes are the same, so the output is bit-identical to synchronous I/O; the
runner counts the queued tile and the read-ahead tile in each tile's memory budget.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .ops import Region

# Direct I/O: the block size that offsets, lengths and buffer addresses are aligned to (the
# largest logical block size in use), and the bounce buffer a run's aligned part is copied
# through (a few MB: outside the memory budget, like the torch runtime).
DIRECT_ALIGN = 4096
DIRECT_CHUNK = 4 * 2**20


class SpillError(OSError):
    """A checkpoint could not be written to (or read from) its temporary file."""


def spill_directory(directory: str | os.PathLike | None) -> str:
    """``directory``, or the system temporary directory (``$TMPDIR``, else ``/tmp``)."""
    return os.fspath(directory) if directory is not None else tempfile.gettempdir()


class SpillFiles:
    """The temporary files of one run's checkpoints on disk. A file whose checkpoint is
    dropped stays open (idle) and the next checkpoint of exactly its size is written over it,
    instead of the file being deleted and a new one made.

    Why: deleting a 4 GiB file blocked the computing thread for 0.6 s on the CI-class VM
    (ext4 mounted with ``discard``: its blocks are trimmed), and writing into newly reserved
    blocks (``posix_fallocate``: unwritten extents, converted as they are written) took 2.0 s
    for 4 GiB against 1.73 s over blocks written before (``O_DIRECT``). A 4096x4096 decode
    spills 16 states, most of them of one 4.3 GB shape.

    Disk use is never above what deleting at once would use: only a checkpoint of exactly an
    idle file's size takes it (so the bytes on disk are those of the same states), and every
    idle file is deleted before a new file is made.
    """

    def __init__(self) -> None:
        self._idle: list[tuple[object, int | None, int]] = []  # (file, O_DIRECT fd, bytes)
        self._closed = False
        self.reused = 0  # files taken over by a later checkpoint

    def take(self, nbytes: int) -> tuple[object, int | None] | None:
        """An idle file of exactly ``nbytes`` and its direct-I/O descriptor (or None), now
        in use; else None, after deleting every idle file (the caller makes a new one)."""
        for i, (_, _, size) in enumerate(self._idle):
            if size == nbytes:
                self.reused += 1
                file, direct, _ = self._idle.pop(i)
                return file, direct
        self._delete_idle()
        return None

    def give(self, file, direct: int | None, nbytes: int) -> None:
        """Keep ``file`` (``nbytes`` long) for a later checkpoint of its size; deleted at once
        once :meth:`close` has run."""
        if self._closed:
            _delete(file, direct)
        else:
            self._idle.append((file, direct, nbytes))

    @property
    def idle_bytes(self) -> int:
        return sum(size for _, _, size in self._idle)

    def close(self) -> None:
        """Delete the idle files; files given back later are deleted at once."""
        self._closed = True
        self._delete_idle()

    def _delete_idle(self) -> None:
        while self._idle:
            file, direct, _ = self._idle.pop()
            _delete(file, direct)


def _delete(file, direct: int | None) -> None:
    """Close a temporary file (which deletes it) and its direct-I/O descriptor."""
    if direct is not None:
        os.close(direct)
    file.close()


class SpilledTensor:
    """A ``[B, C, H, W]`` tensor stored in a temporary file (see the module docstring).

    Args:
        shape: ``(B, C, H, W)``.
        dtype: element type (what :meth:`read` returns).
        directory: where the temporary file lives (None = :func:`spill_directory`).
        memory_format: layout of the tensors :meth:`read` returns.
        device: where the tensors :meth:`read` returns live (the file is always on the host).
        direct: read and write around the page cache (``O_DIRECT``) where the file system
            allows it; False (or a file system without it, e.g. an old tmpfs) uses the cache.
        files: the run's :class:`SpillFiles`: an idle file of this size is written over, and
            :meth:`close` gives the file back to it instead of deleting it. None: a file of
            its own, deleted on close.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        directory: str | os.PathLike | None = None,
        memory_format: torch.memory_format = torch.channels_last,
        device: torch.device | str = "cpu",
        direct: bool = True,
        files: SpillFiles | None = None,
    ):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.memory_format = memory_format
        self.device = torch.device(device)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.directory = spill_directory(directory)
        b, c, h, w = self.shape
        self.nbytes = b * c * h * w * self.itemsize
        self._file = None
        self._direct: int | None = None  # a second descriptor of the file, with O_DIRECT
        self._bounce: mmap.mmap | None = None  # the writer's (DIRECT_CHUNK, page-aligned)
        self._read_bounce: mmap.mmap | None = None  # the reader's
        self._files = files
        reused = files.take(self.nbytes) if files is not None else None
        if reused is not None:
            self._file, self._direct = reused
            if not direct:
                self._close_direct()
            return
        try:
            self._file = tempfile.TemporaryFile(dir=self.directory, buffering=0)
            if self.nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, self.nbytes)
        except OSError as e:
            self._files = None  # a file without its blocks is deleted, never reused
            self.close()
            raise SpillError(
                e.errno,
                f"tiled VAE: cannot store a {self.nbytes / 1e9:.2f} GB checkpoint in "
                f"{self.directory!r}: {e.strerror or e}. Free disk space there, point TMPDIR "
                "(or the spill directory) at a larger disk, or raise the memory budget",
            ) from e
        if direct and getattr(os, "O_DIRECT", 0):
            try:  # the unnamed file is reachable through its descriptor's /proc link only
                fd = self._file.fileno()
                self._direct = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT)
            except OSError:  # no /proc, or a file system without direct I/O
                self._direct = None

    @property
    def direct(self) -> bool:
        """Whether reads and writes currently go around the page cache."""
        return self._direct is not None

    @property
    def closed(self) -> bool:
        return getattr(self, "_file", None) is None

    def close(self) -> None:
        """Delete the file, or give it back to the run's :class:`SpillFiles` (idempotent)."""
        for name in ("_bounce", "_read_bounce"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        if self.closed:
            self._close_direct()
            return
        file, direct = self._file, self._direct
        self._file = self._direct = None
        files = getattr(self, "_files", None)
        if files is not None:
            files.give(file, direct, self.nbytes)
        else:
            _delete(file, direct)

    def _close_direct(self) -> None:
        if getattr(self, "_direct", None) is not None:
            os.close(self._direct)
            self._direct = None

    def __del__(self):
        self.close()

    def _raw(self):
        if self._file is None:
            raise ValueError("spilled checkpoint used after close()")
        return self._file

    def _row_offset(self, b: int, y: int, x: int) -> int:
        _, c, h, w = self.shape
        return ((b * h + y) * w + x) * c * self.itemsize

    def _runs(self, region: Region):
        """(batch, first row, rows, byte offset) of the contiguous byte runs of ``region``:
        one per batch element for full-width regions, else one per row."""
        _, _, _, w = self.shape
        for b in range(self.shape[0]):
            if region.x0 == 0 and region.x1 == w:
                yield b, 0, region.h, self._row_offset(b, region.y0, 0)
            else:
                for y in range(region.h):
                    yield b, y, 1, self._row_offset(b, region.y0 + y, region.x0)

    def prepare(self, tensor: Tensor) -> Tensor:
        """``tensor`` ``[B, C, h, w]`` as :meth:`store` takes it: on the host, in :attr:`dtype`,
        channels_last (NHWC memory); no copy when it already is."""
        return (
            tensor.detach()
            .to(device="cpu", dtype=self.dtype)
            .contiguous(memory_format=torch.channels_last)
        )

    def write(self, region: Region, tensor: Tensor) -> None:
        """Store ``tensor`` ``[B, C, h, w]`` (any layout) at ``region`` of the image."""
        self.store(region, self.prepare(tensor))

    def store(self, region: Region, tensor: Tensor) -> None:
        """:meth:`write` of a :meth:`prepare`-d tensor: file I/O only (no tensor op, so it
        may run on an I/O thread)."""
        # the bytes in NHWC order; flattened first because a one-channel state may have any
        # stride on its channel axis, which a dtype view refuses
        nhwc = tensor.permute(0, 2, 3, 1)
        data = nhwc.reshape(-1).view(torch.uint8).view(*nhwc.shape[:3], -1).numpy()
        self._raw()
        for b, y, n, offset in self._runs(region):
            run = data[b, y : y + n]
            try:
                self._write_run(offset, memoryview(run).cast("B"), run.ctypes.data)
            except OSError as e:
                raise SpillError(
                    e.errno,
                    f"tiled VAE: writing a checkpoint to {self.directory!r} failed: "
                    f"{e.strerror or e}",
                ) from e

    def _write_run(self, offset: int, view: memoryview, address: int) -> None:
        """Write ``view`` (at memory ``address``) at ``offset``: its block-aligned middle
        directly when direct I/O is available - straight from ``view`` when that middle sits
        at an aligned address (a tensor from :meth:`empty`), else through the bounce buffer -
        and the rest through the page cache."""
        end = offset + len(view)
        a0 = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        a1 = end // DIRECT_ALIGN * DIRECT_ALIGN
        if self._direct is None or a1 <= a0:
            self._write_buffered(offset, view)
            return
        self._write_buffered(offset, view[: a0 - offset])
        self._write_buffered(a1, view[a1 - offset :])
        placed = (address + a0 - offset) % DIRECT_ALIGN == 0
        if not placed and self._bounce is None:
            self._bounce = mmap.mmap(-1, DIRECT_CHUNK)  # page-aligned
        # released on the way out, also through an exception whose traceback keeps this
        # frame, so that close() can unmap the bounce buffer (a placed view needs none: an
        # empty stand-in)
        with memoryview(self._bounce if not placed else b"") as bounce:
            pos = a0
            while pos < a1:
                if placed:
                    chunk = view[pos - offset : a1 - offset]
                else:
                    chunk = bounce[: min(DIRECT_CHUNK, a1 - pos)]
                    chunk[:] = view[pos - offset : pos - offset + len(chunk)]
                try:
                    done = os.pwrite(self._direct, chunk, pos)
                except OSError:  # e.g. a larger block size than DIRECT_ALIGN: stop using it
                    done = 0
                # (short direct writes are not resumed at unaligned offsets)
                if done != len(chunk):
                    self._close_direct()
                    self._write_buffered(pos + done, view[pos + done - offset : a1 - offset])
                    return
                pos += done

    def _write_buffered(self, offset: int, view: memoryview) -> None:
        f = self._raw()
        f.seek(offset)
        while view:
            view = view[f.write(view) :]

    def read(self, region: Region) -> Tensor:
        """The stored values at ``region``: ``[B, C, h, w]`` in :attr:`memory_format`, on
        :attr:`device`."""
        return self.place(self.load(region))

    def empty(self, region: Region) -> Tensor:
        """A host buffer for :meth:`load` or :meth:`write` of ``region``: ``[B, C, h, w]``,
        NHWC memory.

        Placed so that its first byte run's address and file offset agree modulo
        :data:`DIRECT_ALIGN`: the run's block-aligned middle is then read straight into it
        (:meth:`_read_run`) or written straight from it (:meth:`_write_run`) - a full-width
        band, as the banded passes use, in one request with no copy."""
        b, c, _, _ = self.shape
        nbytes = b * region.h * region.w * c * self.itemsize
        raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
        # (a multiple of the item size: both the offset and the allocation's address are)
        start = (self._row_offset(0, region.y0, region.x0) - raw.data_ptr()) % DIRECT_ALIGN
        nhwc = raw[start : start + nbytes].view(self.dtype).view(b, region.h, region.w, c)
        return nhwc.permute(0, 3, 1, 2)

    def load(self, region: Region, out: Tensor | None = None) -> Tensor:
        """The stored values at ``region`` as they are in the file, into ``out`` (from
        :meth:`empty`; None = a new one): ``[B, C, h, w]`` with NHWC memory, on the host.
        File I/O only when ``out`` is given (may run on an I/O thread)."""
        out = self.empty(region) if out is None else out
        data = out.permute(0, 2, 3, 1).view(torch.uint8).numpy()
        self._raw()
        for i, y, n, offset in self._runs(region):
            run = data[i, y : y + n]
            self._read_run(offset, memoryview(run).cast("B"), run.ctypes.data)
        return out

    def _read_run(self, offset: int, view: memoryview, address: int) -> None:
        """Read ``len(view)`` bytes at ``offset`` into ``view`` (at memory ``address``): when
        the view's block-aligned middle sits at an aligned address (:meth:`empty`), that middle
        directly into place and its ends through the bounce buffer; else all of it through the
        bounce buffer (:meth:`_read_bounced`).

        Measured (a 2.1 GB state read back in 32-row bands of 4096 x 128 bf16, one thread):
        0.17-0.21 s of CPU per GB and 1.06-1.18 GB/s through the bounce buffer, 0.02 s per GB
        and 1.36-1.38 GB/s straight into place."""
        end = offset + len(view)
        a0 = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        a1 = end // DIRECT_ALIGN * DIRECT_ALIGN
        if self._direct is None or a1 <= a0 or (address + a0 - offset) % DIRECT_ALIGN:
            self._read_bounced(offset, view)
            return
        pos = a0
        try:
            while pos < a1:
                got = os.preadv(self._direct, [view[pos - offset : a1 - offset]], pos)
                if not got:
                    raise self._short_read()
                pos += got
        except SpillError:
            raise
        except OSError:  # direct reads refused: the page cache from now on
            self._close_direct()
        self._read_bounced(offset, view[: a0 - offset])
        self._read_bounced(pos, view[pos - offset :])

    def _read_bounced(self, offset: int, view: memoryview) -> None:
        """Read ``len(view)`` bytes at ``offset`` into ``view``: directly, as the aligned
        blocks around them through a bounce buffer (a third of the kernel CPU time of a
        cached read of data that is not in the cache), else through the page cache."""
        if not view:
            return
        if self._direct is not None:
            if self._read_bounce is None:
                self._read_bounce = mmap.mmap(-1, DIRECT_CHUNK)
            bounce = memoryview(self._read_bounce)
            pos, end = offset, offset + len(view)
            try:
                while pos < end:
                    a0 = pos // DIRECT_ALIGN * DIRECT_ALIGN
                    a1 = min(-(-end // DIRECT_ALIGN) * DIRECT_ALIGN, a0 + DIRECT_CHUNK)
                    got = os.preadv(self._direct, [bounce[: a1 - a0]], a0)
                    take = min(end, a1) - pos
                    if got < pos - a0 + take:
                        raise self._short_read()
                    view[pos - offset : pos - offset + take] = bounce[pos - a0 : pos - a0 + take]
                    pos += take
                return
            except SpillError:
                raise
            except OSError:  # direct reads refused: the page cache from now on
                self._close_direct()
                view = view[pos - offset :]
                offset = pos
            finally:  # (as in _write_run: so that close() can unmap the bounce buffer)
                bounce.release()
        f = self._raw()
        f.seek(offset)
        while view:
            done = f.readinto(view)
            if not done:
                raise self._short_read()
            view = view[done:]

    def _short_read(self) -> SpillError:
        return SpillError(0, f"tiled VAE: short read of a checkpoint in {self.directory!r}")

    def place(self, loaded: Tensor) -> Tensor:
        """A :meth:`load`-ed tensor on :attr:`device` in :attr:`memory_format`."""
        return loaded.to(self.device).contiguous(memory_format=self.memory_format)


def _as_caller(fn, spent: list[float]):
    """``fn`` for another thread, run in the caller's inference mode (a thread-local state:
    tensors made or updated there must be of the same kind as the caller's); the thread CPU
    seconds each call takes are appended to ``spent``."""
    mode = torch.is_inference_mode_enabled()

    def call(*args):
        start = time.thread_time()
        try:
            with torch.inference_mode(mode):
                return fn(*args)
        finally:
            spent.append(time.thread_time() - start)  # (list.append is atomic)

    return call


class SpillIO:
    """The file I/O of spilled checkpoints on two threads of its own (see the module
    docstring): :meth:`write` queues a tile behind the computation, :meth:`read` starts
    reading a region ahead of it. Tensor ops (layout, device) stay on the caller's thread.

    Args:
        write_behind: bytes of tiles that may wait to be written when :meth:`write` returns
            (it waits for the oldest writes beyond it; 0 = synchronous). Adjustable per pass.
    """

    def __init__(self, write_behind: int = 0):
        self.write_behind = write_behind
        self.waited = 0.0  # seconds the caller spent waiting for the disk
        # thread CPU seconds of each read and write on the I/O threads (see :attr:`cpu`)
        self._spent: list[float] = []
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._writes: deque[tuple[Future, int]] = deque()
        self._queued = 0

    def write(self, file: SpilledTensor, region: Region, tensor: Tensor) -> None:
        """Write ``tensor`` at ``region`` of ``file`` (as :meth:`SpilledTensor.write`) in the
        background. ``tensor`` must not be modified afterwards (it may be written as is).
        Raises the :class:`SpillError` of an earlier write that failed."""
        rows = file.prepare(tensor)
        n = rows.numel() * rows.element_size()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="d3sr-spill-write")
        self._writes.append(
            (self._writer.submit(_as_caller(file.store, self._spent), region, rows), n)
        )
        self._queued += n
        del rows
        while self._queued > self.write_behind:
            self._finish_oldest()

    def read(self, file: SpilledTensor, region: Region) -> Future:
        """Start reading ``region`` of ``file``; :meth:`result` gives the tensor. Call
        :meth:`flush` after writing a file before reading it."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="d3sr-spill-read")
        load = _as_caller(file.load, self._spent)
        return self._reader.submit(load, region, file.empty(region))

    def result(self, file: SpilledTensor, pending: Future) -> Tensor:
        """The tensor a :meth:`read` of ``file`` started, as :meth:`SpilledTensor.read` gives it."""
        return file.place(self._wait(pending))

    @property
    def cpu(self) -> float:
        """Thread CPU seconds the I/O threads spent on the reads and writes finished so far:
        the CPU they take from the computation when no core is idle (e.g. as many torch
        threads as cores); only their waits for the disk are off the CPU."""
        return sum(self._spent)

    def flush(self) -> None:
        """Wait until every queued write is on its file (re-raising the first failure)."""
        while self._writes:
            self._finish_oldest()

    def close(self) -> None:
        """Drop queued work and wait for the threads (before the files are closed)."""
        for fut, _ in self._writes:
            fut.cancel()
        self._writes.clear()
        self._queued = 0
        for pool in (self._writer, self._reader):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._writer = self._reader = None

    def _finish_oldest(self) -> None:
        fut, n = self._writes.popleft()
        self._queued -= n
        self._wait(fut)

    def _wait(self, fut: Future):
        t = time.perf_counter()
        try:
            return fut.result()
        finally:
            self.waited += time.perf_counter() - t
