"""Windowed UNet self-attention: global when the window covers the latent, otherwise each
query block attends exactly to its window (checked against masked global attention)."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_CONTEXT_DIM, tiny_unet

from d3sr_core.inference.tiled_vae import attention_spans
from d3sr_core.inference.unet_attention import (
    _LatentShape,
    disable_windowed_attention,
    enable_windowed_attention,
    windowed_self_attention,
)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _run(unet, sample):
    g = torch.Generator().manual_seed(5)
    context = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=g)
    with torch.inference_mode():
        return unet(sample, 499, encoder_hidden_states=context).sample


def test_window_covering_the_latent_equals_global_attention(unet):
    sample = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    ref = _run(unet, sample)
    try:
        enable_windowed_attention(unet, window=24)
        covered = _run(unet, sample)
        enable_windowed_attention(unet, window=8)  # smaller than the latent: differs
        narrow = _run(unet, sample)
    finally:
        disable_windowed_attention(unet)
    torch.testing.assert_close(covered, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(narrow).all() and not torch.allclose(narrow, ref, atol=1e-4)
    torch.testing.assert_close(_run(unet, sample), ref, atol=0, rtol=0)  # restored


def test_windowed_attention_equals_masked_global_attention(unet):
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn1"))
    h, w, window = 10, 13, 6
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, h * w, attn.to_q.in_features, generator=g)
    shape = _LatentShape()
    shape.hw = (h, w)
    with torch.inference_mode():
        out = windowed_self_attention(attn, x, shape, window)
        # reference: every query may see exactly the keys of its block's window
        mask = torch.zeros(h, w, h, w, dtype=torch.bool)
        for qy0, qy1, ky0, ky1 in attention_spans(h, window):
            for qx0, qx1, kx0, kx1 in attention_spans(w, window):
                mask[qy0:qy1, qx0:qx1, ky0:ky1, kx0:kx1] = True
        heads = attn.heads
        q, k, v = (
            t.view(2, h * w, heads, -1).transpose(1, 2)
            for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x))
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(h * w, h * w))
        ref = attn.to_out[0](o.transpose(1, 2).reshape(2, h * w, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert mask.view(h * w, h * w).sum(1).eq(window * window).all(), "full windows everywhere"


def windowed_by_hand(q, k, v, h, w, window, scale):
    """Per query position: softmax(scale * q.k) over the keys of its window, written out.
    ``q, k, v``: ``[B, heads, h*w, d]``. Along each axis longer than ``window`` the queries
    form ``ceil(n / (window // 4))`` even blocks (edges ``round(i * n / blocks)``); a block
    ``[q0, q1)`` sees the ``window`` keys from ``(q0 + q1 - window) // 2``, moved inside."""

    def key_span(i, n):
        if window >= n:
            return 0, n
        blocks = math.ceil(n / max(1, window // 4))
        edges = [round(j * n / blocks) for j in range(blocks + 1)]
        j = next(j for j in range(blocks) if edges[j] <= i < edges[j + 1])
        k0 = min(max((edges[j] + edges[j + 1] - window) // 2, 0), n - window)
        return k0, k0 + window

    out = torch.empty_like(q)
    for y in range(h):
        ky0, ky1 = key_span(y, h)
        for x in range(w):
            kx0, kx1 = key_span(x, w)
            keys = [yy * w + xx for yy in range(ky0, ky1) for xx in range(kx0, kx1)]
            logits = scale * q[:, :, y * w + x, None, :] @ k[:, :, keys].transpose(-1, -2)
            out[:, :, y * w + x] = (logits.softmax(-1) @ v[:, :, keys])[:, :, 0]
    return out


class BareAttention(torch.nn.Module):
    """Only what the docstring promises to read: to_q/k/v, to_out, heads (no ``scale``,
    ``residual_connection``, norms ...): the defaults apply."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Identity()])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5


def _attention_case(attn, h, w, window, dtype=torch.float32):
    x = torch.randn(2, h * w, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
    shape = _LatentShape()
    shape.hw = (h, w)
    with torch.no_grad():
        out = windowed_self_attention(attn.to(dtype), x.to(dtype), shape, window)
        attn.float()
        heads = attn.heads
        q, k, v = (
            t.view(2, h * w, heads, -1).transpose(1, 2)
            for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x))
        )
        d = q.shape[-1]
        scale = float(attn.scale) if hasattr(attn, "scale") else d**-0.5
        o = windowed_by_hand(q, k, v, h, w, window, scale).transpose(1, 2).reshape(2, h * w, -1)
        ref = attn.to_out[0](o)
        if getattr(attn, "residual_connection", False):
            ref = ref + x
        ref = ref / getattr(attn, "rescale_output_factor", 1.0)
    return out, ref


@pytest.mark.parametrize("kind", ["bare", "diffusers", "bf16"])
def test_windowed_attention_equals_softmax_written_out(kind):
    from diffusers.models.attention_processor import Attention

    if kind == "bare":
        attn = BareAttention()
    else:  # a non-default scale (scale_qk=False: 1.0), a residual and an output factor
        torch.manual_seed(0)
        attn = Attention(
            8, heads=2, dim_head=4, scale_qk=False, residual_connection=True,
            rescale_output_factor=2.0, out_bias=True,
        ).eval()  # fmt: skip
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    out, ref = _attention_case(attn, 7, 10, 4, dtype)
    assert out.dtype == dtype
    tol = 0.05 if kind == "bf16" else 1e-5
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


class Spy:
    """A fallback processor that records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "fallback"


def test_processor_falls_back_exactly_when_documented():
    from d3sr_core.inference.unet_attention import WindowedSelfAttnProcessor

    shape = _LatentShape()
    shape.hw = (8, 12)
    attn = BareAttention()
    x = torch.randn(1, 96, 8)
    spy = Spy()
    proc = WindowedSelfAttnProcessor(6, shape, spy)
    extra = torch.ones(1)
    ctx, mask, temb = torch.randn(1, 3, 8), torch.ones(1, 96, 96), torch.zeros(1)
    # cross-attention, a mask, a 4-D input: the fallback, with every argument passed on
    assert proc(attn, x, ctx, None, temb, extra, flag=1) == "fallback"
    assert proc(attn, x, None, mask) == "fallback"
    assert proc(attn, x.view(1, 8, 12, 8)) == "fallback"
    args, kwargs = spy.calls[0]
    assert args[0] is attn and args[1] is x and args[2] is ctx and args[3] is None
    assert args[4] is temb and args[5] is extra and kwargs == {"flag": 1}
    assert spy.calls[1][0][3] is mask and spy.calls[1][0][2] is None
    # norms the windowed path does not apply: the fallback
    for norm in ("group_norm", "spatial_norm", "norm_q"):
        normed = BareAttention()
        setattr(normed, norm, torch.nn.Identity())
        assert proc(normed, x) == "fallback", norm
    # a window covering the latent (12 per side here) is global attention: the fallback
    assert WindowedSelfAttnProcessor(12, shape, spy)(attn, x) == "fallback"
    assert len(spy.calls) == 7
    out = WindowedSelfAttnProcessor(11, shape, spy)(attn, x)
    assert isinstance(out, torch.Tensor) and len(spy.calls) == 7
    # window 1 is allowed, 0 refused
    assert WindowedSelfAttnProcessor(1, shape, spy).window == 1
    with pytest.raises(ValueError) as err:
        WindowedSelfAttnProcessor(0, shape, spy)
    assert str(err.value) == "window must be a positive number of latent positions, got 0"
    # the latent size is needed, and only its levels' token counts are accepted
    fresh = _LatentShape()
    with pytest.raises(RuntimeError) as err:
        WindowedSelfAttnProcessor(2, fresh, spy)(attn, x)
    assert str(err.value) == "windowed attention needs the UNet's input size (call the UNet)"
    fresh.hw = (256, 256)
    assert fresh.level(4) == (2, 2, 7)
    with pytest.raises(RuntimeError) as err:
        fresh.level(1)  # eight halvings: beyond the UNet's levels
    assert str(err.value) == "1 tokens match no level of a (256, 256) latent"


def test_enable_is_idempotent_and_disable_restores_everything(unet):
    from diffusers.models.attention_processor import Attention

    from d3sr_core.inference.unet_attention import WindowedSelfAttnProcessor, current_window

    before = {n: m.processor for n, m in unet.named_modules() if hasattr(m, "set_processor")}
    hooks = len(unet._forward_pre_hooks)
    disable_windowed_attention(unet)  # not enabled: nothing to do
    assert current_window(unet) is None
    sample = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    context = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=torch.Generator().manual_seed(5))
    try:
        enable_windowed_attention(unet, window=16)
        enable_windowed_attention(unet, window=8)  # only changes the window
        assert current_window(unet) == 8
        for name, module in unet.named_modules():
            if name.endswith("attn2"):  # cross-attention keeps its processor
                assert module.processor is before[name]
            elif name.endswith("attn1"):
                assert isinstance(module.processor, WindowedSelfAttnProcessor)
        with torch.inference_mode():  # the pre-hook reads the sample given by keyword too
            by_kw = unet(sample=sample, timestep=499, encoder_hidden_states=context).sample
            by_pos = unet(sample, 499, encoder_hidden_states=context).sample
        torch.testing.assert_close(by_kw, by_pos, atol=0, rtol=0)
    finally:
        disable_windowed_attention(unet)
    after = {n: m.processor for n, m in unet.named_modules() if hasattr(m, "set_processor")}
    assert all(after[n] is p for n, p in before.items()) and len(unet._forward_pre_hooks) == hooks
    assert current_window(unet) is None
    # a model with a single self-attention, and one with none
    holder = torch.nn.Module()
    holder.attn1 = Attention(8, heads=2, dim_head=4)
    enable_windowed_attention(holder, 5)
    assert current_window(holder) == 5
    with pytest.raises(ValueError) as err:
        enable_windowed_attention(torch.nn.Linear(2, 2))
    assert str(err.value) == "Linear has no self-attention (attn1) to window"
