"""Which whole-image states to keep as checkpoints, and how much memory a tile needs."""

from __future__ import annotations

from .ops import Attend, Conv, Norm, Op, Residual, UpConv, Upsample, _ids

# The smallest working set a tile is given so that a checkpoint can still be kept.
MIN_WORK_FRACTION = 0.04
MIN_WORK_BYTES = 8 * 2**20
# Measured peak / estimated working set of one tile (see _work_bytes).
WORK_SET_FACTOR = 1.6


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


def plan_checkpoints(
    ops: list[Op],
    sizes,
    chans,
    itemsize: int | list[int],
    budget: float,
    floor: float,
    optional: frozenset[int] = frozenset(),
) -> tuple[set[int], float]:
    """Which sync points to keep as checkpoints: the least total (re)computation such that
    every kept state fits the budget next to the checkpoint it is computed from.

    ``itemsize``: bytes per stored element (times the batch), one value or one per boundary.
    ``optional``: boundaries that are not sync points but may be kept (a pass that only
    stores them, skipped unless kept), e.g. the state before an upsampling, a quarter the
    size of the next sync point's.
    Returns the kept boundaries and the plan's relative cost (:func:`_op_cost` units).

    A small dynamic programme over the sync points (each pass costs the ops from the current
    checkpoint to its sync point; keeping moves the checkpoint). A state that can replace its
    checkpoint in place (:func:`_in_place`) needs room for two bands of tiles, not a second
    whole-image tensor. Greedy keeping is not enough:
    keeping a two-tensor state (a residual block's input and branch) can leave no room to
    advance past it, while skipping it lets the next one-tensor state be kept. Attention
    inputs and the output are always kept.
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

    def state_bytes(b: int, only_new_vs: int | None = None) -> float:
        h, w = sizes[b]
        seen, total = set(), 0.0
        old = set(ids_at[only_new_vs]) if only_new_vs is not None else set()
        for i, c in zip(ids_at[b], chans[b], strict=True):
            if i in seen or i in old:
                continue
            seen.add(i)
            total += c * h * w * item_at[b]
        return total

    prefix = [0.0]
    for i, op in enumerate(ops):
        prefix.append(
            prefix[-1] + _op_cost(op, sizes[i], sizes[i + 1], chans[i][-1], chans[i + 1][-1])
        )

    # dp: checkpoint boundary -> (cost so far, kept syncs)
    dp: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for s in syncs:
        forced = s == n or isinstance(ops[s], Attend)
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}

        def offer(c: int, cost: float, kept: tuple[int, ...], nxt=nxt) -> None:
            if c not in nxt or cost < nxt[c][0]:
                nxt[c] = (cost, kept)

        for c, (cost, kept) in dp.items():
            total = cost + prefix[s] - prefix[c]
            if s in optional:
                if state_bytes(c) + state_bytes(s, c) + floor <= budget:
                    offer(s, total, (*kept, s))
                offer(c, cost, kept)  # no pass at all
                continue
            if forced:
                offer(s + 1 if s < n else s, total, (*kept, s))
                continue
            # keep first: on a tie the later checkpoint is never worse
            in_place = _in_place(c, ids_at[c], s, ids_at[s], sizes, chans)
            extra = 2 * floor if in_place else state_bytes(s, c)
            if state_bytes(c) + extra + floor <= budget:
                offer(s, total, (*kept, s))
            offer(c, total, kept)
        dp = nxt
    cost, kept = min(dp.values())
    return set(kept), cost
