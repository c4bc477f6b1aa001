"""The same programs run untiled (the whole image at once), and the untiled peak estimate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ATTENTION_WINDOW, _run_attention
from .norm import GroupStats
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
    conv_padded,
    upsample_conv,
)
from .program import decoder_program, encoder_program


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
            pt, pb, pl, pr = op.pad
            stack[-1] = conv_padded(t, op.module, (pl, pr, pt, pb))
        elif isinstance(op, UpConv):
            stack[-1] = upsample_conv(t, op.phase_weight(), op.module.bias, (1, 1, 1, 1))
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
