"""Independent references for the numeric path: written from the spec's formulas and
diffusers' public classes only, never from ``d3sr_core`` helpers.

* :func:`bicubic_resize` - Keys' cubic convolution (a = -0.75, half-pixel centres, edge
  samples repeated), the "bicubic" of OpenCV and PyTorch, written out as two matrices;
* :func:`reference_upscale` - spec section 1/2: bicubic upsample, ``E(x).mode() * scaling``,
  the UNet at the checkpoint's timestep with the stored prompt embedding, closed-form x0 from
  the scheduler's own ``alphas_cumprod``, ``D(z / scaling)``;
* :func:`atrous_wavelet_fix` / :func:`adain_fix` - the textbook colour fixes of StableSR;
* :func:`merge_by_hand` - ``W + strength * scale * B @ A`` (conv: ``B`` 1x1 folded into ``A``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

# SD2.1-base's schedule, from diffusers' own scheduler class.
SD21_SCHEDULER = DDPMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def _cubic(x: Tensor, a: float = -0.75) -> Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]``: output sample i reads input position ``(i + 0.5) * n_in / n_out - 0.5``."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            weight = _cubic(torch.tensor(src - k, dtype=torch.float64))
            m[i, min(max(k, 0), n_in - 1)] += weight
    return m


def bicubic_resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, C, out_h, out_w]`` (float32, no clamping)."""
    mh = bicubic_matrix(x.shape[-2], out_h)
    mw = bicubic_matrix(x.shape[-1], out_w)
    return torch.einsum("oh,bchw,pw->bcop", mh, x.double(), mw).float()


def output_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    """Spec section 4: ``floor(side * scale + 0.5)``."""
    return math.floor(h * scale + 0.5), math.floor(w * scale + 0.5)


@torch.no_grad()
def reference_upscale(
    unet,
    vae,
    prompt_embeds: Tensor,
    images: Tensor,
    scale: float,
    timestep: int,
    prediction_type: str = "epsilon",
    scaling_factor: float = 0.18215,
    upsample=None,
) -> Tensor:
    """The generator of the spec on ``[B, 3, H, W]`` images in [0, 1] -> [0, 1], float32.

    Images whose output is not a multiple of 8 are reflect-padded at the bottom/right and
    cropped back (the engine's documented padding). ``upsample(x, h, w)`` replaces the
    bicubic resize (to show that a different interpolation is detected).
    """
    out_h, out_w = output_hw(images.shape[-2], images.shape[-1], scale)
    up = (upsample or bicubic_resize)(images, out_h, out_w).clamp(0, 1)
    ph, pw = (-out_h) % 8, (-out_w) % 8
    if ph or pw:
        up = F.pad(up, (0, pw, 0, ph), mode="reflect")
    z = vae.encode(up * 2 - 1).latent_dist.mode() * scaling_factor
    t = torch.full((z.shape[0],), timestep, dtype=torch.long)
    cond = prompt_embeds.expand(z.shape[0], -1, -1)
    out = unet(z, t, encoder_hidden_states=cond).sample
    abar = SD21_SCHEDULER.alphas_cumprod[timestep].double()
    a, s = abar.sqrt().float(), (1 - abar).sqrt().float()
    x0 = (z - s * out) / a if prediction_type == "epsilon" else a * z - s * out
    decoded = vae.decode(x0 / scaling_factor).sample.clamp(-1, 1)
    return ((decoded + 1) / 2).clamp(0, 1)[:, :, :out_h, :out_w]


# ---- colour fixes ---------------------------------------------------------------------------
_KERNEL = ((1, 2, 1), (2, 4, 2), (1, 2, 1))  # /16


def atrous_blur(x: Tensor, dilation: int) -> Tensor:
    """One a-trous level by explicit shifted sums; samples outside repeat the edge."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x, dtype=torch.float64)
    for i, dy in enumerate((-1, 0, 1)):
        rows = (torch.arange(h) + dy * dilation).clamp(0, h - 1)
        for j, dx in enumerate((-1, 0, 1)):
            cols = (torch.arange(w) + dx * dilation).clamp(0, w - 1)
            out += _KERNEL[i][j] / 16 * x.double()[:, :, rows][:, :, :, cols]
    return out


def atrous_low(x: Tensor, levels: int = 5) -> Tensor:
    """The residual low band after ``levels`` a-trous blurs with dilations 1, 2, 4, ..."""
    for i in range(levels):
        x = atrous_blur(x, 2**i)
    return x


def atrous_wavelet_fix(output: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """``output - low(output) + low(reference)`` (the high bands telescope), clamped."""
    fixed = output.double() - atrous_low(output, levels) + atrous_low(reference, levels)
    return fixed.clamp(0, 1).float()


def adain_fix(output: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-image, per-channel ``(x - mean_x) / std_x * std_ref + mean_ref``; unbiased var + eps."""

    def stats(t: Tensor) -> tuple[Tensor, Tensor]:
        flat = t.double().flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[
            ..., None, None
        ]

    mo, so = stats(output)
    mr, sr = stats(reference)
    return ((output.double() - mo) / so * sr + mr).clamp(0, 1).float()


# ---- LoRA -----------------------------------------------------------------------------------
def merged_weight(weight: Tensor, down: Tensor, up: Tensor, factor: float) -> Tensor:
    """``W + factor * B @ A``; for a conv, ``B [out, r, 1, 1]`` mixes ``A [r, in, kh, kw]``."""
    if down.ndim == 2:
        delta = up.double() @ down.double()
    else:
        delta = torch.einsum("or,rikl->oikl", up.double()[:, :, 0, 0], down.double())
    return (weight.double() + factor * delta).to(weight.dtype)


def merge_by_hand(model, factors: dict, scale: float, strength: float, replaced=None):
    """A merged copy of ``model``: LoRA pairs at ``strength * scale``; a replaced
    parameter becomes ``base + strength * (trained - base)``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, (down, up) in factors.items():
            module = model.get_submodule(path)
            module.weight.copy_(merged_weight(module.weight, down, up, strength * scale))
        for path, trained in (replaced or {}).items():
            param = model.get_parameter(path)
            param.copy_(param + strength * (trained - param))
    return model
