"""The tile runner: executes a program pass by pass (one per sync point), tile by tile,
following the checkpoint plan."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..memory import freed_heap_bytes, release_host_memory, reuse_freed_heap
from .attention import ATTENTION_WINDOW, _run_attention
from .norm import GroupStats, _apply_norm
from .ops import (
    Attend,
    Conv,
    Norm,
    Op,
    Piece,
    Push,
    Region,
    UpConv,
    Upsample,
    _backward,
    _crop,
    _grid,
    _ids,
    _interior_tile,
    _shapes,
    _spans,
    is_channels_last,
)
from .planner import MIN_WORK_BYTES, MIN_WORK_FRACTION, _in_place, _work_bytes, plan_checkpoints
from .spill import SpilledTensor, SpillFiles, SpillIO, spill_directory

# Share of the spill directory's free space (at the start of a run) that checkpoints may
# take at once; beyond it the planner recomputes instead (others may need the disk too).
SPILL_DISK_FRACTION = 0.8
# Tiles of a spilling pass whose writes may still be queued while the next tile is computed
# (:class:`SpillIO`); each one is counted in the tile's working set, as is the next tile's
# read-ahead of a checkpoint on disk.
WRITE_BEHIND_TILES = 1
# Share of the budget kept free for what the per-tile estimate (planner._work_bytes) does not
# see: oneDNN's per-shape scratch buffers and reordered weights, heap slack, the I/O bounce
# buffers. Measured at 4096x4096 in bf16 (bench/bench_large.py --vae, default budget): the
# passes whose checkpoints left a tile 256 MiB peaked 0.35-0.43 GB above their checkpoints,
# 0.16 GB (6.6 % of the 2.25 GiB budget) over it; the runner plans with 90 % of the budget.
UNESTIMATED_FRACTION = 0.1
# Freed tile memory a pass keeps for its next tiles (memory.reuse_freed_heap) before it trims
# the heap: the most its first FREED_HEAP_STEADY_TILES tiles left freed (a tile's transient
# memory, which the next tile of the same shape reuses), and at least FREED_HEAP_FRACTION of
# the budget. Measured at two threads (bench/bench_large.py): a fixed 25 % of the budget made
# the decoder's band tiles, larger than that, trim and fault their memory back after every
# tile (a 2048x2048 decode: 61.6 s, 14.4 M faults; with this bound 48.5 s, 4.7 M, the same
# 2.45 GB peak); 25 % more than the first tiles left raised that peak to 3.03 GB, no bound
# at all the 4096x4096 one from 2.50 to 3.19 GB, and 10 % of the budget cost as much as not
# reusing.
FREED_HEAP_FRACTION = 0.25
FREED_HEAP_STEADY_TILES = 2

Tick = Callable[[float], None]


@dataclass
class TiledVAEConfig:
    """How a tiled VAE run may use memory.

    Attributes:
        budget: activation bytes the run may use (checkpoints + one tile's working set; the
            plan fills :data:`UNESTIMATED_FRACTION` less, for what the estimates miss).
        tile: tile side in image pixels (``None`` = derived from the budget).
        work_fraction: share of the budget reserved for one tile's working set when ``tile``
            is None; the rest may hold checkpoints.
        attention_window: latent positions per side beyond which self-attention is windowed
            (:func:`attention_spans`); None = always global.
        compact_checkpoints: for an fp32 VAE, store the checkpoints of the resolutions whose
            fp32 states do not fit the budget in bfloat16 (half the bytes) when that saves
            recomputation. Rounds those states (relative error <= 2**-9), so the output is no
            longer bit-for-bit the untiled one; False keeps exact fp32 checkpoints. Only
            without ``spill``, which avoids the recomputation without rounding.
        spill: keep the states that do not fit the budget in temporary files (:mod:`.spill`)
            when that is cheaper than recomputing them (it nearly always is) and they fit
            :data:`SPILL_DISK_FRACTION` of the directory's free space; False keeps every
            checkpoint in memory and recomputes the rest.
        spill_dir: directory of those files (None = the system temporary directory,
            ``$TMPDIR`` or ``/tmp``). They are unnamed and vanish when the run ends or fails.
    """

    budget: int
    tile: int | None = None
    work_fraction: float = 0.3
    attention_window: int | None = ATTENTION_WINDOW
    compact_checkpoints: bool = True
    spill: bool = True
    spill_dir: str | None = None


@dataclass
class RunReport:
    """What a run did (for logs, tests and benchmarks)."""

    passes: int = 0
    tiles: int = 0
    kept: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    tile_sizes: list[int] = field(default_factory=list)
    # Passes (by boundary) whose tiles were full-width bands of tile_sizes rows (those that
    # read or wrote the disk, where such a band fits): each tile is one contiguous byte run
    # of a spill file per image.
    banded: list[int] = field(default_factory=list)
    # Kept states written over the previous checkpoint, band by band.
    in_place: list[int] = field(default_factory=list)
    # Kept states stored on disk (spill), the bytes written there, and the most bytes on
    # disk at once (files are deleted as soon as no later pass reads them).
    spilled: list[int] = field(default_factory=list)
    spill_bytes: int = 0
    spill_peak: int = 0
    # Spill files written over by a later checkpoint of the same size (spill.SpillFiles)
    # instead of deleted and made anew.
    spill_files_reused: int = 0
    # Seconds the computation waited for the disk (spill writes and reads that the I/O
    # threads had not finished yet).
    spill_wait_s: float = 0.0
    # Thread CPU seconds of the spill reads and writes on the I/O threads (not in the
    # computing thread's CPU time; they compete with it when no core is idle).
    spill_io_cpu_s: float = 0.0
    # Resolutions (h, w) whose checkpoints were stored in bfloat16 (compact_checkpoints).
    compact: list[tuple[int, int]] = field(default_factory=list)
    # Largest checkpoint bytes held by choice (the forced ones - the attention input at latent
    # resolution and the output - are not counted; they are O(latent) and O(output)).
    peak_estimate: int = 0


@dataclass
class _Schedule:
    """What the planner decided: the boundaries a pass ends at, those kept (in memory or
    on disk), those on disk, each boundary's checkpoint dtype; the program's shapes."""

    points: list[int]
    planned: set[int]
    spilled: set[int]
    store_dtype: list[torch.dtype]
    sizes: list[tuple[int, int]]
    chans: list[list[int]]


class _Context:
    def __init__(self, stats: dict[int, GroupStats], ops: list[Op]):
        self.stats = stats
        self.index = {id(op): i for i, op in enumerate(ops)}

    def normalize(self, op: Norm, x: Tensor) -> Tensor:
        st = self.stats[self.index[id(op)]]
        return _apply_norm(op, st, x)


def _write_band(target: Tensor, band: list[tuple[Region, Tensor]]) -> None:
    for core, tensor in band:
        target[:, :, core.y0 : core.y1, core.x0 : core.x1] = tensor


Stored = Tensor | SpilledTensor  # a checkpoint element: in memory or on disk


def _memory_bytes(store: dict[int, Stored]) -> int:
    return sum(t.numel() * t.element_size() for t in store.values() if isinstance(t, Tensor))


def _disk_regions(ids: list[int], regions, on_disk) -> dict[int, Region]:
    """Element id -> the region to read of each element in ``on_disk``: one read per
    element, covering every region asked of it (a Push duplicates ids)."""
    out: dict[int, Region] = {}
    for i, r in zip(ids, regions, strict=True):
        if r is not None and i in on_disk:
            out[i] = r.union(out.get(i))
    return out


def _read_pieces(store: dict[int, Stored], ids: list[int], regions, full: Region, dtype, loaded):
    """The stack's pieces covering ``regions`` cut from the checkpoint ``store``: views of
    in-memory tensors, and crops of ``loaded`` (id -> (tensor, region read)) for the
    elements on disk (:func:`_disk_regions`)."""
    pieces: list[Piece | None] = []
    for i, r in zip(ids, regions, strict=True):
        if r is None:
            pieces.append(None)
            continue
        t, have = loaded.get(i, (store[i], full))
        pieces.append(Piece(_crop(t, have, r).to(dtype), r))
    return pieces


def _bound_freed_heap(tile_index: int, bound: int, device: torch.device) -> int:
    """After tile ``tile_index`` of a pass: the freed-heap bound for the pass's next tiles
    (the first :data:`FREED_HEAP_STEADY_TILES` raise ``bound`` to what they left freed),
    trimming the heap when a later tile left more than ``bound`` freed; a trim raises the
    bound to what it left.

    Why raise it: glibc counts trimmed free blocks as freed (``fordblks``) though their pages
    are gone, so after a trim the count does not drop. Kept at the old bound, every later
    tile trimmed again and faulted its working set back in (a 2048x2048 decode: 47 tiles in
    a row of one pass, ~1 M page faults in all). The freed count grows again only when tiles
    leave new blocks freed, and that is what the next trim is for."""
    freed = freed_heap_bytes(device)
    if freed is None:
        return bound
    if tile_index < FREED_HEAP_STEADY_TILES:
        return max(bound, freed)
    if freed > bound:
        release_host_memory(device)
        return freed
    return bound


def _close_dropped(old: dict[int, Stored], new: dict[int, Stored]) -> None:
    for i, t in old.items():
        if isinstance(t, SpilledTensor) and i not in new:
            t.close()


class TiledVAERunner:
    """Runs one VAE program (encoder or decoder) tile by tile; see the module docstring.

    Args:
        ops: from :func:`encoder_program` / :func:`decoder_program`.
        config: memory budget and tile size.
        tick: called with the fraction done (0..1) after every tile (progress/cancel).
    """

    def __init__(self, ops: list[Op], config: TiledVAEConfig, tick: Tick | None = None):
        self.ops = ops
        self.config = config
        self.tick = tick
        self.report = RunReport()
        # GroupNorm module -> the whole-image statistics its input had (filled by run()).
        self.group_stats: dict[nn.Module, GroupStats] = {}

    def _dtype(self) -> torch.dtype:
        for op in self.ops:
            if isinstance(op, Conv):
                return op.module.weight.dtype
        return torch.float32

    def _tile_for(
        self, start, stop, sizes, chans, keep, itemsize, limit, disk=None
    ) -> tuple[int, bool]:
        """The largest tile side (at boundary ``stop``'s resolution) whose working set fits
        (``disk``: see :meth:`_probe`), and whether the tiles are full-width bands (then the
        side is their height): when the pass reads or writes the disk and a band of the
        smallest height fits.

        Why bands: a square tile's rows are separate byte runs of a spill file, one small
        direct-I/O request each. Writing a 1.07 GB state in 390-pixel tiles took 6.7x the
        CPU time and 2.7x the wall time of writing it in whole rows, and at two torch threads
        the writer fell behind the computation (bench/bench_large.py --vae).
        """
        h, w = sizes[stop]
        lo = 8

        def fits(tile: int, wide: bool) -> bool:
            probe = self._probe(start, stop, sizes, chans, keep, itemsize, tile, disk, wide)
            return probe <= limit

        wide = disk is not None and fits(lo, True)
        hi = h if wide else max(h, w)

        if fits(hi, wide):
            return hi, wide
        while hi - lo > 2:
            mid = (lo + hi) // 2
            if fits(mid, wide):
                lo = mid
            else:
                hi = mid
        return lo, wide

    def _work_limit(self, sizes, chans, syncs, itemsize) -> float:
        """Bytes one tile may use: from the budget ("auto"), or what a ``tile`` x ``tile``
        tile of the full-resolution stage needs (so lower resolutions get larger tiles)."""
        if self.config.tile is None:
            return self._budget() * self.config.work_fraction
        full = max(sizes, key=lambda hw: hw[0] * hw[1])
        limit, prev = 0, 0
        for s in syncs:
            if sizes[s] == full:
                limit = max(
                    limit, self._probe(prev, s, sizes, chans, True, itemsize, self.config.tile)
                )
            prev = s
        return limit

    def _probe(
        self, start, stop, sizes, chans, keep_all, itemsize, tile, disk=None, wide=False
    ) -> int:
        """Bytes a ``tile`` x ``tile`` tile (``wide``: a full-width band of ``tile`` rows) of
        the pass ``start`` -> ``stop`` needs. ``disk``: ``(ids at start, ids at start on
        disk, channels the pass writes to disk)``; the next tile's read-ahead of those ids
        and :data:`WRITE_BEHIND_TILES` of this tile's written output are in flight on the
        I/O threads (:class:`SpillIO`) meanwhile."""
        core = _interior_tile(*sizes[stop], tile, wide)
        depth = len(chans[stop])
        final = [core] * depth if keep_all else [None] * (depth - 1) + [core]
        needs = _backward(self.ops, start, stop, final, sizes)
        work = _work_bytes(needs, chans, start, itemsize)
        if disk is None:
            return work
        ids, on_disk, written = disk
        channels = dict(zip(ids, chans[start], strict=True))
        ahead = sum(r.area * channels[i] for i, r in _disk_regions(ids, needs[0], on_disk).items())
        behind = WRITE_BEHIND_TILES * core.area * written
        return work + (ahead + behind) * itemsize

    def run(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` (image or latent) -> the program's output, in the VAE dtype."""
        ops = self.ops
        dtype = self._dtype()
        x = x.to(dtype)
        itemsize = x.element_size()
        batch = x.shape[0]
        sizes, chans = _shapes(ops, x.shape[2], x.shape[3], x.shape[1])
        syncs = [i for i, op in enumerate(ops) if op.sync] + [len(ops)]
        limit = self._work_limit(sizes, chans, syncs, itemsize * batch)
        # Before an upsampling the state is a quarter of the size after it: a cheap place to
        # keep a checkpoint that the sync points after it can restart from.
        optional = frozenset(
            i for i, op in enumerate(ops) if isinstance(op, (UpConv, Upsample)) and i not in syncs
        )
        budget, floor = self._budget(), self._floor()
        # Keeping a checkpoint saves recomputing everything since the last one in every
        # later pass, which costs far more than smaller tiles: keep what the planner chose
        # (with the smallest useful working set) and give the tiles what is left.
        planned, spilled, store_dtype = self._plan(
            sizes, chans, syncs, optional, dtype, batch, budget, floor
        )
        schedule = _Schedule(
            sorted({*syncs, *(planned & optional)}), planned, spilled, store_dtype, sizes, chans
        )
        files: list[SpilledTensor] = []  # every checkpoint on disk, closed on any exit
        spill_files = SpillFiles()  # their files, reused by later checkpoints of one size
        io = SpillIO()  # their I/O threads (started on first use), stopped before the files
        try:
            with reuse_freed_heap(x.device):
                return self._passes(x, schedule, limit, files, io, spill_files)
        finally:
            io.close()
            self.report.spill_wait_s = io.waited
            self.report.spill_io_cpu_s = io.cpu
            for f in files:
                f.close()
            spill_files.close()
            self.report.spill_files_reused = spill_files.reused

    def _passes(
        self,
        x: Tensor,
        schedule: _Schedule,
        limit: float,
        files: list,
        io: SpillIO,
        spill_files: SpillFiles,
    ) -> Tensor:
        """Run the passes of ``schedule`` on ``x`` (already in the VAE dtype); every
        temporary file made is appended to ``files`` (the caller closes them and ``io``)."""
        ops = self.ops
        points, planned, spilled = schedule.points, schedule.planned, schedule.spilled
        store_dtype, sizes, chans = schedule.store_dtype, schedule.sizes, schedule.chans
        dtype = x.dtype
        itemsize = x.element_size()
        batch = x.shape[0]
        stats: dict[int, GroupStats] = {}
        ctx = _Context(stats, ops)
        counter = [0]
        fmt = self._memory_format()
        # The checkpoint: boundary index, element ids and id -> whole-image tensor.
        ck_index, ck_ids, ck_store = 0, [0], {0: x}
        budget, floor = self._budget(), self._floor()
        for p, s in enumerate(points):
            op = ops[s] if s < len(ops) else None
            ids = _ids(ops, ck_index, s, ck_ids, counter)
            h, w = sizes[s]
            new_ids = list(dict.fromkeys(i for i in ids if i not in ck_store))
            new_chans = {i: chans[s][ids.index(i)] for i in new_ids}
            store_item = torch.empty((), dtype=store_dtype[s]).element_size()
            new_bytes = sum(c * h * w * store_item * batch for c in new_chans.values())
            ck_bytes = _memory_bytes(ck_store)
            must_keep = op is None or isinstance(op, Attend)
            keep = must_keep or s in planned
            spill = keep and not must_keep and s in spilled
            in_place = (
                keep
                and not spill
                and _in_place(ck_index, ck_ids, s, ids, sizes, chans)
                and isinstance(ck_store[ck_ids[0]], Tensor)
                and ck_store[ck_ids[0]].dtype == store_dtype[s]
            )
            held = ck_bytes + (new_bytes if keep and not in_place and not spill else 0)
            work = min(limit, max(budget - held, floor))
            if in_place:
                work /= 2  # the other half holds two bands of finished tiles
            disk_ids = frozenset(i for i in ck_ids if isinstance(ck_store[i], SpilledTensor))
            written = sum(new_chans.values()) if spill else 0
            disk = (ck_ids, disk_ids, written) if disk_ids or written else None
            tile, wide = self._tile_for(
                ck_index, s, sizes, chans, keep, itemsize * batch, work, disk
            )
            if in_place:
                row_bytes = w * new_bytes / max(h * w, 1)
                tile = max(8, min(tile, int(work / (2 * max(row_bytes, 1)))))
                # (never banded: in place needs the checkpoint in memory and no spill)
                in_place = self._halo(ck_index, s, sizes, chans, tile) <= min(
                    b - a for a, b in _spans(h, tile)
                )
            grid = _grid(h, w, tile, wide)
            if wide:
                self.report.banded.append(s)
            heap_bound = int(self.config.budget * FREED_HEAP_FRACTION)
            norm = op.norm if isinstance(op, Attend) else op if isinstance(op, Norm) else None
            acc = GroupStats(norm.module.num_groups) if norm is not None else None
            store = {}
            bands: list[list[tuple[Region, Tensor]]] = []  # finished tiles not yet written
            if in_place:
                (new_id,) = new_chans
                store[new_id] = ck_store[ck_ids[0]]
            elif spill:
                for i, c in new_chans.items():
                    shape = (batch, c, h, w)
                    files.append(
                        SpilledTensor(
                            shape,
                            store_dtype[s],
                            self.config.spill_dir,
                            fmt,
                            x.device,
                            files=spill_files,
                        )
                    )
                    store[i] = files[-1]
                    self.report.spill_bytes += files[-1].nbytes
                    on_disk = sum(f.nbytes for f in files if not f.closed)
                    self.report.spill_peak = max(self.report.spill_peak, on_disk)
            elif keep:
                for i, c in new_chans.items():
                    store[i] = torch.empty(
                        batch, c, h, w, dtype=store_dtype[s], device=x.device, memory_format=fmt
                    )
            full = Region(0, sizes[ck_index][0], 0, sizes[ck_index][1])
            # The op that makes the stored top element (only Pushes follow it) computes each
            # tile straight into a buffer placed for direct I/O when it can: the write then
            # goes from there to the file, with no copy (SpilledTensor._write_run).
            last = max((j for j in range(ck_index, s) if not isinstance(ops[j], Push)), default=-1)
            write_out = (
                spill
                and last >= 0
                and ops[last].writes_out
                and ids[-1] in store
                and store_dtype[s] == dtype
                and x.device.type == "cpu"
            )
            # one tile's output may wait to be written while the next one is computed
            io.write_behind = (
                WRITE_BEHIND_TILES * written * store_item * batch * max(r.area for r in grid)
            )
            checkpoint = (ck_index, ck_ids, ck_store, disk_ids)
            upcoming = self._start_tile(grid[0], checkpoint, s, ids, store, acc, sizes, io)
            for t, core in enumerate(grid):
                final, needs, reads = upcoming
                loaded = {i: (io.result(ck_store[i], f), r) for i, (f, r) in reads.items()}
                reads.clear()  # the futures hold the tensors read
                # the next tile's reads run while this tile is computed
                if t + 1 < len(grid):
                    nxt = grid[t + 1]
                    upcoming = self._start_tile(nxt, checkpoint, s, ids, store, acc, sizes, io)
                pieces = _read_pieces(ck_store, ck_ids, needs[0], full, dtype, loaded)
                del loaded
                for j in range(ck_index, s):
                    # (made when needed, as the op's own output would be, and held by the
                    # pieces only)
                    out = store[ids[-1]].empty(core) if write_out and j == last else None
                    pieces = ops[j].run(pieces, needs[j - ck_index + 1], sizes[j], ctx, out)
                    out = None
                if acc is not None:
                    acc.add(pieces[-1].tensor)
                # each element once: after a Push the top is also asked for its statistics
                # (_start_tile), and the two entries are the same tensor
                stored = set()
                for i, r, piece in zip(ids, final, pieces, strict=True):
                    if r is None or i not in store or i in stored:
                        continue
                    stored.add(i)
                    if spill:
                        io.write(store[i], core, piece.tensor)
                        continue
                    if not in_place:
                        store[i][:, :, core.y0 : core.y1, core.x0 : core.x1] = piece.tensor
                        continue
                    # Overwriting the checkpoint: a band's rows may be replaced once the
                    # next band is finished (no later tile reads them; halo < band height).
                    if not bands or bands[-1][0][0].y0 != core.y0:
                        for done in bands[:-1]:
                            _write_band(store[i], done)
                        bands = bands[-1:] + [[]]
                    bands[-1].append((core, piece.tensor.to(store[i].dtype)))
                del pieces
                heap_bound = _bound_freed_heap(t, heap_bound, x.device)
                self.report.tiles += 1
                if self.tick is not None:
                    self.tick((p + (t + 1) / len(grid)) / len(points))
            if in_place:
                for done in bands:
                    _write_band(store[new_id], done)
            del bands, checkpoint, upcoming  # no reference to the old checkpoint may outlive it
            io.flush()  # the files written are read from the next pass on
            # The next pass's tiles have other shapes: hand the freed heap back to the OS
            # once per pass. Within a pass the tiles' shapes repeat and reuse the freed
            # blocks; trimming between tiles (every 0.1 s before) made every tile fault its
            # memory back in: 25 % of a tiled decode's CPU time for the same peak RSS.
            release_host_memory(x.device)
            self.report.passes += 1
            self.report.tile_sizes.append(tile)
            if in_place:
                self.report.in_place.append(s)
            if spill:
                self.report.spilled.append(s)
            if acc is not None:
                stats[s] = acc
                self.group_stats[norm.module] = acc
            if keep:
                self.report.kept.append(s)
                if not must_keep:
                    peak = ck_bytes + (0 if in_place or spill else new_bytes)
                    self.report.peak_estimate = max(self.report.peak_estimate, peak)
                old = ck_store
                ck_store = {i: store[i] if i in store else ck_store[i] for i in ids}
                ck_index, ck_ids = s, ids
                # delete the files nobody reads any more, free the old tensors now
                _close_dropped(old, ck_store)
                del old
            else:
                self.report.recomputed.append(s)
            if isinstance(op, Attend):
                # The attention input and the output are made by the pass that ends there and
                # always kept in memory (must_keep: never spilled).
                out = _run_attention(
                    op,
                    stats[s],
                    ck_store[ck_ids[-1]].to(dtype),
                    self.config.budget,
                    self.config.attention_window,
                )
                counter[0] += 1
                ck_ids = [*ck_ids[:-1], counter[0]]
                ck_store = {i: ck_store[i] for i in ck_ids[:-1]} | {counter[0]: out}
                ck_index = s + 1
        return ck_store[ck_ids[-1]].to(dtype)

    def _start_tile(self, core, checkpoint, s, ids, store, acc, sizes, io: SpillIO):
        """A tile's regions (what each boundary must provide to store ``core`` of the
        elements in ``store``, and the top when its statistics ``acc`` are gathered), with
        the reads of the checkpoint's elements on disk started on ``io``."""
        ck_index, ck_ids, ck_store, on_disk = checkpoint
        # Ask for each element to be stored once (Push duplicates ids) and for the top
        # whenever its statistics are needed.
        final: list[Region | None] = []
        asked = set()
        for i in ids:
            final.append(core if i in store and i not in asked else None)
            asked.add(i)
        if acc is not None and final[-1] is None:
            final[-1] = core
        needs = _backward(self.ops, ck_index, s, final, sizes)
        regions = _disk_regions(ck_ids, needs[0], on_disk)
        reads = {i: (io.read(ck_store[i], r), r) for i, r in regions.items()}
        return final, needs, reads

    def _floor(self) -> float:
        """The smallest working set a tile is given next to the checkpoints."""
        return max(self._budget() * MIN_WORK_FRACTION, MIN_WORK_BYTES)

    def _budget(self) -> float:
        """The bytes the checkpoints and tiles are planned in (see UNESTIMATED_FRACTION)."""
        return self.config.budget * (1.0 - UNESTIMATED_FRACTION)

    def _halo(self, start: int, stop: int, sizes, chans, tile: int) -> int:
        """Rows above a tile's core that the pass from ``start`` to ``stop`` reads."""
        core = _interior_tile(*sizes[stop], tile)
        needs = _backward(self.ops, start, stop, [core] * len(chans[stop]), sizes)
        return max(core.y0 - r.y0 for r in needs[0] if r is not None)

    def _plan(self, sizes, chans, syncs, optional, dtype, batch, budget, floor):
        """The sync points to keep and the dtype each boundary's checkpoint is stored in.

        Keeping a checkpoint saves recomputing everything since the last one in every later
        pass, which costs far more than smaller tiles: keep what :func:`plan_checkpoints`
        chooses (with the smallest useful working set) and give the tiles what is left.
        With ``compact_checkpoints`` (and no ``spill``), the resolutions where fp32 states
        had to be dropped are stored in bfloat16 when that makes the plan cheaper; the
        output and the attention input stay in the compute dtype.
        """
        ops = self.ops
        spill = self.config.spill
        itemsize = torch.empty((), dtype=dtype).element_size()
        exact = [dtype] * len(sizes)
        disk = 0.0
        if spill:
            try:
                free = shutil.disk_usage(spill_directory(self.config.spill_dir)).free
            except OSError:  # a missing directory: SpilledTensor will say so if it is used
                free = float("inf")
            disk = SPILL_DISK_FRACTION * free
        plan = plan_checkpoints(
            ops, sizes, chans, itemsize * batch, budget, floor, optional, spill, disk
        )
        # bf16 checkpoints are for saving recomputation; spilling saves it without rounding.
        dropped = {sizes[s] for s in syncs if s not in plan.kept}
        use_compact = self.config.compact_checkpoints and not spill
        if not (use_compact and dtype == torch.float32 and dropped):
            return plan.kept, plan.spilled, exact
        compact = [
            torch.bfloat16
            if sizes[i] in dropped and i < len(ops) and not isinstance(ops[i], Attend)
            else dtype
            for i in range(len(sizes))
        ]
        items = [torch.empty((), dtype=d).element_size() * batch for d in compact]
        compact_plan = plan_checkpoints(
            ops, sizes, chans, items, budget, floor, optional, spill, disk
        )
        if compact_plan.cost >= plan.cost:
            return plan.kept, plan.spilled, exact
        self.report.compact = sorted(dropped)
        return compact_plan.kept, compact_plan.spilled, compact

    def _memory_format(self) -> torch.memory_format:
        """The layout of the convs' weights (NHWC when the model was converted to
        channels_last), for the checkpoints: storing NHWC tiles into NCHW checkpoints is a
        slow transposing copy, and crops of them make NCHW tiles downstream. Decided from a
        conv with a spatial kernel: a 1x1 kernel (e.g. the decoder's first op,
        ``post_quant_conv``) is laid out identically in both formats."""
        for op in self.ops:
            if isinstance(op, (Conv, UpConv)):
                wgt = op.module.weight
                if wgt.shape[1] > 1 and wgt.shape[2] * wgt.shape[3] > 1:
                    return torch.channels_last if is_channels_last(wgt) else torch.contiguous_format
        return torch.contiguous_format
