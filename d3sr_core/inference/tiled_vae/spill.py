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
which the budget bounds. The kernel keeps the file in its page
cache while RAM is free (reads are then memory copies) and writes it back and drops it
under memory pressure.

The file is an anonymous temporary file (``tempfile.TemporaryFile``: ``O_TMPFILE`` on Linux,
unlinked at once on other POSIX systems, delete-on-close on Windows), so it disappears when
closed, when the run fails, or (POSIX) when the process dies.
Its blocks are reserved up front (``posix_fallocate``) so that a full disk fails before the
pass is computed, with a :class:`SpillError` naming the directory and the size.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import Tensor

from .ops import Region


class SpillError(OSError):
    """A checkpoint could not be written to (or read from) its temporary file."""


def spill_directory(directory: str | os.PathLike | None) -> str:
    """``directory``, or the system temporary directory (``$TMPDIR``, else ``/tmp``)."""
    return os.fspath(directory) if directory is not None else tempfile.gettempdir()


class SpilledTensor:
    """A ``[B, C, H, W]`` tensor stored in a temporary file (see the module docstring).

    Args:
        shape: ``(B, C, H, W)``.
        dtype: element type (what :meth:`read` returns).
        directory: where the temporary file lives (None = :func:`spill_directory`).
        memory_format: layout of the tensors :meth:`read` returns.
        device: where the tensors :meth:`read` returns live (the file is always on the host).
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        directory: str | os.PathLike | None = None,
        memory_format: torch.memory_format = torch.channels_last,
        device: torch.device | str = "cpu",
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
        try:
            self._file = tempfile.TemporaryFile(dir=self.directory, buffering=0)
            if self.nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), 0, self.nbytes)
        except OSError as e:
            self.close()
            raise SpillError(
                e.errno,
                f"tiled VAE: cannot store a {self.nbytes / 1e9:.2f} GB checkpoint in "
                f"{self.directory!r}: {e.strerror or e}. Free disk space there, point TMPDIR "
                "(or the spill directory) at a larger disk, or raise the memory budget",
            ) from e

    @property
    def closed(self) -> bool:
        return getattr(self, "_file", None) is None

    def close(self) -> None:
        """Delete the file (idempotent)."""
        if not self.closed:
            self._file.close()
            self._file = None

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

    def write(self, region: Region, tensor: Tensor) -> None:
        """Store ``tensor`` ``[B, C, h, w]`` (any layout) at ``region`` of the image."""
        rows = tensor.detach().to(device="cpu", dtype=self.dtype).permute(0, 2, 3, 1)
        data = rows.contiguous().view(torch.uint8).numpy()  # [B, h, w, C * itemsize]
        f = self._raw()
        for b, y, n, offset in self._runs(region):
            view = memoryview(data[b, y : y + n]).cast("B")
            try:
                f.seek(offset)
                while view:
                    view = view[f.write(view) :]
            except OSError as e:
                raise SpillError(
                    e.errno,
                    f"tiled VAE: writing a checkpoint to {self.directory!r} failed: "
                    f"{e.strerror or e}",
                ) from e

    def read(self, region: Region) -> Tensor:
        """The stored values at ``region``: ``[B, C, h, w]`` in :attr:`memory_format`, on
        :attr:`device`."""
        b, c, _, _ = self.shape
        out = torch.empty(b, region.h, region.w, c, dtype=self.dtype)
        data = out.view(torch.uint8).numpy()
        f = self._raw()
        for i, y, n, offset in self._runs(region):
            view = memoryview(data[i, y : y + n]).cast("B")
            f.seek(offset)
            while view:
                done = f.readinto(view)
                if not done:
                    raise SpillError(
                        0, f"tiled VAE: short read of a checkpoint in {self.directory!r}"
                    )
                view = view[done:]
        nchw = out.permute(0, 3, 1, 2).to(self.device)  # channels_last strides
        return nchw.contiguous(memory_format=self.memory_format)
