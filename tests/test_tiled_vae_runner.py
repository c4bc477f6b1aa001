"""Tiled VAE runner numbers against formulas written out here: its budget, floor and probe,
the tile search, the report and tiles of a run replayed by hand, the spill directory's free
space, compact checkpoints, states of two new tensors and in-place bands (tiny hand-made
programs and tiny diffusers VAEs)."""

import sys

import pytest
import torch
from tiled_vae_by_hand import conv_op, region, shapes_by_hand, small_program
from torch import nn

from d3sr_core.inference.tiled_vae import planner
from d3sr_core.inference.tiled_vae.ops import Conv, Norm, Push, Residual, UpConv, Upsample


def _runner(ops, budget, **kw):
    from d3sr_core.inference.tiled_vae import TiledVAEConfig, TiledVAERunner

    return TiledVAERunner(ops, TiledVAEConfig(budget=budget, attention_window=None, **kw))


def test_runner_budget_floor_and_tile_limit_written_out():
    """The runner plans in (1 - UNESTIMATED_FRACTION) of the budget, gives a tile at least
    max(MIN_WORK_FRACTION of that, MIN_WORK_BYTES), and (tile=None) work_fraction of it."""
    from d3sr_core.inference.tiled_vae import runner as runner_module

    ops = [conv_op(2, 3), Norm(nn.GroupNorm(1, 3), act=True), conv_op(3, 2)]
    planned = 1 - runner_module.UNESTIMATED_FRACTION
    for budget in (10**6, 10**10):
        r = _runner(ops, budget, work_fraction=0.25)
        assert r._budget() == pytest.approx(budget * planned, rel=1e-12)
        floor = max(
            budget * planned * runner_module.MIN_WORK_FRACTION, runner_module.MIN_WORK_BYTES
        )
        assert r._floor() == pytest.approx(floor, rel=1e-12)
        assert r._work_limit([(5, 5)] * 4, [[2], [3], [3], [2]], [1, 3], 4) == pytest.approx(
            budget * planned * 0.25, rel=1e-12
        )
    assert _runner(ops, 10**6)._floor() == runner_module.MIN_WORK_BYTES
    assert _runner(ops, 10**10)._floor() > runner_module.MIN_WORK_BYTES


def _estimate(elements: list[int], itemsize: int) -> int:
    """planner._work_bytes written out for a chain of one-element boundaries."""
    pair = max(a + b for a, b in zip(elements, elements[1:], strict=False))
    return int(1.6 * (pair * itemsize + max(elements) * 4 * 1.5))


def test_probe_is_the_tile_working_set_written_out():
    """A t x t tile in the middle of the image of a pass through a 3x3 conv needs its
    (t + 2)^2 input and t^2 output (one more conv: (t + 4)^2, ...), clipped to the image (a
    full-width band of t rows: t + 2 rows of the full width, ...); with a checkpoint on disk the next tile's read-ahead of it and one tile's queued writes
    (WRITE_BEHIND_TILES) come on top."""
    from d3sr_core.inference.tiled_vae import runner as runner_module

    ops = [conv_op(2, 3), conv_op(3, 5), Norm(nn.GroupNorm(1, 5), act=True)]
    sizes = [(20, 30)] * 4
    chans = [[2], [3], [5], [5]]
    r = _runner(ops, 10**9)
    for tile in (4, 7, 25):
        t_h, t_w = min(tile, 20), min(tile, 30)
        # inputs grow by 2 rows and columns per conv, clipped to 20 x 30
        out = t_h * t_w * 5
        mid = min(t_h + 2, 20) * min(t_w + 2, 30) * 3
        inp = min(t_h + 4, 20) * min(t_w + 4, 30) * 2
        want = _estimate([inp, mid, out], 4)
        assert r._probe(0, 2, sizes, chans, True, 4, tile) == want
        assert r._probe(1, 2, sizes, chans, True, 2, tile) == _estimate([mid, out], 2)
        # the state at boundary 0 is on disk and the pass writes 5 channels to disk
        disk = ([0], frozenset([0]), 5)
        behind = runner_module.WRITE_BEHIND_TILES * t_h * t_w * 5
        assert r._probe(0, 2, sizes, chans, True, 4, tile, disk) == want + (inp + behind) * 4
        nothing_read = ([0], frozenset(), 5)
        assert r._probe(0, 2, sizes, chans, True, 4, tile, nothing_read) == want + behind * 4
        # full-width bands of t_h rows: inputs grow by 2 rows per conv
        b_out, b_mid, b_inp = t_h * 30 * 5, min(t_h + 2, 20) * 30 * 3, min(t_h + 4, 20) * 30 * 2
        band = _estimate([b_inp, b_mid, b_out], 4)
        assert r._probe(0, 2, sizes, chans, True, 4, tile, wide=True) == band
        behind = runner_module.WRITE_BEHIND_TILES * b_out
        got = r._probe(0, 2, sizes, chans, True, 4, tile, disk, wide=True)
        assert got == band + (b_inp + behind) * 4


