"""Tiled VAE planner numbers against formulas written out here: the op costs, a tile's
working-set estimate, and the checkpoint plan against a brute-force search over every
keep / drop choice (tiny hand-made programs, milliseconds each). The runner's are in
test_tiled_vae_runner.py."""

import pytest
from tiled_vae_by_hand import conv_op, region, shapes_by_hand, small_program
from torch import nn

from d3sr_core.inference.tiled_vae import planner
from d3sr_core.inference.tiled_vae.ops import Conv, Norm, Push, Residual, UpConv, Upsample


def test_op_cost_is_the_written_out_flop_count():
    """2 * k_h * k_w * C_in * C_out per output pixel for a conv; the folded upsampling conv
    as 16 taps at the low resolution plus 600 per output element; GroupNorm 300 per element,
    a residual add 300 per element (plus a 1x1 shortcut conv), nearest upsampling 100."""
    conv = conv_op(3, 5)
    assert planner._op_cost(conv, (7, 9), (7, 9), 3, 5) == 2 * 3 * 3 * 3 * 5 * 63
    one = conv_op(4, 6, k=1)
    assert planner._op_cost(one, (5, 5), (5, 5), 4, 6) == 2 * 1 * 1 * 4 * 6 * 25
    wide = Conv(nn.Conv2d(2, 3, (1, 3), padding=(0, 1)), (0, 0, 1, 1))
    assert planner._op_cost(wide, (4, 6), (4, 6), 2, 3) == 2 * 1 * 3 * 2 * 3 * 24
    up = UpConv(nn.Conv2d(4, 6, 3, padding=1))
    assert planner._op_cost(up, (3, 5), (6, 10), 4, 6) == 2 * 16 * 4 * 6 * 15 + 600 * 6 * 60
    norm = Norm(nn.GroupNorm(2, 6), act=True)
    assert planner._op_cost(norm, (3, 4), (3, 4), 6, 6) == 300 * 6 * 12
    plain = Residual(None, 1.0)
    assert planner._op_cost(plain, (3, 4), (3, 4), 6, 6) == 300 * 6 * 12
    short = Residual(nn.Conv2d(4, 6, 1), 1.0)
    assert planner._op_cost(short, (3, 4), (3, 4), 6, 6) == 2 * 4 * 6 * 12 + 300 * 6 * 12
    assert planner._op_cost(Upsample(), (3, 4), (6, 8), 6, 6) == 100 * 6 * 48
    assert planner._op_cost(Push(), (3, 4), (3, 4), 6, 6) == 0.0


def test_work_bytes_is_the_written_out_estimate():
    """1.6 x (the largest adjacent pair of boundaries' elements x itemsize + the largest
    boundary's elements as fp32 temporaries x 1.5), elements = area x channels over the
    regions asked (None: not needed)."""
    r = region
    needs = [
        [r(0, 4, 0, 5), None],  # 20 px x 3 ch = 60
        [r(0, 6, 0, 6), r(1, 3, 0, 4)],  # 36 x 2 + 8 x 5 = 112
        [r(0, 2, 0, 3), r(0, 1, 0, 1)],  # 6 x 7 + 1 x 1 = 43
    ]
    chans = [[3, 9], [2, 5], [7, 1]]
    sizes = [60, 112, 43]
    for itemsize in (2, 4):
        pair = max(sizes[0] + sizes[1], sizes[1] + sizes[2])
        want = int(1.6 * (pair * itemsize + max(sizes) * 4 * 1.5))
        assert planner._work_bytes(needs, chans, 0, itemsize) == want
    # from a later start: the channels of boundaries start, start + 1, ...
    assert planner._work_bytes(needs[1:], [[0], *chans[1:]], 1, 2) == int(
        1.6 * ((112 + 43) * 2 + 112 * 4 * 1.5)
    )
    # the largest pair last: 8 x 1, 5 x 2, 9 x 4 elements
    last = [[r(0, 2, 0, 4)], [r(0, 1, 0, 5)], [r(0, 3, 0, 3)]]
    assert planner._work_bytes(last, [[1], [2], [4]], 0, 2) == int(
        1.6 * ((10 + 36) * 2 + 36 * 4 * 1.5)
    )
    # one boundary: no pair, the boundary alone
    one = [[r(0, 3, 0, 3)]]
    assert planner._work_bytes(one, [[5]], 0, 2) == int(1.6 * (45 * 2 + 45 * 4 * 1.5))


