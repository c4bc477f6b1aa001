"""The tiled VAE's whole-image self-attention against diffusers' own ``Attention`` forward (and,
for a module without the optional attributes, the formula written out): non-default scale,
residual, output factor, row chunks and windows (tiny shapes, < 1 s)."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from d3sr_core.inference.tiled_vae import GroupStats, attention_spans
from d3sr_core.inference.tiled_vae.attention import _run_attention
from d3sr_core.inference.tiled_vae.ops import Attend


def _stats(attn, x):
    stats = GroupStats(attn.group_norm.num_groups)
    stats.add(x)
    return stats


@pytest.mark.parametrize("residual", [True, False])
def test_global_attention_equals_diffusers_forward(residual):
    torch.manual_seed(0)
    attn = Attention(
        8, heads=2, dim_head=4, norm_num_groups=2, bias=True, scale_qk=False,
        residual_connection=residual, rescale_output_factor=2.0, _from_deprecated_attn_block=True,
    ).eval()  # fmt: skip
    assert attn.scale == 1.0  # not the default d ** -0.5
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = attn(x)
        for budget in (1, 2000, 10**9):  # one row per chunk, a few, all at once
            out = _run_attention(Attend(attn), _stats(attn, x), x, budget)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class BareVAEAttention(torch.nn.Module):
    """A VAE attention block with only the required attributes: GroupNorm, to_q/k/v, to_out,
    heads (no ``scale``, ``residual_connection`` or ``rescale_output_factor``)."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.heads = heads
        self.group_norm = torch.nn.GroupNorm(2, c, affine=True)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(c, c) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(c, c), torch.nn.Identity()])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5


def by_hand(attn, x, window):
    """GroupNorm -> per query position softmax(q.k / sqrt(d)) over its window's keys -> to_out
    -> + x (the defaults: residual, factor 1)."""
    b, c, h, w = x.shape
    heads, d = attn.heads, c // attn.heads
    t = attn.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = (layer(t).view(b, h * w, heads, d).transpose(1, 2) for layer in
               (attn.to_q, attn.to_k, attn.to_v))  # fmt: skip
    out = torch.empty_like(q)
    spans_y, spans_x = attention_spans(h, window), attention_spans(w, window)
    for qy0, qy1, ky0, ky1 in spans_y:
        for qx0, qx1, kx0, kx1 in spans_x:
            keys = [yy * w + xx for yy in range(ky0, ky1) for xx in range(kx0, kx1)]
            for y in range(qy0, qy1):
                for xq in range(qx0, qx1):
                    i = y * w + xq
                    logits = q[:, :, i, None] @ k[:, :, keys].transpose(-1, -2) / math.sqrt(d)
                    out[:, :, i] = (logits.softmax(-1) @ v[:, :, keys])[:, :, 0]
    o = attn.to_out[0](out.transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2)
    return o.reshape(b, c, h, w) + x


@pytest.mark.parametrize("window,shape", [(None, (6, 9)), (4, (6, 9)), (4, (9, 3))])
def test_defaults_of_a_bare_attention_block(window, shape):
    attn = BareVAEAttention()  # (9, 3): windowed along y only
    x = torch.randn(1, 8, *shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = _run_attention(Attend(attn), _stats(attn, x), x, 10**9, window)
        torch.testing.assert_close(out, by_hand(attn, x, window), atol=1e-5, rtol=1e-5)


def test_spans_written_out():
    assert attention_spans(10, None) == [(0, 10, 0, 10)]
    assert attention_spans(10, 10) == [(0, 10, 0, 10)]
    # blocks of 8 // 4 = 2 queries (5 even spans); each sees the 8 keys centred on it
    assert attention_spans(10, 8) == [
        (0, 2, 0, 8), (2, 4, 0, 8), (4, 6, 1, 9), (6, 8, 2, 10), (8, 10, 2, 10)
    ]  # fmt: skip
    # window 6: blocks of 6 // 4 = 1 query, keys from (2 q + 1 - 6) // 2 moved inside
    k0 = [0, 0, 0, 0, 1, 2, 3, 4, 4, 4]
    assert attention_spans(10, 6) == [(q, q + 1, k, k + 6) for q, k in enumerate(k0)]
    # window 3: blocks of max(1, 0) = 1 query
    assert attention_spans(4, 3) == [(0, 1, 0, 3), (1, 2, 0, 3), (2, 3, 1, 4), (3, 4, 1, 4)]


@pytest.mark.parametrize("window", [None, 4])
def test_row_chunks_follow_the_budget_formula(window):
    """Rows per projection chunk: 0.3 * budget // (w * (6 c itemsize + window_keys * heads * 4)),
    window_keys = the key positions one query block sees (all h*w when global)."""
    attn = BareVAEAttention()
    h, w, c, heads = 6, 9, 8, 2
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(4))
    keys = h * w if window is None else window * window
    row_bytes = w * (c * 4 * 6 + keys * heads * 4)
    budget = int(5 * row_bytes / 0.3) + 1  # five rows per chunk (any other estimate differs)
    seen = []
    hook = attn.to_k.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1] // w))
    with torch.no_grad():
        _run_attention(Attend(attn), _stats(attn, x), x, budget, window)
        assert seen == [5, 1]
        seen.clear()
        _run_attention(Attend(attn), _stats(attn, x), x, 1, window)  # at least one row
        assert seen == [1] * 6
    hook.remove()
