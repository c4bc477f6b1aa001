"""Windowed UNet self-attention: global when the window covers the latent, otherwise each
query block attends exactly to its window (checked against masked global attention)."""

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
