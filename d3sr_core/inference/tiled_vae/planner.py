"""Which whole-image states to keep as checkpoints, and how much memory a tile needs."""

from __future__ import annotations

from typing import NamedTuple

from .ops import Attend, Conv, Norm, Op, Residual, UpConv, Upsample, _ids

# The smallest working set a tile is given so that a checkpoint can still be kept.
MIN_WORK_FRACTION = 0.04
MIN_WORK_BYTES = 8 * 2**20
# Measured peak / estimated working set of one tile (see _work_bytes).
WORK_SET_FACTOR = 1.6
# Relative cost (FLOP-equivalents, see _op_cost) of writing one byte of a checkpoint to its
# temporary file and of reading one byte back (:mod:`.spill`). Measured on the CI-class CPU
# against a pointwise pass (~300 FLOP-equivalents per element, i.e. 150 per bf16 byte):
# writing a 128-channel bf16 state tile by tile ~0.5-1 pass, reading tiles back ~1-2 passes
# (thread CPU - wall, page cache). A 3x3 conv costs ~1150 per output byte at 128 channels.
SPILL_WRITE_COST = 150.0
SPILL_READ_COST = 300.0


def _work_bytes(needs, chans, start, itemsize) -> int:
    """A tile's working set: the largest adjacent pair of boundaries, plus fp32 temporaries."""
    sizes = []
    for j, regions in enumerate(needs):
        cs = chans[start + j]
        sizes.append(sum(r.area * c for r, c in zip(regions, cs, strict=True) if r is not None))
    pair = max((sizes[j] + sizes[j + 1] for j in range(len(sizes) - 1)), default=sizes[0])
    # x1.6: measured on SD2.1's VAE on CPU (oneDNN keeps blocked-layout copies of a conv's
    # input and output next to the plain ones); without it tiles overshoot their share.
    return int(WORK_SET_FACTOR * (pair * itemsize + max(sizes) * 4 * 1.5))


def _op_cost(
    op: Op, size_in: tuple[int, int], size_out: tuple[int, int], c_in: int, c_out: int
) -> float:
    """Relative cost of one op on the whole image (FLOPs; memory-bound ops in FLOP-equivalents
    measured against a 3x3 conv on CPU: a pointwise pass over an element ~ 300 FLOPs)."""
    out_px = size_out[0] * size_out[1]
    if isinstance(op, Conv):
        m = op.module
        return 2.0 * m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels * out_px
    if isinstance(op, UpConv):
        m = op.module
        return (
            2.0 * 16 * m.in_channels * m.out_channels * size_in[0] * size_in[1]
            + 600.0 * c_out * out_px
        )
    if isinstance(op, Norm):
        return 300.0 * c_out * out_px
    if isinstance(op, Residual):
        conv = 0.0 if op.shortcut is None else 2.0 * op.shortcut.in_channels * c_out * out_px
        return conv + 300.0 * c_out * out_px
    if isinstance(op, Upsample):
        return 100.0 * c_out * out_px
    return 0.0


def _in_place(c: int, ids_c: list[int], s: int, ids_s: list[int], sizes, chans) -> bool:
    """Whether the state kept at ``s`` can overwrite the checkpoint at ``c`` band by band: both
    are one tensor of the same shape and the old one is not part of the new state (the input
    ``c == 0`` belongs to the caller and is never overwritten)."""
    return (
        c > 0
        and len(set(ids_c)) == 1
        and len(set(ids_s)) == 1
        and sizes[c] == sizes[s]
        and chans[c][0] == chans[s][0]
        and ids_c[0] not in ids_s
    )


class Plan(NamedTuple):
    """A checkpoint plan: the boundaries kept (in memory or on disk), the plan's relative
    cost (:func:`_op_cost` units, spill I/O included) and the kept ones stored on disk."""

    kept: set[int]
    cost: float
    spilled: set[int]


