"""The same programs run untiled (the whole image at once), and the untiled peak estimate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ATTENTION_WINDOW, _run_attention
from .norm import GroupStats, group_norm_act
from .ops import (
    Attend,
    Conv,
    Norm,
    Op,
    Push,
    Residual,
    UpConv,
    Upsample,
    _shapes,
    conv_add_,
    conv_padded,
    upsample_conv,
)
from .program import decoder_program, encoder_program


def run_whole(ops: list[Op], x: Tensor, attention_window: int | None = ATTENTION_WINDOW) -> Tensor:
    """Run a program on the whole tensor at once (the untiled path).

    The same computation as the diffusers modules, with fewer memory passes: GroupNorm and
    SiLU as one in-place pass (:func:`group_norm_act`), a residual branch's last conv adding
    its input as it writes (:func:`conv_add_`; no division by an ``output_scale_factor`` of
    1), and upsampling folded into the next conv
    (:func:`upsample_conv`). Self-attention is windowed as in the tiled path
    (``attention_window``), so both paths compute the same function.
    """
    dtype = next((op.module.weight.dtype for op in ops if isinstance(op, Conv)), x.dtype)
    stack = [x.to(dtype)]

    def owned(i: int) -> bool:
        """Whether ``stack[i]`` may be overwritten: no other stack slot, nor the caller, holds it."""
        t = stack[i]
        return t is not x and sum(s is t for s in stack) == 1

    skip_op = -1  # a Residual already computed by the conv before it
    # A residual block's first GroupNorm cannot overwrite its input (the block adds it back
    # at the end); its output, dead once the conv after it has read it, is kept for the next
    # such GroupNorm of the same shape instead of faulting in fresh memory (>= 15 % of a
    # full-resolution GroupNorm+SiLU). Held only while the conv-add below allocates nothing.
    spare: Tensor | None = None
    for i, op in enumerate(ops):
        if i == skip_op:
            continue
        t = stack[-1]
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if isinstance(op, Norm) and not owned(-1):
            stack[-1] = group_norm_act(t, op.module, op.act, out=spare)  # (if it fits)
            spare = None
            continue
        if isinstance(op, Conv) and isinstance(nxt, Norm) and owned(-1) and spare is None:
            spare = t  # a block's first conv reads the first GroupNorm's output
        elif not isinstance(op, (Conv, Norm, Push)):
            spare = None
        if (
            isinstance(op, Conv)
            and isinstance(nxt, Residual)
            and nxt.scale == 1.0
            and (nxt.shortcut is not None or owned(-2))
        ):
            # the branch's last conv writes straight into its residual sum
            skip = stack[-2]
            if nxt.shortcut is not None:
                spare = None  # the next GroupNorm has other channels: not worth its memory
                skip = F.conv2d(skip, nxt.shortcut.weight, nxt.shortcut.bias)
            pt, pb, pl, pr = op.pad
            stack[-2:] = [conv_add_(skip, t, op.module, (pl, pr, pt, pb))]
            skip_op = i + 1
        elif isinstance(op, Conv):
            pt, pb, pl, pr = op.pad
            stack[-1] = conv_padded(t, op.module, (pl, pr, pt, pb))
        elif isinstance(op, UpConv):
            stack[-1] = upsample_conv(t, op.phase_weight(), op.module.bias, (1, 1, 1, 1))
        elif isinstance(op, Norm):
            stack[-1] = group_norm_act(t, op.module, op.act, out=t)
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
            # global up to the window: diffusers' module would compute the same, but its
            # GroupNorm runs on a transposed (copied) map: 34 vs 25 ms at 64x64 latents, bf16
            stats = GroupStats(op.norm.module.num_groups)
            stats.add(t)
            stack[-1] = _run_attention(op, stats, t, budget=2**62, window=attention_window)
        else:  # pragma: no cover - every op type is handled above
            raise TypeError(f"unknown op {op}")
    return stack[-1]


def _program(vae: nn.Module, kind: str) -> list[Op]:
    if kind == "encode":
        return encoder_program(vae)
    if kind == "decode":
        return decoder_program(vae)
    raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")


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
    # fp32 runs hold an fp32 temporary; half-precision ones compute GroupNorm and convs
    # straight into half-precision outputs, so their temporaries are half-sized too.
    temp = 4 if itemsize >= 4 else itemsize
    # Calibrated on SD2.1's VAE with run_whole on CPU (measured peak / this estimate before
    # the factor: fp32 decode 0.51-0.53 at 512 and 768 px, encode 0.59-0.60; bf16 +
    # channels_last decode 0.54 / 0.46, encode 0.62 at 512 px), 5-10 % headroom.
    factor = 0.55 if kind == "decode" else 0.65
    return int(factor * b * ((pair + max(per)) * itemsize + max(per) * temp))


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