def test_in_place_needs_one_same_shaped_tensor_that_is_not_reused():
    """A state may overwrite its checkpoint only when both are one tensor (a pushed copy is
    the same tensor) of the same size and channels, the checkpoint is not the caller's input
    (boundary 0) and not part of the new state."""
    sizes = {0: (4, 4), 3: (4, 4), 5: (4, 4), 6: (8, 8)}
    chans = {0: [2], 3: [2], 5: [2], 6: [2]}
    assert planner._in_place(3, [7], 5, [8], sizes, chans)
    assert planner._in_place(3, [7, 7], 5, [8, 8], sizes, chans)
    sizes[1], chans[1] = (4, 4), [2]
    assert planner._in_place(1, [7], 5, [8], sizes, chans), "any boundary after the input"
    assert not planner._in_place(0, [7], 5, [8], sizes, chans), "the input is the caller's"
    assert not planner._in_place(3, [7, 9], 5, [8], sizes, chans), "two checkpoint tensors"
    assert not planner._in_place(3, [7], 5, [7, 8], sizes, chans), "two new tensors"
    assert not planner._in_place(3, [7], 5, [7], sizes, chans), "the state reuses it"
    assert not planner._in_place(3, [7], 6, [8], sizes, chans), "another size"
    chans[5] = [3]
    assert not planner._in_place(3, [7], 5, [8], sizes, chans), "other channels"
    sizes[5], chans[5] = (4, 5), [2]
    assert not planner._in_place(3, [7], 5, [8], sizes, chans), "another width"
    sizes[5] = (5, 4)
    assert not planner._in_place(3, [7], 5, [8], sizes, chans), "another height"


# Spill I/O prices as documented in planner.py: one pointwise pass over a bf16 byte (300
# FLOP-equivalents per element / 2 bytes) to write it, two passes to read it back.
DOCUMENTED_IO = (150.0, 300.0)


def _plan_cost(ops, sizes, chans, tokens, items, budget, floor, optional, choice, disk, io):
    """Cost of one keep / spill / drop choice per sync point, or None if it breaks a memory
    or disk limit. A pass costs the ops since the checkpoint plus reading the checkpoint's
    tensors on disk; a kept state must fit next to the in-memory checkpoint and a minimal
    tile (or only two bands of tiles when it overwrites its one-tensor checkpoint); a
    spilled one costs its writes and must fit on disk next to the checkpoint's files."""
    from d3sr_core.inference.tiled_vae.ops import Attend

    n = len(ops)
    write_cost, read_cost = io
    cost_of = [
        planner._op_cost(op, sizes[i], sizes[i + 1], chans[i][-1], chans[i + 1][-1])
        for i, op in enumerate(ops)
    ]

    def nbytes(b):
        out = {}
        for t, c in zip(tokens[b], chans[b], strict=True):
            out[t] = c * sizes[b][0] * sizes[b][1] * items[b]
        return out

    c, mem, cost = 0, set(tokens[0]), 0.0
    points = sorted({i for i, op in enumerate(ops) if op.sync} | {n} | set(optional))
    for s in points:
        what = choice.get(s, "drop")
        at_c, at_s = nbytes(c), nbytes(s)
        on_disk = sum(v for t, v in at_c.items() if t not in mem)
        held = sum(v for t, v in at_c.items() if t in mem)
        step = sum(cost_of[c:s]) + read_cost * on_disk
        new = {t: v for t, v in at_s.items() if t not in at_c}
        stay = {t for t in mem if t in at_s}
        if what == "drop":
            if s not in optional:
                cost += step
            continue
        if what == "disk":
            if not new or on_disk + sum(new.values()) > disk:
                return None
            cost += step + write_cost * sum(new.values())
            c, mem = s, stay
            continue
        one = len(set(tokens[c])) == 1 and len(set(tokens[s])) == 1
        in_place = (
            c > 0
            and one
            and sizes[c] == sizes[s]
            and chans[c][0] == chans[s][0]
            and tokens[c][0] not in tokens[s]
            and tokens[c][0] in mem
        )
        extra = 2 * floor if in_place else sum(new.values())
        forced = s == n or isinstance(ops[s], Attend)
        if not forced and new and held + extra + floor > budget:
            return None
        cost += step
        c, mem = s, stay | set(new)
        if s < n and isinstance(ops[s], Attend):
            c, mem = s + 1, {t for t in mem if t in tokens[s + 1]} | {tokens[s + 1][-1]}
    return cost


