"""Windowed UNet self-attention: each latent position attends to the ``window`` x ``window``
positions around it (at the training context, 64x64 latents = 512 px), as the tiled VAE
already windows its attention beyond 1024 px.

Why: the UNet's self-attention is global over the latent (or the UNet tile), so its cost grows
with the square of the positions while everything else grows linearly. SD-based SR models are
trained on 512 px crops (64x64 latents), so no position ever attended to more than 64x64 latent
neighbours in training; a window of that size bounds the cost per position without asking the
model for a context it never saw. Cross-attention (to the prompt) is unchanged.

What changes in the output: nothing while the latent (or UNet tile) is at most ``window``
positions per side at the finest level (the window then covers it: global attention, tested);
beyond, positions further apart than about half a window no longer attend to each other.
Query blocks of ``window / 4`` per side attend to the window centred on them (shifted inwards
at the borders, :func:`~d3sr_core.inference.tiled_vae.attention_spans`), so there are no
window seams. At lower UNet levels (latent / 2, / 4, / 8) the window shrinks with the
resolution, i.e. it always spans the same image area.

The pipeline does this by default beyond 512 px UNet tiles (``UpscaleOptions.
unet_attention_window``, ``--unet-attention-window``) through :func:`attention_window`; by
hand: :func:`enable_windowed_attention` / :func:`disable_windowed_attention` on a diffusers
``UNet2DConditionModel``. Only long-stable ``Attention`` attributes (``to_q/k/v``,
``to_out``, ``heads``, ``scale``) are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiled_vae.attention import attention_spans

TRAINING_WINDOW = 64  # latent positions per side of SD2.1's 512 px training crops


class _LatentShape:
    """The spatial size of the latent the UNet currently runs on (set by a forward pre-hook)."""

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None

    def level(self, tokens: int) -> tuple[int, int, int]:
        """``(h, w, k)``: the grid of ``tokens`` positions, ``k`` halvings below the latent."""
        if self.hw is None:
            raise RuntimeError("windowed attention needs the UNet's input size (call the UNet)")
        h, w = self.hw
        for k in range(8):
            if h * w == tokens:
                return h, w, k
            h, w = -(-h // 2), -(-w // 2)
        raise RuntimeError(f"{tokens} tokens match no level of a {self.hw} latent")


class WindowedSelfAttnProcessor:
    """A diffusers attention processor: windowed self-attention, plain cross-attention.

    Args:
        window: latent positions per side at the UNet's full resolution (halved per level).
        shape: shared with the UNet's pre-hook, which records the latent size.
        fallback: the processor used for cross-attention (and masks / 4-D inputs).
    """

    def __init__(self, window: int, shape: _LatentShape, fallback) -> None:
        if window < 1:
            raise ValueError(f"window must be a positive number of latent positions, got {window}")
        self.window = window
        self.shape = shape
        self.fallback = fallback

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        plain = (
            encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or getattr(attn, "group_norm", None) is not None
            or getattr(attn, "spatial_norm", None) is not None
            or getattr(attn, "norm_q", None) is not None
        )
        if not plain:
            h, w, k = self.shape.level(hidden_states.shape[1])
            plain = max(h, w) <= level_window(self.window, k)  # covered: global attention
        if plain:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return windowed_self_attention(attn, hidden_states, self.shape, self.window)


def level_window(window: int, k: int) -> int:
    """The window ``k`` UNet levels below the latent: ``ceil(window / 2**k)``, rounded up
    like the latent's own size, so a window covering the latent covers every level."""
    return -(-window // 2**k)


def windowed_self_attention(attn: nn.Module, x: Tensor, shape: _LatentShape, window: int) -> Tensor:
    """Self-attention of a diffusers ``Attention`` over ``x`` ``[B, L, C]`` (``L`` positions of
    a latent grid) within windows of :func:`level_window` positions per side."""
    b, length, _ = x.shape
    h, w, k = shape.level(length)
    win = level_window(window, k)
    heads = int(attn.heads)
    q, key, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    d = q.shape[-1] // heads
    scale = float(getattr(attn, "scale", d**-0.5))

    def grid(t: Tensor) -> Tensor:  # [B, L, heads * d] -> [B, heads, h, w, d]
        return t.view(b, h, w, heads, d).permute(0, 3, 1, 2, 4)

    q, key, v = grid(q), grid(key), grid(v)
    out = torch.empty(b, heads, h, w, d, dtype=q.dtype, device=q.device)
    for qy0, qy1, ky0, ky1 in attention_spans(h, win):
        for qx0, qx1, kx0, kx1 in attention_spans(w, win):
            flat = [
                t.reshape(b, heads, -1, d)
                for t in (
                    q[:, :, qy0:qy1, qx0:qx1],
                    key[:, :, ky0:ky1, kx0:kx1],
                    v[:, :, ky0:ky1, kx0:kx1],
                )
            ]
            o = F.scaled_dot_product_attention(*flat, scale=scale)
            out[:, :, qy0:qy1, qx0:qx1] = o.view(b, heads, qy1 - qy0, qx1 - qx0, d)
    y = out.permute(0, 2, 3, 1, 4).reshape(b, length, heads * d)
    y = attn.to_out[1](attn.to_out[0](y))
    if getattr(attn, "residual_connection", False):
        y = y + x
    return y / float(getattr(attn, "rescale_output_factor", 1.0))


def enable_windowed_attention(unet: nn.Module, window: int = TRAINING_WINDOW) -> None:
    """Window the self-attention (``attn1``) of every transformer block of ``unet``.

    Idempotent (a second call only changes the window); undone by
    :func:`disable_windowed_attention`.
    """
    state = getattr(unet, "_d3sr_window", None)
    if state is not None:
        for proc in state["procs"]:
            proc.window = window
        return
    shape = _LatentShape()

    def record(module: nn.Module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        shape.hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    saved, procs = {}, []
    for name, module in unet.named_modules():
        if name.endswith("attn1") and hasattr(module, "set_processor"):
            saved[name] = module.processor
            proc = WindowedSelfAttnProcessor(window, shape, module.processor)
            module.set_processor(proc)
            procs.append(proc)
    if not procs:
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) to window")
    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    unet._d3sr_window = {"saved": saved, "procs": procs, "hook": hook}


def current_window(unet: nn.Module) -> int | None:
    """The window :func:`enable_windowed_attention` set on ``unet`` (None: global attention)."""
    state = getattr(unet, "_d3sr_window", None)
    return None if state is None else state["procs"][0].window


@contextmanager
def attention_window(unet: nn.Module, window: int | None) -> Iterator[None]:
    """Run ``unet`` with its self-attention windowed at ``window`` latent positions (None:
    global), restoring the previous state afterwards (the pipeline's per-call option)."""
    previous = current_window(unet)
    has_self_attention = any(n.endswith("attn1") for n, _ in unet.named_modules())
    if window == previous or not has_self_attention:
        yield
        return
    if window is None:
        disable_windowed_attention(unet)
    else:
        enable_windowed_attention(unet, window)
    try:
        yield
    finally:
        if previous is None:
            disable_windowed_attention(unet)
        else:
            enable_windowed_attention(unet, previous)


def disable_windowed_attention(unet: nn.Module) -> None:
    """Restore the processors :func:`enable_windowed_attention` replaced (no-op if none)."""
    state = getattr(unet, "_d3sr_window", None)
    if state is None:
        return
    modules = dict(unet.named_modules())
    for name, proc in state["saved"].items():
        modules[name].set_processor(proc)
    state["hook"].remove()
    del unet._d3sr_window
