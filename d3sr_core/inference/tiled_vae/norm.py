"""Whole-image GroupNorm statistics merged from tiles, and applying them to a tile."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from .ops import Norm, dense


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
    channels_last), accumulating in fp32 - for half-precision tiles through its mixed-precision
    variant, without an fp32 copy - so the statistics are as accurate as ``nn.GroupNorm``'s.
    """
    b, c = x.shape[:2]
    eps = 1e-12
    # The kernel needs a packed tensor; off the CPU (CUDA, MPS) one in NCHW order: only the
    # CPU kernel takes channels_last, and F.group_norm packs for the others (this does not).
    x = dense(x) if x.device.type == "cpu" else x.contiguous()
    moments = native.channel_moments(x)
    if moments is not None:
        return _group_moments_from_channels(*moments, x.shape[2] * x.shape[3], groups)
    if x.dtype in (torch.float16, torch.bfloat16):
        # fp32 affine parameters select the mixed-precision kernel: fp32 accumulation and
        # fp32 statistics straight from the half-precision tensor (no fp32 copy of it).
        ones = torch.ones(c, device=x.device)
        try:
            _, mean, rstd = torch.native_group_norm(
                x, ones, torch.zeros_like(ones), b, c, x.shape[2] * x.shape[3], groups, eps
            )
        except RuntimeError:  # a backend without mixed-precision group_norm
            x = x.float()
        else:
            return _moments(mean, rstd, b, groups, eps)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    _, mean, rstd = torch.native_group_norm(
        xf, None, None, b, c, x.shape[2] * x.shape[3], groups, eps
    )
    return _moments(mean, rstd, b, groups, eps)


def _group_moments_from_channels(
    mean: Tensor, m2: Tensor, n: int, groups: int
) -> tuple[Tensor, Tensor]:
    """Group mean and biased variance ``[B, G]`` from per-channel means and squared deviations
    ``[B, C]`` over ``n`` pixels each (the parallel-variance formula over a group's channels)."""
    b, c = mean.shape
    mean = mean.view(b, groups, c // groups)
    group_mean = mean.mean(dim=2)
    m2 = m2.view(b, groups, c // groups).sum(dim=2)
    m2 = m2 + n * ((mean - group_mean.unsqueeze(2)) ** 2).sum(dim=2)
    return group_mean, m2 / (n * (c // groups))


def _moments(mean: Tensor, rstd: Tensor, b: int, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    mean = mean.double().cpu().view(b, groups)
    var = (1.0 / rstd.double().cpu().view(b, groups) ** 2 - eps).clamp_min(0.0)
    return mean, var


def normalize_act(
    x: Tensor, mean: Tensor, var: Tensor, norm: nn.GroupNorm, act: bool, out: Tensor | None = None
) -> Tensor:
    """``act(GroupNorm(x))`` of ``x`` ``[B, C, H, W]`` with given group statistics ``mean``,
    ``var`` ``[B, G]`` (float64, CPU) and ``norm``'s affine parameters and eps; ``act`` is SiLU
    or identity. ``out`` (may be ``x``) receives it where the native kernels take ``x`` and
    ``out`` (see :func:`..native.affine_act`); else a new tensor does."""
    b, c = x.shape[:2]
    rep = c // norm.num_groups
    weight = norm.weight if norm.weight is not None else torch.ones(c, device=x.device)
    bias = norm.bias if norm.bias is not None else torch.zeros(c, device=x.device)
    if native.applies_to(x):  # CPU: the statistics stay float64 until the per-channel affine
        scale = weight.double() * (var + norm.eps).rsqrt().repeat_interleave(rep, dim=1)
        shift = bias.double() - mean.repeat_interleave(rep, dim=1) * scale
        return native.affine_act(x, scale, shift, act, out)  # (not None: applies_to(x))
    mean = mean.repeat_interleave(rep, dim=1).to(device=x.device, dtype=torch.float32)
    var = var.repeat_interleave(rep, dim=1).to(device=x.device, dtype=torch.float32)
    weight, bias = weight.float(), bias.float()
    outs = []
    for i in range(b):
        xi = dense(x[i : i + 1])  # batch_norm is ~10x slower on a strided crop (CPU)
        try:
            # Eval-mode batch_norm = (x - mean) / sqrt(var + eps) * w + b per channel: one
            # fused kernel that computes in fp32 for half inputs and keeps channels_last.
            y = F.batch_norm(xi, mean[i], var[i], weight, bias, False, 0.0, norm.eps)
        except RuntimeError:  # a backend without mixed-precision batch_norm
            scale = (var[i] + norm.eps).rsqrt() * weight
            shift = bias - mean[i] * scale
            y = (xi.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
        outs.append(y)
    y = outs[0] if b == 1 else torch.cat(outs)
    return F.silu(y, inplace=True) if act else y


def group_norm_act(x: Tensor, norm: nn.GroupNorm, act: bool, out: Tensor | None = None) -> Tensor:
    """``act(norm(x))`` (``act``: SiLU or identity) for ``x`` ``[B, C, H, W]``, written into
    ``out`` (which may be ``x``) when the native kernels take both; torch's own GroupNorm
    (into a new tensor) elsewhere."""
    moments = native.channel_moments(x)
    if moments is None:
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y, inplace=True) if act else y
    mean, var = _group_moments_from_channels(*moments, x.shape[2] * x.shape[3], norm.num_groups)
    return normalize_act(x, mean, var, norm, act, out)


def _apply_norm(op: Norm, st: GroupStats, x: Tensor) -> Tensor:
    packed = dense(x)
    # a packed copy is ours to overwrite; a dense x may be a checkpoint still needed
    out = packed if packed is not x else None
    return normalize_act(packed, st.mean, st.var, op.module, op.act, out)