def test_probe_keeps_the_whole_stack_only_when_asked():
    """keep_all: every element of the stack at the pass's end is stored (a residual block's
    input and branch); otherwise only the top is needed there."""
    ops = [Push(), conv_op(3, 4)]
    sizes = [(9, 9)] * 3
    chans = [[3], [3, 3], [3, 4]]
    r = _runner(ops, 10**9)
    # keep_all: 3 ch (the pushed input, 5x5 core) + 4 ch (branch) at the end; the conv's
    # input covers the core grown by one (7x7); the input before the push, their union
    top = _estimate([7 * 7 * 3, 25 * 3 + 7 * 7 * 3, 25 * 3 + 25 * 4], 4)
    only = _estimate([7 * 7 * 3, 7 * 7 * 3, 25 * 4], 4)
    assert r._probe(0, 2, sizes, chans, True, 4, 5) == top
    assert r._probe(0, 2, sizes, chans, False, 4, 5) == only


@pytest.mark.parametrize("limit", [0, 9000, 20000, 45000, 10**9])
def test_tile_for_is_the_largest_tile_that_fits(limit):
    """The tile side chosen for a pass: the whole image if it fits the limit, else a side
    whose working set fits and within 2 of the first that does not (a bisection down to 2;
    8 at least)."""
    ops = [conv_op(2, 3), conv_op(3, 5), Norm(nn.GroupNorm(1, 5), act=True)]
    sizes = [(40, 60)] * 4
    chans = [[2], [3], [5], [5]]
    r = _runner(ops, 10**9)
    probe = {t: r._probe(0, 2, sizes, chans, True, 4, t) for t in range(1, 64)}
    fits = [t for t in range(8, 61) if probe[t] <= limit]
    tile, wide = r._tile_for(0, 2, sizes, chans, True, 4, limit)
    assert not wide, "squares without disk I/O"
    if probe[60] <= limit:
        assert tile == 60
    elif not fits:
        assert tile == 8
    else:
        assert probe[tile] <= limit and tile + 2 >= max(fits)


def test_work_limit_of_a_fixed_tile_is_its_largest_full_resolution_pass():
    """tile=T: a tile may use what a T x T tile of the most expensive pass at the largest
    resolution needs (every stored element kept); lower resolutions then get larger tiles."""
    ops = [
        conv_op(2, 3),
        Norm(nn.GroupNorm(1, 3), act=True),
        Upsample(),
        conv_op(3, 6),
        conv_op(6, 2),
    ]
    ops.append(Norm(nn.GroupNorm(1, 2), act=True))
    sizes = [(10, 10), (10, 10), (10, 10), (20, 20), (20, 20), (20, 20), (20, 20)]
    chans = [[2], [3], [3], [3], [6], [2], [2]]
    syncs = [1, 5, 6]
    r = _runner(ops, 10**9, tile=6)
    # passes ending at full resolution: 1 -> 5 (upsample, conv, conv) and 5 -> 6 (nothing)
    # 1 -> 5: output 6x6x2, conv input 8x8x6, conv input 10x10x3, upsample input 5x5x3
    big = _estimate([5 * 5 * 3, 10 * 10 * 3, 8 * 8 * 6, 6 * 6 * 2], 4)
    assert r._work_limit(sizes, chans, syncs, 4) == big


def _report_by_hand(ops, sizes, chans, tokens, report, batch, items):
    """Replays a run's report (kept, spilled, in-place) with the tokens of
    :func:`shapes_by_hand`: the bytes written to disk, the most bytes on disk at once and
    the largest checkpoint bytes held by choice."""
    from d3sr_core.inference.tiled_vae.ops import Attend

    n = len(ops)

    def nbytes(b, t):
        c = chans[b][tokens[b].index(t)]
        return c * sizes[b][0] * sizes[b][1] * items[b] * batch

    ck, on_disk, written, disk_peak, peak = 0, {}, 0, 0, 0
    for s in sorted(report.kept):
        new = [t for t in dict.fromkeys(tokens[s]) if t not in tokens[ck]]
        new_bytes = sum(nbytes(s, t) for t in new)
        in_memory = sum(nbytes(ck, t) for t in dict.fromkeys(tokens[ck]) if t not in on_disk)
        forced = s == n or isinstance(ops[s], Attend)
        if s in report.spilled:
            on_disk |= {t: nbytes(s, t) for t in new}
            written += new_bytes
            disk_peak = max(disk_peak, sum(on_disk.values()))
        if not forced:
            extra = 0 if s in report.spilled or s in report.in_place else new_bytes
            peak = max(peak, in_memory + extra)
        ck = s + 1 if forced and s < n else s
        on_disk = {t: b for t, b in on_disk.items() if t in tokens[ck]}
    return written, disk_peak, peak


