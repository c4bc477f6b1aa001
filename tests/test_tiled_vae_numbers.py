"""Tiled VAE planner and runner numbers against formulas written out here: the op costs, a
tile's working-set estimate, and the checkpoint plan against a brute-force search over every
keep / drop choice (tiny hand-made programs, milliseconds each)."""

import pytest
import torch
from torch import nn

from d3sr_core.inference.tiled_vae import planner
from d3sr_core.inference.tiled_vae.ops import Conv, Norm, Push, Residual, Upsample, UpConv


def _conv(c_in: int, c_out: int, k: int = 3) -> Conv:
    m = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    return Conv(m, (k // 2,) * 4)


def test_op_cost_is_the_written_out_flop_count():
    """2 * k_h * k_w * C_in * C_out per output pixel for a conv; the folded upsampling conv
    as 16 taps at the low resolution plus 600 per output element; GroupNorm 300 per element,
    a residual add 300 per element (plus a 1x1 shortcut conv), nearest upsampling 100."""
    conv = _conv(3, 5)
    assert planner._op_cost(conv, (7, 9), (7, 9), 3, 5) == 2 * 3 * 3 * 3 * 5 * 63
    one = _conv(4, 6, k=1)
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
