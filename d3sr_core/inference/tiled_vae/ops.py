"""The VAE as a program of ops on a small stack of feature maps, and the regions they
read: each op knows its output size, the input region an output region needs
(``needed``) and how to compute one tile of its output (``run``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UnsupportedVAEError(RuntimeError):
    """The VAE's structure is not one the tiled path knows (use the untiled VAE)."""


# ---- regions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Half-open rectangle ``[y0, y1) x [x0, x1)`` at one resolution."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def area(self) -> int:
        return max(self.h, 0) * max(self.w, 0)

    def clip(self, h: int, w: int) -> Region:
        return Region(max(self.y0, 0), min(self.y1, h), max(self.x0, 0), min(self.x1, w))

    def union(self, other: Region | None) -> Region:
        if other is None:
            return self
        return Region(
            min(self.y0, other.y0),
            max(self.y1, other.y1),
            min(self.x0, other.x0),
            max(self.x1, other.x1),
        )


def _union(a: Region | None, b: Region | None) -> Region | None:
    return b if a is None else a.union(b)


def _crop(t: Tensor, have: Region, want: Region) -> Tensor:
    """``t`` covers ``have``; return the view covering ``want`` (must be inside ``have``)."""
    if want == have:
        return t
    if not (
        have.y0 <= want.y0 and want.y1 <= have.y1 and have.x0 <= want.x0 and want.x1 <= have.x1
    ):
        raise AssertionError(f"region {want} is not inside {have}")
    return t[:, :, want.y0 - have.y0 : want.y1 - have.y0, want.x0 - have.x0 : want.x1 - have.x0]


def is_channels_last(t: Tensor) -> bool:
    """True when ``t`` ``[B, C, H, W]`` (possibly a crop) stores channels innermost (NHWC)."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def dense(t: Tensor) -> Tensor:
    """``t`` itself when it is contiguous in its memory format, else a packed copy in that
    format. CPU kernels (batch_norm, group_norm, oneDNN convs) take slow strided paths or
    copy anyway on a crop of a larger tensor; one packed copy is cheaper."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    fmt = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


@dataclass
class Piece:
    """A stack element during a pass: a tensor covering ``region`` (clipped to the image)."""

    tensor: Tensor
    region: Region


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(length / max(tile, 1)))
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _interior_tile(h: int, w: int, tile: int, wide: bool = False) -> Region:
    """A ``tile`` x ``tile`` core in the middle of ``h x w`` (``wide``: ``tile`` rows of the
    full width): the one with the largest halos."""
    th, tw = min(tile, h), w if wide else min(tile, w)
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return Region(y0, y0 + th, x0, x0 + tw)


def _grid(h: int, w: int, tile: int, wide: bool = False) -> list[Region]:
    """Tiles of about ``tile`` x ``tile`` covering ``h x w`` (``wide``: bands of about
    ``tile`` rows of the full width)."""
    xs = [(0, w)] if wide else _spans(w, tile)
    return [Region(y0, y1, x0, x1) for y0, y1 in _spans(h, tile) for x0, x1 in xs]


# ---- ops -----------------------------------------------------------------------------------


class Op:
    """One step of a VAE program, acting on the top of a stack of same-size feature maps."""

    sync = False  # needs whole-image statistics of its input (GroupNorm) or is global
    # whether run() can write its top output into a given ``out`` tensor
    writes_out = False

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def out_channels(self, channels: list[int]) -> list[int]:
        return channels

    def needed(self, out_needs: list[Region | None]) -> list[Region | None]:
        """Regions of the input stack needed for ``out_needs`` of the output stack (unclipped)."""
        return out_needs

    def run(
        self,
        pieces: list[Piece | None],
        needs: list[Region | None],
        size: tuple[int, int],
        ctx,
        out: Tensor | None = None,
    ) -> list[Piece | None]:
        """Produce the output stack covering exactly ``needs`` (clipped) from ``pieces``.

        ``out``: a tensor of the top output's shape and dtype (e.g. where it is stored). An
        op with :attr:`writes_out` may compute the top output into it and return it as the top
        piece's tensor; others ignore it (the caller sees which by identity)."""
        raise NotImplementedError


class _WindowOp(Op):
    """An op on the top element whose output pixel reads a window of input pixels
    (:meth:`_in_region`), zero-padded where the window leaves the image."""

    module: nn.Conv2d

    def _in_region(self, r: Region) -> Region:
        raise NotImplementedError

    def out_channels(self, channels):
        return [*channels[:-1], self.module.out_channels]

    def needed(self, out_needs):
        top = out_needs[-1]
        return [*out_needs[:-1], None if top is None else self._in_region(top)]

    def _input(self, top: Piece, want: Region, size: tuple[int, int]):
        """The input window for output region ``want``: the part inside the image, the zero
        padding ``(left, right, top, bottom)`` that completes it, and the whole window."""
        req = self._in_region(want)
        have = req.clip(*size)
        pad = (have.x0 - req.x0, req.x1 - have.x1, have.y0 - req.y0, req.y1 - have.y1)
        return _crop(top.tensor, top.region, have), pad, req