def _tiles_by_hand(runner, ops, sizes, chans, tokens, report, batch, items):
    """The tile side of every pass, replayed from the report: a tile may use the planning
    budget less the checkpoint's bytes in memory and the state being stored in memory
    (at least the floor, at most the work limit); half of that when the state overwrites
    its one-tensor checkpoint band by band, and then at most as many rows as two bands of
    the state fit in; its working set counts the checkpoint's reads from disk and the
    queued writes (runner._probe). Also the passes that read or write the disk (their
    tiles are full-width bands)."""
    from d3sr_core.inference.tiled_vae.ops import Attend

    n = len(ops)

    def nbytes(b, t):
        c = chans[b][tokens[b].index(t)]
        return c * sizes[b][0] * sizes[b][1] * items[b] * batch

    limit = runner._budget() * runner.config.work_fraction
    ck, on_disk, tiles, banded = 0, set(), [], []
    for s in sorted(report.kept + report.recomputed):
        keep, spill = s in report.kept, s in report.spilled
        forced = s == n or isinstance(ops[s], Attend)
        new = [t for t in dict.fromkeys(tokens[s]) if t not in tokens[ck]]
        new_bytes = sum(nbytes(s, t) for t in new)
        held = sum(nbytes(ck, t) for t in dict.fromkeys(tokens[ck]) if t not in on_disk)
        one = len(set(tokens[ck])) == len(set(tokens[s])) == 1
        in_place = (
            keep
            and not spill
            and ck > 0
            and one
            and sizes[ck] == sizes[s]
            and chans[ck][0] == chans[s][0]
            and tokens[ck][0] not in tokens[s]
            and tokens[ck][0] not in on_disk
            and items[ck] == items[s]
        )
        if keep and not in_place and not spill:
            held += new_bytes
        work = min(limit, max(runner._budget() - held, runner._floor()))
        if in_place:
            work /= 2
        written = sum(chans[s][tokens[s].index(t)] for t in new) if spill else 0
        from_disk = frozenset(t for t in tokens[ck] if t in on_disk)
        disk = (tokens[ck], from_disk, written) if from_disk or written else None
        tile, wide = runner._tile_for(ck, s, sizes, chans, keep, 4 * batch, work, disk)
        if in_place:
            rows = sizes[s][1] * new_bytes / (sizes[s][0] * sizes[s][1])
            tile = max(8, min(tile, int(work / (2 * rows))))
        tiles.append(tile)
        if wide:
            assert disk is not None
            banded.append(s)
        if keep:
            on_disk |= set(new) if spill else set()
            ck = s + 1 if forced and s < n else s
            on_disk = {t for t in on_disk if t in tokens[ck]}
    return tiles, banded


@pytest.mark.parametrize("case", ["spill", "in_place", "compact"])
def test_run_report_and_ticks_written_out(case, monkeypatch, tmp_path):
    """A tiny decode that spills (cheap disk prices), overwrites checkpoints in place, or
    also stores the states of the resolutions that do not fit in bfloat16 (compact):
    the output equals diffusers' decode, there is one pass per sync point kept or
    recomputed, ceil(h / tile) x ceil(w / tile) tiles per pass (ceil(h / tile) full-width
    bands in the passes that read or write the disk), one tick per tile at
    (pass + tiles done / tiles) / passes, and the spill bytes, the most bytes on disk and the
    checkpoint peak are those of the states the report says were kept."""
    import math

    from tiny_models import tiny_vae

    from d3sr_core.inference.tiled_vae import runner as runner_module
    from d3sr_core.inference.tiled_vae.ops import Attend
    from d3sr_core.inference.tiled_vae.program import decoder_program

    vae = tiny_vae()
    z = torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(21))
    ops = decoder_program(vae)
    sizes, chans, tokens = shapes_by_hand(ops, 10, 12, 4)
    full = 2 * sizes[-1][0] * sizes[-1][1] * 4  # one fp32 full-resolution channel, batch 2
    monkeypatch.setattr(runner_module, "MIN_WORK_BYTES", 16 * 1024)
    if case == "spill":
        monkeypatch.setattr(planner, "SPILL_READ_COST", 1.0)
        monkeypatch.setattr(planner, "SPILL_WRITE_COST", 1.0)
        budget = 4 * full  # most of it for the tiles: sides between 8 and the image
        kw = {"spill": True, "spill_dir": str(tmp_path), "work_fraction": 0.9}
    else:
        budget = (14 if case == "in_place" else 12) * full
        kw = {"spill": False, "compact_checkpoints": case == "compact"}
    ticks = []
    from d3sr_core.inference.tiled_vae import TiledVAEConfig, TiledVAERunner

    config = TiledVAEConfig(budget=budget, attention_window=None, **kw)
    runner = TiledVAERunner(ops, config, ticks.append)
    with torch.inference_mode():
        out = runner.run(z)
        ref = vae.decode(z).sample
    if case == "compact":  # bf16-rounded states: within bf16 rounding of the exact output
        mse = float(((out - ref) ** 2).mean())
        assert 0 < mse and 10 * math.log10(float(ref.max() - ref.min()) ** 2 / mse) >= 40
    else:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    report = runner.report
    points = sorted(report.kept + report.recomputed)
    assert len(points) == len(set(points)) == report.passes == len(report.tile_sizes)
    # passes that read or write the disk tile in full-width bands
    grids = [
        math.ceil(sizes[s][0] / t) * (1 if s in report.banded else math.ceil(sizes[s][1] / t))
        for s, t in zip(points, report.tile_sizes, strict=True)
    ]
    assert report.tiles == sum(grids) > report.passes
    want = [(p + (t + 1) / g) / len(points) for p, g in enumerate(grids) for t in range(g)]
    assert ticks == pytest.approx(want, rel=1e-12)
    if case == "spill":
        assert report.spilled and not report.in_place
    else:
        assert report.in_place and not report.spilled and report.recomputed
    assert bool(report.compact) == (case == "compact")
    assert set(report.spilled) | set(report.in_place) <= set(report.kept)
    # bytes per element of each boundary's checkpoint: bf16 at the compact resolutions
    # (not the attention input, not the output)
    items = [4] * len(sizes)
    for b, size in enumerate(sizes[:-1]):
        if size in report.compact and not isinstance(ops[b], Attend):
            items[b] = 2
    written, disk_peak, peak = _report_by_hand(ops, sizes, chans, tokens, report, 2, items)
    assert report.spill_bytes == written
    assert report.spill_peak == disk_peak
    assert report.peak_estimate == peak > 0
    tiles, banded = _tiles_by_hand(runner, ops, sizes, chans, tokens, report, 2, items)
    assert report.tile_sizes == tiles
    assert report.banded == banded
    # seconds the computation waited for the disk: some when spilling, none otherwise
    assert isinstance(report.spill_wait_s, float) and report.spill_wait_s >= 0.0
    assert (report.spill_wait_s > 0.0) == (case == "spill")


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_untiled_estimate_is_the_written_out_formula(kind):
    """estimate_untiled_bytes (a calibrated heuristic, see whole.py): factor x batch x
    ((largest adjacent pair of states + largest state) x itemsize + largest state x the
    temporaries' itemsize: 4 in fp32, the dtype's own in half precision), states counted
    over every stack element, factor 0.55 for decode and 0.65 for encode."""
    from tiny_models import tiny_vae

    from d3sr_core.inference.tiled_vae import whole
    from d3sr_core.inference.tiled_vae.program import decoder_program, encoder_program

    vae = tiny_vae()
    if kind == "decode":
        ops, shape, factor = decoder_program(vae), (2, 4, 6, 5), 0.55
    else:
        ops, shape, factor = encoder_program(vae), (2, 3, 40, 56), 0.65
    sizes, chans, _ = shapes_by_hand(ops, shape[2], shape[3], shape[1])
    per = [sum(c) * h * w for (h, w), c in zip(sizes, chans, strict=True)]
    pair = max(a + b for a, b in zip(per, per[1:], strict=False))
    for dtype, item, temp in ((torch.float64, 8, 4), (torch.float32, 4, 4), (torch.bfloat16, 2, 2)):
        want = int(factor * 2 * ((pair + max(per)) * item + max(per) * temp))
        assert whole.estimate_untiled_bytes(vae, kind, shape, dtype) == want


