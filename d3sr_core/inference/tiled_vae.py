"""Tiled VAE encode/decode whose GroupNorm statistics are those of the whole image.

Why
---
An SD VAE run on independent tiles normalises every tile with its own GroupNorm statistics:
tiles then differ in brightness and colour and leave seams. The "Tiled VAE" of
multidiffusion-upscaler (reference/peers.md 1.7) fixes this by running all tiles in lock-step
and combining the per-tile GroupNorm statistics; it parks every tile's activations between
GroupNorms, i.e. it holds the whole image's activations of every layer (tens of GB at 16 MP).

How
---
The VAE is flattened into a short program of ops on a small stack of feature maps (a residual
block pushes its input, runs its branch, then adds the two). All ops are local (convolutions,
nearest upsampling, pointwise maps) except at two kinds of *sync points*:

* a GroupNorm needs the mean/variance of its input over the whole image;
* the mid-block self-attention attends over every position of the image.

The program runs in *passes*, one per sync point. A pass computes the stack just before its
sync point tile by tile, starting from the latest *checkpoint* (a whole-image state kept in
memory; initially the input), and accumulates per-group counts, means and squared deviations
over each tile's core, which are merged (Chan's parallel formula, float64) into exact
whole-image statistics. Every tile is computed *region-exactly*: it is cropped from the
checkpoint with exactly the halo the convolutions between checkpoint and sync point need,
convolutions run unpadded, and zeros are padded only where a region touches the image border.
Each tile's values are therefore those of the untiled network (up to float summation order),
so tiled output matches untiled output and carries no seam.

A pass may also keep its result as the next checkpoint. That costs one whole-image tensor at
that resolution; not keeping it means the next pass recomputes from the older checkpoint.
:func:`plan_checkpoints` chooses which to keep (a small dynamic programme: the least
recomputation such that every kept state fits the budget next to the checkpoint it is
computed from and a minimal tile working set; tiles then get what is left): low-resolution
states are small and kept, and with a tight budget full-resolution ones are recomputed, so
peak memory is bounded by the tile and the budget, not by the image. With a generous budget
nothing is recomputed and the cost equals the untiled network's plus thin halos. For an fp32
VAE, the resolutions whose states do not fit are stored in bfloat16 when that saves
recomputation (``compact_checkpoints``; ~70 dB from the exact output).

Attention runs on a whole-image checkpoint (it has latent resolution): keys and values are
computed for the whole image in chunks, queries in blocks, through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
CUDA and CPU; blocks bound the math kernel's score matrix on MPS). It is global, exactly as
in diffusers, for latents up to ``attention_window`` positions per side; beyond, each query
block attends to the window around it (:func:`attention_spans`), which keeps the cost linear
in pixels (global attention over a 256x256 latent alone takes ~45 s on 2 CPU cores).

The same program also runs untiled (:func:`run_whole`, used when the image fits the
budget): GroupNorm+SiLU in place, no division by a residual scale of 1, and nearest
upsampling folded into the following 3x3 conv (:func:`upsample_conv`: four 2x2 kernels at
the low resolution, 2.25x fewer FLOPs for the decoder's most expensive convs, same values).

Only long-stable diffusers attributes are used (``Encoder``/``Decoder``: ``conv_in``,
``down_blocks``/``up_blocks``, ``mid_block``, ``conv_norm_out``, ``conv_out``; blocks:
``resnets``, ``attentions``, ``downsamplers``/``upsamplers``; ``ResnetBlock2D``: ``norm1``,
``conv1``, ``norm2``, ``conv2``, ``conv_shortcut``, ``output_scale_factor``; ``Attention``:
``group_norm``, ``to_q/k/v``, ``to_out``, ``heads``, ``scale``, ``residual_connection``,
``rescale_output_factor``), identical from diffusers 0.31 to 0.42. A VAE with another
structure raises :class:`UnsupportedVAEError` (callers fall back to the untiled VAE).

Everything runs under ``torch.inference_mode`` semantics (no autograd graph); it is an
inference path, not for training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import release_host_memory

Tick = Callable[[float], None]

# The smallest working set a tile is given so that a checkpoint can still be kept.
MIN_WORK_FRACTION = 0.04
MIN_WORK_BYTES = 8 * 2**20
# Measured peak / estimated working set of one tile (see _work_bytes).
WORK_SET_FACTOR = 1.6
# How often (seconds) a CPU run hands freed heap memory back to the OS between tiles.
TRIM_INTERVAL_S = 0.1
# VAE self-attention is global up to this many latent positions per side (1024 output pixels);
# larger images attend within windows of this side (see attention_spans).
ATTENTION_WINDOW = 128
# Query blocks are window / 4 per side: every query sees at least 3/8 of a window each way.
ATTENTION_BLOCK_DIVISOR = 4


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

    def grow(self, n: int) -> Region:
        return Region(self.y0 - n, self.y1 + n, self.x0 - n, self.x1 + n)


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


@dataclass
class Piece:
    """A stack element during a pass: a tensor covering ``region`` (clipped to the image)."""

    tensor: Tensor
    region: Region


# ---- ops -----------------------------------------------------------------------------------


class Op:
    """One step of a VAE program, acting on the top of a stack of same-size feature maps."""

    sync = False  # needs whole-image statistics of its input (GroupNorm) or is global

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def depth_change(self) -> int:
        return 0

    def out_channels(self, channels: list[int]) -> list[int]:
        return channels

    def needed(self, out_needs: list[Region | None]) -> list[Region | None]:
        """Regions of the input stack needed for ``out_needs`` of the output stack (unclipped)."""
        return out_needs

    def run(
        self, pieces: list[Piece | None], needs: list[Region | None], size: tuple[int, int], ctx
    ) -> list[Piece | None]:
        """Produce the output stack covering exactly ``needs`` (clipped) from ``pieces``."""
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

    def run(self, pieces, needs, size, ctx):
        top, want = pieces[-1], needs[-1]
        if want is None:
            return [*pieces[:-1], None]
        x, pad, _ = self._input(top, want, size)
        left, right, top_, bottom = pad
        m = self.module
        if top_ == bottom and left == right:
            # Symmetric (whole-axis or interior) padding: let the conv pad, no copy.
            y = F.conv2d(x, m.weight, m.bias, m.stride, (top_, left), m.dilation, 1)
        else:
            x = F.pad(x, pad)
            y = F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, 1)
        return [*pieces[:-1], Piece(y, want)]


@dataclass
class Norm(Op):
    """GroupNorm (whole-image statistics) on the top element, optionally followed by SiLU."""

    module: nn.GroupNorm
    act: bool
    sync = True

    def __post_init__(self):
        if not isinstance(self.module, nn.GroupNorm) or not self.module.affine:
            raise UnsupportedVAEError(f"unsupported norm {self.module}")

    def run(self, pieces, needs, size, ctx):
        top = pieces[-1]
        if top is None:
            return pieces
        y = ctx.normalize(self, top.tensor)
        return [*pieces[:-1], Piece(y, top.region)]


class Push(Op):
    """Duplicate the top element (the residual branch's input)."""

    def depth_change(self):
        return 1

    def out_channels(self, channels):
        return [*channels, channels[-1]]

    def needed(self, out_needs):
        return [*out_needs[:-2], _union(out_needs[-2], out_needs[-1])]

    def run(self, pieces, needs, size, ctx):
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

    def depth_change(self):
        return -1

    def out_channels(self, channels):
        return [*channels[:-2], channels[-1]]

    def needed(self, out_needs):
        top = out_needs[-1]
        return [*out_needs[:-1], top, top]

    def run(self, pieces, needs, size, ctx):
        x, h = pieces[-2], pieces[-1]
        if h is None:
            return [*pieces[:-2], None]
        skip = x.tensor
        if self.shortcut is not None:
            m = self.shortcut
            skip = F.conv2d(skip, m.weight, m.bias)
        y = skip + h.tensor
        if self.scale != 1.0:
            y = y / self.scale
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

    def run(self, pieces, needs, size, ctx):
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


def upsample_conv(xp: Tensor, phase_weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(upsample2x(x))`` for ``x`` given with a one-pixel ring of context ``xp``
    (zeros at the image border): ``[B, C, n + 2, m + 2] -> [B, O, 2n, 2m]``."""
    b, _, hp, wp = xp.shape
    n, m = hp - 2, wp - 2
    o = phase_weight.shape[0] // 4
    big = F.conv2d(xp, phase_weight)  # [B, 4O, n + 1, m + 1]; phase (a, b) at offset (a, b)
    channels_last = xp.is_contiguous(memory_format=torch.channels_last) and not xp.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty(b, o, 2 * n, 2 * m, dtype=big.dtype, device=big.device, memory_format=fmt)
    for k, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        y[:, :, a::2, c::2] = big[:, k * o : (k + 1) * o, a : a + n, c : c + m]
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


class UpConv(_WindowOp):
    """Nearest 2x upsampling followed by a 3x3 conv (diffusers ``Upsample2D``), computed at
    the low resolution by :func:`upsample_conv` (2.25x fewer FLOPs, the same values)."""

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

    def run(self, pieces, needs, size, ctx):
        top, want = pieces[-1], needs[-1]
        if want is None:
            return [*pieces[:-1], None]
        x, pad, req = self._input(top, want, size)
        if any(pad):
            x = F.pad(x, pad)
        y = upsample_conv(x, self.phase_weight(), self.module.bias)
        got = Region(2 * (req.y0 + 1), 2 * (req.y1 - 1), 2 * (req.x0 + 1), 2 * (req.x1 - 1))
        return [*pieces[:-1], Piece(_crop(y, got, want), want)]


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


# ---- building programs from a diffusers AutoencoderKL -----------------------------------------


def _conv(m: nn.Module, pad: tuple[int, int, int, int] | None = None) -> Conv:
    if not isinstance(m, nn.Conv2d):
        raise UnsupportedVAEError(f"expected a Conv2d, got {type(m).__name__}")
    if pad is None:
        p = m.padding
        if isinstance(p, str):
            raise UnsupportedVAEError(f"string padding {p!r}")
        pad = (p[0], p[0], p[1], p[1])
    return Conv(m, pad)


def _is_silu(m: nn.Module | None) -> bool:
    return isinstance(m, nn.SiLU)


def _resnet(block: nn.Module) -> list[Op]:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        if not hasattr(block, name):
            raise UnsupportedVAEError(f"{type(block).__name__} is not a ResnetBlock2D")
    if (
        getattr(block, "upsample", None) is not None
        or getattr(block, "downsample", None) is not None
    ):
        raise UnsupportedVAEError("resnet with built-in up/downsampling")
    if getattr(block, "time_emb_proj", None) is not None:
        raise UnsupportedVAEError("resnet with a time embedding")
    if not _is_silu(getattr(block, "nonlinearity", None)):
        raise UnsupportedVAEError("resnet nonlinearity is not SiLU")
    return [
        Push(),
        Norm(block.norm1, act=True),
        _conv(block.conv1),
        Norm(block.norm2, act=True),
        _conv(block.conv2),
        Residual(
            getattr(block, "conv_shortcut", None), float(getattr(block, "output_scale_factor", 1.0))
        ),
    ]


def _mid_block(mid: nn.Module) -> list[Op]:
    ops = _resnet(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            ops.append(Attend(attn))
        ops += _resnet(resnet)
    return ops


def _downsampler(d: nn.Module) -> list[Op]:
    if getattr(d, "norm", None) is not None or not getattr(d, "use_conv", False):
        raise UnsupportedVAEError("downsampler without a plain conv")
    conv = d.conv
    if getattr(d, "padding", 1) == 0:  # diffusers pads (0, 1, 0, 1) itself before a padding-0 conv
        return [_conv(conv, (0, 1, 0, 1))]
    return [_conv(conv)]


def _upsampler(u: nn.Module) -> list[Op]:
    if getattr(u, "norm", None) is not None or getattr(u, "use_conv_transpose", False):
        raise UnsupportedVAEError("upsampler with a norm or transposed conv")
    if not getattr(u, "interpolate", True):
        raise UnsupportedVAEError("upsampler without interpolation")
    if not getattr(u, "use_conv", False):
        return [Upsample()]
    conv = u.conv if getattr(u, "name", "conv") == "conv" else u.Conv2d_0
    try:
        return [UpConv(conv)]
    except UnsupportedVAEError:
        return [Upsample(), _conv(conv)]


def _head(encoder_or_decoder: nn.Module) -> list[Op]:
    if not _is_silu(getattr(encoder_or_decoder, "conv_act", None)):
        raise UnsupportedVAEError("conv_act is not SiLU")
    return [Norm(encoder_or_decoder.conv_norm_out, act=True), _conv(encoder_or_decoder.conv_out)]


def encoder_program(vae: nn.Module) -> list[Op]:
    """Ops of ``vae.encoder`` followed by ``vae.quant_conv`` (image -> moments)."""
    enc = vae.encoder
    ops: list[Op] = [_conv(enc.conv_in)]
    for block in enc.down_blocks:
        for resnet in block.resnets:
            ops += _resnet(resnet)
        for d in getattr(block, "downsamplers", None) or []:
            ops += _downsampler(d)
    ops += _mid_block(enc.mid_block)
    ops += _head(enc)
    if getattr(vae, "quant_conv", None) is not None:
        ops.append(_conv(vae.quant_conv))
    return ops


def decoder_program(vae: nn.Module) -> list[Op]:
    """Ops of ``vae.post_quant_conv`` followed by ``vae.decoder`` (latent -> image)."""
    dec = vae.decoder
    ops: list[Op] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        ops.append(_conv(vae.post_quant_conv))
    ops.append(_conv(dec.conv_in))
    ops += _mid_block(dec.mid_block)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            ops += _resnet(resnet)
        for u in getattr(block, "upsamplers", None) or []:
            ops += _upsampler(u)
    ops += _head(dec)
    return ops


# ---- statistics ------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """Running per-(sample, group) count, mean and sum of squared deviations (float64, CPU)."""

    groups: int
    n: Tensor | None = None
    mean: Tensor | None = None
    m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Accumulate a tile ``[B, C, h, w]`` (its core region only)."""
        mean_g, var_g = group_moments(x, self.groups)
        n_g = torch.full_like(mean_g, x[0, : x.shape[1] // self.groups].numel())
        m2_g = var_g * n_g
        if self.n is None:
            self.n, self.mean, self.m2 = n_g, mean_g, m2_g
            return
        # Chan et al.'s pairwise update: exact merging of (count, mean, M2) without the
        # cancellation of raw sums of squares.
        n = self.n + n_g
        delta = mean_g - self.mean
        self.mean = self.mean + delta * n_g / n
        self.m2 = self.m2 + m2_g + delta**2 * self.n * n_g / n
        self.n = n

    @property
    def var(self) -> Tensor:
        """Biased variance, as ``nn.GroupNorm`` uses."""
        return self.m2 / self.n


def group_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and biased variance of ``x`` ``[B, C, h, w]`` (float64, CPU).

    Uses the GroupNorm kernel itself (one fused Welford reduction that also handles
    channels_last) on an fp32 view, so the statistics are as accurate as ``nn.GroupNorm``'s.
    """
    b, c = x.shape[:2]
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if not (xf.is_contiguous() or xf.is_contiguous(memory_format=torch.channels_last)):
        xf = xf.contiguous()  # a crop of a checkpoint
    eps = 1e-12
    _, mean, rstd = torch.native_group_norm(
        xf, None, None, b, c, x.shape[2] * x.shape[3], groups, eps
    )
    mean = mean.double().cpu().view(b, groups)
    var = (1.0 / rstd.double().cpu().view(b, groups) ** 2 - eps).clamp_min(0.0)
    return mean, var


# ---- the engine ------------------------------------------------------------------------------


@dataclass
class TiledVAEConfig:
    """How a tiled VAE run may use memory.

    Attributes:
        budget: activation bytes the run may use (checkpoints + one tile's working set).
        tile: tile side in image pixels (``None`` = derived from the budget).
        work_fraction: share of the budget reserved for one tile's working set when ``tile``
            is None; the rest may hold checkpoints.
        attention_window: latent positions per side beyond which self-attention is windowed
            (:func:`attention_spans`); None = always global.
        compact_checkpoints: for an fp32 VAE, store the checkpoints of the resolutions whose
            fp32 states do not fit the budget in bfloat16 (half the bytes) when that saves
            recomputation. Rounds those states (relative error <= 2**-9), so the output is no
            longer bit-for-bit the untiled one; False keeps exact fp32 checkpoints.
    """

    budget: int
    tile: int | None = None
    work_fraction: float = 0.3
    attention_window: int | None = ATTENTION_WINDOW
    compact_checkpoints: bool = True


@dataclass
class RunReport:
    """What a run did (for logs, tests and benchmarks)."""

    passes: int = 0
    tiles: int = 0
    kept: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    tile_sizes: list[int] = field(default_factory=list)
    # Kept states written over the previous checkpoint, band by band.
    in_place: list[int] = field(default_factory=list)
    # Resolutions (h, w) whose checkpoints were stored in bfloat16 (compact_checkpoints).
    compact: list[tuple[int, int]] = field(default_factory=list)
    # Largest checkpoint bytes held by choice (the forced ones - the attention input at latent
    # resolution and the output - are not counted; they are O(latent) and O(output)).
    peak_estimate: int = 0


class _Context:
    def __init__(self, stats: dict[int, GroupStats], ops: list[Op]):
        self.stats = stats
        self.index = {id(op): i for i, op in enumerate(ops)}

    def normalize(self, op: Norm, x: Tensor) -> Tensor:
        st = self.stats[self.index[id(op)]]
        return _apply_norm(op, st, x)


def _apply_norm(op: Norm, st: GroupStats, x: Tensor) -> Tensor:
    m = op.module
    b, c = x.shape[:2]
    rep = c // m.num_groups
    mean = st.mean.repeat_interleave(rep, dim=1).to(device=x.device, dtype=torch.float32)
    var = st.var.repeat_interleave(rep, dim=1).to(device=x.device, dtype=torch.float32)
    weight = m.weight.float()
    bias = m.bias.float()
    outs = []
    for i in range(b):
        xi = x[i : i + 1]
        try:
            # Eval-mode batch_norm = (x - mean) / sqrt(var + eps) * w + b per channel: one
            # fused kernel that computes in fp32 for half inputs and keeps channels_last.
            y = F.batch_norm(xi, mean[i], var[i], weight, bias, False, 0.0, m.eps)
        except RuntimeError:  # a backend without mixed-precision batch_norm
            scale = (var[i] + m.eps).rsqrt() * weight
            shift = bias - mean[i] * scale
            y = (xi.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
        outs.append(y)
    y = outs[0] if b == 1 else torch.cat(outs)
    return F.silu(y, inplace=True) if op.act else y


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


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(length / max(tile, 1)))
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _write_band(target: Tensor, band: list[tuple[Region, Tensor]]) -> None:
    for core, tensor in band:
        target[:, :, core.y0 : core.y1, core.x0 : core.x1] = tensor


def _interior_tile(h: int, w: int, tile: int) -> Region:
    """A ``tile`` x ``tile`` core in the middle of ``h x w``: the one with the largest halos."""
    th, tw = min(tile, h), min(tile, w)
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return Region(y0, y0 + th, x0, x0 + tw)


def _grid(h: int, w: int, tile: int) -> list[Region]:
    return [Region(y0, y1, x0, x1) for y0, y1 in _spans(h, tile) for x0, x1 in _spans(w, tile)]


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

    def _tile_for(self, start, stop, sizes, chans, keep, itemsize, limit) -> int:
        """The largest tile side (at boundary ``stop``'s resolution) whose working set fits."""
        h, w = sizes[stop]
        lo, hi = 8, max(h, w)
        if self._probe(start, stop, sizes, chans, keep, itemsize, hi) <= limit:
            return hi
        while hi - lo > 2:
            mid = (lo + hi) // 2
            if self._probe(start, stop, sizes, chans, keep, itemsize, mid) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def _work_limit(self, sizes, chans, syncs, itemsize) -> float:
        """Bytes one tile may use: from the budget ("auto"), or what a ``tile`` x ``tile``
        tile of the full-resolution stage needs (so lower resolutions get larger tiles)."""
        if self.config.tile is None:
            return self.config.budget * self.config.work_fraction
        full = max(sizes, key=lambda hw: hw[0] * hw[1])
        limit, prev = 0, 0
        for s in syncs:
            if sizes[s] == full:
                limit = max(
                    limit, self._probe(prev, s, sizes, chans, True, itemsize, self.config.tile)
                )
            prev = s
        return limit

    def _probe(self, start, stop, sizes, chans, keep_all, itemsize, tile) -> int:
        core = _interior_tile(*sizes[stop], tile)
        depth = len(chans[stop])
        final = [core] * depth if keep_all else [None] * (depth - 1) + [core]
        needs = _backward(self.ops, start, stop, final, sizes)
        return _work_bytes(needs, chans, start, itemsize)

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
        stats: dict[int, GroupStats] = {}
        ctx = _Context(stats, ops)
        counter = [0]
        fmt = self._memory_format()
        # The checkpoint: boundary index, element ids and id -> whole-image tensor.
        ck_index, ck_ids, ck_store = 0, [0], {0: x}
        last_trim = time.monotonic()
        budget = self.config.budget
        floor = max(budget * MIN_WORK_FRACTION, MIN_WORK_BYTES)
        # Keeping a checkpoint saves recomputing everything since the last one in every
        # later pass, which costs far more than smaller tiles: keep what the planner chose
        # (with the smallest useful working set) and give the tiles what is left.
        planned, store_dtype = self._plan(
            sizes, chans, syncs, optional, dtype, batch, budget, floor
        )
        points = sorted({*syncs, *(planned & optional)})
        for p, s in enumerate(points):
            op = ops[s] if s < len(ops) else None
            ids = _ids(ops, ck_index, s, ck_ids, counter)
            h, w = sizes[s]
            new_ids = list(dict.fromkeys(i for i in ids if i not in ck_store))
            new_chans = {i: chans[s][ids.index(i)] for i in new_ids}
            store_item = torch.empty((), dtype=store_dtype[s]).element_size()
            new_bytes = sum(c * h * w * store_item * batch for c in new_chans.values())
            ck_bytes = sum(t.numel() * t.element_size() for t in ck_store.values())
            must_keep = op is None or isinstance(op, Attend)
            keep = must_keep or s in planned
            in_place = (
                keep
                and _in_place(ck_index, ck_ids, s, ids, sizes, chans)
                and ck_store[ck_ids[0]].dtype == store_dtype[s]
            )
            held = ck_bytes + (new_bytes if keep and not in_place else 0)
            work = min(limit, max(budget - held, floor))
            if in_place:
                work /= 2  # the other half holds two bands of finished tiles
            tile = self._tile_for(ck_index, s, sizes, chans, keep, itemsize * batch, work)
            if in_place:
                row_bytes = w * new_bytes / max(h * w, 1)
                tile = max(8, min(tile, int(work / (2 * max(row_bytes, 1)))))
                in_place = self._halo(ck_index, s, sizes, chans, tile) <= min(
                    b - a for a, b in _spans(h, tile)
                )
            grid = _grid(h, w, tile)
            norm = op.norm if isinstance(op, Attend) else op if isinstance(op, Norm) else None
            acc = GroupStats(norm.module.num_groups) if norm is not None else None
            store = {}
            bands: list[list[tuple[Region, Tensor]]] = []  # finished tiles not yet written
            if in_place:
                (new_id,) = new_chans
                store[new_id] = ck_store[ck_ids[0]]
            elif keep:
                for i, c in new_chans.items():
                    store[i] = torch.empty(
                        batch, c, h, w, dtype=store_dtype[s], device=x.device, memory_format=fmt
                    )
            full = Region(0, sizes[ck_index][0], 0, sizes[ck_index][1])
            for t, core in enumerate(grid):
                # Ask for each element to be stored once (Push duplicates ids) and for the
                # top whenever its statistics are needed.
                final: list[Region | None] = []
                asked = set()
                for i in ids:
                    final.append(core if i in store and i not in asked else None)
                    asked.add(i)
                if acc is not None and final[-1] is None:
                    final[-1] = core
                needs = _backward(ops, ck_index, s, final, sizes)
                pieces = [
                    None if r is None else Piece(_crop(ck_store[i], full, r).to(dtype), r)
                    for i, r in zip(ck_ids, needs[0], strict=True)
                ]
                for j in range(ck_index, s):
                    pieces = ops[j].run(pieces, needs[j - ck_index + 1], sizes[j], ctx)
                if acc is not None:
                    acc.add(pieces[-1].tensor)
                for i, r, piece in zip(ids, final, pieces, strict=True):
                    if r is None or i not in store:
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
                self.report.tiles += 1
                now = time.monotonic()
                if now - last_trim > TRIM_INTERVAL_S:
                    release_host_memory(x.device)
                    last_trim = now
                if self.tick is not None:
                    self.tick((p + (t + 1) / len(grid)) / len(points))
            if in_place:
                for done in bands:
                    _write_band(store[new_id], done)
            del bands
            self.report.passes += 1
            self.report.tile_sizes.append(tile)
            if in_place:
                self.report.in_place.append(s)
            if acc is not None:
                stats[s] = acc
                self.group_stats[norm.module] = acc
            if keep:
                self.report.kept.append(s)
                if not must_keep:
                    peak = ck_bytes + (0 if in_place else new_bytes)
                    self.report.peak_estimate = max(self.report.peak_estimate, peak)
                ck_store = {i: store[i] if i in store else ck_store[i] for i in ids}
                ck_index, ck_ids = s, ids
            else:
                self.report.recomputed.append(s)
            if isinstance(op, Attend):
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
        With ``compact_checkpoints``, the resolutions where fp32 states had to be dropped
        are stored in bfloat16 when that makes the plan cheaper; the output and the
        attention input stay in the compute dtype.
        """
        ops = self.ops
        itemsize = torch.empty((), dtype=dtype).element_size()
        exact = [dtype] * len(sizes)
        kept, cost = plan_checkpoints(ops, sizes, chans, itemsize * batch, budget, floor, optional)
        dropped = {sizes[s] for s in syncs if s not in kept}
        if not (self.config.compact_checkpoints and dtype == torch.float32 and dropped):
            return kept, exact
        compact = [
            torch.bfloat16
            if sizes[i] in dropped and i < len(ops) and not isinstance(ops[i], Attend)
            else dtype
            for i in range(len(sizes))
        ]
        items = [torch.empty((), dtype=d).element_size() * batch for d in compact]
        kept_c, cost_c = plan_checkpoints(ops, sizes, chans, items, budget, floor, optional)
        if cost_c >= cost:
            return kept, exact
        self.report.compact = sorted(dropped)
        return kept_c, compact

    def _memory_format(self) -> torch.memory_format:
        for op in self.ops:
            if isinstance(op, Conv) and op.module.weight.shape[1] > 1:
                wgt = op.module.weight
                if wgt.is_contiguous(memory_format=torch.channels_last) and not wgt.is_contiguous():
                    return torch.channels_last
                return torch.contiguous_format
        return torch.contiguous_format


def attention_spans(length: int, window: int | None) -> list[tuple[int, int, int, int]]:
    """Query spans and the key span each attends to along one axis: ``(q0, q1, k0, k1)``.

    ``window`` None or >= ``length``: one span, global attention. Otherwise queries come in
    blocks of about ``window // 4`` and each block's keys are the ``window`` positions
    centred on it, shifted inwards at the borders so every query sees a full window.
    """
    if window is None or length <= window:
        return [(0, length, 0, length)]
    out = []
    for q0, q1 in _spans(length, max(1, window // ATTENTION_BLOCK_DIVISOR)):
        k0 = min(max((q0 + q1 - window) // 2, 0), length - window)
        out.append((q0, q1, k0, k0 + window))
    return out


def _run_attention(
    op: Attend, stats: GroupStats, x: Tensor, budget: int, window: int | None = None
) -> Tensor:
    """The self-attention of a diffusers ``Attention`` block on a whole-image checkpoint.

    Global (exact) when the image is at most ``window`` positions along both axes (or
    ``window`` is None); beyond that, each block of queries attends to the ``window`` x
    ``window`` keys around it (:func:`attention_spans`), so the cost grows linearly with the
    image instead of quadratically.

    Args:
        x: ``[B, C, H, W]`` the block's whole input (a latent-resolution checkpoint).
        budget: bytes; bounds the row chunks of the projections (and of the global scores).

    Returns:
        ``[B, C, H, W]``: ``(to_out(SDPA(q, K, V)) + x) / rescale_output_factor``.
    """
    a = op.module
    b, c, h, w = x.shape
    heads = int(a.heads)
    d = c // heads
    itemsize = x.element_size()
    scale = float(getattr(a, "scale", d**-0.5))
    residual = getattr(a, "residual_connection", True)
    rescale = float(getattr(a, "rescale_output_factor", 1.0))
    ys, xs = attention_spans(h, window), attention_spans(w, window)
    window_keys = (ys[0][3] - ys[0][2]) * (xs[0][3] - xs[0][2])
    # Rows per chunk: bound a chunk's projections and (for math SDPA backends) its scores.
    row_bytes = w * (c * itemsize * 6 + window_keys * heads * 4)
    rows = int(max(1, min(h, (budget * 0.3) // max(row_bytes, 1))))

    def projected(layer: nn.Module, r0: int, r1: int) -> Tensor:
        t = _apply_norm(op.norm, stats, x[:, :, r0:r1]).flatten(2).transpose(1, 2)  # [B, L, C]
        return layer(t).view(b, r1 - r0, w, heads, d).permute(0, 3, 1, 2, 4)  # [B, h, r, W, d]

    keys = torch.empty(b, heads, h, w, d, dtype=x.dtype, device=x.device)
    values = torch.empty_like(keys)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        keys[:, :, r0:r1] = projected(a.to_k, r0, r1)
        values[:, :, r0:r1] = projected(a.to_v, r0, r1)
    out = torch.empty_like(x)

    def attend(q: Tensor, k: Tensor, v: Tensor, y0: int, y1: int, x0: int, x1: int) -> None:
        """Queries ``[B, heads, y1-y0, x1-x0, d]`` -> ``out[..., y0:y1, x0:x1]``."""
        flat = [t.reshape(b, heads, -1, d) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*flat, scale=scale)
        o = a.to_out[0](o.transpose(1, 2).reshape(b, -1, c))
        o = o.transpose(1, 2).reshape(b, c, y1 - y0, x1 - x0)
        if residual:
            o = o + x[:, :, y0:y1, x0:x1]
        out[:, :, y0:y1, x0:x1] = o / rescale

    if len(ys) == 1 and len(xs) == 1:
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            attend(projected(a.to_q, r0, r1), keys, values, r0, r1, 0, w)
        return out
    for qy0, qy1, ky0, ky1 in ys:
        q_rows = projected(a.to_q, qy0, qy1)
        for qx0, qx1, kx0, kx1 in xs:
            attend(
                q_rows[:, :, :, qx0:qx1],
                keys[:, :, ky0:ky1, kx0:kx1],
                values[:, :, ky0:ky1, kx0:kx1],
                qy0,
                qy1,
                qx0,
                qx1,
            )
    return out


# ---- whole-image execution ------------------------------------------------------------------


def run_whole(ops: list[Op], x: Tensor, attention_window: int | None = ATTENTION_WINDOW) -> Tensor:
    """Run a program on the whole tensor at once (the untiled path).

    The same computation as the diffusers modules, with fewer memory passes: GroupNorm and
    SiLU fused in place, residual adds in place without diffusers' division by an
    ``output_scale_factor`` of 1, and upsampling folded into the next conv
    (:func:`upsample_conv`). Self-attention is windowed as in the tiled path
    (``attention_window``), so both paths compute the same function.
    """
    dtype = next((op.module.weight.dtype for op in ops if isinstance(op, Conv)), x.dtype)
    stack = [x.to(dtype)]
    for op in ops:
        t = stack[-1]
        if isinstance(op, Conv):
            m = op.module
            pt, pb, pl, pr = op.pad
            if pt == pb and pl == pr:
                stack[-1] = F.conv2d(t, m.weight, m.bias, m.stride, (pt, pl), m.dilation)
            else:
                stack[-1] = F.conv2d(
                    F.pad(t, (pl, pr, pt, pb)), m.weight, m.bias, m.stride, 0, m.dilation
                )
        elif isinstance(op, UpConv):
            stack[-1] = upsample_conv(F.pad(t, (1, 1, 1, 1)), op.phase_weight(), op.module.bias)
        elif isinstance(op, Norm):
            m = op.module
            y = F.group_norm(t, m.num_groups, m.weight, m.bias, m.eps)
            stack[-1] = F.silu(y, inplace=True) if op.act else y
        elif isinstance(op, Push):
            stack.append(t)
        elif isinstance(op, Residual):
            h, skip = stack.pop(), stack.pop()
            if op.shortcut is not None:
                skip = F.conv2d(skip, op.shortcut.weight, op.shortcut.bias)
            # h is a fresh conv output nobody else holds: add in place
            y = h.add_(skip)
            stack.append(y.div_(op.scale) if op.scale != 1.0 else y)
        elif isinstance(op, Upsample):
            stack[-1] = F.interpolate(t, scale_factor=2.0, mode="nearest")
        elif isinstance(op, Attend):
            if attention_window is None or max(t.shape[2:]) <= attention_window:
                stack[-1] = op.module(t)
            else:
                stats = GroupStats(op.norm.module.num_groups)
                stats.add(t)
                stack[-1] = _run_attention(op, stats, t, budget=2**62, window=attention_window)
        else:  # pragma: no cover - every op type is handled above
            raise TypeError(f"unknown op {op}")
    return stack[-1]


# ---- entry points ----------------------------------------------------------------------------


def _program(vae: nn.Module, kind: str) -> list[Op]:
    if kind == "encode":
        return encoder_program(vae)
    if kind == "decode":
        return decoder_program(vae)
    raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")


def tiled_encode(
    vae: nn.Module,
    image: Tensor,
    budget: int,
    tile: int | None = None,
    tick: Tick | None = None,
    attention_window: int | None = ATTENTION_WINDOW,
) -> Tensor:
    """``vae.encoder`` + ``quant_conv`` in tiles: image ``[B, 3, H, W]`` in [-1, 1] -> moments
    ``[B, 2 * latent_channels, H/8, W/8]`` (mean, logvar) in the VAE's dtype.

    Args:
        budget: activation bytes (checkpoints + one tile); ``tile``: tile side in image pixels
            (None = the largest that fits the budget).
        attention_window: see :class:`TiledVAEConfig`.
    """
    config = TiledVAEConfig(budget=budget, tile=tile, attention_window=attention_window)
    runner = TiledVAERunner(_program(vae, "encode"), config, tick)
    return runner.run(image)


def tiled_decode(
    vae: nn.Module,
    latent: Tensor,
    budget: int,
    tile: int | None = None,
    tick: Tick | None = None,
    attention_window: int | None = ATTENTION_WINDOW,
) -> Tensor:
    """``post_quant_conv`` + ``vae.decoder`` in tiles: unscaled latent ``[B, 4, h, w]`` ->
    image ``[B, 3, 8h, 8w]`` (unclamped, VAE dtype). ``tile`` is in output pixels."""
    config = TiledVAEConfig(budget=budget, tile=tile, attention_window=attention_window)
    runner = TiledVAERunner(_program(vae, "decode"), config, tick)
    return runner.run(latent)


def estimate_untiled_bytes(
    vae: nn.Module, kind: str, shape: tuple[int, ...], dtype: torch.dtype
) -> int:
    """Rough peak activation bytes of the plain (untiled) diffusers VAE call on ``shape``.

    The largest pair of consecutive feature maps (an op's input and output) plus the residual
    input held alongside and an fp32-sized temporary, which is what eager PyTorch holds at a
    convolution of the widest full-resolution block.
    """
    ops = _program(vae, kind)
    b, c, h, w = shape
    sizes, chans = _shapes(ops, h, w, c)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per = [sum(cs) * hw[0] * hw[1] for hw, cs in zip(sizes, chans, strict=True)]
    pair = max(per[i] + per[i + 1] for i in range(len(per) - 1))
    # Calibrated on SD2.1's VAE with run_whole on CPU, fp32 (measured peak / this estimate
    # before the factor: decode 0.51-0.53 at 512 and 768 px, encode 0.59-0.60), 5-10 % headroom.
    factor = 0.55 if kind == "decode" else 0.65
    return int(factor * b * ((pair + max(per)) * itemsize + max(per) * 4))


def whole_encode(
    vae: nn.Module, image: Tensor, attention_window: int | None = ATTENTION_WINDOW
) -> Tensor:
    """Untiled ``encoder`` + ``quant_conv`` through :func:`run_whole`: image -> moments."""
    return run_whole(encoder_program(vae), image, attention_window)


def whole_decode(
    vae: nn.Module, latent: Tensor, attention_window: int | None = ATTENTION_WINDOW
) -> Tensor:
    """Untiled ``post_quant_conv`` + ``decoder`` through :func:`run_whole` (unscaled latent)."""
    return run_whole(decoder_program(vae), latent, attention_window)


def is_supported(vae: nn.Module) -> bool:
    """True when the tiled path understands ``vae``'s structure (else use the plain VAE)."""
    try:
        encoder_program(vae)
        decoder_program(vae)
    except (UnsupportedVAEError, AttributeError, TypeError):
        return False
    return True