def conv_padded(x: Tensor, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> Tensor:
    """``conv`` (its weights, stride and dilation; not its padding) on ``x`` ``[B, C, H, W]``
    zero-padded by ``pad`` = ``(left, right, top, bottom)``.

    The conv pads by itself (no copy of ``x``) when left equals right: with the larger of
    top and bottom on both sides, the surplus output rows cropped away. That is a tile at
    the top or bottom of a band of full-width tiles, and the crop of an NHWC batch of one
    is still dense. Only left != right (tiles at a side of the image) copies ``x`` into a
    padded tensor (``F.pad``)."""
    left, right, top, bottom = pad
    if left != right or (top - bottom) % conv.stride[0]:
        return F.conv2d(F.pad(x, pad), conv.weight, conv.bias, conv.stride, 0, conv.dilation)
    both = max(top, bottom)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, (both, left), conv.dilation)
    if top == bottom:
        return y
    reach = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    rows = (x.shape[2] + top + bottom - reach) // conv.stride[0] + 1
    return y.narrow(2, (both - top) // conv.stride[0], rows)


def conv_add_(skip: Tensor, x: Tensor, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> Tensor:
    """``skip += conv(x)``, ``x`` zero-padded by ``pad`` = ``(left, right, top, bottom)``: a
    residual block's last conv and its add.

    On CPU one oneDNN convolution adds ``skip`` while it writes its output into it (no separate
    pass over the sum, no fresh output to fault in); elsewhere, or where this torch lacks
    that fused op, the conv and then an in-place add."""
    left, right, top, bottom = pad
    if (
        skip.device.type == "cpu"
        and left == right
        and top == bottom
        and skip.dtype == x.dtype == conv.weight.dtype
        and skip.is_contiguous(memory_format=torch.channels_last) == is_channels_last(x)
        and (skip.is_contiguous(memory_format=torch.channels_last) or skip.is_contiguous())
        and torch.backends.mkldnn.is_available()
    ):
        try:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                skip, x, conv.weight, conv.bias, [top, left], list(conv.stride),
                list(conv.dilation), conv.groups, "add", 1.0, None, [], None,
            )  # fmt: skip
        except (AttributeError, RuntimeError):  # an older torch, or a shape oneDNN refuses
            pass
    return skip.add_(conv_padded(x, conv, pad))


@dataclass
class Conv(_WindowOp):
    """A conv on the top element. ``pad`` = (top, bottom, left, right) zero padding."""

    module: nn.Conv2d
    pad: tuple[int, int, int, int]

    def __post_init__(self):
        m = self.module
        if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros" or m.groups != 1:
            raise UnsupportedVAEError(f"unsupported conv {m}")
        self.k = (
            m.dilation[0] * (m.kernel_size[0] - 1) + 1,
            m.dilation[1] * (m.kernel_size[1] - 1) + 1,
        )
        self.s = m.stride

    def out_size(self, h, w):
        pt, pb, pl, pr = self.pad
        return (h + pt + pb - self.k[0]) // self.s[0] + 1, (w + pl + pr - self.k[1]) // self.s[
            1
        ] + 1

    def _in_region(self, r: Region) -> Region:
        pt, _, pl, _ = self.pad
        return Region(
            r.y0 * self.s[0] - pt,
            (r.y1 - 1) * self.s[0] - pt + self.k[0],
            r.x0 * self.s[1] - pl,
            (r.x1 - 1) * self.s[1] - pl + self.k[1],
        )

    def run(self, pieces, needs, size, ctx, out=None):
        top, want = pieces[-1], needs[-1]
        if want is None:
            return [*pieces[:-1], None]
        x, pad, _ = self._input(top, want, size)
        return [*pieces[:-1], Piece(conv_padded(x, self.module, pad), want)]


@dataclass
class Norm(Op):
    """GroupNorm (whole-image statistics) on the top element, optionally followed by SiLU."""

    module: nn.GroupNorm
    act: bool
    sync = True

    def __post_init__(self):
        if not isinstance(self.module, nn.GroupNorm) or not self.module.affine:
            raise UnsupportedVAEError(f"unsupported norm {self.module}")

    def run(self, pieces, needs, size, ctx, out=None):
        top = pieces[-1]
        if top is None:
            return pieces
        y = ctx.normalize(self, top.tensor)
        return [*pieces[:-1], Piece(y, top.region)]