@pytest.mark.parametrize("batch", [1, 3])
def test_a_fixed_tile_sets_the_full_resolution_tiles_for_any_batch(batch):
    """tile=T: the most demanding full-resolution pass runs T x T tiles (within the tile
    search's 2), whatever the batch (a batch multiplies every pass's bytes alike); the other
    passes get the tiles that fit the same bytes."""
    from tiny_models import tiny_vae

    from d3sr_core.inference.tiled_vae import TiledVAEConfig, TiledVAERunner
    from d3sr_core.inference.tiled_vae.program import decoder_program

    vae = tiny_vae()
    z = torch.randn(batch, 4, 6, 7, generator=torch.Generator().manual_seed(31))
    ops = decoder_program(vae)
    sizes, _, _ = shapes_by_hand(ops, 6, 7, 4)
    config = TiledVAEConfig(budget=10**12, tile=16, attention_window=None)
    runner = TiledVAERunner(ops, config)
    with torch.inference_mode():
        out = runner.run(z)
    torch.testing.assert_close(out, vae.decode(z).sample, atol=1e-4, rtol=1e-4)
    report = runner.report
    points = sorted(report.kept + report.recomputed)
    at = dict(zip(points, report.tile_sizes, strict=True))
    full = [t for s, t in at.items() if sizes[s] == sizes[-1]]
    assert 14 <= min(full) <= 18


def _encode_under_budget(monkeypatch, dtype, budget, seed):
    """A tiny VAE's encode by the runner at ``budget`` (no spill, no compact checkpoints), and
    diffusers' encoder on the same input: ``(runner, out, ref, ops, sizes, chans, optional)``."""
    from tiny_models import tiny_vae

    from d3sr_core.inference.tiled_vae import runner as runner_module
    from d3sr_core.inference.tiled_vae.program import encoder_program

    monkeypatch.setattr(runner_module, "MIN_WORK_BYTES", 16 * 1024)
    vae = tiny_vae().to(dtype)
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x = x.to(dtype)
    ops = encoder_program(vae)
    sizes, chans, _ = shapes_by_hand(ops, 40, 56, 3)
    runner = _runner(ops, budget, spill=False, compact_checkpoints=False)
    with torch.inference_mode():
        out = runner.run(x)
        h = vae.encoder(x)
        ref = vae.quant_conv(h) if vae.quant_conv is not None else h
    optional = frozenset(i for i, op in enumerate(ops) if isinstance(op, (UpConv, Upsample)))
    return runner, out, ref, ops, sizes, chans, optional