def plan_checkpoints(
    ops: list[Op],
    sizes,
    chans,
    itemsize: int | list[int],
    budget: float,
    floor: float,
    optional: frozenset[int] = frozenset(),
    spill: bool = False,
    disk: float = float("inf"),
) -> Plan:
    """Which sync points to keep as checkpoints, and where: the least total (re)computation
    and disk traffic such that every state kept in memory fits the budget next to the
    in-memory part of the checkpoint it is computed from.

    ``itemsize``: bytes per stored element (times the batch), one value or one per boundary.
    ``optional``: boundaries that are not sync points but may be kept (a pass that only
    stores them, skipped unless kept), e.g. the state before an upsampling, a quarter the
    size of the next sync point's.
    ``spill``: a state may also be kept on disk (:mod:`.spill`): its new tensors cost
    :data:`SPILL_WRITE_COST` per byte once, and every pass that starts from it reads them
    back (:data:`SPILL_READ_COST` per byte), instead of memory; at most ``disk`` bytes on
    disk at once (a checkpoint's files and the next state's, while the pass runs).

    A small dynamic programme over the sync points (each pass costs the ops from the current
    checkpoint to its sync point, plus reading the checkpoint's tensors that are on disk;
    keeping moves the checkpoint). The programme's state is the checkpoint and which of its
    tensors are in memory: a residual block's input may stay on disk while its branch is
    kept in memory. A state that can replace its in-memory checkpoint in place
    (:func:`_in_place`) needs room for two bands of tiles, not a second whole-image tensor.
    Greedy keeping is not enough: keeping a two-tensor state (a residual block's input and
    branch) can leave no room to advance past it, while skipping it lets the next one-tensor
    state be kept. Attention inputs and the output are always kept, in memory.
    """
    n = len(ops)
    syncs = sorted({i for i, op in enumerate(ops) if op.sync} | {n} | set(optional))
    # Structural ids: an element of two states is the same tensor iff its id is equal.
    counter = [0]
    ids_at = {0: [0]}
    cur = [0]
    prev = 0
    for s in syncs:
        cur = _ids(ops, prev, s, cur, counter)
        ids_at[s] = cur
        if s < n and isinstance(ops[s], Attend):
            counter[0] += 1
            cur = [*cur[:-1], counter[0]]
            ids_at[s + 1] = cur
            prev = s + 1
        else:
            prev = s

    item_at = itemsize if isinstance(itemsize, list) else [itemsize] * len(sizes)

    def id_bytes(b: int) -> dict[int, float]:
        h, w = sizes[b]
        out: dict[int, float] = {}
        for i, c in zip(ids_at[b], chans[b], strict=True):
            out.setdefault(i, c * h * w * item_at[b])
        return out

    prefix = [0.0]
    for i, op in enumerate(ops):
        prefix.append(
            prefix[-1] + _op_cost(op, sizes[i], sizes[i + 1], chans[i][-1], chans[i + 1][-1])
        )

    # (checkpoint boundary, ids held in memory) -> (cost so far, kept, spilled)
    Key = tuple[int, frozenset[int]]
    Value = tuple[float, tuple[int, ...], tuple[int, ...]]
    dp: dict[Key, Value] = {(0, frozenset([0])): (0.0, (), ())}
    for s in syncs:
        forced = s == n or isinstance(ops[s], Attend)
        nxt: dict[Key, Value] = {}

        def offer(key: Key, value: Value, nxt=nxt) -> None:
            if key not in nxt or value[0] < nxt[key][0]:
                nxt[key] = value

        at_s = id_bytes(s)
        for (c, mem), (cost, kept, spilled) in dp.items():
            at_c = id_bytes(c)
            held = sum(v for i, v in at_c.items() if i in mem)
            on_disk = sum(v for i, v in at_c.items() if i not in mem)
            total = cost + prefix[s] - prefix[c] + SPILL_READ_COST * on_disk
            new = {i: v for i, v in at_s.items() if i not in at_c}
            new_bytes = sum(new.values())
            stay = frozenset(i for i in mem if i in at_s)  # in memory and still needed
            in_mem = (s, stay | frozenset(new))
            if forced:
                if s < n:  # attention: its output replaces the top, in memory
                    after = ids_at[s + 1]
                    in_mem = (s + 1, frozenset(i for i in in_mem[1] if i in after) | {after[-1]})
                offer(in_mem, (total, (*kept, s), spilled))
                continue
            in_place = _in_place(c, ids_at[c], s, ids_at[s], sizes, chans) and ids_at[c][0] in mem
            extra = 2 * floor if in_place else new_bytes
            # keep first: on a tie the later checkpoint is never worse. A state made only of
            # its checkpoint's tensors (after a Push) costs no memory to keep.
            if held + extra + floor <= budget or not new:
                offer(in_mem, (total, (*kept, s), spilled))
            if spill and new and on_disk + new_bytes <= disk:
                offer((s, stay), (total + SPILL_WRITE_COST * new_bytes, (*kept, s), (*spilled, s)))
            if s in optional:
                offer((c, mem), (cost, kept, spilled))  # no pass at all
            else:
                offer((c, mem), (total, kept, spilled))
        dp = nxt
    cost, kept, spilled = min(dp.values())
    return Plan(set(kept), cost, set(spilled))
