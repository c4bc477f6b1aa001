"""Token-chunked UNet feed-forward: the same function as diffusers' whole feed-forward, with
no call seeing more than ``chunk`` positions; the modules are put back afterwards."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from tiny_models import TINY_CONTEXT_DIM, tiny_unet

from d3sr_core.inference.unet_feed_forward import ChunkedFeedForward, chunked_feed_forward


def _geglu_written_out(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU feed-forward as its formula: proj -> h * gelu(gate) -> out."""
    proj = ff.net[0].proj
    h, gate = F.linear(x, proj.weight, proj.bias).chunk(2, dim=-1)
    out = ff.net[2]
    return F.linear(h * F.gelu(gate), out.weight, out.bias)


@pytest.mark.parametrize("length,chunk", [(23, 5), (20, 5), (7, 7), (6, 9)])
def test_chunks_compute_the_whole_feed_forward(length, chunk):
    torch.manual_seed(0)
    ff = FeedForward(12, activation_fn="geglu").eval()
    x = torch.randn(2, length, 12)
    seen = []
    ff.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.inference_mode():
        out = ChunkedFeedForward(ff, chunk)(x)
    torch.testing.assert_close(out, _geglu_written_out(ff, x), atol=1e-6, rtol=1e-5)
    # every chunk but the last is full; none longer than ``chunk``
    expected = [chunk] * (length // chunk) + ([length % chunk] if length % chunk else [])
    assert seen == (expected if length > chunk else [length])


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be a positive number of positions, got 0"):
        ChunkedFeedForward(torch.nn.Identity(), 0)
    x = torch.arange(6.0).view(1, 3, 2)
    torch.testing.assert_close(ChunkedFeedForward(torch.nn.Identity(), 1)(x), x)


class _Recording(torch.nn.Module):
    """A position-wise stand-in that records what each call got: x * scale + offset."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, scale=1.0, *, offset=0.0):
        self.calls.append((x, scale, offset))
        return x * scale + offset


def test_arguments_reach_every_chunk_and_whole_inputs_pass_unchanged():
    x = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(1))
    ff = _Recording()
    out = ChunkedFeedForward(ff, 4)(x, 2.0, offset=0.5)
    torch.testing.assert_close(out, x * 2.0 + 0.5)
    assert [(c[0].shape[1], c[1], c[2]) for c in ff.calls] == [
        (4, 2.0, 0.5),
        (4, 2.0, 0.5),
        (2, 2.0, 0.5),
    ]
    for length in (4, 3):  # at most one chunk: the input itself, one call
        ff.calls.clear()
        y = x[:, :length]
        out = ChunkedFeedForward(ff, 4)(y, 3.0, offset=1.0)
        assert len(ff.calls) == 1 and ff.calls[0][0] is y and ff.calls[0][1:] == (3.0, 1.0)
    ff.calls.clear()  # not [B, L, C]: passed whole, whatever its second axis
    image = torch.randn(1, 9, 2, 2)
    out = ChunkedFeedForward(ff, 4)(image, 2.0, offset=0.0)
    assert len(ff.calls) == 1 and ff.calls[0][0] is image


def test_unet_output_unchanged_and_modules_restored():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, 16, 24, generator=g)
    context = torch.randn(1, 77, TINY_CONTEXT_DIM, generator=g)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    originals = [b.ff for b in blocks]
    widest = []
    for b in blocks:
        b.ff.net[0].register_forward_pre_hook(lambda m, a: widest.append(a[0].shape[1]))

    def run():
        with torch.inference_mode():
            return unet(sample, 499, encoder_hidden_states=context).sample

    ref = run()
    assert max(widest) == 16 * 24  # the first level's positions, at once
    widest.clear()
    with chunked_feed_forward(unet, 50), chunked_feed_forward(unet, 50):  # nested: wrapped once
        assert all(type(b.ff) is ChunkedFeedForward and b.ff.feed_forward is f
                   for b, f in zip(blocks, originals, strict=True))  # fmt: skip
        chunked = run()
    assert blocks and max(widest) == 50
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    assert [b.ff for b in blocks] == originals


def test_modules_restored_after_an_error_and_none_changes_nothing():
    unet = tiny_unet()
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    originals = [b.ff for b in blocks]
    with pytest.raises(RuntimeError, match="boom"), chunked_feed_forward(unet, 8):
        raise RuntimeError("boom")
    assert [b.ff for b in blocks] == originals
    with chunked_feed_forward(unet, None):
        assert [b.ff for b in blocks] == originals