class Push(Op):
    """Duplicate the top element (the residual branch's input)."""

    def out_channels(self, channels):
        return [*channels, channels[-1]]

    def needed(self, out_needs):
        return [*out_needs[:-2], _union(out_needs[-2], out_needs[-1])]

    def run(self, pieces, needs, size, ctx, out=None):
        top = pieces[-1]
        out = list(pieces[:-1])
        for want in needs[-2:]:
            out.append(None if want is None else Piece(_crop(top.tensor, top.region, want), want))
        return out


@dataclass
class Residual(Op):
    """``(shortcut(x) + h) / scale``: pops the branch ``h`` and its input ``x``."""

    shortcut: nn.Conv2d | None
    scale: float
    writes_out = True

    def out_channels(self, channels):
        return [*channels[:-2], channels[-1]]

    def needed(self, out_needs):
        top = out_needs[-1]
        return [*out_needs[:-1], top, top]

    def run(self, pieces, needs, size, ctx, out=None):
        x, h = pieces[-2], pieces[-1]
        if h is None:
            return [*pieces[:-2], None]
        skip = x.tensor
        if self.shortcut is not None:
            m = self.shortcut
            skip = F.conv2d(skip, m.weight, m.bias)
        y = torch.add(skip, h.tensor, out=out) if out is not None else skip + h.tensor
        if self.scale != 1.0:
            y = y.div_(self.scale) if out is not None else y / self.scale
        return [*pieces[:-2], Piece(y, h.region)]