def test_runner_follows_the_plan_for_its_input_shape(monkeypatch):
    """An encode under a tight budget keeps exactly the states plan_checkpoints chooses for
    the image's real shapes (3 input channels, not e.g. its height) with the runner's
    planning budget and tile floor, and still equals diffusers' encoder."""
    runner, out, ref, ops, sizes, chans, optional = _encode_under_budget(
        monkeypatch, torch.float32, 200_000, 32
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    plan = planner.plan_checkpoints(
        ops, sizes, chans, 4, runner._budget(), runner._floor(), optional, False, 0.0
    )
    assert set(runner.report.kept) == plan.kept
    assert runner.report.recomputed, "the budget is tight"


def test_runner_plans_bfloat16_states_at_two_bytes(monkeypatch):
    """A bf16 encode plans its checkpoints with 2-byte elements: at a budget where the
    fp32-sized plan keeps fewer states, the runner keeps exactly the 2-byte plan's, and the
    result stays diffusers' bf16 encoder's."""
    runner, out, ref, ops, sizes, chans, optional = _encode_under_budget(
        monkeypatch, torch.bfloat16, 100_000, 33
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)
    args = (runner._budget(), runner._floor(), optional, False, 0.0)
    two = planner.plan_checkpoints(ops, sizes, chans, 2, *args)
    four = planner.plan_checkpoints(ops, sizes, chans, 4, *args)
    assert two.kept != four.kept, "the budget separates the two element sizes"
    assert set(runner.report.kept) == two.kept


def test_disk_regions_read_each_element_once_over_every_region_asked():
    """A pushed state holds one tensor twice: the region read of it from disk is the bounding
    box of every region asked of either copy (whichever order); elements in memory and
    regions not asked (None) are not read."""
    from d3sr_core.inference.tiled_vae.runner import _disk_regions

    r = region
    ids = [7, 7, 9, 4]
    regions = [r(0, 4, 2, 6), r(3, 9, 0, 5), None, r(1, 2, 1, 2)]
    assert _disk_regions(ids, regions, {7, 9}) == {7: r(0, 9, 0, 6)}
    assert _disk_regions(ids[::-1], regions[::-1], {7, 4}) == {7: r(0, 9, 0, 6), 4: r(1, 2, 1, 2)}
    assert _disk_regions(ids, regions, set()) == {}


def _bisection(cost, side: int, limit: float) -> int:
    """The tile search written out: the whole side if its working set fits, else a bisection
    of [8, side] that keeps the lower end while it fits, down to an interval of 2."""
    if cost(side) <= limit:
        return side
    lo, hi = 8, side
    while hi - lo > 2:
        mid = (lo + hi) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("case", ["disk", "keep"])
def test_tile_search_counts_disk_io_and_the_stored_stack(case):
    """_tile_for is the bisection above over the working set of _probe's formula (see the
    probe tests): with the checkpoint read from disk and the pass's writes queued
    (``disk``), and with every stacked element stored (``keep``) or only the top, at limits
    equal to the working set of every side (a limit met exactly fits) and one byte below.
    With disk I/O the tiles are full-width bands, the search over their height, as long as
    a band of 8 rows fits; below that, squares."""
    from d3sr_core.inference.tiled_vae import runner as runner_module

    size = (40, 60)

    def clip(t, grow):
        return min(min(t, size[0]) + grow, size[0]) * min(min(t, size[1]) + grow, size[1])

    def band(t, grow):  # t rows of the full width, grown by ``grow`` rows
        return min(min(t, size[0]) + grow, size[0]) * size[1]

    if case == "disk":
        ops = [conv_op(2, 3), conv_op(3, 5), Norm(nn.GroupNorm(1, 5), act=True)]
        chans = [[2], [3], [5], [5]]
        io = ([0], frozenset([0]), 5)  # boundary 0 on disk, 5 channels written

        def cost(t, with_io, area):
            base = _estimate([area(t, 4) * 2, area(t, 2) * 3, area(t, 0) * 5], 4)
            behind = runner_module.WRITE_BEHIND_TILES * area(t, 0) * 5
            return base + (area(t, 4) * 2 + behind) * 4 if with_io else base

        # with I/O: bands while an 8-row band fits, else squares
        band_cost, square_io = (lambda t: cost(t, True, band)), (lambda t: cost(t, True, clip))
        variants = [
            (True, io, band_cost, size[0], True),
            (True, io, square_io, size[1], False),
            (True, None, lambda t: cost(t, False, clip), size[1], False),
        ]
    else:
        ops = [Push(), conv_op(3, 4)]
        chans = [[3], [3, 3], [3, 4]]

        def cost(t, keep_all):
            inp, core = clip(t, 2) * 3, clip(t, 0)
            if keep_all:  # the pushed input's core and the branch stored
                return _estimate([inp, core * 3 + inp, core * 3 + core * 4], 4)
            return _estimate([inp, inp, core * 4], 4)

        variants = [
            (True, None, lambda t: cost(t, True), size[1], False),
            (False, None, lambda t: cost(t, False), size[1], False),
        ]
    sizes = [size] * len(chans)
    r = _runner(ops, 10**9)
    limits = {0, 10**9}
    for _, _, c, side, _ in variants:
        limits |= {c(t) + d for t in range(8, side + 1) for d in (0, -1)}
    bands = squares = 0
    for keep, disk, c, side, wide in variants:
        for limit in sorted(limits):
            if disk is not None and (limit >= variants[0][2](8)) != wide:
                continue  # the other variant's limits
            want = (_bisection(c, side, limit), wide)
            assert r._tile_for(0, 2, sizes, chans, keep, 4, limit, disk) == want, limit
            bands, squares = bands + wide, squares + (not wide)
    assert bands > 50 if case == "disk" else bands == 0
    assert squares > 50


def test_work_limit_of_a_fixed_tile_takes_the_largest_area():
    """tile=T: "full resolution" is the boundary size of the largest area, even when another
    size is taller or wider (strided 1x1 convs here), and the first pass starts at the
    input: the limit is the T x T working set of the passes ending at that size."""
    gn = Norm(nn.GroupNorm(1, 3), act=True)
    out_norm = Norm(nn.GroupNorm(1, 2), act=True)
    t = 6
    for size, stride in (((4, 50), (1, 5)), ((20, 10), (5, 1))):
        squeeze = Conv(nn.Conv2d(3, 3, 1, stride=stride), (0, 0, 0, 0))
        ops = [conv_op(2, 3), gn, squeeze, Upsample(), conv_op(3, 2), out_norm]
        sizes, chans, _ = shapes_by_hand(ops, *size, 2)
        low = (size[0] // stride[0], size[1] // stride[1])
        assert sizes[:4] == [size] * 3 + [low] and sizes[4:] == [(2 * low[0], 2 * low[1])] * 3
        # 200 px at the input, 160 after the upsampling (taller, or wider)
        r = _runner(ops, 10**9, tile=t)
        # the only pass ending at the input's size: the first conv, a t x t core (clipped)
        # and its input one pixel larger on each side (clipped)
        th, tw = min(t, size[0]), min(t, size[1])
        inp = min(th + 2, size[0]) * min(tw + 2, size[1]) * 2
        assert r._work_limit(sizes, chans, [1, 5, 6], 4) == _estimate([inp, th * tw * 3], 4)


def _program_shapes():
    """:func:`small_program` with its latent 3 x 5 x 4 shapes, sync points (the end included) and
    optional checkpoints (before an upsampling)."""
    ops = small_program()
    sizes, chans, _ = shapes_by_hand(ops, 3, 5, 4)
    syncs = [i for i, op in enumerate(ops) if op.sync] + [len(ops)]
    optional = frozenset(i for i, op in enumerate(ops) if isinstance(op, (UpConv, Upsample)))
    return ops, sizes, chans, syncs, optional


def test_plan_spills_at_most_a_share_of_the_spill_directory_free_space(monkeypatch, tmp_path):
    """spill: the states on disk at once may take SPILL_DISK_FRACTION of the free space of
    the configured spill directory (its disk_usage, faked here: room for about one state
    after the upsampling conv); a directory whose free space cannot be looked up (missing)
    sets no limit (the spill file then says why it cannot be made)."""
    import shutil
    from types import SimpleNamespace

    from d3sr_core.inference.tiled_vae import runner as runner_module

    monkeypatch.setattr(planner, "SPILL_WRITE_COST", 1.0)
    monkeypatch.setattr(planner, "SPILL_READ_COST", 2.0)
    ops, sizes, chans, syncs, optional = _program_shapes()
    unit = 3 * 5 * 4
    budget, floor = 40 * unit, 10 * unit
    free = 50 * unit / runner_module.SPILL_DISK_FRACTION
    real = shutil.disk_usage

    def disk_usage(path):
        if str(path) == str(tmp_path):
            return SimpleNamespace(total=10**15, used=0, free=free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    args = (ops, sizes, chans, 4, budget, floor, optional, True)
    small = planner.plan_checkpoints(*args, 50 * unit)
    unlimited = planner.plan_checkpoints(*args, float("inf"))
    assert small.spilled != unlimited.spilled, "the free space limits the plan"
    exact = [torch.float32] * len(sizes)
    for directory, plan in ((tmp_path, small), (tmp_path / "missing", unlimited)):
        r = _runner(ops, 10**9, spill=True, spill_dir=str(directory))
        got = r._plan(sizes, chans, syncs, optional, torch.float32, 1, budget, floor)
        assert got == (plan.kept, plan.spilled, exact)


def test_compact_checkpoints_are_bfloat16_at_the_dropped_resolutions_when_cheaper():
    """compact_checkpoints (fp32, no spill): where the fp32 plan drops a sync point, the
    states of that resolution are planned and stored in bfloat16 (2 bytes), except the
    attention input and the output, and that plan is used if it costs less than the fp32
    one (not at equal cost: then nothing is rounded)."""
    from d3sr_core.inference.tiled_vae.ops import Attend

    ops, sizes, chans, syncs, optional = _program_shapes()
    n = len(ops)
    unit = 3 * 5 * 4
    floor = 10 * unit
    seen = set()
    for budget in (0, 40 * unit, 60 * unit, 80 * unit, 120 * unit, 10**9):
        args = (budget, floor, optional, False, 0.0)
        fp32 = planner.plan_checkpoints(ops, sizes, chans, 4, *args)
        dropped = {sizes[s] for s in syncs if s not in fp32.kept}
        bf16 = [
            b < n and sizes[b] in dropped and not isinstance(ops[b], Attend) for b in range(n + 1)
        ]
        compact = planner.plan_checkpoints(ops, sizes, chans, [2 if b else 4 for b in bf16], *args)
        r = _runner(ops, 10**9, spill=False, compact_checkpoints=True)
        got = r._plan(sizes, chans, syncs, optional, torch.float32, 1, budget, floor)
        if dropped and compact.cost < fp32.cost:
            dtypes = [torch.bfloat16 if b else torch.float32 for b in bf16]
            assert got == (compact.kept, compact.spilled, dtypes)
            assert r.report.compact == sorted(dropped)
            seen.add("compact")
        else:
            assert got == (fp32.kept, fp32.spilled, [torch.float32] * (n + 1))
            assert r.report.compact == []
            seen.add("equal" if dropped else "all kept")
            if any(sizes[b] not in dropped for b in range(n)):
                seen.add("partly dropped")
    assert seen == {"compact", "equal", "all kept", "partly dropped"}, seen


def _two_tensor_program():
    """conv, push, conv, norm (a sync point whose state is two new tensors: the pushed
    input and the branch), conv, residual add, conv; and the same computation written with
    torch on whole images."""
    torch.manual_seed(5)
    conv_a, conv_b, conv_c, conv_out = conv_op(4, 6), conv_op(6, 6), conv_op(6, 6), conv_op(6, 3)
    norm = Norm(nn.GroupNorm(2, 6), act=True)
    ops = [conv_a, Push(), conv_b, norm, conv_c, Residual(None, 1.0), conv_out]

    def reference(z):
        a = conv_a.module(z)
        branch = conv_c.module(nn.functional.silu(norm.module(conv_b.module(a))))
        return conv_out.module(a + branch)

    return ops, reference


@pytest.mark.parametrize("where", ["memory", "disk", "disk in bands", "missing directory"])
def test_a_stored_state_of_two_new_tensors(where, monkeypatch, tmp_path):
    """A kept state made of two tensors new in its pass is stored whole, in memory or on disk
    (the output equals the computation written out). On disk (cheap I/O, a budget too small
    to keep it in memory): the largest checkpoint held is the input (the spilled state takes
    no memory); each pass's tiles are those whose working set counts the queued writes and
    the read-ahead from disk (:func:`_tiles_by_hand`), and the I/O lets one tile's writes
    (WRITE_BEHIND_TILES) wait behind the computation, none in a pass that writes nothing;
    the files are made in the configured spill directory (a missing one is an error).
    The passes that write or read the disk tile in full-width bands (every write is whole
    rows) where an 8-row band fits (a tall, narrow image), else in squares."""
    from d3sr_core.inference.tiled_vae import runner as runner_module
    from d3sr_core.inference.tiled_vae.spill import SpillError

    monkeypatch.setattr(runner_module, "MIN_WORK_BYTES", 16 * 1024)
    ops, reference = _two_tensor_program()
    hw = (48, 10) if where == "disk in bands" else (20, 24)
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(6))
    sizes, chans, tokens = shapes_by_hand(ops, *hw, 4)
    assert len(set(tokens[3])) == 2 and not set(tokens[3]) & set(tokens[0])
    made = []

    class RecordingIO(runner_module.SpillIO):
        """Per pass (ended by flush): the write-behind bytes and the bytes of each tile's
        writes."""

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.passes, self.tiles = [], {}
            made.append(self)

        def write(self, file, region, tensor):
            nbytes = tensor.numel() * tensor.element_size()
            self.tiles[region] = self.tiles.get(region, 0) + nbytes
            super().write(file, region, tensor)

        def flush(self):
            self.passes.append((self.write_behind, self.tiles))
            self.tiles = {}
            super().flush()

    monkeypatch.setattr(runner_module, "SpillIO", RecordingIO)
    if where == "memory":
        runner = _runner(ops, 10**9, spill=False)
    else:
        monkeypatch.setattr(planner, "SPILL_READ_COST", 1e-3)
        monkeypatch.setattr(planner, "SPILL_WRITE_COST", 1e-3)
        directory = tmp_path / "missing" if where == "missing directory" else tmp_path
        runner = _runner(ops, 80_000, spill=True, spill_dir=str(directory), work_fraction=0.9)
    with torch.inference_mode():
        if where == "missing directory":
            with pytest.raises(SpillError, match="missing"):
                runner.run(z)
            return
        out = runner.run(z)
        ref = reference(z)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    report = runner.report
    assert report.kept == [3, 7] and report.recomputed == []
    if where == "memory":
        assert report.spilled == [] and report.tile_sizes == [24, 24]
        return
    assert report.spilled == [3]
    assert report.peak_estimate == z.numel() * 4
    items = [4] * len(sizes)
    tiles, banded = _tiles_by_hand(runner, ops, sizes, chans, tokens, report, 2, items)
    assert report.tile_sizes == tiles and report.banded == banded
    assert banded == ([3, 7] if where == "disk in bands" else [])
    assert max(report.tile_sizes) < 20, "the budget limits the tiles"
    (io,) = made
    assert len(io.passes) == 2 and io.passes[0][1] and not io.passes[1][1]
    whole_rows = [r.x0 == 0 and r.x1 == sizes[3][1] for r in io.passes[0][1]]
    assert all(whole_rows) if banded else not any(whole_rows)
    for write_behind, tiles in io.passes:
        assert write_behind == runner_module.WRITE_BEHIND_TILES * max(tiles.values(), default=0)


@pytest.mark.parametrize("height,bands", [(27, [7, 7, 6, 7]), (28, [7, 7, 7, 7])])
def test_in_place_needs_bands_at_least_as_high_as_the_halo(height, bands, monkeypatch):
    """A residual block of seven 3x3 convs between two GroupNorms: the second norm's input
    (one tensor, pushed) may overwrite the first's band by band, its tiles' side limited to
    what two bands of the state fit in, 8 at least: a budget this small gives 8 x 8 tiles,
    bands of ``bands`` rows. A tile reads 7 rows above its core, so a band of 6 rows is too
    thin (no overwriting: height 27), 7 rows are enough (height 28). The output equals the
    computation written out either way."""
    from d3sr_core.inference.tiled_vae import runner as runner_module
    from d3sr_core.inference.tiled_vae.ops import _spans

    assert [b - a for a, b in _spans(height, 8)] == bands
    monkeypatch.setattr(runner_module, "MIN_WORK_BYTES", 2000)
    torch.manual_seed(7)
    conv_in, convs, conv, conv_out = (
        conv_op(4, 4),
        [conv_op(4, 4) for _ in range(7)],
        conv_op(4, 4),
        conv_op(4, 3),
    )
    norm1, norm2 = Norm(nn.GroupNorm(2, 4), act=True), Norm(nn.GroupNorm(2, 4), act=True)
    ops = [conv_in, Push(), norm1, *convs, Residual(None, 1.0), Push(), norm2, conv]
    ops += [Residual(None, 1.0), conv_out]
    z = torch.randn(1, 4, height, 8, generator=torch.Generator().manual_seed(8))
    sizes, chans, tokens = shapes_by_hand(ops, height, 8, 4)
    runner = _runner(ops, 12_000, spill=False, compact_checkpoints=False)
    with torch.inference_mode():
        out = runner.run(z)
        a = conv_in.module(z)
        h = nn.functional.silu(norm1.module(a))
        for c in convs:
            h = c.module(h)
        y = a + h
        ref = conv_out.module(y + conv.module(nn.functional.silu(norm2.module(y))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    report = runner.report
    assert report.kept == [2, 12, 16]
    assert report.in_place == ([12] if min(bands) >= 7 else [])
    items = [4] * len(sizes)
    tiles, banded = _tiles_by_hand(runner, ops, sizes, chans, tokens, report, 1, items)
    assert report.tile_sizes == tiles and tiles[1] == 8 and report.banded == banded == []


def test_a_run_reuses_freed_tile_memory_within_a_bound(monkeypatch):
    """The whole run is inside memory.reuse_freed_heap (once, on the input's device). In each
    pass, the first FREED_HEAP_STEADY_TILES tiles set the bound on the freed heap to the most
    they left freed (at least FREED_HEAP_FRACTION of the budget), and
    every later tile that leaves more freed trims the heap and raises the bound to what it
    left; passes also trim when they end.
    The output is the diffusers decode either way."""
    from contextlib import contextmanager

    from tiny_models import tiny_vae

    from d3sr_core.inference.tiled_vae import runner as runner_module
    from d3sr_core.inference.tiled_vae.program import decoder_program

    events = []
    # freed bytes the fake heap reports after each tile, in turn (cycled)
    budget = 3_000_000
    floor = int(budget * runner_module.FREED_HEAP_FRACTION)  # 750_000
    freed = [900_000, 1_000_000, 999_999, 1_000_001, 1_000_001, 1_000_002, 10, 800_000]

    @contextmanager
    def reuse(device):
        events.append(("enter", torch.device(device).type))
        yield
        events.append(("exit",))

    def freed_heap_bytes(device):
        events.append(("freed",))
        return freed[sum(e == ("freed",) for e in events) % len(freed) - 1]

    monkeypatch.setattr(runner_module, "reuse_freed_heap", reuse)
    monkeypatch.setattr(runner_module, "freed_heap_bytes", freed_heap_bytes)

    def release_host_memory(device):  # per tile (from _bound_freed_heap) or per pass
        caller = sys._getframe(1).f_code.co_name
        events.append(("trim",) if caller == "_bound_freed_heap" else ("pass",))

    monkeypatch.setattr(runner_module, "release_host_memory", release_host_memory)
    vae = tiny_vae()
    z = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(9))
    runner = _runner(decoder_program(vae), budget, tile=16)
    with torch.inference_mode():
        out = runner.run(z)
        ref = vae.decode(z).sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    report = runner.report
    assert report.tiles > report.passes > 1 and runner_module.FREED_HEAP_STEADY_TILES == 2
    # the events written out: per tile one reading, then a trim where a tile after the
    # first two left more freed than the pass's bound; a trim at every pass's end
    assert events[0] == ("enter", "cpu") and events[-1] == ("exit",)
    passes, current = [], []
    for e in events[1:-1]:
        if e == ("pass",):
            passes.append(current)
            current = []
        else:
            current.append(e)
    assert current == [] and len(passes) == report.passes
    assert sum(p.count(("freed",)) for p in passes) == report.tiles
    reading = 0
    for got in passes:
        bound, expected = floor, []
        for t in range(got.count(("freed",))):
            value = freed[reading % len(freed)]
            reading += 1
            expected.append(("freed",))
            if t < 2:
                bound = max(bound, value)
            elif value > bound:
                expected.append(("trim",))
                bound = value  # trimmed blocks still count as freed
        assert got == expected
    assert events.count(("trim",)) > 0  # the sequence makes some tiles trim