@pytest.mark.parametrize("spill,io", [(False, None), (True, None), (True, (1.0, 2.0))])
def test_plan_is_the_cheapest_of_every_choice(spill, io, monkeypatch):
    """plan_checkpoints' dynamic programme returns the least cost over all keep / spill /
    drop choices, found here by trying each one, at budgets from keeping nothing to keeping
    everything, with a disk limit that allows some states only; the plan it returns is one
    of the cheapest choices. Disk I/O at the documented prices (which this tiny program's
    cheap convs rarely pay for) and at prices that make spilling worth it."""
    import itertools

    if io is None:
        io = DOCUMENTED_IO
    else:
        monkeypatch.setattr(planner, "SPILL_WRITE_COST", io[0])
        monkeypatch.setattr(planner, "SPILL_READ_COST", io[1])

    from d3sr_core.inference.tiled_vae.ops import Attend

    ops = small_program()
    sizes, chans, tokens = shapes_by_hand(ops, 3, 5, 4)
    n = len(ops)
    optional = frozenset(i for i, op in enumerate(ops) if isinstance(op, (UpConv, Upsample)))
    free = [
        i for i, op in enumerate(ops) if (op.sync or i in optional) and not isinstance(op, Attend)
    ]
    forced = {n} | {i for i, op in enumerate(ops) if isinstance(op, Attend)}
    assert len(free) == 6
    unit = 3 * 5 * 4  # bytes of one channel at the latent size (fp32)
    floor = 10 * unit
    modes = ("drop", "mem", "disk") if spill else ("drop", "mem")
    seen = set()
    full = 12 * 6 * 10 * 4  # one fp32 state after the upsampling conv: 48 units
    assert full == 48 * unit
    # budgets: nothing; a spilled checkpoint + in-place bands (40 units: 3 floors); one full
    # state + in-place bands (80: 48 + 3 floors, not 48 + 4 floors), not two (106); ...
    # disk: room for exactly one full-resolution state
    for items in ([4] * (n + 1), [4] * 12 + [2] * (n + 1 - 12)):
        for budget, disk in itertools.product(
            (0, 40 * unit, 80 * unit, 120 * unit, 10**9), (float("inf"), full)
        ):
            best = None
            for combo in itertools.product(modes, repeat=len(free)):
                choice = dict(zip(free, combo, strict=True)) | dict.fromkeys(forced, "mem")
                cost = _plan_cost(
                    ops, sizes, chans, tokens, items, budget, floor, optional, choice, disk, io
                )
                if cost is not None and (best is None or cost < best):
                    best = cost
            plan = planner.plan_checkpoints(
                ops, sizes, chans, items, budget, floor, optional, spill, disk
            )
            assert plan.cost == pytest.approx(best, rel=1e-12)
            choice = {s: "disk" if s in plan.spilled else "mem" for s in plan.kept}
            assert plan.spilled <= plan.kept and forced <= plan.kept
            args = (ops, sizes, chans, tokens, items, budget, floor, optional, choice, disk, io)
            own = _plan_cost(*args)
            assert own == pytest.approx(best, rel=1e-12)
            seen.add((frozenset(plan.kept), frozenset(plan.spilled)))
    assert len(seen) >= 4, "the budgets lead to different plans"
    if spill:
        assert any(spilled for _, spilled in seen), "some plans spill"