class Upsample(Op):
    """Nearest-neighbour 2x upsampling of the top element."""

    def out_size(self, h, w):
        return 2 * h, 2 * w

    def needed(self, out_needs):
        top = out_needs[-1]
        if top is None:
            return out_needs
        return [*out_needs[:-1], Region(top.y0 // 2, -(-top.y1 // 2), top.x0 // 2, -(-top.x1 // 2))]

    def run(self, pieces, needs, size, ctx, out=None):
        top, want = pieces[-1], needs[-1]
        if want is None:
            return [*pieces[:-1], None]
        y = F.interpolate(top.tensor, scale_factor=2.0, mode="nearest")
        r = top.region
        have = Region(2 * r.y0, 2 * r.y1, 2 * r.x0, 2 * r.x1)
        return [*pieces[:-1], Piece(_crop(y, have, want), want)]


def subpixel_weights(weight: Tensor) -> Tensor:
    """Fold nearest-2x upsampling into a 3x3 kernel: ``[O, I, 3, 3] -> [4 * O, I, 2, 2]``.

    ``conv3x3(upsample2x(x))`` at output pixel ``(2i + a, 2j + b)`` reads input rows
    ``i - 1, i`` (``a = 0``) or ``i, i + 1`` (``a = 1``), with kernel rows summed where two taps
    land on one input row; likewise for columns. Four 2x2 kernels (phases ``(a, b)`` in
    row-major order) therefore give the same result with 16 instead of 36 multiply-adds per
    input pixel and output channel. Computed in fp32 and rounded once.
    """
    w = weight.float()

    def fold(t: Tensor, dim: int, phase: int) -> Tensor:
        a, b, c = (t.narrow(dim, k, 1) for k in range(3))
        return torch.cat((a, b + c) if phase == 0 else (a + b, c), dim=dim)

    phases = [fold(fold(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


def upsample_conv(
    x: Tensor,
    phase_weight: Tensor,
    bias: Tensor | None,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    window: Region | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``conv3x3(upsample2x(x))`` for ``x`` given with a one-pixel ring of context, less the
    zero rows / columns ``pad`` = ``(left, right, top, bottom)`` it lacks at the image border:
    ``[B, C, n + 2 - top - bottom, m + 2 - left - right] -> [B, O, 2n, 2m]``.

    ``window``: the part of that output to compute (default all of it), into ``out`` when
    given (``[B, O, window.h, window.w]``). The conv pads rows by itself (as
    :func:`conv_padded`); only left != right copies ``x``."""
    left, right, top, bottom = pad
    if left != right:
        x, left, right = F.pad(x, (left, right, 0, 0)), 0, 0
    b, _, hp, wp = x.shape
    n, m = hp + top + bottom - 2, wp + 2 * left - 2
    window = Region(0, 2 * n, 0, 2 * m) if window is None else window
    o = phase_weight.shape[0] // 4
    # [B, 4O, n + 1 (+ surplus rows), m + 1]; phase (a, b) at offset (a, b) from the ring's
    # first row and column. The conv adds the bias (once per phase) while it writes,
    # instead of a separate pass over the 4x larger output.
    phase_bias = None if bias is None else bias.repeat(4)
    both = max(top, bottom)
    big = F.conv2d(x, phase_weight, phase_bias, padding=(both, left))
    first = both - top
    # a crop of an NHWC checkpoint is not "contiguous" in either format but is still NHWC
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    y = out
    if y is None:
        shape = (b, o, window.h, window.w)
        y = torch.empty(shape, dtype=big.dtype, device=big.device, memory_format=fmt)
    for k, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        # output row 2i + a is phase a's row i; the window's first such row is r0
        r0, c0 = (a - window.y0) % 2, (c - window.x0) % 2
        i0, j0 = (window.y0 + r0) // 2 + first, (window.x0 + c0) // 2
        rows, cols = (window.h - r0 + 1) // 2, (window.w - c0 + 1) // 2
        y[:, :, r0::2, c0::2] = big[
            :, k * o : (k + 1) * o, i0 + a : i0 + a + rows, j0 + c : j0 + c + cols
        ]
    return y


class UpConv(_WindowOp):
    """Nearest 2x upsampling followed by a 3x3 conv (diffusers ``Upsample2D``), computed at
    the low resolution by :func:`upsample_conv` (2.25x fewer FLOPs, the same values)."""

    writes_out = True

    def __init__(self, conv: nn.Conv2d):
        if (
            not isinstance(conv, nn.Conv2d)
            or tuple(conv.kernel_size) != (3, 3)
            or tuple(conv.stride) != (1, 1)
            or tuple(conv.padding) != (1, 1)
            or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
        ):
            raise UnsupportedVAEError(f"unsupported upsampler conv {conv}")
        self.module = conv
        self._phase: tuple[int, torch.dtype, torch.device, Tensor] | None = None

    def phase_weight(self) -> Tensor:
        w = self.module.weight
        if w.is_inference():  # made under inference_mode (e.g. by a host): no version counter,
            return subpixel_weights(w.detach())  # so in-place changes are undetectable: no cache
        key = (w._version, w.dtype, w.device)
        if self._phase is None or self._phase[:3] != key:
            self._phase = (*key, subpixel_weights(w.detach()))
        return self._phase[3]

    def out_size(self, h, w):
        return 2 * h, 2 * w

    @staticmethod
    def _in_region(r: Region) -> Region:
        return Region(r.y0 // 2 - 1, (r.y1 - 1) // 2 + 2, r.x0 // 2 - 1, (r.x1 - 1) // 2 + 2)

    def run(self, pieces, needs, size, ctx, out=None):
        top, want = pieces[-1], needs[-1]
        if want is None:
            return [*pieces[:-1], None]
        x, pad, req = self._input(top, want, size)
        # the output of the input window starts at output pixel 2 * (req.y0 + 1), 2 * (...)
        y0, x0 = 2 * (req.y0 + 1), 2 * (req.x0 + 1)
        window = Region(want.y0 - y0, want.y1 - y0, want.x0 - x0, want.x1 - x0)
        y = upsample_conv(x, self.phase_weight(), self.module.bias, pad, window, out)
        return [*pieces[:-1], Piece(y, want)]


@dataclass
class Attend(Op):
    """A diffusers ``Attention`` block (GroupNorm, single-head or multi-head self-attention,
    residual): global, run by :func:`_run_attention` on a whole-image checkpoint."""

    module: nn.Module
    sync = True

    def __post_init__(self):
        a = self.module
        norm = getattr(a, "group_norm", None)
        if norm is None or getattr(a, "spatial_norm", None) is not None:
            raise UnsupportedVAEError("VAE attention without a plain GroupNorm")
        if getattr(a, "norm_q", None) is not None or getattr(a, "norm_k", None) is not None:
            raise UnsupportedVAEError("VAE attention with q/k norms")
        self.norm = Norm(norm, act=False)


def _shapes(ops: list[Op], h: int, w: int, c: int):
    """Per boundary ``i`` (before op ``i``): spatial size and per-element channels."""
    sizes, chans = [(h, w)], [[c]]
    for op in ops:
        h, w = op.out_size(h, w)
        sizes.append((h, w))
        chans.append(op.out_channels(chans[-1]))
    return sizes, chans


def _ids(ops: list[Op], start: int, stop: int, ids: list[int], counter: list[int]) -> list[int]:
    """Symbolic identity of stack elements: Push duplicates an id, other ops make new ids."""
    ids = list(ids)
    for op in ops[start:stop]:
        if isinstance(op, Push):
            ids.append(ids[-1])
        elif isinstance(op, Residual):
            ids = ids[:-2]
            counter[0] += 1
            ids.append(counter[0])
        else:
            counter[0] += 1
            ids[-1] = counter[0]
    return ids


def _backward(ops, start, stop, final_needs, sizes):
    """Needed (clipped) regions per boundary from ``start`` to ``stop``."""
    needs = [None] * (stop - start + 1)
    h, w = sizes[stop]
    needs[-1] = [None if r is None else r.clip(h, w) for r in final_needs]
    for i in range(stop - 1, start - 1, -1):
        h, w = sizes[i]
        needs[i - start] = [
            None if r is None else r.clip(h, w) for r in ops[i].needed(needs[i - start + 1])
        ]
    return needs
