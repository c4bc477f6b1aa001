"""The VAE's self-attention on a whole-image (latent-resolution) checkpoint: global up to
``ATTENTION_WINDOW`` positions per side, windowed beyond (linear cost)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import GroupStats, _apply_norm
from .ops import Attend, _spans

# VAE self-attention is global up to this many latent positions per side (512 output pixels);
# larger images attend within windows of this side (see attention_spans). 64 latents is the
# same principled bound as the UNet's default window (SD2.1's 64x64-latent training crop), and
# twice per side the 256x256 images (32x32 latents) the SD kl-f8 VAE was trained and evaluated
# on (Stability's sd-vae-ft-ema/mse: "Improved Autoencoders for 256 x 256 Images", COCO
# 256x256). It makes the attention's cost per pixel at every size what it is at 512x512 (a
# 128-latent window cost 4x that per pixel beyond 1024 px: ~84 s per VAE pass at 4096x4096).
ATTENTION_WINDOW = 64
# Query blocks are window / 4 per side: every query sees at least 3/8 of a window each way.
ATTENTION_BLOCK_DIVISOR = 4


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
