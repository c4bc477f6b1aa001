"""Tiny hand-made tiled-VAE programs and their shapes worked out by hand, shared by the
planner tests (test_tiled_vae_numbers.py) and the runner tests (test_tiled_vae_runner.py)."""

import torch
from torch import nn

from d3sr_core.inference.tiled_vae.ops import Conv, Norm, Push, Residual, UpConv, Upsample


def conv_op(c_in: int, c_out: int, k: int = 3) -> Conv:
    m = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    return Conv(m, (k // 2,) * 4)


def region(y0: int, y1: int, x0: int, x1: int):
    from d3sr_core.inference.tiled_vae.ops import Region

    return Region(y0, y1, x0, x1)


def small_program():
    """conv_in, a residual block (push, norm, conv, add), attention, a residual block with a
    1x1 shortcut, a folded upsampling conv, norm, conv, norm (a state that may overwrite the
    previous one in place), conv, nearest upsampling, conv_out: every kind of op the planner
    prices, 6 choices besides the forced ones."""
    from diffusers.models.attention_processor import Attention

    from d3sr_core.inference.tiled_vae.ops import Attend

    torch.manual_seed(0)
    attention = Attention(8, heads=1, dim_head=8, norm_num_groups=2, residual_connection=True)
    return [
        conv_op(4, 8),
        Push(),
        Norm(nn.GroupNorm(2, 8), act=True),
        conv_op(8, 8),
        Residual(None, 1.0),
        Attend(attention),
        conv_op(8, 8),  # not a push: the state after the attention differs from 2 ops later
        Push(),
        Norm(nn.GroupNorm(2, 8), act=True),
        conv_op(8, 12),
        Residual(nn.Conv2d(8, 12, 1), 1.0),
        UpConv(nn.Conv2d(12, 12, 3, padding=1)),
        Norm(nn.GroupNorm(3, 12), act=True),
        conv_op(12, 12),
        Norm(nn.GroupNorm(3, 12), act=True),
        conv_op(12, 6),
        Upsample(),
        conv_op(6, 3),
    ]


def shapes_by_hand(ops, h, w, c):
    """Sizes, per-element channels and element tokens per boundary, by running the stack:
    a push repeats the top token, a residual pops two and pushes a new one, any other op
    replaces the top (an attention's output included)."""
    sizes, chans, tokens = [(h, w)], [[c]], [[object()]]
    for op in ops:
        ch, tk = list(chans[-1]), list(tokens[-1])
        if isinstance(op, Push):
            ch, tk = [*ch, ch[-1]], [*tk, tk[-1]]
        elif isinstance(op, Residual):
            ch, tk = [*ch[:-2], ch[-1]], [*tk[:-2], object()]
        else:
            out = getattr(op, "module", None)
            if isinstance(op, (Conv, UpConv)):
                ch[-1] = out.out_channels
            tk[-1] = object()
        if isinstance(op, (UpConv, Upsample)):
            h, w = 2 * h, 2 * w
        elif isinstance(op, Conv):  # (size + pads - kernel) // stride + 1 per axis
            m, (pt, pb, pl, pr) = op.module, op.pad
            h = (h + pt + pb - m.kernel_size[0]) // m.stride[0] + 1
            w = (w + pl + pr - m.kernel_size[1]) // m.stride[1] + 1
        sizes.append((h, w))
        chans.append(ch)
        tokens.append(tk)
    return sizes, chans, tokens
